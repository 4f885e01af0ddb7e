"""IF-Shampoo's long-axis policy: blocks (``block_size``), staggered refreshes, bad input,
and the state saved before blocking existed. NumPy float64, tiny shapes: one process, no compiler."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.methods import root_free
from precond_ref.engine import tiles as tiling
from skipped_steps import assert_skipped_steps_keep_state

EPS64 = np.finfo(np.float64).eps


def _steps(opt, params, grads, **extra):
    """Updates of every step and the final state (parameters move by the updates)."""
    state, out = opt.init(params), []
    for g in grads:
        updates, state = opt.update(g, state, params, **extra)
        params = pr.apply_updates(params, updates)
        out.append(updates)
    return out, state


def _grads(rng, shape, n):
    return [rng.normal(size=shape) for _ in range(n)]


def test_tiles_are_independent_groups():
    """Distributed Shampoo's blocking: a tensor cut into tiles by ``block_size`` is preconditioned as
    if every tile were a parameter of its own (its own factors, block-diagonal preconditioner), so
    with the group-level parts off (no KL clip; momentum is element-wise and needs no switching off)
    the blocked step equals the step of the tiles given as separate parameters. Only the stacking
    differs (equal tiles run as one batched product), so the two agree to a few roundings of the
    update's size."""
    rng = np.random.default_rng(0)
    shape, block = (10, 7), 4  # tiles: rows 4, 4, 2 x columns 4, 3
    weight, grads = rng.normal(size=shape), _grads(rng, shape, 4)
    kw = dict(batch_size=3, precondition_every=1, kl_clip=0.0, learning_rate=0.1, preconditioner_lr=0.3)
    blocked, state = _steps(pr.if_shampoo(block_size=block, **kw), {"w": weight}, [{"w": g} for g in grads])
    # one stack per tile shape (no staggering at T = 1): 4 x 4 (tiles 0, 2), 4 x 3 (1, 3), 2 x 4, 2 x 3
    assert {k: v.shape for k, v in state.groups["w"].items() if k.endswith("/factor/0")} == {
        "stacks/0/factor/0": (2, 4, 4), "stacks/1/factor/0": (2, 4, 4), "stacks/2/factor/0": (1, 2, 2),
        "stacks/3/factor/0": (1, 2, 2)}

    cuts = [(slice(r, r + 4), slice(c, c + 4)) for r in (0, 4, 8) for c in (0, 4)]
    tiles = lambda a: {f"t{i}": a[s] for i, s in enumerate(cuts)}  # noqa: E731
    alone, _ = _steps(pr.if_shampoo(block_size=100, **kw), tiles(weight), [tiles(g) for g in grads])
    for got, want in zip(blocked, alone):
        scale = max(np.max(np.abs(u)) for u in want.values())
        for i, s in enumerate(cuts):
            np.testing.assert_allclose(got["w"][s], want[f"t{i}"], rtol=0, atol=64 * EPS64 * scale)


def test_kl_clip_and_momentum_stay_per_parameter():
    """The KL clip (S8) scales the whole parameter's preconditioned gradient by one ν, computed from
    the assembled D and G, not one ν per tile: with the clip binding on the first step (momentum
    buffer empty), blocked update / tiles' unclipped update is one constant over the parameter."""
    rng = np.random.default_rng(1)
    weight, g = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    kw = dict(batch_size=2, precondition_every=1, learning_rate=0.5, block_size=4)
    clipped, _ = _steps(pr.if_shampoo(kl_clip=1e-6, **kw), {"w": weight}, [{"w": g}])
    free, _ = _steps(pr.if_shampoo(kl_clip=0.0, **kw), {"w": weight}, [{"w": g}])
    ratio = clipped[0]["w"] / free[0]["w"]
    assert np.max(ratio) < 0.5  # the clip binds
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=16 * EPS64)


