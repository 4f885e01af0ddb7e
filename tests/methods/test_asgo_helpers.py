"""The helpers of the ASGO and DASGO steps (the rule's, and the engine's and backend's it calls:
``engine.blockdiag``, ``engine.matrices``, ``linalg``, ``_backend``) against the plain
formulas their docstrings state.

NumPy float64 (array_api_compat.numpy); tolerances from the rounding model: a sum or product of
``k`` terms is off by at most about ``k·eps·Σ|terms|``, a root of a matrix of condition number
``κ`` by about ``κ·k·eps`` relative.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import array_api_compat.numpy as xp
import numpy as np
import pytest
import precond_ref as pr
from precond_ref._backend import squared_sums
from precond_ref.methods.asgo import ema
from precond_ref.engine.blockdiag import (
    OneSidedRule, block_diagonal_product, fallback_leaves, fallback_step, finite_root_or_previous, one_sided_transform, side_blocks,
    unrefreshed,
)
from precond_ref.engine.matrices import matrix_shape
from precond_ref.linalg import rms_renormalised, scaled_rms_renormalised, symmetrize

A = importlib.import_module("precond_ref.methods.asgo")


def _config(**values):
    """An ASGO configuration with ``values`` (principled defaults for the rest)."""
    defaults = dict(learning_rate=0.1, b1=0.9, b2=0.8, weight_decay=0.0, damping=1e-4, eps=1e-30, root_method="eigh",
                    root_steps=10, tolerance=None, rms_target=0.2, summed=False, side="auto", block_size=None, faithful=False)
    return A.ASGOConfig(**{**defaults, **values})

EPS = np.finfo(np.float64).eps


def _psd(rng: np.random.Generator, n: int, k: int, rank: int) -> np.ndarray:
    g = rng.standard_normal((n, k, rank))
    return g @ np.swapaxes(g, -1, -2)


def _plain_inverse_sqrt(p: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(p)
    return (v * w[..., None, :] ** -0.5) @ np.swapaxes(v, -1, -2)


def test_damped_inverse_sqrt_is_the_damped_root_of_p():
    """(P + sI)^{-1/2}, s = δ tr(P)/k + ε, per block (D1), though computed from P/τ (D12): the two
    are the same matrix, so they agree to the root's rounding, κ·k·eps with κ <= k/δ + 1."""
    rng = np.random.default_rng(0)
    p = _psd(rng, 3, 5, 2) * np.array([1e-30, 1.0, 1e30])[:, None, None]  # rank 2 of 5, any scale
    delta, eps = 1e-4, 1e-30
    z, rejected = A._damped_inverse_sqrt(xp, p, delta, eps, "eigh", 10, None)
    s = delta * np.trace(p, axis1=-2, axis2=-1) / 5 + eps
    plain = _plain_inverse_sqrt(p + s[:, None, None] * np.eye(5))
    for i in range(3):
        np.testing.assert_allclose(z[i], plain[i], rtol=0, atol=(5 / delta + 1) * 5 * 64 * EPS * np.abs(plain[i]).max())
    assert rejected is None  # eigh is exact: never rejected


def test_damped_inverse_sqrt_substitutes_the_damped_identity_where_the_check_fails():
    """D13: blocks whose Polar-Express root fails the convergence check are flagged and hold the
    damped identity (τ(1+δ)+ε)^{-1/2} I; the others hold the iterated root, bitwise as without the
    check. With δ = 1e-12 the rank-1 block's null space sits at δ·τ: 10 steps multiply its value
    x ≈ 6e-7 by at most ∏a_j ≈ 2.2e4, far from 1, while the full-rank block and P = 0 (the
    root of εI) converge (spec I15)."""
    rng = np.random.default_rng(4)
    p = np.stack([_psd(rng, 1, 3, 1)[0], _psd(rng, 1, 3, 5)[0], np.zeros((3, 3))])
    delta, eps = 1e-12, 1e-30
    z, rejected = A._damped_inverse_sqrt(xp, p, delta, eps, "polar_express", 10, 0.05)
    unchecked, none = A._damped_inverse_sqrt(xp, p, delta, eps, "polar_express", 10, None)
    assert none is None
    np.testing.assert_array_equal(rejected, [1, 0, 0])
    tau = np.trace(p[0]) / 3
    np.testing.assert_allclose(z[0], (tau * (1 + delta) + eps) ** -0.5 * np.eye(3), rtol=8 * EPS, atol=0)
    np.testing.assert_array_equal(z[1:], unchecked[1:])


def test_damped_inverse_sqrt_of_zero_is_eps_root():
    """P = 0: (0 + εI)^{-1/2} = ε^{-1/2} I (the docstring's special case)."""
    z, _ = A._damped_inverse_sqrt(xp, np.zeros((1, 3, 3)), 1e-4, 0.25, "eigh", 10, None)
    np.testing.assert_allclose(z[0], 2.0 * np.eye(3), rtol=4 * EPS)


