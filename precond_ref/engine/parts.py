r"""A layer as mini-blocks in parts: the layout and the runner of a block-statistic rule (MBF).

The layout (spec README sections 5-6): a parameter tree is read out-first (a Flax out-last
``kernel`` permuted, :func:`out_first`), a layer's weight with its bias is one group
(:func:`~precond_ref.engine.layout.weight_bias_groups`), and a group is one block layout by its
kind: an FC layer :math:`[W \mid b]` as (O, I+1), a conv weight as (O, C, q) with
:math:`q = \prod s_i`, block size 1 (a 1x1 conv, an FC layer above ``max_block_dim``) element-wise,
every other leaf the diagonal kind. An FC layer's long output axis is cut into the row chunks of
``block_size`` (:func:`precond_ref.blocking.chunk_sizes`): its ``parts``, one stack of equal chunks
and a shorter tail, each its own statistic (state entries ``statistic``/``inverse`` and
``statistic_tail``/``inverse_tail``).

The runner (:func:`parts_transform`) does for a :class:`PartsRule` what every step needs around its
formulas: the casts, the statistics step's and the refresh phases' decisions (one batched refresh
call for the equal blocks of all layers, :func:`~precond_ref.engine.phases.refresh_runs`), the
non-finite rule (a statistic or inverse that is not finite is rejected and counted, the heavy ball
kept on a skipped step), the stacking of the diagonal leaves and of the step sizes across layers,
and the warm start's running mean.
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
from ..tree import Path, path_str, tree_flatten, tree_unflatten
from .context import StepContext
from .elementwise import operands
from .joined import leafwise
from .layout import weight_bias_groups
from .matrices import as_matrix, joined_leaves
from .phases import phase_share, refresh_runs, warmup_phase_due
from .run import build_transform

__all__ = [
    "FC", "CONV", "ELEMENTWISE", "DIAGONAL", "TAIL", "PartsRule", "parts_transform", "out_first", "restore",
    "block_kind", "block_shape", "to_block", "from_block", "parts", "statistic_shapes", "split_rows", "join_rows",
    "finite_or_previous", "refresh_parts", "inner",
]

Array = Any

# Block kinds of a group (fixed by shapes and names, so Python-level, never traced).
FC = "fc"  # 2-D weight [+ bias]: one O x O statistic per layer (or per row chunk)
CONV = "conv"  # ndim >= 3 weight: one q x q statistic per (output, input) channel pair
ELEMENTWISE = "elementwise"  # block size 1: 1x1 convs and FC layers above max_block_dim
DIAGONAL = "diagonal"  # every other leaf: an element-wise rule of its own
TAIL = "_tail"  # state-key suffix of the shorter last block of a blocked FC output axis


# --------------------------------------------------------------------------------------------
# Out-first canonical form of a tree (Flax's out-last ``kernel``).


def _is_out_last(path: Path, leaf: Any) -> bool:
    return bool(path) and path[-1] == "kernel" and len(leaf.shape) >= 2


def _to_out_first_perm(ndim: int) -> tuple[int, ...]:
    """Out-last (s..., I, O) -> out-first (O, I, s...); (I, O) -> (O, I)."""
    return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))


def out_first(tree: Any) -> tuple[Any, Any, list[bool], list[Any]]:
    """``tree`` with every out-last ``kernel`` permuted to out-first (``tree`` itself when it has
    none); its treedef; which were; the canonical tree's leaves."""
    leaves, treedef = tree_flatten(tree)
    flags = [_is_out_last(path, leaf) for path, leaf in zip(treedef.paths, leaves)]
    if not any(flags):
        return tree, treedef, flags, leaves
    xp = array_namespace(*leaves)
    leaves = [
        xp.permute_dims(leaf, _to_out_first_perm(len(leaf.shape))) if flag else leaf for leaf, flag in zip(leaves, flags)
    ]
    return tree_unflatten(treedef, leaves), treedef, flags, leaves


