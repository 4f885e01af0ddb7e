"""IF-Shampoo's state as named fields: a group's state is an ``_IFShampooState`` of
``_StackFactors`` (its tiles' factors as stacks: one per tile shape and refresh phase), stored as
the flat entries of their paths, and checkpoints saved under the formatted keys of earlier
versions (``factor_n``, ``tile_t/factor_n``, ``momentum_n``, ...) or in the per-tile layout that
followed (``tiles/t/factor/n``) keep loading: the fixtures in tests/data (made by
``tests/data/if_shampoo_legacy_make.py`` and ``tests/data/if_shampoo_tiles_make.py``, each with the
older code it names) step on to the parameters that
code reached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.methods import root_free
from precond_ref.engine import checks
from precond_ref.transform import PrecondState
from precond_ref.tree import from_entries, path_str, to_entries, tree_flatten, tree_unflatten
from loading import load_file

DATA = Path(__file__).parent.parent / "data"
# float64 parameters of size O(1): the old code's operations, which another BLAS rounds differently by
# a few ulps each; over <= 4 steps of products of <= 8-dimensional factors that is below ~1e-13
# (k * d * eps per step with k ~ 10 operations in a chain, d <= 8, eps = 2.2e-16), so 1e-12 has a
# margin of 10 and still fails for any renaming mistake (an entry swapped moves a step by O(lr)).
TOL = 1e-12
# The fixtures were saved with a vector's factor dense, the default of their time (S12 made it
# diagonal); a run that steps on exactly as that code did passes it.
FORMER = dict(structures="dense")


def _maker(name: str = "if_shampoo_legacy_make"):
    return load_file(name, DATA / f"{name}.py")


def _torch_steps_on_like_the_old_code(optimizer, make, saved: dict, mode: str) -> dict:
    """Load a fixture's torch checkpoint into the maker's model and optimizer, take the fixture's
    steps, and check each step's parameters against the old code's to TOL; the state entries after."""
    import torch

    model = make.Tiny()
    with torch.no_grad():
        for p, value in zip(model.parameters(), saved[mode]["params"]):
            p.copy_(value)
    opt = optimizer(model.named_parameters(), lr=1e-2, batch_size=make.BATCH, grouping="weight_bias",
                    **make.TORCH_KW[mode])
    opt.load_state_dict(saved[mode]["state_dict"])
    after = make.train(model, opt, saved["batches"])
    for step, (got, want) in enumerate(zip(after, saved[mode]["after"])):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=TOL, err_msg=f"step {step}")
    return opt.state_dict()["state"][1]


def test_state_entries_are_the_paths_of_its_named_fields():
    """A blocked weight+bias group (8 x 6 weight and its bias: (8, 7) cut at 4 into 2 x 2 tiles,
    the last column of tiles 3 wide; refresh phases t % 2, so tiles 0, 2 (4 x 4) and 1, 3 (4 x 3)
    are one stack each) and an unblocked vector: the entries are the paths of ``_IFShampooState``
    (``stacks/s/factor/n`` of shape (tiles in stack s, d_n, d_n), ``momentum/i`` per member), and
    they read back into those fields exactly."""
    params = {"l": {"weight": np.zeros((8, 6)), "bias": np.zeros(8)}, "s": np.zeros(3)}
    opt = pr.if_shampoo(batch_size=2, block_size=4, grouping="weight_bias")
    groups = opt.init(params).groups
    entries = groups["l/weight"]
    assert sorted(entries) == sorted(
        ["failures", "momentum/0", "momentum/1"]
        + [f"stacks/{s}/{name}/{n}" for s in range(2) for name in ("factor", "factor_momentum") for n in range(2)])
    shapes = {"stacks/0/factor/0": (2, 4, 4), "stacks/0/factor/1": (2, 4, 4), "stacks/1/factor/0": (2, 4, 4),
              "stacks/1/factor/1": (2, 3, 3)}
    for key, shape in shapes.items():
        assert entries[key].shape == shape, key
    assert sorted(groups["s"]) == ["failures", "momentum/0", "stacks/0/factor/0", "stacks/0/factor_momentum/0"]
    template = root_free._IFShampooState(
        stacks=(root_free._StackFactors(factor=(0, 0), factor_momentum=(0, 0)),) * 2,
        momentum=(0, 0), preconditioner_lr_scale=None, failures=0)
    fields = from_entries(template, entries)
    assert fields.stacks[1].factor[1] is entries["stacks/1/factor/1"] and fields.momentum[1] is entries["momentum/1"]
    assert to_entries(fields) == entries


def test_stacked_tiles_give_every_old_key_its_field_path():
    """``stacked_tiles`` reads each key of the layouts before the per-tile paths (unblocked
    ``factor_n``, ``factor_momentum_n``: tile 0; blocked ``tile_t/factor_n``,
    ``tile_t/factor_momentum_n``; ``momentum_i``) as the per-tile layout's (``tiles/t/...``) and
    stacks it, keeps the names that did not change (the very same objects), and returns a state
    under the current names as the very dict (no renaming cost)."""
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    c, d, e = (object() for _ in range(3))
    old_unblocked = {"factor_0": A, "factor_momentum_0": B, "momentum_0": c, "factor_failures": d,
                     "preconditioner_lr_scale": e}
    got = checks.stacked_tiles(old_unblocked, 1, True)
    assert set(got) == {"stacks/0/factor/0", "stacks/0/factor_momentum/0", "momentum/0", "factor_failures",
                        "preconditioner_lr_scale"}
    np.testing.assert_array_equal(got["stacks/0/factor/0"], A[None])
    np.testing.assert_array_equal(got["stacks/0/factor_momentum/0"], B[None])
    assert got["momentum/0"] is c and got["factor_failures"] is d and got["preconditioner_lr_scale"] is e
    tiles = [rng.normal(size=(2, 2)) for _ in range(4)]
    old_blocked = {f"tile_{t}/factor_0": K for t, K in enumerate(tiles)} | {"momentum_1": c}
    got = checks.stacked_tiles(old_blocked, 2, True)  # four equal tiles, phases 0, 1, 0, 1
    assert set(got) == {"stacks/0/factor/0", "stacks/1/factor/0", "momentum/1"} and got["momentum/1"] is c
    np.testing.assert_array_equal(got["stacks/0/factor/0"], np.stack([tiles[0], tiles[2]]))
    np.testing.assert_array_equal(got["stacks/1/factor/0"], np.stack([tiles[1], tiles[3]]))
    current = {"stacks/0/factor/0": A[None], "momentum/0": c, "failures": d}
    assert checks.stacked_tiles(current, 1, True) is current


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_torch_checkpoint_with_the_old_names_steps_on_like_the_old_code(mode):
    """A torch ``state_dict`` saved under the formatted keys (float64; principled: block_size=4 with ragged and
    equal tiles, an unblocked vector, weight+bias groups; faithful: unblocked) loads into the new
    code (``load_state_dict`` renames before validating) and the next 4 steps give the
    parameters the old code gave, to 1e-12 (the same operations in the same order)."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters import torch as pt

    make = _maker()
    saved = torch.load(DATA / "if_shampoo_legacy_torch.pt", weights_only=True)
    entries = _torch_steps_on_like_the_old_code(pt.IFShampoo, make, saved, mode)  # l1's weight+bias group, (8, 7) in 4 tiles, 2 stacks (principled)
    assert ("stacks/1/factor/1" in entries) == (mode == "principled") and "factor_0" not in entries
    assert "stacks/0/factor/1" in entries and "momentum/1" in entries