def test_finite_root_or_previous_keeps_previous_where_not_finite():
    """Per block: inverse_sqrt(P) where P and the root are finite, else the previous root, with
    failed = 1 (D6); the non-finite statistic is replaced by I before the root is taken."""
    rng = np.random.default_rng(1)
    p = _psd(rng, 3, 4, 6)
    p[1, 0, 0] = np.nan
    previous = rng.standard_normal((3, 4, 4))
    seen = []

    def inverse_sqrt(q):
        seen.append(np.array(q))
        z = _plain_inverse_sqrt(q)
        z[2] = np.inf  # block 2: the root itself is not finite
        return z, np.zeros(3, dtype=np.int32)

    z, failed = finite_root_or_previous(xp, p, previous, inverse_sqrt)
    np.testing.assert_array_equal(seen[0][1], np.eye(4))
    np.testing.assert_array_equal(z[0], _plain_inverse_sqrt(p[:1])[0])
    np.testing.assert_array_equal(z[1:], previous[1:])
    np.testing.assert_array_equal(failed, [0, 1, 1])


@pytest.mark.parametrize("has_previous", [True, False, np.bool_(True), np.bool_(False)])
def test_finite_root_or_previous_keeps_previous_where_rejected(has_previous):
    """D13: a block the method rejected keeps the previous root where there is one (``has_previous``
    a host bool or a 0-D array), else the method's substitute, and is counted failed per block
    whichever root it keeps (its new root was discarded)."""
    rng = np.random.default_rng(5)
    p = _psd(rng, 3, 4, 6)
    previous = rng.standard_normal((3, 4, 4))
    roots = _plain_inverse_sqrt(p)
    flags = np.array([0, 1, 0], dtype=np.int32)
    z, failed = finite_root_or_previous(xp, p, previous, lambda q: (roots, flags), lambda: has_previous)
    np.testing.assert_array_equal(z[[0, 2]], roots[[0, 2]])
    np.testing.assert_array_equal(z[1], previous[1] if has_previous else roots[1])
    np.testing.assert_array_equal(failed, flags)


@pytest.mark.parametrize("due", [True, False, np.bool_(False)])
def test_phase_refresh_is_refresh_per_member(due):
    """The plain formula of ``engine.phases.refreshes`` over ``phase_stacks`` (as ASGO's roots are
    refreshed, ``engine.blockdiag.refresh_roots``): refresh(P_i, Z_i) for every member when
    its phase is due, ``keep`` when the decision is an array that says no, nothing (``None``) when
    the host decided no; stacks of one block shape batched into one call, bitwise equal to one
    call each (ASGO's roots: ``engine.blockdiag.finite_root_or_previous``, ``unrefreshed``)."""
    from precond_ref.engine.phases import handed_back, phase_stacks, refreshes

    rng = np.random.default_rng(2)
    stacks = [(_psd(rng, n, k, k + 1), rng.standard_normal((n, k, k))) for n, k in [(2, 3), (1, 4), (3, 3)]]
    calls = []

    def refresh(p, z):
        calls.append(p.shape)
        return _plain_inverse_sqrt(p) + z, np.ones(p.shape[0], np.int32)

    out = [None] * len(stacks)  # None: decided not due on the host, nothing computed
    branches = (refresh, lambda p, z: unrefreshed(xp, p, z))
    for batch, result in refreshes(xp, [due], phase_stacks(xp, [0] * len(stacks), stacks), lambda batch: branches):
        for u, piece in handed_back(batch, result):
            out[u] = piece
    for (p, z), result in zip(stacks, out):
        if due is False:
            assert result is None
            continue
        r, failed = result
        if due:
            np.testing.assert_array_equal(r, refresh(p, z)[0])
            np.testing.assert_array_equal(failed, np.ones(p.shape[0]))
        else:
            np.testing.assert_array_equal(r, z)
            assert np.all(np.asarray(failed) == 0)
    if due is True:
        assert calls[:2] == [(5, 3, 3), (1, 4, 4)]  # the two 3x3 members in one call


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("blocks", [(0, 0), (2, 0), (2, 1)])
def test_block_diagonal_product_is_the_dense_product(left, blocks):
    """U = blockdiag(Z_1..Z_c, Z_tail) M (left) or M blockdiag(...) (right) for symmetric blocks
    (roots of statistics), to k·eps·|Z||M| (a dot product of k terms)."""
    full, tail = blocks
    rng = np.random.default_rng(3)
    b = 3 if full else 5
    k = full * b + tail if full else b
    z = _psd(rng, full, b, b) if full else _psd(rng, 1, b, b)[0]  # roots are symmetric
    z_tail = _psd(rng, 1, tail, tail)[0] if tail else None
    m = rng.standard_normal((k, 7) if left else (7, k))
    dense = np.zeros((k, k))
    for i, zi in enumerate(z if full else [z]):
        dense[i * b : (i + 1) * b, i * b : (i + 1) * b] = zi
    if tail:
        dense[full * b :, full * b :] = z_tail
    u = block_diagonal_product(xp, z, z_tail, m, left, np.float64)
    plain = dense @ m if left else m @ dense
    bound = k * EPS * (np.abs(dense) @ np.abs(m) if left else np.abs(m) @ np.abs(dense))
    assert np.all(np.abs(u - plain) <= bound)


