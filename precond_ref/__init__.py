"""precond_ref: reference implementations of structured preconditioned optimizers.

One pure core written against the Python array API standard (NumPy, CuPy, PyTorch, JAX,
``array_api_strict``); adapters in :mod:`precond_ref.adapters` make each method a
``torch.optim.Optimizer`` and an optax ``GradientTransformation``.
"""

from .methods import (
    agd,
    asgo,
    dasgo,
    if_shampoo,
    mbf,
    prototype_lr_scale,
    prototype_schedule,
    rf_adamw,
    rf_rmsprop,
    s_adagrad,
    scale_by_sketchy,
    sketchy,
)
from ._backend import plain_forms
from .transform import PrecondState, Transform, apply_updates

__version__ = "0.2.0"

__all__ = [
    "PrecondState",
    "Transform",
    "agd",
    "apply_updates",
    "asgo",
    "dasgo",
    "if_shampoo",
    "mbf",
    "plain_forms",
    "prototype_lr_scale",
    "prototype_schedule",
    "rf_adamw",
    "rf_rmsprop",
    "s_adagrad",
    "scale_by_sketchy",
    "sketchy",
    "__version__",
]
