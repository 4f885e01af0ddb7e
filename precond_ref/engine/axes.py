"""A leaf's axes cut into blocks, each block with a statistic of its own (a per-axis factor, as
Sketchy's Frequent Directions sketches), and the blocks of all leaves stacked into batched calls.

A parameter merged to an order-N tensor has, on each axis, the blocks of
:func:`precond_ref.blocking.block_bounds`. Consecutive blocks of one length form a *run*, whose
statistics are one stack along a leading axis (:class:`Run`), so that a rule's functions are
written for one stack of blocks; with a refresh interval spread over phases a run is cut into
runs of consecutive phases (:func:`leaf_plan`). The engine then

* refreshes the runs due at a step through the refresh driver
  (:func:`~precond_ref.engine.phases.refreshes`; the runs as members of stacks: :func:`_runs`,
  :func:`_stepped`): a Kronecker rule's runs of one shape and order across all leaves in one batched
  call (:func:`~precond_ref.engine.phases.phase_stacks`), a flat rule's (one axis) in stacks of
  bounded size, padded across lengths off a CPU (:func:`_chunks`), and counts each leaf's blocks
  whose refresh was not finite (:func:`_counted`);
* renames the entries of a state saved under the per-axis names of earlier versions
  (:func:`axis_legacy_names`) and says which ``block_size`` loads a state saved unblocked into a
  blocked layout (:func:`unblocked_hint`);
* runs an :class:`AxesRule` (:func:`axes_transform`): a leaf's state made and read (by its
  entries' names) in the rule's NamedTuples, the compute dtype, the refresh phases, the graft's
  joined leaves, the step's :math:`-\\eta_t` and the finish of the leaves joined end to end; each
  of the rule's functions given the configuration as operands of the dtype of the arrays it
  computes on (:func:`_at`).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

from .. import sketch as _sketch
from .._backend import array_device, cast, compute_dtype, device_key, is_zero, joined, on_cpu, vector_norms
from ..blocking import Stack, chunk_sizes, same_layout, stack, unfold, unstack
from ..transform import Transform
from ..tree import to_entries
from .checks import renamed_failures
from .context import StepContext
from .factors import constant
from .tiles import taken
from .joined import leafwise
from .options import operands
from .phases import handed_back, phase_share, phase_stacks, refreshes, shape_phase
from .run import build_transform

__all__ = [
    "Run", "AxisPlan", "LeafPlan", "leaf_plan", "empty_blocks", "run_rows", "join_runs", "FLAT_STACK_BYTES",
    "FLAT_ACCELERATOR_STACK_BYTES", "padded_lengths", "bounded_chunks", "axis_legacy_names", "unblocked_hint", "AxesRule",
    "axes_transform",
]

Array = Any


class Run(NamedTuple):
    """``count`` consecutive blocks of equal ``length`` from row ``start`` of an axis, rank ``rank``,
    refreshed in phase ``phase`` (:class:`precond_ref.blocking.PhaseDue`)."""

    start: int
    length: int
    count: int
    rank: int
    phase: int = 0


class AxisPlan(NamedTuple):
    runs: tuple[Run, ...]

    @property
    def batched(self) -> bool:
        """False for an unblocked axis: its statistic is stored without a stack dimension."""
        return len(self.runs) > 1 or self.runs[0].count > 1


class LeafPlan(NamedTuple):
    """Static layout of one parameter: merged shape and the runs of each axis."""

    merged_shape: tuple[int, ...]
    axes: tuple[AxisPlan, ...]


def leaf_plan(
    merged_shape: tuple[int, ...], rank: int, block_size: Optional[int], phases: int = 1, first_phase: int = 0,
) -> LeafPlan:
    """Blocks of equal length are stacked into one run (one batched call per run): an axis of
    length d has a run of its full blocks and one of its shorter last block, if any
    (:func:`precond_ref.blocking.chunk_sizes`).

    With ``phases = T > 1`` (refreshes spread over an interval T) a run of ``c`` blocks is cut into
    ``min(c, T)`` contiguous runs (:func:`~precond_ref.engine.phases.phase_share`), and the leaf's
    runs take the phases ``first_phase, first_phase + 1, ...`` (mod T) in order, so one leaf's blocks
    refresh on different steps. The layout (the runs' shapes) depends on ``phases`` only, never on
    ``first_phase``.
    """
    axes, phase = [], itertools.count(first_phase)  # the leaf's runs take consecutive phases
    for d in merged_shape:
        b, full, tail = chunk_sizes(d, block_size)
        runs: list[Run] = []
        for start, length, count in ((0, b, max(full, 1)), (full * b, tail, 1 if tail else 0)):
            pieces = min(count, phases)
            for i in range(pieces):
                first, stop = phase_share(count, i, i + 1, pieces)
                runs.append(Run(start + first * length, length, stop - first, min(rank, length), next(phase) % phases))
        axes.append(AxisPlan(tuple(runs)))
    return LeafPlan(tuple(merged_shape), tuple(axes))


def empty_blocks(plan: Optional[LeafPlan], init: Callable[[int, int, tuple], Any]) -> tuple:
    """``blocks[n][j]``: ``init(length, rank, batch)`` for run ``j`` of axis ``n``, ``batch``
    ``(count,)`` on a cut axis and ``()`` on an unblocked one; ``()`` for no plan."""
    return () if plan is None else tuple(
        tuple(init(run.length, run.rank, (run.count,) if axis.batched else ()) for run in axis.runs)
        for axis in plan.axes)


def run_rows(xp: Any, axis: AxisPlan, run: Run, flat: Array) -> Array:
    """The rows of ``flat`` (d, n) that a run covers, stacked (count, length, n) when batched."""
    if not axis.batched:
        return flat
    rows = flat[run.start:run.start + run.count * run.length, :]
    return xp.reshape(rows, (run.count, run.length, flat.shape[-1]))


def join_runs(xp: Any, axis: AxisPlan, parts: Sequence[Array]) -> Array:
    """The per-run outputs (count, length, n) of one axis as the rows (d, n) they came from."""
    if axis.batched:
        parts = [xp.reshape(out, (out.shape[0] * out.shape[1], out.shape[-1])) for out in parts]
    return parts[0] if len(parts) == 1 else xp.concat(list(parts), axis=0)


def _runs(xp: Any, leaves: Sequence[tuple], decisions: Sequence[Any], kept: bool) -> tuple[list, list]:
    """The runs of ``leaves`` (``(g, plan, state)``) as members of stacks: a run's block and its
    rows of the mode-n unfolding :math:`G_{(n)}` of ``g`` in the plan's merged shape (count, length,
    n), with a leading axis of 1 where the axis is one unstacked block; leaf by leaf, axis by axis,
    with ``(i, n, j)`` of each (leaf, axis, run). A run whose phase was decided not due on the host
    is left out unless ``kept``, and an axis none of whose runs is in is not unfolded."""
    units, members = [], []
    for i, (g, plan, state) in enumerate(leaves):
        for n, axis in enumerate(() if plan is None else plan.axes):
            due = [j for j, run in enumerate(axis.runs) if kept or decisions[run.phase] is not False]
            flat = unfold(xp, xp.reshape(g, plan.merged_shape), n) if due else None
            for j in due:
                member = (*state.sketches[n][j], run_rows(xp, axis, axis.runs[j], flat))
                units.append((i, n, j))
                members.append(member if axis.batched else tuple(xp.expand_dims(v, axis=0) for v in member))
    return units, members


def _counted(xp: Any, ctx: StepContext, failures: Sequence[Optional[Array]], oks: Sequence[Array],
             blocks: Sequence[int]) -> list:
    """Each leaf's failure count (``failures[i]``, a 0-D int32, None for a leaf without blocks) plus
    its blocks whose refresh was not finite on a step that is taken: ``oks`` the per-block flags of
    the runs in :func:`_runs`' order, whose blocks are leaf by leaf, ``blocks[i]`` leaf i's number of
    them. The flags of a skipped step count nothing (the step's skip predicate folded in), so a
    count needs no selection by the non-finite rule: the new counts are settled. In eight
    operations whatever the number of leaves and blocks: the flags joined behind a True, negated,
    folded with the skip predicate and made integers; their running sums; those at each leaf's last
    block, taken by an index made once per layout (:func:`~precond_ref.engine.factors.constant`,
    one ``arange`` per leaf: no host data copied); their differences, each leaf's sum, added to the
    counts joined (a view of the previous step's counts, each a 0-D view of one array). Integer
    sums: the numbers of the additions one by one."""
    failures = list(failures)
    counted = [i for i, failure in enumerate(failures) if failure is not None]
    if oks:
        true = constant(xp, ("true",), lambda: xp.ones((1,), dtype=xp.bool, device=array_device(oks[0])), oks[0])
        failed = xp.logical_not(xp.concat([true, *oks], axis=0))
        if ctx.ok is not None and not ctx.applied:
            failed = xp.logical_and(failed, ctx.ok)
        ends = tuple(itertools.accumulate([0] + [blocks[i] for i in counted]))
        index = constant(xp, ("last blocks", ends), lambda: xp.concat(
            [xp.arange(end, end + 1, dtype=xp.int32, device=array_device(oks[0])) for end in ends], axis=0), oks[0])
        totals = taken(xp, xp.cumulative_sum(xp.astype(failed, xp.int32), axis=0, dtype=xp.int32), index)
        new = joined(xp, [xp.reshape(failures[i], (1,)) for i in counted]) + (totals[1:] - totals[:-1])
        for p, i in enumerate(counted):
            failures[i] = new[p]
    ctx.settle(failures[i] for i in counted)
    return failures


def _at(xp: Any, c: Any, dtype: Any) -> Any:
    """The configuration ``c`` as operands of ``dtype`` (:func:`~precond_ref.engine.options.operands`),
    for a rule's function that computes in ``dtype``: an array hyperparameter of a wider dtype would
    promote the blocks, the moments or the momentum out of it. The learning rate is the finish's
    ``-η_t``, made of that dtype by :func:`_finished`."""
    return operands(xp, c, dtype, ("learning_rate",))


def _stepped(xp: Any, ctx: StepContext, rule: "AxesRule", c: Any, leaves: Sequence[tuple], batches: Callable) -> list:
    """Every leaf's blocks after this step, its failure count and its runs' outputs (``leaves``:
    ``(g, plan, state)``, the blocks ``state.sketches``, the count ``state.failures``; plan None
    where the leaf has no blocks). The runs of refresh phase p get, on the steps ``ctx.every(c.dues[p])``
    (a phase without runs, known not due, reads nothing),
    ``rule.refresh(xp, c, block, rows, order, accept, first) -> (new block, ok, *out)``: ``block`` a
    stack of blocks (``rule.Block``), ``rows`` its rows of the mode-n unfolding :math:`G_{(n)}` of
    ``g`` in the plan's merged shape (:func:`_runs`), ``order`` the leaf's number of (merged) axes,
    ``accept`` the step's skip predicate, which the refresh folds into its own selection of the
    previous block, ``first`` True on a first call known on the host (``ctx.calls == 0``: the blocks
    are the initial ones unless a state was loaded that says otherwise, which the rule may check),
    ``ok`` whether each block's refresh was finite and ``out`` the new block applied to the rows in
    the same pass (a flat rule). The other runs keep their blocks: a flat rule's runs give
    ``rule.keep(xp, c, block, rows)`` as their output, a Kronecker rule's are not visited where the
    phase is decided not due on the host. ``batches(members, phases, orders)`` is the layout's
    stacking for :func:`~precond_ref.engine.phases.refreshes` (a block's refresh reads only its own
    rows). The new blocks need no selection by the non-finite rule (a refresh keeps the previous
    block where ``accept`` is False, a phase not due the block itself): they are settled
    (:meth:`StepContext.settle`), and so are the counts (:func:`_counted`)."""
    flat, fields = rule.keep is not None, len(rule.Block._fields)
    present = {run.phase for _, plan, _ in leaves if plan is not None for axis in plan.axes for run in axis.runs}
    decisions = [ctx.every(due) if phase in present else False for phase, due in enumerate(c.dues)]
    units, members = _runs(xp, leaves, decisions, kept=flat)
    orders = [len(leaves[i][1].axes) for i, _, _ in units]
    first = is_zero(ctx.calls)  # the first call, known on the host: the blocks are new unless loaded

    def refreshed(*operands: Array, label: int) -> tuple:
        rows = operands[-1]
        new, ok, *out = rule.refresh(xp, _at(xp, c, rows.dtype), rule.Block(*operands[:-1]), rows, label, ctx.ok, first)
        return (*new, ok, *out)

    def kept(*operands: Array) -> tuple:  # every block of the stack as it was: all usable
        block, rows = rule.Block(*operands[:-1]), operands[-1]
        out = (rule.keep(xp, _at(xp, c, rows.dtype), block, rows),) if flat else ()
        return (*block, xp.ones(tuple(rows.shape[:1]), dtype=xp.bool, device=array_device(rows)), *out)

    def branches(batch: Stack) -> tuple[Callable, Callable]:
        return functools.partial(refreshed, label=orders[batch.indices[0]]), kept

    phases = [leaves[i][1].axes[n].runs[j].phase for i, n, j in units]
    pieces: list = [None] * len(members)
    for batch, out in refreshes(xp, decisions, batches(members, phases, orders), branches, kept=flat):
        for u, piece in handed_back(batch, out):
            pieces[u] = piece
        del batch, out  # this batch's stacked copies go before the next batch's are made
    sketches = [[list(axis) for axis in state.sketches] for _, _, state in leaves]  # to_entries stores lists as tuples
    outs: list = [[] for _ in leaves]  # a flat rule's outputs, run by run
    blocks = [0] * len(leaves)  # each leaf's number of blocks with a flag
    for (i, n, j), member, piece in zip(units, members, pieces):
        length = member[0].shape[1]
        if piece[0].shape[1] != length:  # a padded stack's block and rows' result cut back to the run's rows
            piece = (piece[0][:, :length, ...], *piece[1:-1], piece[-1][:, :length, ...])
        if not leaves[i][1].axes[n].batched:  # an axis in one block: without the leading axis _runs added
            piece = tuple(v[0, ...] for v in piece)
        sketches[i][n][j] = rule.Block(*piece[:fields])
        outs[i].extend(piece[fields + 1:])
        blocks[i] += member[0].shape[0]
    ctx.settle(value for leaf in sketches for axis in leaf for block in axis for value in block)
    failures = _counted(xp, ctx, [state.failures for _, _, state in leaves], [piece[fields] for piece in pieces], blocks)
    return list(zip(sketches, failures, outs))


#: A flat rule's runs (:func:`_chunks`) are stepped in stacks of at most this many bytes of the blocks' first field
#: on a CPU (a run larger than it alone), and a run over :data:`precond_ref.sketch.FD_ROWS_BYTES`
#: alone on every device, in its own arrays. A stack's FD step passes over its blocks several times
#: (the projections on the basis, the [U, fresh] frame, the new basis): a stack this small stays
#: near a CPU's caches between those passes, where the cost per block of a larger one grows (its
#: blocks fall out of cache: docs/performance.md), and still holds the equal runs of many leaves,
#: so a step issues a few stacks' operations, not one stack's per leaf. Each stack's step holds about
#: three copies of its blocks (the stacked input, the [U, fresh] frame, the product) until the next
#: stack starts, and a lone run over ``FD_ROWS_BYTES`` takes that step by blocks of rows, writing its
#: new basis over the old one where the caller owns the state. So a step's peak on a CPU is the
#: state, the new state of the runs within the bound, three times this bound and a few vectors of
#: the longest run's length.
FLAT_STACK_BYTES = 2**24
#: The bound of :data:`FLAT_STACK_BYTES` off a CPU (a GPU): there each stack costs a fixed number of
#: kernel launches and one host synchronisation (a batched ``eigh`` reads its status), so the bound
#: is about the size at which a stack's kernels take as long as its launches, and the blocks of one
#: rank and phase take one stack up to it (docs/methods/sketchy.md, "On a GPU").
FLAT_ACCELERATOR_STACK_BYTES = 2**31


def _chunks(xp: Any, c: Any, members: Sequence[tuple], phases: Sequence[int], orders: Sequence[int]) -> Callable:
    """A flat rule's ``batches`` for :func:`_stepped`: the runs of one length and phase, across
    leaves, in stacks of at most :data:`FLAT_STACK_BYTES` of the blocks' first field on a CPU and
    :data:`FLAT_ACCELERATOR_STACK_BYTES` elsewhere (:func:`bounded_chunks`; a run larger, or larger
    than :data:`precond_ref.sketch.FD_ROWS_BYTES` anywhere, alone, never padded): each stack is one
    batched decomposition, which on a GPU is also one host synchronisation (``eigh`` reads its
    status), and each a fixed number of launches, so an accelerator's bound is the larger. Off a
    CPU the runs of one rank and phase whose FD step gives zero rows zero results and leaves every
    other value as unpadded (to rounding: :func:`precond_ref.sketch.zero_rows_exact` of
    ``c.fd["decomposition"]``) also share a stack across lengths, each zero-padded to the longest of
    them (:func:`padded_lengths`) in the block's first field and the rows, and its results cut back."""
    host = on_cpu(xp, members[0][0])
    lengths = None
    if not host:
        # a block over FD_ROWS_BYTES is stepped alone, in its own arrays (no padded copy)
        wide = max(xp.finfo(member[0].dtype).bits // 8 for member in members)
        secular = _sketch.secular_by_default(xp, members[0][0])
        lengths = padded_lengths(members, phases, lambda length, rank: _sketch.zero_rows_exact(
            c.fd["decomposition"], length, rank, secular) and length * rank * wide <= _sketch.FD_ROWS_BYTES)
    limit = FLAT_STACK_BYTES if host else FLAT_ACCELERATOR_STACK_BYTES
    chunks = bounded_chunks(xp, members, limit, phases, alone_from=_sketch.FD_ROWS_BYTES, lengths=lengths)

    def batches(first: int, stop: int) -> Iterator[Stack]:
        for chunk in chunks:
            if first <= phases[chunk[0]] < stop:
                length = None if lengths is None else lengths[chunk[0]]
                yield _chunk_stack(xp, [members[i] for i in chunk], length)._replace(indices=tuple(chunk))

    return batches


def _chunk_stack(xp: Any, members: Sequence[tuple], length: Optional[int] = None) -> Stack:
    """The members of one chunk of :func:`bounded_chunks` (one label and layout, within its byte
    bound) as one :class:`~precond_ref.blocking.Stack`: :func:`precond_ref.blocking.stack` by their
    layout (a view where the members are the previous step's stack handed back), on a CPU too (its
    ``key``: the chunk's bound, not blocking's rule that a large member stays alone on a CPU, limits
    it, since a flat run's step costs a fixed number of calls per stack). With ``length``, the first
    and last operands (the block's first field and the rows) of members shorter on axis 1 are
    zero-padded to it within one join each (:func:`padded_join`; blocking joins one layout only)."""
    if length is None or all(member[-1].shape[1] == length for member in members):
        (chunk,) = stack(xp, members, key=same_layout)
        return chunk
    last = len(members[0]) - 1
    operands = tuple(padded_join(xp, [member[k] for member in members], length) if k in (0, last)
                     else joined(xp, [member[k] for member in members]) for k in range(last + 1))
    return Stack(tuple(range(len(members))), operands, tuple(member[0].shape[0] for member in members))


def padded_join(xp: Any, arrays: Sequence[Array], length: int) -> Array:
    """``concat([pad(a, length) for a in arrays], axis=0)``, ``pad`` appending zero rows to axis 1
    of each ``a`` (count, rows, ...) up to ``length`` rows, as one concatenation: each block of a
    padded array flattened and followed by a slice of one zero vector (made once per size, dtype
    and device: :func:`precond_ref.engine.factors.constant`), an array already of ``length`` rows
    flattened whole; the flat join reshaped to (count, length, ...). The same values, element for
    element, as the padding of each array followed by their concatenation."""
    trailing = tuple(arrays[0].shape[2:])
    row = math.prod(trailing)
    widest = max(length - a.shape[1] for a in arrays) * row
    pad = constant(xp, ("zeros", widest, arrays[0].dtype), lambda: xp.zeros((widest,), dtype=arrays[0].dtype,
                                                                           device=array_device(arrays[0])), arrays[0])
    flat = []
    for a in arrays:
        if a.shape[1] == length:
            flat.append(xp.reshape(a, (-1,)))
            continue
        for j in range(a.shape[0]):
            flat.extend((xp.reshape(a[j, ...], (-1,)), pad[:(length - a.shape[1]) * row]))
    return xp.reshape(xp.concat(flat, axis=0), (sum(a.shape[0] for a in arrays), length) + trailing)


#: Off a CPU, :func:`_chunks` stacks runs of other lengths zero-padded to a longer one while the
#: padded runs hold at most this many times the rows of the real ones (:func:`padded_lengths`).
PAD_GROWTH = 2


def padded_lengths(members: Sequence[tuple], labels: Sequence, may_pad: Callable[[int, int], bool]) -> list[int]:
    """The length each member of :func:`_chunks` is stacked at: its own, or, where ``may_pad(length,
    rank)`` holds, the longest length of the members of its label, rank, dtype and device that
    ``may_pad`` admits, taken from the longest down while the padded rows stay within
    :data:`PAD_GROWTH` times the real ones (a length that would exceed it keeps its own stacks)."""
    # Plain dicts: torch.compile traces this function, and dynamo does not trace every mapping class.
    groups: dict[Any, dict[int, int]] = {}  # rows of each length
    for member, label in zip(members, labels):
        basis, rows = member[0], member[-1]
        if may_pad(rows.shape[1], basis.shape[-1]):
            counts = groups.setdefault((label, basis.shape[-1], basis.dtype, device_key(basis)), {})
            counts[rows.shape[1]] = counts.get(rows.shape[1], 0) + rows.shape[0]
    targets: dict[tuple, int] = {}
    for key, counts in groups.items():
        longest, real, padded = max(counts), 0, 0
        for length in sorted(counts, reverse=True):
            if padded + counts[length] * longest <= PAD_GROWTH * (real + counts[length] * length):
                real, padded = real + counts[length] * length, padded + counts[length] * longest
                targets[key + (length,)] = longest
    return [targets.get((label, m[0].shape[-1], m[0].dtype, device_key(m[0]), m[-1].shape[1]), m[-1].shape[1])
            for m, label in zip(members, labels)]


def bounded_chunks(
    xp: Any, members: Sequence[tuple], limit: int, labels: Optional[Sequence] = None, alone_from: Optional[int] = None,
    lengths: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Member indices in chunks of one stack each (:func:`precond_ref.blocking.stack`): the members
    of one label and layout (trailing shapes, dtypes, device) packed into chunks whose first
    operands total at most ``limit`` bytes, largest member first, each into the first chunk it fits
    (first-fit decreasing: close to the fewest chunks the bound allows), a member over the limit,
    or over ``alone_from`` bytes where given, alone; each chunk's members in order, the chunks in
    order of their first members, groups in order of first appearance. Members of another layout
    never end a chunk, so a layout's blocks take as few stacks (batched calls) as the bound allows.
    The packing depends on the members' shapes only, so a step's chunks are the previous step's
    (whose stacks it joins as views). With ``lengths`` (:func:`padded_lengths`) a member counts as
    its first and last operands zero-padded on axis 1 to ``lengths[i]`` rows (:func:`_chunk_stack`)."""
    groups: dict[Any, list[tuple[int, int]]] = {}
    for i, member in enumerate(members):
        layout = same_layout(member)
        if lengths is not None:
            layout = tuple(((lengths[i],) + shape[1:], *rest) if k in (0, len(layout) - 1) else (shape, *rest)
                           for k, (shape, *rest) in enumerate(layout))
        first = member[0]
        nbytes = math.prod((first.shape[0],) + layout[0][0]) * (xp.finfo(first.dtype).bits // 8)
        alone = alone_from is not None and nbytes > alone_from  # a stack of its own arrays (no copy)
        key = (i,) if alone else (None if labels is None else labels[i], layout)
        groups.setdefault(key, []).append((i, nbytes))
    out = []
    for group in groups.values():
        chunks: list[list] = []  # each chunk's bytes and members
        for i, nbytes in sorted(group, key=lambda item: -item[1]):  # stable: equal sizes in order
            chunk = next((chunk for chunk in chunks if chunk[0] + nbytes <= limit), None)
            if chunk is None:  # fits no chunk yet: a new one
                chunk = [0, []]
                chunks.append(chunk)
            chunk[0] += nbytes
            chunk[1].append(i)
        out.extend(sorted(sorted(indices) for _, indices in chunks))
    return out


#: An entry of a state saved under the per-axis names of earlier versions: a sketch's field of an
#: axis in one block, ``axis{n}_{field}``, or of run j, ``axis{n}_run{j}_{field}``.
_OLD_ENTRY = re.compile(r"axis(\d+)_(?:run(\d+)_)?(" + "|".join(_sketch.SKETCH_KEYS) + ")")


def axis_legacy_names(entries: dict[str, Array]) -> dict[str, Array]:
    """``build_transform``'s ``legacy_names`` for a state whose blocks' entries had per-axis names
    (:data:`_OLD_ENTRY`, and the failure counter ``sketch_failures``): the same arrays under
    ``sketches/{n}/{j}/{field}`` (j = 0 for an axis in one block). A state without
    ``sketch_failures``, or already current, is the very dict."""
    if "sketch_failures" not in entries or "sketches/0/0/basis" in entries:
        return entries
    renamed = {}
    for key, value in entries.items():
        old = _OLD_ENTRY.fullmatch(key)
        renamed[f"sketches/{old[1]}/{old[2] or 0}/{old[3]}" if old else key] = value
    return renamed


def unblocked_hint(field: str, found: dict, layout: dict) -> str:
    """``build_transform``'s ``layout_hint`` for a blocked layout: for a state saved unblocked (an
    axis's ``field`` entry of shape ``(d, k)``), the ``block_size`` that loads it, its longest axis."""
    unblocked = [shape[0] for key, (shape, _) in found.items() if key.endswith("/" + field) and len(shape) == 2]
    if not unblocked or found == layout:
        return ""
    return (
        f" A state saved with unblocked sketches loads with block_size={max(unblocked)} (its longest axis, or "
        "larger), and follows its trajectory with precondition_every=1 too"
    )


class AxesRule(NamedTuple):
    """A per-axis rule (Sketchy's, S-AdaGrad's): its state's types and its functions, each of one
    stack of blocks (a leading axis); ``c`` is its configuration, which holds ``learning_rate`` (None
    for a bare direction), ``dues`` (the refresh predicate of each phase), ``has_momentum`` and
    ``has_weight_decay``.

    ``State``: a leaf's state, a NamedTuple of the fields ``sketches`` (``sketches[n][j]`` a
    ``Block``, the stack of run j of axis n), ``failures`` (:mod:`precond_ref.engine`: blocks whose
    refresh was not finite), ``graft_second_moment`` and ``momentum`` (of the parameter's shape), None where absent,
    stored as the entries ``sketches/{n}/{j}/{field}``, ... (:func:`precond_ref.tree.to_entries`);
    ``plan(c, shape, first_phase)``: the leaf's :class:`LeafPlan`, None for a leaf without blocks;
    ``empty(xp, length, rank, *, dtype, device, batch)``: the fields of a stack of ``batch`` empty
    blocks, as a dict (:func:`precond_ref.sketch.fd_init`);
    ``refresh(xp, c, block, rows, order, accept, first) -> (block, ok, *out)`` (:func:`_stepped`);
    ``finish(xp, c, minus_lr, u, *rest)``: ``(update, m)`` with momentum (``rest``: ``m``), else
    ``(update,)``, from the direction ``u`` (``rest`` ends with the parameter with weight decay).

    A Kronecker rule also has ``precondition(xp, c, gs, blocks)``, the preconditioned gradient of
    each leaf ``gs[i]`` (in its plan's merged shape) from its blocks ``blocks[i][n][j]``, and
    optionally ``graft(xp, c, g, v) -> (v, D)`` (None: ``D = g`` and no moment) and ``grafted(xp,
    |D|, |p|)``, the scale of the direction ``p`` from its Frobenius norm and ``D``'s (None: the
    direction is ``p``), called on the norms of many leaves stacked (:func:`_scaled_by_norms`), then
    ``started(xp, c, count, u, D)``, the direction of a leaf at step ``count`` from that scaled ``u``
    and ``D``. A flat rule (one axis, the flattened parameter) has no ``precondition``: its
    ``refresh`` gives ``out``, the new block applied to the rows in the same pass, and ``keep(xp, c,
    block, rows) -> out`` between refreshes; those are its directions. Its stacks of blocks of other
    lengths are zero-padded where the FD step allows it (:func:`precond_ref.sketch.zero_rows_exact`
    of ``c.fd["decomposition"]``, :func:`_chunks`).
    """

    State: type
    Block: type
    plan: Callable
    empty: Callable
    refresh: Callable
    finish: Callable
    precondition: Optional[Callable] = None
    graft: Optional[Callable] = None
    grafted: Optional[Callable] = None
    started: Optional[Callable] = None
    keep: Optional[Callable] = None


def _entry_names(rule: AxesRule, plan: Optional[LeafPlan]) -> tuple:
    """``names[n][j]``: the entry names ``sketches/{n}/{j}/{field}`` of each field of block
    ``sketches[n][j]`` of a leaf of ``plan`` (none without one): a function of its shape alone."""
    return () if plan is None else tuple(
        tuple(tuple(f"sketches/{n}/{j}/{field}" for field in rule.Block._fields) for j in range(len(axis.runs)))
        for n, axis in enumerate(plan.axes))


def _leaves(rule: AxesRule, c: Any, names_of: Callable, xp: Any, grads: Sequence[tuple], states: Sequence[dict]
            ) -> list[tuple]:
    """Each group's one leaf as ``(g, plan, state)``: its gradient in the compute dtype, its plan
    ``rule.plan(c, shape, first_phase)`` (the first refresh phase from its shape,
    :func:`~precond_ref.engine.phases.shape_phase`) and its stored entries as the rule's state
    (the fields of block ``sketches[n][j]`` read by their names ``names_of(shape, plan)``
    (:func:`_entry_names`), the other fields under their names, None where absent)."""
    leaves = []
    for (leaf,), entries in zip(grads, states):
        g = xp.astype(leaf, compute_dtype(xp, leaf.dtype), copy=False)
        plan = rule.plan(c, tuple(g.shape), shape_phase(tuple(g.shape), len(c.dues)))
        sketches = tuple(tuple(rule.Block(*[entries[k] for k in block]) for block in axis)
                         for axis in names_of(tuple(g.shape), plan))
        leaves.append((g, plan, rule.State(sketches, *[entries.get(field) for field in rule.State._fields[1:]])))
    return leaves


def _entries(rule: AxesRule, names: tuple, sketches: Sequence, *rest: Any) -> dict:
    """A leaf's new state as its stored entries: :func:`precond_ref.tree.to_entries` of the rule's
    ``State(sketches, *rest)``, its blocks' arrays under their entry names (:func:`_entry_names`) and
    the other fields, in the State's order, under their names where not None, without walking it."""
    blocks = [value for axis in sketches for block in axis for value in block]
    entries = {k: value for k, value in zip([k for axis in names for block in axis for k in block], blocks)}
    for field, value in zip(rule.State._fields[1:], rest):
        if value is not None:
            entries[field] = value
    return entries


def _finished(xp: Any, ctx: StepContext, rule: AxesRule, c: Any, directions: list, leaves: list, params: Any) -> list:
    """``rule.finish(xp, c, -η_t, u, m, W)`` of every leaf (``m`` with momentum, ``W`` with weight
    decay, cast to the direction's dtype), the leaves of one layout joined end to end
    (:func:`~precond_ref.engine.joined.leafwise`); ``c`` and ``-η_t`` as operands of the
    direction's dtype (:func:`_at`; ``-η_t`` made once per update, a learning rate that is a Python
    number kept one, which S-AdaGrad's finish multiplies by the weight decay before the array:
    :meth:`StepContext.negated` with ``weak``)."""

    def finish(u: Array, *rest: Array) -> tuple:
        minus_lr = ctx.negated("learning_rate", c.learning_rate, u.dtype, array_device(u), weak=True)
        return rule.finish(xp, _at(xp, c, u.dtype), minus_lr, u, *rest)

    momenta = [[state.momentum for _, _, state in leaves]] if c.has_momentum else []
    if not c.has_weight_decay:
        return leafwise(xp, finish, directions, *momenta)
    decayed = [param[0] for param in params]
    return leafwise(xp, lambda u, *rest: finish(u, *rest[:-1], cast(xp, rest[-1], u.dtype)), directions, *momenta, decayed)


def axes_transform(rule: AxesRule, c: Any, *, name: str, on_nonfinite: str) -> Transform:
    """The transform of a per-axis rule. A parameter's state: empty blocks in the compute dtype, no
    failures, zero graft moment and momentum; a state saved under the per-axis names of earlier
    versions renamed (:func:`axis_legacy_names`, then
    :func:`~precond_ref.engine.checks.renamed_failures`). A step: the graft of every leaf
    (``rule.graft``, the leaves of one layout joined end to end); the runs' refresh
    (:func:`_stepped`): a Kronecker rule's runs due stacked by shape, order and phase
    (:func:`~precond_ref.engine.phases.phase_stacks`), a flat rule's runs in bounded, padded chunks
    (:func:`_chunks`) whose outputs are the directions; a Kronecker rule's directions
    (:func:`_preconditioned`); the updates ``rule.finish`` (:func:`_finished`), or the direction
    itself without a learning rate."""
    names: dict = {}  # a leaf's shape -> its blocks' entry names, made once per shape (by init_group, eagerly)

    def names_of(shape: tuple, plan: Optional[LeafPlan]) -> tuple:
        if shape not in names:
            names[shape] = _entry_names(rule, plan)
        return names[shape]

    def init_group(leaves, paths, xp):
        (w,) = leaves
        dtype, device = compute_dtype(xp, w.dtype), array_device(w)
        plan = rule.plan(c, tuple(w.shape))
        names_of(tuple(w.shape), plan)
        sketches = empty_blocks(plan, lambda length, rank, batch: rule.Block(
            **rule.empty(xp, length, rank, dtype=dtype, device=device, batch=batch)))
        zeros = functools.partial(xp.zeros, tuple(w.shape), dtype=dtype, device=device)
        return to_entries(rule.State(sketches, xp.zeros((), dtype=xp.int32, device=device) if sketches else None,
                                     zeros() if rule.graft is not None else None, zeros() if c.has_momentum else None))

    def update_groups(grads, states, params, ctxs: list[StepContext]):
        xp, ctx = ctxs[0].xp, ctxs[0]
        leaves = _leaves(rule, c, names_of, xp, grads, states)
        gs, moments = [g for g, _, _ in leaves], [state.graft_second_moment for _, _, state in leaves]
        grafts = list(zip(moments, gs)) if rule.graft is None else leafwise(
            xp, lambda g, v: rule.graft(xp, _at(xp, c, g.dtype), g, v), gs, moments)
        if rule.precondition is None:  # a flat rule: its runs' outputs, joined back, are the directions
            stepped = _stepped(xp, ctx, rule, c, leaves, functools.partial(_chunks, xp, c))
            directions = [xp.reshape(join_runs(xp, plan.axes[0], outs), tuple(g.shape))
                          for (g, plan, _), (_, _, outs) in zip(leaves, stepped)]
        else:
            stepped = _stepped(xp, ctx, rule, c, leaves, lambda members, phases, orders: phase_stacks(xp, phases, members, orders))
            directions = _preconditioned(xp, ctx, rule, c, leaves, [blocks for blocks, _, _ in stepped], grafts)
        finished = [(u,) for u in directions] if c.learning_rate is None else _finished(xp, ctx, rule, c, directions, leaves, params)
        return [((out[0],), _entries(rule, names_of(tuple(g.shape), plan), sketches, failures, v, out[1] if c.has_momentum else None))
                for (g, plan, _), (v, _), (sketches, failures, _), out in zip(leaves, grafts, stepped, finished)]

    # a blocked Kronecker layout says which block_size loads a state saved unblocked
    hint = None if c.block_size is None or rule.precondition is None else functools.partial(unblocked_hint, "basis")
    return build_transform(name=name, init_group=init_group, update_groups=update_groups, on_nonfinite=on_nonfinite,
                           needs_params=c.has_weight_decay, intervals=c.dues, layout_hint=hint,
                           legacy_names=lambda entries: renamed_failures(axis_legacy_names(entries)))


def _preconditioned(xp: Any, ctx: StepContext, rule: AxesRule, c: Any, leaves: list, blocks: list, grafts: list) -> list:
    """A Kronecker rule's direction of every leaf: the preconditioned gradient :math:`P(G)`
    (``rule.precondition`` on each leaf with blocks, in its plan's merged shape) times
    ``rule.grafted(|D|, |p|)`` (:func:`_scaled_by_norms`) as ``rule.started`` takes it; ``D`` itself
    on a leaf without blocks. ``rule.precondition`` is called once per compute dtype, on that
    dtype's leaves (whose blocks no stack of another dtype could join)."""
    blocked = [i for i, (_, plan, _) in enumerate(leaves) if plan is not None]
    by_dtype: dict = {}
    for i in blocked:
        by_dtype.setdefault(leaves[i][0].dtype, []).append(i)
    found: dict = {}
    for dtype, members in by_dtype.items():
        merged = [xp.reshape(leaves[i][0], leaves[i][1].merged_shape) for i in members]
        found.update(zip(members, rule.precondition(xp, _at(xp, c, dtype), merged, [blocks[i] for i in members])))
    products = [xp.reshape(found[i], tuple(leaves[i][0].shape)) for i in blocked]
    if rule.grafted is not None:
        scaled = _scaled_by_norms(xp, functools.partial(rule.grafted, xp), products, [grafts[i][1] for i in blocked])
        products = [rule.started(xp, _at(xp, c, u.dtype), ctx.count, u, grafts[i][1]) for i, u in zip(blocked, scaled)]
    products = dict(zip(blocked, products))
    return [products.get(i, d) for i, (_, d) in enumerate(grafts)]


def _scaled_by_norms(xp: Any, scale: Callable[[Array, Array], Array], ps: Sequence[Array], ds: Sequence[Array]) -> list:
    """``[p * scale(|d|, |p|) for p, d in zip(ps, ds)]``, ``|.|`` the Frobenius norm of a leaf: the
    norms of all leaves in one call (:func:`precond_ref._backend.vector_norms`), stacked (one stack
    per dtype and device, :func:`precond_ref.blocking.stack`) and ``scale`` called once per stack on
    them, not once per leaf; the products of all leaves in one pass over the leaves joined end to
    end (:func:`~precond_ref.engine.joined.leafwise`, each scale spread over its leaf's shape), which
    the finish then joins as a view. The numbers are the per-leaf formula's (an element-wise
    ``scale`` of the same norms, the same products)."""
    norms = vector_norms(xp, list(ds) + list(ps))  # one operation on torch
    members = [(xp.reshape(d, (1,)), xp.reshape(p, (1,))) for d, p in zip(norms[:len(ds)], norms[len(ds):])]
    stacks = stack(xp, members)
    scales = unstack(stacks, [(scale(*s.operands),) for s in stacks], len(members))
    # each p times its scale spread over its shape (a view), the leaves joined end to end (leafwise)
    return leafwise(xp, operator.mul, list(ps), [xp.broadcast_to(factor[0], tuple(p.shape)) for p, (factor,) in zip(ps, scales)])
