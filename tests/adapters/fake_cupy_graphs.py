"""A test double of CuPy's stream capture (``precond_ref.adapters.cupy.CupyGraphs``), so that the
captured wrapper's bookkeeping runs on a CPU, on ``tests/sync_guard.py``'s arrays (NumPy arrays that
stand for a GPU's: reading one on the host raises while the guard is armed).

What it keeps of a real capture: a capture writes nothing (every buffer the double made is restored
after the recorded callable ran) and reads nothing on the host (the callable runs under the armed
guard, as a real capture fails on a host read); a replay runs the recorded callable again with the
very Python objects it was recorded with, so a value the wrapper fails to feed is as stale as a real
graph would leave it; warm-up runs and replays are armed too. What it cannot show: addresses, streams.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import sync_guard


class FakeGraph:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.replays = 0


class FakeCupyGraphs:
    """``fail_first``: the first captures raise (after the callable ran, as an invalidated capture)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
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
            with sync_guard.armed():
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
