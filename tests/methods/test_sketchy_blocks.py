"""Sketchy / S-AdaGrad long axes and refresh schedule: block_size, spread refreshes, defaults."""

from __future__ import annotations

import functools
import importlib

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.blocking import PhaseDue
from precond_ref.engine import axes, phases
from precond_ref.engine.axes import leaf_plan
from precond_ref.engine.phases import shape_phase

sk = importlib.import_module("precond_ref.methods.sketchy")


def _sketch_keys_changed(old: dict, new: dict) -> set:
    """The runs ``sketches/{n}/{j}`` whose basis changed."""
    return {k.removesuffix("/basis") for k in new if k.endswith("/basis") and not np.array_equal(old[k], new[k])}


def test_spread_refresh_updates_each_run_on_its_phase_only():
    """With precondition_every T and spread_refresh, the sketch of a run in phase p changes on
    call c exactly when PhaseDue(T, p)(c) (c == 0 or c % T == p) (docstring of spread_refresh): every run on call 0,
    then each run once per T calls, on its own call."""
    interval = 3
    params = {"w": np.zeros((12, 5))}
    tx = pr.scale_by_sketchy(rank=2, block_size=4, precondition_every=interval, spread_refresh=True)
    state = tx.init(params)
    # (12, 5) merges to one axis of 60: 15 blocks of 4, cut into 3 runs with phases 0, 1, 2 (mod 3).
    plan = leaf_plan((60,), 2, 4, interval, shape_phase((12, 5), interval))
    assert len(plan.axes[0].runs) == 3
    rng = np.random.default_rng(0)
    for call in range(2 * interval + 1):
        old = dict(state.groups["w"])
        _, state = tx.update({"w": rng.standard_normal((12, 5))}, state)
        changed = _sketch_keys_changed(old, state.groups["w"])
        expected = {
            f"sketches/{n}/{j}"
            for n, axis in enumerate(plan.axes) for j, run in enumerate(axis.runs) if PhaseDue(interval, run.phase)(call)
        }
        assert changed == expected, call


def test_unspread_interval_refreshes_everything_together():
    """spread_refresh=False: every sketch changes on calls c % T == 0 and none on the others."""
    tx = pr.scale_by_sketchy(rank=2, block_size=4, precondition_every=3, spread_refresh=False)
    state = tx.init({"w": np.zeros((12, 5))})
    rng = np.random.default_rng(1)
    for call in range(7):
        old = dict(state.groups["w"])
        _, state = tx.update({"w": rng.standard_normal((12, 5))}, state)
        changed = _sketch_keys_changed(old, state.groups["w"])
        assert changed == ({"sketches/0/0"} if call % 3 == 0 else set())  # one stacked run of 15 blocks


def test_s_adagrad_interval_applies_last_sketch_between_refreshes():
    """S-AdaGrad with precondition_every T: on a call where no block is due the sketch is unchanged
    and the direction is the last sketch applied to the gradient with the gradient's own mass on the
    sketch's frame, fd_apply_with_own_mass (docs/methods/sketchy.md, "Long axes, intervals and cost")."""
    from precond_ref.sketch import fd_apply_with_own_mass
    import array_api_compat.numpy as xp

    tx = pr.s_adagrad(learning_rate=1.0, rank=3, precondition_every=4, spread_refresh=False)
    params = {"w": np.zeros((6, 2))}
    state = tx.init(params)
    rng = np.random.default_rng(2)
    _, state = tx.update({"w": rng.standard_normal((6, 2))}, state)
    g = rng.standard_normal((6, 2))
    before = dict(state.groups["w"])
    updates, state = tx.update({"w": g}, state)
    for key, value in before.items():
        np.testing.assert_array_equal(state.groups["w"][key], value)
    sketch = {name: before[f"sketches/0/0/{name}"] for name in pr.sketch.SKETCH_KEYS}
    expected = -fd_apply_with_own_mass(xp, sketch, g.reshape(12, 1)).reshape(6, 2)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(updates["w"], expected, rtol=0, atol=16 * np.finfo(np.float64).eps * scale * 12)


