"""The operations one torch optimizer step issues, counted as a GPU would get them.

A GPU step costs the host one dispatch and one kernel launch per operation, whatever the arrays'
sizes; on a small model that, not the arithmetic, sets the step's time. This module counts those
operations on any machine, a CPU included:

- every operation the dispatcher runs during ``optimizer.step()`` is seen by a
  ``TorchDispatchMode`` (after autograd and after the composite operations decomposed into the
  ones a backend implements), and those that launch no kernel (:data:`NOT_LAUNCHED`: views,
  allocations without contents, the profiler's annotation of ``optimizer.step``) are left out;
- a call of a graph TorchInductor compiled (``torch.compile``'s default backend) counts as one
  operation for the kernels it generated (how many it launches on a GPU cannot be known on a CPU
  without Inductor's GPU code generation, so this is a lower bound), plus the operations its
  graph hands to the dispatcher (matrix products, decompositions: Inductor's extern kernels),
  which the dispatch mode sees; a replay of a CUDA graph counts as one;
- on a CPU, the step is made to group and read as on a GPU (:func:`gpu_grouping`): the CPU's rule
  that keeps a large block out of a stack of equal blocks is switched off, and no device value is
  read on the host (``precond_ref._backend.host_bool`` and ``host_all_finite`` answer ``None``, as
  they do for a CUDA tensor), so the non-finite rule selects element-wise instead of reading.
  On a CUDA device the step runs as it is.

``bench`` counts one refresh period of every torch row after its timed window
(:func:`count_after`); ``python -m precond_ref.benchmarks.operations [cpu|gpu] [method,...]``
prints the count of an eager step of each method (and of torch's AdamW, fused and foreach) on
the small GPT's parameters (the mean of 6 steps after 12, compilation off), on this CPU's
grouping or a GPU's.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from typing import Optional

from .counting import NOT_LAUNCHED, VIEWS, count_after, count_step, gpu_grouping

__all__ = ["NOT_LAUNCHED", "VIEWS", "BASELINES", "count_after", "count_step", "gpu_grouping", "model_step_counts", "main"]

# ---------------------------------------------------------------------------------------------
# The command line: an eager step of each method on the small GPT's parameters


#: The yardsticks, by the label of their ``bench --model`` row.
BASELINES = {"adamw_fused": "torch AdamW(fused)", "adamw_foreach": "torch AdamW(foreach)"}


def model_step_counts(method: str, grouping: str, *, warmup: int = 12, rounds: int = 6, model: str = "gpt",
                      size: str = "small") -> tuple[float, dict]:
    """The mean operations of ``rounds`` eager steps of ``method`` after ``warmup`` ones, on the
    parameters of the bench's ``model`` at ``size`` (gradients of two batches, alternating), with
    this CPU's grouping (``"cpu"``) or a GPU's (``"gpu"``); and the mean count per operation."""
    import torch

    from .common import contenders, torch_optimizer, update_extra
    from .models import SIZES, batch_gradients, build_torch, random_batches, torch_baselines

    shape = SIZES[model][size]
    with gpu_grouping() if grouping == "gpu" else contextlib.nullcontext():
        module = build_torch(model, shape, torch.float32, "cpu")
        named = list(module.named_parameters())
        if method in BASELINES:
            optimizer, extra = dict(torch_baselines())[BASELINES[method]]([p for _, p in named]), {}
        else:
            (contender,), _ = contenders(method, False)
            optimizer, _ = torch_optimizer(contender, named, "off")
            extra = update_extra(contender, shape["batch"] * shape["seq"])
        batches = random_batches(model, shape, "cpu", torch.float32)
        grads = batch_gradients(model, module, named, batches, 2)

        def set_grads(i: int) -> None:
            for (_, p), g in zip(named, grads[i % 2]):
                p.grad = g

        for i in range(warmup):
            set_grads(i)
            optimizer.step(**extra)
        total: collections.Counter = collections.Counter()
        operations = 0
        for i in range(warmup, warmup + rounds):
            set_grads(i)
            counted = count_step(lambda: optimizer.step(**extra))
            operations += counted["operations"]
            total.update(counted["by_name"])
    return operations / rounds, {k: v / rounds for k, v in sorted(total.items()) if k not in NOT_LAUNCHED}


def main(argv: Optional[list[str]] = None) -> int:
    """``[cpu|gpu] [method,...] [-v]``: one ``method count`` line per method (default: the nine and
    ``adamw_fused``, ``adamw_foreach``; ``-v``: and the count of each operation)."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv
    argv = [a for a in argv if a != "-v"]
    grouping = argv[0] if argv else "cpu"
    if grouping not in ("cpu", "gpu"):
        print(f"usage: python -m precond_ref.benchmarks.operations [cpu|gpu] [method,...] [-v]; got {grouping!r}", file=sys.stderr)
        return 2
    from ..compare.methods import BENCH_ONLY, METHODS

    known = [e.name for e in METHODS + BENCH_ONLY if not e.is_baseline] + list(BASELINES)
    methods = argv[1].split(",") if len(argv) > 1 else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(known)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for method in methods:
        mean, by_name = model_step_counts(method, grouping)
        print(f"{method} {mean:.1f}", flush=True)
        if verbose:
            print(sorted(by_name.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
