"""Array backends for the core test suite.

``BACKENDS`` lists every namespace the core must run on. Each :class:`Backend` converts NumPy
arrays in and out, so a test writes its data once in NumPy and checks the core on every backend.
JAX runs with x64 enabled (set in ``conftest.py``) so that float64 oracles stay float64.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    xp: Any
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    has_float64: bool = True

    def tree(self, tree: Any) -> Any:
        """Convert every NumPy leaf of a nested dict/list/tuple."""
        from precond_ref.tree import tree_map

        return tree_map(lambda a: self.asarray(np.asarray(a)), tree)

    def numpy_tree(self, tree: Any) -> Any:
        from precond_ref.tree import tree_map

        return tree_map(self.to_numpy, tree)

    def __repr__(self) -> str:
        return self.name


def _numpy() -> Backend:
    import array_api_compat.numpy as xp

    return Backend("numpy", xp, lambda a: np.array(a, copy=True), np.asarray)


def _strict() -> Backend:
    import array_api_strict as xs

    return Backend("array_api_strict", xs, lambda a: xs.asarray(a), lambda a: np.asarray(a))


def _torch() -> Backend:
    import array_api_compat.torch as xp
    import torch

    return Backend(
        "torch", xp, lambda a: torch.tensor(a), lambda a: a.detach().cpu().numpy()
    )


def _jax() -> Backend:
    import jax
    import jax.numpy as jnp

    # Committed to the default device, as the results of a jitted step on committed arguments and
    # the state the core's init makes on the parameters' device are: a jitted step first called
    # with uncommitted arrays and then with its own results compiles twice, and eager operations
    # compile once per placement of their operands.
    device = jax.devices()[0]
    return Backend("jax", jnp, lambda a: jax.device_put(jnp.asarray(a), device), lambda a: np.asarray(a))


def _cupy() -> Backend | None:
    try:
        import cupy
    except ImportError:
        return None
    if not cupy.is_available():
        return None
    import array_api_compat.cupy as xp

    return Backend("cupy", xp, lambda a: cupy.asarray(a), cupy.asnumpy)


def available_backends() -> list[Backend]:
    backends = [_numpy(), _strict(), _torch(), _jax()]
    cupy_backend = _cupy()
    if cupy_backend is not None:
        backends.append(cupy_backend)
    return backends


BACKENDS = available_backends()
BACKEND_NAMES = [b.name for b in BACKENDS]
# Property tests run in float64 on these two (NumPy and array_api_strict).
PROPERTY_BACKENDS = [b for b in BACKENDS if b.name in ("numpy", "array_api_strict")]