@pytest.mark.parametrize("axis", [0, 1])
def test_squared_sums_is_the_diagonal_of_the_gram_matrix(axis):
    """Σ over axis of G² = diag(GᵀG) (axis 0) or diag(GGᵀ), blocked sums included (40 rows >= 2
    blocks of 16), to rows·eps·Σ G²."""
    g = np.random.default_rng(4).standard_normal((40, 6))
    plain = np.diag(g.T @ g) if axis == 0 else np.diag(g @ g.T)
    got = squared_sums(xp, g, axis)
    assert np.all(np.abs(got - plain) <= g.shape[axis] * EPS * plain)


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.8, 0.95])
def test_ema_in_both_forms_is_the_interpolation(decay):
    """``decay·old + (1-decay)·new`` in both forms (the lerp form rounds as ``torch.lerp``, from
    ``old`` for a weight 1-decay below 1/2, from ``new`` otherwise): to 4 eps of the terms; decay 0
    gives ``new`` exactly in the lerp form (its second branch is ``new - (new-old)·0``)."""
    rng = np.random.default_rng(11)
    old, new = rng.standard_normal(50), rng.standard_normal(50)
    plain = decay * old + (1 - decay) * new
    for lerp_form in (False, True):
        got = ema(old, new, decay, lerp_form)
        assert np.all(np.abs(got - plain) <= 4 * EPS * (np.abs(old) + np.abs(new)))
    if decay == 0.0:
        np.testing.assert_array_equal(ema(old, new, decay, True), new)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale_of_m", [1e-30, 1.0, 1e30])
def test_renormalise_scaled_is_rms_target_times_direction(axis, scale_of_m):
    """r√(mn) U/‖U‖_F with U = M diag(s) (axis 0) or diag(s) M: RMS exactly r to rounding
    (mn·eps), the direction of U, at any scale of M (D12); faithful mode the same formula."""
    rng = np.random.default_rng(5)
    m = rng.standard_normal((6, 5)) * scale_of_m
    s = np.abs(rng.standard_normal(m.shape[1 - axis])) + 0.1
    u = m * np.expand_dims(s, axis)
    plain = 0.2 * np.sqrt(30) * u / np.linalg.norm(u)
    for faithful in (False, True):
        got = scaled_rms_renormalised(xp, m, s, axis, 0.2, faithful)
        np.testing.assert_allclose(got, plain, rtol=64 * 30 * EPS, atol=0)
    np.testing.assert_array_equal(scaled_rms_renormalised(xp, m, s, axis, None, False), u)
    np.testing.assert_array_equal(scaled_rms_renormalised(xp, 0 * m, s, axis, 0.2, False), 0 * m)


def test_momentum_and_second_moment_are_the_emas():
    """M_t = μM + (1-μ)G (principled flushes subnormals) and P_t = β₂P + (1-β₂)XXᵀ (or P + XXᵀ),
    symmetrised as principled mode stores it, per block of a stack; to a few eps."""
    rng = np.random.default_rng(6)
    old, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    old[0, 0] = 1e-310  # subnormal after the EMA with g[0, 0] = 0
    g[0, 0] = 0.0
    got = A._momentum(xp, _config(b1=0.9), old, g, xp.zeros((), dtype=xp.float64))
    plain = 0.9 * old + 0.1 * g
    plain[0, 0] = 0.0
    np.testing.assert_allclose(got, plain, rtol=4 * EPS, atol=0)
    x, tail = side_blocks(xp, rng.standard_normal((7, 5)), 3)
    assert x.shape == (2, 3, 5) and tail.shape == (1, 5)
    p_old = _psd(rng, 2, 3, 3)
    for summed in (False, True):
        got = symmetrize(A._accumulated(xp, _config(b2=0.8, summed=summed), p_old, x @ x.mT))
        s = x @ np.swapaxes(x, -1, -2)
        plain = p_old + s if summed else 0.8 * p_old + 0.2 * s
        np.testing.assert_allclose(got, plain, rtol=0, atol=16 * EPS * (np.abs(p_old) + np.abs(s)).max())
        np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))


