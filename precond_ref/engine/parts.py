r"""A layer as mini-blocks in parts: the layout of a block-statistic rule (MBF) and its step.

The layout (spec README sections 5-6): a layer's weight with its bias is one group
(:func:`~precond_ref.engine.layout.weight_bias_groups`), read out-first (a Flax out-last ``kernel``
permuted, :func:`out_first`), and a group is one block layout by its kind: an FC layer
:math:`[W \mid b]` as (O, I+1), a conv weight as (O, C, q) with :math:`q = \prod s_i`, block size 1
(a 1x1 conv, an FC layer above ``max_block_dim``) element-wise, every other leaf the diagonal kind.
An FC layer's long output axis is cut into the row chunks of ``block_size``
(:func:`precond_ref.blocking.chunk_sizes`): its ``parts``, one stack of equal chunks and a shorter
tail, each its own statistic (state entries ``statistic``/``inverse`` and
``statistic_tail``/``inverse_tail``).

:func:`parts_transform` maps the groups to and from their parts and hands them, stacked, to the
rule's functions in the order of one step: the heavy ball, the statistics on the rule's interval,
the inverses of the shares due (the shares due on the host merged into runs,
:func:`~precond_ref.engine.phases.refresh_runs`, one batched call per stack of equal blocks,
:func:`precond_ref.blocking.on_stacks`), the directions and the step; a statistic or inverse block
that is not finite keeps its previous value and is counted. The warm start maps each gradient tree
to the same parts and hands their statistics to the rule's mean, a non-finite tree left out.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from array_api_compat import array_namespace

from .._backend import array_device, cast, compute_dtype, cond, device_key, host_bool, placement
from ..blocking import chunk_sizes, on_stacks
from ..linalg import all_finite
from ..transform import PrecondState
from ..tree import Path, path_str, tree_flatten
from .checks import check_fits, layout_of
from .context import StepContext
from .elementwise import step_values
from .joined import leafwise
from .layout import saved_blocks_hint, weight_bias_groups
from .matrices import as_matrix
from .options import operands
from .phases import phase_share, refresh_runs
from .run import build_transform

__all__ = ["FC", "CONV", "ELEMENTWISE", "DIAGONAL", "PartsRule", "parts_transform", "out_first", "parts",
           "join_rows", "finite_or_previous", "refresh_parts"]

Array = Any

# Block kinds of a group (fixed by shapes and names, so Python-level, never traced).
FC = "fc"  # 2-D weight [+ bias]: one O x O statistic per layer (or per row chunk)
CONV = "conv"  # ndim >= 3 weight: one q x q statistic per (output, input) channel pair
ELEMENTWISE = "elementwise"  # block size 1: 1x1 convs and FC layers above max_block_dim
DIAGONAL = "diagonal"  # every other leaf: an element-wise rule of its own


# --------------------------------------------------------------------------------------------
# Out-first canonical form of a group (Flax's out-last ``kernel``).


def out_first(xp: Any, paths: Sequence[Path], leaves: Sequence[Any], back: bool = False) -> tuple:
    """A group's ``leaves`` with every out-last ``kernel`` (the last entry of its path) permuted to
    out-first, (s..., I, O) -> (O, I, s...) (views), the others as they are; ``back``: the inverse,
    (O, I, s...) -> (s..., I, O)."""

    def axes(n: int) -> tuple[int, ...]:
        return tuple(range(2, n)) + (1, 0) if back else (n - 1, n - 2) + tuple(range(n - 2))

    return tuple(xp.permute_dims(a, axes(a.ndim)) if path and path[-1] == "kernel" and a.ndim >= 2 else a
                 for path, a in zip(paths, leaves))


# --------------------------------------------------------------------------------------------
# Block kinds, the block layout of a group and its parts, from out-first shapes alone (static).


def block_kind(leaves: Sequence[Any], max_block_dim: Optional[int]) -> str:
    """The kind of a group (module docstring)."""
    shape = leaves[0].shape
    if len(leaves) == 2 or len(shape) == 2:
        return ELEMENTWISE if max_block_dim is not None and shape[0] > max_block_dim else FC
    if len(shape) >= 3:
        return ELEMENTWISE if math.prod(shape[2:]) == 1 else CONV
    return DIAGONAL


def block_shape(leaves: Sequence[Any]) -> tuple[int, ...]:
    """The block layout's shape of a group: (O, I[+1]), or (O, C, q) for a conv."""
    shape = tuple(leaves[0].shape)
    if len(shape) >= 3:
        return (shape[0], shape[1], math.prod(shape[2:]))
    return (shape[0], shape[1] + len(leaves) - 1)