@pytest.mark.parametrize("precondition_every", [1, 3])
def test_s_adagrad_step_is_bounded_with_and_between_refreshes(precondition_every):
    """|update| <= lr sqrt(k + 1) on every step [derived: the direction has at most k + 1
    coordinates on an orthonormal frame, each at most 1 in magnitude; after an FD step that added g
    (|c_i| (sigma_i^2 + rho + c_i^2)^{-1/2}, and the part of g outside the new basis is at most the
    shrink value, weighted by (rho')^{-1/2} <= 1/shrink), and between refreshes by
    fd_apply_with_own_mass]. The stream leaves a tiny escaped mass (a fourth direction of 1e-3
    against a rank-3 sketch), then a gradient along a direction the sketch never saw: the last
    sketch alone gives it the weight rho^{-1/2}, about 1e3 here."""
    rank, lr = 3, 1.0
    tx = pr.s_adagrad(learning_rate=lr, rank=rank, precondition_every=precondition_every, spread_refresh=False)
    state = tx.init({"w": np.zeros(12)})
    eye = np.eye(12)
    stream = [eye[0]] * 3 + [eye[1]] * 3 + [eye[2]] * 3 + [1e-3 * eye[3], eye[5], eye[5], eye[5]]
    norms = []
    for g in stream:
        updates, state = tx.update({"w": g}, state)
        norms.append(float(np.linalg.norm(updates["w"])))
    assert max(norms) <= lr * np.sqrt(rank + 1) * (1 + 1e-12), norms


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
@pytest.mark.parametrize("factory", ["sketchy", "s_adagrad", "scale_by_sketchy"])
def test_bad_block_size_is_a_clear_error(factory, bad):
    args = () if factory == "scale_by_sketchy" else (1e-2,)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        getattr(pr, factory)(*args, block_size=bad)


@pytest.mark.parametrize("factory", ["sketchy", "s_adagrad", "scale_by_sketchy"])
def test_zero_size_axis_gets_no_factor_and_stays_unchanged(factory):
    """A parameter with a zero-size axis has no sketch state and a zero-size update (nothing moves),
    while the other leaves are preconditioned as usual."""
    args = () if factory == "scale_by_sketchy" else (1e-2,)
    tx = getattr(pr, factory)(*args, rank=2)
    params = {"empty": np.zeros((0, 5)), "wide": np.zeros((2048, 0)), "w": np.ones((3, 4))}
    state = tx.init(params)
    assert state.groups["empty"] == {} and state.groups["wide"] == {}
    assert any(k.endswith("/basis") for k in state.groups["w"])
    grads = {"empty": np.zeros((0, 5)), "wide": np.zeros((2048, 0)), "w": np.arange(12.0).reshape(3, 4)}
    updates, state = tx.update(grads, state, params)
    assert updates["empty"].shape == (0, 5) and updates["wide"].shape == (2048, 0)
    assert state.groups["empty"] == {} and np.abs(updates["w"]).max() > 0


def test_principled_defaults_and_faithful_refusals():
    """None picks the mode's defaults: principled blocks of PRINCIPLED_BLOCK_SIZE refreshed every
    PRINCIPLED_PRECONDITION_EVERY steps (spread), faithful the authors' (unblocked, every step)."""
    every = sk.PRINCIPLED_PRECONDITION_EVERY
    resolve = functools.partial(sk._resolve_schedule, principled_block_size=sk.PRINCIPLED_BLOCK_SIZE, principled_every=every)
    assert resolve(False, None, None, None) == (sk.PRINCIPLED_BLOCK_SIZE, tuple(PhaseDue(every, p) for p in range(every)))
    assert resolve(False, None, None, False) == (sk.PRINCIPLED_BLOCK_SIZE, (every,))
    assert resolve(True, None, None, None) == (None, (1,))
    groups = pr.sketchy(1e-2, rank=4).init({"emb": np.zeros((2048, 8))}).groups
    assert groups["emb"]["sketches/0/0/basis"].shape == (1, 1024, 4)
    assert groups["emb"]["sketches/0/1/basis"].shape == (1, 1024, 4)
    with pytest.raises(ValueError, match="spread_refresh is not available in mode='faithful'"):
        pr.sketchy(1e-2, mode="faithful", spread_refresh=True)
    with pytest.raises(ValueError, match="precondition_every"):
        pr.s_adagrad(1e-2, mode="faithful", precondition_every=2)


