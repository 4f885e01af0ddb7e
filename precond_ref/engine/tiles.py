"""Tiles: a tensor's long axes cut into blocks (Distributed Shampoo's blocking), each tile of the
tensor an independent block of a method with its own state, and the tiles of one shape and refresh
phase kept as one stack (a leading tile axis), so that a rule states its step for one stack.

:func:`tile_plan` cuts a tensor and groups its tiles into stacks and regions (boxes of
equal tiles), :func:`cut_stacks` and :func:`join_stacks` take a tensor to its stacks and back by
reshapes (a state saved per tile or with a vector's dense tiles loads as the stacks:
:func:`~precond_ref.engine.checks.tiled_legacy_names`). :func:`tiled_transform` runs a rule stated for one
stack of tiles (:class:`TiledRule`, IF-Shampoo's) on every group of a tree: grouping, tiling,
stacking across groups, the refresh phases (:func:`~precond_ref.engine.phases.refreshes`), the
keeping of unusable refreshes (:func:`kept_where_usable`) and their counts, the per-group sums of
the KL clip in tile order (:func:`sums_in_tile_order`), the skip rule's settling and the
element-wise last lines, as the factory's :class:`TileLayout` says (blocking, grouping, and the
rule's choice of diagonal axes and factor dtypes). The fast forms (one gather for the cuts of all
groups and one for the joins back, the failure counts of a batch at once, operands side by side)
stand in one section at the end, each beside its plain form
(:func:`~precond_ref._backend.plain_forms`)."""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence

from array_api_compat import is_jax_namespace

from .._backend import (
    array_device, as_operand, cast, compute_dtype, consecutive_view, device_key, index_dtype, is_numpy_namespace,
    is_torch_namespace, leading_rows, pieces, placement, plain, scalar_zero, stacked, torch_compiling,
)
from ..blocking import block_bounds, same_layout, spread_schedule, unstack as unstack_alike
from ..linalg import all_finite
from ..transform import Transform, check_positive, singleton_groups
from ..tree import path_str, tree_flatten, tree_unflatten
from .checks import tiled_legacy_names
from .factors import constant, per_block
from .joined import leafwise
from .layout import group_tensor, grouped_shape, ungroup_tensor, weight_bias_groups
from .options import operands as in_dtype
from .phases import handed_back, phase_stacks, refreshes, tile_phase
from .rounding import is_bfloat16, place_keys, place_noise, rounded_with_noise, rounding_key
from .run import build_transform

__all__ = ["TiledRule", "TileLayout", "tiled_transform", "old_layout_hint", "tile_plan", "taken"]

Array = Any

def old_layout_hint(found: dict, layout: dict) -> str:
    """``build_transform``'s ``layout_hint``: where a saved state does not fit, the arguments that
    load one saved unblocked."""
    return (" if_shampoo: a state saved with unblocked factors, diagonal beyond 4096, loads with "
            "if_shampoo(block_size=4096, max_dense_dim=4096)")


class Tile(NamedTuple):
    """One tile of a group's tensor: an independent IF-Shampoo block with its own factors."""

    index: tuple  # (start, stop) per axis of the squeezed grouped tensor
    offset: int  # its refresh phase (precond_ref.blocking.PhaseDue)


def first_appearance(keys: Sequence[Any]) -> tuple:
    """The positions of ``keys`` grouped by equal key, groups in order of their first position:
    ``("a", "b", "a") -> ((0, 2), (1,))``."""
    return tuple([tuple([n for n in range(len(keys)) if keys[n] == key]) for key in dict.fromkeys(keys)])


class TileStack(NamedTuple):
    """A stack of a group's state: its tiles of one shape and one refresh phase (S9, S10)."""

    tiles: tuple  # their numbers t (row-major over the tile grid), ascending
    phase: int  # their refresh phase
    positions: tuple  # their places in the row-major order of their region's tiles
    shape: tuple  # their tile shape


class Region(NamedTuple):
    """A group's tiles of one shape: a box of its tensor cut into equal tiles (the whole tensor
    when every cut axis divides evenly; else the body and the boxes of the shorter end tiles)."""

    index: tuple  # the box, (start, stop) per axis
    counts: tuple  # its tiles per axis
    size: tuple  # the tile shape
    stacks: tuple  # the numbers s of the stacks of its tiles


class TilePlan(NamedTuple):
    """How a group's tensor is tiled and its tiles' state stacked."""

    tiles: tuple  # Tile's, row-major
    stacks: tuple  # TileStack's, in order of the first tile of each (shape, phase)
    regions: tuple  # Region's, row-major over the grid of boxes
    grid: tuple  # boxes per axis


def tile_plan(dims: tuple, diagonal: Sequence[bool], block_size: Optional[int], interval: Any, stagger: bool,
              cut_diagonal: bool = False) -> TilePlan:
    """How a grouped tensor of shape ``dims`` is tiled: every dense axis longer than ``block_size``
    cut by :func:`precond_ref.blocking.block_bounds` (a diagonal axis only with ``cut_diagonal``),
    tiles in row-major order (tile ``t``), each with its refresh phase
    (:func:`~precond_ref.engine.phases.tile_phase`); their stacks (one per tile shape and refresh
    phase, in order of first appearance, tiles ascending: what
    :func:`~precond_ref.engine.checks.stacked_tiles` rebuilds from per-tile entries) and the regions
    (one per tile shape) that cut them out of the tensor by reshapes."""
    bounds = [((0, d),) if diag and not cut_diagonal else block_bounds(d, block_size) for d, diag in zip(dims, diagonal)]
    tiles = tuple(Tile(index, tile_phase(t, interval, stagger)) for t, index in enumerate(itertools.product(*bounds)))
    shapes = [tuple(stop - start for start, stop in tile.index) for tile in tiles]
    # a tile's place among the tiles of its shape (row-major over its region)
    place = {t: j for members in first_appearance(shapes) for j, t in enumerate(members)}
    stacks = tuple(TileStack(members, tiles[members[0]].offset, tuple(place[t] for t in members), shapes[members[0]])
                   for members in first_appearance([(shape, tile.offset) for shape, tile in zip(shapes, tiles)]))
    regions = []
    for size in dict.fromkeys(shapes):  # the box of the tiles of one shape: per axis, the cuts of that length
        axes = [[(a, b) for a, b in cuts if b - a == n] for cuts, n in zip(bounds, size)]
        regions.append(Region(tuple((cuts[0][0], cuts[-1][1]) for cuts in axes), tuple(len(cuts) for cuts in axes),
                              size, tuple(s for s, stack in enumerate(stacks) if stack.shape == size)))
    grid = tuple(len({b - a for a, b in cuts}) for cuts in bounds)  # boxes per axis: one per length of its cuts
    return TilePlan(tiles, stacks, tuple(regions), grid)


