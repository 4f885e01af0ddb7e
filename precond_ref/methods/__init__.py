"""One module per paper; each exports its factories."""

from .agd import agd
from .asgo import asgo, dasgo

__all__ = ["agd", "asgo", "dasgo"]
