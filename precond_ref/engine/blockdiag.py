r"""One-sided block-diagonal preconditioners over stacks of matrices (ASGO's layout).

A method that preconditions one side of each m×n matrix (``k`` rows of its oriented view: the
matrix on the left side, its transpose on the right) may split that side into contiguous chunks
of ``b`` rows and a shorter tail (:func:`precond_ref.blocking.chunk_sizes`), with a k×k, b×b or
tail×tail statistic ``P`` and root ``Z`` per block. Its state then holds ``statistic`` (a k×k
matrix, or the ``c`` chunks ``(c, b, b)``), ``statistic_tail``, ``root`` and ``root_tail`` in the
same shapes, and the counter ``failures`` (:mod:`precond_ref.engine`). This module does the
rest of the layout for such a method, on the joins and stacks of :func:`~precond_ref.engine.matrices.matrix_joins`:

* the rows of each block (:func:`side_blocks`) and the block-diagonal product ``Z M`` (:func:`block_diagonal_product`);
* the roots of the blocks whose phase is due, the equal blocks of all leaves in one batched call,
  a root that is not finite or that the method rejected replaced element-wise, without a branch
  (:func:`refresh_roots`), and the counters of a join's leaves added at once;
* the hints naming the block size that continues a state saved under another one (:func:`block_layout_hint`),
  and the side that continues a state whose statistic is of the other side (:func:`side_layout_hint`);
* the leaves the method does not precondition routed to its fallback rule (:func:`fallback_predicate`)
  and stepped, all of them in one element-wise pass per dtype and device (:func:`fallback_leaves`);
* the transform of a :class:`OneSidedRule` (:func:`one_sided_transform`): the fallback rule's leaves
  routed and stepped, the matrix leaves joined and stacked, the rule's element-wise lines once per
  join and its per-matrix ones per stack, the roots, the renormalised directions, the step and the
  hand-back to the leaves.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

from .._backend import array_device, cast, is_zero, placement, scalar_zero, select
from ..blocking import chunk_sizes
from ..linalg import all_finite, symmetrize
from ..transform import Transform
from ..tree import Path, path_str, tree_flatten
from .checks import renamed_failures
from .context import StepContext, settle_pieces
from .elementwise import rule_step, step_values
from .factors import constant, identity, per_block
from .joined import leafwise
from .layout import saved_blocks_hint
from .matrices import (
    MatrixJoin, MatrixStack, end_to_end, hand_back, joined_form, matrix_joins, matrix_shape, stack_views, symmetrized_pieces, transposed_view,
)
from .options import operands
from .phases import handed_back, hashed_phases, phase_stacks, refreshes
from .run import build_transform

__all__ = [
    "side_blocks", "block_diagonal_product", "finite_root_or_previous", "unrefreshed",
    "refresh_roots", "block_layout_hint", "side_layout_hint", "block_state",
    "is_left", "matrix_side", "OneSidedRule", "one_sided_transform",
    "FallbackMask", "FallbackRule", "fallback_predicate", "fallback_step", "fallback_leaves",
]

Array = Any
FallbackMask = Union[None, Any, Callable[[Path, Array], bool]]

#: the configuration fields the engine makes per dtype itself (-η_t, :meth:`StepContext.negated`),
#: which :func:`~precond_ref.engine.options.operands` leaves as they are
_SCHEDULED = ("learning_rate",)
#: the block entries stacked across the matrix leaves of one shape, besides the joined statistic (:func:`~precond_ref.engine.matrices.matrix_joins`)
_STACKED = ("statistic_tail", "root", "root_tail")
#: the entries of a one-sided rule's matrix leaves computed element-wise over a whole join (:class:`~precond_ref.engine.matrices.MatrixJoin`);
#: with roots, the failure counter too (one sum for all the join's leaves)
_JOINED = ("momentum", "statistic")
_ROOT_OF = {"statistic": "root", "statistic_tail": "root_tail"}


def is_left(side: str, m: int, n: int, transposed: bool = False) -> bool:
    """Whether ``side`` preconditions the left side of an m×n matrix; ``"auto"``: the smaller
    side, the right one for a square matrix (ASGO spec §2.1). ``side`` names a side of the
    out-first view (left: the output rows, right: the input columns); ``transposed``: the m×n
    matrix is the transpose of that view (an out-last Flax ``kernel``,
    :func:`~precond_ref.engine.matrices.transposed_view`), whose left side is then the out-first
    right one, so that its step is the transposed step of the same layer stored out-first."""
    if transposed:
        return not is_left(side, n, m)
    return m < n if side == "auto" else side == "left"


def matrix_side(side: str, shape: tuple[int, ...], path: Path) -> tuple[int, int, bool]:
    """A leaf's matrix view (m, n) (:func:`~precond_ref.engine.matrices.matrix_shape`) and whether
    ``side`` preconditions its left side (:func:`is_left`, the view of an out-last ``kernel``
    read as the transpose of the out-first one)."""
    m, n = matrix_shape(shape, path)
    return m, n, is_left(side, m, n, transposed_view(shape, path))


def block_state(xp: Any, k: int, block_size: Optional[int], dtype: Any, device: Any, roots: bool) -> dict:
    """The block entries of a side of length ``k``: per block a zero statistic and (``roots``) an
    identity root, in ``dtype``; the counter ``failures``."""
    b, full, tail = chunk_sizes(k, block_size)
    shape = (full, b, b) if full else (k, k)
    state = {"statistic": xp.zeros(shape, dtype=dtype, device=device)}
    if roots:
        state["root"] = xp.zeros(shape, dtype=dtype, device=device) + xp.eye(b, dtype=dtype, device=device)
    if tail:
        state["statistic_tail"] = xp.zeros((tail, tail), dtype=dtype, device=device)
        state["root_tail"] = xp.eye(tail, dtype=dtype, device=device)
    state["failures"] = xp.zeros((), dtype=xp.int32, device=device)
    return state


def side_blocks(xp: Any, x: Array, block_size: Optional[int]) -> tuple[Array, Optional[Array]]:
    """The rows of ``x`` (a matrix or a stack ``(L, k, n)``) by block: the chunks of ``block_size``
    rows as one stack ``(L·c, b, n)``, the chunks of each matrix in order (``x`` itself when
    unblocked), and the tail rows (``None`` when the chunks cover ``k``)."""
    b, full, tail = chunk_sizes(x.shape[-2], block_size)
    chunks = xp.reshape(x[..., : full * b, :], (-1, b, x.shape[-1])) if full else x
    return chunks, (x[..., full * b :, :] if tail else None)


def _as_stack(xp: Any, x: Array) -> Array:
    """A matrix as a stack of one block; a stack as itself."""
    return x if x.ndim == 3 else xp.expand_dims(x, axis=0)


def block_diagonal_product(xp: Any, z: Array, z_tail: Optional[Array], momentum: Array, left: bool, dtype: Any) -> Array:
    """``U = Z M`` (``left``) or ``M Z`` with ``Z = blockdiag(Z_1, ..., Z_c, Z_tail)``, in
    ``dtype``, for a momentum ``M`` (a matrix, or a stack of ``L`` matrices, each with its own
    ``Z``). ``z`` holds the roots: one k×k matrix per momentum (unblocked: a matrix, or a stack
    ``(L, k, k)``), or the ``c`` chunks of each in order (a stack ``(L·c, b, b)``, ``b < k``);
    ``z_tail`` the tail roots, if any (one per momentum). Blocked on the right it is ``M Zᵀ``,
    equal for the symmetric roots of statistics.

    Unblocked, the product is taken in the natural orientation, so faithful mode multiplies as
    the authors do; blocked, on the rows of the oriented momentum (its transpose on the right).
    """
    z_p = cast(xp, z, dtype)
    m_p = cast(xp, momentum, dtype)
    k, b = m_p.shape[-2 if left else -1], z_p.shape[-1]
    if b == k:
        return z_p @ m_p if left else m_p @ z_p
    m_o = m_p if left else m_p.mT
    chunks, tail = side_blocks(xp, m_o, b)
    u_o = xp.reshape(z_p @ chunks, (*m_o.shape[:-2], k - k % b, m_o.shape[-1]))
    if z_tail is not None:
        u_o = xp.concat([u_o, cast(xp, z_tail, dtype) @ tail], axis=-2)
    return u_o if left else u_o.mT


def finite_root_or_previous(
    xp: Any, p: Array, previous: Array, inverse_root: Callable[[Array], tuple[Array, Optional[Array]]],
    has_previous: Callable[[], Any] = lambda: True,
) -> tuple[Array, Array]:
    """Per block of a stack: ``Z = inverse_root(P)`` where ``P`` and ``Z`` are finite and the
    method accepted ``Z``, else ``previous``; returns (roots, failed), ``failed`` int32 per block:
    1 where the block's new root was discarded (not finite, or rejected by the method's own check).

    ``inverse_root(P)`` returns ``(Z, rejected)``: ``rejected`` is ``None`` for a method that never
    rejects its roots (``eigh``, an unchecked iteration), else int32 flags of the blocks whose root
    failed the method's check (an iteration that did not converge). There ``Z`` holds the method's
    substitute for a block without a previous root, and the previous root is kept instead where
    ``has_previous()`` (a 0-D bool array or a Python bool, asked only when a flag can be set): a
    selection on the device, no branch and no host read.

    A non-finite statistic never reaches the decomposition (NumPy and torch ``eigh`` raise on it,
    JAX returns NaN): the identity is rooted in its place and the block counts as failed.
    """
    p_ok = all_finite(p, axis=(-2, -1))
    z, rejected = inverse_root(select(xp, per_block(xp, p_ok, p), p, identity(xp, p)))
    if rejected is not None:
        rejected = xp.astype(rejected, xp.bool)
        z = select(xp, per_block(xp, xp.logical_and(rejected, has_previous()), z), previous, z)
    ok = xp.logical_and(all_finite(z, axis=(-2, -1)), p_ok)
    failed = xp.logical_not(ok) if rejected is None else xp.logical_or(xp.logical_not(ok), rejected)
    return select(xp, per_block(xp, ok, z), z, previous), xp.astype(failed, xp.int32)


def unrefreshed(xp: Any, p: Array, previous: Array) -> tuple[Array, Array]:
    """A stack of blocks whose phase is not due on this call: its roots as they were, no failure
    counted (the other branch of :func:`finite_root_or_previous`)."""
    return previous, xp.zeros(p.shape[:1], dtype=xp.int32, device=placement(xp, p))


def _identity(xp: Any, p: Array) -> Array:
    """A stack of identities in the shape of the stack ``p`` (:func:`~precond_ref.engine.factors.identity`)."""
    return xp.zeros_like(p) + identity(xp, p)


def _root_units(
    xp: Any, stacks: Sequence[MatrixStack], statistics: Sequence[dict[str, Array]], split: bool
) -> tuple[list[tuple[Array, Array]], list[tuple[int, str]], list[tuple[str, int]]]:
    """The units a refresh schedules, ``(P, previous Z)`` stacks of blocks (the stored roots, or
    the identity where none is stored), with the owner of each (``(stack, statistic name)``, units
    listed in block order) and its phase key ``(matrix sides in increasing order, block index along
    the side)`` (:func:`precond_ref.engine.phases.hashed_phases`).

    A stack's statistic is one unit, but (``split``) for a side of several chunks, whose blocks
    take different phases: one unit per block. The tail is one unit, index the number of chunks.
    The key holds the sides, not the path: a leaf's phases must not depend on how the parameters
    are named (torch's named and unnamed parameters, optax's tree paths) or grouped, so that a
    resumed or regrouped run refreshes on the same steps; and in increasing order, so that a weight
    and its transpose (an out-first conv weight and a Flax kernel) refresh alike (spec §4, I1, I6).
    """
    units, owners, keys = [], [], []
    for index, (s, entries) in enumerate(zip(stacks, statistics)):
        sides = str(tuple(sorted(s.g.shape[-2:])))
        b, k = entries["statistic"].shape[-1], s.g.shape[-2 if s.left else -1]
        chunks = k // b if b < k else 0  # a blocked side's full chunks (the tail's index)
        for name in (name for name in _ROOT_OF if name in entries):
            p, stored = _as_stack(xp, entries[name]), s.state.get(_ROOT_OF[name])
            z = _identity(xp, p) if stored is None else _as_stack(xp, stored)
            blocks = range(p.shape[0]) if name == "statistic" and split and chunks > 1 else [None]
            units += [(p, z) if j is None else (p[j : j + 1, ...], z[j : j + 1, ...]) for j in blocks]
            keys += [(sides, chunks if name == "statistic_tail" else 0 if j is None else j % chunks) for j in blocks]
            owners += [(index, name)] * len(blocks)
    return units, owners, keys


def _in_order(xp: Any, blocks: list) -> Array:
    """Stacks of blocks joined in order along the block axis; one stack itself."""
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)


def refresh_roots(
    xp: Any, ctx: StepContext, stacks: Sequence[MatrixStack], statistics: Sequence[dict[str, Array]], schedule: tuple,
    stored: bool, inverse_root: Callable[[Array], tuple[Array, Array]], identity_on_failure: bool,
) -> list[dict[str, Array]]:
    """Per stack: ``{"root": Z, "root_tail": Z_tail}`` for its new ``statistics`` (the blocks of one
    statistic joined in order) and, where any of its blocks was refreshed, ``failures``: per leaf
    the sum of its blocks' failures (int32: a vector, one entry per leaf; 0-D for a leaf alone in
    its stack).

    Each block is refreshed on the calls its phase is due (``schedule``: one interval predicate per
    phase, :func:`~precond_ref.engine.phases.hashed_phases`; every call when the roots are not
    ``stored``), all blocks of one shape across leaves and chunks in one batched
    ``inverse_root(P) -> (Z, rejected)`` (:func:`~precond_ref.engine.phases.refreshes` over
    :func:`~precond_ref.engine.phases.phase_stacks`); a
    root that is not finite is replaced by the previous one, or by the identity with
    ``identity_on_failure``, and a root the method rejected by the previous one after the first
    update (before it the stored roots are the initial ones: the method's substitute is kept,
    :func:`finite_root_or_previous`). Blocks not due keep their stored roots.
    """
    dues = [ctx.every(interval) if stored else True for interval in schedule]
    # Decided on the host, each batch's roots are selected for the non-finite rule as they are
    # made (one selection a batch, not one a stack), and the stacks' roots are slices of it.
    settle = stored and all(isinstance(due, bool) for due in dues)

    def refresh(p: Array, previous: Array) -> tuple[Array, Array]:
        # whether a previous root exists, asked per call: a value made in a cond's branch stays there
        z, failed = finite_root_or_previous(xp, p, _identity(xp, p) if identity_on_failure else previous, inverse_root, lambda: ctx.count > 0)
        return (ctx.unless_skipped(z, previous) if settle else z), failed

    units, owners, keys = _root_units(xp, stacks, statistics, len(dues) > 1)
    # per unit its (roots, failures); None where its phase was decided not due on the host
    refreshed: list[Optional[tuple]] = [None] * len(units)
    batches = phase_stacks(xp, hashed_phases(keys, len(dues)), units)
    for batch, out in refreshes(xp, dues, batches, lambda batch: (refresh, partial(unrefreshed, xp))):
        for u, piece in handed_back(batch, out):
            refreshed[u] = piece
    parts: dict[tuple[int, str], list[tuple]] = {}  # per stack and statistic its blocks' (roots, failures) in order
    for owner, (_, z), result in zip(owners, units, refreshed):
        parts.setdefault(owner, []).append((z, None) if result is None else result)
    roots: list[dict[str, Any]] = [{} for _ in stacks]
    for (index, name), results in parts.items():
        z = _in_order(xp, [z for z, _ in results])
        roots[index][_ROOT_OF[name]] = z if statistics[index][name].ndim == 3 else z[0, ...]
        if any(failed is not None for _, failed in results):  # per leaf the sum of its blocks' failures
            per_block = _in_order(xp, [_no_counts(xp, z.shape[0], z) if f is None else f for z, f in results])
            leaves = len(stacks[index].leaves)
            per_leaf = (xp.sum(per_block, dtype=xp.int32) if leaves == 1 else per_block if per_block.shape[0] == leaves
                        else xp.sum(xp.reshape(per_block, (leaves, -1)), axis=1, dtype=xp.int32))
            roots[index]["failures"] = roots[index]["failures"] + per_leaf if "failures" in roots[index] else per_leaf
    if settle:
        ctx.settle([entry[name] for entry in roots if "failures" in entry for name in ("root", "root_tail") if name in entry])
    return roots


def block_layout_hint(found: dict[str, tuple], layout: dict[str, tuple]) -> str:
    """``build_transform``'s ``layout_hint`` (:func:`~precond_ref.engine.layout.saved_blocks_hint`):
    for a state saved with another block size, the ``block_size`` of its statistic's blocks."""
    return saved_blocks_hint(found, layout, lambda shape: f"block_size={shape[-1]}" + (" (or larger)" if len(shape) == 2 else ""))