def test_joined_fallback_adam_is_each_leaf_alone_in_one_pass_per_dtype():
    """``engine.blockdiag.fallback_leaves``: each leaf's fallback Adam step is ``fallback_step`` of the
    leaf alone, bitwise (every entry goes through the same operations; only the arrays around it
    differ), with the step taken once per dtype (leaves of any shape, 0-D and 2-D included, joined
    end to end by ``engine.joined.leafwise``): the op count of the many biases and norms of a model
    no longer grows with their number."""
    from precond_ref.transform import StepContext

    rng = np.random.default_rng(3)
    shapes = [(5,), (), (3, 4), (5,), (2,)]
    dtypes = [np.float64, np.float64, np.float32, np.float32, np.float64]
    grads, states, params = [], [], []
    for shape, dtype in zip(shapes, dtypes):
        g, mu, nu, w = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
        grads.append((g,)), states.append({"mu": mu, "nu": np.abs(nu)}), params.append((w,))
    count = np.asarray(4, dtype=np.int32)
    c = A.AdamConfig(0.1, 0.9, 0.95, 1e-8, 0.01, False)
    calls = []

    def state(xp, c, s, g, w, h):
        calls.append(g.shape)
        return A._ADAM.state(xp, c, s, g, w, h)

    ctx = StepContext(xp=xp, count=count, extra={}, shared={})
    results, others = fallback_leaves(xp, grads, states, params, ctx, A._ADAM._replace(state=state), c)
    assert others == [] and sorted(calls) == [(8,), (17,)]  # one pass per dtype: 5 + 1 + 2 float64 entries, 12 + 5 float32
    for (g,), old, (w,), ((u,), new) in zip(grads, states, params, results):
        (expected,), expected_new = fallback_step(A._ADAM, c, g, old, w, StepContext(xp=xp, count=count, extra={}))
        for got, want in [(u, expected), (new["mu"], expected_new["mu"]), (new["nu"], expected_new["nu"])]:
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ok", [True, False])
def test_joined_pieces_of_selected_entries_count_as_selected(ok):
    """A leaf's slice of a joined state entry that the fallback step selected (``StepContext.unless_skipped``:
    the new value, or the old one on a skipped step) is itself selected: ``leafwise`` records it in
    ``ctx.settled``, so the transform does not select it again per leaf (one selection per join
    instead of one per leaf and entry), and it holds the old entry when the step is skipped."""
    from precond_ref._backend import IdentityDict
    from precond_ref.transform import StepContext

    rng = np.random.default_rng(4)
    shapes = [(3,), (), (2, 2)]
    grads = [(rng.standard_normal(s),) for s in shapes]
    states = [{"mu": rng.standard_normal(s), "nu": rng.random(s)} for s in shapes]
    c = A.AdamConfig(0.1, 0.9, 0.95, 1e-8, 0.0, False)
    ctx = StepContext(xp=xp, count=np.asarray(2, dtype=np.int32), extra={}, ok=np.asarray(ok), settled=IdentityDict(), shared={})
    results, _ = fallback_leaves(xp, grads, states, [None] * len(shapes), ctx, A._ADAM, c)
    for state, (_, new) in zip(states, results):
        for name in ("mu", "nu"):
            assert new[name] in ctx.settled
            if not ok:
                np.testing.assert_array_equal(new[name], state[name])


@pytest.mark.parametrize(
    "options",
    [
        {"weight_decay": 0.1},
        {"block_size": 3, "precondition_every": 2, "side": "right"},  # 2 chunks and a tail of 7, spread
        {"mode": "faithful", "precondition_every": 2},
    ],
    ids=["unblocked", "blocked", "faithful"],
)
def test_stacked_step_is_each_matrix_alone(options):
    """The plain formula of the stacking (``on_stacks``): a step of several matrices of one shape,
    taken together on a stack, is for every matrix the step it takes alone, bitwise (every entry
    goes through the same operations; NumPy's batched products loop over the matrices), updates and
    state (counters included) alike, over the steps of a refresh interval. A conv-shaped leaf whose
    matrix view has that shape joins the stack and keeps its own shape."""
    rng = np.random.default_rng(7)
    faithful = options.get("mode") == "faithful"
    shapes = {"a": (4, 7), "b": (4, 7), "c": (4, 7)} if faithful else {"a": (4, 7), "b": (4, 7), "conv": (4, 7, 1)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(4)]
    grads[2]["b"] = np.zeros(shapes["b"])  # a zero gradient in one member of the stack
    opt = pr_asgo(**options)
    together = opt.init(params)
    alone = {k: opt.init({k: params[k]}) for k in shapes}
    for t, g in enumerate(grads):
        updates, together = opt.update(g, together, params, step=t)
        for k in shapes:
            u, alone[k] = opt.update({k: g[k]}, alone[k], {k: params[k]}, step=t)
            assert updates[k].shape == shapes[k]
            np.testing.assert_array_equal(updates[k], u[k])
            for name, entry in alone[k].groups[k].items():
                np.testing.assert_array_equal(together.groups[k][name], entry, err_msg=f"{k} {name} step {t}")


def pr_asgo(**options):
    import precond_ref as pr

    return pr.asgo(learning_rate=0.1, **options)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("blocks", [(0, 0), (2, 0), (2, 1)])
