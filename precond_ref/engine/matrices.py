"""Matrix leaves stacked across a tree (the DASH layout): the leaves of one matrix shape, dtype and
device along a leading axis, so that each line of a method's step is one operation per stack; and
an element-wise step over leaves of any shape joined end to end."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence

from .. import blocking
from .._backend import cast, compute_dtype, device_key, stacked as stacked_view
from ..blocking import Stack, stack, unstack
from .context import StepContext, settle_pieces

__all__ = ["MatrixStack", "matrix_stacks", "hand_back", "leaves_of", "as_matrix", "matrix_shape", "joined_leaves"]

Array = Any


class MatrixStack(NamedTuple):
    """The matrix leaves of one matrix shape, dtype and device (the DASH layout: a leading axis).

    ``leaves``: their indices among the groups, in order; ``shapes``: their own shapes; ``left``:
    whether the method preconditions the left side of these matrices; ``g``: the gradients
    ``(L, m, n)`` in the compute dtype; ``state``: the stacked entries (``(L, ...)`` for an entry
    that is one array per leaf, the ``L·c`` blocks of a blocked one along its block axis);
    ``param``: the parameters ``(L, m, n)``, or ``None`` when the step does not read them. A leaf
    alone in its stack keeps its own arrays (``g`` an m×n matrix): the same operations as for one
    matrix.
    """

    leaves: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    left: bool
    g: Array
    state: dict[str, Array]
    param: Optional[Array]


def matrix_stacks(
    xp: Any, grads: list, states: list, params: Any, leaves: list[int], names: Sequence[str],
    left: Callable[[int, int], bool], with_param: bool, passes: bool = False,
) -> list[MatrixStack]:
    """The matrix leaves ``leaves`` (each group one leaf whose state's ``momentum`` is its m×n
    matrix view) grouped into stacks of equal matrix shape, dtype and device
    (:func:`~precond_ref.blocking.stack`): per leaf its gradient as an m×n matrix in the compute
    dtype, its state entries ``names`` (those it has) and, with ``with_param``, its parameter as an
    m×n matrix, joined along a new leading axis. ``left(m, n)``: whether the method preconditions
    the left side of an m×n matrix.

    ``passes``: the method's work on a stack is passes over its entries (element-wise operations
    and reductions), no batched product or decomposition. Stacked, it saves one call per leaf and
    nothing else, which on a CPU is worth less than the stack's copies and its larger temporaries
    (fresh pages from the allocator on every step) for all but small matrices: there only matrices
    below :func:`_cpu_passes_bound` entries stack."""
    members, labels = [], []
    for i in leaves:
        (g,), state = grads[i], states[i]
        shape = tuple(state["momentum"].shape)
        operands = [cast(xp, as_matrix(xp, g, shape), compute_dtype(xp, g.dtype))]
        operands += [state[n] for n in names if n in state]
        if with_param:
            operands.append(as_matrix(xp, params[i][0], shape))
        members.append(tuple(operands))
        labels.append(tuple(n for n in names if n in state))
    # One leaf is its own stack: no stacking key read (its shape in a key would make a compiler
    # specialise a graph of every size to that shape).
    alone = [Stack((0,), members[0], (members[0][0].shape[0],))] if len(members) == 1 else None
    stacks = []
    key = _full_layout if not passes else partial(_small_on_cpu, _cpu_passes_bound())
    for s in alone or stack(xp, members, key=key, labels=labels):
        count, entries = len(s.indices), labels[s.indices[0]]
        joined = [a if a.ndim == 3 or count == 1 else xp.reshape(a, (count, *members[s.indices[0]][k].shape)) for k, a in enumerate(s.operands)]
        m, n = joined[0].shape[-2:]
        stacks.append(MatrixStack(
            leaves=tuple(leaves[j] for j in s.indices),
            shapes=tuple(tuple(grads[leaves[j]][0].shape) for j in s.indices),
            left=left(m, n),
            g=joined[0],
            state=dict(zip(entries, joined[1 : 1 + len(entries)])),
            param=joined[-1] if with_param else None,
        ))
    return stacks


def matrix_shape(shape: tuple[int, ...], path: Any) -> tuple[int, int]:
    """(m, n) of a leaf's matrix view: a 0-D leaf is 1×1, a 1-D leaf a 1×n row; a ≥3-D leaf is
    (first axis, rest) in the out-first layout, or (all but the last axis, last axis) for an
    out-last Flax ``kernel`` (the last entry of its ``path``)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if path and path[-1] == "kernel":
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def as_matrix(xp: Any, x: Array, shape: tuple[int, ...]) -> Array:
    """``x`` reshaped to ``shape`` (its matrix view), ``x`` itself when it has that shape."""
    return x if tuple(x.shape) == shape else xp.reshape(x, shape)


def _full_layout(operands: tuple) -> tuple:
    """The stacking key of a matrix leaf: the whole shape, dtype and device of every operand."""
    return tuple((tuple(a.shape), a.dtype, device_key(a)) for a in operands)