def cut(G, index: tuple):
    """The tile ``index`` ((start, stop) per axis) of a tensor ``G``."""
    return G[tuple(slice(start, stop) for start, stop in index)]


def join(xp, pieces: Sequence[Any], counts: Sequence[int]):
    """The tensor whose tiles, in row-major order over a grid of ``counts`` tiles per axis, are
    ``pieces`` (the inverse of cutting by :func:`tile_plan`)."""
    if len(counts) == 0 or len(pieces) == 1:
        return pieces[0]
    size = math.prod(counts[1:])
    rows = [join(xp, pieces[i * size : (i + 1) * size], counts[1:]) for i in range(counts[0])]
    return xp.concat(rows, axis=len(pieces[0].shape) - len(counts))


def to_tiles(xp, G, counts: tuple, size: tuple):
    """The stack ``(k, b_1, ..., b_N)`` of the equal tiles of ``G`` in row-major order: one reshape
    to ``(c_1, b_1, ..., c_N, b_N)``, one transpose and one reshape, not ``k`` slices."""
    split = xp.reshape(G, tuple(x for pair in zip(counts, size) for x in pair))
    grid_first = xp.permute_dims(split, tuple(range(0, 2 * len(counts), 2)) + tuple(range(1, 2 * len(counts), 2)))
    return xp.reshape(grid_first, (math.prod(counts),) + size)


def from_tiles(xp, tiles, counts: tuple, size: tuple):
    """The tensor whose equal tiles, in row-major order, are the stack ``tiles`` (inverse of
    :func:`to_tiles`)."""
    grid_first = xp.reshape(tiles, counts + size)
    split = xp.permute_dims(grid_first, tuple(x for n in range(len(counts)) for x in (n, len(counts) + n)))
    return xp.reshape(split, tuple(c * b for c, b in zip(counts, size)))


def index_array(xp, positions: tuple, like):
    """``positions`` as an index array for ``take`` beside ``like``, made once per device
    (:func:`~precond_ref.engine.factors.constant`)."""
    make = lambda: xp.asarray(list(positions), dtype=index_dtype(xp, like), device=placement(xp, like))  # noqa: E731
    return constant(xp, ("index", positions), make, like)


def pick(xp, stack, positions: tuple):
    """``stack[positions]`` along the leading axis: a slice where ``positions`` step evenly (the
    stack itself; a phase of equal tiles: every T-th), else one ``take``."""
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    if step > 0 and positions == tuple(range(positions[0], positions[-1] + 1, step)):
        return stack if len(positions) == stack.shape[0] else stack[positions[0] : positions[-1] + 1 : step, ...]
    return taken(xp, stack, index_array(xp, positions, stack))


def unpick(xp, parts: Sequence[Any], positions: Sequence[tuple]):
    """The stack ``S`` with ``S[positions[i][j]] = parts[i][j]`` (the inverse of :func:`pick`; the
    positions of all parts together are ``0..k-1``): the part itself; for ``T`` parts that each hold
    every ``T``-th tile (:func:`pick`'s slices), one ``stack`` along a second axis, whose rows in
    order are the tiles in order; else a ``concat`` and one ``take``."""
    if len(parts) == 1:
        return parts[0]
    count, k = len(parts), sum(len(p) for p in positions)
    firsts = [p[0] for p in positions]
    if k % count == 0 and sorted(firsts) == list(range(count)) and all(tuple(p) == tuple(range(p[0], k, count)) for p in positions):
        interleaved = xp.stack([parts[firsts.index(first)] for first in range(count)], axis=1)
        return xp.reshape(interleaved, (k,) + tuple(parts[0].shape[1:]))
    order = [j for p in positions for j in p]
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))  # S[j] = concat(parts)[inverse[j]]
    return taken(xp, xp.concat(list(parts), axis=0), index_array(xp, inverse, parts[0]))


def cut_stacks(xp, G, plan: TilePlan) -> list:
    """The tiles of ``G`` as the plan's stacks: ``out[s] = stack([cut(G, tiles[t].index) for t in
    stacks[s].tiles])``, by reshapes: each region's box cut into its equal tiles
    (:func:`to_tiles`), each stack picked from them (:func:`pick`)."""
    out = {}
    for region in plan.regions:
        tiles = to_tiles(xp, G if len(plan.regions) == 1 else cut(G, region.index), region.counts, region.size)
        out.update((s, pick(xp, tiles, plan.stacks[s].positions)) for s in region.stacks)
    return [out[s] for s in range(len(plan.stacks))]


def join_stacks(xp, parts: Sequence[Any], plan: TilePlan):
    """The inverse of :func:`cut_stacks`: the tensor whose tiles are the stacks ``parts`` (each
    region's tiles put in order by :func:`unpick`, the box by :func:`from_tiles`; the boxes joined
    by :func:`join`)."""
    boxes = [from_tiles(xp, unpick(xp, [parts[s] for s in region.stacks], [plan.stacks[s].positions for s in region.stacks]),
                        region.counts, region.size) for region in plan.regions]
    return join(xp, boxes, plan.grid)


def sums_in_tile_order(xp, vectors: Sequence[Any], members: Sequence[Sequence[tuple]], plans: Sequence[TilePlan]
                       ) -> list:
    """``Σ_t x_t`` per group of a per-tile quantity, summed over the group's tiles in row-major
    order. ``vectors[m]`` holds the values of batch ``m``, the tiles of its members ``members[m]``
    ((group, stack) numbers of ``plans``) one after the other. The batches of one dtype and device
    joined, every group's values put in its tile order by one ``take`` (none where they are so
    already), the groups of one number ``k`` of tiles next to each other, and each such run summed
    by one ``sum`` over the rows of its ``(groups, k)`` matrix (a row's sum is that row's alone)."""
    out: list = [None] * len(plans)
    for batches in first_appearance([(vector.dtype, device_key(vector)) for vector in vectors]):
        tiles = [(i, t) for m in batches for i, s in members[m] for t in plans[i].stacks[s].tiles]  # (group, tile)
        place = {tile: n for n, tile in enumerate(tiles)}  # its place in the batches joined
        groups = sorted(dict.fromkeys(i for i, _ in tiles), key=lambda i: len(plans[i].tiles))
        order = tuple(place[i, t] for i in groups for t in range(len(plans[i].tiles)))
        joined = vectors[batches[0]] if len(batches) == 1 else xp.concat([vectors[m] for m in batches], axis=0)
        joined = pick(xp, joined, order)  # the tiles in order: none where they are so already
        start = 0
        for k, same in itertools.groupby(groups, key=lambda i: len(plans[i].tiles)):
            same = list(same)
            rows = xp.reshape(joined[start : start + k * len(same)], (len(same), k))
            for i, total in zip(same, leading_rows(xp, xp.sum(rows, axis=1))):
                out[i] = total
            start += k * len(same)
    return out