def restore(tree: Any, treedef: Any, flags: list[bool]) -> Any:
    """Inverse of :func:`out_first` on a tree of the same structure."""
    if not any(flags):
        return tree
    leaves, _ = tree_flatten(tree)
    xp = array_namespace(*leaves)
    out = []
    for leaf, flag in zip(leaves, flags):
        if flag:
            perm = _to_out_first_perm(len(leaf.shape))
            leaf = xp.permute_dims(leaf, tuple(perm.index(k) for k in range(len(perm))))
        out.append(leaf)
    return tree_unflatten(treedef, out)


def _groups(paths: Sequence[Path], leaves: Sequence[Array]) -> list:
    """The groups of an out-first tree (:func:`out_first`): a ``kernel`` pairs by its first axis."""
    return weight_bias_groups(paths, leaves, kernel_out_last=False)


# --------------------------------------------------------------------------------------------
# Block kinds and the block layout of a group, from out-first shapes alone (static).


def block_kind(leaves: Sequence[Any], max_block_dim: Optional[int]) -> str:
    """The kind of a group (module docstring)."""
    weight = leaves[0]
    ndim = len(weight.shape)
    if len(leaves) == 2 or ndim == 2:
        big = max_block_dim is not None and weight.shape[0] > max_block_dim
        return ELEMENTWISE if big else FC
    if ndim >= 3:
        return ELEMENTWISE if math.prod(weight.shape[2:]) == 1 else CONV
    return DIAGONAL


def block_shape(leaves: Sequence[Any]) -> tuple[int, ...]:
    """The block layout's shape of a group: (O, I[+1]), or (O, C, q) for a conv."""
    shape = tuple(leaves[0].shape)
    if len(shape) >= 3:
        return (shape[0], shape[1], math.prod(shape[2:]))
    return (shape[0], shape[1] + len(leaves) - 1)


def to_block(xp: Any, leaves: Sequence[Any]) -> Any:
    """A group's gradient in block layout: [W | b] as (O, I[+1]), a conv weight as (O, C, q)."""
    weight = leaves[0]
    if len(weight.shape) >= 3:
        return xp.reshape(weight, block_shape(leaves))
    if len(leaves) == 2:
        return xp.concat([weight, xp.expand_dims(leaves[1], axis=1)], axis=1)
    return weight


def from_block(xp: Any, block: Any, leaves: Sequence[Any]) -> tuple[Any, ...]:
    """Inverse of :func:`to_block`, shaped like ``leaves``."""
    weight = leaves[0]
    if len(weight.shape) >= 3:
        return (xp.reshape(block, tuple(weight.shape)),)
    if len(leaves) == 2:
        n_in = weight.shape[1]
        return (block[:, :n_in], block[:, n_in])
    return (block,)


# --------------------------------------------------------------------------------------------
# Parts: the row chunks of a long FC output axis (spec README section 6). The O x O statistic
# becomes ``full`` diagonal b x b blocks (one stack) plus a ``tail`` x ``tail`` block for the rest.


def parts(kind: str, shape: tuple[int, ...], block_size: Optional[int]) -> tuple[tuple[str, int, int, Optional[tuple]], ...]:
    """The statistic blocks of a group as ``(state-key suffix, first row, end row, stack shape)``:
    one part covering every row unless an FC group's output axis is blocked, then the ``full`` row
    chunks as one stack ``(full, b, I')`` and the ``tail`` rows (suffix ``_tail``) as a matrix."""
    o = shape[0]
    if kind != FC:
        return (("", 0, o, None),)
    b, full, tail = chunk_sizes(o, block_size)
    if not full:
        return (("", 0, o, None),)
    whole = (("", 0, full * b, (full, b) + tuple(shape[1:])),)
    return whole + ((TAIL, full * b, o, None),) if tail else whole


def statistic_shapes(kind: str, shape: tuple[int, ...], block_size: Optional[int]) -> dict[str, tuple[int, ...]]:
    """State-key suffix -> statistic shape of each part of a group: (O, C, q, q) for a conv,
    the block layout itself for block size 1, (O, O) for an unblocked FC group, and
    (full, b, b) plus (tail, tail) for a blocked one."""
    if kind == CONV:
        return {"": shape + (shape[-1],)}
    if kind == ELEMENTWISE:
        return {"": shape}
    return {
        suffix: (stack[:-2] if stack else ()) + ((stop - start, stop - start) if stack is None else (stack[-2], stack[-2]))
        for suffix, start, stop, stack in parts(kind, shape, block_size)
    }