def side_layout_hint(side: str, block_size: Optional[int], roots: bool) -> Callable[[dict, dict], str]:
    """``build_transform``'s ``layout_hint`` of a one-sided rule (``roots``: one with a statistic
    and root per block of ``block_size``, else a vector along the side) built with ``side``: for a
    state whose ``momentum`` fits but whose statistic is that of the other side of the same matrix
    (saved with the other ``side``, or for an out-last ``kernel`` leaf whose side was read on the
    kernel as stored rather than on its layer, :func:`is_left`), the ``side`` that continues it.
    ``""`` for any other state, and with ``side="auto"``, whose side of a matrix has one length in
    both readings."""
    other = {"left": "right", "right": "left"}.get(side)

    def statistics(entries: dict) -> dict:  # the shapes of the statistic's entries
        return {k: v[0] for k, v in entries.items() if k.startswith("statistic")}

    def of_side(k: int) -> dict:  # the statistic's entries of a side of length k (block_state)
        if not roots:
            return {"statistic": (k,)}
        b, full, tail = chunk_sizes(k, block_size)
        return {"statistic": (full, b, b) if full else (k, k), **({"statistic_tail": (tail, tail)} if tail else {})}

    def hint(found: dict[str, tuple], layout: dict[str, tuple]) -> str:
        if other is None or "momentum" not in layout or found.get("momentum") != layout["momentum"]:
            return ""
        m, n = layout["momentum"][0]
        have = statistics(found)
        if have == statistics(layout) or have not in (of_side(m), of_side(n)):
            return ""
        return (f" Or a state whose statistic is of the other side of this {m}x{n} matrix (saved with side={other!r}, "
                f"or for a Flax `kernel` leaf with its side read on the kernel as stored): build the optimizer with "
                f"side={other!r} to continue from it")

    return hint


