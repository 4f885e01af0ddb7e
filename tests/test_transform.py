"""The core contract: trees, build_transform, schedules, the interval mechanism, validation."""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pytest

import precond_ref as pr
from backends import BACKEND_NAMES, BACKENDS
from precond_ref.transform import (
    LeafGroup,
    build_transform,
    check_int,
    check_interval,
    check_positive_int,
    check_principled_only,
    cond,
    is_zero,
)
from precond_ref.tree import from_entries, path_str, to_entries, tree_flatten, tree_map, tree_unflatten


class Pair(NamedTuple):
    kernel: object
    bias: object


def test_tree_round_trip_and_paths():
    tree = {"a": [1.0, (2.0, None)], "b": Pair(3.0, 4.0), "c": {}}
    leaves, treedef = tree_flatten(tree)
    assert leaves == [1.0, 2.0, 3.0, 4.0]
    assert [path_str(p) for p in treedef.paths] == ["a/0", "a/1/0", "b/kernel", "b/bias"]
    rebuilt = tree_unflatten(treedef, [x * 10 for x in leaves])
    assert rebuilt == {"a": [10.0, (20.0, None)], "b": Pair(30.0, 40.0), "c": {}}
    assert isinstance(rebuilt["b"], Pair)
    assert path_str(()) == "."


def test_named_fields_and_their_entries_round_trip():
    """A state of named fields is stored under its leaves' paths (``to_entries``) and read back into
    the method's layout (``from_entries``): the inverse, field by field; a missing entry is named."""
    fields = Pair(kernel=(1.0, 2.0), bias=Pair(3.0, (4.0,)))
    entries = to_entries(fields)
    assert entries == {"kernel/0": 1.0, "kernel/1": 2.0, "bias/kernel": 3.0, "bias/bias/0": 4.0}
    template = Pair(kernel=(0, 0), bias=Pair(0, (0,)))
    assert from_entries(template, entries) == fields
    assert isinstance(from_entries(template, entries).bias, Pair)
    del entries["bias/bias/0"]
    with pytest.raises(KeyError, match="bias/bias/0"):
        from_entries(template, entries)