def test_block_size_at_least_every_axis_is_the_unblocked_method():
    """blocking.block_bounds: an axis of length d <= block_size is one chunk, so block_size equal
    to the longest axis gives the unblocked layout (one stack of one tile: keys ``stacks/0/factor/n``) and the same numbers as a
    block size far beyond it (exactly: the same operations run)."""
    rng = np.random.default_rng(2)
    weight, grads = rng.normal(size=(8, 6)), _grads(rng, (8, 6), 3)
    kw = dict(batch_size=2, precondition_every=1)
    at, state = _steps(pr.if_shampoo(block_size=8, **kw), {"w": weight}, [{"w": g} for g in grads])
    beyond, _ = _steps(pr.if_shampoo(block_size=4096, **kw), {"w": weight}, [{"w": g} for g in grads])
    assert state.groups["w"]["stacks/0/factor/0"].shape == (1, 8, 8) and not any("stacks/1" in k for k in state.groups["w"])
    for a, b in zip(at, beyond):
        np.testing.assert_array_equal(a["w"], b["w"])


@pytest.mark.parametrize("stagger", [True, False])
def test_tiles_refresh_at_their_offsets(stagger):
    """S10: tile t of a blocked parameter runs its factor step on the first call and on the calls
    c with c % T == t % T (spread_refresh=True, blocking.PhaseDue), else all tiles on c % T == 0;
    between its refreshes a tile's factor is unchanged."""
    rng = np.random.default_rng(3)
    T, steps = 3, 7
    opt = pr.if_shampoo(batch_size=2, precondition_every=T, block_size=2, spread_refresh=stagger)
    params = {"w": rng.normal(size=(6, 2))}  # three tiles of 2 x 2
    plan = tiling.tile_plan((6, 2), (False, False), 2, T, stagger)
    where = {t: (s, stack.tiles.index(t)) for s, stack in enumerate(plan.stacks) for t in stack.tiles}
    factor = lambda state, t: state.groups["w"][f"stacks/{where[t][0]}/factor/0"][where[t][1]]  # noqa: E731  tile t's K_1
    state = opt.init(params)
    for c in range(steps):
        updates, new = opt.update({"w": rng.normal(size=(6, 2))}, state, params)
        for t in range(3):
            moved = not np.array_equal(factor(new, t), factor(state, t))
            assert moved == (c == 0 or c % T == (t % T if stagger else 0)), (c, t)
        state = new
    assert opt.due(1) == ((False, True, False) if stagger else (False,))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "64", np.float64(8.0)])
def test_bad_block_size_is_a_clear_error(bad):
    """A block size below 1 or not an integer is a ValueError naming block_size."""
    with pytest.raises(ValueError, match="block_size"):
        pr.if_shampoo(block_size=bad)


def test_block_size_is_refused_in_faithful_mode():
    """Faithful mode is SIRFShampoo's structure: no blocking to ask for."""
    with pytest.raises(ValueError, match="block_size.*faithful"):
        pr.if_shampoo(block_size=64, mode="faithful")


def test_zero_size_axis_is_left_unchanged_without_factors():
    """A parameter with a zero-size axis (here beside an axis longer than the block size)
    has no state and a zero update; the other parameters step as usual."""
    rng = np.random.default_rng(4)
    params = {"empty": np.zeros((0, 300)), "w": rng.normal(size=(300, 2))}
    opt = pr.if_shampoo(batch_size=2, block_size=128)
    state = opt.init(params)
    assert state.groups["empty"] == {}
    updates, new = opt.update({"empty": np.zeros((0, 300)), "w": rng.normal(size=(300, 2))}, state, params)
    assert updates["empty"].shape == (0, 300) and new.groups["empty"] == {}
    assert np.any(updates["w"] != 0) and "stacks/2/factor/0" in new.groups["w"]  # 128 x 2 at phases 0, 1; 44 x 2


_OLD_NAMES = {"stacks/0/factor/0": "factor_0", "stacks/0/factor/1": "factor_1", "stacks/0/factor_momentum/0":
              "factor_momentum_0", "stacks/0/factor_momentum/1": "factor_momentum_1", "momentum/0": "momentum_0",
              "failures": "factor_failures"}


def _main_state(opt_old, params, grads):
    """A state in the unblocked layout: dense factors (``factor_n``, ``factor_momentum_n``: the
    older entry names) for axes up to 4096."""
    state = opt_old.init(params)
    _, state = opt_old.update(grads, state, params)
    return state._replace(groups={k: {_OLD_NAMES.get(n, n): v[0] if n.startswith("stacks/") else v for n, v in g.items()}
                                  for k, g in state.groups.items()})  # one stack of one tile: its tile


