"""Matrix leaves stacked across a tree (the DASH layout): the leaves of one matrix shape, dtype and
device along a leading axis, so that each line of a method's step is one operation per stack; and
an element-wise step over leaves of any shape joined end to end.

The joined forms of the RMS renormalisations of :mod:`precond_ref.linalg` (ASGO and DASGO, at the
end): a method's stacks of directions renormalised each as alone (``linalg.rms_renormalised``,
``linalg.scaled_rms_renormalised``), flattened and joined end to end, with the element-wise work of
the float64 form (the casts, the selections of the norms) done once over the join instead of once
per stack. The same numbers as the plain form beside each, which runs where the fast form does not
apply (one stack, a form other than float64, a backend without writable views) and within
:func:`~precond_ref._backend.plain_forms`."""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

from array_api_compat import is_array_api_strict_namespace, is_jax_namespace

from .. import blocking
from .._backend import (
    as_operand, cast, compute_dtype, device_key, is_number, is_torch_namespace, joined, on_cpu, pieces, placement, plain, stacked as stacked_view, sum_across, torch_compiling,
)
from ..linalg import (nonzero_divisor, per_matrix_column, rms_renormalised, scaled_rms_renormalised, symmetrize,
                      wide_dtype, wide_target)
from .context import StepContext, settle_pieces
from .factors import constant

__all__ = [
    "MatrixStack", "MatrixJoin", "matrix_joins", "JOIN_MAX_ELEMENTS", "stack_views", "end_to_end", "symmetrized_pieces", "hand_back", "leaves_of",
    "as_matrix", "matrix_shape", "transposed_view", "joined_form", "joined_rms_renormalised", "joined_scaled_rms_renormalised", "numbers_over",
]

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


class MatrixJoin(NamedTuple):
    """The matrix leaves of one gradient dtype and device end to end, and their stacks.

    ``leaves``: their indices among the groups, in the order of their stacks (so that a stack's
    part of every joined array is one slice); ``g``: their gradients, each flattened, joined
    (``concat``) and cast to the compute dtype; ``state``: the entries joined likewise (a view of
    last step's new entry where the leaves hold its consecutive pieces, :func:`~precond_ref._backend.joined`);
    ``param``: the parameters joined, or ``None`` when the step does not read them; ``stacks``: the
    :class:`MatrixStack` of each matrix shape, whose gradients, parameters and joined entries are
    views of these arrays.
    """

    leaves: tuple[int, ...]
    g: Array
    state: dict[str, Array]
    param: Optional[Array]
    stacks: list[MatrixStack]


#: entries: the most matrix leaves joined end to end across their shapes (:func:`matrix_joins`). A
#: model of up to 4M parameters, whose step is bound by its operations rather than its arithmetic,
#: steps each element-wise line once for all its matrices; a larger one stack by stack, so that
#: its step holds one stack's copies at a time, not every leaf's.
JOIN_MAX_ELEMENTS = 2**22