def test_tree_map_rejects_different_structures():
    with pytest.raises(ValueError, match="tree structures differ"):
        tree_map(lambda a, b: a + b, {"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="expected 2 leaves"):
        tree_unflatten(tree_flatten([1.0, 2.0])[1], [1.0])


def test_apply_updates_keeps_parameter_dtype(backend):
    xp = backend.xp
    params = {"w": xp.ones((2,), dtype=xp.float32)}
    updates = {"w": xp.ones((2,), dtype=xp.float64) * 0.5}
    out = pr.apply_updates(params, updates)
    assert out["w"].dtype == xp.float32
    np.testing.assert_allclose(backend.to_numpy(out["w"]), 1.5)


def _counting_transform(**kwargs):
    """A toy method: the update is -count_of_refreshes * g; refresh every 2 steps."""

    def init_group(leaves, paths, xp):
        return {"refreshes": xp.zeros((), dtype=leaves[0].dtype, device=None)}

    def update_group(grads, state, params, ctx):
        xp = ctx.xp
        refreshes = cond(xp, ctx.every(2), lambda r: r + 1.0, lambda r: r, state["refreshes"])
        return tuple(-refreshes * g for g in grads), {"refreshes": refreshes}

    return build_transform(name="toy", init_group=init_group, update_group=update_group, **kwargs)


def test_nonfinite_update_entries_become_zero_and_the_largest_finite_one_stays(backend):
    """build_transform's element-wise guard: a method's update entry that is NaN or ±Inf is
    replaced by zero (the parameters never receive one), every finite entry passes unchanged,
    ±finfo.max included (the guard is |u| <= finfo.max, which is isfinite(u))."""
    big = float(np.finfo(np.float32).max)
    made = np.array([np.nan, np.inf, -np.inf, big, -big, 1.5], dtype=np.float32)

    def init_group(leaves, paths, xp):
        return {}

    def update_group(grads, state, params, ctx):
        xp = ctx.xp
        return (xp.asarray(made, device=getattr(grads[0], "device", None)),), {}

    opt = build_transform(name="made", init_group=init_group, update_group=update_group)
    params = backend.tree({"w": np.zeros(6, dtype=np.float32)})
    grads = backend.tree({"w": np.ones(6, dtype=np.float32)})
    runs = [opt.update]
    if backend.name == "torch":  # compiled, the guard is another comparison (_backend.finite_or_zero)
        import torch

        runs.append(torch.compile(opt.update, fullgraph=True, dynamic=False))
    for update in runs:
        with np.errstate(all="ignore"):
            updates, state = update(grads, opt.init(params), params)
        np.testing.assert_array_equal(backend.to_numpy(updates["w"]), [0.0, 0.0, 0.0, big, -big, 1.5])
        assert int(state.count) == 1 and int(state.nonfinite_count) == 0


def test_interval_mechanism_counts_refreshes(backend):
    opt = _counting_transform()
    params = backend.tree({"w": np.ones(2)})
    state = opt.init(params)
    seen = []
    for _ in range(5):
        updates, state = opt.update(backend.tree({"w": np.ones(2)}), state, params)
        seen.append(float(backend.to_numpy(updates["w"])[0]))
    assert seen == [-1.0, -1.0, -2.0, -2.0, -3.0]
    assert int(state.count) == 5


def test_host_decisions_answer_each_declared_interval_and_refuse_another():
    """``update(..., due=)``: ``ctx.every`` answers a declared number by value and a declared
    predicate by identity, each with its own decision, and refuses an interval not declared."""
    def odd(calls):
        return calls % 2 == 1

    def even(calls):
        return calls % 2 == 0

    asked = []

    def update_group(grads, state, params, ctx):
        asked.append((ctx.every(3), ctx.every(odd), ctx.every(5), ctx.every(even)))
        for undeclared in (4, lambda calls: True):
            with pytest.raises(ValueError, match="was not declared to build_transform"):
                ctx.every(undeclared)
        return grads, state

    opt = build_transform(name="toy", init_group=lambda leaves, paths, xp: {}, update_group=update_group,
                          intervals=(3, odd, 5, even))
    params = {"w": np.ones(2)}
    state = opt.init(params)
    for due in [(True, False, False, True), (False, True, True, False)]:
        opt.update({"w": np.ones(2)}, state, params, due=due)
    assert asked == [(True, False, False, True), (False, True, True, False)]


def test_grouping_pairs_weight_and_bias(backend):
    """group_leaves receives paths; a pairing function gets one call per pair."""
    seen = []

    def pair(paths, leaves):
        groups, used = [], set()
        for i, p in enumerate(paths):
            if p[-1] == "weight":
                j = paths.index(p[:-1] + ("bias",))
                groups.append(LeafGroup(path_str(p), (i, j), (p, paths[j])))
                used |= {i, j}
        groups += [LeafGroup(path_str(p), (i,), (p,)) for i, p in enumerate(paths) if i not in used]
        return groups

    def init_group(leaves, paths, xp):
        seen.append(tuple(path_str(p) for p in paths))
        return {}

    def update_group(grads, state, params, ctx):
        seen.append(("update",) + tuple(path_str(p) for p in ctx.paths))
        return tuple(-g for g in grads), state

    opt = build_transform(name="pair", init_group=init_group, update_group=update_group, group_leaves=pair)
    params = backend.tree({"fc": {"weight": np.ones((2, 3)), "bias": np.ones(2)}, "scale": np.ones(1)})
    state = opt.init(params)
    assert seen == [("fc/weight", "fc/bias"), ("scale",)]
    assert sorted(state.groups) == ["fc/weight", "scale"]
    updates, _ = opt.update(params, state, params)
    np.testing.assert_array_equal(backend.to_numpy(updates["fc"]["bias"]), -1.0)
    # (update also asks init_group, once per group, for the state layout it checks the gradients against)
    assert [s for s in seen[2:] if s[0] == "update"] == [("update", "fc/weight", "fc/bias"), ("update", "scale")]


def test_update_groups_sees_every_nonempty_group_of_a_call_at_once():
    """``update_groups`` (the batching hook) receives the lists update_group would get one by one,
    in group order, zero-size groups left out, and gives the same results; exactly one is given."""
    calls = []

    def init_group(leaves, paths, xp):
        return {"n": xp.zeros(leaves[0].shape, dtype=leaves[0].dtype)}

    def update_group(grads, state, params, ctx):
        return tuple(-g * (1.0 + len(ctx.paths[0])) for g in grads), {"n": state["n"] + grads[0]}

    def update_groups(grads, states, params, ctxs):
        calls.append([path_str(c.paths[0]) for c in ctxs])
        return [update_group(g, s, p, c) for g, s, p, c in zip(grads, states, params, ctxs)]

    one = build_transform(name="one", init_group=init_group, update_group=update_group)
    batched = build_transform(name="batched", init_group=init_group, update_groups=update_groups)
    params = {"a": np.ones(2), "b": {"c": np.ones((2, 3))}, "empty": np.ones((0, 3))}
    grads = tree_map(lambda p: 2.0 * p, params)
    want, want_state = one.update(grads, one.init(params), params)
    got, got_state = batched.update(grads, batched.init(params), params)
    assert calls == [["a", "b/c"]]
    tree_map(np.testing.assert_array_equal, got, want)
    assert list(got_state.groups) == list(want_state.groups) == ["a", "b/c", "empty"]
    tree_map(np.testing.assert_array_equal, got_state.groups, want_state.groups)
    with pytest.raises(TypeError, match="exactly one"):
        build_transform(name="x", init_group=init_group)
    with pytest.raises(TypeError, match="exactly one"):
        build_transform(name="x", init_group=init_group, update_group=update_group, update_groups=update_groups)


def test_legacy_names_rename_an_old_state_on_update():
    """``build_transform(legacy_names=...)``: a state saved under an earlier version's entry names
    gives the step of the state under the current names, and the returned state has the current
    names; a current state (one that fits its layout) is never handed to ``legacy_names``."""
    def init_group(leaves, paths, xp):
        return {"sum/0": xp.zeros(leaves[0].shape, dtype=leaves[0].dtype)}

    def update_group(grads, state, params, ctx):
        return (-state["sum/0"] - grads[0],), {"sum/0": state["sum/0"] + grads[0]}

    migrated = []

    def legacy(entries):
        migrated.append(list(entries))
        return {"sum/0": entries["sum_0"]} if "sum_0" in entries else entries

    tx = build_transform(name="toy", init_group=init_group, update_group=update_group, legacy_names=legacy)
    params = {"w": np.ones(3)}
    state = tx.update(params, tx.init(params), params)[1]
    old = state._replace(groups={"w": {"sum_0": state.groups["w"]["sum/0"]}})
    want, want_state = tx.update(params, state, params)
    assert migrated == []
    got, got_state = tx.update(params, old, params)
    assert migrated == [["sum_0"]]
    tree_map(np.testing.assert_array_equal, got, want)
    assert list(got_state.groups["w"]) == ["sum/0"]
    np.testing.assert_array_equal(got_state.groups["w"]["sum/0"], want_state.groups["w"]["sum/0"])
    assert tx.init.legacy_names is legacy


@pytest.mark.parametrize("wrong", ["update shape", "state shape", "state dtype", "state entries"])
def test_a_step_that_changes_the_update_shape_or_the_state_layout_is_named(wrong):
    """``update_group`` returning an update of another shape than its gradient, or a new state of
    another layout than the old (a broadcast entry, another dtype, another entry) raises
    ``ValueError`` naming the leaf. A changed entry is named with its layouts before and after the
    step, and the gradient, which fits the old state (checked before the step), is given beside
    them, not blamed: the message said the gradient did not fit the optimizer state."""
    def init_group(leaves, paths, xp):
        return {"s": xp.zeros(leaves[0].shape, dtype=leaves[0].dtype)}

    def update_group(grads, state, params, ctx):
        g, s = grads[0], state["s"]
        new = {"update shape": s, "state shape": s + g[:, None], "state dtype": s.astype(np.float32),
               "state entries": {"t": s}}[wrong]
        return ((g[None] if wrong == "update shape" else g),), (new if wrong == "state entries" else {"s": new})

    tx = build_transform(name="toy", init_group=init_group, update_group=update_group)
    params = {"w": np.ones(3)}
    words = ("toy: update of 'w' has shape (1, 3), gradient (3,)" if wrong == "update shape" else
             "toy: the step of 'w' would change the layout of its optimizer state: 's' from (3,)/float64 to "
             + ("(3, 3)/float64" if wrong == "state shape" else "(3,)/float32")
             + ", with its gradient of shape (3,), dtype float64; a step keeps each state entry's shape and dtype"
             if wrong in ("state shape", "state dtype") else "toy: state of 'w' changed its entries ['s'] -> ['t']")
    with pytest.raises(ValueError, match=re.escape(words)):
        tx.update(params, tx.init(params), params)


def test_a_flat_leaf_whose_step_changes_the_state_is_named_by_its_parameters():
    """An element-wise method runs its small leaves of one layout as one flat leaf: a step that
    changes that flat leaf's state dtype is refused naming the parameters it holds, not the flat
    leaf's internal name; a larger leaf, stepped alone, is named as it is."""
    def init_group(leaves, paths, xp):
        return {"s": xp.zeros(leaves[0].shape, dtype=leaves[0].dtype)}

    def update_group(grads, state, params, ctx):
        return (grads[0],), {"s": state["s"].astype(np.float64)}

    tx = build_transform(name="toy", init_group=init_group, update_group=update_group, elementwise=True)
    params = {"a": np.ones((3, 2), np.float32), "c": np.ones(4, np.float32)}
    words = ("toy: the step of 'a', 'c' (run as one flat leaf) would change the layout of its optimizer state: "
             "'s' from (10,)/float32 to (10,)/float64, with the flat leaf's gradient of shape (10,), dtype float32")
    with pytest.raises(ValueError, match=re.escape(words)):
        tx.update(params, tx.init(params), params)
    alone = {"a": np.ones((3, 2), np.float32)}
    with pytest.raises(ValueError, match=re.escape("toy: the step of 'a' would change the layout of its optimizer state: "
                                                   "'s' from (3, 2)/float32 to (3, 2)/float64, with its gradient of shape (3, 2)")):
        tx.update(alone, tx.init(alone), alone)


def test_missing_members_of_a_pair():
    """The partial-gradient rule: a member without a gradient is filled only when another member of
    its group has one; singletons and groups without any gradient are left out."""
    from precond_ref.transform import missing_members, weight_bias_groups

    paths = [("fc", "bias"), ("fc", "weight"), ("head", "weight"), ("head", "bias"), ("scale",)]
    leaves = [np.zeros(3), np.zeros((3, 2)), np.zeros((1, 3)), np.zeros(1), np.zeros(4)]
    groups = weight_bias_groups(paths, leaves)
    assert missing_members(groups, [False, True, True, True, False]) == [0]  # fc's bias
    assert missing_members(groups, [True, False, False, True, True]) == [1, 2]  # both weights
    assert missing_members(groups, [False, False, True, True, False]) == []  # fc has none at all
    assert pr.agd().group_leaves(paths, leaves) == [LeafGroup(path_str(p), (i,), (p,)) for i, p in enumerate(paths)]
    assert pr.mbf(learning_rate=0.1).group_leaves(paths, leaves) == groups


def test_state_tree_must_be_the_precond_state(backend):
    opt = pr.agd()
    with pytest.raises(TypeError, match="PrecondState"):
        opt.update(backend.tree({"w": np.ones(2)}), {"count": 0})


def test_mixed_namespaces_rejected():
    import torch

    with pytest.raises(TypeError, match="one namespace"):
        pr.agd().init({"a": np.ones(2), "b": torch.ones(2)})


def test_nonfinite_raise_refused_under_jit():
    import jax
    import jax.numpy as jnp

    opt = pr.agd(on_nonfinite="raise")
    params = {"w": jnp.ones((2,), jnp.float64)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="cannot run under jax.jit"):
        jax.jit(opt.update)(params, state, params)


def test_validators():
    check_interval("b1", 0.5, 0.0, 1.0)
    for bad in (1.0, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="b1"):
            check_interval("b1", bad, 0.0, 1.0)
    check_positive_int("every", 3)
    check_positive_int("every", lambda c: c % 2 == 0, allow_callable=True)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="every"):
            check_positive_int("every", bad)
    check_int("merge_dims", 2, 2)
    for bad in (1, 2.0, True, None):
        with pytest.raises(ValueError, match=re.escape(f"merge_dims must be an integer >= 2, got {bad!r}")):
            check_int("merge_dims", bad, 2)
    assert is_zero(0.0) and is_zero(0) and not is_zero(1e-9)
    assert not is_zero(np.asarray(0.0))  # an injected hyperparameter may change: never static zero


def test_principled_only_options_and_mode_defaults():
    """A faithful-only refusal names the option, the reason and the way out (spec: each method's
    faithful mode is the authors' code, whose absent options raise); an option left to None takes
    its mode's default, one given is kept."""
    check_principled_only("block_size", False)
    with pytest.raises(ValueError, match=re.escape("block_size is not available with mode='faithful' (why); use mode='principled'")):
        check_principled_only("block_size", True, " (why)")
    with pytest.raises(ValueError, match=re.escape("spread_refresh is not available in mode='faithful'; use")):
        check_principled_only("spread_refresh", True, "", "in")
    assert pr.transform.mode_default(None, True, 1, 2) == 1 and pr.transform.mode_default(None, False, 1, 2) == 2
    assert pr.transform.mode_default(0.0, False, 1, 2) == 0.0  # a given value, even a false one, is kept


def test_dict_order_does_not_matter():
    """jax.jit returns dicts with sorted keys; apply_updates must accept them for any params order."""
    params = {"z": np.ones(2), "a": np.zeros(3)}
    updates = {"a": np.ones(3), "z": np.ones(2)}
    out = pr.apply_updates(params, updates)
    np.testing.assert_array_equal(out["z"], 2.0)
    np.testing.assert_array_equal(out["a"], 1.0)


def test_numpy_scalar_hyperparameters_on_strict():
    """A NumPy scalar learning rate is a number, not an array of another namespace."""
    import array_api_strict as xs

    opt = pr.agd(learning_rate=np.float64(0.1), delta=np.float32(1e-5), weight_decay=np.float64(0.0))
    params = {"w": xs.asarray([1.0, 2.0])}
    updates, _ = opt.update({"w": xs.asarray([0.5, -0.5])}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.1, 0.1])