def taken(xp, x, index):
    """``xp.take(x, index, axis=0)`` for an ``index`` of non-negative places (the engine's
    constants): on torch one ``index_select`` (array_api_compat's ``take`` first maps negative
    places, three more operations)."""
    return x.index_select(0, index) if is_torch_namespace(xp) else xp.take(x, index, axis=0)


def per_tile(xp, values: Sequence[Any], lengths: Sequence[int], like=None):
    """Per-group 0-D ``values``, the group of ``lengths[j]`` consecutive tiles of a stack (b, ...)
    taking ``values[j]``: ``values[0]`` itself for one group (it broadcasts), else the (b,) vector
    of each tile's value, shaped to scale a stack ``like`` tile by tile where given."""
    if len(values) == 1:
        return values[0]
    each = xp.concat([xp.broadcast_to(xp.reshape(v, (1,)), (n,)) for v, n in zip(values, lengths)])
    return each if like is None else per_block(xp, each, like)


def each_block(xp, reduce, mask):
    """``reduce`` (``xp.all`` or ``xp.any``) of each block of a (b, ...) boolean stack over all its
    entries: one reduction of the (b, -1) view (a reduction over several axes is a transpose and a
    copy first in some namespaces)."""
    return reduce(xp.reshape(mask, (mask.shape[0], -1)), axis=1)


def kept_where_usable(xp, grouped, old, new):
    """Per block of a stack: a block whose gradient is exactly zero keeps its state ``old``, so does
    one whose new state is not finite (IF-Shampoo's S2, S3). Returns the kept state and, per block,
    whether it failed (a non-finite state from a non-zero gradient; counted by the caller). The
    state's arrays of one dtype are tested together, their blocks side by side (one test, not one
    per array); those of one dtype and one shape are also selected together (:func:`side_by_side`:
    one ``where``, the kept arrays consecutive pieces of its result). Element-wise (``where``): no
    device value is read."""
    nonzero = each_block(xp, xp.any, grouped != 0.0)
    accept, joints, alone = nonzero, {}, []
    for members in first_appearance([a.dtype for a in new]):  # one test of the entries of all arrays of one dtype
        joint = side_by_side(xp, [new[n] for n in members])
        if joint is not None:  # (arrays, k, ...): each block's entries of all arrays
            joints[members] = joint
            ok = all_finite(xp.reshape(joint, (joint.shape[0], joint.shape[1], -1)), axis=(0, 2))
        else:
            rows = [xp.reshape(new[n], (new[n].shape[0], -1)) for n in members]
            ok = all_finite(rows[0] if len(rows) == 1 else xp.concat(rows, axis=1), axis=(1,))
            alone += members
        accept = xp.logical_and(accept, ok)
    failed = xp.logical_xor(nonzero, accept)  # nonzero and not finite
    kept = {n: xp.where(per_block(xp, accept, new[n]), new[n], old[n]) for n in alone}  # one selection per array
    for members, joint in joints.items():  # one selection of the arrays side by side
        chosen = xp.where(per_block(xp, accept, joint[0, ...])[None, ...], joint, stacked(xp, [old[n] for n in members]))
        kept.update((n, chosen[j, ...]) for j, n in enumerate(members))
    return tuple(kept[n] for n in range(len(new))) + (failed,)


def _cut_each(xp, grads_list: Sequence[Sequence[Any]], groups: Sequence[Any]) -> list:
    """Each group's members joined into its tensor G in its work dtype
    (:func:`~precond_ref.engine.layout.group_tensor`) and cut into the stacks of its plan
    (:func:`cut_stacks`)."""
    return [cut_stacks(xp, group_tensor(xp, grads, g.full, grouped_shape(g.shapes, g.out_first)[1], g.out_first, g.dtype),
                       g.plan) for grads, g in zip(grads_list, groups)]


def _leaves_by_joins(xp, results: Sequence[Any], chosen: Sequence[tuple], batched: Sequence[Any], groups: Sequence[Any]
                     ) -> list:
    """Every member's part of per-tile results computed on batches of stacks (``results[b]`` of
    ``batched[b]``'s shape, its members the (group, stack) numbers ``chosen``): each group's stacks
    joined back into its tensor (:func:`join_stacks`) and cut into its members
    (:func:`~precond_ref.engine.layout.ungroup_tensor`), groups and members in order."""
    parts = {m: part for m, (part,) in zip(chosen, unstack_alike(batched, [(r,) for r in results], len(chosen)))}
    return [leaf for i, g in enumerate(groups) for leaf in ungroup_tensor(
        xp, join_stacks(xp, [parts[i, s] for s in range(len(g.plan.stacks))], g.plan), g.shapes, g.full, g.out_first)]


# --------------------------------------------------------------------------------------------
# The runner of a rule stated for one stack of tiles


class TiledRule(NamedTuple):
    """A Kronecker-factored method stated for one stack of tiles (IF-Shampoo), run by
    :func:`tiled_transform`.

    ``State`` is a group's state, a NamedTuple ``(stacks, momentum, preconditioner_lr_scale,
    failures)``: one ``Stack`` per stack of the group's :class:`TilePlan`, the momentum of each
    member (``()`` without), the group's multiplier of the refresh's step size (``None`` without) and
    its count of discarded refreshes (``None`` where none is counted). ``Stack`` is one stack's state,
    a NamedTuple ``(factor, factor_momentum)`` of one array per axis with a leading tile axis. The
    functions, of one stack of ``k`` tiles ``G`` (``(k, d_1, ..., d_N)``, the work dtype):

    * ``scalars(c, value, extra) -> h``: the step's scalars, ``h.beta2`` the refresh's step size;
    * ``init(xp, c, k, dims, diagonal, dtypes, device) -> Stack``;
    * ``refresh(xp, c, h, G, stack) -> Stack``: the periodic factor step, with ``c`` as operands of
      the dtype it computes in (the first factor's, :func:`~precond_ref.engine.options.operands`)
      and ``h`` as operands of ``G``'s dtype but for ``h.beta2``, the step size: ``h.beta2`` times
      each tile's group's multiplier (a (k,) vector, or one value for all, without multipliers),
      an operand of the factors' dtype;
    * ``precondition(xp, c, G, factors) -> D``;
    * ``inner(xp, D, G)`` (per tile, ``G`` in ``D``'s dtype; summed per group by the runner) and ``clip(xp, c, h, inner)``
      (the per-group scales of ``D`` from the per-group sums, ``c`` and ``h`` as operands of their
      dtype; with ``c.use_kl_clip``);
    * ``descend(xp, c, operand, D, W, v, zero) -> (update, v)``: element-wise, of a leaf (or of
      leaves joined end to end); ``W`` in ``D``'s dtype; ``W`` and ``v`` ``None`` where unused; ``operand(name, like)`` is
      the configuration's or the step's value ``name`` as a 0-D array of ``like``'s dtype;
    * ``diagonal(xp, K)``: the diagonal factors nearest to a stack of dense ones (a state saved with
      a vector's dense tiles, loaded where its factor is diagonal).
    """

    name: str
    State: type
    Stack: type
    scalars: Callable
    init: Callable
    refresh: Callable
    precondition: Callable
    inner: Callable
    clip: Callable
    descend: Callable
    diagonal: Callable