def to_block(xp: Any, leaves: Sequence[Any]) -> Any:
    """A group's gradient in block layout: [W | b] as (O, I[+1]), a conv weight as (O, C, q)."""
    if leaves[0].ndim >= 3:
        return xp.reshape(leaves[0], block_shape(leaves))
    if len(leaves) == 2:
        return xp.concat([leaves[0], xp.expand_dims(leaves[1], axis=1)], axis=1)
    return leaves[0]


def from_block(xp: Any, block: Any, leaves: Sequence[Any]) -> tuple[Any, ...]:
    """Inverse of :func:`to_block`, shaped like ``leaves``."""
    if leaves[0].ndim >= 3:
        return (xp.reshape(block, tuple(leaves[0].shape)),)
    if len(leaves) == 2:
        return (block[:, : leaves[0].shape[1]], block[:, leaves[0].shape[1]])
    return (block,)


def parts(xp: Any, x: Array, kind: str, block_size: Optional[int]) -> dict[str, Array]:
    """A group's array in block layout cut into its statistic parts, by state-key suffix: ``x``
    itself, unless an FC group's output axis is blocked (spec README section 6), then its row chunks
    of ``block_size`` as one stack ``(full, b, I')`` (the diagonal b x b blocks of the O x O
    statistic) and the shorter tail rows (suffix ``_tail``), if any (views; the chunks of an axis
    without a tail are ``x`` reshaped, not sliced first)."""
    b, full, tail = chunk_sizes(x.shape[0], block_size if kind == FC else None)
    if not full:
        return {"": x}
    chunks = xp.reshape(x[: full * b, ...] if tail else x, (full, b) + tuple(x.shape[1:]))
    return {"": chunks, "_tail": x[full * b :, ...]} if tail else {"": chunks}


