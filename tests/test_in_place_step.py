"""The in-place step of the element-wise rules (``precond_ref.engine.elementwise.in_place_step``):
what an adapter that writes arrays in place runs, one call of a per-leaf function per large leaf
and per pack of small ones, instead of ``update``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import precond_ref as pr
from precond_ref.engine.elementwise import EAGER_WRITES, Writes, in_place_step

FACTORIES = {
    "agd": lambda: pr.agd(learning_rate=1e-2),
    "agd-decoupled-amsgrad-clip": lambda: pr.agd(learning_rate=1e-2, weight_decay=0.1, amsgrad=True, clip=0.5),
    "agd-faithful-win": lambda: pr.agd(learning_rate=1e-2, weight_decay=0.1, win=True, mode="faithful"),
    "rf_rmsprop-momentum-decay": lambda: pr.rf_rmsprop(learning_rate=1e-2, batch_size=8, momentum=0.9, weight_decay=1e-3),
    "rf_adamw-bias-correction": lambda: pr.rf_adamw(learning_rate=1e-3, batch_size=8, weight_decay=0.1, bias_correction=True),
}
# Leaves above the pack limit (alone, written through their flat views), small ones of two shapes
# and a 0-D one (one pack), a zero-size one, and a large transposed one (not dense: alone, written
# into a copy).
SHAPES = {"big": (130, 140), "vec": (7,), "mat": (5, 3), "scalar": (), "empty": (0, 3), "long": (20000,)}


def _tree(lib, dtype, seed):
    rng = np.random.default_rng(seed)
    tree = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    tree["transposed"] = rng.standard_normal((150, 120)).astype(dtype).T
    return {k: torch.from_numpy(v) for k, v in tree.items()} if lib == "torch" else tree


def _run(factory, lib, dtype, in_place, writes=EAGER_WRITES, steps=4):
    tx = factory()
    params = _tree(lib, dtype, 0)
    state = tx.init(params)
    for step in range(steps):
        grads = _tree(lib, dtype, step + 1)
        if step == 2:  # a skipped step: a NaN in one leaf
            grads["vec"][3] = np.nan
        if in_place:
            state = in_place_step(tx)(grads, state, params, writes, batch_size=8)
        else:
            updates, state = tx.update(grads, state, params, batch_size=8)
            for k in params:
                params[k] = params[k] + updates[k]
    return params, state


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_in_place_step_equals_update_added_to_the_parameters(name, dtype, lib):
    """``in_place_step``'s contract (its docstring): the parameters after it are those ``update``'s
    updates give added to them, and its state is ``update``'s, bit for bit (the same rule on the
    same numbers: the selections by the step's non-finite test select the computed value on an
    applied step and the old one on a skipped step either way); counters included, a NaN step
    (skipped) among four."""
    want_params, want_state = _run(FACTORIES[name], lib, dtype, in_place=False)
    got_params, got_state = _run(FACTORIES[name], lib, dtype, in_place=True)
    assert int(got_state.count) == int(want_state.count) == 3 and int(got_state.nonfinite_count) == 1
    for k in want_params:
        np.testing.assert_array_equal(np.asarray(got_params[k]), np.asarray(want_params[k]), err_msg=k)
        assert want_state.groups[k].keys() == got_state.groups[k].keys()
        for entry, value in want_state.groups[k].items():
            np.testing.assert_array_equal(np.asarray(got_state.groups[k][entry]), np.asarray(value), err_msg=f"{k}.{entry}")


def test_one_call_per_large_leaf_and_per_pack_all_of_one_function():
    """A step is one call per leaf above the pack limit (here ``big`` and ``long``) and one per
    pack of small leaves of one dtype layout (``vec``, ``mat``, ``scalar``), the not-dense leaf
    (``transposed``) alone too, nothing for the zero-size one; every call has the same key and
    1-D operands (one compiled function serves every length), and the packed and not-dense
    leaves' results come back in one ``copy``."""
    calls, copies = [], []

    def kernel(key, fn, operands):
        calls.append((key, fn, tuple(a.shape for a in operands[2:])))
        EAGER_WRITES.kernel(key, fn, operands)

    def copy(targets, sources):
        copies.append(len(targets))
        EAGER_WRITES.copy(targets, sources)

    _run(FACTORIES["agd"], "torch", np.float32, in_place=True, writes=Writes(kernel, copy), steps=1)
    assert sorted(shape[0] for _, _, (shape, *_) in calls) == [7 + 15 + 1, 150 * 120, 130 * 140, 20000]
    assert len({key for key, _, _ in calls}) == 1 and len({id(fn) for _, fn, _ in calls}) == 1
    assert all(len(s) == 1 for _, _, shapes in calls for s in shapes)
    assert copies == [4 * 3]  # parameter, m and b of vec, mat, scalar and transposed


def test_a_state_that_does_not_fit_is_left_to_update():
    """A state that does not fit the gradients (another tree, an entry of another shape) gets
    ``None`` and nothing written, so that ``update`` names the problem."""
    tx = pr.agd(learning_rate=1e-2)
    params = _tree("numpy", np.float32, 0)
    state = tx.init(params)
    before = {k: v.copy() for k, v in params.items()}
    grads = _tree("numpy", np.float32, 1)
    bad = state._replace(groups={**state.groups, "vec": {"m": np.zeros(8, np.float32), "b": np.zeros(8, np.float32)}})
    assert in_place_step(tx)(grads, bad, params) is None
    assert in_place_step(tx)({k: v for k, v in grads.items() if k != "vec"}, state, params) is None
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    with pytest.raises(ValueError, match="vec"):
        tx.update(grads, bad, params)


def test_raise_mode_names_the_leaf_and_writes_nothing():
    """``on_nonfinite="raise"``: ``FloatingPointError`` naming the leaf, as ``update`` does, before
    anything is written."""
    tx = pr.agd(learning_rate=1e-2, on_nonfinite="raise")
    params = _tree("numpy", np.float32, 0)
    state = tx.init(params)
    before = {k: v.copy() for k, v in params.items()}
    grads = _tree("numpy", np.float32, 1)
    grads["mat"][1, 1] = np.inf
    with pytest.raises(FloatingPointError, match="'mat'"):
        in_place_step(tx)(grads, state, params)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])


def test_only_the_elementwise_rules_have_an_in_place_step():
    assert in_place_step(pr.rf_adamw(batch_size=8)) is not None
    assert in_place_step(pr.asgo()) is None