def test_matmul_precision_is_explicit_on_jax_and_torch():
    """Every float32 product of a step runs at the transform's
    precision whatever the backend default (JAX picks TF32 on GPUs) or the process-wide torch
    setting. On a CPU the precision changes no digit, so the check reads what the step records:
    every dot of ASGO's traced JAX step carries precision HIGHEST, and a torch step sees
    "highest" even when the training script set "medium", which is restored afterwards."""
    import re

    import jax
    import jax.numpy as jnp
    import torch

    opt = pr.asgo(mode="faithful", weight_decay=0.0)
    params = {"w": jnp.ones((4, 3), jnp.float32)}
    lowered = jax.jit(lambda g, s: opt.update(g, s, params)).lower(params, opt.init(params)).as_text()
    dots = re.findall(r"stablehlo.dot_general[^\n]*", lowered)
    assert dots and all("precision = [HIGHEST, HIGHEST]" in d for d in dots)

    seen = []

    def init_group(leaves, paths, xp):
        return {}

    def update_group(grads, state, params, ctx):
        seen.append(torch.get_float32_matmul_precision())
        return grads, state

    toy = build_transform(name="toy", init_group=init_group, update_group=update_group)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        w = {"w": torch.ones(2)}
        toy.update(w, toy.init(w))
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        build_transform(name="toy", init_group=init_group, update_group=update_group, matmul_precision="tf32")


