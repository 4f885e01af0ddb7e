"""Shape helpers shared by the factored methods: merging small axes, blocking large ones, unfolding.

Kronecker-factored preconditioners (Shampoo, Sketchy, ...) keep one statistic per tensor axis.
Two reshapes make that practical for arbitrary tensors:

* **merging** (:func:`merge_small_dims`): adjacent small axes are multiplied together, left to
  right, so a conv kernel (3, 3, 64, 128) is treated as a (576, 128) matrix and unit axes vanish;
* **blocking** (:func:`block_bounds`, specs README §6): an axis longer than ``block_size`` is cut
  into contiguous chunks (the last may be shorter, no padding). Each chunk has its own statistic,
  built from the rows of the axis unfolding that fall in the chunk, so the per-axis preconditioner
  is the block-diagonal part of the unblocked one; ``block_size`` at least every dimension
  reproduces the unblocked method exactly.

Everything here is pure Python on shapes, except :func:`unfold` / :func:`fold_rolled`, which move
arrays with standard array-API calls.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, NamedTuple, Optional, Sequence

from ._backend import array_device, device_key, joined, leading_slices

Array = Any


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge adjacent axes left to right while their product stays at most ``max_dim``.

    Walk the shape keeping a running product; while ``product * d <= max_dim`` multiply ``d`` in,
    otherwise emit the product (if > 1) and restart at ``d``; finally emit the product if > 1.
    Unit axes therefore disappear, and an all-ones (or empty) shape becomes ``()``.
    This is ``distributed_shampoo.merge_small_dims`` of google-research/precondition, e.g.
    ``(1, 2, 512, 1, 2048, 1, 3, 4) -> (1024, 2048, 12)`` for ``max_dim = 1024``.
    """
    merged: list[int] = []
    product = 1
    for d in shape:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    return tuple(merged)


def block_bounds(d: int, block_size: Optional[int]) -> tuple[tuple[int, int], ...]:
    """Contiguous ``(start, stop)`` chunks of an axis of length ``d`` (one chunk if unblocked)."""
    if block_size is None or d <= block_size:
        return ((0, d),)
    return tuple((start, min(start + block_size, d)) for start in range(0, d, block_size))


def chunk_sizes(d: int, block_size: Optional[int]) -> tuple[int, int, int]:
    """:func:`block_bounds` of an axis of length ``d`` as ``(b, full, tail)``: ``full`` chunks of
    ``b = block_size`` and a shorter last one of ``tail`` (0 if none); ``(d, 0, 0)`` when unblocked
    (``block_size`` None or at least ``d``)."""
    if block_size is None or d <= block_size:
        return d, 0, 0
    return block_size, d // block_size, d % block_size


