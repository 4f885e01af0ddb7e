"""The engine's tiles (:mod:`precond_ref.engine.tiles`): a tensor's equal tiles cut by one reshape and
transpose, the stacks of one tile shape and refresh phase picked from them, and both put back;
exact rearrangements, checked against slicing. NumPy float64 and torch eager, tiny shapes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from precond_ref.engine import tiles as tiling


def _np():
    from array_api_compat import array_namespace

    return array_namespace(np.zeros(1))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("dims, block", [((8, 12), 4), ((12, 4), 4), ((4, 12), 4), ((6, 3, 9), 3), ((6, 9, 2), 3), ((9,), 3), ((4, 4), 8)])
def test_tile_stack_is_the_row_major_cut(dims, block):
    """``to_tiles`` is a pure rearrangement: its b-th entry is tile b of ``tile_plan`` (row-major
    over the grid, the tile numbers of its stacks) cut out with ``cut``, and
    ``from_tiles`` puts them back. Exact (no arithmetic)."""
    np_xp = _np()
    G = np.arange(np.prod(dims), dtype=np.float64).reshape(dims)
    plan = tiling.tile_plan(dims, (False,) * len(dims), block, 1, False)
    (region,), tiles = plan.regions, plan.tiles  # every dimension a multiple of the block: one region
    counts, size = region.counts, region.size
    stacked = tiling.to_tiles(np_xp, G, counts, size)
    assert stacked.shape == (len(tiles),) + size
    for b, tile in enumerate(tiles):
        np.testing.assert_array_equal(stacked[b], tiling.cut(G, tile.index))
    np.testing.assert_array_equal(tiling.from_tiles(np_xp, stacked, counts, size), G)


def _oracle_stacks(G, plan):
    """The slicing oracle: stack s is ``stack([cut(G, tiles[t].index) for t in stacks[s].tiles])``."""
    return [np.stack([tiling.cut(G, plan.tiles[t].index) for t in stack.tiles]) for stack in plan.stacks]


@pytest.mark.parametrize("dims, block, interval", [
    ((8, 12), 4, 2), ((8, 12), 4, 5), ((16, 16), 4, 2), ((10, 7), 4, 2), ((10, 7), 4, 3), ((6, 9, 2), 3, 4),
    ((9,), 2, 3), ((4, 4), 8, 2), ((6, 5, 7), 4, 3), ((6, 2), 2, 3), ((12, 8), 4, 2), ((4, 6, 8), 2, 2), ((8,), 2, 2),
    ((12, 13), 4, 3),
])
def test_stacks_of_tiles_are_the_slices_of_each_stack(dims, block, interval):
    """``cut_stacks`` (region reshapes, then every T-th tile or a ``take``) gives each stack of
    ``tile_plan`` exactly the slices of its tiles (the slicing oracle), and ``join_stacks`` puts
    them back: equal tiles with T dividing their number or not, T dividing the tiles of the last
    axis or not, ragged ends on one axis or several, unblocked. The stacks are the tiles of one
    shape and refresh phase (t % T), tiles ascending, and every tile is in one stack. Exact (no
    arithmetic)."""
    np_xp = _np()
    G = np.arange(np.prod(dims), dtype=np.float64).reshape(dims)
    plan = tiling.tile_plan(dims, (False,) * len(dims), block, interval, True)
    tiles = plan.tiles
    assert sorted(t for stack in plan.stacks for t in stack.tiles) == list(range(len(tiles)))
    for stack in plan.stacks:
        assert list(stack.tiles) == sorted(stack.tiles)
        assert {(tuple(b - a for a, b in tiles[t].index), tiles[t].offset) for t in stack.tiles} == {
            (stack.shape, stack.phase)}
        assert stack.phase == stack.tiles[0] % interval
    got = tiling.cut_stacks(np_xp, G, plan)
    for part, want in zip(got, _oracle_stacks(G, plan), strict=True):
        np.testing.assert_array_equal(part, want)
    np.testing.assert_array_equal(tiling.join_stacks(np_xp, got, plan), G)
    per_tile = [np.asarray([float(t) for t in stack.tiles]) for stack in plan.stacks]  # one entry per tile
    np.testing.assert_array_equal(tiling.unpick(np_xp, per_tile, [stack.tiles for stack in plan.stacks]),
                                  np.arange(len(tiles)))


@pytest.mark.parametrize("dims, block, interval", [((16, 16), 4, 2), ((16, 16), 4, 3), ((10, 7), 4, 3), ((9,), 2, 3)])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_sums_in_tile_order_are_the_sums_of_the_tiles_in_row_major_order(dims, block, interval, library):
    """S8's ⟨D, G⟩ of a group, ``sums_in_tile_order``: the per-tile values summed over the tiles in
    row-major order, the ``sum`` of the vector in that order (what the per-tile layout summed),
    whatever the stacks' order: values of mixed magnitudes; two groups of one plan (summed as the
    rows of one matrix; each stack a batch of both), and a group of one tile; evenly interleaved
    phases (one gather) or not. NumPy: bitwise (a row of a C-contiguous matrix and a vector go
    through the same pairwise summation of a contiguous run, so another order of the tiles, the
    stacks' order, fails: the values' magnitudes span 16 decades). torch: within the rounding of a
    k-term sum (k eps sum|v|), since its row and vector reductions are different kernels that no
    release promises round alike (on this project's CPUs they do, bit for bit)."""
    from array_api_compat import array_namespace

    if library == "torch":
        torch = pytest.importorskip("torch")
        asarray = torch.from_numpy
    else:
        asarray = np.asarray
    plan = tiling.tile_plan(dims, (False,) * len(dims), block, interval, True)
    k = len(plan.tiles)
    rng = np.random.default_rng(k)
    values = rng.normal(size=k) * 10.0 ** rng.integers(-8, 8, size=k)
    xp = array_namespace(asarray(values))
    other, single = values[::-1].copy(), values[:1].copy()
    one = tiling.tile_plan((block,), (False,), block, interval, True)  # one tile
    batches = [xp.concat([asarray(v[list(stack.tiles)]) for v in (values, other)]) for stack in plan.stacks]
    members = [[(0, s), (1, s)] for s in range(len(plan.stacks))] + [[(2, 0)]]
    got = tiling.sums_in_tile_order(xp, batches + [asarray(single)], members, [plan, plan, one])
    for x, v in zip(got, (values, other, single)):
        want = float(xp.sum(asarray(v)))
        if library == "torch":
            assert abs(float(x) - want) <= len(v) * np.finfo(np.float64).eps * float(np.sum(np.abs(v)))
        else:
            assert float(x) == want


@pytest.mark.parametrize("positions", [(0, 1, 2, 3, 4), (1, 3), (2,), (0, 4, 1), (3, 0)])
def test_pick_is_the_positions_and_unpick_its_inverse(positions):
    """``pick`` is ``stack[positions]`` (itself, a slice, or a take) and ``unpick`` rebuilds the
    stack from the picks of a partition of its positions (a join and a take). Exact."""
    np_xp = _np()
    stack = np.arange(5 * 2, dtype=np.float64).reshape(5, 2)
    np.testing.assert_array_equal(tiling.pick(np_xp, stack, positions), stack[list(positions)])
    rest = tuple(j for j in range(5) if j not in positions)
    parts = [positions, rest] if rest else [positions]
    got = tiling.unpick(np_xp, [stack[list(p)] for p in parts], parts)
    np.testing.assert_array_equal(got, stack)


@pytest.mark.parametrize("k, phases", [(6, 2), (7, 3), (5, 5), (4, 3), (8, 4)])
@pytest.mark.parametrize("reverse", [False, True])
def test_unpick_interleaves_the_phases_of_equal_tiles(k, phases, reverse):
    """The phases of equal tiles (part p holds positions p, p+T, ...; the first k % T parts one
    more), given in phase order or reversed, are put back in the order 0..k-1 (parts of equal
    length by one interleaving stack). Exact."""
    np_xp = _np()
    stack = np.arange(k * 3, dtype=np.float64).reshape(k, 3)
    positions = [tuple(range(p, k, phases)) for p in range(phases)][:: -1 if reverse else 1]
    np.testing.assert_array_equal(tiling.unpick(np_xp, [stack[list(p)] for p in positions], positions), stack)


def test_index_arrays_of_a_take_are_made_once():
    """``index_array`` (the index array of an irregular pick) is made from host data, a copy to the
    device on an accelerator (an eager CUDA step would wait for it): it is made once per
    namespace, device and positions and kept by the transform (``keeping_constants``), so a step of
    a ragged group makes no new one."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace

    from precond_ref.engine.factors import keeping_constants

    x = torch.zeros(3)
    xp = array_namespace(x)
    with keeping_constants({}):
        first = tiling.index_array(xp, (2, 0, 1), x)
        assert first.tolist() == [2, 0, 1] and first.dtype == torch.int64
        assert tiling.index_array(xp, (2, 0, 1), x) is first
        assert tiling.index_array(xp, (0, 2, 1), x) is not first


def test_per_tile_scales_each_tile_by_its_groups_value():
    """``per_tile``: a stack of tiles from groups of ``lengths`` consecutive tiles, each group's
    0-D value repeated over its tiles (``np.repeat``) and shaped to broadcast over the tile axes,
    so ``stack * per_tile(...)`` is each group's tiles times its value; one group: its value itself."""
    np_xp, rng = _np(), np.random.default_rng(7)
    stack = rng.standard_normal((6, 3, 2))
    values, lengths = [np.asarray(0.5), np.asarray(-2.0), np.asarray(3.0)], [2, 1, 3]
    scale = tiling.per_tile(np_xp, values, lengths, stack)
    assert scale.shape == (6, 1, 1)
    np.testing.assert_array_equal(stack * scale, stack * np.repeat(np.stack(values), lengths)[:, None, None])
    assert tiling.per_tile(np_xp, values[:1], [6], stack) is values[0]


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("lengths", [(5,), (2, 1, 3), (1, 1, 1, 4), (4, 2), (3, 3, 3)])
def test_counts_per_run_are_the_sums_of_the_runs(library, lengths):
    """S3's count of a group's failed tiles, ``counts_per_run``: per run of consecutive flags (a
    group's tiles in a batch of stacks), the number set, as a (runs,) int32 vector: the sum of each
    slice (integers, so exact whatever the order of summation)."""
    from array_api_compat import array_namespace

    rng = np.random.default_rng(len(lengths))
    flags = rng.random(sum(lengths)) < 0.5
    if library == "torch":
        torch = pytest.importorskip("torch")
        flags = torch.from_numpy(flags)
    xp = array_namespace(flags)
    got = tiling.counts_per_run(xp, flags, lengths)
    starts = np.cumsum((0,) + lengths)
    want = [int(np.sum(np.asarray(flags)[a:b])) for a, b in zip(starts[:-1], starts[1:])]
    assert [int(x) for x in got] == want
    assert got.dtype == xp.int32 and tuple(got.shape) == (len(lengths),)


def test_kept_where_usable_per_block():
    """IF-Shampoo's S2/S3 per block: a zero-gradient block keeps its old state, a non-finite new state is
    discarded and flagged as failed (the caller counts the flags), an ordinary block takes the new state."""
    grouped = np.stack([np.zeros((2, 2)), np.ones((2, 2)), np.ones((2, 2))])
    old = (np.zeros((3, 2, 2)),)
    new = (np.stack([np.ones((2, 2)), np.full((2, 2), np.inf), np.full((2, 2), 2.0)]),)
    *kept, failed = tiling.kept_where_usable(_np(), grouped, old, new)
    np.testing.assert_array_equal(kept[0], np.stack([old[0][0], old[0][1], np.full((2, 2), 2.0)]))
    np.testing.assert_array_equal(failed, [False, True, False])


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("shapes", [((2, 2), (2, 2), (2, 2)), ((2, 2), (3, 3))])
def test_kept_where_usable_side_by_side_is_the_selection_of_each(library, shapes):
    """S2/S3 for a stack's several arrays: arrays of one shape are tested and selected side by side
    (``side_by_side``: one ``where``), others one by one; either way each array's kept blocks are
    ``where(accept, new, old)`` of its own blocks (accept: a non-zero gradient and every array of
    the block finite), the flags those of the plain rule, and on torch (no free read of all-usable
    here: a block fails) the arrays of one shape are handed back as one allocation's consecutive
    pieces (the next refresh joins them without a copy)."""
    rng = np.random.default_rng(len(shapes))
    grouped = np.stack([np.zeros((2, 2)), np.ones((2, 2)), np.ones((2, 2))])
    old = tuple(rng.normal(size=(3,) + s) for s in shapes)
    new = [rng.normal(size=(3,) + s) for s in shapes]
    new[-1][2, 0, 0] = np.nan  # block 2 fails in one array only: every array of it keeps its old state
    accept = np.array([False, True, False])
    if library == "torch":
        torch = pytest.importorskip("torch")
        old, new = tuple(torch.from_numpy(a) for a in old), tuple(torch.from_numpy(a) for a in new)
        grouped = torch.from_numpy(grouped)
    from array_api_compat import array_namespace

    xp = array_namespace(grouped)
    *kept, failed = tiling.kept_where_usable(xp, grouped, old, tuple(new))
    for k, a, b in zip(kept, new, old):
        np.testing.assert_array_equal(np.asarray(k), np.where(accept.reshape((3,) + (1,) * (a.ndim - 1)), np.asarray(a), np.asarray(b)))
    np.testing.assert_array_equal(np.asarray(failed), [False, False, True])
    if library == "torch" and len(set(shapes)) == 1:
        assert [k.data_ptr() for k in kept[1:]] == [k.data_ptr() + k.numel() * 8 for k in kept[:-1]]


@pytest.mark.parametrize("side_by_side", [True, False])
def test_read_factors_casts_each_bf16_factor_without_a_stack_copy(side_by_side):
    """With stochastic rounding, bf16 factors are read as G's dtype: each one cast exactly
    (``xp.astype``), float32 factors as they are. Factors that lie side by side in one allocation
    (as a refresh stores them) are cast in one call on their view; others are cast one by one, with
    no ``stack`` or ``cat`` (a stack would copy every factor once more before its cast)."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(3)
    joint = torch.randn((2, 3, 4, 4), generator=gen).to(torch.bfloat16)
    K1, K2 = (joint[0], joint[1]) if side_by_side else (joint[0].clone(), joint[1].clone())
    other = torch.randn((3, 4, 4), generator=gen)  # float32: read as stored
    G = torch.randn((3, 4, 4), generator=gen)
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Ops():
        read = tiling._read_factors(SimpleNamespace(factor_rounding="stochastic"), array_namespace(G), (K1, other, K2), G)
    assert [a.dtype for a in read] == [torch.float32] * 3
    for a, b in zip(read, (K1.to(torch.float32), other, K2.to(torch.float32))):
        assert torch.equal(a, b)
    assert read[1] is other
    copies = [op for op in ops if op in ("stack", "cat", "_to_copy", "copy_", "clone")]
    assert copies == ["_to_copy"] * (1 if side_by_side else 2), ops


@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 5), (2, 3, 2, 2)])
def test_each_block_reduces_every_entry_of_a_block(rng, shape):
    """``each_block(xp, xp.all | xp.any, mask)`` is ``all``/``any`` over every axis but the first
    (boolean: exact), also for a mask that is a transposed (non-contiguous) view."""
    for mask in (rng.random(shape) < 0.9, np.moveaxis(rng.random(shape[:1] + shape[1:][::-1]) < 0.9, 1, -1)):
        mask[0] = True  # one block all true, so that ``all`` is true somewhere
        axes = tuple(range(1, mask.ndim))
        np.testing.assert_array_equal(tiling.each_block(_np(), _np().all, mask), np.all(mask, axis=axes))
        np.testing.assert_array_equal(tiling.each_block(_np(), _np().any, mask), np.any(mask, axis=axes))


def test_each_block_is_one_reduction_in_torch():
    """The reason for ``each_block``: on torch, ``all`` over several axes through the array API
    is a transpose, a flatten, the reduction and a cast; over the (b, -1) view it is a view and
    one reduction, whatever the rank."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace
    from dispatched import Dispatched

    mask = torch.rand(4, 3, 5, 6, dtype=torch.float64) < 0.5
    txp = array_namespace(mask)
    for reduce in (txp.all, txp.any):
        with Dispatched() as seen:
            tiling.each_block(txp, reduce, mask)
        assert len(seen.names) == 2 and seen.names[0] in ("view", "reshape", "_unsafe_view"), seen.names


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_leaves_of_batches_is_the_joins(library, rng, monkeypatch):
    """``leaves_of_batches`` (the batches' per-tile results joined, then one gather by an index
    made once per layout) hands every member exactly the part that joining its group's stacks
    back and cutting the group into its members gives (``_leaves_by_joins``, the plain formula):
    groups of equal, ragged and weight-and-bias tiles, batched across groups and phases as the
    runner batches them. Exact (no arithmetic); on torch the members lie end to end in one
    allocation, in order (what lets the element-wise work after join them without a copy).
    NumPy takes the joins (``gathering``); its case runs the gather anyway, as an array-API
    library that launches its operations (CuPy) does."""
    from precond_ref.blocking import stack
    from precond_ref.engine.layout import grouped_shape

    members_of = [[(12, 8)], [(8, 11), (8,)], [(10,)], [(4, 8)], [(7,)]]
    groups, parts = [], []
    for shapes in members_of:
        full, dims = grouped_shape(shapes, True)
        plan = tiling.tile_plan(dims, [False] * len(dims), 4, 2, True)
        groups.append(tiling._Group(None, shapes, full, True, plan, None, len(groups)))
        for s, st in enumerate(plan.stacks):
            parts.append(((len(groups) - 1, s), rng.normal(size=(len(st.tiles),) + st.shape)))
    if library == "torch":
        torch = pytest.importorskip("torch")
        parts = [(m, torch.from_numpy(x)) for m, x in parts]
    from array_api_compat import array_namespace

    xp = array_namespace(parts[0][1])
    chosen = [m for m, _ in parts]
    batched = stack(xp, [(x,) for _, x in parts])
    assert len(batched) < len(parts)  # stacks of one tile shape batched across groups
    results = [b.operands[0] for b in batched]
    if library == "numpy":
        assert not tiling.gathering(xp, results)
        monkeypatch.setattr(tiling, "gathering", lambda xp, arrays: True)
    got = tiling.leaves_of_batches(xp, results, chosen, batched, groups)
    want = tiling._leaves_by_joins(xp, results, chosen, batched, groups)
    assert [tuple(a.shape) for a in got] == [tuple(s) for shapes in members_of for s in shapes]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if library == "torch":
        ends = [a.data_ptr() + a.numel() * a.element_size() for a in got[:-1]]
        assert ends == [a.data_ptr() for a in got[1:]]


def _states_with_factors(shapes_per_stack):
    """A group's state as far as ``tiles_of_groups`` reads it: per stack, its factors (zeros of
    these shapes), whose trailing shapes and dtypes batch it with other groups' stacks."""
    return SimpleNamespace(stacks=[SimpleNamespace(factor=tuple(np.zeros(s) for s in shapes)) for shapes in shapes_per_stack])


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_tiles_of_groups_are_the_cuts(library, rng, monkeypatch):
    """``tiles_of_groups`` (all gradients joined, then one gather by an index made once per layout)
    gives every group exactly the stacks that joining its members and cutting the tensor give
    (``_cut_each``, the plain formula: ``cut_stacks`` of ``group_tensor``): equal, ragged and
    weight-and-bias tiles, a squeezed (1, n) weight and its bias. Exact (no arithmetic); on
    torch the stacks of one key lie end to end by refresh phase, then group (a batch of them joins
    as a view). NumPy takes the cuts (``gathering``); its case runs the gather anyway, as an
    array-API library that launches its operations (CuPy) does."""
    from array_api_compat import array_namespace

    from precond_ref.engine.layout import grouped_shape

    members_of = [[(8, 6), (8,)], [(8, 8)], [(4,)], [(1, 8), (1,)], [(12, 8)]]
    grads = [[rng.normal(size=s) for s in shapes] for shapes in members_of]
    if library == "torch":
        torch = pytest.importorskip("torch")
        grads = [[torch.from_numpy(g) for g in gs] for gs in grads]
    xp = array_namespace(grads[0][0])
    groups, fields = [], []
    for shapes in members_of:
        full, dims = grouped_shape(shapes, True)
        plan = tiling.tile_plan(dims, [False] * len(dims), 4, 2, True)
        groups.append(tiling._Group(grads[0][0].dtype, shapes, full, True, plan, None, len(groups)))
        fields.append(_states_with_factors([[(1,) + st.shape] for st in plan.stacks]))  # keyed by tile shape
    if library == "numpy":
        assert not tiling.gathering(xp, [g for gs in grads for g in gs])
        monkeypatch.setattr(tiling, "gathering", lambda xp, arrays: True)
    got = tiling.tiles_of_groups(xp, grads, groups, fields)
    want = tiling._cut_each(xp, grads, groups)
    assert [len(g) for g in got] == [len(g.plan.stacks) for g in groups]
    for a, b in zip((x for g in got for x in g), (x for g in want for x in g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if library == "torch":  # the (4, 4) stacks of phase 0 of groups 1 and 4, in order: consecutive pieces
        assert got[1][0].data_ptr() + got[1][0].numel() * 8 == got[4][0].data_ptr()


def test_gathers_only_below_their_bound(monkeypatch):
    """``gathering``: a gather's int32 index is as large as the entries it covers, so above
    ``GATHER_MAX_ELEMENTS`` entries the tiles are cut group by group (no gather issued), with the
    same stacks."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace
    from dispatched import Dispatched

    from precond_ref.engine.layout import grouped_shape

    grads = [[torch.randn(8, 12, dtype=torch.float64)], [torch.randn(8, 8, dtype=torch.float64)]]
    groups = []
    for (g,) in grads:
        full, dims = grouped_shape([tuple(g.shape)], True)
        plan = tiling.tile_plan(dims, [False, False], 4, 2, True)
        groups.append(tiling._Group(torch.float64, [tuple(g.shape)], full, True, plan, None,
                                    len(groups)))
    xp, fields = array_namespace(grads[0][0]), [_states_with_factors([[(1, 1)]] * 2)] * 2
    assert tiling.gathering(xp, [g for (g,) in grads])
    monkeypatch.setattr(tiling, "GATHER_MAX_ELEMENTS", 8 * 12 + 8 * 8 - 1)
    assert not tiling.gathering(xp, [g for (g,) in grads])  # one entry over
    with Dispatched() as seen:
        got = tiling.tiles_of_groups(xp, grads, groups, fields)
    assert "index_select" not in seen.names
    for a, b in zip((x for g in got for x in g), (x for g in tiling._cut_each(xp, grads, groups) for x in g)):
        assert torch.equal(a, b)


def test_jitted_if_shampoo_without_x64_warns_of_nothing():
    """JAX's default settings (no x64) have no int64: an array asked for in int64 comes back int32
    with a UserWarning at every trace. The tiles' index arrays (takes, interleaved places, run
    indicators) take the namespace's own indexing dtype, so IF-Shampoo's jitted optax step on a
    weight with its bias (tiles of unequal groups) traces without a warning and keeps int32."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    import warnings

    from precond_ref.adapters import jax as pj

    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = pj.if_shampoo(learning_rate=0.1, batch_size=8)
        params = {"fc": {"weight": jnp.ones((300, 20)), "bias": jnp.ones(300)}, "w2": jnp.ones((7, 5))}
        state = opt.init(params)
        updates, state = jax.jit(opt.update)(params, state, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