class FallbackRule(NamedTuple):
    """An element-wise rule for the leaves a matrix method does not precondition, of one leaf (or
    of many joined into one flat vector: nothing in it reads a shape), with ``c`` its configuration
    (which holds ``learning_rate``):

    ``init(xp, c, w) -> State`` (a NamedTuple of arrays in ``w``'s shape);
    ``scalars(xp, c, t, minus_lr) -> Step``: the step's scalars from the step's values ``t``
    (:class:`~precond_ref.engine.elementwise.StepValues`: ``t.step``, the step number ``count + 1``
    in the state's dtype) and ``-η_t`` (a 0-D array of the state's dtype), made once per step,
    dtype and device;
    ``state(xp, c, s, g, w, h) -> State``: the state after this step (``g`` and ``w`` in the
    state's dtype; ``w`` is ``None`` when the transform does not read the parameters);
    ``update(xp, c, s, g, w, h)``: the step added to the parameter, from the state after it.
    """

    State: type
    init: Callable
    scalars: Callable
    state: Callable
    update: Callable


def fallback_predicate(fallback_mask: FallbackMask) -> Callable[[Path, Array], bool]:
    """``(path, leaf) -> bool``: does this leaf go to the fallback rule? ``None``: leaves of fewer
    than 2 dimensions; a callable ``(path, leaf) -> bool``; or a tree of bools like the parameters."""
    if fallback_mask is None:
        return lambda path, leaf: leaf.ndim < 2
    if callable(fallback_mask):
        return lambda path, leaf: bool(fallback_mask(path, leaf))
    leaves, treedef = tree_flatten(fallback_mask)
    table = dict(zip(treedef.paths, leaves))
    for path, flag in table.items():
        if not isinstance(flag, bool):
            raise ValueError(f"fallback_mask must be a tree of bools or a callable (path, leaf) -> bool; "
                             f"entry {path_str(path)!r} is {flag!r}")

    def lookup(path: Path, leaf: Array) -> bool:
        if path not in table:
            raise ValueError(f"fallback_mask has no entry for parameter {path_str(path)!r}")
        return table[path]

    return lookup