class TileLayout(NamedTuple):
    """How a group's tensor is tiled and its state laid out (:func:`tiled_transform`), from the
    options of the method's factory (which checks them).

    ``block_size``: dense axes longer than it are cut (``None``: none); ``interval``, ``stagger``:
    the refresh interval and whether the tiles of a blocked tensor spread over it
    (:func:`~precond_ref.engine.phases.tile_phase`); ``diagonal(dims, where) -> flags``: which axes
    of a group's squeezed tensor of ``dims`` (``where``: its first leaf's path) have a diagonal
    factor; ``dtypes(xp, leaf, rank, where) -> list``: the factors' dtype per axis for parameters
    like ``leaf``; ``vectors_cut``: a vector's diagonal factor is cut into blocks as a dense axis
    is (its blocks stack with every other vector's, each clamped alone), and a state saved with a
    vector's dense tiles loads as its diagonal factors (:func:`~precond_ref.engine.checks.diagonal_vector`);
    ``parameter_dtype``: the grouped gradient and the momentum in the parameters' dtype, else in
    their compute dtype (:func:`work_dtype`); ``weight_bias``: a layer's weight and bias are one group
    (:func:`~precond_ref.engine.layout.weight_bias_groups`); ``group_scale``: ``path -> float``
    multiplying the refresh's step size per group, or ``None``; ``counted``: whether a tile whose
    gradient is zero or whose refresh is not finite keeps its factors (:func:`kept_where_usable`),
    the failures counted per group; then a skipped step's factors (its gradient zeroed) are known
    kept; ``old_layout``: the hint where a state does not fit, or ``None``; ``factor_rounding``:
    ``"nearest"`` (the rule computes in the factors' dtype) or ``"stochastic"`` (bf16 factors are
    read into the work dtype, the rule computes there, and the refreshed factors and momenta are
    stored back by :func:`~precond_ref.engine.rounding.round_stochastic`)."""

    block_size: Optional[int]
    interval: Any
    stagger: bool
    diagonal: Callable = lambda dims, where: (False,) * len(dims)
    dtypes: Callable = lambda xp, leaf, rank, where: [compute_dtype(xp, leaf.dtype)] * rank
    vectors_cut: bool = False
    parameter_dtype: bool = False
    weight_bias: bool = False
    group_scale: Optional[Callable] = None
    counted: bool = True
    old_layout: Optional[Callable] = None
    factor_rounding: str = "nearest"


def work_dtype(layout: TileLayout, xp, dtype):
    """The dtype of the grouped gradient and of the momentum: the parameters' (``parameter_dtype``),
    else their compute dtype."""
    return dtype if layout.parameter_dtype else compute_dtype(xp, dtype)


class _Group(NamedTuple):
    """One group's gradient as the tensor G it preconditions, and how to cut the step back."""

    dtype: Any  # the work dtype G is cut in
    shapes: list  # the members' shapes (a weight, or a weight and its bias)
    full: tuple  # G's shape before squeezing
    out_first: bool  # bias as an extra column (out-first weight) or row (out-last kernel)
    plan: Any  # its TilePlan: tiles, and the stacks their state is stored in
    stacks: list  # G's tiles as the plan's stacks (k_s, *tile shape), s = 0, 1, ...
    number: int  # its layout's number in the transform (its shapes and pairing, which give its plan)


class _Tiling(NamedTuple):
    """What a tiled transform keeps between steps: the rule, its configuration, the layout, the
    refresh schedule, and what it has worked out once per group layout."""

    rule: TiledRule
    c: NamedTuple
    layout: TileLayout
    intervals: tuple  # per refresh phase, its interval (precond_ref.blocking.spread_schedule)
    plans: dict  # (shapes, out_first) -> what _plan hands back: made once per layout, not every step


def tiled_transform(
    rule: TiledRule, c: NamedTuple, layout: TileLayout, *, on_nonfinite: str,
) -> Transform:
    """The :class:`~precond_ref.transform.Transform` that runs ``rule`` with configuration ``c`` on
    every group's tiles (``layout``).

    Per step (:func:`_update_groups`): each group's members joined into one tensor
    (:func:`~precond_ref.engine.layout.group_tensor`) and cut into its stacks of tiles
    (:func:`cut_stacks`); on the calls where a refresh phase is due
    (:func:`precond_ref.blocking.spread_schedule` of the layout's interval), the stacks of that
    phase refreshed, the stacks of all groups of one tile shape, dtype and device concatenated into one call
    (:func:`precond_ref.blocking.stack`); every stack preconditioned, clipped per group, joined back
    (:func:`join_stacks`) and cut into its members; the members' last lines element-wise, joined
    end to end (:func:`~precond_ref.engine.joined.leafwise`).
    """
    t = _Tiling(rule, c, layout, spread_schedule(layout.interval, layout.stagger and isinstance(layout.interval, int)), {})
    return build_transform(
        name=rule.name, init_group=partial(_init_group, t), update_groups=partial(_update_groups, t),
        group_leaves=weight_bias_groups if layout.weight_bias else singleton_groups, on_nonfinite=on_nonfinite,
        needs_params=c.use_decay, intervals=t.intervals, layout_hint=layout.old_layout,
        legacy_names=partial(tiled_legacy_names, layout=layout, diagonal=rule.diagonal if layout.vectors_cut else None))


def _plan(t: _Tiling, shapes, out_first: bool, where: str) -> tuple:
    """A group layout's (per-axis diagonal flags of its squeezed tensor, tile plan, its state's
    structure and entry names (of the rule's ``State`` of its stacks: the tree structure a state's
    entries are read back into, :func:`~precond_ref.tree.tree_unflatten`, and its paths as
    :func:`precond_ref.tree.to_entries` names them, in its order: :func:`_entries`), its number
    in the transform: the key of the gathers' indices): the one description of its stacks that
    init, the reading and writing of its state and the check of its factors' shapes use, made once
    per layout."""
    key = (tuple(shapes), out_first)
    if key not in t.plans:
        rule, c, layout = t.rule, t.c, t.layout
        dims = grouped_shape(shapes, out_first)[1]
        diagonal = layout.diagonal(dims, where)
        plan = tile_plan(dims, diagonal, layout.block_size, layout.interval, layout.stagger,
                         cut_diagonal=layout.vectors_cut and len(dims) == 1)
        zeros = (0,) * len(dims)
        template = rule.State(stacks=(rule.Stack(zeros, zeros if c.use_factor_momentum else ()),) * len(plan.stacks),
                              momentum=(0,) * len(shapes) if c.use_momentum else (),
                              preconditioner_lr_scale=0 if layout.group_scale is not None else None,
                              failures=0 if layout.counted else None)
        structure = tree_flatten(template)[1]
        t.plans[key] = diagonal, plan, (structure, tuple(path_str(path) for path in structure.paths)), len(t.plans)
    return t.plans[key]


