"""One module per paper; each exports its factories."""

from .agd import agd
from .asgo import asgo, dasgo
from .sketchy import s_adagrad, scale_by_sketchy, sketchy

__all__ = ["agd", "asgo", "dasgo", "s_adagrad", "scale_by_sketchy", "sketchy"]