def fallback_step(rule: FallbackRule, c: Any, g: Array, state: dict, param: Any, ctx: StepContext) -> tuple:
    """The fallback rule's step of one leaf (or of leaves joined), as ``((update,), new state)``:
    the gradient and parameter cast to the state's dtype, the configuration ``c`` as operands of
    that dtype (:func:`~precond_ref.engine.options.operands`), the step's scalars made once per update
    from the step's values in that dtype (:func:`~precond_ref.engine.elementwise.step_values`) and
    ``-η_t`` (the one the matrix step shares, :meth:`StepContext.negated`), and the new state
    selected for the non-finite rule before the update is formed from it."""
    xp, old = ctx.xp, rule.State(**state)
    dtype, device = old[0].dtype, array_device(old[0])
    c = operands(xp, c, dtype, _SCHEDULED)
    g, w = cast(xp, g, dtype), None if param is None else cast(xp, param, dtype)
    h = ctx.once(("fallback", dtype, device),
                 lambda: rule.scalars(xp, c, step_values(ctx, dtype, device),
                                      ctx.negated("learning_rate", c.learning_rate, dtype, device)))
    new, u = rule_step(xp, rule, c, old, g, w, h, ctx.unless_skipped)
    return (u,), new._asdict()


def fallback_leaves(xp: Any, grads: list, states: list, params: Any, ctx: StepContext, rule: FallbackRule, c: Any) -> tuple:
    """The groups' results with the fallback rule's leaves (those whose state is ``rule.State``'s)
    stepped, all of them in one pass (:func:`~precond_ref.engine.joined.leafwise`), the others
    ``None``; and the indices of the others (the matrix leaves)."""
    names = rule.State._fields
    results: list[Any] = [None] * len(grads)
    ours = [i for i, state in enumerate(states) if set(state) == set(names)]
    with_param = bool(ours) and params[ours[0]] is not None

    def step(g: Array, *arrays: Array) -> tuple:  # the leaf's entries, then its parameter
        (u,), new = fallback_step(rule, c, g, dict(zip(names, arrays)), arrays[-1] if with_param else None, ctx)
        return (u, *(new[k] for k in names))

    operands = [[grads[i][0] for i in ours], *([states[i][k] for i in ours] for k in names), *([[params[i][0] for i in ours]] if with_param else [])]
    for i, (u, *entries) in zip(ours, leafwise(xp, step, *operands, ctx=ctx)):
        results[i] = ((u,), dict(zip(names, entries)))
    return results, [i for i, result in enumerate(results) if result is None]