def join_rows(xp: Any, pieces: Sequence[Array], shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`parts` into ``shape`` (a view where there is one piece)."""
    rows = [piece if tuple(piece.shape) == shape else xp.reshape(piece, (-1,) + shape[1:]) for piece in pieces]
    return rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)


# --------------------------------------------------------------------------------------------
# The non-finite rule of statistics and the batched refresh of inverses.


def finite_or_previous(xp: Any, new: Array, previous: Array, failures: Array, block_ndim: int = 2) -> tuple[Array, Array]:
    r"""Block-wise, ``new`` where the block is finite, else ``previous``, and ``failures`` plus the
    number of blocks kept: a block is the last ``block_ndim`` axes (2: a stack of matrices; 0: each
    entry, block size 1). Where the decision that every entry is finite reads on the host for free
    (:func:`precond_ref._backend.host_bool`: NumPy, a CPU tensor outside ``torch.compile``) a finite
    ``new`` is returned as it is, without the selection and the count's arithmetic."""
    if host_bool(xp, all_finite(new, axis=tuple(range(new.ndim)))):
        return new, failures
    ok = all_finite(new, axis=tuple(range(new.ndim - block_ndim, new.ndim))) if block_ndim else xp.isfinite(new)
    kept = xp.where(xp.reshape(ok, tuple(ok.shape) + (1,) * block_ndim), new, previous)
    return kept, failures + xp.sum(xp.astype(xp.logical_not(ok), failures.dtype), dtype=failures.dtype)


def refresh_parts(xp: Any, kinds: Sequence[str], owners: Sequence[int], statistics: Sequence[Array],
                  previous: Sequence[Array], failures: Sequence[Array], inverse: Callable,
                  run: tuple[int, int] = (0, 1), phases: int = 1) -> tuple[list[Array], list[Array]]:
    r"""``inverse(kind, F, previous)`` of every statistic part's blocks in the shares ``run`` =
    ``(first, stop)`` of ``phases`` (a stack of square blocks of any kind as ``FC``), the previous
    inverse for the others; and the failure counts ``failures`` (0-D int32, one per group), each
    plus how many refreshed blocks of its parts (part ``u`` is of group ``owners[u]``) failed and
    kept their previous inverse.

    The equal-size blocks of all parts (FC blocks of one size, convs with one kernel size) form one
    stack (:func:`precond_ref.blocking.on_stacks`), of which the run refreshes its contiguous share
    (:func:`~precond_ref.engine.phases.phase_share`) by one batched call. Element-wise parts refresh
    with the first share."""

    def square(a: Array) -> Array:
        return as_matrix(xp, a, (math.prod(a.shape[:-2]), a.shape[-1], a.shape[-1]))

    def invert(stack: Array, before: Array) -> tuple[Array, Array]:
        start, stop = phase_share(stack.shape[0], *run, phases)
        if stop - start == stack.shape[0]:
            return inverse(FC, stack, before)
        flagged = xp.zeros(stack.shape[:1], dtype=xp.bool, device=placement(xp, stack))
        if start == stop:
            return before, flagged
        share, flagged_share = inverse(FC, stack[start:stop, ...], before[start:stop, ...])
        share = xp.concat([before[:start, ...], share, before[stop:, ...]], axis=0)
        return share, xp.concat([flagged[:start], xp.astype(flagged_share, xp.bool), flagged[stop:]], axis=0)

    inverted = iter(on_stacks(xp, invert, [(square(s), square(p)) for k, s, p in zip(kinds, statistics, previous) if k != ELEMENTWISE]))
    inverses, counts = [], list(failures)
    for kind, owner, statistic, before in zip(kinds, owners, statistics, previous):
        if kind != ELEMENTWISE:
            new, failed = next(inverted)
            new = as_matrix(xp, new, tuple(statistic.shape))
        elif run[0] == 0:
            new, failed = inverse(ELEMENTWISE, statistic, before)
        else:
            new, failed = before, xp.zeros((), dtype=xp.bool, device=placement(xp, before))
        inverses.append(new)
        counts[owner] = counts[owner] + xp.sum(xp.astype(failed, xp.int32), dtype=xp.int32)  # how many blocks failed
    return inverses, counts


# --------------------------------------------------------------------------------------------
# The step: the rule's functions on the parts of all groups, in named sub-steps.


class PartsRule(NamedTuple):
    r"""A block-statistic method (MBF): its name and its functions, each of one stack of blocks (a
    leading ``...``); ``c`` is the configuration, its numbers operands of the state's dtype.

    ``init_part(xp, c, kind, shape, dtype, device)``: a part's ``(statistic, inverse)``;
    ``momentum(xp, c, m, g)``: the heavy ball; ``statistic(xp, c, kind, g)``: the statistic of a
    gradient part; ``ema(xp, c, kind, F, g)``: the statistic after a statistics step;
    ``inverse(xp, c, kind, F, previous)``: a stack's inverses and which failed (kept ``previous``), of
    matrices (kind ``FC`` for square blocks of any kind) or, ``ELEMENTWISE``, of entries;
    ``direction(xp, c, kind, inverse, m)``: the preconditioned direction :math:`D`;
    ``quadratic(xp, c, D, m)``: a layer's :math:`\langle D, m\rangle`; ``step_size(xp, c, q, lr,
    minus_lr)``: the factor of each layer's direction in its step from its quadratic (a stack, one
    per layer); ``step(xp, c, size, D)``: the step; ``decay(xp, c, lr)``: the factor of the parameter
    in the step, and ``decayed(xp, c, step, w, decay)`` the step with it (decoupled weight decay);
    ``diagonal(xp, c, state, g, correction)``: the diagonal kind's direction and state after the
    step; ``correction(xp, c, t)``: its step's bias correction from the step's values ``t``
    (:func:`~precond_ref.engine.elementwise.step_values`: ``t.step``, ``count + 1`` in the state's
    dtype); ``warm_start(xp, c, F, S, j)``: the warm start's mean after its ``j``-th statistic ``S``;
    ``schedule(c)``: the statistics interval and the inverse refresh predicate ``calls -> bool`` of
    each share of a stack.
    """

    name: str
    init_part: Callable
    momentum: Callable
    statistic: Callable
    ema: Callable
    inverse: Callable
    direction: Callable
    quadratic: Callable
    step_size: Callable
    step: Callable
    decay: Callable
    decayed: Callable
    diagonal: Callable
    correction: Callable
    warm_start: Callable
    schedule: Callable
    State: type  # the diagonal kind's state: a NamedTuple of its entries


class _Parts(NamedTuple):
    """What the sub-steps of one transform share: the rule, its configuration, the layout's options
    and the schedule (``rule.schedule``)."""

    rule: PartsRule
    config: NamedTuple
    max_block_dim: Optional[int]
    block_size: Optional[int]
    statistics_every: Any
    inverse_dues: tuple
    clips: bool
    decays: bool


def _ops(p: _Parts, xp: Any, dtype: Any) -> NamedTuple:
    """The configuration with its numbers as operands of ``dtype`` (the learning rate, read at the
    step's count, as it is)."""
    return operands(xp, p.config, dtype, ("learning_rate",))


def _step_ops(p: _Parts, ctx: StepContext, dtype: Any, device: Any) -> NamedTuple:
    """:func:`_ops`, made once per update, dtype and device. :func:`_block_steps` makes them before
    the ``cond`` branches that read them: an array made while a branch is traced must not be used
    outside that branch."""
    return ctx.once(("operands", dtype, device), lambda: _ops(p, ctx.xp, dtype))


def _init_group(p: _Parts, leaves: tuple, paths: tuple, xp: Any) -> dict[str, Array]:
    """A group's state: the diagonal kind's zero entries, or the zero momentum, no failures and
    each part's initial statistic and inverse (:attr:`PartsRule.init_part`), of its out-first leaves."""
    leaves = out_first(xp, paths, leaves)
    kind = block_kind(leaves, p.max_block_dim)
    dtype, dev = compute_dtype(xp, leaves[0].dtype), array_device(leaves[0])
    if kind == DIAGONAL:
        zeros = xp.zeros(tuple(leaves[0].shape), dtype=dtype, device=dev)
        return p.rule.State(zeros, zeros)._asdict()
    momentum = xp.zeros(block_shape(leaves), dtype=dtype, device=dev)
    state = {"momentum": momentum, "failures": xp.zeros((), dtype=xp.int32, device=dev)}
    for suffix, g in parts(xp, momentum, kind, p.block_size).items():
        # (O, C, q, q) for a conv, the block layout for block size 1, (O, O), (full, b, b), (tail, tail) for FC
        shape = tuple(g.shape)
        shape = shape + shape[-1:] if kind == CONV else shape if kind == ELEMENTWISE else shape[:-1] + shape[-2:-1]
        state["statistic" + suffix], state["inverse" + suffix] = p.rule.init_part(xp, _ops(p, xp, dtype), kind, shape, dtype, dev)
    return state


def _diagonal_step(p: _Parts, ctx: StepContext, g: Array, *entries: Array) -> tuple:
    r"""The diagonal kind's step :math:`-\alpha_i D` and its entries after the step (selected for the
    non-finite rule here, on the joined entries, so the transform does not select each leaf's piece)."""
    xp, dtype, device = ctx.xp, g.dtype, array_device(g)
    c = _step_ops(p, ctx, dtype, device)
    correction = ctx.once(("diagonal_correction", dtype, device),
                          lambda: p.rule.correction(xp, c, step_values(ctx, dtype, device)))
    direction, new = p.rule.diagonal(xp, c, p.rule.State(*entries), g, correction)
    minus_lr = ctx.negated("learning_rate", p.config.learning_rate, dtype, device)
    return (p.rule.step(xp, c, minus_lr, direction), *map(ctx.unless_skipped, new, entries))


def _statistics(p: _Parts, xp: Any, ctx: StepContext, kinds: tuple, owners: tuple, statistics: list,
                failures: list, g_parts: list) -> tuple[list, list]:
    """Every part's statistic after the statistics step where it is due (one ``cond`` for all
    parts; a block that is not finite keeps its previous statistic and counts in its group)."""

    def update(f: list, n: list, g: list) -> tuple[list, list]:
        new_statistics, counts = [], list(n)
        for kind, owner, f_part, g_part in zip(kinds, owners, f, g):
            new = p.rule.ema(xp, _step_ops(p, ctx, f_part.dtype, array_device(f_part)), kind, f_part, g_part)
            new, counts[owner] = finite_or_previous(xp, new, f_part, counts[owner], 0 if kind == ELEMENTWISE else 2)
            new_statistics.append(new)
        return new_statistics, counts

    if not statistics:
        return [], []
    return cond(xp, ctx.every(p.statistics_every), update, lambda f, n, g: (f, n), statistics, failures, g_parts)


def _inverses(p: _Parts, xp: Any, ctx: StepContext, kinds: tuple, owners: tuple, statistics: list,
              inverses: list, failures: list) -> tuple[list, list]:
    """Every part's inverse after the refresh of the shares due, and each group's failure count, one
    failure per block whose refresh failed: the shares due on the host merged into runs
    (:func:`~precond_ref.engine.phases.refresh_runs`), each run ``cond(due, refresh, keep)`` of every
    part at once (:func:`refresh_parts`) on the inverses and counts the runs before it left."""

    def inverse(kind: str, f: Array, before: Array) -> tuple[Array, Array]:
        return p.rule.inverse(xp, _step_ops(p, ctx, f.dtype, array_device(f)), kind, f, before)

    def refresh(first: int, stop: int) -> Callable:  # the branch of a run of shares due
        return lambda f, inv, n: refresh_parts(xp, kinds, owners, f, inv, n, inverse, (first, stop), len(p.inverse_dues))

    counts = list(failures)
    for due, first, stop in refresh_runs(xp, [ctx.every(due) for due in p.inverse_dues] if statistics else []):
        inverses, counts = cond(xp, due, refresh(first, stop), lambda f, inv, n: (inv, n), statistics, inverses, counts)
    return list(inverses), counts


def _step_sizes(p: _Parts, xp: Any, ctx: StepContext, directions: Sequence[Array], momenta: Sequence[Array]) -> list:
    r"""Per block group, the factor of its direction in the step: :attr:`PartsRule.step_size` of the
    quadratics of all groups of a dtype and device at once; :math:`-\alpha_i` without ``clips``."""
    lr_of = p.config.learning_rate
    rates = [ctx.negated("learning_rate", lr_of, d.dtype, array_device(d)) for d in directions]
    if not p.clips:
        return rates
    sizes = list(rates)
    for layout in dict.fromkeys((d.dtype, device_key(d)) for d in directions):
        members = [k for k, d in enumerate(directions) if (d.dtype, device_key(d)) == layout]
        dtype, device = directions[members[0]].dtype, array_device(directions[members[0]])
        c, lr = _step_ops(p, ctx, dtype, device), ctx.scalar("learning_rate", lr_of, dtype, device)
        quadratics = xp.stack([p.rule.quadratic(xp, c, directions[k], momenta[k]) for k in members])
        for k, size in zip(members, xp.unstack(p.rule.step_size(xp, c, quadratics, lr, rates[members[0]]))):
            sizes[k] = size
    return sizes


def _block_steps(p: _Parts, xp: Any, ctx: StepContext, grads: list, states: list, kinds: list) -> list:
    """The step and new state of every block group (``grads``: its gradient in block layout): the
    heavy ball (the groups of one layout joined end to end, kept on a skipped step), the statistics
    and inverses of its parts, its direction and the step."""
    g_parts = [parts(xp, g, kind, p.block_size) for g, kind in zip(grads, kinds)]
    # made before the statistics' and inverses' branches, which find them made (none traced in a branch)
    ops = [_step_ops(p, ctx, g.dtype, array_device(g)) for g in grads]

    def heavy_ball(old: Array, grad: Array) -> Array:
        return ctx.unless_skipped(p.rule.momentum(xp, _step_ops(p, ctx, old.dtype, array_device(old)), old, grad), old)

    m = leafwise(xp, heavy_ball, [s["momentum"] for s in states], grads, ctx=ctx)
    members = [(k, suffix) for k, pieces in enumerate(g_parts) for suffix in pieces]  # every statistic part
    owners, part_kinds = tuple(k for k, _ in members), tuple(kinds[k] for k, _ in members)
    statistics, failures = _statistics(p, xp, ctx, part_kinds, owners, [states[k]["statistic" + s] for k, s in members],
                                       [s["failures"] for s in states], [g_parts[k][s] for k, s in members])  # fmt: skip
    inverses, counts = _inverses(p, xp, ctx, part_kinds, owners, statistics,
                                 [states[k]["inverse" + s] for k, s in members], failures)  # fmt: skip
    new = [{"momentum": m_k, "failures": count} for m_k, count in zip(m, counts)]
    m_parts, d_parts = [parts(xp, m_k, kind, p.block_size) for m_k, kind in zip(m, kinds)], [[] for _ in grads]
    for (k, suffix), statistic, inverse in zip(members, statistics, inverses):
        new[k]["statistic" + suffix], new[k]["inverse" + suffix] = statistic, inverse
        d_parts[k].append(p.rule.direction(xp, ops[k], kinds[k], inverse, m_parts[k][suffix]))
    d = [join_rows(xp, pieces, tuple(g.shape)) for pieces, g in zip(d_parts, grads)]
    return [(p.rule.step(xp, c, size, d_k), s) for c, size, d_k, s in zip(ops, _step_sizes(p, xp, ctx, d, m), d, new)]


def _descend(p: _Parts, xp: Any, step: tuple, params: Any, ctx: StepContext) -> tuple:
    """The update from the step: with ``decays``, :attr:`PartsRule.decayed` of each leaf."""
    if not p.decays:
        return step
    dtype, device = step[0].dtype, array_device(step[0])
    c, lr = _step_ops(p, ctx, dtype, device), ctx.scalar("learning_rate", p.config.learning_rate, dtype, device)
    decay = ctx.once(("decay", dtype, device), lambda: p.rule.decay(xp, c, lr))
    return tuple(p.rule.decayed(xp, c, s, cast(xp, w, dtype), decay) for s, w in zip(step, params))


def _update_groups(p: _Parts, grads_list: list, states: list, params_list: list, ctxs: list[StepContext]) -> list:
    """One step of every group: the gradients out-first (:func:`out_first`) and cast to the state's
    dtype, the diagonal kind's leaves joined into vectors (:func:`~precond_ref.engine.joined.leafwise`),
    the block groups (:func:`_block_steps`) mapped from and to their leaves, the steps in the leaves'
    own layout, and the decoupled decay (:func:`_descend`)."""
    xp, n, ctx, names = ctxs[0].xp, len(grads_list), ctxs[0], p.rule.State._fields
    grads_list = [out_first(xp, c.paths, grads) for grads, c in zip(grads_list, ctxs)]
    kinds = [block_kind(grads, p.max_block_dim) for grads in grads_list]
    dtypes = [s["momentum" if k != DIAGONAL else names[0]].dtype for k, s in zip(kinds, states)]
    grads_list = [tuple(cast(xp, g, dtype) for g in grads) for grads, dtype in zip(grads_list, dtypes)]
    steps, new_states = [None] * n, [None] * n
    diagonal = [i for i in range(n) if kinds[i] == DIAGONAL]
    operands = [[grads_list[i][0] for i in diagonal], *([states[i][k] for i in diagonal] for k in names)]
    for i, (u, *entries) in zip(diagonal, leafwise(xp, functools.partial(_diagonal_step, p, ctx), *operands, ctx=ctx)):
        steps[i], new_states[i] = (u,), dict(zip(names, entries))
    blocked = [i for i in range(n) if kinds[i] != DIAGONAL]
    grads = [to_block(xp, grads_list[i]) for i in blocked]
    for i, (u, new) in zip(blocked, _block_steps(p, xp, ctx, grads, [states[i] for i in blocked], [kinds[i] for i in blocked])):
        steps[i], new_states[i] = from_block(xp, u, grads_list[i]), new
    steps = [out_first(xp, c.paths, u, back=True) for u, c in zip(steps, ctxs)]  # in the leaves' own layout
    return [(_descend(p, xp, u, w, c), s) for u, s, w, c in zip(steps, new_states, params_list, ctxs)]


# --------------------------------------------------------------------------------------------
# The warm start: each gradient tree mapped to the state's parts.


def _warm_start(p: _Parts, state: PrecondState, grads_batches: Iterable[Any]) -> PrecondState:
    """``state`` with every part's statistic the mean of its statistics over the finite gradient
    trees of ``grads_batches`` (:attr:`PartsRule.warm_start`; a tree with a non-finite entry is
    left out of every part's mean). A tree whose groups do not fit the state is refused, naming
    the leaf (:func:`_fitting`)."""
    name = f"{p.rule.name}.warm_start"
    if not isinstance(state, PrecondState):
        raise TypeError(f"{name}: state must be the PrecondState returned by init, got {type(state)}")
    running, n_batches = {}, 0
    for n_batches, grads in enumerate(grads_batches, 1):
        leaves, treedef = tree_flatten(grads)
        xp = array_namespace(*leaves)
        finite = functools.reduce(xp.logical_and, [xp.all(xp.isfinite(leaf)) for leaf in leaves])
        for key, kind, members in _fitting(p, name, state.groups, treedef.paths, leaves, xp):
            c = _ops(p, xp, members[0].dtype)
            for suffix, g_part in parts(xp, to_block(xp, members), kind, p.block_size).items():
                stat = p.rule.statistic(xp, c, kind, g_part)
                mean, j = running.get((key, suffix)) or (xp.zeros_like(stat), xp.zeros((), dtype=xp.int32, device=placement(xp, stat)))
                j = j + xp.astype(finite, j.dtype)  # the finite trees so far (a tree that is not: its mean discarded below)
                new = p.rule.warm_start(xp, c, mean, stat, xp.astype(xp.maximum(j, xp.ones_like(j)), stat.dtype))
                running[key, suffix] = (xp.where(finite, new, mean), j)
    if n_batches == 0:
        raise ValueError(f"{name}: grads_batches is empty")
    groups = dict(state.groups)
    for (key, suffix), (mean, j) in running.items():
        groups[key] = {**groups[key], "statistic" + suffix: xp.where(j > 0, mean, groups[key]["statistic" + suffix])}
    return PrecondState(state.count, state.nonfinite_count, groups)


def _fitting(p: _Parts, name: str, groups: dict, paths: Sequence[Path], leaves: list, xp: Any) -> list:
    """The groups of a gradient tree that have a statistic, as ``(key, kind, out-first leaves in the
    state's dtype)``; a group that does not fit its state (:func:`~precond_ref.engine.checks.check_fits`:
    a transposed weight, a weight without its bias) or that the state does not have is refused, the
    state's groups checked first: they name the culprit (a transposed weight unpairs its bias,
    whose group is then the one missing)."""
    fitting = []
    for group in sorted(weight_bias_groups(paths, leaves), key=lambda group: group.key not in groups):
        if group.key not in groups:
            given = ", ".join(f"{path_str(path)!r} {tuple(leaves[i].shape)}" for path, i in zip(group.paths, group.indices))
            raise ValueError(f"{name}: the gradient of {given} is not a block of the optimizer state (its blocks: {sorted(groups)})")
        entries = groups[group.key]
        if not entries:  # a zero-size group: no state
            continue
        dtype = next(v.dtype for k, v in entries.items() if k != "failures")
        members = tuple(xp.astype(leaves[i], dtype) for i in group.indices)
        check_fits(name, group, members, entries, layout_of(_init_group(p, members, group.paths, xp)))
        members = out_first(xp, group.paths, members)
        kind = block_kind(members, p.max_block_dim)
        if kind != DIAGONAL:  # the diagonal kind has no statistic
            fitting.append((group.key, kind, members))
    return fitting


# --------------------------------------------------------------------------------------------
# The transform.


def parts_transform(rule: PartsRule, config: NamedTuple, *, max_block_dim: Optional[int], block_size: Optional[int],
                    clips: bool, decays: bool, on_nonfinite: str) -> tuple[Callable, ...]:
    r"""``(init, update, due, matmul_precision, group_leaves, warm_start)`` of ``rule`` with
    ``config`` (a NamedTuple of its hyperparameters, ``learning_rate`` among them).

    A group is read out-first (:func:`out_first`), laid out as blocks and parts; one step
    (:func:`_update_groups`) runs the rule on them: the heavy ball, the statistics on the rule's
    statistics interval, the inverses of the shares of each stack of equal blocks whose predicate
    (``rule.schedule``) holds, one batched call per stack (:func:`refresh_parts`; each block whose
    statistic or inverse was not finite keeps its previous one and counts one failure), the
    directions, the step sizes (``clips``: :attr:`PartsRule.step_size` of all layers of a dtype at
    once, else :math:`-\alpha_i`), the diagonal kind's leaves joined into vectors, and with
    ``decays`` the decoupled weight decay on every leaf.
    """
    p = _Parts(rule, config, max_block_dim, block_size, *rule.schedule(config), clips, decays)
    inner = build_transform(
        name=rule.name, init_group=functools.partial(_init_group, p), update_groups=functools.partial(_update_groups, p),
        group_leaves=weight_bias_groups, on_nonfinite=on_nonfinite, needs_params=decays,
        intervals=(p.statistics_every,) + p.inverse_dues, layout_hint=_layout_hint,
    )  # fmt: skip
    return (*inner, functools.partial(_warm_start, p))


def _layout_hint(found: dict[str, tuple], layout: dict[str, tuple]) -> str:
    """``build_transform``'s ``layout_hint`` (:func:`~precond_ref.engine.layout.saved_blocks_hint`):
    for a state saved with another ``block_size`` or ``max_block_dim``, the settings that load it."""
    o = layout["momentum"][0][0] if "momentum" in layout else None

    def settings(shape: tuple) -> str:  # a layer's unblocked O x O statistic: its output size as block_size loads it
        return (f"block_size={o} or larger, or " if shape == (o, o) else "") + (
            "the settings that saved it (one O x O block per FC layer: block_size at least every layer's output size, "
            "max_block_dim=4096)")

    return saved_blocks_hint(found, layout, settings)