def _init_group(t: _Tiling, leaves, paths, xp):
    """``build_transform``'s ``init_group``: a group's state, the rule's stacks of its tiles, as
    its entries (:func:`_entries`)."""
    rule, c, layout = t.rule, t.c, t.layout
    where = path_str(paths[0])
    diagonal, plan, (_, keys), _ = _plan(t, [tuple(x.shape) for x in leaves], len(leaves) == 1 or paths[0][-1] != "kernel", where)
    param_dtype, dev = leaves[0].dtype, array_device(leaves[0])
    dtypes = layout.dtypes(xp, leaves[0], len(diagonal), where)
    scale = None if layout.group_scale is None else layout.group_scale(paths[0])  # the refresh step size's multiplier
    if scale is not None:
        check_positive(f"preconditioner_lr_scale({where!r})", scale)
        scale = xp.asarray(scale, dtype=compute_dtype(xp, param_dtype), device=dev)
    momentum = [xp.zeros(x.shape, dtype=work_dtype(layout, xp, param_dtype), device=dev) for x in leaves] if c.use_momentum else []
    return _entries(keys, [rule.init(xp, c, len(stack.tiles), stack.shape, diagonal, dtypes, dev) for stack in plan.stacks],
                    momentum, scale, xp.zeros((), dtype=xp.int32, device=dev) if layout.counted else None)


def _update_groups(t: _Tiling, grads_list, states, params_list, ctxs: list):
    """``build_transform``'s ``update_groups``: one step of every group, in the order of
    Distributed Shampoo's per-group step: the statistics (every group, :class:`_Group`, its pairing
    and plan read off its state by :func:`_laid_out`, its gradient as the plan's stacks of tiles,
    :func:`tiles_of_groups`), the refresh of the stacks on their phase (:func:`_refresh_due`), the
    preconditioning, the rule's last lines and the hand-back of each group's updates and state."""
    ctx, xp, rule, c = ctxs[0], ctxs[0].xp, t.rule, t.c
    h = rule.scalars(c, ctx.value, ctx.extra)
    groups, fields, names = zip(*[_laid_out(t, state, grads, work_dtype(t.layout, xp, grads[0].dtype),
                                            path_str(each.paths[0]) if each.paths else "?")
                                  for grads, state, each in zip(grads_list, states, ctxs)])
    groups = [g._replace(stacks=tiles) for g, tiles in zip(groups, tiles_of_groups(xp, grads_list, groups, fields))]
    stack_states, failures = [list(f.stacks) for f in fields], [f.failures for f in fields]  # the new state
    _refresh_due(t, ctx, h, groups, fields, stack_states, failures)

    # Every stack preconditioned (the stacks of all phases batched as by _batches), with the KL clip
    # scaled per group by its tiles' sum in row-major order (sums_in_tile_order), and handed back as
    # every leaf's D (leaves_of_batches).
    chosen, batches = _batches(xp, groups, stack_states, refreshing=False)
    batched = batches(0, len(t.intervals))
    D_batched = [rule.precondition(xp, c, batch.operands[0], _read_factors(t.layout, xp, batch.operands[1:], batch.operands[0]))
                 for batch in batched]
    if c.use_kl_clip:  # per group: its tiles' sum in row-major order, then its scale of D
        tile_inner = [rule.inner(xp, D, cast(xp, batch.operands[0], D.dtype)) for D, batch in zip(D_batched, batched)]
        members = [[chosen[m] for m in batch.indices] for batch in batched]
        sums = sums_in_tile_order(xp, tile_inner, members, [g.plan for g in groups])
        nu = _by_dtype(xp, partial(_clip, t, xp, h), sums)
        D_batched = [D * per_tile(xp, [nu[chosen[m][0]] for m in batch.indices], batch.lengths, D)
                     for D, batch in zip(D_batched, batched)]
    directions = leaves_of_batches(xp, D_batched, chosen, batched, groups)

    # The rule's last lines (descend) of every leaf from its D, element-wise, the leaves joined end to
    # end (precond_ref.engine.joined.leafwise); then per group its members' updates and new momenta.
    def operand(name, like):  # the step's value of ``name``, else the configuration's
        return ctx.scalar(name, getattr(h if name in h._fields else c, name), like.dtype, array_device(like))

    def descend(D, *rest):  # one leaf, or the leaves of one layout joined end to end (leafwise)
        v = rest[-2] if c.use_momentum else None
        update, U = rule.descend(xp, c, operand, D, cast(xp, rest[0], D.dtype) if c.use_decay else None, v, rest[-1])
        return update, (ctx.unless_skipped(U, v) if c.use_momentum else U)

    operands = [directions] + ([[p for params in params_list for p in params]] if c.use_decay else [])
    operands += [[v for f in fields for v in f.momentum]] if c.use_momentum else []
    zeros = [ctx.once(("zero", G.dtype, device_key(G)), partial(scalar_zero, xp, G))  # G: the work dtype
             for g in groups for G in (g.stacks[0],) * len(g.shapes)]
    steps = iter(leafwise(xp, descend, *operands, zeros=zeros, ctx=ctx))  # (update, new momentum) per member
    done = [tuple(zip(*(next(steps) for _ in g.shapes))) for g in groups]  # per group: (updates, new momenta)
    return [(updates, _entries(keys, stack_states[g], velocities if c.use_momentum else (), state.preconditioner_lr_scale,
                               failures[g]))
            for g, (state, keys, (updates, velocities)) in enumerate(zip(fields, names, done))]