class OneSidedRule(NamedTuple):
    """A one-sided rule (ASGO's, DASGO's): pure functions of one stack of matrix leaves ``s`` (a
    :class:`~precond_ref.engine.matrices.MatrixStack`: ``s.g`` the gradients in the compute dtype,
    ``s.state`` the stored entries, ``s.left`` the side) or, for those marked element-wise, of the
    arrays of any number of leaves joined end to end (nothing in them reads a shape); ``c`` is the
    rule's configuration, which holds ``learning_rate``, ``weight_decay``, ``side``, ``faithful``,
    ``rms_target`` and, for a rule with roots, ``keeps_root`` (whether the state stores the roots
    between refreshes) and ``block_size``.

    ``init(xp, c, w, path)``: a matrix leaf's state, its ``momentum`` the leaf's m×n matrix view;
    ``terms(xp, c, s)``: the new term ``S_t`` of each statistic of a stack (its name: ``statistic``,
    a blocked side's ``statistic_tail``);
    ``momentum(xp, c, m, g, zero)``: ``M_t``, element-wise (``g`` cast to the momentum's dtype,
    ``zero`` a 0-D zero of the gradients' compute dtype);
    ``statistic(xp, c, p, s)``: ``P_t`` from ``P_{t-1}`` and ``S_t`` (cast to ``P``'s dtype),
    element-wise, of every statistic;
    ``symmetric``: ``P_t`` is stored as ``(P_t + P_tᵀ)/2`` (:func:`~precond_ref.linalg.symmetrize`);
    ``inverse_root(xp, c, P) -> (Z, rejected)``: the roots of a stack of statistics (``None``: a
    rule without roots), refreshed by :func:`refresh_roots`;
    ``direction(xp, c, s, new, roots)``: a stack's ``U_t`` from its new entries and roots;
    ``scale(xp, c, v)``, given instead of ``direction``: ``s_t``, element-wise from the new
    statistic, of the direction ``U_t = M_t diag(s_t)`` (``diag(s_t) M_t`` on the left side);
    ``renormalise``: the RMS renormalisation of ``U_t`` (:func:`~precond_ref.linalg.rms_renormalised`
    for ``direction``, :func:`~precond_ref.linalg.scaled_rms_renormalised` for ``scale``), applied
    with ``c.rms_target``, exactly in the direction's dtype where ``c.faithful``;
    ``finish(xp, c, minus_lr, u, w)``: the update from ``U_t``, element-wise (``w``: the parameters
    in ``U_t``'s dtype, ``None`` without weight decay); ``fallback``: the rule of the leaves not preconditioned
    (:class:`FallbackRule`).
    """

    init: Callable
    terms: Callable
    momentum: Callable
    statistic: Callable
    symmetric: bool
    inverse_root: Optional[Callable]
    direction: Optional[Callable]
    scale: Optional[Callable]
    renormalise: Callable
    finish: Callable
    fallback: FallbackRule


