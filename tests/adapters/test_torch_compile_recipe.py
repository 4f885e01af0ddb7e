"""torch's compiled-optimizer recipe, ``torch.compile(opt.step)``, run long enough to meet every
pattern of periodic work, for every class at its defaults and at the bench's settings.

dynamo compiles one graph per combination of a step's interval decisions; past its
``recompile_limit`` (8) it would fall back to eager with a warning (MBF at its defaults makes 12
combinations within its first 201 steps). The optimizer hands dynamo its own per-pattern graphs:
the outer frame breaks around the step (one graph break, compiled once), and the optimizer's own
compiled update (its own code object, its limit raised to its pattern count) compiles at most one
graph per recurring pattern, the schedule's start running eagerly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import precond_ref.adapters.torch as pt
from precond_ref.adapters import _torch_compile
from precond_ref.benchmarks.common import core_kwargs_for
from precond_ref.compare.methods import METHODS
from precond_ref.compare.training import make_torch_optimizer

ENTRIES = [e for e in METHODS if e.torch_class]
# The root-free classes need the number of examples a loss averages over.
BATCH = {"RFRMSProp": 8, "RFAdamW": 8, "IFShampoo": 8}


def _optimizer(entry, named, settings, compile=None):
    extra = {"batch_size": BATCH[entry.torch_class]} if entry.torch_class in BATCH else {}
    if settings == "bench":
        kwargs = {**core_kwargs_for(entry, torch, "torch"), **extra}
        return make_torch_optimizer(entry, named, kwargs, {"compile": compile})[0]
    return getattr(pt, entry.torch_class)(named, compile=compile, **extra)


def _schedule(opt):
    """The interval decisions of the optimizer's first 1024 steps (its only param group)."""
    transform = opt._transform(opt.param_groups[0])
    return [tuple(transform.due(step)) if getattr(transform, "due", None) else () for step in range(1024)]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.torch_class)
def test_bench_settings_have_the_defaults_schedule(entry):
    """The bench's settings of each class make the same interval decisions as its defaults, so the
    compiled-recipe test below, run at the defaults, meets every pattern of both."""
    named = lambda: list(torch.nn.Linear(3, 2).double().named_parameters())
    assert _schedule(_optimizer(entry, named(), "bench")) == _schedule(_optimizer(entry, named(), "defaults"))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.torch_class)
def test_compiled_opt_step_one_graph_per_pattern(entry, monkeypatch):
    """At the class's defaults, stepped through ``torch.compile(opt.step)`` until every recurring
    pattern of interval decisions has occurred (and once more): no warning (no fallback to eager,
    no recompile-limit message), the outer frame at most one graph, and the optimizer's own update
    compiled at most one graph per recurring pattern (``due_pattern_steps`` less
    ``transient_patterns``), at least one."""
    inner, outer = [], []
    real_init = _torch_compile.CompiledStep.__init__

    def counting(store):
        def backend(gm, example_inputs):
            store.append(gm)
            return gm.forward
        return backend

    transforms = []

    def init(self, transform, options, kernels=None):
        transforms.append(transform)
        real_init(self, transform, {"backend": counting(inner)}, kernels)

    monkeypatch.setattr(_torch_compile.CompiledStep, "__init__", init)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    opt = _optimizer(entry, list(model.named_parameters()), "defaults")
    step = torch.compile(opt.step, backend=counting(outer))
    gen = torch.Generator().manual_seed(1)

    def one_step():
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step()
        assert len(transforms) == 1, "the update did not run through the optimizer's compiled step"
        patterns = _torch_compile.due_pattern_steps(transforms[0])
        transient = _torch_compile.transient_patterns(transforms[0])
        recurring = {p: s for p, s in patterns.items() if p not in transient}
        for _ in range(max(recurring.values()) + 1):
            one_step()
    assert 1 <= len(inner) <= len(recurring), (len(inner), sorted(recurring.items(), key=lambda kv: kv[1]))
    assert len(outer) <= 1  # the frame around the step's graph break
    assert all(torch.isfinite(p).all() for p in model.parameters())