def test_state_saved_before_blocking_names_the_arguments_that_load_it():
    """Checkpoints: a state of the unblocked layout (a 300 x 5 weight: one 300 x 300 factor, longer
    than the default block size) given to the default is a ValueError naming block_size=4096,
    max_dense_dim=4096, and those arguments load it and step on from it."""
    rng = np.random.default_rng(5)
    params, grads = {"w": rng.normal(size=(300, 5))}, {"w": rng.normal(size=(300, 5))}
    old = pr.if_shampoo(batch_size=2, block_size=4096, max_dense_dim=4096)
    state = _main_state(old, params, grads)
    # the unblocked layout, spelled out: what its init made for this weight
    assert {k: v.shape for k, v in state.groups["w"].items()} == {
        "factor_0": (300, 300), "factor_momentum_0": (300, 300), "factor_1": (5, 5), "factor_momentum_1": (5, 5),
        "momentum_0": (300, 5), "factor_failures": (),
    }
    with pytest.raises(ValueError, match=r"block_size=4096, max_dense_dim=4096"):
        pr.if_shampoo(batch_size=2).update(grads, state, params)
    updates, _ = old.update(grads, state, params)
    assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"] != 0)


def test_torch_checkpoint_saved_before_blocking_names_the_arguments():
    """The same for the torch adapter's load_state_dict: a state_dict whose IF-Shampoo state has
    main's unblocked layout is refused with the arguments that reproduce it."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters import torch as pt

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 300, bias=False, dtype=torch.float32)
    opt = pt.IFShampoo(layer.parameters(), lr=1e-3, batch_size=4)
    layer(torch.randn(4, 5)).square().mean().backward()
    opt.step(batch_size=4)
    saved = opt.state_dict()
    entries = saved["state"][0]
    assert "stacks/1/factor/0" in entries  # 300 > the default block size: blocked
    for key in [k for k in entries if "factor" in k]:
        del entries[key]
    for n, d in enumerate((300, 5)):  # the entry names of that version
        entries[f"factor_{n}"] = torch.eye(d)
        entries[f"factor_momentum_{n}"] = torch.zeros(d, d)
    fresh = pt.IFShampoo(layer.parameters(), lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match=r"block_size=4096, max_dense_dim=4096"):
        fresh.load_state_dict(saved)


def test_cost_model_counts_tiles():
    """benchmarks.cost.if_shampoo: a 2048 x 128 weight at block_size 256 is 8 tiles of 256 x 128;
    per step each tile's two mode products per axis cost 4 d N (d its length on the axis, N its
    size), so the preconditioning costs 4 (256 + 128) 32768 flops per tile."""
    from precond_ref.benchmarks import cost

    c = cost.if_shampoo([("emb", (2048, 128))], block_size=256, precondition_every=2)
    every, flops, _ = c.parts["precondition (dense)"]
    assert every == 1 and flops == 8 * 4.0 * (256 + 128) * 256 * 128
    unblocked = cost.if_shampoo([("emb", (2048, 128))], block_size=4096, precondition_every=2)
    assert unblocked.parts["precondition (dense)"][1] == 4.0 * (2048 + 128) * 2048 * 128


@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-as-on-a-gpu", "jax"])
@pytest.mark.parametrize("interval", [1, 2])
def test_skipped_step_keeps_every_factor_without_selecting_it(backend, interval, monkeypatch):
    """Invariant (specs README rule 6, non-finite policy 'skip'): a step whose gradient holds a NaN
    changes no state entry and gives zero updates, on a refresh step and between, for tiled and
    whole factors with factor momentum and momentum. Principled IF-Shampoo no longer has the
    transform select its refreshed factor entries (the tile runner settles them, ``engine.tiles``): the transform zeroes
    every gradient of a skipped step, and a tile with a zero gradient keeps its factors (S2).
    "torch-as-on-a-gpu": ``host_bool`` answers None as for a GPU tensor, so the step cannot learn
    on the host that it is skipped and relies on those selections alone; on JAX the gradients are
    not zeroed and the transform still selects."""
    from precond_ref import _backend

    rng = np.random.default_rng(3)
    # w: two stacks of two tiles each (8 x 8, and 8 x 4: uneven columns); b: a diagonal factor in
    # two blocks; c: whole factors of a 3-D tensor. Few tile shapes, as each distinct shape is
    # compiled operation by operation by JAX's eager step.
    shapes = {"w": (16, 12), "b": (16,), "c": (3, 5, 8)}
    if backend.startswith("torch"):
        torch = pytest.importorskip("torch")
        wrap, to_np = (lambda a: torch.tensor(a, dtype=torch.float64)), (lambda a: a.numpy())
        if backend == "torch-as-on-a-gpu":
            for name, module in list(sys.modules.items()):
                if name.startswith("precond_ref") and getattr(module, "host_bool", None) is _backend.host_bool:
                    monkeypatch.setattr(module, "host_bool", lambda xp, x: None)
    elif backend == "jax":
        jnp = pytest.importorskip("jax.numpy")
        wrap, to_np = (lambda a: jnp.asarray(a, dtype=jnp.float32)), np.asarray
    else:
        wrap, to_np = np.asarray, np.asarray
    opt = pr.if_shampoo(0.05, block_size=8, precondition_every=interval, momentum=0.5,
                        preconditioner_momentum=0.5, batch_size=4)
    assert_skipped_steps_keep_state(opt, shapes, wrap, to_np, rng, ("w", (1, 2)))


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.1), (0.9, 0.0), (0.0, 0.1)])
def test_leaves_joined_for_the_last_lines_get_what_each_computes_alone(momentum, weight_decay, monkeypatch):
    """The step's last lines (U = D + κW, v ← α₁v + U, W ← W − ηv) run on the leaves of one layout
    joined end to end (``engine.leafwise``: a few calls for all leaves on a GPU). They are
    element-wise, so every leaf's update and momentum are exactly those of the same lines run leaf
    by leaf: bitwise equal over 4 steps (NumPy float64 and float32; weights with their biases, whose
    slice of the grouped direction is not contiguous, a lone vector, and without momentum the cast
    to the work dtype). Fails if a leaf is handed another's slice or a line is skipped."""
    from precond_ref.engine import joined as transform  # leafwise joins by its stack
    from precond_ref.tree import tree_flatten

    joins = []
    real_stack = transform.stack

    def counted(xp, members, *args, **kwargs):
        stacks = real_stack(xp, members, *args, **kwargs)
        joins.extend(len(s.indices) for s in stacks)
        return stacks

    def leaf_by_leaf(xp, fn, *operands, zeros=None, ctx=None):
        return [fn(*args) for args in zip(*operands, *(() if zeros is None else (zeros,)))]

    for dtype in (np.float64, np.float32):
        rng = np.random.default_rng(1)
        shapes = {"l1": {"weight": (3, 4), "bias": (3,)}, "l2": {"weight": (3, 4), "bias": (3,)}, "v": (5,)}
        params = {k: ({n: rng.normal(size=s).astype(dtype) for n, s in v.items()} if isinstance(v, dict)
                      else rng.normal(size=v).astype(dtype)) for k, v in shapes.items()}
        grads = [{k: ({n: rng.normal(size=a.shape).astype(dtype) for n, a in v.items()} if isinstance(v, dict)
                      else rng.normal(size=v.shape).astype(dtype)) for k, v in params.items()} for _ in range(4)]
        kw = dict(learning_rate=0.1, momentum=momentum, weight_decay=weight_decay, precondition_every=2, batch_size=4)
        monkeypatch.setattr(transform, "stack", counted)
        joined, joined_state = _steps(pr.if_shampoo(**kw), params, grads)
        monkeypatch.setattr(tiling, "leafwise", leaf_by_leaf)
        alone, alone_state = _steps(pr.if_shampoo(**kw), params, grads)
        monkeypatch.undo()
        assert max(joins) >= 2
        for got, want in zip(joined, alone):
            (got_leaves, treedef), (want_leaves, _) = tree_flatten(got), tree_flatten(want)
            for path, g, w in zip(treedef.paths, got_leaves, want_leaves):
                assert g.dtype == w.dtype
                np.testing.assert_array_equal(g, w, err_msg=str(path))
        for key, entries in alone_state.groups.items():
            for name, value in entries.items():
                np.testing.assert_array_equal(np.asarray(joined_state.groups[key][name]), np.asarray(value), err_msg=f"{key} {name}")