def one_sided_transform(
    rule: OneSidedRule, c: Any, *, name: str, on_nonfinite: str, fallback: Any, fallback_mask: FallbackMask,
    schedule: tuple = (),
) -> Transform:
    """The transform of a one-sided rule. A leaf that ``fallback_mask`` names (default: fewer than
    2 dimensions) is a leaf of ``rule.fallback`` (configuration ``fallback``), all of them stepped
    in one pass (:func:`fallback_leaves`); the others are matrix leaves (``rule.init``),
    joined by dtype and device and stacked by matrix shape (:func:`~precond_ref.engine.matrices.matrix_joins`),
    each join stepped by :func:`_joined_step`. The roots are refreshed by phase (``schedule``; every
    call unless ``c.keeps_root``). A rule without roots steps each leaf from its own arrays alone
    (``independent_leaves``). A state that does not fit is refused with the ``side`` that continues
    it where its statistic is of the other side (:func:`side_layout_hint`), else, for a rule with
    roots, the ``block_size`` that continues a state saved with other blocks (:func:`block_layout_hint`).
    A leaf's side is :func:`matrix_side`'s, from its shape and path."""
    goes_to_fallback = fallback_predicate(fallback_mask)
    has_roots = rule.inverse_root is not None
    keeps_root = has_roots and c.keeps_root
    side_hint = side_layout_hint(c.side, c.block_size if has_roots else None, has_roots)

    def layout_hint(found: dict[str, tuple], layout: dict[str, tuple]) -> str:
        return side_hint(found, layout) or (block_layout_hint(found, layout) if has_roots else "")

    def init_group(leaves, paths, xp):
        (w,), (path,) = leaves, paths
        return rule.fallback.init(xp, fallback, w)._asdict() if goes_to_fallback(path, w) else rule.init(xp, c, w, path)

    def update_groups(grads, states, params, ctxs: list[StepContext]):
        xp, ctx = ctxs[0].xp, ctxs[0]
        results, matrices = fallback_leaves(xp, grads, states, params, ctx, rule.fallback, fallback)
        def left(i: int) -> bool:  # leaf i's side, from its own shape and path (a group is one leaf)
            return matrix_side(c.side, tuple(grads[i][0].shape), ctxs[i].paths[0])[2]

        # a rule without roots stacks element-wise passes and reductions only (matrix_joins' ``passes``)
        for join in matrix_joins(xp, grads, states, params, matrices, _STACKED if has_roots else (), (*_JOINED, "failures") if has_roots else _JOINED,
                                 left, not is_zero(c.weight_decay), passes=not has_roots):
            for i, result in _joined_step(xp, ctx, rule, c, join, states, schedule, keeps_root):
                results[i] = result
        return results

    return build_transform(
        name=name, init_group=init_group, update_groups=update_groups, on_nonfinite=on_nonfinite,
        needs_params=not is_zero(c.weight_decay) or not is_zero(fallback.weight_decay), intervals=schedule,
        layout_hint=layout_hint, legacy_names=renamed_failures if has_roots else None,
        independent_leaves=not has_roots,
    )