def _cpu_passes_bound() -> int:
    """The entries from which a matrix stays alone on a CPU for a method of ``passes``: an eighth
    of :data:`~precond_ref.blocking.CPU_BATCHED_ENOUGH` (64 KiB of float32; read per call, as that
    bound is, so that a GPU's grouping lifts both)."""
    return blocking.CPU_BATCHED_ENOUGH // 8


def _small_on_cpu(bound: int, operands: tuple) -> Optional[tuple]:
    """The stacking key :func:`_full_layout`, or ``None`` (alone) for a matrix of ``bound`` entries
    or more on a CPU."""
    return None if blocking.large_on_cpu(operands, bound) else _full_layout(operands)


def hand_back(
    xp: Any, s: MatrixStack, states: list, step: Array, entries: dict[str, Array], counts: dict[str, Array],
    ctx: StepContext, counters: Sequence[str] = (),
) -> list[tuple[int, tuple]]:
    """``(leaf, ((step,), new state))`` for each leaf of a stack: its slice of the stacked ``step``
    in its own shape; its slices of the stacked ``entries``, in the shapes of its stored entries
    (an entry not given: the stored array itself); and each of its counters ``state[c] +
    counts[c][l]`` (``counters``: the names of its counters; one not in ``counts``: the stored
    one). The non-finite rule's selection of the new entries (:meth:`StepContext.unless_skipped`)
    is made here, once on each stacked entry rather than on each leaf's slice (:func:`~precond_ref.engine.settle_pieces`),
    unless the method made it already."""
    count = len(s.leaves)
    steps = leaves_of(xp, step, count, tuple(step.shape[-2:]))
    first = states[s.leaves[0]]
    pieces = {}
    for name, a in entries.items():
        if name in s.state and s.state[name] is not a and not (ctx.settled is not None and a in ctx.settled):
            a = ctx.unless_skipped(a, s.state[name])
        pieces[name] = settle_pieces(ctx, a, leaves_of(xp, a, count, tuple(first[name].shape)))
    for name in counters:
        if name in first:
            old = [states[i][name] for i in s.leaves]
            if name not in counts:
                pieces[name] = old
            elif count == 1:
                pieces[name] = (old[0] + counts[name],)
            else:
                stacked = stacked_view(xp, old)
                summed = ctx.unless_skipped(stacked + counts[name], stacked)
                pieces[name] = settle_pieces(ctx, summed, xp.unstack(summed))
    out = []
    for l, i in enumerate(s.leaves):
        new = dict(states[i])
        new.update({name: p[l] for name, p in pieces.items()})
        out.append((i, ((as_matrix(xp, steps[l], s.shapes[l]),), new)))
    return out


def leaves_of(xp: Any, x: Array, count: int, shape: tuple[int, ...]) -> Sequence[Array]:
    """``x[l]`` for ``l < count`` of a stack ``x`` of ``count`` leaves, in ``shape`` (a blocked
    entry's ``count·c`` blocks, ``c`` per leaf, regrouped)."""
    if count == 1:
        return (as_matrix(xp, x, shape),)
    if tuple(x.shape) != (count, *shape):
        x = xp.reshape(x, (count, *shape))
    return xp.unstack(x, axis=0)


def joined_leaves(xp: Any, step: Callable, leaves: list[tuple], ctx: StepContext) -> list[tuple]:
    """``[step(g, state, param, ctx) for (g, state, param) in leaves]`` for an element-wise ``step``
    (the fallback Adam), taken once per dtype and device: each leaf's gradient, state entries and
    parameter flattened and joined end to end (:func:`~precond_ref.blocking.stack`), and each leaf
    handed its slices of the results in its own shape. Every entry is computed by the same
    operations as for its leaf alone (bitwise equal); the cost is a few operations per join instead
    of a dozen per leaf (the biases and norms of a transformer are most of its leaves)."""
    if not leaves:
        return []
    names = sorted(leaves[0][1])
    with_param = leaves[0][2] is not None
    members = [(g, *(state[k] for k in names), *((w,) if with_param else ())) for g, state, w in leaves]
    flat = [tuple(xp.reshape(a, (-1,)) if a.ndim != 1 else a for a in operands) for operands in members]
    stacks = stack(xp, flat)
    outputs = []
    for s in stacks:
        g, entries, w = s.operands[0], s.operands[1 : 1 + len(names)], (s.operands[-1] if with_param else None)
        (u,), new = step(g, dict(zip(names, entries)), w, ctx)
        outputs.append((u, *(new[k] for k in names)))
    # A leaf's part of an entry the step selected (StepContext.unless_skipped) is selected too.
    joined_of = {i: out[1:] for s, out in zip(stacks, outputs) for i in s.indices}
    results = []
    for index, ((g, state, _), pieces) in enumerate(zip(leaves, unstack(stacks, outputs, len(leaves)))):
        u, *entries = (p if p.shape == state[names[0]].shape else xp.reshape(p, state[names[0]].shape) for p in pieces)
        for whole, entry in zip(joined_of[index], entries):
            settle_pieces(ctx, whole, (entry,))
        results.append(((u,), dict(zip(names, entries))))
    return results