# Update without params names gradients that do not fit the state.
_WITHOUT_PARAMS = {
    "agd": lambda: pr.agd(learning_rate=0.1),
    "asgo": lambda: pr.asgo(learning_rate=0.1, weight_decay=0.0),
    "dasgo": lambda: pr.dasgo(learning_rate=0.1, weight_decay=0.0),
    "mbf": lambda: pr.mbf(learning_rate=0.1),
    "rf_rmsprop": lambda: pr.rf_rmsprop(learning_rate=0.1, batch_size=1),
    "rf_adamw": lambda: pr.rf_adamw(learning_rate=0.1, batch_size=1),
    "if_shampoo": lambda: pr.if_shampoo(learning_rate=0.1, batch_size=1),
    "sketchy": lambda: pr.sketchy(learning_rate=0.1, rank=2),
    "s_adagrad-momentum": lambda: pr.s_adagrad(learning_rate=0.1, rank=2, momentum=0.5),
}


@pytest.mark.parametrize("method", sorted(_WITHOUT_PARAMS))
@pytest.mark.parametrize("wrong", ["transposed", "float64"])
def test_update_without_params_names_a_gradient_that_does_not_fit(method, wrong):
    """A transposed gradient, or a float64 gradient for float32 state, raises ``ValueError`` naming
    the leaf before the state is touched (it was accepted, or failed deep inside with a broadcasting
    error, or returned a float64 update); a transposed one is named with both shapes (the shapes
    ``init`` saw), whatever the state's layout. Without params nothing says the parameters' dtype:
    the gradient is taken in its own, which the state does not fit."""
    opt = _WITHOUT_PARAMS[method]()
    state = opt.init({"layer": {"w": np.ones((4, 3), np.float32)}})
    grad = np.ones((3, 4), np.float32) if wrong == "transposed" else np.ones((4, 3), np.float64)
    if wrong == "transposed":
        words = "gradient of 'layer/w' has shape (3, 4), parameter has shape (4, 3)"
    else:
        words = "gradient of 'layer/w' (4, 3)/float64 does not fit"
    with pytest.raises(ValueError, match=re.escape(words)):
        opt.update({"layer": {"w": grad}}, state)


# Every core method, in its default (principled) and its faithful mode where it has one.
_MODES = {
    "agd": lambda: pr.agd(learning_rate=5e-2),
    "agd-faithful": lambda: pr.agd(learning_rate=5e-2, mode="faithful", weight_decay=1e-3),
    "asgo": lambda: pr.asgo(learning_rate=5e-2, weight_decay=1e-3, precondition_every=2),
    "asgo-faithful": lambda: pr.asgo(learning_rate=5e-2, mode="faithful", weight_decay=1e-3),
    "dasgo": lambda: pr.dasgo(learning_rate=5e-2, weight_decay=1e-3),
    "mbf": lambda: pr.mbf(learning_rate=2e-2, damping=1.0, statistics_every=1, precondition_every=2),
    "mbf-faithful": lambda: pr.mbf(learning_rate=2e-2, mode="faithful", damping=1.0, weight_decay=1e-3,
                                   statistics_every=1, precondition_every=2),
    "rf_rmsprop": lambda: pr.rf_rmsprop(learning_rate=2e-2, damping=0.1, momentum=0.9, batch_size=1),
    "rf_rmsprop-faithful": lambda: pr.rf_rmsprop(learning_rate=2e-2, damping=0.1, momentum=0.9, weight_decay=1e-4,
                                                 mode="faithful", batch_size=1),
    "rf_adamw": lambda: pr.rf_adamw(learning_rate=5e-2, damping=1e-2, batch_size=1),
    "if_shampoo": lambda: pr.if_shampoo(learning_rate=1e-2, preconditioner_lr=0.5, damping=0.1, batch_size=1,
                                        precondition_every=2),
    "if_shampoo-faithful": lambda: pr.if_shampoo(learning_rate=1e-2, preconditioner_lr=0.5, damping=0.1, batch_size=1,
                                                 mode="faithful", grouping="weight_bias"),
    "sketchy": lambda: pr.sketchy(learning_rate=5e-2, rank=2, weight_decay=1e-3, precondition_every=2),
    "sketchy-faithful": lambda: pr.sketchy(learning_rate=5e-2, rank=2, mode="faithful", eps=1.0, relative_eps=False,
                                           graft="none"),
    "s_adagrad": lambda: pr.s_adagrad(learning_rate=3e-1, rank=2, momentum=0.5),
    "s_adagrad-faithful": lambda: pr.s_adagrad(learning_rate=3e-1, rank=2, delta=0.1, mode="faithful"),
}


@pytest.mark.parametrize("method", sorted(_MODES))
def test_gradients_of_another_floating_dtype_step_as_the_parameters_dtype(method):
    """float32 gradients of float64 parameters are taken as float64 (the rule of every library;
    optax's users meet it as bfloat16 gradients of float32 parameters): three steps give bit for
    bit the updates, parameters and state of the same gradients cast to float64 by the caller,
    the updates in float64 and the state in init's layout."""
    params = {"layer": {"kernel": np.full((2, 3), 0.5), "bias": np.zeros(2)}}
    rng = np.random.default_rng(0)
    grads = [tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params) for _ in range(3)]
    opt = _MODES[method]()
    layout = lambda tree: [(leaf.shape, leaf.dtype) for leaf in tree_flatten(tree)[0]]
    runs = {}
    for cast in (False, True):
        p, state = params, opt.init(params)
        runs[cast] = trajectory = []
        for g in grads:
            g = tree_map(lambda x: x.astype(np.float64), g) if cast else g
            updates, new_state = opt.update(g, state, p)
            assert layout(updates) == layout(p) and layout(new_state) == layout(state)
            p, state = pr.apply_updates(p, updates), new_state
            trajectory.append(tree_flatten((updates, p, state))[0])
    for taken, expected in zip(runs[False], runs[True]):
        for a, b in zip(taken, expected):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype


def test_update_without_params_names_a_weight_without_its_bias():
    """MBF pairs a Linear weight with its bias; a gradient tree without the bias is named (it gave
    a broadcasting error)."""
    opt = pr.mbf(learning_rate=0.1)
    state = opt.init({"fc": {"weight": np.ones((4, 3), np.float32), "bias": np.ones(4, np.float32)}})
    with pytest.raises(ValueError, match=r"'fc/weight' \(4, 3\)/float32 does not fit.*without its bias"):
        opt.update({"fc": {"weight": np.ones((4, 3), np.float32)}}, state)


