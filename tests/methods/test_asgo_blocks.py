"""ASGO's long-axis policy and refresh schedule: blocks, spread refreshes, bad input,
zero-size leaves and states saved in the unblocked layout of earlier versions."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.engine.phases import hashed_phases as _refresh_phases
from precond_ref.methods.asgo import PRINCIPLED_BLOCK_SIZE

EPS64 = np.finfo(np.float64).eps
asgo_module = importlib.import_module("precond_ref.methods.asgo")


def _due_phases(schedule, calls):
    return {j for j, interval in enumerate(schedule) if bool(pr.transform.is_due(interval, calls))}


@pytest.mark.parametrize("phases", [1, 4, 10])
def test_refresh_phases_depend_on_the_block_alone(phases):
    """Invariant (``engine.phases.hashed_phases``' definition): a block's phase is ``(h(path) + index) mod
    T`` (``h`` a fixed string hash), a function of its own key: the same when other blocks are added or removed (param groups
    split a model, a shard holds some leaves), and the blocks of one leaf take consecutive phases,
    so a side of ``n <= T`` blocks has ``n`` distinct phases."""
    keys = [("blocks.0.mlp.weight", j) for j in range(4)] + [("head.weight", 0), ("head.weight", 1)]
    out = _refresh_phases(keys, phases)
    assert all(0 <= j < phases for j in out)
    assert _refresh_phases(keys[4:], phases) == out[4:] and _refresh_phases(keys[:1], phases) == out[:1]
    if phases >= 4:
        assert len(set(out[:4])) == 4
    assert [(a - out[0]) % phases for a in out[:4]] == [j % phases for j in range(4)]


def _roots_over_steps(steps, **kwargs):
    """Roots (left side, 4 chunks of 2 rows) after each of ``steps`` updates, float64, eigh."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((8, 20))}
    opt = pr.asgo(block_size=2, root_method="eigh", weight_decay=0.0, **kwargs)
    state = opt.init(params)
    roots, stats = [], []
    for _ in range(steps):
        grads = {"w": rng.standard_normal((8, 20))}
        _, state = opt.update(grads, state, params)
        (group,) = state.groups.values()
        roots.append(np.array(group["root"]))
        stats.append(np.array(group["statistic"]))
    return roots, stats


def test_spread_refresh_refreshes_each_block_on_its_phase_only():
    """Invariant (spec step 3 with the phase schedule): the statistic does not depend on the
    schedule; block ``j`` of leaf ``w`` (phase ``q_j = _refresh_phases``) holds the root of its
    statistic at the last step ``t`` with ``t ≡ q_j (mod T)`` or ``t = 0``, and nothing else. The
    reference is the every-step run's root of that step, computed by the same ``eigh``: equal up
    to the batched and unbatched call's rounding, a few ``k·eps`` relative (k = 2)."""
    interval, steps = 4, 9
    spread, spread_stats = _roots_over_steps(steps, precondition_every=interval, spread_refresh=True)
    every, every_stats = _roots_over_steps(steps, precondition_every=1)
    np.testing.assert_array_equal(np.array(spread_stats), np.array(every_stats))
    phase = _refresh_phases([("w", j) for j in range(4)], interval)
    for t in range(steps):
        for j in range(4):
            last = max(s for s in range(t + 1) if s == 0 or s % interval == phase[j])
            np.testing.assert_allclose(spread[t][j], every[last][j], rtol=64 * EPS64, atol=0)
            if last != t:  # not refreshed at t: the stored root, bit for bit
                np.testing.assert_array_equal(spread[t][j], spread[t - 1][j])


def test_unspread_refresh_refreshes_all_blocks_together():
    """``spread_refresh=False``: every block is refreshed at ``t ≡ 0 (mod T)`` only (D4)."""
    interval, steps = 4, 6
    roots, _ = _roots_over_steps(steps, precondition_every=interval, spread_refresh=False)
    every, _ = _roots_over_steps(steps, precondition_every=1)
    for t in range(steps):
        last = t - t % interval
        np.testing.assert_allclose(roots[t], every[last], rtol=64 * EPS64, atol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4", np.float64(8.0)])
def test_bad_block_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        pr.asgo(block_size=bad)


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_bad_spread_refresh_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="spread_refresh must be True, False or None"):
        pr.asgo(spread_refresh=bad)


def test_faithful_mode_refuses_spread_refresh():
    with pytest.raises(ValueError, match="spread_refresh=True is not available with mode='faithful'"):
        pr.asgo(mode="faithful", spread_refresh=True)


def test_zero_size_axis_is_left_unchanged_with_no_factor():
    """A leaf with a zero-size axis gets no state (no statistic, no root) and a zero-size update;
    the other leaves step as without it (same updates, bit for bit)."""
    rng = np.random.default_rng(1)
    params = {"empty": np.zeros((0, 5)), "w": rng.standard_normal((3, 4))}
    grads = {"empty": np.zeros((0, 5)), "w": rng.standard_normal((3, 4))}
    opt = pr.asgo(root_method="eigh")
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    alone = pr.asgo(root_method="eigh")
    alone_updates, _ = alone.update({"w": grads["w"]}, alone.init({"w": params["w"]}), {"w": params["w"]})
    assert updates["empty"].shape == (0, 5)
    np.testing.assert_array_equal(updates["w"], alone_updates["w"])
    empty_state = [g for g in state.groups.values() if "statistic" not in g]
    assert empty_state == [{}]


def test_state_of_the_unblocked_default_names_the_block_size_that_continues_it():
    """A state saved unblocked (one k×k statistic and root, which is the layout of
    ``block_size >= k`` here) does not fit the default when the side is longer than the block size: the update
    raises a ValueError naming the parameter and ``block_size=k``, and with that value the same
    state steps."""
    k = PRINCIPLED_BLOCK_SIZE + 1
    params = {"w": np.zeros((k, k), dtype=np.float32)}
    grads = {"w": np.zeros((k, k), dtype=np.float32)}
    old_state = pr.asgo(block_size=k).init(params)
    (group,) = old_state.groups.values()
    assert group["statistic"].shape == (k, k) and group["root"].shape == (k, k)
    with pytest.raises(ValueError, match=rf"'w' \({k}, {k}\)/float32 does not fit.*statistic blocks are \{{'statistic': \({k}, {k}\)\}}.*block_size={k} \(or larger\)"):
        pr.asgo().update(grads, old_state, params)
    updates, _ = pr.asgo(block_size=k).update(grads, old_state, params)
    assert updates["w"].shape == (k, k)


def test_sides_up_to_the_block_size_keep_the_unblocked_layout():
    """The default block size changes nothing for sides up to it: the state of such a leaf is the
    unblocked one (so earlier states of such models continue)."""
    b = PRINCIPLED_BLOCK_SIZE
    state = pr.asgo().init({"w": np.zeros((3, b), dtype=np.float32)})
    (group,) = state.groups.values()
    assert group["statistic"].shape == (3, 3)
    state = pr.asgo(block_size=2).init({"w": np.zeros((3, 7), dtype=np.float32)})
    (group,) = state.groups.values()
    assert group["statistic"].shape == (1, 2, 2) and group["statistic_tail"].shape == (1, 1)


def test_principled_defaults_are_the_module_constants():
    """The factory's ``None`` defaults resolve to the documented constants (and faithful mode to
    the authors' every-step refresh, unblocked)."""
    assert asgo_module.PRINCIPLED_PRECONDITION_EVERY >= 1
    assert isinstance(PRINCIPLED_BLOCK_SIZE, int) and PRINCIPLED_BLOCK_SIZE >= 1
    params = {"w": np.zeros((2, PRINCIPLED_BLOCK_SIZE + 3), dtype=np.float32)}
    # Left side k = 2: unblocked whatever the block size; the right side is never preconditioned.
    (group,) = pr.asgo(mode="faithful").init(params).groups.values()
    assert group["statistic"].shape == (2, 2) and "root" not in group