def _core_checkpoint(asarray, fixture: str = "if_shampoo_legacy_core.npz"):
    saved = np.load(DATA / fixture)
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
    """The core ``PrecondState`` (NumPy) saved under the formatted keys (block_size=4,
    weight+bias grouping) steps on through ``update`` (``legacy_names`` renames it) to the
    parameters the old code reached, to 1e-12; the state it returns has the current names."""
    make = _maker()
    saved, state = _core_checkpoint(np.asarray)
    params = _core_params(saved, "params", np.asarray)
    opt = pr.if_shampoo(learning_rate=1e-2, batch_size=make.BATCH, block_size=4, grouping="weight_bias", **FORMER)
    for k in range(make.K):
        updates, state = opt.update(make.grads(params, make.N0 + k), state, params)
        params = pr.apply_updates(params, updates)
        want = _core_params(saved, f"after{k}", np.asarray)
        for (path, got), expected in zip(zip(tree_flatten(params)[1].paths, tree_flatten(params)[0]),
                                         tree_flatten(want)[0]):
            np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"step {k} {path_str(path)}")
    assert "stacks/1/factor/1" in state.groups["l1/weight"] and "momentum_0" not in state.groups["scale"]


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
    opt = pjax.if_shampoo(learning_rate=1e-2, batch_size=make.BATCH, block_size=4, grouping="weight_bias", **FORMER)
    step = jax.jit(opt.update)
    for k in range(make.K):
        grads = make.grads(jax.tree_util.tree_map(np.asarray, params), make.N0 + k)
        updates, state = step(jax.tree_util.tree_map(jnp.asarray, grads), state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        want = _core_params(saved, f"after{k}", np.asarray)
        for got, expected in zip(tree_flatten(jax.tree_util.tree_map(np.asarray, params))[0], tree_flatten(want)[0]):
            np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"step {k}")
    assert "stacks/0/factor/0" in state.groups["scale"]