def matrix_joins(
    xp: Any, grads: list, states: list, params: Any, leaves: list[int], stacked: Sequence[str], joined: Sequence[str],
    left: Callable[[int], bool], with_param: bool, passes: bool = False,
) -> list[MatrixJoin]:
    """The matrix leaves ``leaves`` (each group one leaf whose state's ``momentum`` is its m×n
    matrix view), joined end to end by gradient dtype, device and the dtypes of their ``joined``
    entries and parameter (:class:`MatrixJoin`), and within a join grouped into stacks of equal
    matrix shape (a leading axis, the DASH layout): per leaf its gradient as an m×n matrix in the
    compute dtype, its state entries ``stacked`` (those it has) stacked along a new leading axis
    (:func:`~precond_ref._backend.joined`), its ``joined`` entries and, with ``with_param``, its
    parameter as an m×n matrix, the last three views of the join's arrays. ``left(i)``: whether
    the method preconditions the left side of leaf ``i``'s matrix; leaves of one matrix shape whose
    sides differ (an out-first weight and a Flax ``kernel`` of the same view) are two stacks.

    An element-wise line of a method's step then runs once per join, not once per stack or leaf;
    a matrix product or a reduction within each matrix once per stack. The gradients and
    parameters are joined once (one copy each, which the stacks would otherwise make stack by
    stack) and the state's entries are the pieces of last step's join or stack (a view, no copy,
    after the first step), so every equal shape stacks on every device.

    Where a join is a copy of every entry on every step (under ``torch.compile``, on JAX: no
    views), and a compiler fuses a stack's element-wise lines anyway, each stack is a join of its
    own, and on a CPU a large matrix a stack of its own (its copies would cost more than the calls
    they save): of :data:`~precond_ref.blocking.CPU_BATCHED_ENOUGH` entries or more, or of an
    eighth of that for a rule whose stacked work is ``passes`` (element-wise passes and reductions,
    no batched product or decomposition). So also for matrix leaves of more than
    :data:`JOIN_MAX_ELEMENTS` entries in all, where a join's copies (the gradients, the parameters
    and the float64 directions of every leaf at once) would raise the step's peak memory, and
    within :func:`~precond_ref._backend.plain_forms`."""
    persist = not (torch_compiling() or is_jax_namespace(xp) or plain()) and (
        sum(math.prod(tuple(grads[i][0].shape)) for i in leaves) <= JOIN_MAX_ELEMENTS)
    bound = blocking.CPU_BATCHED_ENOUGH // 8 if passes else blocking.CPU_BATCHED_ENOUGH
    joins: dict[Any, dict[Any, list[int]]] = {}
    # One leaf is its own join and stack: no key read (its shape in a key would make a compiler
    # specialise a graph of every size to that shape).
    for i in leaves if len(leaves) > 1 else ():
        (g,), state = grads[i], states[i]
        join_key = (g.dtype, device_key(g), tuple(state[n].dtype for n in joined), with_param and params[i][0].dtype)
        alone = not persist and blocking.large_on_cpu((g,), bound)  # the entries of its matrix view
        stack_key = (i,) if alone else (join_key, left(i), *((n, tuple(state[n].shape)) for n in ("momentum", *stacked) if n in state))
        joins.setdefault(join_key if persist else stack_key, {}).setdefault(stack_key, []).append(i)
    if len(leaves) == 1:
        joins[None] = {None: list(leaves)}
    out = []
    for groups in joins.values():
        order = [i for members in groups.values() for i in members]
        g = cast(xp, end_to_end(xp, [grads[i][0] for i in order]), compute_dtype(xp, grads[order[0]][0].dtype))
        param = end_to_end(xp, [params[i][0] for i in order]) if with_param else None
        if len(groups) == 1:  # one stack: the join is the stack, in its own shapes
            shape = _stack_shape(len(order), tuple(states[order[0]]["momentum"].shape))
            g, param = xp.reshape(g, shape), None if param is None else xp.reshape(param, shape)
            state = {n: _stacked_entry(xp, [states[i][n] for i in order]) for n in joined}
        else:
            state = {n: end_to_end(xp, [states[i][n] for i in order]) for n in joined}
        members_of = list(groups.values())
        views = {n: stack_views(xp, state[n], states, members_of, n) for n in joined}
        gs = stack_views(xp, g, states, members_of, "momentum")
        ps = stack_views(xp, param, states, members_of, "momentum") if with_param else [None] * len(members_of)
        stacks = []
        for k, members in enumerate(members_of):
            first = states[members[0]]
            entries = {n: _stacked_entry(xp, [states[i][n] for i in members]) for n in stacked if n in first}
            stacks.append(MatrixStack(tuple(members), tuple(tuple(grads[i][0].shape) for i in members), left(members[0]),
                                      gs[k] if len(groups) == 1 else _own_copy(xp, gs[k]), {**entries, **{n: views[n][k] for n in joined}},
                                      ps[k]))
        out.append(MatrixJoin(tuple(order), g, state, param, stacks))
    return out


def _own_copy(xp: Any, view: Array) -> Array:
    """A stack's gradients as an array of their own where its piece of the join is not aligned
    as one (:func:`_aligned`), which the stack's products read: a BLAS may round a product of a
    piece that starts inside an allocation otherwise than the same product of an array of its own
    (the CPU BLAS's ``X Xᵀ`` of a float32 piece at an offset that is not a multiple of 16 entries),
    and a stack's numbers must not depend on which leaves share its join (a rank that owns a subset
    of the leaves steps them as one process does). An aligned piece is read as it is (no copy)."""
    return view if _aligned(xp, view) else xp.asarray(view, copy=True)


#: bytes: the alignment of a new array's memory, as a BLAS sees it: the CPU's (torch's CPU
#: allocator's, the widest vector registers') and a GPU's (CUDA's caching allocator's blocks)
_ALIGNMENT = {"cpu": 64, "device": 512}


