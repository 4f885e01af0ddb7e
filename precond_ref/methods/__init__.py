"""One module per paper; each exports its factories."""

from .agd import agd
from .asgo import asgo, dasgo
from .mbf import mbf

__all__ = ["agd", "asgo", "dasgo", "mbf"]
