"""A long run of every method: nothing grows and no counter drifts.

Each torch class takes 250 eager steps on a tiny regression (a 4 -> 3 linear layer, weight and
bias in two param groups) under a learning-rate schedule that changes every step and restarts
(``CosineAnnealingWarmRestarts``), in a configuration with periodic refreshes where the method
has them (intervals 2-5: a hundred steps run each periodic path twenty times or more, and the
schedule restarts at steps 100 and 200). Between step 100 and the last step:

* the Python heap allocated by the library does not grow over the last 100 of 150 traced steps
  (``tracemalloc``, filtered to the core's, the adapters' and torch.optim's files; the first 50
  hold what tracing itself starts): the adapter's caches (transforms, member plans,
  learning-rate tensors) are bounded (a leak of one small object a step would add 100 of them);
* the number of live tensors and the state's keys, shapes, dtypes and bytes stay the same;
* no compiled graph is made (eager steps) and every cache holds one entry per param group;
* the counters are exact: ``step`` and the host-side ``calls`` equal the number of steps taken,
  ``nonfinite_count`` stays 0 on finite data, and every parameter stays finite.

One test per method, so that they spread over the workers.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
import warnings

import pytest
import torch

import precond_ref
import precond_ref.adapters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "adapters"))
from cases import TORCH_CASES  # noqa: E402

STEPS = 250
WARMUP = 100
TRACED = 150
COMPARED = 100
# One configuration per method, with periodic work where it has any (intervals 2-5).
SOAK_CASES = [c for c in TORCH_CASES if c.id in (
    "agd-amsgrad-clip", "asgo-pe-interval", "dasgo", "mbf", "rf_rmsprop", "rf_adamw", "if_shampoo-mixed-every2",
    "sketchy", "s_adagrad",
)]
_LIBRARY = tuple(os.path.join(os.path.dirname(m.__file__), "*") for m in (precond_ref, precond_ref.adapters, torch.optim))


def _state_layout(opt):
    return {
        (i, key): (tuple(v.shape), v.dtype, v.nbytes) if isinstance(v, torch.Tensor) else type(v)
        for i, entries in opt.state_dict()["state"].items() for key, v in entries.items()
    }


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # (type(): no attribute lookups)


@pytest.fixture(scope="module")
def _heap_frozen():
    """The process's heap before this file's tests (the libraries', other tests' objects), collected
    once and frozen out of the collector's view until the file's tests are done (a full collection
    of a suite worker's heap before each test was most of this file's time in a suite run)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def own_objects_only(_heap_frozen):
    """The objects made before the test are frozen out of the collector's view: its collections
    and live-tensor counts walk only the objects made since, which hold every tensor the optimizer
    makes or keeps. The collection first frees what the file's earlier tests left; it walks only
    the objects made since the heap was frozen."""
    gc.collect()
    gc.freeze()


def test_soak_cases_cover_every_method():
    assert len({c.cls for c in SOAK_CASES}) == 9


@pytest.mark.parametrize("case", SOAK_CASES, ids=lambda c: c.id)
def test_long_run_keeps_memory_state_and_counters_fixed(case, own_objects_only):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MBF's notice for weights without a named bias
        opt = case.cls(
            [{"params": [model.weight]}, {"params": [model.bias], "lr": case.lr / 2}],
            **{"lr": case.lr, **case.kwargs}, compile=False,
        )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100, eta_min=case.lr / 100)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(4, 3, generator=gen, dtype=torch.float64)

    def step(i):
        rows = slice(8 * (i % 8), 8 * (i % 8) + 8)
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step(**case.step_kwargs)
        scheduler.step()

    for i in range(WARMUP):
        step(i)
    layout, tensors = _state_layout(opt), _live_tensors()
    for i in range(WARMUP, STEPS - TRACED):
        step(i)
    tracemalloc.start()
    try:
        snapshots = []
        for i in range(STEPS - TRACED, STEPS):
            if i in (STEPS - COMPARED, STEPS - 1):
                gc.collect()
                snapshots.append(tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, f) for f in _LIBRARY]))
            step(i)
    finally:
        tracemalloc.stop()
    before, after = snapshots
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 1024, [str(s) for s in after.compare_to(before, "lineno")[:5]]
    assert _live_tensors() == tensors
    assert _state_layout(opt) == layout
    assert not opt._compiled
    assert len(opt._transforms) == len(opt._learning_rates) == 2 and len(opt._member_plans) <= 2
    for p in model.parameters():
        entries = opt.state[p]
        assert entries["step"].dtype == torch.int32 and int(entries["step"]) == STEPS
        assert entries["calls"] == STEPS and int(entries["nonfinite_count"]) == 0
        assert torch.isfinite(p).all()
