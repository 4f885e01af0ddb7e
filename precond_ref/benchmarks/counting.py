"""Counting the operations one torch optimizer step issues as a GPU would get them: the counting
itself (:func:`count_step`, :func:`count_after`, :func:`gpu_grouping`), which ``bench``'s rows use;
:mod:`.operations` states what is counted and holds the command line.
"""

from __future__ import annotations

import collections
import contextlib
import math
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Optional

__all__ = ["VIEWS", "NOT_LAUNCHED", "count_step", "count_after", "gpu_grouping"]

#: Operations that make a view of their input (new sizes and strides over the same memory): no
#: kernel runs for them on any device.
VIEWS = frozenset({
    "view", "_unsafe_view", "as_strided", "transpose", "t", "expand", "permute", "unsqueeze", "squeeze", "select",
    "slice", "alias", "detach", "unbind", "split", "split_with_sizes", "reshape", "diagonal", "narrow", "lift_fresh",
})

#: Operations the dispatcher runs that launch no kernel either: the views, the profiler's
#: annotation that ``torch.optim.Optimizer`` wraps every ``step`` in, and allocations without
#: contents (a GPU's caching allocator hands out a block; nothing runs on the device).
NOT_LAUNCHED = VIEWS | frozenset({
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
})


def _counting_mode(counts: collections.Counter) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        """Counts every operation by name and runs it unchanged."""

        @classmethod
        def is_infra_mode(cls) -> bool:
            # A mode that is not "infrastructure" makes torch.compile'd functions run their Python
            # eagerly (an eager count, and a fullgraph function raises); this one only observes.
            return True

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    return Count()


@contextlib.contextmanager
def _counting_calls(counts: collections.Counter) -> Iterator[None]:
    """Calls of Inductor's compiled graphs (``"compiled_call"``) and replays of CUDA graphs
    (``"cuda_graph_replay"``) counted while inside: each method is wrapped on its class."""
    import torch

    targets = [(getattr(torch.cuda, "CUDAGraph", None), "replay", "cuda_graph_replay")]
    inductor = sys.modules.get("torch._inductor.output_code")  # not loaded: nothing was compiled by Inductor
    if inductor is not None:
        targets.append((getattr(inductor, "CompiledFxGraph", None), "__call__", "compiled_call"))
    wrapped = []
    for cls, name, key in targets:
        method = getattr(cls, name, None) if cls is not None else None
        if method is not None:
            wrapped.append((cls, name, method))
            setattr(cls, name, _counted(method, key, counts))
    try:
        yield
    finally:
        for cls, name, method in wrapped:
            setattr(cls, name, method)


def _counted(method: Callable, key: str, counts: collections.Counter) -> Callable:
    """``method``, counting its calls under ``key``."""

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts[key] += 1
        return method(self, *args, **kwargs)

    return counted


def count_step(step: Callable[[], Any]) -> dict:
    """The operations ``step()`` issues: ``{"operations": the dispatched operations that launch a
    kernel, compiled graph calls and graph replays together, "not_launched": the other dispatched
    operations, "compiled_calls", "graph_replays", "by_name": {operation: count}}``.
    ``RuntimeError`` if the step compiles a graph: count a step once it has compiled."""
    counts: collections.Counter = collections.Counter()
    compiles = _compilations()
    with _counting_calls(counts), _counting_mode(counts):
        step()
    if _compilations() != compiles:
        raise RuntimeError("the step compiled a graph while its operations were counted (count it once it has compiled)")
    compiled = counts.pop("compiled_call", 0)
    replays = counts.pop("cuda_graph_replay", 0)
    return {
        "operations": sum(v for k, v in counts.items() if k not in NOT_LAUNCHED) + compiled + replays,
        "not_launched": sum(v for k, v in counts.items() if k in NOT_LAUNCHED),
        "compiled_calls": compiled,
        "graph_replays": replays,
        "by_name": dict(sorted(counts.items())),
    }


def _compilations() -> int:
    """Graphs dynamo has made in this process so far (none where it was never imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else utils.counters["stats"]["unique_graphs"]


_FAKE_HOST_READS = {"host_bool": lambda xp, x: None, "host_all_finite": lambda xp, arrays: None}


@contextlib.contextmanager
def gpu_grouping() -> Iterator[None]:
    """Inside, the core groups and reads as it does on a GPU, on whatever device: no large block
    kept out of a stack (``precond_ref.blocking.CPU_BATCHED_ENOUGH``), ``host_bool`` and
    ``host_all_finite`` answer ``None`` in every loaded module of the library that imported them,
    and ``precond_ref.engine.axes`` and ``precond_ref.sketch`` take their device branches
    (``on_cpu`` False: S-AdaGrad's stack bound and padding, and its secular core). Everything is
    restored on the way out."""
    from precond_ref import _backend, blocking

    originals = {getattr(_backend, name): name for name in _FAKE_HOST_READS}
    patched: list[tuple[Any, str, Any]] = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("precond_ref", "adapters")):
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and value in originals:
                patched.append((module, attr, value))
                setattr(module, attr, _FAKE_HOST_READS[originals[value]])
    for name in ("precond_ref.engine.axes", "precond_ref.sketch"):
        module = sys.modules.get(name)
        if module is not None:
            patched.append((module, "on_cpu", module.on_cpu))
            module.on_cpu = lambda xp, x: False
    threshold = blocking.CPU_BATCHED_ENOUGH
    blocking.CPU_BATCHED_ENOUGH = 2**62
    try:
        yield
    finally:
        blocking.CPU_BATCHED_ENOUGH = threshold
        for module, attr, value in patched:
            setattr(module, attr, value)


def count_after(
    optimizer: Any, set_grads: Callable[[int], Any], extra: dict, device: str, first: int, steps: int,
    budget_s: float = math.inf,
) -> dict:
    """``bench``'s count: steps ``first`` to ``first + steps - 1`` of ``optimizer`` (gradients from
    ``set_grads(i)``, not counted), each counted on its own (:func:`count_step`), as a GPU would
    issue them (:func:`gpu_grouping` off CUDA), stopping early once they have taken ``budget_s``
    seconds (``covers_period`` is then false). Returns the per-step counts, their mean, fewest and
    most, the mean compiled calls and graph replays, and the mean count of each operation counted."""
    on_cuda = device.startswith("cuda")
    counted = []
    start = time.perf_counter()
    for i in range(first, first + steps):
        if counted and time.perf_counter() - start > budget_s:
            break
        set_grads(i)
        with contextlib.nullcontext() if on_cuda else gpu_grouping():
            counted.append(count_step(lambda: optimizer.step(**extra)))
    per_step = [c["operations"] for c in counted]
    by_name: collections.Counter = collections.Counter()
    for c in counted:
        by_name.update({k: v for k, v in c["by_name"].items() if k not in NOT_LAUNCHED})
    return {
        "mean": statistics.fmean(per_step),
        "fewest": min(per_step),
        "most": max(per_step),
        "steps": per_step,
        "first_step": first,
        "period": steps,
        "counted": len(counted),
        "covers_period": len(counted) == steps,
        "compiled_calls": statistics.fmean(c["compiled_calls"] for c in counted),
        "graph_replays": statistics.fmean(c["graph_replays"] for c in counted),
        "grouping": "cuda" if on_cuda else "gpu",
        "by_name": {k: v / len(counted) for k, v in sorted(by_name.items())},
    }