def split_rows(xp: Any, x: Array, cut: Sequence[tuple]) -> list[Array]:
    """``x`` (block layout) cut into its parts (:func:`parts`); ``[x]`` when unblocked (no copy)."""
    if len(cut) == 1:  # every row: unblocked, or full blocks only (a view)
        return [x if cut[0][3] is None else xp.reshape(x, cut[0][3])]
    return [x[start:stop, ...] if stack is None else xp.reshape(x[start:stop, ...], stack) for _, start, stop, stack in cut]


def join_rows(xp: Any, pieces: Sequence[Array], cut: Sequence[tuple]) -> Array:
    """Inverse of :func:`split_rows`."""
    if len(pieces) == 1 and cut[0][3] is None:
        return pieces[0]
    rows = [xp.reshape(p, (stop - start,) + tuple(p.shape[-1:])) for p, (_, start, stop, _) in zip(pieces, cut)]
    return rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)


# --------------------------------------------------------------------------------------------
# The non-finite rule of statistics, the refresh of inverses by phase, the step-size stacks.


def finite_or_previous(xp: Any, new: Array, previous: Array, failures: Array) -> tuple[Array, Array]:
    r"""``(new, failures)`` if every entry of ``new`` is finite, else ``(previous, failures + 1)``:
    ``where(all(isfinite(new)), new, previous)`` and the count. Where that decision reads on the
    host for free (:func:`precond_ref._backend.host_bool`: NumPy, a CPU tensor outside
    ``torch.compile``) a finite ``new`` is returned as it is, without the selection and the count's
    arithmetic."""
    ok = all_finite(new, axis=tuple(range(new.ndim)))
    if host_bool(xp, ok):
        return new, failures
    return xp.where(ok, new, previous), failures + xp.astype(xp.logical_not(ok), failures.dtype)


def refresh_parts(
    xp: Any,
    kinds: Sequence[str],
    statistics: Sequence[Array],
    previous: Sequence[Array],
    block_inverse: Callable[[Array, Array], tuple[Array, Array]],
    elementwise_inverse: Callable[[Array, Array], tuple[Array, Array]],
    run: tuple[int, int] = (0, 1),
    phases: int = 1,
) -> tuple[list[Array], list[Array]]:
    r"""``block_inverse(F, previous)`` (``elementwise_inverse`` for block size 1) of every statistic
    part whose blocks belong to the phases ``run`` = ``(first, stop)`` of ``phases``, the previous
    inverse for the others; and per part whether any refreshed block was flagged.

    The equal-size blocks of all parts (FC blocks of one size, convs with one kernel size) form
    one stack (:func:`precond_ref.blocking.on_stacks`); the run refreshes its contiguous share
    of each stack (:func:`~precond_ref.engine.phases.phase_share`) by one batched call.
    Element-wise parts refresh in phase 0."""

    def square(a: Array) -> Array:
        return as_matrix(xp, a, (math.prod(a.shape[:-2]), a.shape[-1], a.shape[-1]))

    def invert(stack: Array, before: Array) -> tuple[Array, Array]:
        n = stack.shape[0]
        start, stop = phase_share(n, *run, phases)
        if stop - start == n:
            return block_inverse(stack, before)
        flagged = xp.zeros(stack.shape[:1], dtype=xp.bool, device=placement(xp, stack))
        if start == stop:
            return before, flagged
        inverse, flagged_share = block_inverse(stack[start:stop, ...], before[start:stop, ...])
        inverse = xp.concat([before[:start, ...], inverse, before[stop:, ...]], axis=0)
        return inverse, xp.concat([flagged[:start], xp.astype(flagged_share, xp.bool), flagged[stop:]], axis=0)

    matrices = [(square(s), square(p)) for k, s, p in zip(kinds, statistics, previous) if k != ELEMENTWISE]
    inverted = iter(on_stacks(xp, invert, matrices))
    inverses, flags = [], []
    for kind, statistic, before in zip(kinds, statistics, previous):
        if kind != ELEMENTWISE:
            inverse, flagged_blocks = next(inverted)
            inverse, flagged = as_matrix(xp, inverse, tuple(statistic.shape)), xp.any(flagged_blocks)
        elif run[0] == 0:
            inverse, flagged = elementwise_inverse(statistic, before)
        else:
            inverse, flagged = before, xp.zeros((), dtype=xp.bool, device=placement(xp, before))
        inverses.append(inverse)
        flags.append(flagged)
    return inverses, flags