def unfold(xp: Any, x: Array, axis: int) -> Array:
    """The mode-``axis`` unfolding: ``axis`` moved first, reshaped to ``(d, numel / d)``."""
    order = (axis,) + tuple(i for i in range(x.ndim) if i != axis)
    moved = xp.permute_dims(x, order) if axis != 0 else x
    d = x.shape[axis]
    return xp.reshape(moved, (d, math.prod(x.shape) // d if d else 0))


def roll_first_axis_last(xp: Any, x: Array) -> Array:
    """Move axis 0 to the end; applying it ``ndim`` times restores the original order."""
    if x.ndim <= 1:
        return x
    return xp.permute_dims(x, tuple(range(1, x.ndim)) + (0,))


class Stack(NamedTuple):
    """Members of :func:`stack` that go through one call together.

    ``indices``: the members, in order; ``operands``: their operands concatenated along the leading
    axis (a lone member's own operands, uncopied); ``lengths``: each member's leading length.
    """

    indices: tuple[int, ...]
    operands: tuple
    lengths: tuple[int, ...]


def same_layout(operands: tuple) -> Hashable:
    """The default stacking key: every operand's trailing shape, dtype and device."""
    return tuple([(tuple(a.shape[1:]), a.dtype, device_key(a)) for a in operands])


#: entries: on a CPU, a member of :func:`stack` whose first operand has at least this many (32 blocks
#: of 64 x 64) forms a stack of its own. Concatenating it with its equals would copy each of its
#: operands through memory, which on a CPU costs more than the calls it saves
#: (docs/performance-archive.md); on an accelerator a copy is cheap beside a kernel launch, and equal
#: members always concatenate. Each block's result is the same either way.
CPU_BATCHED_ENOUGH = 2**17


def large_on_cpu(operands: tuple, entries: int) -> bool:
    """Whether a member's first operand lives on the CPU and has at least ``entries`` entries."""
    first = operands[0]
    return math.prod(first.shape) >= entries and str(array_device(first)) == "cpu"


def stack(
    xp: Any, members: Sequence[tuple], key: Optional[Callable[[tuple], Hashable]] = None, *,
    labels: Optional[Sequence[Hashable]] = None,
) -> list[Stack]:
    """The members (tuples of operands with a leading block axis) grouped into stacks.

    Members whose operands agree in trailing shape, dtype and device (or in ``key(operands)`` when
    given), and in ``labels[i]`` when given (what the operands are, e.g. the names of state
    entries), form one :class:`Stack`, their operands concatenated along the leading axis; a
    member whose ``key(operands)`` is ``None``, or, without a ``key``, that is already a large batch
    on a CPU (:data:`CPU_BATCHED_ENOUGH`), forms a stack alone. Stacks are in order of first
    appearance, members within a stack in their given order. :func:`unstack` hands results
    computed on the stacks back member by member, as views of them; so a state entry handed back
    and joined again in the next step is already its stack (:func:`~precond_ref._backend.joined`:
    a view, no copy), and the stack persists across steps.
    """
    groups: dict[Hashable, list[int]] = {}
    for index in range(len(members)):
        operands = members[index]
        label = None if labels is None else labels[index]
        layout = key(operands) if key is not None else None if large_on_cpu(operands, CPU_BATCHED_ENOUGH) else same_layout(operands)
        # (index,), a 1-tuple, equals no (label, layout) pair
        groups.setdefault((index,) if layout is None else (label, layout), []).append(index)
    stacks = []
    for indices in groups.values():
        # a member alone: its operands; else each operand of the members, in order, joined
        operands = tuple(members[indices[0]]) if len(indices) == 1 else tuple(
            [joined(xp, column) for column in zip(*[members[i] for i in indices])])
        stacks.append(Stack(tuple(indices), operands, tuple([members[i][0].shape[0] for i in indices])))
    return stacks


def unstack(stacks: Sequence[Stack], results: Sequence[tuple], count: int) -> list[Optional[tuple]]:
    """``out[i]``: member ``i``'s slice (along the leading axis) of its stack's ``results``.

    ``results[s]`` is a tuple of arrays with the leading length of ``stacks[s]``; a lone member gets
    its stack's results themselves. ``count`` is the number of members; one in none of ``stacks``
    gets ``None``.
    """
    out: list[Optional[tuple]] = [None] * count
    for s, arrays in zip(stacks, results):
        pieces = [leading_slices(a, s.lengths) if len(s.indices) > 1 else (a,) for a in arrays]
        for i, *member in zip(s.indices, *pieces):
            out[i] = tuple(member)
    return out


def on_stacks(
    xp: Any, fn: Callable[..., tuple], members: Sequence[tuple], key: Optional[Callable[[tuple], Hashable]] = None,
) -> list[tuple]:
    """``fn`` applied once per stack of equal blocks, results handed back member by member.

    The plain formula: for every member ``i`` (a tuple of operands, each with a leading block axis
    of one length ``n_i``), ``on_stacks(xp, fn, members)[i] == fn(*members[i])``. Members whose
    operands agree in trailing shape, dtype and device (or in ``key(operands)`` when given) are
    concatenated along the leading axis and go through ``fn`` together (:func:`stack`), so ``fn``
    must act block by block along that axis (a batched ``eigh``, a batched matmul, an element-wise
    formula). This is how the factored methods batch the equal-size blocks of all their
    parameters: the method is written for one stack (a leading ``...``), the bookkeeping lives here.
    Groups are visited in order of first appearance; ``fn`` returns a tuple of arrays with the same
    leading length.
    """
    stacks = stack(xp, members, key)
    return unstack(stacks, [tuple(fn(*s.operands)) for s in stacks], len(members))


# --------------------------------------------------------------------------------------------
# Spreading a refresh over its interval: each block refreshes once per interval, on
# the step of its phase, so that no step does all the blocks' expensive work at once.


class PhaseDue(NamedTuple):
    """The refresh predicate of phase ``phase`` of a spread interval ``T``:
    ``count -> count == 0 or count % T == phase``.

    Every phase is due on the first update (no block starts from an empty or identity factor),
    then exactly one phase per step, each once per interval. A static schedule: ``count`` is a
    Python int (a bool back: a host decision) or a 0-D integer array (a 0-D bool array: no host
    read under a compiler).
    """

    interval: int
    phase: int

    def __call__(self, count: Any) -> Any:
        return (count == 0) | (count % self.interval == self.phase)


def spread_schedule(interval: Any, spread: bool) -> tuple:
    """The refresh predicates of a method's blocks, indexed by phase: ``(interval,)`` (one phase,
    the plain ``count % T == 0``) unless spread over an integer interval ``T > 1``, then one
    :class:`PhaseDue` per phase ``0 .. T-1``. For ``StepContext.every`` and ``build_transform``'s
    ``intervals``."""
    if not spread or callable(interval) or interval == 1:
        return (interval,)
    return tuple(PhaseDue(interval, phase) for phase in range(interval))


def stable_hash(text: str) -> int:
    """``Σ ord(c_i) 31^(n-1-i) mod 1000003``: a string hash that is the same in every process, run
    and platform (Python's ``hash`` is salted), in plain Python that ``torch.compile`` folds
    (``zlib.crc32`` is a graph break). Spreads the leaves of a model over refresh phases by path."""
    h = 0
    for ch in text:
        h = (h * 31 + ord(ch)) % 1_000_003
    return h
