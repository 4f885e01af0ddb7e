"""IF-Shampoo's tile stacks: a group's equal tiles are cut by one reshape and transpose,
every product runs once per stack of equal tiles whatever their number, and S8's ν is computed for
all groups at once. NumPy float64 and torch eager, tiny shapes."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import precond_ref as pr
from precond_ref import linalg
from precond_ref.engine import tiles as tiling
from precond_ref.methods import root_free

EPS64 = np.finfo(np.float64).eps


def _np():
    from array_api_compat import array_namespace

    return array_namespace(np.zeros(1))


def test_equal_tiles_step_is_the_step_of_the_tiles_alone():
    """Distributed Shampoo's blocking with the tile stack of the one-reshape cut (both axes cut, so
    the transpose path): the blocked step equals the step of the tiles given as parameters of their
    own (no KL clip, refresh every step), to a few roundings of the update's size (only the batching
    of the products differs)."""
    rng = np.random.default_rng(3)
    shape, block = (8, 12), 4
    weight = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(3)]
    kw = dict(batch_size=3, precondition_every=1, kl_clip=0.0, learning_rate=0.1, preconditioner_lr=0.3)
    cuts = [(slice(r, r + 4), slice(c, c + 4)) for r in (0, 4) for c in (0, 4, 8)]

    def run(opt, params, gs):
        state, out = opt.init(params), []
        for g in gs:
            updates, state = opt.update(g, state, params)
            params = pr.apply_updates(params, updates)
            out.append(updates)
        return out

    blocked = run(pr.if_shampoo(block_size=block, **kw), {"w": weight}, [{"w": g} for g in grads])
    tiles = lambda a: {f"t{i}": a[s] for i, s in enumerate(cuts)}  # noqa: E731
    alone = run(pr.if_shampoo(block_size=100, **kw), tiles(weight), [tiles(g) for g in grads])
    for got, want in zip(blocked, alone):
        scale = max(np.max(np.abs(u)) for u in want.values())
        for i, s in enumerate(cuts):
            np.testing.assert_allclose(got["w"][s], want[f"t{i}"], rtol=0, atol=64 * EPS64 * scale)


def test_kl_clip_scales_are_the_per_group_factor():
    """S8's ν, the rule's ``_kl_clip`` on the vector of all groups of one dtype (the engine's
    ``_by_dtype``), is ``linalg.kl_clip_factor`` of each group: from
    ⟨D_g, G_g⟩ it gives ``min(1, √(κ/(η²⟨D_g, G_g⟩)))``, 1 where the clip does not bind. The inner
    products are summed in another order (tile by tile), so ν agrees to a few roundings of the sum
    of |D ⊙ G| (a square root halves the relative error)."""
    np_xp = _np()
    rng = np.random.default_rng(4)
    pairs = [(rng.normal(size=(5, 3)), rng.normal(size=(5, 3))) for _ in range(4)]
    pairs.append((np.zeros((2, 2)), np.zeros((2, 2))))  # ⟨D, G⟩ = 0: no clip
    eta, kappa = 0.3, 0.05
    inner = [np_xp.sum(D * G) for D, G in pairs]
    config = root_free.IFShampooConfig(*[None] * 7, kappa, *[None] * 6)
    step = root_free._IFShampooStep(None, None, eta, -eta)
    got = tiling._by_dtype(np_xp, partial(root_free._kl_clip, np_xp, config, step), [np.asarray(v) for v in inner])
    clipped = 0
    for (D, G), nu in zip(pairs, got):
        want = linalg.kl_clip_factor(D, G, eta, kappa)
        clipped += bool(want < 1)
        bound = 8 * EPS64 * max(np.sum(np.abs(D * G)) * eta * eta / kappa, 1.0)
        np.testing.assert_allclose(nu, want, rtol=0, atol=bound)
    assert 0 < clipped < len(pairs), "the case must have binding and non-binding groups"


def _top_level_ops(torch, opt, params, grads) -> int:
    """Top-level aten operations of one eager ``update`` (refresh decided on the host)."""
    state = opt.init(params)
    state = opt.update(grads, state, params, step=0)[1]
    with torch.profiler.profile() as prof:
        opt.update(grads, state, params, step=1)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def test_operations_do_not_grow_with_the_number_of_equal_tiles():
    """The speed property of the tile stacks: an eager step costs a number of array
    operations set by the number of groups and distinct tile shapes, not by the number of tiles.
    A (16, 16) weight cut into 4x4 tiles (16 tiles) takes exactly as many top-level torch
    operations as an (8, 8) one (4 tiles). Cutting tile by tile (slices, per-tile stacking and
    unstacking) grows with the tiles. ``on_nonfinite="raise"``: the "skip" policy of
    ``build_transform`` selects every state entry (one ``where`` per tile's factor), which is the
    transform's cost, not the method's."""
    torch = pytest.importorskip("torch")
    counts = []
    for n in (8, 16):
        g = torch.Generator().manual_seed(0)
        params = {"w": torch.randn(n, n, generator=g, dtype=torch.float64)}
        grads = {"w": torch.randn(n, n, generator=g, dtype=torch.float64)}
        opt = pr.if_shampoo(batch_size=2, block_size=4, precondition_every=2, on_nonfinite="raise")
        counts.append(_top_level_ops(torch, opt, params, grads))
    assert counts[0] == counts[1], counts


def test_torch_tiles_take_two_gathers_a_step():
    """A weight's tiles (a 16 x 16 weight in 4 x 4 tiles, staggered over T = 3: 16 = 5 * 3 + 1)
    come from the gradient by one gather (``tiles_of_groups``) and go back to the leaves' order by
    another (``leaves_of_batches``), their indices made on the first step: the later eager steps
    issue exactly these two ``index_select``s and a third, the gather that puts the group's per-tile
    sums in tile order (its phases' stacks hold its tiles out of that order), ragged tiles (15 x 15)
    too."""
    torch = pytest.importorskip("torch")
    ops = {}
    for n in (16, 15):
        g = torch.Generator().manual_seed(0)
        params = {"w": torch.randn(n, n, generator=g, dtype=torch.float64)}
        opt = pr.if_shampoo(batch_size=2, block_size=4, precondition_every=3, on_nonfinite="raise")
        state = opt.init(params)
        _, state = opt.update(params, state, params)
        with torch.profiler.profile() as prof:
            opt.update(params, state, params)
        ops[n] = [e.name for e in prof.events()].count("aten::index_select")
    assert ops == {16: 3, 15: 3}, ops