def _laid_out(t: _Tiling, state, grads, dtype, where: str) -> tuple:
    """The group of the gradients ``grads`` (:class:`_Group`, cut in the work dtype ``dtype``, its
    stacks not yet made): its out-first (weight (d_out, d_in)) or out-last pairing, read off the
    state's factor sizes, and its plan; its state as fields; and its plan's entry names. A state
    that fits neither pairing is a clear error."""
    shapes = [tuple(g.shape) for g in grads]
    for out_first in (True, False) if len(shapes) > 1 else (True,):
        _, plan, (structure, keys), number = _plan(t, shapes, out_first, where)
        if any(k not in state for k in keys):
            continue
        fields = tree_unflatten(structure, [state[k] for k in keys])
        if all(tuple(K.shape[:2]) == (len(tiles.tiles), d) for tiles, stack in zip(plan.stacks, fields.stacks)
               for K, d in zip(stack.factor, tiles.shape)):
            return _Group(dtype, shapes, grouped_shape(shapes, out_first)[0], out_first, plan, None, number), fields, keys
    found = {k: tuple(v.shape) for k, v in state.items() if "factor" in k}
    raise ValueError(
        f"{t.rule.name}: the gradients of {where!r} (shapes {shapes}) do not fit the Kronecker factors in the "
        f"state ({found}); with grouping='weight_bias' a weight and its bias are one group (give both gradients, "
        "a zero one for a member without); a state saved with another block_size loads with that block_size"
        + (";" + t.layout.old_layout(found, {}) if t.layout.old_layout is not None else ""))


def _entries(keys: tuple, stacks, momentum: tuple, scale, failures) -> dict:
    """A group's state as its stored entries under its plan's entry names ``keys`` (:func:`_plan`):
    :func:`~precond_ref.tree.to_entries` of the rule's ``State`` of these fields (per stack its
    factors, then their momenta; the members' momenta; the step size's multiplier and the failure
    count where kept), its arrays listed in the template's order, not found by walking it."""
    arrays = [a for stack in stacks for a in stack.factor + stack.factor_momentum] + list(momentum)
    return {k: a for k, a in zip(keys, arrays + [a for a in (scale, failures) if a is not None])}


def _refresh_due(t: _Tiling, ctx, h, groups, fields, stack_states, failures) -> None:
    """On each refresh phase due (:meth:`~precond_ref.engine.context.StepContext.every` of its
    interval: a host bool, or an array), the stacks of that phase of all groups refreshed batch by
    batch (:func:`_refreshed`, under ``cond`` where the phase is decided on the device:
    :func:`~precond_ref.engine.phases.refreshes`) and stored back into the groups' stacks (one
    split per operand); then the factor entries it wrote marked settled for the skip rule.

    Where counted, each group of a batch adds its tiles' failures to its count, for all groups of
    the batch at once (their counts stacked, a view where last step's addition left them side by
    side, plus :func:`counts_per_run`), none on a skipped step (the non-finite rule's selection,
    made once per batch on the failure flags)."""
    xp, counted = ctx.xp, t.layout.counted
    chosen, batches = _batches(xp, groups, stack_states, refreshing=True)
    selecting = counted and ctx.ok is not None and not ctx.applied

    def branches(batch) -> tuple:  # each batch's scales and rounding bits made outside the cond
        scale = None if t.layout.group_scale is None else per_tile(
            xp, [fields[chosen[m][0]].preconditioner_lr_scale for m in batch.indices], batch.lengths)
        rounded = t.layout.factor_rounding == "stochastic" and any(is_bfloat16(a.dtype) for a in batch.operands[1:])
        noise = _step_noise(xp, ctx, fields, batch.operands[0]) if rounded else None
        return partial(_refreshed, t, xp, h, scale, noise), partial(_unchanged, xp)

    for batch, out in refreshes(xp, [ctx.every(interval) for interval in t.intervals], batches, branches):
        rank = len(batch.operands[0].shape) - 1  # each member's factors, then their momenta
        for m, state in handed_back(batch, out[:-1]):
            stack_states[chosen[m][0]][chosen[m][1]] = t.rule.Stack(factor=state[:rank], factor_momentum=state[rank:])
        if counted:
            flags = xp.logical_and(out[-1], ctx.ok) if selecting else out[-1]
            owners = [chosen[m][0] for m in batch.indices]  # a group has at most one stack in a batch of one phase
            totals = stacked(xp, [failures[i] for i in owners]) + counts_per_run(xp, flags, batch.lengths)
            for i, total in zip(owners, xp.unstack(totals)):
                failures[i] = total
                if selecting:
                    ctx.settled[total] = True
    if counted and not is_jax_namespace(xp):
        # A skipped step's gradient is zero (except on JAX, where the selection is fused anyway), and a
        # tile whose gradient is zero keeps its factor state: each new factor entry already is its old
        # value, and needs no selection by the non-finite rule.
        ctx.settle(entry for stacks, state in zip(stack_states, fields) for new, old in zip(stacks, state.stacks)
                   if new is not old for entry in new.factor + new.factor_momentum)


def _batches(xp, groups, stack_states, refreshing: bool) -> tuple:
    """The stacks of all groups, as (their (group, stack) numbers, by phase, then group and stack;
    the ``batches`` of :func:`~precond_ref.engine.phases.phase_stacks` of their operands (G,
    K_1..K_N[, m_1..m_N]) on their phases): the stacks of one phase, tile shape, factor layout
    and device are concatenated along the tile axis, one ``concat`` per operand whatever the
    number of tiles (none for G, whose tiles lie in that order: :func:`tiles_of_groups`)."""
    phased = sorted([(groups[i].plan.stacks[s].phase, i, s) for i in range(len(groups)) for s in range(len(groups[i].plan.stacks))])
    operands = [(groups[i].stacks[s],) + stack_states[i][s].factor + (stack_states[i][s].factor_momentum if refreshing else ())
                for _, i, s in phased]
    return [(i, s) for _, i, s in phased], phase_stacks(xp, [phase for phase, _, _ in phased], operands)


def _clip(t: _Tiling, xp, h, inner):
    """The rule's KL clip of the per-group sums ``inner``, with the configuration and the step's
    scalars as operands of their dtype."""
    return t.rule.clip(xp, in_dtype(xp, t.c, inner.dtype), in_dtype(xp, h, inner.dtype), inner)


def _refreshed(t: _Tiling, xp, h, scale, noise, G, *state):
    """The rule's refresh of a stack, and per tile whether it failed (:func:`kept_where_usable`).
    With stochastic rounding the rule computes in G's dtype (:func:`_read_factors`) and each
    bf16 operand is stored back by :func:`_stored`. The rule gets its configuration as operands of
    the dtype it computes in (the first factor's), the step's scalars as operands of G's dtype,
    and its step size ``h.beta2`` times each tile's group's multiplier ``scale`` (``None``:
    without), an operand of the factors' dtype."""
    read, rank = _read_factors(t.layout, xp, state, G), len(G.shape) - 1
    dtype = read[0].dtype
    step_size = h.beta2 if scale is None else h.beta2 * scale
    h = in_dtype(xp, h, G.dtype)._replace(beta2=as_operand(xp, step_size, dtype))
    new = t.rule.refresh(xp, in_dtype(xp, t.c, dtype), h, G, t.rule.Stack(factor=read[:rank], factor_momentum=read[rank:]))
    new = new.factor + new.factor_momentum
    new = _stored(xp, new, state, noise) if noise is not None else new
    return kept_where_usable(xp, G, state, new) if t.layout.counted else _unchanged(xp, G, *new)


