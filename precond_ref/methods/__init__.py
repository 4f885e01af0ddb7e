"""One module per paper; each exports its factories."""

from .agd import agd
from .sketchy import s_adagrad, scale_by_sketchy, sketchy

__all__ = ["agd", "s_adagrad", "scale_by_sketchy", "sketchy"]