def test_s_adagrad_without_momentum_names_a_transposed_gradient_by_the_shapes_init_saw():
    """S-AdaGrad without momentum keeps no parameter-shaped state (its sketch is of the flattened
    gradient), so a gradient of another shape but the same size fits its state: without ``params``
    the transform names it from the shapes its ``init`` saw at that path (it used to return an
    update of the gradient's shape), with ``params`` from theirs. Documented limit: a state given
    to another instance of the transformation, which never saw ``init``, has only its layout to go
    by and the gradient's shape is not checked without ``params``."""
    opt = pr.s_adagrad(learning_rate=0.1, rank=2)
    params = {"w": np.ones((4, 3), np.float32)}
    state = opt.init(params)
    words = r"gradient of 'w' has shape \(3, 4\), parameter has shape \(4, 3\)"
    with pytest.raises(ValueError, match=words):
        opt.update({"w": np.ones((3, 4), np.float32)}, state)
    with pytest.raises(ValueError, match=words):
        opt.update({"w": np.ones((3, 4), np.float32)}, state, params)
    updates, _ = pr.s_adagrad(learning_rate=0.1, rank=2).update({"w": np.ones((3, 4), np.float32)}, state)
    assert updates["w"].shape == (3, 4)


@pytest.mark.parametrize("method", sorted(_WITHOUT_PARAMS))
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_skipped_nonfinite_step_prints_no_numpy_warning(method, bad):
    """A skipped non-finite step computes nothing from the Inf/NaN (7 of 9
    methods printed NumPy RuntimeWarnings); it is still skipped and counted."""
    import warnings

    opt = _WITHOUT_PARAMS[method]()
    params = {"layer": {"w": np.ones((4, 3), np.float32)}}
    state = opt.init(params)
    grad = np.full((4, 3), 0.5, np.float32)
    grad[1, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        updates, new_state = opt.update({"layer": {"w": grad}}, state, params)
    assert not np.any(updates["layer"]["w"]) and int(new_state.nonfinite_count) == 1 and int(new_state.count) == 0


@pytest.mark.parametrize("read", [True, False], ids=["predicate-read", "element-wise"])
@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_unless_skipped_selects_once_and_keeps_the_state_of_a_skipped_step(on_nonfinite, read):
    """Non-finite rule (specs README, rule 6) [derived]: an entry a method selects with
    ``ctx.unless_skipped`` is stored as returned (the transform does not select it a second time,
    an extra pass per entry), an entry it returns unselected is selected by the transform, and on a
    skipped step both keep their old values. Under ``on_nonfinite="raise"`` nothing is skipped, so
    ``unless_skipped`` is the identity; so it is, and the transform selects nothing, on a step
    whose skip predicate was read on the host and found true (NumPy: reading is free), where a
    selection would return its first operand. ``read=False`` runs the same arrays through
    ``tests/sync_guard.py``'s namespace, whose values the core never reads: the element-wise rule."""
    import sync_guard

    returned = {}
    wrap = (lambda x: x) if read else sync_guard.wrap

    def init_group(leaves, paths, xp):
        return {"a": xp.zeros(leaves[0].shape), "b": xp.zeros(leaves[0].shape)}

    def update_group(grads, state, params, ctx):
        a = ctx.unless_skipped(state["a"] + grads[0], state["a"])
        b = state["b"] + 2 * grads[0]
        returned.update(a=a, b=b, ok=ctx.ok)
        return (-a,), {"a": a, "b": b}

    t = build_transform(name="t", init_group=init_group, update_group=update_group, on_nonfinite=on_nonfinite)
    if not read and on_nonfinite == "raise":
        pytest.skip("on_nonfinite='raise' reads the predicate")
    state = t.init(wrap({"w": np.zeros(3)}))
    _, state = t.update(wrap({"w": np.ones(3)}), state)
    assert state.groups["w"]["a"] is returned["a"]
    assert (state.groups["w"]["b"] is returned["b"]) == (on_nonfinite == "raise" or read)
    np.testing.assert_array_equal(sync_guard.unwrap(state.groups["w"]["b"]), 2.0)
    if on_nonfinite == "raise":
        assert returned["ok"] is None
        return
    before = {k: np.array(sync_guard.unwrap(v)) for k, v in state.groups["w"].items()}
    updates, state = t.update(wrap({"w": np.array([1.0, np.nan, 1.0])}), state)
    for k in ("a", "b"):
        np.testing.assert_array_equal(sync_guard.unwrap(state.groups["w"][k]), before[k])
    np.testing.assert_array_equal(sync_guard.unwrap(updates["w"]), 0.0)
    assert int(sync_guard.unwrap(state.nonfinite_count)) == 1


def test_a_finite_step_read_on_the_host_still_selects_an_entry_that_is_not_dense():
    """A step known on the host to be applied drops the skip's selections, except of an array that
    is not dense (a column slice): its selection writes it out anew in another layout, which the
    next step's products may round differently (S-AdaGrad's basis, tests/test_sync_free.py), so it
    is kept, and later steps give the numbers of the element-wise rule bit for bit."""
    returned = {}

    def init_group(leaves, paths, xp):
        return {"s": xp.zeros((leaves[0].shape[0], 2)), "d": xp.zeros(leaves[0].shape)}

    def update_group(grads, state, params, ctx):
        wide = ctx.xp.stack([grads[0], 2 * grads[0], 3 * grads[0]], axis=1)
        s = wide[:, :2]  # a view with a gap between its rows
        d = state["d"] + grads[0]
        returned.update(s=s, d=d)
        return (-d,), {"s": s, "d": d}

    t = build_transform(name="t", init_group=init_group, update_group=update_group)
    state = t.init({"w": np.zeros(3)})
    _, state = t.update({"w": np.ones(3)}, state)
    assert not returned["s"].flags.c_contiguous
    assert state.groups["w"]["s"] is not returned["s"] and state.groups["w"]["s"].flags.c_contiguous
    np.testing.assert_array_equal(state.groups["w"]["s"], returned["s"])
    assert state.groups["w"]["d"] is returned["d"]


def test_elementwise_method_runs_small_leaves_as_one_flat_leaf(backend, monkeypatch):
    """``build_transform(elementwise=True)`` [derived]: leaves of at most FLAT_MAX_ELEMENTS
    elements with one dtype layout go through ``update_group`` as one flat leaf, the others alone;
    every leaf gets its own updates and state back in its own shape, and an untouched entry is the
    leaf's own array."""
    import precond_ref.engine.joined as transform_module

    monkeypatch.setattr(transform_module, "FLAT_MAX_ELEMENTS", 8)
    monkeypatch.setattr(transform_module, "FLAT_MAX_TRACED_ELEMENTS", 8)
    seen = []

    def init_group(leaves, paths, xp):
        return {"m": xp.zeros_like(leaves[0]), "fixed": xp.ones_like(leaves[0])}

    def update_group(grads, state, params, ctx):
        seen.append(tuple(grads[0].shape))
        m = ctx.unless_skipped(state["m"] + grads[0], state["m"])
        return (-m,), {"m": m, "fixed": state["fixed"]}

    t = build_transform(name="t", init_group=init_group, update_group=update_group, elementwise=True)
    shapes = {"a": (2, 3), "b": (4,), "c": (3, 3), "d": (1,), "e": (0,)}
    params = backend.tree({k: np.zeros(s) for k, s in shapes.items()})
    state = t.init(params)
    fixed = state.groups["a"]["fixed"]
    grads = {k: np.arange(np.prod(s), dtype=np.float64).reshape(s) + 1 for k, s in shapes.items()}
    updates, state = t.update(backend.tree(grads), state)
    assert sorted(seen) == [(3, 3), (11,)]  # c (9 > 8) alone; a, b, d flat; e (empty) skipped
    got = backend.numpy_tree(updates)
    for k in shapes:
        np.testing.assert_array_equal(got[k], -grads[k])
    for k in "abcd":
        np.testing.assert_array_equal(backend.to_numpy(state.groups[k]["m"]), grads[k])
    assert state.groups["e"] == {}
    assert state.groups["a"]["fixed"] is fixed


def test_flat_leaves_pack_only_leaves_whose_state_has_the_same_entries(monkeypatch):
    """An ``elementwise`` method's leaves go into one flat leaf only when their states have the same
    entry names (and dtypes): a leaf's entry is its own entry, never another's of the same dtype
    [derived: the flat leaf's state takes each entry by name]. Here 1-D leaves keep ``v`` and the
    2-D leaf ``w`` (all float64): ``a`` and ``c`` form one flat leaf, ``b`` runs alone, and every
    leaf comes back with its own entry and the numbers of its own step."""
    import precond_ref.engine.joined as transform_module

    monkeypatch.setattr(transform_module, "FLAT_MAX_ELEMENTS", 100)
    seen = []

    def init_group(leaves, paths, xp):
        name = "v" if leaves[0].ndim == 1 else "w"
        return {name: xp.zeros_like(leaves[0]) + leaves[0].ndim}

    def update_group(grads, state, params, ctx):
        seen.append(tuple(grads[0].shape))
        (name,) = state
        new = state[name] + grads[0]
        return (-new,), {name: new}

    t = build_transform(name="t", init_group=init_group, update_group=update_group, elementwise=True)
    shapes = {"a": (2,), "b": (2, 2), "c": (3,)}
    state = t.init({k: np.zeros(s) for k, s in shapes.items()})
    grads = {k: np.full(s, 10.0 * (i + 1)) for i, (k, s) in enumerate(shapes.items())}
    updates, state = t.update(grads, state)
    assert sorted(seen) == [(2, 2), (5,)]  # a+c flat (v); b (w) alone
    for k, s in shapes.items():
        name = "v" if len(s) == 1 else "w"
        assert list(state.groups[k]) == [name]
        np.testing.assert_array_equal(state.groups[k][name], grads[k] + len(s))
        np.testing.assert_array_equal(updates[k], -(grads[k] + len(s)))


@pytest.mark.parametrize("factory", [pr.agd, pr.rf_rmsprop, pr.rf_adamw])
def test_flat_leaves_give_the_numbers_of_leaf_by_leaf_updates(backend, factory, monkeypatch):
    """The flat leaf of an element-wise method (``build_transform(elementwise=True)``) changes
    nothing but how the step runs [derived: every entry's arithmetic reads only the same entry].
    Three steps on a tree of small leaves of two dtypes (two flat leaves) and a larger leaf, the
    second step with a NaN in one small leaf (the whole step is skipped), against the same method
    with packing off. NumPy and array_api_strict evaluate the same operations per entry, so they
    agree exactly. Elsewhere an entry may fall in a vector loop in one layout and in a scalar
    remainder loop in the other, or a compiler may contract a product and a sum into one fused
    multiply-add in one loop and not another: each changes an operation's result by at most one
    rounding, and the steps' states carry a few dozen such operations (64 eps of each dtype,
    relative)."""
    import precond_ref.engine.joined as transform_module

    rng = np.random.default_rng(4)
    shapes = {"w1": (5, 3), "b1": (5,), "w2": (40, 30), "b2": (40,), "h1": (3, 2), "h2": (4,)}
    dtypes = {k: np.float64 if k.startswith("h") and backend.has_float64 else np.float32 for k in shapes}
    params = {k: rng.standard_normal(s).astype(dtypes[k]) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtypes[k]) for k, s in shapes.items()} for _ in range(3)]
    grads[1]["b1"][2] = np.nan
    kwargs = {"learning_rate": 0.01, "weight_decay": 0.1}
    extra = {"batch_size": 8} if factory is not pr.agd else {}

    def run(flat_max):
        monkeypatch.setattr(transform_module, "FLAT_MAX_ELEMENTS", flat_max)
        monkeypatch.setattr(transform_module, "FLAT_MAX_TRACED_ELEMENTS", flat_max)
        opt = factory(**kwargs)
        p = backend.tree(params)
        state = opt.init(p)
        for g in grads:
            u, state = opt.update(backend.tree(g), state, p, **extra)
            p = pr.apply_updates(p, u)
        return backend.numpy_tree(p), {k: backend.numpy_tree(v) for k, v in state.groups.items()}, int(state.nonfinite_count)

    flat_p, flat_s, flat_skips = run(100)  # w2 (1200 entries) alone
    ref_p, ref_s, ref_skips = run(0)
    assert flat_skips == ref_skips == 1
    exact = backend.name in ("numpy", "array_api_strict")
    for k in shapes:
        tol = 0 if exact else 64 * np.finfo(dtypes[k]).eps
        np.testing.assert_allclose(flat_p[k], ref_p[k], rtol=tol, atol=0)
        for name in ref_s[k]:
            np.testing.assert_allclose(flat_s[k][name], ref_s[k][name], rtol=tol, atol=0)


