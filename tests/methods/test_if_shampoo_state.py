"""IF-Shampoo's state as named fields (issue 32): a group's state is an ``_IFShampooState`` of
``_TileFactors``, stored as the flat entries of their paths, and checkpoints saved under the
formatted keys of earlier versions (``factor_n``, ``tile_t/factor_n``, ``momentum_n``, ...) keep
loading: the fixtures in tests/data (made by ``tests/data/if_shampoo_legacy_make.py`` with the code of
2fdbd40) step on to the parameters that code reached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.methods import root_free
from precond_ref.transform import PrecondState
from precond_ref.tree import from_entries, path_str, to_entries, tree_flatten, tree_unflatten
from loading import load_file

DATA = Path(__file__).parent.parent / "data"
# float64 parameters of size O(1): the old code's operations, which another BLAS rounds differently by
# a few ulps each; over <= 4 steps of products of <= 8-dimensional factors that is below ~1e-13
# (k * d * eps per step with k ~ 10 operations in a chain, d <= 8, eps = 2.2e-16), so 1e-12 has a
# margin of 10 and still fails for any renaming mistake (an entry swapped moves a step by O(lr)).
TOL = 1e-12


def _maker():
    return load_file("if_shampoo_legacy_make", DATA / "if_shampoo_legacy_make.py")


def test_state_entries_are_the_paths_of_its_named_fields():
    """A blocked weight+bias group (8 x 6 weight and its bias: (8, 7) cut at 4 into 2 x 2 tiles,
    the last column of tiles 3 wide) and an unblocked vector: the entries are the paths of
    ``_IFShampooState`` (``tiles/t/factor/n`` of tile t's shape on axis n, ``momentum/i`` per
    member), and they read back into those fields exactly."""
    params = {"l": {"weight": np.zeros((8, 6)), "bias": np.zeros(8)}, "s": np.zeros(3)}
    opt = pr.if_shampoo(batch_size=2, block_size=4, grouping="weight_bias")
    groups = opt.init(params).groups
    entries = groups["l/weight"]
    assert sorted(entries) == sorted(
        ["factor_failures", "momentum/0", "momentum/1"]
        + [f"tiles/{t}/{name}/{n}" for t in range(4) for name in ("factor", "factor_momentum") for n in range(2)])
    widths = {"tiles/0/factor/1": 4, "tiles/1/factor/1": 3, "tiles/2/factor/1": 4, "tiles/3/factor/1": 3}
    for key, d in widths.items():
        assert entries[key].shape == (d, d), key
    assert sorted(groups["s"]) == ["factor_failures", "momentum/0", "tiles/0/factor/0", "tiles/0/factor_momentum/0"]
    template = root_free._IFShampooState(
        tiles=(root_free._TileFactors(factor=(0, 0), factor_momentum=(0, 0)),) * 4,
        momentum=(0, 0), preconditioner_lr_scale=None, factor_failures=0)
    fields = from_entries(template, entries)
    assert fields.tiles[3].factor[1] is entries["tiles/3/factor/1"] and fields.momentum[1] is entries["momentum/1"]
    assert to_entries(fields) == entries


def test_legacy_entry_names_give_every_old_key_its_field_path():
    """``_legacy_entry_names`` renames each key of the old layouts (unblocked ``factor_n``,
    ``factor_momentum_n``; blocked ``tile_t/factor_n``, ``tile_t/factor_momentum_n``;
    ``momentum_i``) to its path, keeps the names that did not change, maps the very same arrays,
    and returns a state under the current names as the very dict (no renaming cost)."""
    a, b, c, d, e, f = (object() for _ in range(6))
    old_unblocked = {"factor_0": a, "factor_momentum_0": b, "momentum_0": c, "factor_failures": d,
                     "preconditioner_lr_scale": e}
    assert root_free._legacy_entry_names(old_unblocked) == {
        "tiles/0/factor/0": a, "tiles/0/factor_momentum/0": b, "momentum/0": c, "factor_failures": d,
        "preconditioner_lr_scale": e}
    old_blocked = {"tile_0/factor_0": a, "tile_11/factor_1": b, "tile_11/factor_momentum_1": c,
                   "momentum_1": f}
    assert root_free._legacy_entry_names(old_blocked) == {
        "tiles/0/factor/0": a, "tiles/11/factor/1": b, "tiles/11/factor_momentum/1": c, "momentum/1": f}
    current = {"tiles/0/factor/0": a, "momentum/0": c, "factor_failures": d}
    assert root_free._legacy_entry_names(current) is current


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_torch_checkpoint_with_the_old_names_steps_on_like_the_old_code(mode):
    """A torch ``state_dict`` saved by 2fdbd40 (float64; principled: block_size=4 with ragged and
    equal tiles, an unblocked vector, weight+bias groups; faithful: unblocked) loads into the new
    code (``load_state_dict`` renames before validating) and the next 4 steps give the
    parameters the old code gave, to 1e-12 (the same operations in the same order)."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters import torch as pt

    make = _maker()
    saved = torch.load(DATA / "if_shampoo_legacy_torch.pt", weights_only=True)
    model = make.Tiny()
    with torch.no_grad():
        for p, value in zip(model.parameters(), saved[mode]["params"]):
            p.copy_(value)
    opt = pt.IFShampoo(model.named_parameters(), lr=1e-2, batch_size=make.BATCH, grouping="weight_bias",
                       **make.TORCH_KW[mode])
    opt.load_state_dict(saved[mode]["state_dict"])
    after = make.train(model, opt, saved["batches"])
    for step, (got, want) in enumerate(zip(after, saved[mode]["after"])):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=TOL, err_msg=f"step {step}")
    entries = opt.state_dict()["state"][1]  # l1's weight+bias group, (8, 7) in 4 tiles (principled)
    assert ("tiles/3/factor/1" in entries) == (mode == "principled") and "factor_0" not in entries
    assert "tiles/0/factor/1" in entries and "momentum/1" in entries