def _add_flags(
    xp: Any, counts: Sequence[Array], before: Sequence[Array], owners: Sequence[int], flags: Sequence[Array]
) -> list[Array]:
    """Each group's failure count after one run of refreshes: ``before + 1`` (``before``: its count
    when the call's refreshes began) where any of its statistic parts (``owners[k]`` is the group
    of part ``k``) was flagged by this run, else ``counts`` unchanged. So a call counts one failure
    per flagged group, however its phases were split into runs. A count that is still ``before``
    itself (the call's first run) is ``before + flagged``, the same number."""
    flagged: list[Any] = [None] * len(counts)
    for owner, flag in zip(owners, flags):
        flagged[owner] = flag if flagged[owner] is None else xp.logical_or(flagged[owner], flag)
    return [
        c if f is None else b + xp.astype(f, b.dtype) if c is b else xp.where(f, b + 1, c)
        for c, b, f in zip(counts, before, flagged)
    ]


def inner(xp: Any, a: Array, b: Array) -> Array:
    r""":math:`\langle a, b\rangle = \sum a_{j\ldots} b_{j\ldots}` over every axis, as a 0-D array: the
    dot product of the two flattened (dense: views) arrays, which reads each operand once, where
    ``sum(a * b)`` writes the product and reads it again (two passes more over a layer)."""
    return xp.reshape(a, (-1,)) @ xp.reshape(b, (-1,))


def _stack_key(x: Array) -> Any:
    """Arrays with equal keys (dtype and device) can be stacked."""
    return (x.dtype, device_key(x))


# --------------------------------------------------------------------------------------------
# The runner.


class PartsRule(NamedTuple):
    """A block-statistic method (MBF): its name and its functions, each of one stack of blocks (a
    leading ``...``); ``c`` is the configuration, its numbers operands of the state's dtype.

    ``init_part(xp, c, kind, shape, dtype, device)``: a part's ``(statistic, inverse)``;
    ``momentum(xp, c, m, g)``: the heavy ball; ``statistic(xp, c, kind, g)``: the statistic of a
    gradient part; ``ema(xp, c, kind, F, g)``: the statistic after a statistics step;
    ``inverse(xp, c, F, previous)``: a stack of matrices' inverses and which were flagged;
    ``elementwise_inverse(xp, c, v, previous)``: the same for block size 1;
    ``direction(xp, c, kind, inverse, m)``: the preconditioned direction; ``clip(xp, c, q, lr)``:
    the factor of each layer's step from its quadratic ``q`` (a stack, one per layer);
    ``decay(xp, c, lr)``: the factor of the parameter in the step (decoupled weight decay);
    ``diagonal(xp, c, state, g, correction)``: the diagonal kind's direction and state after the
    step; ``correction(xp, c, count, dtype)``: its step's bias correction.
    """

    name: str
    init_part: Callable
    momentum: Callable
    statistic: Callable
    ema: Callable
    inverse: Callable
    elementwise_inverse: Callable
    direction: Callable
    clip: Callable
    decay: Callable
    diagonal: Callable
    correction: Callable
    State: type  # the diagonal kind's state: a NamedTuple of its entries


