"""One recorder of the ATen operations that torch code dispatches, for the op-count tests
(tests/test_step_ops.py, tests/methods/test_asgo_ops.py, tests/methods/test_mbf_ops.py).

An eager step's time on a CPU is about its number of operations (a kernel launch each on a GPU),
so those tests pin counts: exact for a fixed code path, with no timing and no machine dependence.
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class Dispatched(TorchDispatchMode):
    """Records each operation dispatched from Python while active (``with Dispatched() as d:``):
    ``names``, the operations' names in order (``"mul"``), and ``calls``, a counter by
    ``(str(func), shape of the first argument)`` (``("aten.mul.Tensor", (6, 4))``; a factory's
    shape is its size argument, ``None`` where the first argument is neither)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch

        first = args[0] if args else None
        shape = None
        if isinstance(first, torch.Tensor):
            shape = tuple(first.shape)
        elif isinstance(first, (list, tuple)):
            shape = tuple(first)
        self.names.append(func.overloadpacket.__name__)
        self.calls[(str(func), shape)] += 1
        return func(*args, **(kwargs or {}))

    def total(self, name: str) -> int:
        """The number of calls of the overload ``name`` (``"aten.mul.Tensor"``), any shape."""
        return sum(count for (func, _), count in self.calls.items() if func == name)