def _joined_step(
    xp: Any, ctx: StepContext, rule: OneSidedRule, c: Any, join: MatrixJoin, states: list, schedule: tuple, keeps_root: bool,
) -> list[tuple[int, tuple]]:
    """The step of one join of matrix leaves: the new ``momentum`` and ``statistic`` element-wise
    over the join (the stacks' terms joined; a symmetric statistic symmetrised piece by piece,
    :func:`~precond_ref.engine.matrices.symmetrized_pieces`), selected for the non-finite rule
    before anything reads them, and a blocked side's tail per stack; the roots refreshed
    (:func:`refresh_roots`) and the counters of all the join's leaves added at once; the
    renormalised directions of all stacks joined, the update
    ``rule.finish(-η_t, U_t, W)`` once over the join, and each stack's step, entries, refreshed
    roots and counters handed back to its leaves (:func:`~precond_ref.engine.matrices.hand_back`).

    Each of the rule's functions gets the configuration as operands of the dtype it computes in
    (:func:`~precond_ref.engine.options.operands`, made once per dtype): the terms, the directions
    and the finish the gradients' compute dtype (the stacks' gradients are pieces of the join's),
    the momentum its own, the statistics (a blocked side's tail of the same dtype), their roots and
    the scale the statistics'."""
    stacks, old, new = join.stacks, join.state, [{} for _ in join.stacks]
    c_g, c_p, c_m = (operands(xp, c, dtype, _SCHEDULED) for dtype in (join.g.dtype, old["statistic"].dtype, old["momentum"].dtype))

    def views(flat: Array, name: str) -> list:  # a joined array's piece of each stack, in the shapes of entry ``name``
        return stack_views(xp, flat, states, [s.leaves for s in stacks], name)

    def selected(made: dict) -> dict:  # new joined entries selected once, each stack given its pieces
        made = {k: ctx.unless_skipped(a, old[k]) for k, a in made.items()}
        for k, a in made.items():
            for entries, piece in zip(new, settle_pieces(ctx, a, views(a, k))):
                entries[k] = piece
        return made

    terms = [rule.terms(xp, c_g, s) for s in stacks]
    zero = ctx.once(("zero", join.g.dtype, array_device(join.g)), lambda: scalar_zero(xp, join.g))  # the transform's own, once per update
    p = rule.statistic(xp, c_p, old["statistic"], cast(xp, end_to_end(xp, [t["statistic"] for t in terms]), old["statistic"].dtype))
    made = selected({"momentum": rule.momentum(xp, c_m, old["momentum"], cast(xp, join.g, old["momentum"].dtype), zero),
                     "statistic": symmetrized_pieces(xp, p, views(p, "statistic")) if rule.symmetric else p})
    for entries, s, t in zip(new, stacks, terms):  # a blocked side's tail
        for name in (name for name in t if name not in made):
            tail = rule.statistic(xp, c_p, s.state[name], cast(xp, t[name], s.state[name].dtype))
            entries[name] = symmetrize(tail) if rule.symmetric else tail
    roots = ([{} for _ in stacks] if rule.inverse_root is None
             else refresh_roots(xp, ctx, stacks, new, schedule, keeps_root, partial(rule.inverse_root, xp, c_p), c.faithful))
    counts = [z.pop("failures", None) for z in roots]
    if any(n is not None for n in counts):  # the counters of all the join's leaves in one sum
        selected({"failures": old["failures"] + end_to_end(xp, [_no_counts(xp, len(s.leaves), join.g) if n is None else n
                                                                 for s, n in zip(stacks, counts)])})
    # the directions U_t renormalised, joined end to end (joined_form: the element-wise work once over
    # the join): rule.direction of each stack, or M_t diag(s_t) with s_t = rule.scale of the joined
    # statistic, in the gradients' dtype
    renormalised = joined_form(rule.renormalise)
    if rule.scale is None:
        us = [rule.direction(xp, c_g, s, entries, z) for s, entries, z in zip(stacks, new, roots)]
        u = renormalised(xp, us, c_g.rms_target, c.faithful)
    else:
        scale, m = cast(xp, rule.scale(xp, c_p, made["statistic"]), join.g.dtype), cast(xp, made["momentum"], join.g.dtype)
        axes = [-1 if s.left else -2 for s in stacks]  # the scaled axis: the rows' on the left, the columns' on the right
        u = renormalised(xp, m, scale, views(m, "momentum"), views(scale, "statistic"), axes, c_g.rms_target, c.faithful)
    minus_lr = ctx.negated("learning_rate", c.learning_rate, u.dtype, array_device(u))
    step = rule.finish(xp, c_g, minus_lr, u, None if join.param is None else cast(xp, join.param, u.dtype))
    out = []
    for s, entries, z, piece, n in zip(stacks, new, roots, views(step, "momentum"), counts):
        # refreshed roots; a stack none of whose blocks was refreshed keeps its stored ones
        out += hand_back(xp, s, states, piece, {**entries, **z} if keeps_root and n is not None else entries, ctx)
    return out


def _no_counts(xp: Any, leaves: int, like: Array) -> Array:
    """Zero counts of ``leaves`` leaves (int32, on ``like``'s device), made once."""
    make = lambda: xp.zeros((leaves,), dtype=xp.int32, device=placement(xp, like))  # noqa: E731
    return constant(xp, ("no counts", leaves), make, like)
