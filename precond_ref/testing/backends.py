"""Backend names -> array namespaces and dtypes, shared by the problems and the trajectories.

Its own module so that :mod:`.problems` and :mod:`.trajectory` both import it and not each other.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["resolve_namespace", "resolve_dtype"]

_NAMESPACES = {
    "numpy": "array_api_compat.numpy",
    "torch": "array_api_compat.torch",
    "cupy": "array_api_compat.cupy",
    "jax": "jax.numpy",
    "array_api_strict": "array_api_strict",
}


def resolve_namespace(xp: Any = None) -> Any:
    """An array namespace from a name (``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``,
    ``"array_api_strict"``); a namespace passes through; ``None`` means NumPy."""
    if xp is None:
        xp = "numpy"
    if not isinstance(xp, str):
        return xp
    if xp not in _NAMESPACES:
        raise ValueError(f"unknown backend {xp!r}; available backends: {', '.join(_NAMESPACES)}")
    try:
        return importlib.import_module(_NAMESPACES[xp])
    except ImportError as err:
        raise ImportError(f"backend {xp!r} is not installed ({err})") from None


def resolve_dtype(xp: Any, dtype: Any) -> Any:
    """A dtype of ``xp`` from its name (``"float32"``, ``"float64"``, ...); dtypes pass through.

    JAX with 64-bit mode disabled would silently give float32 for float64: that raises instead.
    """
    if isinstance(dtype, str):
        if dtype not in ("float16", "bfloat16", "float32", "float64") or not hasattr(xp, dtype):
            raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'float64'")
        dtype = getattr(xp, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = xp.asarray(0.0, dtype=dtype)
    if probe.dtype != dtype:
        raise ValueError(
            f"{getattr(xp, '__name__', xp)} cannot create {dtype} arrays here (for JAX, enable 64-bit mode "
            "with jax.config.update('jax_enable_x64', True) before creating arrays)"
        )
    return dtype