# Element-wise methods, and each matrix method's element-wise part, as they run eagerly (NumPy,
# CuPy, torch without compilation).
_EAGER_ELEMENTWISE = {
    "agd": lambda: pr.agd(learning_rate=1e-2, weight_decay=1e-2),
    "agd-win": lambda: pr.agd(learning_rate=1e-2, win=True, weight_decay=1e-2),
    "dasgo": lambda: pr.dasgo(),
    "dasgo-no-rms": lambda: pr.dasgo(rms_target=None),
    "asgo-fallback": lambda: pr.asgo(fallback_mask=lambda path, leaf: True),
    "rf_rmsprop": lambda: pr.rf_rmsprop(learning_rate=1e-2, batch_size=8, weight_decay=1e-2),
    "rf_adamw": lambda: pr.rf_adamw(learning_rate=1e-2, batch_size=8, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", sorted(_EAGER_ELEMENTWISE))
def test_eager_step_does_no_whole_array_copy_or_fill(name):
    """An eager step writes no whole array that computes nothing [derived: on a GPU each such
    array is a kernel pass over memory, and nothing fuses them away]: no same-dtype ``astype``
    copy (``transform.cast`` instead) and no ``zeros_like`` operand of a selection
    (``transform.scalar_zero`` instead), counted by torch's dispatcher over leaf-sized results.
    Conversions to another dtype (DASGO's float64 renormalisation) are work and not counted."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    size = 64 * 96
    wasted = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            copy = name in ("_to_copy", "clone") and out.dtype == args[0].dtype  # a conversion is work
            fill = name in ("zeros_like", "ones_like", "full", "full_like", "fill_")
            if (copy or fill) and out.numel() >= size:
                wasted.append(name)
            return out

    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(64, 96, generator=generator)}
    grads = {"w": torch.randn(64, 96, generator=generator)}
    transform = _EAGER_ELEMENTWISE[name]()
    state = transform.init(params)
    for step in range(3):
        if step == 2:
            with Watch():
                updates, state = transform.update(grads, state, params, step=step)
        else:
            updates, state = transform.update(grads, state, params, step=step)
        params = pr.apply_updates(params, updates)
    assert wasted == []


@pytest.mark.parametrize("name", ["asgo", "dasgo", "mbf"])
def test_per_step_scalars_are_made_once_per_update(name):
    """A further bias vector adds only the 0-D work of its own arrays to an eager step [derived: a
    bias correction, the learning rate as an array and the skip's zero depend on the step, the
    dtype and the device, not on a leaf, so :meth:`StepContext.once` makes each once per update].
    Counted by torch's dispatcher over 0-D results between models with 2 and 6 bias vectors (the
    matrix methods' fallback Adam, MBF's diagonal rule): a leaf keeps none (the skip test's sums of
    squares are one ``_foreach_powsum`` for all leaves, which returns a list; MBF's ``-lr`` is made
    once per update)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.scalars = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.scalars += isinstance(out, torch.Tensor) and out.ndim == 0
            return out

    def scalars_per_step(biases):
        generator = torch.Generator().manual_seed(0)
        params = {"w": torch.randn(6, 5, generator=generator), **{f"b{i}": torch.randn(7, generator=generator) for i in range(biases)}}
        grads = {k: torch.randn(p.shape, generator=generator) for k, p in params.items()}
        transform = getattr(pr, name)(learning_rate=1e-3)
        _, state = transform.update(grads, transform.init(params), params, step=0)
        with Count() as count:
            transform.update(grads, state, params, step=1)
        return count.scalars

    per_leaf = (scalars_per_step(6) - scalars_per_step(2)) / 4
    assert per_leaf == 0


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_NAMES)
def test_leafwise_equals_the_function_leaf_by_leaf(backend):
    """``transform.leafwise(xp, fn, leaves, zeros=zeros) == [fn(x, z) for x, z in zip(leaves, zeros)]``
    exactly, for the element-wise functions the transform gives it (a selection against a 0-D zero,
    then the finite test): leaves of two dtypes (joined apart), a transposed (non-dense) one, a 0-D
    one and an empty one, each returned in its own shape and dtype; NaN and infinities placed in
    several leaves. And for a function of two operands returning two arrays (a momentum step's
    form), ``leafwise(xp, f, a, b)[i] == f(a[i], b[i])``."""
    from precond_ref._backend import finite_or_zero, scalar_zero, select
    from precond_ref.transform import leafwise

    xp, rng = backend.xp, np.random.default_rng(0)
    raw = [rng.standard_normal((3, 4)), rng.standard_normal((5,)), rng.standard_normal((4, 2)).T,
           np.asarray(2.5), np.zeros((0, 3)), rng.standard_normal((2, 2, 2))]
    raw[0][1, 2], raw[1][0], raw[5][1, 0, 1] = np.nan, np.inf, -np.inf
    leaves = [backend.asarray(a.astype(np.float32 if i % 2 else np.float64)) for i, a in enumerate(raw)]
    ok = xp.asarray(False)

    zeros = [scalar_zero(xp, x) for x in leaves]
    finite = lambda u, zero: finite_or_zero(xp, u, zero)  # noqa: E731
    skipped = lambda u, zero: select(xp, ok, u, zero)  # noqa: E731
    for f in (finite, skipped, lambda u, zero: finite(skipped(u, zero), zero), lambda u, zero: u * 2.0):
        got, expected = leafwise(xp, f, leaves, zeros=zeros), [f(x, z) for x, z in zip(leaves, zeros)]
        for g, e, x in zip(got, expected, leaves):
            assert tuple(g.shape) == tuple(x.shape) and g.dtype == x.dtype
            np.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(e))
    others = [x * 0.5 - 1.0 for x in leaves]
    two = lambda a, b: (a * 0.75 + b, a - b * 3.0)  # noqa: E731
    with np.errstate(invalid="ignore"):  # inf - inf where the infinities are placed: NaN, on purpose
        pairs = list(zip(leafwise(xp, two, leaves, others), [two(a, b) for a, b in zip(leaves, others)], leaves))
    for (g1, g2), (e1, e2), x in pairs:
        for g, e in ((g1, e1), (g2, e2)):
            assert tuple(g.shape) == tuple(x.shape) and g.dtype == x.dtype
            np.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(e))