def test_stacked_tiles_stacks_each_tile_of_one_shape_and_phase():
    """``stacked_tiles`` (``legacy_names``) turns the per-tile layout
    (``tiles/t/factor/n``) into the stacks ``init`` makes for the same group: a (10, 7) weight at
    block_size=4 has tiles 4x4, 4x3, 4x4, 4x3, 2x4, 2x3, phases t % 3, so tiles 0 (4x4, phase 0),
    1 (4x3, 1), 2 (4x4, 2), 3 (4x3, 0), 4 (2x4, 1), 5 (2x3, 2) are six stacks of one, and at
    precondition_every=1 four stacks (0, 2), (1, 3), (4,), (5,). Each stack is its tiles' arrays
    stacked in tile order; names that are not per-tile pass through; a current state is the very dict."""
    rng = np.random.default_rng(0)
    shapes = [(4, 4), (4, 3), (4, 4), (4, 3), (2, 4), (2, 3)]  # (d_0, d_1) of tiles 0..5 (10 x 7 cut at 4)
    per_tile = {f"tiles/{t}/{name}/{n}": rng.normal(size=(d, d))
                for t, dims in enumerate(shapes) for name in ("factor", "factor_momentum") for n, d in enumerate(dims)}
    per_tile.update({"momentum/0": rng.normal(size=(10, 7)), "failures": np.zeros((), np.int32)})
    for every, stacks in ((3, [(0,), (1,), (2,), (3,), (4,), (5,)]), (1, [(0, 2), (1, 3), (4,), (5,)])):
        got = checks.stacked_tiles(per_tile, every, True)
        assert got["momentum/0"] is per_tile["momentum/0"] and "failures" in got
        for s, tiles in enumerate(stacks):
            for name in ("factor", "factor_momentum"):
                for n in range(2):
                    want = np.stack([per_tile[f"tiles/{t}/{name}/{n}"] for t in tiles])
                    np.testing.assert_array_equal(got[f"stacks/{s}/{name}/{n}"], want)
        init = pr.if_shampoo(batch_size=2, block_size=4, precondition_every=every).init({"w": np.zeros((10, 7))})
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in init.groups["w"].items()}
    current = init.groups["w"]
    assert checks.stacked_tiles(current, 1, True) is current


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_torch_checkpoint_of_the_per_tile_layout_steps_on_like_the_old_code(mode):
    """A torch ``state_dict`` saved one entry per tile (principled: block_size=2 with
    refreshes staggered over 3 calls, so stacks of tiles in irregular and regular phase order;
    faithful: one tile), loads into the stacked layout (``load_state_dict`` stacks the tiles before
    validating) and the next 4 steps give the old code's parameters to 1e-12 (TOL's rounding
    model: the same operations per tile, except ⟨D, G⟩ of a ragged group summed in tile order)."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters import torch as pt

    make = _maker("if_shampoo_tiles_make")
    saved = torch.load(DATA / "if_shampoo_tiles_torch.pt", weights_only=True)
    assert "tiles/15/factor/1" in saved["principled"]["state_dict"]["state"][1]  # the per-tile layout
    entries = _torch_steps_on_like_the_old_code(pt.IFShampoo, make, saved, mode)
    assert not any(k.startswith("tiles/") for k in entries) and "stacks/0/factor/1" in entries


def test_core_state_of_the_per_tile_layout_steps_on_like_the_old_code():
    """The core ``PrecondState`` (NumPy) saved in the per-tile layout (block_size=2,
    refreshes staggered over 3 calls, weight+bias grouping) steps on through ``update``
    (``legacy_names`` stacks it) to the parameters the old code reached, to 1e-12; under
    ``jax.jit`` through the optax adapter too; the states returned are stacked."""
    make = _maker("if_shampoo_tiles_make")
    for backend in ("numpy", "jax"):
        if backend == "jax":
            jax = pytest.importorskip("jax")
            import jax.numpy as jnp
            from precond_ref.adapters import jax as pjax

            asarray, opt = jnp.asarray, pjax.if_shampoo(**make.CORE_KW, **FORMER)
            step = jax.jit(opt.update)
        else:
            asarray, opt = np.asarray, pr.if_shampoo(**make.CORE_KW, **FORMER)
            step = opt.update
        saved, state = _core_checkpoint(asarray, "if_shampoo_tiles_core.npz")
        assert "tiles/15/factor/0" in state.groups["l1/weight"]
        params = _core_params(saved, "params", asarray)
        for k in range(make.K):
            grads = make.grads(tree_unflatten(tree_flatten(params)[1], [np.asarray(x) for x in tree_flatten(params)[0]]),
                               make.N0 + k)
            updates, state = step(tree_unflatten(tree_flatten(grads)[1], [asarray(x) for x in tree_flatten(grads)[0]]),
                                  state, params)
            params = pr.apply_updates(params, updates)
            want = _core_params(saved, f"after{k}", np.asarray)
            for got, expected in zip(tree_flatten(params)[0], tree_flatten(want)[0]):
                np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=TOL, err_msg=f"{backend} step {k}")
        assert not any(key.startswith("tiles/") for key in state.groups["l1/weight"])
        assert "stacks/0/factor/0" in state.groups["l1/weight"]


def test_diagonal_vector_takes_each_dense_tile_to_the_root_of_its_diagonal():
    """``diagonal_vector`` (``legacy_names`` with ``structures=None``, S12): a vector of 10 saved with
    dense tiles at block_size=4, refreshes staggered over 2 calls (tiles 0..2 of 4, 4, 2 entries,
    phases 0, 1, 0: three stacks of one) becomes the diagonal factors ``init`` now makes for it, the
    same tiles in the same stacks, each ``√diag(K Kᵀ)`` of its tile (the diagonal of the dense
    preconditioner ``P = K Kᵀ``: the entries it scales keep their scale), the momenta zero; other
    entries pass through; a current state is the very dict."""
    rng = np.random.default_rng(0)
    tiles = [rng.normal(size=(1, d, d)) for d in (4, 4, 2)]
    saved = {f"stacks/{s}/{name}/0": (K if name == "factor" else 0.1 * K)
             for s, K in enumerate(tiles) for name in ("factor", "factor_momentum")}
    saved.update({"momentum/0": rng.normal(size=10), "failures": np.zeros((), np.int32)})
    got = checks.diagonal_vector(saved, root_free._nearest_diagonal)
    for s, K in enumerate(tiles):
        want = np.sqrt(np.diag(K[0] @ K[0].T))[None]
        np.testing.assert_allclose(got[f"stacks/{s}/factor/0"], want, rtol=4 * np.finfo(np.float64).eps)
        np.testing.assert_array_equal(got[f"stacks/{s}/factor_momentum/0"], np.zeros_like(want))
    assert got["momentum/0"] is saved["momentum/0"] and got["failures"] is saved["failures"]
    init = pr.if_shampoo(batch_size=2, block_size=4, structures=None).init({"v": np.zeros(10)})
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in init.groups["v"].items()}
    current = init.groups["v"]
    assert checks.diagonal_vector(current, root_free._nearest_diagonal) is current


def test_state_saved_with_dense_vector_factors_steps_on_with_diagonal_ones():
    """The core state saved under the formatted keys (a vector's factor dense) loads into ``if_shampoo`` with
    ``structures=None`` (S12: a vector's factor diagonal): ``legacy_names`` keeps every matrix
    factor and momentum as saved and turns the vector's dense tile into ``√diag(K Kᵀ)``; the state
    then has the layout ``init`` makes, and ``update`` steps on with it (NumPy, and the optax
    adapter under ``jax.jit``) to finite parameters that move."""
    make = _maker()
    kw = dict(learning_rate=1e-2, batch_size=make.BATCH, block_size=4, grouping="weight_bias", structures=None)
    for backend in ("numpy", "jax"):
        if backend == "jax":
            jax = pytest.importorskip("jax")
            import jax.numpy as jnp
            from precond_ref.adapters import jax as pjax

            asarray, opt = jnp.asarray, pjax.if_shampoo(**kw)
            step = jax.jit(opt.update)
        else:
            asarray, opt = np.asarray, pr.if_shampoo(**kw)
            step = opt.update
        saved, state = _core_checkpoint(asarray)
        params = _core_params(saved, "params", asarray)
        fresh = opt.init(params).groups
        migrated = {key: pr.if_shampoo(**kw).init.legacy_names(entries) for key, entries in state.groups.items()}
        for key, entries in migrated.items():
            assert {k: v.shape for k, v in entries.items()} == {k: v.shape for k, v in fresh[key].items()}, key
        K = np.asarray(state.groups["scale"]["factor_0"])
        np.testing.assert_allclose(np.asarray(migrated["scale"]["stacks/0/factor/0"])[0], np.sqrt(np.diag(K @ K.T)),
                                   rtol=4 * np.finfo(np.float64).eps)
        np.testing.assert_array_equal(np.asarray(migrated["l1/weight"]["stacks/1/factor/1"][1]),
                                      np.asarray(state.groups["l1/weight"]["tile_3/factor_1"]))
        before = [np.asarray(x) for x in tree_flatten(params)[0]]
        grads = make.grads(tree_unflatten(tree_flatten(params)[1], before), make.N0)
        updates, state = step(tree_unflatten(tree_flatten(grads)[1], [asarray(x) for x in tree_flatten(grads)[0]]),
                              state, params)
        after = [np.asarray(x) for x in tree_flatten(pr.apply_updates(params, updates) if backend == "numpy" else
                                                       jax.tree_util.tree_map(lambda p, u: p + u, params, updates))[0]]
        assert all(np.all(np.isfinite(a)) and np.any(a != b) for a, b in zip(after, before)), backend