def _unchanged(xp, G, *state):
    """A stack's state ``state`` and, per tile, that it did not fail (a (k,) bool of ``False``)."""
    return state + (xp.zeros((G.shape[0],), dtype=xp.bool, device=placement(xp, G)),)


def _read_factors(layout: TileLayout, xp, factors, G) -> tuple:
    """The factors (or factors and momenta) a rule computes with: with stochastic rounding bf16
    ones read into G's dtype (the work dtype, float32 or float64), else as stored. Another
    narrower dtype (float16; float32 of float64 work) is computed in and rounded to nearest:
    stochastic rounding here is a truncation of float32's bits, which only bf16 is."""
    narrow = [n for n in range(len(factors)) if is_bfloat16(factors[n].dtype) and not is_bfloat16(G.dtype)]
    if layout.factor_rounding != "stochastic" or not narrow:
        return factors
    # one cast of their view where they lie side by side (as a refresh stores them), else one each
    joint = side_by_side(xp, [factors[n] for n in narrow], views_only=True)
    if joint is None:
        return tuple(xp.astype(K, G.dtype) if n in narrow else K for n, K in enumerate(factors))
    wide = xp.astype(joint, G.dtype)
    return tuple(wide[narrow.index(n), ...] if n in narrow else K for n, K in enumerate(factors))


def _stored(xp, new, old, noise) -> tuple:
    """The refreshed operands ``new`` (k tiles each) in their stored dtypes: those computed in a
    wider dtype than their bf16 ``old``, side by side per tile, rounded stochastically in one
    call (:func:`~precond_ref.engine.rounding.round_stochastic`), its bits keyed by the step and
    each element's place in its tile's operands (element ``e`` of the ``j``-th such operand,
    after those before it): the first places of the step's ``noise`` (:func:`_step_noise`).
    Operands of one shape are rounded stacked, operand-major (:func:`side_by_side`), and stored
    as consecutive pieces of one array, which the next refresh reads back as a view."""
    narrow = [n for n, (a, b) in enumerate(zip(new, old)) if a.dtype != b.dtype and is_bfloat16(b.dtype)]
    if not narrow:
        return new
    k, dtype = new[narrow[0]].shape[0], old[narrow[0]].dtype
    joint = side_by_side(xp, [new[n] for n in narrow])
    if joint is not None:  # one shape: operand-major (arrays, k, w), place j·w + e of each tile as below
        joint = xp.reshape(joint, (len(narrow), k, -1))
        w = joint.shape[2]
        rounded = rounded_with_noise(xp, joint, dtype, xp.reshape(noise[: len(narrow) * w], (len(narrow), 1, w)))
        parts = [rounded[j, ...] for j in range(len(narrow))]
    else:  # tile-major (k, Σ w_j), the operands' entries after each other
        flat = [xp.reshape(new[n], (k, -1)) for n in narrow]
        ends = tuple(itertools.accumulate((f.shape[1] for f in flat), initial=0))
        rounded = rounded_with_noise(xp, flat[0] if len(flat) == 1 else xp.concat(flat, axis=1), dtype, noise[: ends[-1]])
        parts = [rounded[:, a:b] for a, b in zip(ends[:-1], ends[1:])]
    stored = dict(zip(narrow, parts))
    return tuple(xp.reshape(stored[n], a.shape) if n in stored else a for n, a in enumerate(new))


def _step_noise(xp, ctx, fields, G):
    """The rounding bits of this step (:func:`~precond_ref.engine.rounding.place_noise`), made
    once per step and device for the most places any tile of the step stores in bf16 (its
    factors and momenta side by side): every refreshed batch rounds with the first places of
    it, the bits of a place the same in every tile and batch of the step."""
    def make():
        widest = max(sum(math.prod(a.shape[1:]) for a in stack.factor + stack.factor_momentum if is_bfloat16(a.dtype))
                     for group in fields for stack in group.stacks)
        dev = placement(xp, G)
        return place_noise(xp, place_keys(xp, rounding_key(xp, ctx.count, dev), widest, dev))
    return ctx.once(("rounding noise", device_key(G)), make)


# --------------------------------------------------------------------------------------------
# Fast forms, each beside its plain form
#
# Each computes what its plain form states (the cuts and joins of the groups' tensors, one sum or
# selection per array or run, one call per value) in fewer operations: the rearrangements of all
# groups as one gather by an index made once per layout, the operands of one shape side by side,
# the failure counts of a batch at once. Each gives its plain form's numbers, bit for bit, and within
# :func:`~precond_ref._backend.plain_forms` each takes its plain form.


def tiles_of_groups(xp, grads_list: Sequence[Sequence[Any]], groups: Sequence[Any], fields: Sequence[Any]) -> list:
    """``_cut_each(xp, grads_list, groups)``: every group's gradient as the stacks of its plan;
    where :func:`gathering`, for gradients of one dtype and device cut in one work dtype, as one join of all gradients and one gather (:func:`rearranged`), each stack a
    view of the result: the stacks of one key (``keys[i][s]``, what batches them: their tile
    shape and factor layout, read off the groups' states ``fields``) end to end, by refresh phase,
    then group and stack, so that a batch of them (one phase's, or all phases') is a view too
    (:func:`~precond_ref._backend.joined`). Two operations (three where the work dtype differs)
    where the cuts are a copy per group with tiles across several axes and the batches a join each."""
    leaves = [g for grads in grads_list for g in grads]
    if len({(g.dtype, device_key(g)) for g in leaves}) != 1 or len({g.dtype for g in groups}) != 1 or not gathering(xp, leaves):
        return _cut_each(xp, grads_list, groups)
    # What batches a stack with the equal stacks of other groups besides its tile shape: its factors' layout.
    keys = [[same_layout(stack.factor) for stack in f.stacks] for f in fields]
    first = {k: n for n, k in enumerate(dict.fromkeys(k for ks in keys for k in ks))}  # keys by first appearance
    order = sorted(((i, s) for i, group in enumerate(groups) for s in range(len(group.plan.stacks))),
                   key=lambda m: (first[keys[m[0]][m[1]]], groups[m[0]].plan.stacks[m[1]].phase, m))

    def cut(ids):
        ids = iter(ids)
        stacks = _cut_each(xp, [[next(ids) for _ in grads] for grads in grads_list], [g._replace(dtype=xp.int32) for g in groups])
        return [stacks[i][s] for i, s in order]

    shapes = [(len(groups[i].plan.stacks[s].tiles),) + groups[i].plan.stacks[s].shape for i, s in order]
    key = ("tiles of groups", tuple(g.number for g in groups), tuple(order))
    got = dict(zip(order, rearranged(xp, key, leaves, cut, shapes, groups[0].dtype)))
    return [[got[i, s] for s in range(len(g.plan.stacks))] for i, g in enumerate(groups)]