def test_block_diagonal_product_of_a_stack_is_each_product(left, blocks):
    """On a stack of L momenta, each with its roots (unblocked ``(L, k, k)``; blocked the ``c``
    chunks of each in order, ``(L·c, b, b)``, and tails ``(L, t, t)``), the product is each
    momentum's product with its own roots, bitwise (the same operations per entry)."""
    full, tail = blocks
    rng = np.random.default_rng(8)
    b = 3 if full else 5
    k, stacked = (full * b + tail if full else b), 2
    z = _psd(rng, stacked * full if full else stacked, b, b)
    z_tail = _psd(rng, stacked, tail, tail) if tail else None
    m = rng.standard_normal((stacked, k, 7) if left else (stacked, 7, k))
    u = block_diagonal_product(xp, z, z_tail, m, left, np.float64)
    for i in range(stacked):
        own = z[i * full : (i + 1) * full] if full else z[i]
        alone = block_diagonal_product(xp, own, None if z_tail is None else z_tail[i], m[i], left, np.float64)
        np.testing.assert_array_equal(u[i], alone)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("faithful", [False, True])
def test_rms_renormalise_of_a_stack_renormalises_each_matrix(faithful, dtype):
    """``r√(mn) U/‖U‖_F`` for each matrix of a stack by its own norm (a zero one stays zero), at
    scales 1e-30 and 1e30 side by side (D12): RMS r to rounding (mn·eps of the dtype), the
    direction of U. Principled float32 sums the squares of the whole stack in float64, one
    reduction over each matrix; the other cases scale each matrix by its largest entry first."""
    rng = np.random.default_rng(9)
    u = (rng.standard_normal((3, 6, 5)) * np.array([1e-30, 1e30, 0.0])[:, None, None]).astype(dtype)
    got = rms_renormalised(xp, u, 0.2, faithful)
    assert got.dtype == dtype
    for i in range(2):
        wide = u[i].astype(np.float64)
        plain = 0.2 * np.sqrt(30) * wide / np.linalg.norm(wide)
        np.testing.assert_allclose(got[i], plain, rtol=64 * 30 * np.finfo(dtype).eps, atol=0)
    np.testing.assert_array_equal(got[2], 0 * u[2])


class _ToyConfig(NamedTuple):
    learning_rate: float
    weight_decay: float
    side: str
    faithful: bool
    rms_target: None
    b1: float