def test_state_of_the_earlier_default_layout_names_the_block_size_that_loads_it():
    """A state saved by the version before the block-size default (principled sketchy, unblocked:
    one (2048, k) sketch for a 2048-row embedding, keys axis0_*) does not fit the new default
    (1024-row blocks); the error names block_size=2048, and with it the state loads and steps."""
    params = {"emb": np.zeros((2048, 8))}
    old_layout = {
        "axis0_basis": (2048, 4), "axis0_singular_values": (4,), "axis0_escaped_root": (),
        "axis0_basis_weights": (4,), "axis0_complement_weight": (), "axis1_basis": (8, 4),
        "axis1_singular_values": (4,), "axis1_escaped_root": (), "axis1_basis_weights": (4,),
        "axis1_complement_weight": (), "sketch_failures": (), "graft_second_moment": (2048, 8),
        "momentum": (2048, 8),
    }
    new = pr.sketchy(1e-2, rank=4, block_size=2048, precondition_every=1).init(params)
    old_names = {f"sketches/{n}/0/{name}": f"axis{n}_{name}" for n in (0, 1) for name in pr.sketch.SKETCH_KEYS}
    old_names["failures"] = "sketch_failures"
    old = new._replace(groups={"emb": {old_names.get(k, k): v for k, v in new.groups["emb"].items()}})
    assert {k: tuple(v.shape) for k, v in old.groups["emb"].items()} == old_layout
    grads = {"emb": np.ones((2048, 8))}
    with pytest.raises(ValueError, match="block_size=2048"):
        pr.sketchy(1e-2, rank=4).update(grads, old, params)
    updates, _ = pr.sketchy(1e-2, rank=4, block_size=2048).update(grads, old, params)
    assert updates["emb"].shape == (2048, 8)


def test_cost_model_counts_the_principled_interval():
    """The cost model resolves sketchy's None defaults to the principled ones: the FD part of the
    mean step is 1/PRINCIPLED_PRECONDITION_EVERY of the every-step figure, the apply part equal."""
    from precond_ref.benchmarks import cost

    params = [("emb", (2048, 128))]
    every = cost.sketchy(params, rank=64, precondition_every=1, block_size=1024)
    default = cost.sketchy(params, rank=64, precondition_every=None, block_size=None)
    assert every.flops - every.parts["sketch apply"][1] > 0
    fd_every = every.flops - every.parts["sketch apply"][1]
    fd_default = default.flops - default.parts["sketch apply"][1]
    assert fd_default == pytest.approx(fd_every / sk.PRINCIPLED_PRECONDITION_EVERY)


