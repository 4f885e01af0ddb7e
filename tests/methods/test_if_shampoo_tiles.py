"""IF-Shampoo's tile stacks (issue 35): a group's equal tiles are cut by one reshape and transpose,
every product runs once per stack of equal tiles whatever their number, and S8's ν is computed for
all groups at once. NumPy float64 and torch eager, tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref import linalg
from precond_ref.methods import root_free

EPS64 = np.finfo(np.float64).eps


def _np():
    from array_api_compat import array_namespace

    return array_namespace(np.zeros(1))


@pytest.mark.parametrize("dims, block", [((8, 12), 4), ((12, 4), 4), ((4, 12), 4), ((6, 3, 9), 3), ((6, 9, 2), 3), ((9,), 3), ((4, 4), 8)])
def test_tile_stack_is_the_row_major_cut(dims, block):
    """``_to_tiles`` is a pure rearrangement: its b-th entry is tile b of ``_tile_plan`` (row-major
    over the grid, the tile numbers of ``_stack_plan``) cut out with ``_cut``, and
    ``_from_tiles`` puts them back. Exact (no arithmetic)."""
    np_xp = _np()
    G = np.arange(np.prod(dims), dtype=np.float64).reshape(dims)
    tiles = root_free._tile_plan(dims, (False,) * len(dims), block, 1, False)
    counts, size = root_free._grid(tiles)
    stacked = root_free._to_tiles(np_xp, G, counts, size)
    assert stacked.shape == (len(tiles),) + size
    for b, tile in enumerate(tiles):
        np.testing.assert_array_equal(stacked[b], root_free._cut(G, tile.index))
    np.testing.assert_array_equal(root_free._from_tiles(np_xp, stacked, counts, size), G)


def test_grid_of_unequal_tiles_has_no_common_size():
    """An axis that ends in a shorter tile (10 = 4 + 4 + 2) leaves the group to the tile-by-tile
    cut: ``_grid`` gives no common tile shape."""
    tiles = root_free._tile_plan((10, 8), (False, False), 4, 1, False)
    assert root_free._grid(tiles) == ((3, 2), None)


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
    """``_kl_clip_scales`` is ``linalg.kl_clip_factor`` of each group, computed on a vector: from
    ⟨D_g, G_g⟩ it gives ``min(1, √(κ/(η²⟨D_g, G_g⟩)))``, 1 where the clip does not bind. The inner
    products are summed in another order (tile by tile), so ν agrees to a few roundings of the sum
    of |D ⊙ G| (a square root halves the relative error)."""
    np_xp = _np()
    rng = np.random.default_rng(4)
    pairs = [(rng.normal(size=(5, 3)), rng.normal(size=(5, 3))) for _ in range(4)]
    pairs.append((np.zeros((2, 2)), np.zeros((2, 2))))  # ⟨D, G⟩ = 0: no clip
    eta, kappa = 0.3, 0.05
    inner = [np_xp.sum(D * G) for D, G in pairs]
    got = root_free._kl_clip_scales(np_xp, [np.asarray(v) for v in inner], eta, kappa)
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
    """The speed property of the tile stacks (issue 35): an eager step costs a number of array
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


def _oracle_stacks(G, plan):
    """The slicing oracle: stack s is ``stack([_cut(G, tiles[t].index) for t in stacks[s].tiles])``."""
    return [np.stack([root_free._cut(G, plan.tiles[t].index) for t in stack.tiles]) for stack in plan.stacks]


@pytest.mark.parametrize("dims, block, interval", [
    ((8, 12), 4, 2), ((8, 12), 4, 5), ((16, 16), 4, 2), ((10, 7), 4, 2), ((10, 7), 4, 3), ((6, 9, 2), 3, 4),
    ((9,), 2, 3), ((4, 4), 8, 2), ((6, 5, 7), 4, 3), ((6, 2), 2, 3),
])
def test_stacks_of_tiles_are_the_slices_of_each_stack(dims, block, interval):
    """``_cut_stacks`` (region reshapes, then every T-th tile or a ``take``) gives each stack of
    ``_stack_plan`` exactly the slices of its tiles (the slicing oracle), and ``_join_stacks`` puts
    them back: equal tiles with T dividing their number or not, ragged ends on one axis or
    several, unblocked. The stacks are the tiles of one shape and refresh phase (t % T), tiles
    ascending, and every tile is in one stack. Exact (no arithmetic)."""
    np_xp = _np()
    G = np.arange(np.prod(dims), dtype=np.float64).reshape(dims)
    tiles = root_free._tile_plan(dims, (False,) * len(dims), block, interval, True)
    plan = root_free._stack_plan(tiles)
    assert sorted(t for stack in plan.stacks for t in stack.tiles) == list(range(len(tiles)))
    for stack in plan.stacks:
        assert list(stack.tiles) == sorted(stack.tiles)
        assert {(root_free._tile_shape(tiles[t]), tiles[t].offset) for t in stack.tiles} == {
            (root_free._tile_shape(tiles[stack.tiles[0]]), stack.phase)}
        assert stack.phase == stack.tiles[0] % interval
    got = root_free._cut_stacks(np_xp, G, plan)
    for part, want in zip(got, _oracle_stacks(G, plan), strict=True):
        np.testing.assert_array_equal(part, want)
    np.testing.assert_array_equal(root_free._join_stacks(np_xp, got, plan), G)
    per_tile = [np.asarray([float(t) for t in stack.tiles]) for stack in plan.stacks]  # one entry per tile
    np.testing.assert_array_equal(root_free._unpick(np_xp, per_tile, [stack.tiles for stack in plan.stacks]),
                                  np.arange(len(tiles)))


