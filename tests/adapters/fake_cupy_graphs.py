"""A test double of CuPy's stream capture (``precond_ref.adapters.cupy.CupyGraphs``), so that the
captured wrapper's bookkeeping runs on a CPU, on ``tests/sync_guard.py``'s arrays (NumPy arrays that
stand for a GPU's: reading one on the host raises while the guard is armed).

What it keeps of a real capture: a capture writes nothing (every buffer the double made is restored
after the recorded callable ran) and reads nothing on the host (the callable runs under the armed
guard, as a real capture fails on a host read); a replay runs the recorded callable again with the
very Python objects it was recorded with, so a value the wrapper fails to feed is as stale as a real
graph would leave it; warm-up runs and replays are armed too. With ``refuses_products=True`` a
capture also refuses what CuPy's refuses besides host reads: every routine CuPy runs through cuBLAS
or cuSOLVER (matrix products and decompositions, :data:`CUBLAS`), raising CuPy's error. What it
cannot show: addresses, streams.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

import sync_guard


#: The namespace's routines that CuPy runs through cuBLAS (a product) or cuSOLVER (a decomposition):
#: these outside ``linalg``, and every ``linalg`` routine but :data:`LINALG_KERNELS`.
CUBLAS = frozenset({"matmul", "tensordot", "einsum", "vecdot", "inner", "dot", "vdot"})
#: ``linalg``'s routines that are element-wise kernels and reductions on CuPy (a norm along given axes).
LINALG_KERNELS = frozenset({"vector_norm", "matrix_norm", "diagonal", "trace", "matrix_transpose", "outer", "cross"})
CUBLAS_REFUSED = "calling cuBLAS API during stream capture is currently unsupported"


def _refused(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(CUBLAS_REFUSED)


@contextlib.contextmanager
def _products_refused() -> Iterator[None]:
    """Within it, the guarded namespace's products and decompositions and ``@`` raise CuPy's error."""
    namespace_getattr = sync_guard._Namespace.__getattr__
    operators = {name: getattr(sync_guard.GuardedArray, name) for name in ("__matmul__", "__rmatmul__")}

    def refusing(self: Any, name: str) -> Any:
        in_linalg = self._inner.__name__.endswith("linalg")
        if name in CUBLAS or (in_linalg and callable(getattr(self._inner, name)) and name not in LINALG_KERNELS):
            return _refused
        return namespace_getattr(self, name)

    sync_guard._Namespace.__getattr__ = refusing
    for name in operators:
        setattr(sync_guard.GuardedArray, name, _refused)
    try:
        yield
    finally:
        sync_guard._Namespace.__getattr__ = namespace_getattr
        for name, method in operators.items():
            setattr(sync_guard.GuardedArray, name, method)


class FakeGraph:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.replays = 0


class FakeCupyGraphs:
    """``fail_first``: the first captures raise (after the callable ran, as an invalidated capture);
    ``refuses_products``: a capture raises at a matrix product or decomposition, as CuPy's does."""

    def __init__(self, fail_first: int = 0, refuses_products: bool = False) -> None:
        self.fail_first = fail_first
        self.refuses_products = refuses_products
        self.buffers: list[sync_guard.GuardedArray] = []
        self.graphs: list[FakeGraph] = []
        self.runs = 0
        self.copies = 0

    @staticmethod
    def accepts(leaves: list) -> bool:
        return bool(leaves) and all(isinstance(x, sync_guard.GuardedArray) for x in leaves)

    @staticmethod
    def capturing() -> bool:
        return False

    def empty_like(self, x: Any) -> Any:
        # NaN-filled (a buffer read before it is written shows), zeros for integers
        fill = np.nan if np.issubdtype(x._array.dtype, np.floating) else 0
        buffer = sync_guard.GuardedArray(np.full_like(x._array, fill))
        self.buffers.append(buffer)
        return buffer

    def copy(self, dst: Any, src: Any) -> None:
        self.copies += 1
        dst._array[...] = src._array

    def run(self, device: int, fn: Callable[[], None]) -> None:
        self.runs += 1
        with sync_guard.armed():
            fn()

    def capture(self, device: int, fn: Callable[[], None]) -> FakeGraph:
        saved = [b._array.copy() for b in self.buffers]
        try:
            with sync_guard.armed(), _products_refused() if self.refuses_products else contextlib.nullcontext():
                fn()
        finally:
            for b, value in zip(self.buffers, saved):
                b._array[...] = value
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = FakeGraph(fn)
        self.graphs.append(graph)
        return graph

    def launch(self, device: int, graph: FakeGraph) -> None:
        graph.replays += 1
        with sync_guard.armed():
            graph.fn()

    def release(self, device: int) -> None:
        pass