def _aligned(xp: Any, x: Array) -> bool:
    """Whether ``x`` (a C-contiguous piece of an eager torch, NumPy or CuPy array) starts at an
    address a new array of its own could have (a multiple of :data:`_ALIGNMENT`): then a product
    cannot tell it from one. ``False`` where the address is not known."""
    torch, cp = sys.modules.get("torch"), sys.modules.get("cupy")
    if torch is not None and type(x) is torch.Tensor and not torch_compiling():
        address = x.data_ptr()
    elif cp is not None and type(x) is cp.ndarray:
        address = x.data.ptr
    elif hasattr(x, "__array_interface__") and not is_jax_namespace(xp):
        address = x.__array_interface__["data"][0]
    else:
        return False
    return address % _ALIGNMENT["cpu" if on_cpu(xp, x) else "device"] == 0


def end_to_end(xp: Any, arrays: Sequence[Array]) -> Array:
    """The arrays flattened and joined end to end (:func:`~precond_ref._backend.joined`: a view
    where they are consecutive pieces of one allocation); one array itself (a join of one stack
    holds its arrays in their own shapes)."""
    return arrays[0] if len(arrays) == 1 else joined(xp, [xp.reshape(a, (-1,)) for a in arrays])


def _stacked_entry(xp: Any, arrays: list) -> Array:
    """The entries of a stack's leaves along a leading axis: a 3-D entry (a blocked side's chunks)
    joined along its block axis, any other stacked along a new one; one leaf's entry itself."""
    if len(arrays) == 1:
        return arrays[0]
    if arrays[0].ndim == 3:
        return joined(xp, arrays)
    return stacked_view(xp, arrays)


def symmetrized_pieces(xp: Any, flat: Array, pieces: Sequence[Array]) -> Array:
    """``(A + Aᵀ)/2`` (:func:`~precond_ref.linalg.symmetrize`) of every square matrix of ``pieces``
    (the consecutive views of the joined array ``flat``, each a matrix or a stack of them), joined
    end to end as ``flat``: ``(flat + T)/2`` with ``T`` the pieces' transposes joined, the same
    numbers in a few operations for all the pieces (a join of the transposes per matrix shape, one
    of those joins' slices in order, the sum and the halving) instead of two per piece."""
    if len(pieces) == 1:
        return xp.reshape(symmetrize(pieces[0]), tuple(flat.shape))
    transposes = [((a if a.ndim == 3 else xp.expand_dims(a, axis=0)).mT,) for a in pieces]
    by_shape = blocking.stack(xp, transposes, key=lambda t: tuple(t[0].shape[1:]))  # one copy for the pieces of one shape
    transposed = blocking.unstack(by_shape, [s.operands for s in by_shape], len(pieces))
    return (flat + joined(xp, [xp.reshape(t, (-1,)) for (t,) in transposed])) / 2.0


def _stack_shape(count: int, shape: tuple) -> tuple:
    """The shape of the stack of ``count`` leaves whose entry has ``shape``: ``(count, *shape)``, or
    ``shape`` for one leaf; for a 3-D entry (a blocked side's chunks) the chunks of all its leaves,
    ``(count·c, b, b)`` (:func:`_stacked_entry`)."""
    return shape if count == 1 else (count * shape[0], *shape[1:]) if len(shape) == 3 else (count, *shape)


def stack_views(xp: Any, flat: Array, states: list, stacks: Sequence[Sequence[int]], name: str) -> list:
    """The parts of a joined array ``flat`` (the leaves of ``stacks`` end to end, each in the shape
    of its entry ``name``) that belong to each stack, in the stack's shape (:func:`_stack_shape`).
    A join of one stack holds its arrays in the stack's shapes: ``flat`` itself."""
    if len(stacks) == 1:
        return [flat]
    return pieces(xp, flat, [_stack_shape(len(members), tuple(states[members[0]][name].shape)) for members in stacks])


