"""S-AdaGrad's FD steps in stacks of bounded size (``engine.axes.FLAT_STACK_BYTES``)."""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref import sketch
from precond_ref.sketch import fd_update_apply
import importlib

sketchy = importlib.import_module("precond_ref.methods.sketchy")  # (the package exports a function of that name)

from precond_ref.engine import axes  # noqa: E402


def _run(steps=4, **options):
    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.standard_normal((6, 5)) for i in range(4)} | {"b": rng.standard_normal(7)}
    opt = pr.s_adagrad(**{"learning_rate": 0.1, "rank": 3, "block_size": 10, "momentum": 0.5, **options})
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
    monkeypatch.setattr(axes, "FLAT_STACK_BYTES", 1)
    chunked = _run()
    for a, b in zip(default, chunked):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)


def _fd_steps(monkeypatch, on_cpu, steps=2, **options):
    """The batched FD steps (the rows' shapes) S-AdaGrad runs in ``steps`` steps of :func:`_run`'s
    model, the engine told that the arrays are (``on_cpu``) or are not on a CPU; and the updates."""
    monkeypatch.setattr(axes, "on_cpu", lambda xp, x: on_cpu)
    calls = []

    def counted(xp, sketch, rows, **options):
        calls.append(tuple(rows.shape))
        return fd_update_apply(xp, sketch, rows, **options)

    monkeypatch.setattr(sketchy, "fd_update_apply", counted)
    return calls, _run(steps, **options)


def test_off_a_cpu_one_stack(monkeypatch):
    """Off a CPU (a GPU, where each batched FD step is a fixed number of launches and one host
    synchronisation of its ``eigh``) the runs of every leaf take one stack while they fit
    ``engine.axes.FLAT_ACCELERATOR_STACK_BYTES``, though ``engine.axes.FLAT_STACK_BYTES`` (the CPU's bound, here
    1 byte) cuts every run apart, and the bias's block of 7 joins the weights' 3 blocks of 10 each,
    zero-padded to 10: one FD step a step, where the CPU's bound makes one per leaf."""
    monkeypatch.setattr(axes, "FLAT_STACK_BYTES", 1)
    assert _fd_steps(monkeypatch, on_cpu=False)[0] == [(13, 10, 1)] * 2
    monkeypatch.undo()
    monkeypatch.setattr(axes, "FLAT_STACK_BYTES", 1)
    assert _fd_steps(monkeypatch, on_cpu=True)[0] == ([(1, 7, 1)] + [(3, 10, 1)] * 4) * 2


@pytest.mark.parametrize("decomposition", [None, "incremental_secular"], ids=["svd-core", "secular-core"])
def test_padded_runs_step_as_unpadded(monkeypatch, decomposition):
    """A run zero-padded into a stack of longer blocks (off a CPU) takes the step it takes alone:
    zero rows add only zero terms to the FD step's products, so the updates of 4 steps (the sketch,
    its escaped mass and the momentum carried between them) equal the unpadded ones to rounding
    (rtol 1e-12 in float64), with a refresh every step and every other step (the step between
    applies the last sketch with the gradient's own mass); with the core's SVD ("auto" on a CPU or
    for float64) and its secular equation (float32's "auto" on a GPU, ``sketch.secular_by_default``)."""
    for every in (1, 2):
        options = dict(steps=4, precondition_every=every, decomposition=decomposition)
        padded_calls, padded = _fd_steps(monkeypatch, on_cpu=False, **options)
        assert all(shape[1] == 10 for shape in padded_calls)
        monkeypatch.setattr(sketch, "zero_rows_exact", lambda decomposition, d, k, secular=False: False)
        alone_calls, alone = _fd_steps(monkeypatch, on_cpu=False, **options)
        assert (1, 7, 1) in alone_calls
        monkeypatch.undo()
        for a, b in zip(padded, alone):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)


def test_faithful_runs_are_not_padded(monkeypatch):
    """Faithful S-AdaGrad's FD step is the SVD of the whole factor, whose path depends on the
    length: its runs keep their own lengths off a CPU too (one unblocked leaf per length here)."""
    calls, _ = _fd_steps(monkeypatch, on_cpu=False, steps=1, mode="faithful", momentum=0.0, block_size=None)
    assert sorted(calls) == [(1, 7, 1), (4, 30, 1)]


def test_on_a_cpu_large_equal_runs_share_a_stack(monkeypatch):
    """On a CPU the equal runs of all leaves take one FD step per chunk of ``FLAT_STACK_BYTES``,
    though each is a member ``blocking.stack`` would keep alone on a CPU (here every member counts
    as large): the 4 weights' 3 blocks of 10 one step of 12 blocks, the bias's block of 7 another."""
    from precond_ref import blocking

    monkeypatch.setattr(blocking, "CPU_BATCHED_ENOUGH", 1)
    calls, _ = _fd_steps(monkeypatch, on_cpu=True)
    assert sorted(calls) == sorted([(12, 10, 1), (1, 7, 1)] * 2)
