"""S-AdaGrad's FD steps in stacks of bounded size (``S_ADAGRAD_STACK_BYTES``)."""

from __future__ import annotations

import numpy as np

import precond_ref as pr
from precond_ref.sketch import fd_update_apply
import importlib

sketchy = importlib.import_module("precond_ref.methods.sketchy")  # (the package exports a function of that name)


def _run(steps=4):
    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.standard_normal((6, 5)) for i in range(4)} | {"b": rng.standard_normal(7)}
    opt = pr.s_adagrad(learning_rate=0.1, rank=3, block_size=10, momentum=0.5)
    state = opt.init(params)
    out = []
    for _ in range(steps):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        updates, state = opt.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
        out.append(updates)
    return out


def test_chunked_steps_equal_one_stack(monkeypatch):
    """The updates with every run stepped alone (a bound of 1 byte) equal those of the default,
    where the equal runs of the 4 weights share a stack: a batched product of the same numbers,
    so equal to a few ulps (rtol 1e-12 in float64)."""
    default = _run()
    monkeypatch.setattr(sketchy, "S_ADAGRAD_STACK_BYTES", 1)
    chunked = _run()
    for a, b in zip(default, chunked):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)


def _fd_steps(monkeypatch, on_cpu, steps=2):
    """The batched FD steps S-AdaGrad runs in ``steps`` steps of :func:`_run`'s model, the engine
    told that the arrays are (``on_cpu``) or are not on a CPU."""
    axes = importlib.import_module("precond_ref.engine.axes")
    monkeypatch.setattr(axes, "on_cpu", lambda xp, x: on_cpu)
    calls = []

    def counted(xp, sketch, rows, **options):
        calls.append(tuple(rows.shape))
        return fd_update_apply(xp, sketch, rows, **options)

    monkeypatch.setattr(sketchy, "fd_update_apply", counted)
    _run(steps)
    return calls


def test_off_a_cpu_one_stack_per_block_length(monkeypatch):
    """Off a CPU (a GPU, where each batched FD step is a fixed number of launches and one host
    synchronisation of its ``eigh``) the runs of one block length take one stack while they fit
    ``S_ADAGRAD_ACCELERATOR_STACK_BYTES``, though ``S_ADAGRAD_STACK_BYTES`` (the CPU's bound, here
    1 byte) cuts every run apart: per step one FD step of the bias's block of 7 and one of the 4
    weights' 3 blocks of 10 each, where the CPU's bound makes one per leaf."""
    monkeypatch.setattr(sketchy, "S_ADAGRAD_STACK_BYTES", 1)
    assert _fd_steps(monkeypatch, on_cpu=False) == [(1, 7, 1), (12, 10, 1)] * 2
    monkeypatch.undo()
    monkeypatch.setattr(sketchy, "S_ADAGRAD_STACK_BYTES", 1)
    assert _fd_steps(monkeypatch, on_cpu=True) == ([(1, 7, 1)] + [(3, 10, 1)] * 4) * 2
