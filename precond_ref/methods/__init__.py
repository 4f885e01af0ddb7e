"""One module per paper; each exports its factories."""

from .agd import agd
from .asgo import asgo, dasgo
from .mbf import mbf
from .root_free import if_shampoo, prototype_lr_scale, prototype_schedule, rf_adamw, rf_rmsprop
from .sketchy import s_adagrad, scale_by_sketchy, sketchy

__all__ = [
    "agd",
    "asgo",
    "dasgo",
    "if_shampoo",
    "mbf",
    "prototype_lr_scale",
    "prototype_schedule",
    "rf_adamw",
    "rf_rmsprop",
    "s_adagrad",
    "scale_by_sketchy",
    "sketchy",
]