@pytest.mark.parametrize("dims, block, interval", [((16, 16), 4, 2), ((16, 16), 4, 3), ((10, 7), 4, 3), ((9,), 2, 3)])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_sum_in_tile_order_is_the_sum_of_the_tiles_in_row_major_order(dims, block, interval, library):
    """S8's ⟨D, G⟩ of a group, ``_sum_in_tile_order``: the per-tile values summed over the tiles in
    row-major order, bitwise the ``sum`` of the vector in that order (what the per-tile layout
    summed), whatever the stacks' order: values of mixed magnitudes, so that another order of
    summation rounds differently."""
    from array_api_compat import array_namespace

    if library == "torch":
        torch = pytest.importorskip("torch")
        asarray = torch.from_numpy
    else:
        asarray = np.asarray
    plan = root_free._stack_plan(root_free._tile_plan(dims, (False,) * len(dims), block, interval, True))
    k = len(plan.tiles)
    rng = np.random.default_rng(k)
    values = rng.normal(size=k) * 10.0 ** rng.integers(-8, 8, size=k)
    xp = array_namespace(asarray(values))
    got = root_free._sum_in_tile_order(xp, [asarray(values[list(stack.tiles)]) for stack in plan.stacks], plan)
    want = xp.sum(asarray(values))
    assert float(got) == float(want)


@pytest.mark.parametrize("positions", [(0, 1, 2, 3, 4), (1, 3), (2,), (0, 4, 1), (3, 0)])
def test_pick_is_the_positions_and_unpick_its_inverse(positions):
    """``_pick`` is ``stack[positions]`` (itself, a slice, or a take) and ``_unpick`` rebuilds the
    stack from the picks of a partition of its positions (phase interleave or take). Exact."""
    np_xp = _np()
    stack = np.arange(5 * 2, dtype=np.float64).reshape(5, 2)
    np.testing.assert_array_equal(root_free._pick(np_xp, stack, positions), stack[list(positions)])
    rest = tuple(j for j in range(5) if j not in positions)
    parts = [positions, rest] if rest else [positions]
    got = root_free._unpick(np_xp, [stack[list(p)] for p in parts], parts)
    np.testing.assert_array_equal(got, stack)


@pytest.mark.parametrize("k, phases", [(6, 2), (7, 3), (5, 5), (4, 3)])
def test_unpick_interleaves_the_phases_of_equal_tiles(k, phases):
    """The phases of equal tiles (part p holds positions p, p+T, ...; the first k % T parts one
    more) are interleaved back into 0..k-1. Exact."""
    np_xp = _np()
    stack = np.arange(k * 3, dtype=np.float64).reshape(k, 3)
    positions = [tuple(range(p, k, phases)) for p in range(phases)]
    np.testing.assert_array_equal(root_free._unpick(np_xp, [stack[list(p)] for p in positions], positions), stack)


def test_torch_phase_stacks_use_no_take_for_equal_tiles():
    """Equal tiles (a 16 x 16 weight in 4 x 4 tiles, staggered over T = 3: 16 = 5 * 3 + 1) are cut
    into their phase stacks by slices and joined back by an interleave: no ``index_select``
    (a gather) in the eager step, where ragged tiles need one."""
    torch = pytest.importorskip("torch")
    ops = {}
    for n in (16, 15):
        g = torch.Generator().manual_seed(0)
        params = {"w": torch.randn(n, n, generator=g, dtype=torch.float64)}
        opt = pr.if_shampoo(batch_size=2, block_size=4, precondition_every=3, on_nonfinite="raise")
        state = opt.init(params)
        with torch.profiler.profile() as prof:
            opt.update(params, state, params)
        ops[n] = {e.name for e in prof.events()}
    assert "aten::index_select" not in ops[16] and "aten::index_select" in ops[15]


def test_index_arrays_of_a_take_are_made_once():
    """``_positions`` (the index array of an irregular pick) is made from host data, a copy to the
    device on an accelerator (an eager CUDA step would wait for it): it is made once per
    namespace, device and positions and kept, so a step of a ragged group makes no new one."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace

    x = torch.zeros(3)
    xp = array_namespace(x)
    first = root_free._positions(xp, (2, 0, 1), x)
    assert first.tolist() == [2, 0, 1] and first.dtype == torch.int64
    assert root_free._positions(xp, (2, 0, 1), x) is first
    assert root_free._positions(xp, (0, 2, 1), x) is not first
