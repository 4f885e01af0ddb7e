"""How many array operations an eager ASGO step issues: an eager step costs about one
dispatch per operation, so work that scales with the number of leaves is what these tests bound.

Counts are of calls, not of time: exact, and the same on every machine. torch's dispatcher is
watched with a ``TorchDispatchMode`` (each ATen call the step makes, views and no-op casts included).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import precond_ref as pr

from precond_ref.linalg import rms_renormalised
from test_asgo_helpers import _config

A = importlib.import_module("precond_ref.methods.asgo")
torch = pytest.importorskip("torch")
from dispatched import Dispatched as _Count  # noqa: E402


def _tree(rng: np.random.Generator, shapes: dict) -> dict:
    return {k: torch.tensor(rng.standard_normal(s), dtype=torch.float32) for k, s in shapes.items()}


def test_fallback_adam_runs_once_for_all_non_matrix_leaves(monkeypatch):
    """The non-matrix leaves (biases, norms: most leaves of a transformer) take their Adam step
    together, one element-wise pass per dtype and device (``_joined``), not one per leaf: the
    number of operations of the fallback does not grow with the number of such leaves."""
    calls = []
    fallback = importlib.import_module("precond_ref.engine.blockdiag")
    step = fallback.fallback_step

    def counting(rule, c, g, *args):
        calls.append(tuple(g.shape))
        return step(rule, c, g, *args)

    monkeypatch.setattr(fallback, "fallback_step", counting)
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 4), "b0": (6,), "b1": (4,), "b2": (6,), "s": (), "ln": (3,)}
    params = _tree(rng, shapes)
    opt = pr.asgo(learning_rate=0.1, fallback_weight_decay=0.01)
    state = opt.init(params)
    for _ in range(2):
        _, state = opt.update(_tree(rng, shapes), state, params)
    assert calls == [(6 + 4 + 6 + 1 + 3,)] * 2


def test_second_moment_does_not_copy_a_statistic_already_in_its_dtype():
    """``P_t = β₂ P_{t-1} + (1-β₂) X Xᵀ`` in float32 for float32 ``X``: ``X Xᵀ`` is used as it comes
    from the matmul; a cast to the dtype it already has would copy it (a pass over k×k per leaf)."""
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal((2, 5, 7)), dtype=torch.float32)
    p_old = torch.zeros((2, 5, 5), dtype=torch.float32)
    from array_api_compat import array_namespace

    with _Count() as count:
        p = A._accumulated(array_namespace(x), _config(b2=0.9), p_old, x @ x.mT)
    assert count.total("aten._to_copy.default") == 0
    torch.testing.assert_close(p, 0.1 * (x @ x.mT), rtol=0, atol=8 * 7 * 2**-24 * float((x * x).sum(-1).max()))


def test_matrix_leaves_share_the_negative_learning_rate_and_zero():
    """``-η`` and the 0-D zero that flushes subnormal momenta are made once per update, not once
    per matrix leaf (``StepContext.once``): with three matrices and one dtype a step negates one
    0-D array and makes at most one 0-D zero (the transform's own, which ASGO shares)."""
    rng = np.random.default_rng(2)
    shapes = {"a": (6, 4), "b": (5, 3), "c": (4, 8)}
    params = _tree(rng, shapes)
    opt = pr.asgo(learning_rate=0.1, weight_decay=0.0)
    state = opt.init(params)
    _, state = opt.update(_tree(rng, shapes), state, params)
    with _Count() as count:
        opt.update(_tree(rng, shapes), state, params)
    negations = {k: v for k, v in count.calls.items() if k[0].startswith("aten.neg")}
    assert negations == {("aten.neg.default", ()): 1}
    assert count.calls[("aten.zeros.default", ())] <= 1


def test_a_root_not_refreshed_is_the_stored_array_itself():
    """With ``precondition_every=2`` each block is refreshed on every other step (its phase); on the
    steps where no block of a matrix is refreshed, its new state holds the stored root array itself,
    so the transform neither selects nor copies it (the skipped-step rule leaves an untouched entry
    alone). On the other steps the root is recomputed (a new array)."""
    rng = np.random.default_rng(3)
    shapes = {"w": (6, 4)}
    params = _tree(rng, shapes)
    opt = pr.asgo(learning_rate=0.1, precondition_every=2)
    state = opt.init(params)
    kept = []
    for step in range(5):
        _, new = opt.update(_tree(rng, shapes), state, params, step=step)
        (key,) = new.groups
        kept.append(new.groups[key]["root"] is state.groups[key]["root"])
        state = new
    assert kept[0] is False and kept[1:] in ([True, False, True, False], [False, True, False, True])


def _step_dispatched(shapes: dict, **options) -> _Count:
    """The operations of the second ASGO update (both updates refresh every root) of float32
    random matrices of ``shapes``."""
    rng = np.random.default_rng(5)
    params = _tree(rng, shapes)
    opt = pr.asgo(learning_rate=0.1, precondition_every=1, **options)
    state = opt.init(params)
    _, state = opt.update(_tree(rng, shapes), state, params, step=0)
    with _Count() as count:
        opt.update(_tree(rng, shapes), state, params, step=1)
    return count


@pytest.mark.parametrize(
    "options", [{}, {"block_size": 2}, {"mode": "faithful"}], ids=["unblocked", "blocked-with-tail", "faithful"]
)
def test_equal_matrices_take_each_line_of_the_step_once(options):
    """Invariant (DASH's stacked blocks, ``update_groups``' comment table): the matrix
    leaves of one shape, dtype and device take the step as one stack (a leading axis), so each
    line of the step is one operation for all of them: three equal 5×7 matrices issue as many
    matrix products (steps 2, 3, 4), multiplications (the EMAs, the renormalisation, the finish),
    square roots, selections (the subnormal flush, the guards) and decompositions as one does.
    Only the joining and handing back grow with the number of leaves (a concatenation per operand,
    a split per result). Before the stacking each count tripled."""
    one = _step_dispatched({"w": (5, 7)}, **options)
    three = _step_dispatched({"w": (5, 7), "v": (5, 7), "u": (5, 7)}, **options)

    def products(count: _Count) -> int:
        return count.total("aten.mm.default") + count.total("aten.bmm.default")

    assert products(three) == products(one) > 0
    for op in ("aten.mul.Tensor", "aten.sqrt.default", "aten.where.self", "aten._linalg_eigh.default"):
        assert three.total(op) == one.total(op), op


def test_float32_renormalisation_makes_one_float64_copy():
    """Principled float32 renormalisation (``linalg.rms_renormalised``, D12): the norm of each matrix and
    the scaling in float64, from one float64 copy of the direction, scaled in place and rounded
    back once: two conversions and no out-of-place float64 product of the stack's size (the squares
    are not written out, nor a scaled copy). Each large float64 temporary is a fresh allocation in
    an eager step: on the GPT's matrices four of them cost several times the arithmetic."""
    from array_api_compat import array_namespace

    u = torch.tensor(np.random.default_rng(6).standard_normal((2, 8, 5)), dtype=torch.float32)
    with _Count() as count:
        out = rms_renormalised(array_namespace(u), u, 0.2, False)
    assert count.total("aten._to_copy.default") == 2
    assert count.calls[("aten.mul.Tensor", (2, 8, 5))] == 0
    assert count.calls[("aten.mul_.Tensor", (2, 8, 5))] == 1
    rms = torch.sqrt(torch.mean(out.double() ** 2, dim=(-2, -1)))
    torch.testing.assert_close(rms, torch.full((2,), 0.2, dtype=torch.float64), rtol=4 * 2**-24, atol=0)


def test_a_skipped_step_selects_each_stacked_entry_once_not_each_leaf():
    """A skipped step (a NaN gradient; where the skip predicate cannot be read, every step) keeps
    every state entry at its old value, by the non-finite rule's selection. ASGO makes it on each
    stacked entry (momentum, statistic, root, the counters: ``_hand_back``), and each leaf's slice
    counts as selected (``transform.settle_pieces``): the number of ``where`` operations does not
    grow with the number of equal matrices, and the state after the step is the state before it,
    bit for bit."""
    def wheres(n: int) -> int:
        rng = np.random.default_rng(3)
        shapes = {f"w{i}": (6, 4) for i in range(n)}
        params = _tree(rng, shapes)
        opt = pr.asgo(learning_rate=0.1, precondition_every=2)
        state = opt.init(params)
        for _ in range(3):
            _, state = opt.update(_tree(rng, shapes), state, params)
        grads = _tree(rng, shapes)
        grads["w0"][0, 0] = float("nan")
        with _Count() as count:
            updates, after = opt.update(grads, state, params)
        assert int(after.nonfinite_count) == 1 and all(bool((u == 0).all()) for u in updates.values())
        for key, entries in state.groups.items():
            for name, old in entries.items():
                torch.testing.assert_close(after.groups[key][name], old, rtol=0, atol=0)
        return count.total("aten.where.self")

    few = wheres(2)
    assert few > 0 and wheres(5) == few