def test_independent_leaves_let_adapters_step_leaf_by_leaf():
    """``build_transform(independent_leaves=True)`` says to adapters that a tree's update is its
    leaves' updates, each called alone given the tree's skip decision
    (``engine.run.steps_leaf_by_leaf``: DASGO), with ``on_nonfinite="skip"`` only (``"raise"``
    reads the host on each call); not by default (ASGO, element-wise rules). A rule of
    independent leaves has one leaf per group: other groupings raise ``TypeError``."""
    from precond_ref.engine import build_transform
    from precond_ref.engine.run import steps_leaf_by_leaf
    from precond_ref.transform import weight_bias_groups

    assert steps_leaf_by_leaf(pr.dasgo())
    assert not steps_leaf_by_leaf(pr.dasgo(on_nonfinite="raise"))
    assert not steps_leaf_by_leaf(pr.asgo()) and not steps_leaf_by_leaf(pr.agd())

    def step(g, s, p, ctx):
        return g, s

    made = build_transform(name="plain", init_group=lambda leaves, paths, xp: {}, update_group=step)
    assert not steps_leaf_by_leaf(made)
    with pytest.raises(TypeError, match="independent_leaves=True needs the default singleton groups"):
        build_transform(name="pairs", init_group=lambda leaves, paths, xp: {}, update_group=step,
                        group_leaves=weight_bias_groups, independent_leaves=True)


