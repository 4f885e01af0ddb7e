"""A test double of CUDA graphs for the torch optimizers' captured step (``_torch_capture.GRAPHS``),
so that its bookkeeping runs on a CPU.

What it keeps of a real graph: a capture writes nothing (the tensors the step writes are restored
after the captured callable ran), and a replay runs the captured callable again with the very
Python objects it was captured with (the transform, the interval decisions, the step's keyword
arguments, the state and parameter tensors, the static gradient buffers), so that a value the
bookkeeping fails to feed or to invalidate is as stale as a real graph would leave it. What it
cannot show: host reads (a real capture of one fails) and memory addresses.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from precond_ref.adapters import _torch_capture


class FakeGraph:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


class FakeGraphs:
    """Graphs on any device; ``fail`` makes every capture raise, ``fail_first`` the first ones
    (after the callable ran, as a capture invalidated by an operation it recorded)."""

    def __init__(self, fail: bool = False, fail_first: int = 0) -> None:
        self.fail = fail
        self.fail_first = fail_first  # the first captures fail, later ones succeed
        self.graphs: list[FakeGraph] = []

    @staticmethod
    def accepts(device: torch.device) -> bool:
        return True

    @staticmethod
    def capturing() -> bool:
        return False

    @staticmethod
    def stream(device: torch.device) -> Any:
        return None

    @staticmethod
    def pool(device: torch.device) -> Any:
        return None

    @staticmethod
    def side(stream: Any) -> Any:
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], Any], *, pool: Any, stream: Any, writes: list) -> tuple:
        saved = [w.detach().clone() for w in writes]
        try:
            out = fn()
            self.attempts = getattr(self, "attempts", 0) + 1
            if self.fail or self.attempts <= self.fail_first:
                raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            with torch.no_grad():
                for w, v in zip(writes, saved):
                    w.copy_(v)
        graph = FakeGraph(fn)
        self.graphs.append(graph)
        return graph, out

    def replays(self) -> int:
        return sum(g.replays for g in self.graphs)


@contextlib.contextmanager
def fake_graphs(**kwargs: Any) -> Any:
    """``_torch_capture.GRAPHS`` replaced by a :class:`FakeGraphs` within the block."""
    fake, before = FakeGraphs(**kwargs), _torch_capture.GRAPHS
    _torch_capture.GRAPHS = fake
    try:
        yield fake
    finally:
        _torch_capture.GRAPHS = before