def parts_transform(
    rule: PartsRule,
    config: NamedTuple,
    *,
    max_block_dim: Optional[int],
    block_size: Optional[int],
    statistics_every: int,
    precondition_every: int,
    refresh_phases: int,
    clips: bool,
    decays: bool,
    on_nonfinite: str,
) -> tuple[Callable, Callable, Callable, str, Callable, Callable]:
    r"""``(init, update, due, matmul_precision, group_leaves, warm_start)`` of ``rule`` with
    ``config`` (a NamedTuple of its hyperparameters, ``learning_rate`` among them).

    One step, with :math:`i` the updates already applied and the statistics step every
    :math:`T_1` = ``statistics_every`` calls: the heavy ball of every block group (joined, kept on
    a skipped step); each part's statistic (:attr:`PartsRule.ema`; rejected and counted when not
    finite); the inverses of the phases due (``refresh_phases`` shares of each stack of equal
    blocks, :func:`~precond_ref.engine.phases.warmup_phase_due`: every statistics step up to
    :math:`T_2` = ``precondition_every``, then one share per :math:`T_2 // P`), one batched call
    per stack (:func:`refresh_parts`; a flagged refresh counts one failure per group); the
    directions; the step :math:`-\alpha_i \nu D` (``clips``: :attr:`PartsRule.clip` of all layers
    of a dtype at once, else :math:`\nu = 1`); the diagonal kind's leaves joined into vectors
    (:attr:`PartsRule.diagonal`); and with ``decays`` the decoupled weight decay on every leaf.
    """
    t1, t2, scheduled = statistics_every, precondition_every, ("learning_rate",)
    lr_of = config.learning_rate
    phase_due = tuple(
        (lambda calls, phase=phase: warmup_phase_due(calls, phase, refresh_phases, t1, t2)) for phase in range(refresh_phases)
    )
    numbers = all(not hasattr(v, "shape") for k, v in config._asdict().items() if k not in scheduled)
    plain = operands(None, config, None, scheduled) if numbers else None

    def ops(xp: Any, dtype: Any) -> NamedTuple:
        """The configuration with its numbers as operands of ``dtype``."""
        return plain if plain is not None else operands(xp, config, dtype, scheduled)

    # ``cond`` branches are made once per (namespace, kinds): JAX caches a traced branch by the
    # function's identity, so a fresh closure per call would trace it again on every eager step.
    # A dict keyed by the namespace's name, not ``functools.cache``: dynamo warns on every
    # lru_cache-wrapped call it traces, and cannot compare modules as dict keys.
    branches: dict[tuple, tuple[Callable, Callable]] = {}

    def statistic_branches(xp: Any, kinds: tuple[str, ...], owners: tuple[int, ...]) -> tuple[Callable, Callable]:
        key = ("statistic", xp.__name__, kinds, owners)
        if key not in branches:

            def update(f: list, n: list, g: list) -> tuple[list, list]:
                statistics, counts = [], list(n)
                for kind, owner, f_part, g_part in zip(kinds, owners, f, g):
                    new = rule.ema(xp, ops(xp, f_part.dtype), kind, f_part, g_part)
                    new, counts[owner] = finite_or_previous(xp, new, f_part, counts[owner])
                    statistics.append(new)
                return statistics, counts

            branches[key] = (update, lambda f, n, g: (f, n))
        return branches[key]

    def inverse_branches(xp: Any, kinds: tuple[str, ...], owners: tuple[int, ...], run: tuple[int, int]) -> tuple[Callable, Callable]:
        key = ("inverse", xp.__name__, kinds, owners, run)
        if key not in branches:

            def refresh(f: list, inv: list, n: list, before: list) -> tuple[list, list]:
                inverses, flags = refresh_parts(
                    xp, kinds, f, inv,
                    lambda s, p: rule.inverse(xp, ops(xp, s.dtype), s, p),
                    lambda v, p: rule.elementwise_inverse(xp, ops(xp, v.dtype), v, p),
                    run, refresh_phases,
                )  # fmt: skip
                return inverses, _add_flags(xp, n, before, owners, flags)

            branches[key] = (refresh, lambda f, inv, n, before: (inv, n))
        return branches[key]

    def init_group(leaves: tuple, paths: tuple, xp: Any) -> dict[str, Array]:
        kind = block_kind(leaves, max_block_dim)
        dtype, dev = compute_dtype(xp, leaves[0].dtype), array_device(leaves[0])
        if kind == DIAGONAL:
            zeros = xp.zeros(tuple(leaves[0].shape), dtype=dtype, device=dev)
            return rule.State(zeros, zeros)._asdict()
        shape = block_shape(leaves)
        state = {"momentum": xp.zeros(shape, dtype=dtype, device=dev), "failures": xp.zeros((), dtype=xp.int32, device=dev)}
        for suffix, stat_shape in statistic_shapes(kind, shape, block_size).items():
            state["statistic" + suffix], state["inverse" + suffix] = rule.init_part(xp, ops(xp, dtype), kind, stat_shape, dtype, dev)
        return state

    def step_sizes(xp: Any, directions: Sequence[Array], momenta: Sequence[Array], ctx: StepContext) -> list[Array]:
        """Per block group, the factor of its direction in the step: :math:`-\\alpha_i \\nu`, one
        :attr:`PartsRule.clip` for all groups of a dtype and device; :math:`-\\alpha_i` without ``clips``."""
        rates = [ctx.negated("learning_rate", lr_of, d.dtype, array_device(d)) for d in directions]
        if not clips:
            return rates
        stacks: dict[Any, list[int]] = {}
        for k, d in enumerate(directions):
            stacks.setdefault(_stack_key(d), []).append(k)
        sizes: list[Any] = [None] * len(directions)
        for members in stacks.values():
            first = directions[members[0]]
            lr = ctx.scalar("learning_rate", lr_of, first.dtype, array_device(first))
            quadratics = xp.stack([inner(xp, directions[k], momenta[k]) for k in members])
            scaled = rates[members[0]] * rule.clip(xp, ops(xp, first.dtype), quadratics, lr)
            for k, size in zip(members, xp.unstack(scaled)):
                sizes[k] = size
        return sizes

    def descend(xp: Any, step: tuple, params: Any, ctx: StepContext) -> tuple:
        """The update from the step: with ``decays``, ``step - decay * w`` (:attr:`PartsRule.decay`)."""
        if not decays:
            return step
        dtype, device = step[0].dtype, array_device(step[0])
        lr = ctx.scalar("learning_rate", lr_of, dtype, device)
        decay = ctx.once(("decay", dtype, device), lambda: rule.decay(xp, ops(xp, dtype), lr))
        return tuple(s - decay * cast(xp, p, dtype) for s, p in zip(step, params))

    def diagonal_step(g: Array, state: dict, w: Any, ctx: StepContext) -> tuple:
        xp, dtype, device = ctx.xp, g.dtype, array_device(g)
        c = ops(xp, dtype)
        correction = ctx.once(("diagonal_correction", dtype, device), lambda: rule.correction(xp, c, ctx.count, dtype))
        direction, new = rule.diagonal(xp, c, rule.State(**state), g, correction)
        # selected here, on the joined entries, so the transform does not select each leaf's piece
        kept = {name: ctx.unless_skipped(entry, state[name]) for name, entry in new._asdict().items()}
        return (direction * ctx.negated("learning_rate", lr_of, dtype, device),), kept

    def update_groups(grads_list: list, states: list, params_list: list, ctxs: list[StepContext]) -> list:
        xp, n, ctx = ctxs[0].xp, len(grads_list), ctxs[0]
        statistics_due = ctx.every(t1)
        kinds = [block_kind(grads, max_block_dim) for grads in grads_list]
        dtypes = [s["momentum" if k != DIAGONAL else rule.State._fields[0]].dtype for k, s in zip(kinds, states)]
        grads_list = [tuple(cast(xp, g, dtype) for g in grads) for grads, dtype in zip(grads_list, dtypes)]
        steps, new_states = [None] * n, [None] * n
        diagonal = [i for i in range(n) if kinds[i] == DIAGONAL]  # element-wise: small leaves as one vector
        joined = joined_leaves(xp, diagonal_step, [(grads_list[i][0], states[i], None) for i in diagonal], ctx)
        for i, (step, new) in zip(diagonal, joined):
            steps[i], new_states[i] = step, new
        blocked = [i for i in range(n) if kinds[i] != DIAGONAL]
        g = {i: to_block(xp, grads_list[i]) for i in blocked}
        cut = {i: parts(kinds[i], tuple(g[i].shape), block_size) for i in blocked}

        def heavy_ball(old: Array, grad: Array) -> Array:  # kept on a skipped step
            return ctx.unless_skipped(rule.momentum(xp, ops(xp, old.dtype), old, grad), old)

        # on the blocks of one layout joined end to end (leafwise)
        m = dict(zip(blocked, leafwise(xp, heavy_ball, [states[i]["momentum"] for i in blocked], [g[i] for i in blocked], ctx=ctx)))
        members = [(i, suffix) for i in blocked for suffix, *_ in cut[i]]  # every statistic part
        owners = tuple(blocked.index(i) for i, _ in members)
        part_kinds = tuple(kinds[i] for i, _ in members)
        g_parts = [piece for i in blocked for piece in split_rows(xp, g[i], cut[i])]
        # one branch for the statistics of every part (a count per group, advanced per rejected part)
        new_statistics, failures = cond(
            xp, statistics_due, *statistic_branches(xp, part_kinds, owners),
            [states[i]["statistic" + suffix] for i, suffix in members], [states[i]["failures"] for i in blocked], g_parts,
        ) if members else ([], [])  # fmt: skip
        statistic = dict(zip(members, new_statistics))
        inverse = {key: states[key[0]]["inverse" + key[1]] for key in members}
        counts = before = list(failures)  # a refresh call counts one failure per group
        decisions = [ctx.every(interval) for interval in phase_due] if members else []
        for due, first, stop in refresh_runs(xp, decisions):  # due phases first..stop-1, one batched call
            refreshed, counts = cond(
                xp, due, *inverse_branches(xp, part_kinds, owners, (first, stop)),
                [statistic[key] for key in members], [inverse[key] for key in members], counts, before,
            )  # fmt: skip
            inverse = dict(zip(members, refreshed))
        d = {}
        for i in blocked:
            c = ops(xp, dtypes[i])
            pieces = [
                rule.direction(xp, c, kinds[i], inverse[i, suffix], m_part)
                for (suffix, *_), m_part in zip(cut[i], split_rows(xp, m[i], cut[i]))
            ]
            d[i] = join_rows(xp, pieces, cut[i])
        sizes = step_sizes(xp, [d[i] for i in blocked], [m[i] for i in blocked], ctx)
        for i, count, size in zip(blocked, counts, sizes):
            steps[i] = from_block(xp, size * d[i], grads_list[i])
            new_states[i] = {"momentum": m[i], "failures": count}
            for suffix, *_ in cut[i]:
                new_states[i]["statistic" + suffix] = statistic[i, suffix]
                new_states[i]["inverse" + suffix] = inverse[i, suffix]
        return [(descend(xp, u, p, c), s) for u, s, p, c in zip(steps, new_states, params_list, ctxs)]

    inner_transform = build_transform(
        name=rule.name,
        init_group=init_group,
        update_groups=update_groups,
        group_leaves=_groups,
        on_nonfinite=on_nonfinite,
        needs_params=decays,
        intervals=(t1,) + phase_due,
        layout_hint=_layout_hint,
    )

    def init(params: Any) -> PrecondState:
        return inner_transform.init(out_first(params)[0])

    def update(grads: Any, state: PrecondState, params: Any = None, **extra: Any) -> tuple[Any, PrecondState]:
        canonical_grads, treedef, flags, _ = out_first(grads)
        canonical_params = None if params is None else out_first(params)[0]
        updates, new_state = inner_transform.update(canonical_grads, state, canonical_params, **extra)
        return restore(updates, treedef, flags), new_state

    def warm_start(state: PrecondState, grads_batches: Iterable[Any]) -> PrecondState:
        """``state`` with every part's statistic the mean of its statistics over the finite
        gradient trees of ``grads_batches`` (the authors' running mean)."""
        if not isinstance(state, PrecondState):
            raise TypeError(f"{rule.name}.warm_start: state must be the PrecondState returned by init, got {type(state)}")
        groups = dict(state.groups)
        running: dict[tuple, Any] = {}
        n_batches = 0
        for grads in grads_batches:
            _, treedef, _, leaves = out_first(grads)
            xp = array_namespace(*leaves)
            finite = functools.reduce(xp.logical_and, [xp.all(xp.isfinite(leaf)) for leaf in leaves])
            batch_groups = _groups(treedef.paths, leaves)
            _check_batch(rule.name, groups, batch_groups, leaves, max_block_dim, rule.State._fields[0])
            for group in batch_groups:
                key = group.key
                entries = groups[key]
                members = tuple(leaves[i] for i in group.indices)
                kind = block_kind(members, max_block_dim)
                if kind == DIAGONAL or not entries:
                    continue
                dtype = entries["statistic"].dtype
                block = to_block(xp, tuple(xp.astype(g, dtype) for g in members))
                cut = parts(kind, tuple(block.shape), block_size)
                for (suffix, *_), g_part in zip(cut, split_rows(xp, block, cut)):
                    stat = rule.statistic(xp, ops(xp, dtype), kind, g_part)
                    if (key, suffix) not in running:
                        zero = xp.zeros((), dtype=xp.int32, device=placement(xp, stat))
                        running[key, suffix] = (xp.zeros_like(stat), zero)
                    mean, j = running[key, suffix]
                    j = j + xp.astype(finite, j.dtype)
                    # F <- ((j-1)/j) F + stat/j, over finite batches only
                    weight = xp.astype(finite, dtype) / xp.astype(xp.maximum(j, xp.ones_like(j)), dtype)
                    stat = xp.where(finite, stat, xp.zeros_like(stat))
                    mean = xp.where(finite, (1.0 - weight) * mean + weight * stat, mean)
                    running[key, suffix] = (mean, j)
            n_batches += 1
        if n_batches == 0:
            raise ValueError(f"{rule.name}.warm_start: grads_batches is empty")
        for (key, suffix), (mean, j) in running.items():
            entries = dict(groups[key])
            entries["statistic" + suffix] = xp.where(j > 0, mean, entries["statistic" + suffix])
            groups[key] = entries
        return PrecondState(state.count, state.nonfinite_count, groups)

    # group_leaves on the caller's (raw) tree: out-last kernels pair by their last axis
    return init, update, inner_transform.due, inner_transform.matmul_precision, weight_bias_groups, warm_start