def matrix_shape(shape: tuple[int, ...], path: Any) -> tuple[int, int]:
    """(m, n) of a leaf's matrix view: a 0-D leaf is 1×1, a 1-D leaf a 1×n row; a ≥3-D leaf is
    (first axis, rest) in the out-first layout, or (all but the last axis, last axis) for an
    out-last Flax ``kernel`` (the last entry of its ``path``; :func:`transposed_view`)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if transposed_view(shape, path):
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def transposed_view(shape: tuple[int, ...], path: Any) -> bool:
    """Whether the matrix view of a leaf (:func:`matrix_shape`) is the transpose of the out-first
    view of the same layer: an out-last Flax ``kernel`` (the last entry of its ``path``) of 2
    dimensions or more, (in, out) or (kh, kw, in, out), viewed as (in·..., out) where the out-first
    weight is viewed as (out, in·...). A method that names a side of the out-first view takes the
    other side of this one (:func:`~precond_ref.engine.blockdiag.matrix_side`)."""
    return len(shape) >= 2 and bool(path) and path[-1] == "kernel"


def as_matrix(xp: Any, x: Array, shape: tuple[int, ...]) -> Array:
    """``x`` reshaped to ``shape`` (its matrix view), ``x`` itself when it has that shape."""
    return x if tuple(x.shape) == shape else xp.reshape(x, shape)


def hand_back(xp: Any, s: MatrixStack, states: list, step: Array, entries: dict[str, Array], ctx: StepContext) -> list[tuple[int, tuple]]:
    """``(leaf, ((step,), new state))`` for each leaf of a stack: its slice of the stacked ``step``
    in its own shape; its slices of the stacked ``entries``, in the shapes of its stored entries
    (an entry not given: the stored array itself). The non-finite rule's selection of the new
    entries (:meth:`StepContext.unless_skipped`) is made here, once on each stacked entry rather
    than on each leaf's slice (:func:`~precond_ref.engine.settle_pieces`), unless the method made it
    already."""
    steps, handed = leaves_of(xp, step, len(s.leaves), tuple(step.shape[-2:])), {}
    for name, a in entries.items():
        if name in s.state and s.state[name] is not a and not (ctx.settled is not None and a in ctx.settled):
            a = ctx.unless_skipped(a, s.state[name])
        handed[name] = settle_pieces(ctx, a, leaves_of(xp, a, len(s.leaves), tuple(states[s.leaves[0]][name].shape)))
    return [(i, ((as_matrix(xp, steps[l], s.shapes[l]),), {**states[i], **{name: p[l] for name, p in handed.items()}}))
            for l, i in enumerate(s.leaves)]


def leaves_of(xp: Any, x: Array, count: int, shape: tuple[int, ...]) -> Sequence[Array]:
    """``x[l]`` for ``l < count`` of a stack ``x`` of ``count`` leaves, in ``shape`` (a blocked
    entry's ``count·c`` blocks, ``c`` per leaf, regrouped)."""
    return (as_matrix(xp, x, shape),) if count == 1 else xp.unstack(as_matrix(xp, x, (count, *shape)), axis=0)


# The joined forms of the RMS renormalisations, each beside its plain form (the module's docstring).


def joined_rms_renormalised(xp: Any, us: list, rms_target: Optional[float], exact_dtype: bool) -> Array:
    """``[rms_renormalised(xp, u, rms_target, exact_dtype) for u in us]`` (each ``u`` a matrix or a
    stack of them, all of one dtype), flattened and joined end to end: the same numbers, with the
    element-wise work done once over all of them where it is the float64 form (one cast to float64
    and one back, one selection of the norms), not once per array. The norms and the scaling stay
    per array (each matrix by its own norm and target)."""
    wide = None if exact_dtype or rms_target is None else wide_dtype(xp, us[0])
    # the pieces are scaled in place: where a slice is not a view that writes through to the
    # joined array (JAX, array_api_strict), the plain form
    in_place = not (is_jax_namespace(xp) or is_array_api_strict_namespace(xp))
    if plain() or len(us) == 1 or wide is None or not in_place or any(math.prod(u.shape[-2:]) == 0 for u in us):
        return end_to_end(xp, [rms_renormalised(xp, u, rms_target, exact_dtype) for u in us])
    w = xp.astype(end_to_end(xp, us), wide)  # a new array: its pieces scaled in place below
    views = pieces(xp, w, [a.shape for a in us])
    norms = [xp.linalg.matrix_norm(v, ord="fro", keepdims=True) for v in views]
    norm_shapes = [a.shape for a in norms]
    safe = nonzero_divisor(xp, end_to_end(xp, norms))
    targets = _targets(xp, rms_target, [(v.shape[-2:], s) for v, s in zip(views, norm_shapes)], safe)
    for v, factor in zip(views, pieces(xp, numbers_over(xp, targets, safe), norm_shapes)):
        v *= factor  # r·sqrt(mn)/‖U‖_F of each matrix
    return xp.astype(w, us[0].dtype)


def joined_scaled_rms_renormalised(
    xp: Any, m: Array, scale: Array, ms: list, scales: list, axes: list, rms_target: Optional[float], exact_dtype: bool
) -> Array:
    """``[scaled_rms_renormalised(xp, ms[j], scales[j], axes[j], rms_target, exact_dtype) for j]``,
    flattened and joined end to end, where ``ms`` and ``scales`` are the consecutive pieces of the
    joined ``m`` and ``scale`` (a method's stacks of matrices and their scales): the same numbers,
    with the element-wise work done once over the joined arrays where it is the float64 form (the
    casts, the scales' squares, the factors' selection), the column sums and the scaling per piece."""
    wide = None if exact_dtype or rms_target is None else wide_dtype(xp, m)
    if plain() or len(ms) == 1 or wide is None or any(math.prod(a.shape[-2:]) == 0 for a in ms):
        return end_to_end(xp, [scaled_rms_renormalised(xp, *args, rms_target, exact_dtype) for args in zip(ms, scales, axes)])
    scale_w = xp.astype(scale, wide)
    scale_shapes = [a.shape for a in scales]
    m_ws, scale_ws = pieces(xp, xp.astype(m, wide), [a.shape for a in ms]), pieces(xp, scale_w, scale_shapes)
    squares = pieces(xp, scale_w * scale_w, scale_shapes)
    # scaled_squared_norm, whose scale * scale is the joined square's piece
    totals = [xp.sum(q * sum_across(xp, a * a, axis), axis=-1) for q, a, axis in zip(squares, m_ws, axes)]
    safe = pieces(xp, nonzero_divisor(xp, xp.sqrt(end_to_end(xp, totals))), [a.shape for a in totals])
    targets = [wide_target(xp, rms_target, math.prod(a.shape[-2:]), wide) for a in m_ws]  # r·sqrt(mn) of each piece's matrices
    out = [a * xp.expand_dims(s * per_matrix_column(xp, t / n), axis=axis)
           for a, s, t, n, axis in zip(m_ws, scale_ws, targets, safe, axes)]
    return xp.astype(end_to_end(xp, out), m.dtype)


def _targets(xp: Any, rms_target: float, shapes: list, like: Array) -> Array:
    """The targets ``r·sqrt(mn)`` of pieces given as ``(matrix shape (m, n), shape
    of their norms)``, each repeated for its norms, joined end to end: an array of ``like``'s dtype
    and device, made once (:func:`~precond_ref.engine.factors.constant`). An array ``r``
    (``optax.inject_hyperparams``) keys no kept constant: the kept ``sqrt(mn)`` times it."""
    def make(r: float) -> Array:  # filled on the device: no host data copied
        device = placement(xp, like)
        return xp.concat([xp.full((math.prod(norms),), r * math.sqrt(math.prod(matrix)), dtype=like.dtype,
                                  device=device) for matrix, norms in shapes])

    sizes = tuple((tuple(m), tuple(n)) for m, n in shapes)
    if not is_number(rms_target):
        return constant(xp, ("rms target sizes", sizes, like.dtype), lambda: make(1.0), like) * as_operand(xp, rms_target, like.dtype)
    return constant(xp, ("rms targets", rms_target, sizes, like.dtype), lambda: make(rms_target), like)


def numbers_over(xp: Any, numbers: Array, denominator: Array) -> Array:
    """``number / denominator`` element by element, rounded as each Python number over the array
    would be: torch divides a number by a tensor as the tensor's reciprocal times the number (two
    roundings, ``Tensor.__rtruediv__``), the other backends divide (one rounding). One operation
    or two for all the numbers, where a number at a time is two per number."""
    if is_torch_namespace(xp):
        return xp.reciprocal(denominator) * numbers
    return numbers / denominator


def joined_form(renormalise: Any) -> Any:
    """The joined form of a renormalisation of :mod:`precond_ref.linalg` (the function above that
    gives its numbers for a method's stacks joined end to end)."""
    return {rms_renormalised: joined_rms_renormalised, scaled_rms_renormalised: joined_scaled_rms_renormalised}[renormalise]