def _each_leaf_as_alone(factory, kw: dict, shapes: dict, steps: int, seed: int, monkeypatch) -> tuple[list, list]:
    """Runs ``factory(**kw)`` on the tree of ``shapes`` for ``steps`` steps beside one transform per
    leaf, and checks every leaf's update and state against its own transform's (rtol 1e-10 in
    float64: a batched product may sum in another order than an unbatched one). Returns the sizes
    of every stack formed (``blocking.stack`` in the refresh driver ``engine.phases``, ``engine.axes._chunk_stack``) and the shapes of the FD calls' rows of the last
    step."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    tx = factory(**kw)
    state = tx.init(params)
    alone = {k: factory(**kw) for k in shapes}
    alone_states = {k: alone[k].init({k: params[k]}) for k in shapes}
    stack_sizes, fd_calls = [], []
    real_stack = phases.stack
    fd_step = "fd_update" if factory is pr.sketchy else "fd_update_apply"  # the FD step each rule calls
    real_fd = getattr(sk, fd_step)

    def counted(xp, members, *args, **kwargs):
        stacks = real_stack(xp, members, *args, **kwargs)
        stack_sizes.extend(len(s.indices) for s in stacks)
        return stacks

    def counted_chunk(xp, members, *args):  # flat_runs' stack of one bounded chunk
        stack_sizes.append(len(members))
        return real_chunk(xp, members, *args)

    real_chunk = axes._chunk_stack
    monkeypatch.setattr(phases, "stack", counted)
    monkeypatch.setattr(axes, "_chunk_stack", counted_chunk)
    monkeypatch.setattr(sk, fd_step, lambda xp, sketch, rows, **o: fd_calls.append(rows.shape) or real_fd(xp, sketch, rows, **o))
    for step in range(steps):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        fd_calls.clear()
        updates, state = tx.update(grads, state, params)
        joint_calls = list(fd_calls)
        for k in shapes:
            expected, alone_states[k] = alone[k].update({k: grads[k]}, alone_states[k], {k: params[k]})
            np.testing.assert_allclose(updates[k], expected[k], rtol=1e-10, atol=1e-300, err_msg=f"{k} step {step}")
            for entry, value in alone_states[k].groups[k].items():
                np.testing.assert_allclose(state.groups[k][entry], value, rtol=1e-10, atol=1e-300,
                                           err_msg=f"{k} {entry} step {step}")
    return stack_sizes, joint_calls


@pytest.mark.parametrize("interval", [1, 3])
def test_s_adagrad_stacked_leaves_get_what_each_would_alone(interval, monkeypatch):
    """Runs of equal block length and refresh phase share one batched FD step across leaves
    (``blocking.stack``: the single-sketch leaves "a", "b", "c", "f" of 8 entries, and the 10-entry
    blocks of the blocked leaves "e" and "g"); each block's step reads only its own rows, so every
    leaf's update and state equal those of the same leaf in a transform of its own (here with
    momentum, weight decay, decay b2 < 1 and, for T = 3, refreshes spread over phases; "e"'s 2-entry
    tail and a leaf of another size "d" beside them). The tolerance: a few u per entry of a 10-term
    product, amplified by at most the weights' ratio (1/eps)^(1/2) ~ 3e3 over 7 steps, below 1e-10
    in float64."""
    shapes = {"a": (8,), "b": (2, 4), "c": (8,), "d": (5,), "e": (12,), "f": (4, 2), "g": (20,)}
    kw = dict(learning_rate=0.5, rank=3, block_size=10, momentum=0.5, weight_decay=0.1,
              precondition_every=interval, b2=0.9)
    stack_sizes, joint_calls = _each_leaf_as_alone(pr.s_adagrad, kw, shapes, 7, 0, monkeypatch)
    # every run in one phase: a, b, c, f together; else "a" and "c" (shape (8,), one phase) at least
    assert stack_sizes and max(stack_sizes) >= (4 if interval == 1 else 2)
    if interval == 1:  # one FD call per block length and step: 8 (a, b, c, f), 5 (d), 10 (e, g), 2 (e's tail)
        assert sorted(joint_calls) == [(1, 2, 1), (1, 5, 1), (3, 10, 1), (4, 8, 1)]


@pytest.mark.parametrize("interval", [1, 3])
def test_sketchy_stacked_leaves_get_what_each_would_alone(interval, monkeypatch):
    """Sketchy's runs of one shape and exponent share one batched FD update, and at each axis one
    batched apply, across leaves (``blocking.stack``): "w1" and "w2" (two layers' weights of one
    shape), "t" (its transpose: other runs), "blk" (a 23 x 4 leaf whose first axis is cut into two
    10-row blocks and a 3-row tail), a vector "v" (one axis: another exponent) and a graft-only
    scalar "s" beside them. Each block's arithmetic reads only its own rows, so every leaf's update
    and state equal those of the same leaf in a transform of its own (momentum, weight decay,
    T = 3 spread over phases; ``merge_dims=2`` keeps the matrices two-axis). The tolerance: a
    batched product may sum in another order than an unbatched one, a few u per entry of a
    product of at most 23 terms, amplified by at most the weights' ratio, (1/eps)^(1/4) ~ 56 for a
    two-axis leaf at the relative eps 1e-7 ((1/eps)^(1/2) ~ 3e3 for the vector), over 6 steps:
    below 1e-10 in float64."""
    shapes = {"w1": (6, 4), "w2": (6, 4), "t": (4, 6), "blk": (23, 4), "v": (5,), "s": ()}
    kw = dict(learning_rate=0.1, rank=3, block_size=10, momentum=0.5, weight_decay=0.1,
              precondition_every=interval, precondition_1d=True, merge_dims=2)
    stack_sizes, joint_calls = _each_leaf_as_alone(pr.sketchy, kw, shapes, 6, 1, monkeypatch)
    assert stack_sizes and max(stack_sizes) >= 2
    if interval == 1:
        # one FD call per run shape and exponent: the 6-row axis of w1, w2 and t's second axis
        # together (3 members of rows 6 x 4), their 4-row axes (4 x 6), blk's two blocks (10 x 4),
        # its tail (3 x 4), its 4-row axis (4 x 23) and v (5 x 1)
        assert sorted(joint_calls) == sorted([(3, 6, 4), (3, 4, 6), (2, 10, 4), (1, 3, 4), (1, 4, 23), (1, 5, 1)])


@pytest.mark.parametrize("factory", ["sketchy", "s_adagrad"])
def test_failures_count_each_failed_block_of_each_leaf(factory, monkeypatch):
    """``failures`` of a leaf grows by the number of its blocks whose FD step was not finite
    (spec: a failed decomposition keeps the previous sketch and counts). Every FD step is made to
    report failure (its ``ok`` all False): each leaf's count after a step is then its number of
    blocks refreshed, whether the leaf is one unstacked sketch (0-D flags) or runs of stacked blocks
    (flags summed), and whether it shares its stack with other leaves."""
    fd_step = "fd_update" if factory == "sketchy" else "fd_update_apply"  # the FD step each rule calls
    real_fd = getattr(sk, fd_step)

    def failing(*args, **options):
        new, ok, *out = real_fd(*args, **options)
        return (new, ok & False, *out)

    monkeypatch.setattr(sk, fd_step, failing)
    if factory == "sketchy":
        shapes = {"w1": (6, 4), "w2": (6, 4), "blk": (23, 4), "v": (5,)}
        tx = pr.sketchy(learning_rate=0.1, rank=3, block_size=10, precondition_every=1, precondition_1d=True, merge_dims=2)
        blocks = {"w1": 2, "w2": 2, "blk": 3 + 1, "v": 1}  # blk: 10, 10 and 3 rows, and its 4-row axis
    else:
        shapes = {"a": (8,), "b": (2, 4), "e": (25,)}
        tx = pr.s_adagrad(learning_rate=0.1, rank=3, block_size=10)
        blocks = {"a": 1, "b": 1, "e": 3}
    rng = np.random.default_rng(2)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    state = tx.init(params)
    for step in (1, 2):
        _, state = tx.update({k: rng.standard_normal(s) for k, s in shapes.items()}, state, params)
        assert {k: int(state.groups[k]["failures"]) for k in shapes} == {k: step * n for k, n in blocks.items()}
