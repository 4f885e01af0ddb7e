"""One module per paper; each exports its factories."""

from .agd import agd
from .mbf import mbf

__all__ = ["agd", "mbf"]