#: entries: the most a gather's index covers (:func:`gathering`; int32, 16 MiB). The indices of a
#: layout (two: the tiles' cut and the leaves' order) stay with the transform, in the cache of
#: :func:`~precond_ref.engine.factors.constant` on the arrays' device, so they are held to a small
#: share of the device's memory: a model of up to 4M parameters (where a step's operations, not
#: its arithmetic, bound it) takes the gathers; a larger one pays no index memory.
GATHER_MAX_ELEMENTS = 2**22


def gathering(xp, arrays: Sequence[Any]) -> bool:
    """Whether :func:`rearranged` serves ``arrays``: eagerly on an array library that launches its
    operations (not NumPy, whose operations run on the host with no launch for a gather to save;
    not JAX, not under ``torch.compile``, which fuse the rearrangements anyway; not within
    :func:`~precond_ref._backend.plain_forms`), for at most :data:`GATHER_MAX_ELEMENTS` entries, whose
    index (int32, as large as the arrays' float32 entries) stays small. A larger model's
    rearrangements, a few operations per group, are few beside its arithmetic."""
    return (not (is_numpy_namespace(xp) or is_jax_namespace(xp) or torch_compiling() or plain())
            and sum(math.prod(a.shape) for a in arrays) <= GATHER_MAX_ELEMENTS)


def rearranged(xp, key, arrays: Sequence[Any], rearrange: Callable, shapes: Sequence[tuple], dtype: Any = None) -> list:
    """``rearrange(arrays)`` for a rearrangement (arrays of ``shapes`` whose entries are entries of
    ``arrays``: cuts, joins, transposes, no arithmetic), in ``dtype`` if given: the arrays
    flattened and joined, cast, and their entries taken by one gather (:func:`taken`) by an index
    made once per ``key`` (:func:`~precond_ref.engine.factors.constant`) as ``rearrange`` of the
    entries' places; each result a view of the gathered array's next piece."""
    ends = tuple(itertools.accumulate((math.prod(a.shape) for a in arrays), initial=0))

    def make():
        places = xp.arange(ends[-1], dtype=xp.int32, device=placement(xp, arrays[0]))
        ids = [xp.reshape(places[a:b], tuple(x.shape)) for a, b, x in zip(ends[:-1], ends[1:], arrays)]
        return xp.concat([xp.reshape(part, (-1,)) for part in rearrange(ids)], axis=0)

    flat = [xp.reshape(a, (-1,)) for a in arrays]
    flat = flat[0] if len(flat) == 1 else xp.concat(flat, axis=0)
    gathered = taken(xp, xp.astype(flat, dtype) if dtype is not None and flat.dtype != dtype else flat,
                     constant(xp, key, make, arrays[0]))
    return pieces(xp, gathered, shapes)


def leaves_of_batches(xp, results: Sequence[Any], chosen: Sequence[tuple], batched: Sequence[Any],
                      groups: Sequence[Any]) -> list:
    """``_leaves_by_joins(xp, results, chosen, batched, groups)``, the members' parts of per-tile
    results; where :func:`gathering`, for results of one dtype and device, as one gather (:func:`rearranged`), one operation where the joins are one per group, and the
    members views of its consecutive pieces, so that the element-wise work after joins them
    without a copy (:func:`~precond_ref.engine.joined.leafwise`)."""
    if not gathering(xp, results) or len({(r.dtype, device_key(r)) for r in results}) != 1:
        return _leaves_by_joins(xp, results, chosen, batched, groups)
    key = ("leaves of batches", tuple(chosen), tuple((b.indices, b.lengths, tuple(r.shape)) for b, r in zip(batched, results)),
           tuple(group.number for group in groups))
    return rearranged(xp, key, results, lambda ids: _leaves_by_joins(xp, ids, chosen, batched, groups),
                      [shape for group in groups for shape in group.shapes])


def counts_per_run(xp, flags, lengths: Sequence[int]):
    """How many of ``flags`` (a (n,) bool vector, consecutive runs of ``lengths``) are set in each
    run, as a (runs,) int32 vector: runs of one length, one ``sum`` of the rows of their (runs,
    length) matrix; else the product of the runs' 0/1 indicator (:func:`run_indicator`) with the
    flags as float32, exact for counts below 2^24 whatever the order of summation (integers, every
    partial sum representable)."""
    if plain():
        return xp.stack([xp.sum(xp.astype(run, xp.int32), dtype=xp.int32) for run in pieces(xp, flags, [(n,) for n in lengths])])
    if len(set(lengths)) == 1:
        return xp.sum(xp.reshape(xp.astype(flags, xp.int32), (len(lengths), lengths[0])), axis=1, dtype=xp.int32)
    return xp.astype(xp.matmul(run_indicator(xp, tuple(lengths), flags), xp.astype(flags, xp.float32)), xp.int32)


def run_indicator(xp, lengths: tuple, like):
    """The (runs, n) float32 matrix whose row ``j`` is 1 on the places of run ``j`` of consecutive
    runs of ``lengths`` and 0 elsewhere, made once on the device from ``arange`` (no host data
    copied; :func:`~precond_ref.engine.factors.constant`)."""
    def make():
        places = xp.arange(sum(lengths), dtype=index_dtype(xp, like), device=placement(xp, like))
        ends = tuple(itertools.accumulate(lengths, initial=0))
        rows = [xp.logical_and(places >= a, places < b) for a, b in zip(ends[:-1], ends[1:])]
        return xp.astype(xp.stack(rows), xp.float32)
    return constant(xp, ("run indicator", lengths), make, like)


def side_by_side(xp, arrays: Sequence[Any], views_only: bool = False):
    """``stack(arrays)`` (a new leading axis) of two or more arrays of one shape, a view where they
    lie end to end in one allocation (:func:`~precond_ref._backend.stacked`: the operands a refresh
    stored side by side, :func:`tiled_transform`); ``None`` for one array, or arrays of several
    shapes, within :func:`~precond_ref._backend.plain_forms` (each array then alone), and, with
    ``views_only``, where the stack would not be a view (:func:`~precond_ref._backend.consecutive_view`)."""
    if plain() or len(arrays) < 2 or len({tuple(a.shape) for a in arrays}) != 1:
        return None
    return consecutive_view(list(arrays), new_axis=True) if views_only else stacked(xp, arrays)


def _by_dtype(xp, fn, values: Sequence[Array]) -> list:
    """``fn`` of the 0-D ``values`` (one per group), computed once for the vector of all values of one
    dtype instead of once per value, and handed back one per value; within
    :func:`~precond_ref._backend.plain_forms`, once per value."""
    if plain() or len({value.dtype for value in values}) > 1:
        return [fn(value) for value in values]
    return list(leading_rows(xp, fn(stacked(xp, values))))
