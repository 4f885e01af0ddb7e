"""One module per paper; each exports its factories."""

from .agd import agd

__all__ = ["agd"]
