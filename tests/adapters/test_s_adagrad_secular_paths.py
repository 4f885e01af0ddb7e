"""Path-matrix rows of S-AdaGrad with ``decomposition="incremental_secular"`` (the FD core's pairs
from the secular equation, ``precond_ref.linalg.rank_one_update_eigh``): the path a captured CUDA
step takes, since it calls no LAPACK routine and reads nothing on the host.

The cell is the matrix's principled S-AdaGrad on the MLP (rank 2, a sketch smaller than every
layer: each FD step truncates; refreshes every 3 steps), float64; the compiled row runs the same
settings on one Linear layer (``path_matrix.ONE_LAYER_MODEL``, whose two leaves a rank-2 sketch
truncates too): dynamo traces each leaf's secular solve into the graph, so the MLP's four leaves
would double the trace and add no other kind of leaf; the row under ``jax.jit`` runs on that layer
for the same reason (XLA compiles each leaf's solve). Tolerances as in
``test_path_equivalence.py``: RTOL between paths whose reductions may sum in another order, bit
identity between a captured step and its eager run (the same arithmetic on the same values).
Against the default decomposition (the SVD of the same core) the secular core's rounding is the
Gram's (u s_0^2 on s^2, ``precond_ref.sketch.shrink_cutoff_tolerance``); through the 10 steps'
inverse square roots of sketches whose smallest retained singular values are about 1e-2 of the
largest, 1e-9 of the parameters bounds that with a margin of about 100 (measured 1e-11).
"""

from __future__ import annotations

import warnings

import pytest

import path_matrix as pm
from test_path_equivalence import RTOL, TORCH_COMPILE, _close, _identical

CELL = ("s_adagrad", "principled", "mlp")
COMPILED_CELL = ("s_adagrad", "principled", pm.ONE_LAYER_MODEL)
SECULAR = dict(decomposition="incremental_secular")
GRAM_RTOL = 1e-9


@pytest.fixture(scope="module")
def core() -> list:
    return pm.core_trajectory(*CELL, **SECULAR)


def test_core_meets_the_default_decomposition(core):
    _close(core, pm.core_trajectory(*CELL), GRAM_RTOL, "secular core vs the SVD core")


def test_torch_eager(core):
    _close(pm.torch_trajectory(*CELL, **SECULAR), core, RTOL, "torch eager vs the NumPy core")


def test_torch_compiled():
    """``torch.compile`` (``aot_eager``: dynamo's capture and functionalisation) of the step, each
    pattern of due refreshes compiled (unspread, ``path_matrix.UNSPREAD``: a refresh step and a
    step that reuses the preconditioner), gives the NumPy core's trajectory on one Linear layer."""
    settings = {**SECULAR, **pm.UNSPREAD["s_adagrad"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
        got = pm.torch_trajectory(*COMPILED_CELL, compile=TORCH_COMPILE, **settings)
    _close(got, pm.core_trajectory(*COMPILED_CELL, **settings), RTOL, "torch compiled vs the NumPy core")


def test_torch_captured_without_a_refusal():
    """The class accepts capture with this decomposition (no refusal lifted, unlike the matrix's
    captured rows) and replays graphs (the CPU double of ``fake_graphs``), bit-identical to eager."""
    from fake_graphs import fake_graphs

    with fake_graphs() as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback from capture warns
        got = pm.torch_trajectory(*CELL, capture=True, **SECULAR)
    assert graphs.replays() > 0
    _identical(got, pm.torch_trajectory(*CELL, **SECULAR), "torch captured vs torch eager")


def test_the_float32_default_on_a_gpu_is_the_secular_core(monkeypatch):
    """Where the core sees a GPU (``sketch.on_cpu`` False), the class default for float32
    parameters (``decomposition=None``: ``"auto"``, ``sketch.secular_by_default``) is the secular
    core: it refuses no capture, replays graphs (the CPU double) and gives the trajectory of
    ``decomposition="incremental_secular"`` to the bit, a rank-2 sketch truncating both layers.
    float64 parameters keep the core's SVD (the secular core would have the Gram's accuracy there)
    and refuse capture."""
    import torch
    from fake_graphs import fake_graphs

    import precond_ref.adapters.torch as pt
    from precond_ref import sketch

    def run(dtype=torch.float32, **kwargs) -> tuple:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(dtype)
        opt = pt.SAdaGrad(model.parameters(), rank=2, momentum=0.5, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    monkeypatch.setattr(sketch, "on_cpu", lambda xp, x: False)
    with fake_graphs() as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a refused or failed capture warns
        got, opt = run(capture=True)
    assert opt.not_capturable_because is None and graphs.replays() > 0
    want, _ = run(decomposition="incremental_secular")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert run(torch.float64)[1].not_capturable_because is not None


def test_cupy_captured(core):
    """CuPy's captured step on NumPy arrays behind ``sync_guard`` (nothing read on the host)."""
    got = pm.core_trajectory(*CELL, guarded=True, cupy_captured=True, **SECULAR)
    _identical(got, pm.core_trajectory(*CELL, guarded=True, **SECULAR), "CuPy captured vs the eager core")
    _close(got, core, RTOL, "CuPy captured vs the NumPy core")


def test_jax_jit():
    """The core under ``jax.jit`` gives the NumPy core's trajectory, on one Linear layer."""
    import jax.numpy as jnp

    got = pm.core_trajectory(*COMPILED_CELL, xp=jnp, jit=True, **SECULAR)
    _close(got, pm.core_trajectory(*COMPILED_CELL, **SECULAR), RTOL, "the core under jax.jit vs NumPy")
