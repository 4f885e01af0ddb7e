r"""The joined forms of the RMS renormalisations of :mod:`precond_ref.linalg` (ASGO and DASGO): a
method's stacks of directions renormalised each as alone (``linalg.rms_renormalised``,
``linalg.scaled_rms_renormalised``), flattened and joined end to end, with the element-wise work of
the float64 form (the casts, the selections of the norms) done once over the join instead of once
per stack. The same numbers as the plain form beside each, which runs where the fast form does not
apply (one stack, a form other than float64, a backend without writable views) and within
:func:`~precond_ref._backend.plain_forms`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from array_api_compat import is_array_api_strict_namespace, is_jax_namespace

from .._backend import is_torch_namespace, pieces, placement, plain, sum_across
from ..linalg import nonzero_divisor, per_matrix_column, rms_renormalised, scaled_rms_renormalised, wide_dtype
from .factors import constant
from .matrices import end_to_end

__all__ = ["joined_form", "joined_rms_renormalised", "joined_scaled_rms_renormalised", "numbers_over"]

Array = Any


def joined_rms_renormalised(xp: Any, us: list, rms_target: Optional[float], exact_dtype: bool) -> Array:
    """``[rms_renormalised(xp, u, rms_target, exact_dtype) for u in us]`` (each ``u`` a matrix or a
    stack of them, all of one dtype), flattened and joined end to end: the same numbers, with the
    element-wise work done once over all of them where it is the float64 form (one cast to float64
    and one back, one selection of the norms), not once per array. The norms and the scaling stay
    per array (each matrix by its own norm and target)."""
    wide = None if exact_dtype or rms_target is None else wide_dtype(xp, us[0])
    if plain() or len(us) == 1 or wide is None or not _writable_views(xp) or any(math.prod(u.shape[-2:]) == 0 for u in us):
        return end_to_end(xp, [rms_renormalised(xp, u, rms_target, exact_dtype) for u in us])
    w = xp.astype(end_to_end(xp, us), wide)  # a new array: its pieces scaled in place below
    views = pieces(xp, w, [a.shape for a in us])
    norms = [xp.linalg.matrix_norm(v, ord="fro", keepdims=True) for v in views]
    norm_shapes = [a.shape for a in norms]
    safe = nonzero_divisor(xp, end_to_end(xp, norms))
    targets = _targets(xp, rms_target, [(v.shape[-2:], s) for v, s in zip(views, norm_shapes)], safe)
    for v, factor in zip(views, pieces(xp, numbers_over(xp, targets, safe), norm_shapes)):
        v *= factor  # r·sqrt(mn)/‖U‖_F of each matrix, as `_target(rms_target, v) / norm`
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
        alone = [scaled_rms_renormalised(xp, *args, rms_target, exact_dtype) for args in zip(ms, scales, axes)]
        return end_to_end(xp, alone)
    scale_w = xp.astype(scale, wide)
    scale_shapes = [a.shape for a in scales]
    m_ws, scale_ws = pieces(xp, xp.astype(m, wide), [a.shape for a in ms]), pieces(xp, scale_w, scale_shapes)
    squares = pieces(xp, scale_w * scale_w, scale_shapes)
    # scaled_squared_norm, whose scale * scale is the joined square's piece
    totals = [xp.sum(q * sum_across(xp, a * a, axis), axis=-1) for q, a, axis in zip(squares, m_ws, axes)]
    safe = pieces(xp, nonzero_divisor(xp, xp.sqrt(end_to_end(xp, totals))), [a.shape for a in totals])
    out = [a * xp.expand_dims(s * per_matrix_column(xp, _target(rms_target, a) / n), axis=axis)
           for a, s, n, axis in zip(m_ws, scale_ws, safe, axes)]
    return xp.astype(end_to_end(xp, out), m.dtype)


def _writable_views(xp: Any) -> bool:
    """Whether a slice or reshape of an array is a view that writes through to it (torch, NumPy,
    CuPy), so that a piece scaled in place scales the joined array; not on JAX and array_api_strict."""
    return not (is_jax_namespace(xp) or is_array_api_strict_namespace(xp))


def _target(rms_target: float, u: Array) -> float:
    """``r·sqrt(mn)`` of the m×n matrices of ``u``."""
    rows, columns = u.shape[-2:]
    return rms_target * math.sqrt(rows * columns)


def _targets(xp: Any, rms_target: float, shapes: list, like: Array) -> Array:
    """The targets ``r·sqrt(mn)`` (:func:`_target`) of pieces given as ``(matrix shape (m, n), shape
    of their norms)``, each repeated for its norms, joined end to end: an array of ``like``'s dtype
    and device, made once (:func:`~precond_ref.engine.factors.constant`)."""
    def make() -> Array:  # filled on the device: no host data copied
        device = placement(xp, like)
        return xp.concat([xp.full((math.prod(norms),), rms_target * math.sqrt(math.prod(matrix)), dtype=like.dtype,
                                  device=device) for matrix, norms in shapes])

    key = ("rms targets", rms_target, tuple((tuple(m), tuple(n)) for m, n in shapes), like.dtype)
    return constant(xp, key, make, like)


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