def _layout_hint(found: dict[str, tuple], layout: dict[str, tuple]) -> str:
    """``build_transform``'s ``layout_hint``: for a state whose statistic blocks are not the ones
    this ``block_size`` makes (one saved with another ``block_size`` or ``max_block_dim``), the
    settings that load it."""
    have = {k: v[0] for k, v in found.items() if k.startswith("statistic")}
    want = {k: v[0] for k, v in layout.items() if k.startswith("statistic")}
    if have == want or "momentum" not in layout:
        return ""
    o = layout["momentum"][0][0]
    old = f" (block_size={o} or larger reproduces it)" if have == {"statistic": (o, o)} else ""
    return (
        f" Or a state saved with another block_size or max_block_dim{old}: its statistic blocks are {have}, "
        f"these settings make {want}; build the optimizer with the settings that saved it (one O x O block per "
        "FC layer: block_size at least every layer's output size, max_block_dim=4096)"
    )


def _check_batch(
    name: str, groups: dict, batch_groups: list, leaves: list, max_block_dim: Optional[int], diagonal_entry: str
) -> None:
    """Refuse, naming the leaves and shapes, a warm-start batch whose blocks are not the state's: a
    block whose gradient has another shape (a transposed weight, a weight without its bias) or that
    the state does not have (checked first on the blocks the state has, which name the culprit: a
    transposed weight unpairs its bias, whose block is then the missing one)."""

    def described(group) -> str:
        return ", ".join(f"{path_str(p)!r} {tuple(leaves[i].shape)}" for p, i in zip(group.paths, group.indices))

    missing = []
    for group in batch_groups:
        entries = groups.get(group.key)
        if entries is None:
            missing.append(group)
            continue
        if not entries:  # a zero-size block: no state
            continue
        members = tuple(leaves[i] for i in group.indices)
        if block_kind(members, max_block_dim) == DIAGONAL:
            entry, shape = diagonal_entry, tuple(members[0].shape)
        else:
            entry, shape = "momentum", tuple(block_shape(members))
        found = tuple(entries[entry].shape) if entry in entries else None
        if found != shape:
            have = f"{entry!r} {found}" if found is not None else f"no {entry!r} (a block of another kind)"
            raise ValueError(
                f"{name}.warm_start: the gradient of {described(group)} does not fit the optimizer state "
                f"of its block (state has {have}, the gradient needs {entry!r} {shape}); a transposed "
                "gradient, or a weight without its bias?"
            )
    if missing:
        raise ValueError(
            f"{name}.warm_start: the gradient of {described(missing[0])} is not a block of the optimizer "
            f"state (its blocks: {sorted(groups)})"
        )
