"""MBF's long-axis policy and spread refreshes: ``block_size`` and ``refresh_phases``."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.testing.loops import LoopMBF
from precond_ref.engine.phases import phase_share, refresh_runs

M = importlib.import_module("precond_ref.methods.mbf")  # the package re-exports the factory under this name


def _model(rng):
    """FC layers whose output axes are blocked at block_size 2 (5 = 2 + 2 + tail 1; 4 = 2 + 2, no
    bias), one that is not (2), a conv whose 2x2 blocks share a stack with the FC blocks, a norm."""
    p = {
        "a": {"weight": rng.standard_normal((5, 3)), "bias": rng.standard_normal(5)},
        "b": {"weight": rng.standard_normal((4, 5))},
        "c": {"weight": rng.standard_normal((2, 4)), "bias": rng.standard_normal(2)},
        "conv": {"weight": rng.standard_normal((2, 1, 2, 1))},
        "norm": {"scale": rng.standard_normal(3)},
    }
    return {k: {n: p[k][n] for n in sorted(p[k])} for k in sorted(p)}


def _grads(rng, params):
    return {k: {n: rng.standard_normal(v.shape) for n, v in d.items()} for k, d in params.items()}


def _run(params, grads, **kw):
    opt = pr.mbf(**{"kl_clip": 0.0, **kw})
    state = opt.init(params)
    p = params
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = pr.apply_updates(p, updates)
    return p, state


@pytest.mark.parametrize("phases", [1, 3])
def test_blocked_and_spread_equal_the_loop_reference(phases):
    """Spec README section 6: with ``block_size = b`` every chunk of b rows of an FC
    layer's [W | b] (the last one shorter) has its own mini-block Fisher statistic and inverse; with
    ``refresh_phases = P`` the k-th of the n equal-size blocks refreshes its inverse on the calls
    ``i % T2 == (p T2) // P`` for its share p (plus every statistics step up to T2). The loop oracle
    (:class:`precond_ref.testing.loops.LoopMBF`) does exactly that block by block with ``np.linalg.inv``; float64, so the
    two agree to a few hundred ulps of the values (different summation orders only)."""
    rng = np.random.default_rng(0)
    params = _model(rng)
    grads = [_grads(rng, params) for _ in range(14)]
    hyper = dict(learning_rate=1e-2, damping=0.1, statistics_every=2, precondition_every=6)
    ours, state = _run(params, grads, block_size=2, refresh_phases=phases, **hyper)
    assert state.groups["a/weight"]["statistic"].shape == (2, 2, 2)
    assert state.groups["a/weight"]["statistic_tail"].shape == (1, 1)
    assert "statistic_tail" not in state.groups["b/weight"]
    assert state.groups["c/weight"]["statistic"].shape == (2, 2)
    ref = LoopMBF(params, kl_clip=0.0, block_size=2, refresh_phases=phases, **hyper)
    p = params
    for g in grads:
        p = pr.apply_updates(p, ref.step(g, p))
    for k in p:
        for n in p[k]:
            np.testing.assert_allclose(ours[k][n], p[k][n], rtol=1e-10, atol=1e-12, err_msg=f"{k}/{n}")


def test_spreading_changes_the_trajectory():
    """The comparison above is not vacuous: spread refreshes reuse older inverses for some blocks
    after the warm-up, so the parameters differ from the unspread run by far more than rounding."""
    rng = np.random.default_rng(0)
    params = _model(rng)
    grads = [_grads(rng, params) for _ in range(14)]
    hyper = dict(learning_rate=1e-2, damping=0.1, statistics_every=2, precondition_every=6, block_size=2)
    a, _ = _run(params, grads, refresh_phases=1, **hyper)
    b, _ = _run(params, grads, refresh_phases=3, **hyper)
    assert np.abs(a["a"]["weight"] - b["a"]["weight"]).max() > 1e-6


def test_blocked_statistics_are_the_diagonal_blocks_of_the_unblocked_one():
    """Spec README section 6: blocking keeps, of the O x O statistic H_g H_g^T/(I+1), exactly its
    diagonal b x b blocks (the mini-block Fisher family, finer). Same products of the same rows,
    so equal to rounding of one dot product per entry: (I+1) eps |g|^2 relative."""
    rng = np.random.default_rng(1)
    params = {"a": {"weight": rng.standard_normal((7, 3)), "bias": rng.standard_normal(7)}}
    grads = [_grads(rng, params) for _ in range(3)]
    hyper = dict(learning_rate=1e-2, statistics_every=1, precondition_every=1)
    _, whole = _run(params, grads, block_size=7, **hyper)
    _, blocked = _run(params, grads, block_size=3, **hyper)
    f = whole.groups["a/weight"]["statistic"]
    got = blocked.groups["a/weight"]
    tol = 4 * 4 * np.finfo(np.float64).eps * np.abs(f).max()
    for j in range(2):
        np.testing.assert_allclose(got["statistic"][j], f[3 * j : 3 * j + 3, 3 * j : 3 * j + 3], rtol=0, atol=tol)
    np.testing.assert_allclose(got["statistic_tail"], f[6:, 6:], rtol=0, atol=tol)


def test_warm_start_fills_every_block():
    """``warm_start`` sets each block's statistic to the mean of that block's statistics over the
    batches: the diagonal blocks of the unblocked warm start (same rows, same products)."""
    rng = np.random.default_rng(2)
    params = {"a": {"weight": rng.standard_normal((5, 2)), "bias": rng.standard_normal(5)}}
    batches = [_grads(rng, params) for _ in range(3)]
    whole = pr.mbf(block_size=5)
    blocked = pr.mbf(block_size=2)
    f = whole.warm_start(whole.init(params), batches).groups["a/weight"]["statistic"]
    got = blocked.warm_start(blocked.init(params), batches).groups["a/weight"]
    tol = 8 * 3 * np.finfo(np.float64).eps * np.abs(f).max()
    np.testing.assert_allclose(got["statistic"][1], f[2:4, 2:4], rtol=0, atol=tol)
    np.testing.assert_allclose(got["statistic_tail"], f[4:, 4:], rtol=0, atol=tol)


def test_phase_due_schedule():
    """The spread schedule (the rule's ``_inverse_due``): P = 1 is the authors' ``mbngd_if_inverse`` (every
    statistics step up to T2, then multiples of T2); for P > 1 every phase is due on every
    statistics step up to T2, then exactly once in every T2 consecutive calls, the P phases on
    distinct calls; a 0-D integer array gives the same decisions as a Python int."""
    t1, t2 = 3, 12

    def warmup_phase_due(i, p, phases, t1, t2):
        config = M.MBFConfig(*(None,) * 11, statistics_every=t1, precondition_every=t2, refresh_phases=phases)
        return M._inverse_due(config, p, i)

    authors = [(i <= t2 and i % t1 == 0) or i % t2 == 0 for i in range(60)]
    assert [bool(warmup_phase_due(i, 0, 1, t1, t2)) for i in range(60)] == authors
    phases = 4
    due = {p: [i for i in range(60) if warmup_phase_due(i, p, phases, t1, t2)] for p in range(phases)}
    for p, calls in due.items():
        assert [i for i in calls if i <= t2] == list(range(0, t2 + 1, t1))
        after = [i for i in calls if i > t2]
        assert np.all(np.diff(after) == t2) and after[0] - t2 <= t2
        assert all(bool(warmup_phase_due(np.asarray(i, np.int32), p, phases, t1, t2)) == (i in calls) for i in range(60))
    late = [set(i for i in calls if i > t2) for calls in due.values()]
    assert sum(len(s) for s in late) == len(set().union(*late))  # never two phases on one call


@pytest.mark.parametrize("n, phases", [(0, 3), (1, 3), (5, 3), (22, 10), (7, 7)])
def test_phase_share_partitions_the_stack(n, phases):
    """``engine.phases.phase_share``: the shares of the P phases are contiguous, cover 0..n-1 once, in order,
    and differ in size by at most one block (an even load per refresh call); the share of a run
    of phases ``first..stop-1`` is the union of its phases' shares (so merging a run refreshes
    exactly the blocks its phases would)."""
    shares = [phase_share(n, p, p + 1, phases) for p in range(phases)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [stop - start for start, stop in shares]
    assert max(sizes) - min(sizes) <= 1
    for first in range(phases):
        for stop in range(first + 1, phases + 1):
            assert phase_share(n, first, stop, phases) == (shares[first][0], shares[stop - 1][1])


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4", 4.0])
def test_bad_block_size(value):
    """A block size below 1 or not an integer is a ValueError naming ``block_size``."""
    with pytest.raises(ValueError, match="block_size"):
        pr.mbf(block_size=value)


@pytest.mark.parametrize("kw, match", [
    (dict(refresh_phases=0), "refresh_phases"),
    (dict(refresh_phases=1.5), "refresh_phases"),
    (dict(refresh_phases=11, precondition_every=10), "refresh_phases must be at most precondition_every"),
    (dict(block_size=8, mode="faithful"), "block_size=8 needs mode='principled'"),
    (dict(block_size=8, fc_blocks="official_chunks"), "fc_blocks='columns_avg'"),
    (dict(refresh_phases=2, mode="faithful"), "refresh_phases=2 needs mode='principled'"),
])
def test_bad_spreading_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        pr.mbf(**kw)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0)])
def test_zero_size_axis_is_left_unchanged_without_a_factor(shape):
    """A parameter with a zero-size axis has no state and a zero (empty) update, blocked
    or not; the other layers step as usual."""
    rng = np.random.default_rng(3)
    params = {"empty": {"weight": np.zeros(shape)}, "fc": {"weight": rng.standard_normal((5, 2))}}
    opt = pr.mbf(learning_rate=1e-2, block_size=2, statistics_every=1, precondition_every=1)
    state = opt.init(params)
    assert state.groups["empty/weight"] == {}
    updates, state = opt.update(_grads(rng, params), state, params)
    assert updates["empty"]["weight"].shape == shape and state.groups["empty/weight"] == {}
    assert np.abs(updates["fc"]["weight"]).max() > 0


def test_state_of_the_unblocked_layout_is_refused_naming_the_setting():
    """A checkpoint in the unblocked layout (principled: one O x O statistic and inverse per FC
    layer up to max_block_dim=4096), built here by hand in that layout, loaded into the blocked
    default: a ValueError naming the leaf and the block_size that reproduces the layout."""
    rng = np.random.default_rng(4)
    o = 300  # above the default block size
    params = {"head": {"weight": rng.standard_normal((o, 3)), "bias": np.zeros(o)}}
    opt = pr.mbf(learning_rate=1e-2)
    new = opt.init(params)
    old_entries = {"momentum": np.zeros((o, 4)), "statistic": np.zeros((o, o)), "inverse": np.eye(o) / 1e-3,
                   "failures": np.zeros((), np.int32)}
    old = new._replace(groups={"head/weight": old_entries})
    with pytest.raises(ValueError, match=r"'head/weight'.*block_size=300 or larger"):
        opt.update(_grads(rng, params), old, params)
    # ... and with that block size the old state steps.
    updates, _ = pr.mbf(learning_rate=1e-2, block_size=o).update(_grads(rng, params), old, params)
    assert np.all(np.isfinite(updates["head"]["weight"]))


def test_principled_defaults():
    """The principled defaults (docs/methods/mbf.md, "Long axes, intervals and cost"): FC output
    axes above the default block size are blocked, and the inverse refreshes are spread over
    T2 / T1 phases; faithful mode keeps one O x O block and refreshes every inverse at once."""
    params = {"head": {"weight": np.zeros((2 * M._BLOCK_SIZE + 1, 3))}}
    g = pr.mbf().init(params).groups["head/weight"]
    assert g["statistic"].shape == (2, M._BLOCK_SIZE, M._BLOCK_SIZE) and g["statistic_tail"].shape == (1, 1)
    faithful = pr.mbf(mode="faithful").init(params).groups["head/weight"]
    assert faithful["statistic"].shape == (2 * M._BLOCK_SIZE + 1,) * 2


def test_refresh_runs_merge_the_phases_due_on_the_host():
    """``engine.phases.refresh_runs``: phases due on the host (Python bools, NumPy 0-D arrays, which read for
    free) merge into runs of consecutive phases, so the warm-up (every phase due) is one run
    ``(True, 0, P)``; a decision only the device knows (an ``array_api_strict`` array here: never
    read by ``host_bool``) stays its own phase with its own predicate."""
    strict = pytest.importorskip("array_api_strict")
    assert refresh_runs(np, [True] * 4) == [(True, 0, 4)]
    assert refresh_runs(np, [False, True, False, False]) == [(True, 1, 2)]
    assert refresh_runs(np, [True, False, True, True]) == [(True, 0, 1), (True, 2, 4)]
    assert refresh_runs(np, [False] * 3) == []
    assert refresh_runs(np, [np.asarray(True)] * 3) == [(True, 0, 3)]
    device = [strict.asarray(True), strict.asarray(True)]
    runs = refresh_runs(strict, device)
    assert [(r[1], r[2]) for r in runs] == [(0, 1), (1, 2)] and all(r[0] is d for r, d in zip(runs, device))


def test_failures_count_failed_blocks_however_the_phases_run(monkeypatch):
    """``failures`` counts each block whose inverse refresh failed (kept its previous inverse), one
    per block and refresh. In the warm-up every phase refreshes on every statistics call: merged
    into one run where the decisions are on the host (NumPy with ``step=``), one ``cond`` per
    phase where they are device arrays (``array_api_strict`` without ``step=``); both count the
    same. Every refresh is made to fail (the inverse patched to keep ``previous`` and report every
    block failed); the layer's three blocks of 2 rows lie in both shares (P = 2): 5 warm-up calls
    (0..4, T1 = 1, T2 = 4) refresh all 3 blocks, call 6 (phase 1: 6 % 4 == 4 // 2) its share."""
    strict = pytest.importorskip("array_api_strict")

    def failing(matrices, damping, previous):
        xp = matrices.__array_namespace__()
        return previous, xp.ones(tuple(matrices.shape[:-2]), dtype=xp.bool)

    monkeypatch.setattr(M, "damped_inverse_stable", failing)
    rng = np.random.default_rng(3)
    params = {"big": {"weight": rng.standard_normal((6, 2))}}
    grads = [{"big": {"weight": rng.standard_normal((6, 2))}} for _ in range(7)]
    hyper = dict(learning_rate=1e-3, statistics_every=1, precondition_every=4, block_size=2, refresh_phases=2)
    counts = {}
    for name, xp, step in (("host", np, True), ("device", strict, False)):
        opt = pr.mbf(**hyper)
        p = {"big": {"weight": xp.asarray(params["big"]["weight"])}}
        state = opt.init(p)
        for i, g in enumerate(grads):
            g = {"big": {"weight": xp.asarray(g["big"]["weight"])}}
            updates, state = opt.update(g, state, p, **({"step": i} if step else {}))
            p = pr.apply_updates(p, updates)
        counts[name] = int(state.groups["big/weight"]["failures"])
    start, stop = phase_share(3, 1, 2, 2)
    assert counts == {"host": 5 * 3 + stop - start, "device": 5 * 3 + stop - start}


@pytest.mark.parametrize("blocks, expected", [((0,), 1), ((0, 1), 2)])
def test_failures_count_each_block_whose_statistic_is_not_finite(blocks, expected):
    """``failures`` counts one per block whose statistic update was discarded. The gradient's skip
    rule bounds its squared norm, so a statistic step cannot overflow from a gradient; the
    non-finite statistic is planted in the state instead (Inf in the chosen blocks of an FC layer of
    4 outputs in two blocks of 2 rows). One statistics step without an inverse refresh (T1 = 1, T2 = 4,
    one share, step 11, after the warm-up): the planted blocks keep their previous value, the other block of the same
    stack takes its new one, and each planted block counts one."""
    rng = np.random.default_rng(6)
    params = {"fc": {"weight": rng.standard_normal((4, 3))}}
    opt = pr.mbf(learning_rate=1e-3, block_size=2, statistics_every=1, precondition_every=4,
                 refresh_phases=1)
    state = opt.init(params)
    group = dict(state.groups["fc/weight"])
    planted = np.array(group["statistic"])
    planted[list(blocks)] = np.inf
    group["statistic"] = planted
    state = state._replace(groups={"fc/weight": group})
    _, state = opt.update({"fc": {"weight": rng.standard_normal((4, 3))}}, state, params, step=11)
    new = state.groups["fc/weight"]
    assert int(new["failures"]) == expected
    statistic = np.asarray(new["statistic"])
    for b in range(2):
        if b in blocks:
            assert np.all(statistic[b] == np.inf)
        else:
            assert np.all(np.isfinite(statistic[b])) and np.abs(statistic[b]).max() > 0
    np.testing.assert_array_equal(new["inverse"], group["inverse"])  # no refresh on this step


def test_raised_damping_is_not_a_failure():
    """B6: damping 1e-14 against statistics of order 100 raises the damping of every block
    (floor 100 eps |F| > 1e-14); the raised inverse is used, so nothing is counted."""
    rng = np.random.default_rng(3)
    params = {"big": {"weight": rng.standard_normal((6, 2))}}
    opt = pr.mbf(learning_rate=1e-3, damping=1e-14, statistics_every=1, precondition_every=1, block_size=2)
    state = opt.init(params)
    for i in range(3):
        updates, state = opt.update({"big": {"weight": 10.0 * rng.standard_normal((6, 2))}}, state, params, step=i)
        assert np.all(np.isfinite(updates["big"]["weight"]))
    assert int(state.groups["big/weight"]["failures"]) == 0