def test_a_given_skip_decision_replaces_the_test_of_the_gradients():
    """``update(..., gradients_ok=ok)``: the step takes the skip decision of the larger tree it is
    part of (a leaf stepped alone, ``independent_leaves``) instead of testing its own gradients
    (specs README §4.6, one decision per step): a false one skips a finite gradient (zero update,
    state kept, ``nonfinite_count`` advanced), a true one gives the step of the plain call
    bit for bit; with ``on_nonfinite="raise"`` it is refused."""
    import torch

    opt = pr.dasgo(learning_rate=0.1)
    params = {"w": torch.randn(6, 4, dtype=torch.float64)}
    grads = {"w": torch.randn(6, 4, dtype=torch.float64)}
    state = opt.init(params)
    plain, plain_state = opt.update(grads, state, params)
    given, given_state = opt.update(grads, state, params, gradients_ok=torch.tensor(True))
    assert torch.equal(plain["w"], given["w"]) and int(given_state.count) == 1
    skipped, kept = opt.update(grads, state, params, gradients_ok=torch.tensor(False))
    assert bool((skipped["w"] == 0).all()) and int(kept.count) == 0 and int(kept.nonfinite_count) == 1
    for name, old in state.groups["w"].items():
        assert torch.equal(kept.groups["w"][name], old)
    with pytest.raises(ValueError, match="gradients_ok is the skip decision of on_nonfinite='skip'"):
        pr.dasgo(on_nonfinite="raise").update(grads, state, params, gradients_ok=torch.tensor(True))


@pytest.mark.parametrize("name", ["agd", "asgo", "dasgo", "mbf", "rf_rmsprop", "rf_adamw", "if_shampoo", "sketchy", "s_adagrad"])
def test_two_leaves_of_one_name_are_refused(name):
    """A block's state is stored under its leaf's path joined by '/' (``path_str``): two leaves
    whose paths join to one name (a key holding '/', or the keys 1 and '1') would share one state
    entry, each step reading and overwriting the other's. ``init`` refuses such a tree, naming
    both paths; they used to share the state silently (the update of one leaf went to both)."""
    x = np.ones((3, 2))
    for params, paths in (({"a/b": x, "a": {"b": x}}, r"\('a', 'b'\) and \('a/b',\)"), ({1: x, "1": x}, r"\(1,\) and \('1',\)")):
        with pytest.raises(ValueError, match=rf"^{name}: params leaves {paths} have the same name"):
            getattr(pr, name)(**({"batch_size": 4} if name in ("rf_adamw", "if_shampoo") else {})).init(params)


@pytest.mark.parametrize("step, error, words", [
    (1.5, TypeError, "got 1.5"), (True, TypeError, "got True"), ("0", TypeError, "got '0'"),
    (-5, ValueError, "at least 0, got -5"), (np.zeros(2, np.int64), TypeError, "shape (2,)"),
    (np.float64(3.0), TypeError, "dtype float64"),
])
def test_a_step_that_is_no_call_number_is_refused_naming_step(step, error, words):
    """``update(..., step=i)`` and ``due(i)`` take ``i``, the number of earlier calls (Transform's
    docstring): an integer of at least 0 or a 0-D integer array. Anything else is refused naming
    ``step``: a float passed the interval's ``%`` (1.5 made the first call's refresh not due, with
    no error), a string failed inside it with Python's formatting error, a negative one was taken."""
    p = {"w": np.ones((3, 4))}
    opt = pr.asgo(learning_rate=1e-2, precondition_every=5)
    for call in (lambda: opt.update(p, opt.init(p), p, step=step), lambda: opt.due(step)):
        with pytest.raises(error, match="asgo: step must be the number of earlier calls") as caught:
            call()
        assert words in str(caught.value)
    opt.update(p, opt.init(p), p, step=np.int64(3))  # a NumPy integer is a call number
    assert opt.due(np.asarray(5)) == opt.due(5)  # and so is a 0-D integer array


@pytest.mark.parametrize("due, error, words", [(True, TypeError, "got bool True"), ((True, False), ValueError, "has 2")])
def test_due_that_is_not_the_tuple_due_returns_is_refused_naming_due(due, error, words):
    """``update(..., due=...)`` takes the tuple ``due(i)`` returns, one decision per declared
    interval; a bare bool failed with ``object of type 'bool' has no len()``, naming nothing."""
    p = {"w": np.ones((3, 4))}
    opt = pr.asgo(learning_rate=1e-2, precondition_every=5)
    with pytest.raises(error, match="asgo: due ") as caught:
        opt.update(p, opt.init(p), p, due=due)
    assert words in str(caught.value)


@pytest.mark.parametrize("name", ["asgo", "rf_adamw"])
def test_an_update_keyword_no_method_reads_is_refused_naming_the_closest(name):
    """``update``'s keywords beyond ``step``, ``due`` and ``gradients_ok`` are the per-call inputs
    some methods read (``engine.options.UPDATE_KEYWORDS``: ``batch_size``). Any other was ignored,
    so a misspelt ``batch_sise=8`` left the factory's batch size (or none) in force with no error.
    It is refused naming the method and the closest keyword; ``batch_size`` itself is taken by
    every method (one loop can pass it to any), and changes nothing where the method reads no B."""
    p = {"w": np.ones((3, 4))}
    opt = getattr(pr, name)(**({"batch_size": 4} if name == "rf_adamw" else {}))
    state = opt.init(p)
    with pytest.raises(TypeError, match=rf"^{name}: update\(\) got an unexpected keyword argument 'batch_sise'; "
                                        r"did you mean 'batch_size'\?"):
        opt.update(p, state, p, batch_sise=8)
    with pytest.raises(TypeError, match=r"argument 'lr'; it takes step, due, gradients_ok, batch_size"):
        opt.update(p, state, p, lr=1e-2)
    given, _ = opt.update(p, state, p, batch_size=4)
    plain, _ = opt.update(p, state, p)
    assert np.array_equal(given["w"], plain["w"])