def _core_checkpoint(asarray):
    saved = np.load(DATA / "if_shampoo_legacy_core.npz")
    groups: dict = {}
    for key in saved.files:
        if key.startswith("state::"):
            _, group, name = key.split("::")
            groups.setdefault(group, {})[name] = asarray(saved[key])
    state = PrecondState(asarray(saved["count"]), asarray(saved["nonfinite_count"]), groups)
    return saved, state


def _core_params(saved, tag, asarray):
    treedef = tree_flatten(_maker().core_params())[1]
    return tree_unflatten(treedef, [asarray(saved[f"{tag}::{path_str(p)}"]) for p in treedef.paths])


def test_core_state_with_the_old_names_steps_on_like_the_old_code():
    """The core ``PrecondState`` (NumPy) saved by 2fdbd40 under the old names (block_size=4,
    weight+bias grouping) steps on through ``update`` (``legacy_names`` renames it) to the
    parameters the old code reached, to 1e-12; the state it returns has the current names."""
    make = _maker()
    saved, state = _core_checkpoint(np.asarray)
    params = _core_params(saved, "params", np.asarray)
    opt = pr.if_shampoo(learning_rate=1e-2, batch_size=make.BATCH, block_size=4, grouping="weight_bias")
    for k in range(make.K):
        updates, state = opt.update(make.grads(params, make.N0 + k), state, params)
        params = pr.apply_updates(params, updates)
        want = _core_params(saved, f"after{k}", np.asarray)
        for (path, got), expected in zip(zip(tree_flatten(params)[1].paths, tree_flatten(params)[0]),
                                         tree_flatten(want)[0]):
            np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"step {k} {path_str(path)}")
    assert "tiles/3/factor/1" in state.groups["l1/weight"] and "momentum_0" not in state.groups["scale"]


def test_optax_state_with_the_old_names_steps_on_under_jit():
    """The same checkpoint as an optax state (``PrecondState`` of JAX arrays, as a restored
    checkpoint gives it) through the optax adapter under ``jax.jit``: the old code's parameters
    to 1e-12 (x64 is on for the suite)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from precond_ref.adapters import jax as pjax

    make = _maker()
    saved, state = _core_checkpoint(jnp.asarray)
    params = _core_params(saved, "params", jnp.asarray)
    opt = pjax.if_shampoo(learning_rate=1e-2, batch_size=make.BATCH, block_size=4, grouping="weight_bias")
    step = jax.jit(opt.update)
    for k in range(make.K):
        grads = make.grads(jax.tree_util.tree_map(np.asarray, params), make.N0 + k)
        updates, state = step(jax.tree_util.tree_map(jnp.asarray, grads), state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        want = _core_params(saved, f"after{k}", np.asarray)
        for got, expected in zip(tree_flatten(jax.tree_util.tree_map(np.asarray, params))[0], tree_flatten(want)[0]):
            np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"step {k}")
    assert "tiles/0/factor/0" in state.groups["scale"]