def _toy_rule():
    """A one-sided rule of the plainest arithmetic, without roots: ``M_t = b1 M_{t-1} + G_t``,
    ``v_t = v_{t-1} + diag(G_tᵀ G_t)``, ``U_t = M_t diag(s_t)`` with ``s_t = 2`` (no renormalisation)."""

    def init(xp, c, w, path):
        m, n = matrix_shape(tuple(w.shape), path)
        return {"momentum": xp.zeros((m, n), dtype=w.dtype), "statistic": xp.zeros((n,), dtype=w.dtype)}

    return OneSidedRule(
        init=init, terms=lambda xp, c, s: {"statistic": xp.sum(s.g * s.g, axis=-2)},
        momentum=lambda xp, c, m, g, zero: c.b1 * m + g, statistic=lambda xp, c, v, q: v + q, symmetric=False,
        inverse_root=None, direction=None, scale=lambda xp, c, v: 0.0 * v + 2.0, renormalise=scaled_rms_renormalised,
        finish=lambda xp, c, minus_lr, u, w: minus_lr * (u if w is None else u + c.weight_decay * w), fallback=A._ADAM,
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
def test_one_sided_runner_steps_each_leaf_by_its_rule(weight_decay):
    """The runner of a one-sided rule (``engine.blockdiag.one_sided_transform``): every matrix leaf,
    stacked with the leaves of its matrix shape or alone, steps by the rule's equations applied to
    its own matrix view, ``-η (U_t + λ W)`` with ``U_t = 2 M_t``, ``M_t = b1 M_{t-1} + G_t``, and
    keeps ``v_t = v_{t-1} + diag(G_tᵀ G_t)``, in its own shape; a leaf of fewer than 2 dimensions
    steps by the fallback Adam, whose first step is ``-η g/(|g| + ε)`` (bias-corrected moments,
    ASGO spec §2.4). A handful of roundings per entry: a few ulps."""
    lr, b1 = 0.5, 0.75
    c = _ToyConfig(lr, weight_decay, "right", False, None, b1)
    fallback = A.AdamConfig.checked(lr, 0.9, 0.95, 1e-8, 0.0, False)
    opt = one_sided_transform(_toy_rule(), c, name="toy", on_nonfinite="skip", fallback=fallback, fallback_mask=None)
    rng = np.random.default_rng(11)
    shapes = {"a": (3, 5), "b": (3, 5), "conv": (3, 5, 1), "c": (4, 2), "bias": (5,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    state = opt.init(params)
    momenta = {k: np.zeros((s[0], int(np.prod(s[1:])))) for k, s in shapes.items() if len(s) > 1}
    sums = {k: np.zeros(m.shape[1]) for k, m in momenta.items()}
    for t in range(3):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        updates, state = opt.update(grads, state, params)
        for k, m in momenta.items():
            g = grads[k].reshape(m.shape)
            momenta[k] = b1 * m + g
            sums[k] = sums[k] + (g * g).sum(axis=0)
            w = params[k].reshape(m.shape)
            expected = (-lr * (2.0 * momenta[k] + weight_decay * w)).reshape(shapes[k])
            assert updates[k].shape == shapes[k]
            np.testing.assert_allclose(updates[k], expected, rtol=8 * EPS, atol=8 * EPS * np.abs(expected).max())
            np.testing.assert_allclose(state.groups[k]["momentum"], momenta[k], rtol=4 * EPS)
            np.testing.assert_allclose(state.groups[k]["statistic"], sums[k], rtol=8 * EPS)
        if t == 0:
            g = grads["bias"]
            np.testing.assert_allclose(updates["bias"], -lr * g / (np.abs(g) + 1e-8), rtol=16 * EPS)
    assert set(state.groups["bias"]) == {"mu", "nu"}


# ------------------------------------------------------------------------------------------------
# joins: the matrix leaves of one dtype and device end to end (engine.matrices.matrix_joins)


def _join_leaves(rng, shapes, dtype=np.float64):
    """Groups as ``one_sided_transform`` gives them: per leaf its gradient and parameter (1-tuples)
    and a state with ``momentum`` (the matrix view) and a per-block ``statistic``."""
    grads, params, states = [], [], []
    for shape in shapes:
        m, n = matrix_shape(shape, ())
        grads.append((rng.standard_normal(shape).astype(dtype),))
        params.append((rng.standard_normal(shape).astype(dtype),))
        states.append({"momentum": rng.standard_normal((m, n)).astype(dtype), "statistic": rng.standard_normal((n, n)).astype(dtype)})
    return grads, params, states


def _smaller_side(states):
    """``matrix_joins``' ``left``: whether leaf ``i``'s left side is its smaller one (``side="auto"``)."""
    return lambda i: states[i]["momentum"].shape[0] < states[i]["momentum"].shape[1]


def test_matrix_joins_are_the_leaves_end_to_end_and_their_stacks():
    """The plain formula of a join (``engine.matrices.matrix_joins``, docs/engine.md "Persistent
    stacks"): its gradients, parameters and joined entries are the concatenation of its leaves'
    arrays flattened, in the order of its stacks; each stack of equal matrix shapes holds its
    leaves' arrays stacked along a leading axis (a conv-shaped leaf by its matrix view), as views of
    the join; leaves of another dtype form another join. A join of one stack holds that stack's
    arrays in its own shapes. After the leaves are handed their consecutive pieces of a new joined
    entry, the next join of that entry is a view of it (no copy)."""
    from precond_ref.engine.matrices import matrix_joins, stack_views

    rng = np.random.default_rng(21)
    shapes = [(3, 5), (4, 2), (3, 5, 1), (4, 2), (3, 5)]
    grads, params, states = _join_leaves(rng, shapes)
    g32, p32, s32 = _join_leaves(rng, [(2, 3)], np.float32)
    grads, params, states = grads + g32, params + p32, states + s32
    leaves = list(range(len(grads)))
    joins = matrix_joins(xp, grads, states, params, leaves, (), ("momentum",), _smaller_side(states), True)
    assert [j.leaves for j in joins] == [(0, 2, 4, 1, 3), (5,)]
    wide, narrow = joins
    order = wide.leaves
    np.testing.assert_array_equal(wide.g, np.concatenate([grads[i][0].ravel() for i in order]))
    np.testing.assert_array_equal(wide.param, np.concatenate([params[i][0].ravel() for i in order]))
    np.testing.assert_array_equal(wide.state["momentum"], np.concatenate([states[i]["momentum"].ravel() for i in order]))
    for s in wide.stacks:
        m, n = states[s.leaves[0]]["momentum"].shape
        np.testing.assert_array_equal(s.g, np.stack([grads[i][0].reshape(m, n) for i in s.leaves]))
        np.testing.assert_array_equal(s.param, np.stack([params[i][0].reshape(m, n) for i in s.leaves]))
        np.testing.assert_array_equal(s.state["momentum"], np.stack([states[i]["momentum"] for i in s.leaves]))
        # its products read its piece of the join where that starts as a new array could (an
        # address a multiple of 64 bytes on a CPU), else an array of its own
        start = wide.g.__array_interface__["data"][0]
        start += sum(grads[i][0].nbytes for i in order[: order.index(s.leaves[0])])
        assert np.shares_memory(s.g, wide.g) == (start % 64 == 0) and s.left == (m < n)
        assert np.shares_memory(s.param, wide.param)
    assert narrow.g.shape == (2, 3) and narrow.g.dtype == np.float32  # one stack of one leaf: its own shapes
    # hand each leaf its piece of a new joined entry: the next join is a view of it
    new = wide.state["momentum"] * 2.0
    for s, view in zip(wide.stacks, stack_views(xp, new, states, [s.leaves for s in wide.stacks], "momentum")):
        for i, piece in zip(s.leaves, view):
            states[i] = {**states[i], "momentum": piece}
    again = matrix_joins(xp, grads, states, params, leaves, (), ("momentum",), _smaller_side(states), True)[0]
    assert np.shares_memory(again.state["momentum"], new)
    np.testing.assert_array_equal(again.state["momentum"], new)


def test_leaves_over_the_join_bound_step_stack_by_stack(monkeypatch):
    """Matrix leaves of more than ``engine.matrices.JOIN_MAX_ELEMENTS`` entries in all are not
    joined across shapes (each stack of equal shapes is a join of its own, so a step holds one
    stack's copies at a time), and ASGO's and DASGO's updates are bitwise those of the joined step:
    the same element-wise lines on the same entries, run per stack instead of once."""
    from precond_ref.engine import matrices

    rng = np.random.default_rng(5)
    shapes = [(3, 5), (4, 2), (3, 5), (4, 2)]
    grads, params, states = _join_leaves(rng, shapes)
    leaves = list(range(len(grads)))
    assert len(matrices.matrix_joins(xp, grads, states, params, leaves, (), ("momentum",), _smaller_side(states), True)) == 1
    params0 = {f"w{i}": rng.standard_normal(shape) for i, shape in enumerate(shapes)}
    batches = [{k: rng.standard_normal(v.shape) for k, v in params0.items()} for _ in range(4)]

    def run(method):
        opt = getattr(pr, method)(learning_rate=0.1, **({"precondition_every": 2} if method == "asgo" else {}))
        params, state, out = dict(params0), None, []
        state = opt.init(params)
        for g in batches:
            updates, state = opt.update(g, state, params)
            params = {k: params[k] + updates[k] for k in params}
            out.append(updates)
        return out

    joined = {m: run(m) for m in ("asgo", "dasgo")}
    monkeypatch.setattr(matrices, "JOIN_MAX_ELEMENTS", 0)
    assert len(matrices.matrix_joins(xp, grads, states, params, leaves, (), ("momentum",), _smaller_side(states), True)) == 2
    for method, want in joined.items():
        for a, b in zip(run(method), want):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_symmetrized_pieces_is_symmetrize_of_each_piece():
    """``engine.matrices.symmetrized_pieces``: ``(A + Aᵀ)/2`` (``linalg.symmetrize``) of every
    matrix of the pieces of a joined array, joined as the array, bitwise (the same two roundings per
    entry); one piece in its own shape."""
    from precond_ref.engine.matrices import symmetrized_pieces
    from precond_ref.linalg import symmetrize

    rng = np.random.default_rng(22)
    pieces = [rng.standard_normal(s) for s in [(2, 3, 3), (4, 4), (4, 2, 2)]]
    flat = np.concatenate([p.ravel() for p in pieces])
    views, start = [], 0
    for p in pieces:
        views.append(flat[start : start + p.size].reshape(p.shape))
        start += p.size
    got = symmetrized_pieces(xp, flat, views)
    np.testing.assert_array_equal(got, np.concatenate([symmetrize(p).ravel() for p in pieces]))
    np.testing.assert_array_equal(symmetrized_pieces(xp, pieces[0], [pieces[0]]), symmetrize(pieces[0]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("faithful", [False, True])
def test_joined_renormalisations_are_each_alone(dtype, faithful):
    """``engine.matrices.joined_rms_renormalised`` and ``joined_scaled_rms_renormalised``: each stack's
    directions renormalised as alone (``rms_renormalised``, ``scaled_rms_renormalised``: r√(mn)
    U/‖U‖_F per matrix, D12), flattened and joined, bitwise: the joined casts, squares and
    selections are element-wise, the norms and scaling per stack. Stacks of several shapes and
    sides, a lone matrix, a zero matrix (its step stays zero), float32 (the float64 form) and
    float64 (the column-factored form, per stack), faithful (the dtype's own arithmetic)."""
    from precond_ref.engine.matrices import joined_rms_renormalised, joined_scaled_rms_renormalised

    rng = np.random.default_rng(23)
    us = [rng.standard_normal(s).astype(dtype) * 10.0 ** e for s, e in [((2, 3, 4), -20), ((5, 6), 3), ((3, 4, 2), 0)]]
    us[2][1] = 0.0
    expected = np.concatenate([rms_renormalised(xp, u, 0.2, faithful).ravel() for u in us])
    np.testing.assert_array_equal(joined_rms_renormalised(xp, us, 0.2, faithful), expected)

    axes = [-2, -1, -2]
    scales = [np.abs(rng.standard_normal(u.shape[:-2] + (u.shape[-1 if a == -2 else -2],))).astype(dtype) + 0.5
              for u, a in zip(us, axes)]  # the columns' scales for the sums over rows (axis -2), else the rows'
    m, scale = np.concatenate([u.ravel() for u in us]), np.concatenate([s.ravel() for s in scales])

    def pieces(flat, like):
        out, start = [], 0
        for a in like:
            out.append(flat[start : start + a.size].reshape(a.shape))
            start += a.size
        return out

    expected = np.concatenate([scaled_rms_renormalised(xp, u, s, a, 0.2, faithful).ravel() for u, s, a in zip(us, scales, axes)])
    got = joined_scaled_rms_renormalised(xp, m, scale, pieces(m, us), pieces(scale, scales), axes, 0.2, faithful)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("sizes", [((5, 6), (4, 5), (3, 4)), ((16, 24), (8, 16), (16, 8))])
def test_a_leaf_steps_alike_whatever_leaves_share_its_join(sizes):
    """A matrix leaf's ASGO update does not depend on the other leaves given with it (the invariant
    that lets a rank step the leaves it owns as one process steps all of them, and two param groups
    step as one): float32 torch, the leaves b and c alone or after a leaf a in the join,
    bit-identical. A BLAS rounds ``X Xᵀ`` of a piece at an unaligned offset of an allocation
    otherwise than of an array of its own, so a stack's products read their own copy there
    (the first sizes); pieces of multiples of 16 entries start where an array of their own
    could, and the products read them in place (the second)."""
    import torch

    torch.manual_seed(0)
    shapes = dict(zip("abc", sizes))
    params = {k: torch.randn(s, dtype=torch.float32) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, dtype=torch.float32) for k, s in shapes.items()} for _ in range(3)]

    def run(names):
        opt = pr.asgo(learning_rate=3e-2, weight_decay=1e-3)
        p = {k: params[k].clone() for k in names}
        state = opt.init(p)
        for g in grads:
            u, state = opt.update({k: g[k] for k in names}, state, p)
            p = {k: p[k] + u[k] for k in names}
        return p

    full = run(list(shapes))
    for subset in (["b", "c"], ["b"], ["a", "c"]):
        alone = run(subset)
        for k in subset:
            assert torch.equal(alone[k], full[k]), (subset, k)


@pytest.mark.parametrize("skipped", [False, True])
def test_joined_counters_are_each_leafs_counter_plus_its_count(skipped):
    """The ``failures`` of the leaves of one join (three stacks of three shapes, whose blocks take
    their own refresh phases), added for all of them at once: each leaf's counter is the one it has
    stepped alone (its blocks whose root the method rejected, on the steps its phase is due),
    whatever stacks share its join; a skipped step (a non-finite gradient, ``skipped``) keeps
    every counter."""
    from precond_ref.blocking import spread_schedule

    def rejecting(xp, c, p):  # rejects the blocks whose first diagonal entry exceeds their second
        z, _ = A._inverse_sqrt(xp, c, p)
        return z, xp.astype(p[..., 0, 0] > p[..., 1, 1], xp.int32)

    def run(shapes):
        transform = one_sided_transform(A._ASGO._replace(inverse_root=rejecting), _config(), name="asgo", on_nonfinite="skip",
                                        fallback=A.AdamConfig(0.1, 0.9, 0.95, 1e-8, 0.0, False), fallback_mask=None,
                                        schedule=spread_schedule(3, True))
        rng = np.random.default_rng(5)
        params = {k: w for k, w in [(k, rng.standard_normal(shape)) for k, shape in SHAPES.items()] if k in shapes}
        state, counters = transform.init(params), []
        for step in range(6):
            grads = {k: rng.standard_normal(shape) for k, shape in SHAPES.items()}
            if skipped and step == 3:
                grads = {k: np.full(shape, np.nan) for k, shape in SHAPES.items()}
            _, state = transform.update({k: grads[k] for k in shapes}, state, params)
            counters.append({k: int(state.groups[k]["failures"]) for k in shapes})
        return counters

    SHAPES = {"a": (4, 6), "b": (5, 3), "c": (4, 6), "d": (3, 7)}
    joint = run(SHAPES)
    assert len({counts["a"] for counts in joint} | {counts["c"] for counts in joint}) > 2  # counted, per leaf of a stack
    if skipped:
        assert joint[3] == joint[2]
    for k, shape in SHAPES.items():
        assert [counts[k] for counts in run({k: shape})] == [counts[k] for counts in joint], k


def test_numbers_over_rounds_as_each_number_over_the_array():
    """``engine.matrices.numbers_over(numbers, d)`` is ``[number / d_i]``, element for element as each
    Python number over the array: on torch the reciprocal times the number (``Tensor.__rtruediv__``),
    on NumPy the quotient (bitwise, float32 and float64)."""
    import array_api_compat.torch as xt
    import torch

    from precond_ref.engine.matrices import numbers_over

    rng = np.random.default_rng(3)
    numbers = [51.2, 25.6, 44.34050067376326, 102.4, 18.10193359837562, 0.3]
    for dtype in (np.float32, np.float64):
        d = (rng.random(len(numbers)) * 10.0 ** rng.integers(-5, 5, len(numbers))).astype(dtype)
        got = numbers_over(xp, np.asarray(numbers, dtype=dtype), d)
        np.testing.assert_array_equal(got, np.asarray([n / d[i:i + 1] for i, n in enumerate(numbers)]).ravel())
        t = torch.from_numpy(d)
        got_t = numbers_over(xt, torch.tensor(numbers, dtype=t.dtype), t)
        assert torch.equal(got_t, torch.cat([n / t[i:i + 1] for i, n in enumerate(numbers)]))
