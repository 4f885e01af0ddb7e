r"""Renormalising a direction to a fixed RMS at any scale: ``r·sqrt(mn)·U/‖U‖_F`` of each m×n
matrix of a stack, a zero matrix staying zero (ASGO and DASGO, spec ``asgo.md`` D2, D12).

The plain formula under- or overflows for a direction of size 1e-30 or 1e30 (its squares leave
the range), and the products of a scaled direction ``M diag(s)`` may too. The forms here give the
formula's result to rounding at every scale: in float64 where the backend has it for a float32
direction (every float32 square is a normal float64 number), else scaled by the largest entry
first, or, for ``M diag(s)``, from per-column maxima chosen per step without a host read.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from array_api_compat import is_array_api_strict_namespace, is_jax_namespace

from .._backend import (
    computed_once, cond_under_cpu_jit, float64_where_available, is_torch_namespace, pieces, placement, select, sum_across,
)
from .factors import constant, number
from .matrices import end_to_end

__all__ = [
    "rms_renormalised", "scaled_rms_renormalised", "column_factored_renormalise", "scaled_squared_norm",
    "joined_rms_renormalised", "joined_scaled_rms_renormalised",
]

Array = Any


def _wide_dtype(xp: Any, x: Array) -> Any:
    """float64 for a float32 ``x`` where the backend has it (not JAX without x64, not torch MPS),
    else ``None``: every float32 number squares into the float64 range without underflow or
    overflow (2^-149 and 2^128 square to 2^-298 and 2^256), so a float64 sum of squares is the
    Frobenius norm of any float32 array in one pass, whatever its scale."""
    if x.dtype != xp.float32:
        return None
    return float64_where_available(xp, x)


def _renormalising_factor(xp: Any, sum_of_squares: Array, target: float) -> Array:
    """``target / sqrt(sum_of_squares)``, and ``target`` for a zero sum (a zero direction stays zero)."""
    return target / _nonzero(xp, xp.sqrt(sum_of_squares))


def rms_renormalised(xp: Any, u: Array, rms_target: Optional[float], exact_dtype: bool) -> Array:
    """``u · r·sqrt(mn)/‖u‖_F`` for each m×n matrix of ``u`` (a matrix or a stack ``(L, m, n)``,
    each by its own norm); ``u`` for ``rms_target=None``.

    A float32 ``u`` (unless ``exact_dtype``, which keeps every operation in u's dtype, as the
    authors' float32 arithmetic) is renormalised in float64 where the backend has it: one
    reduction over each matrix of one float64 copy of u, scaled in place and rounded once to u's
    dtype. Otherwise u is first divided by its largest magnitude, so that the norm is taken of
    entries in [-1, 1] with at least one of modulus 1 (>= 1 and <= sqrt(mn)): one more pass.
    """
    rows, columns = u.shape[-2:]
    if rms_target is None or rows * columns == 0:
        return u
    target = rms_target * math.sqrt(rows * columns)
    matrices = (-2, -1)
    wide = None if exact_dtype else _wide_dtype(xp, u)
    if wide is not None:
        w = xp.astype(u, wide)  # a new array: scaled in place below, no second float64 copy
        norm = xp.linalg.matrix_norm(w, ord="fro", keepdims=True)
        w *= target / _nonzero(xp, norm)
        return xp.astype(w, u.dtype)
    peak = xp.max(xp.abs(u), axis=matrices, keepdims=True)
    v = u / select(xp, peak > 0, peak, xp.ones_like(peak))
    norm = xp.linalg.matrix_norm(v, ord="fro", keepdims=True)
    # norm >= 1 unless u == 0, where v == 0 and any divisor >= 1 keeps the step exactly zero.
    return v * (target / xp.maximum(norm, xp.ones_like(norm)))


def scaled_rms_renormalised(
    xp: Any, m: Array, scale: Array, axis: int, rms_target: Optional[float], exact_dtype: bool
) -> Array:
    """``r√(mn) U/‖U‖_F`` for ``U = M diag(s)`` (``axis=-2``; ``diag(s) M`` for ``axis=-1``) of a
    matrix ``M``, or of each matrix of a stack ``(L, m, n)`` with its scale ``s`` (``(L, n)`` or
    ``(L, m)``), a zero ``U`` staying zero; ``U`` itself for ``rms_target=None``.

    With ``exact_dtype`` ``U`` is formed and renormalised by :func:`rms_renormalised`. Otherwise
    ``U`` is never formed before the pass that writes the result: ``‖U‖_F²`` comes from the column
    sums of ``M²`` (:func:`scaled_squared_norm`) and the factor joins the per-column scale, float32
    summed in float64 where the backend has it, else by :func:`column_factored_renormalise`.
    ``s`` is read by every entry of ``M``: a compiler is given it in the form it computes once per
    step (:func:`~precond_ref._backend.computed_once`), not inlined into each entry's loop.
    """
    scale = computed_once(xp, scale)
    rows, columns = m.shape[-2:]
    if exact_dtype or rms_target is None or rows * columns == 0:
        return rms_renormalised(xp, m * xp.expand_dims(scale, axis=axis), rms_target, exact_dtype)
    target = rms_target * math.sqrt(rows * columns)
    wide = _wide_dtype(xp, m)
    if wide is None:
        return column_factored_renormalise(xp, m, scale, axis, target)
    m_w, scale_w = xp.astype(m, wide), xp.astype(scale, wide)
    factor = _renormalising_factor(xp, scaled_squared_norm(xp, m_w, scale_w, axis), target)
    return xp.astype(m_w * xp.expand_dims(computed_once(xp, scale_w * _per_matrix(xp, factor)), axis=axis), m.dtype)


def joined_rms_renormalised(xp: Any, us: list, rms_target: Optional[float], exact_dtype: bool) -> Array:
    """``[rms_renormalised(xp, u, rms_target, exact_dtype) for u in us]`` (each ``u`` a matrix or a
    stack of them, all of one dtype), flattened and joined end to end: the same numbers, with the
    element-wise work done once over all of them where it is the float64 form (one cast to float64
    and one back, one selection of the norms), not once per array. The norms and the scaling stay
    per array (each matrix by its own norm and target)."""
    wide = None if exact_dtype or rms_target is None else _wide_dtype(xp, us[0])
    if len(us) == 1 or wide is None or not _writable_views(xp) or any(math.prod(u.shape[-2:]) == 0 for u in us):
        return end_to_end(xp, [rms_renormalised(xp, u, rms_target, exact_dtype) for u in us])
    w = xp.astype(end_to_end(xp, us), wide)  # a new array: its pieces scaled in place below
    views = pieces(xp, w, [a.shape for a in us])
    norms = [xp.linalg.matrix_norm(v, ord="fro", keepdims=True) for v in views]
    norm_shapes = [a.shape for a in norms]
    safe = _nonzero(xp, end_to_end(xp, norms))
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
    wide = None if exact_dtype or rms_target is None else _wide_dtype(xp, m)
    if len(ms) == 1 or wide is None or any(math.prod(a.shape[-2:]) == 0 for a in ms):
        alone = [scaled_rms_renormalised(xp, *args, rms_target, exact_dtype) for args in zip(ms, scales, axes)]
        return end_to_end(xp, alone)
    scale_w = xp.astype(scale, wide)
    scale_shapes = [a.shape for a in scales]
    m_ws, scale_ws = pieces(xp, xp.astype(m, wide), [a.shape for a in ms]), pieces(xp, scale_w, scale_shapes)
    squares = pieces(xp, scale_w * scale_w, scale_shapes)
    # scaled_squared_norm, whose scale * scale is the joined square's piece
    totals = [xp.sum(q * sum_across(xp, a * a, axis), axis=-1) for q, a, axis in zip(squares, m_ws, axes)]
    safe = pieces(xp, _nonzero(xp, xp.sqrt(end_to_end(xp, totals))), [a.shape for a in totals])
    out = [a * xp.expand_dims(s * _per_matrix(xp, _target(rms_target, a) / n), axis=axis)
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


def _nonzero(xp: Any, norm: Array) -> Array:
    """``norm``, with 1 where it is zero (the divisor that keeps a zero direction zero)."""
    return select(xp, norm > 0, norm, number(xp, 1.0, norm))


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


def _per_matrix(xp: Any, x: Array) -> Array:
    """Per-matrix values of a stack ``(L,)`` shaped ``(L, 1)`` to scale its vectors ``(L, k)``; a
    0-D value (one matrix) as it is."""
    return x if x.ndim == 0 else xp.expand_dims(x, axis=-1)


def column_factored_renormalise(xp: Any, m: Array, scale: Array, axis: int, target: float) -> Array:
    r"""``U · target/‖U‖_F`` for ``U = M diag(s)`` (``axis=-2``; ``diag(s) M`` for ``axis=-1``) of a
    matrix, or of each matrix of a stack, without float64 and without forming ``U`` first: D12 in
    the compute dtype.

    Two ways to the same result (to rounding), chosen per step without a host read
    (:func:`~precond_ref.transform.cond_under_cpu_jit`):

    * the column sums :math:`\sigma_j = \sum_i M_{ij}^2` and :math:`T = \sum_j s_j^2 \sigma_j`,
      formed as they stand, and :math:`M_{ij}\,s_j\,\mathrm{target}/\sqrt{T}`: one reduction of
      the stored momentum. Valid where :math:`T` is finite and
      :math:`T \ge 2^{10}\,(\mathrm{tiny}/\epsilon)\,(mn \max_j s_j^2 + n)`: a square or a product
      :math:`s_j^2\sigma_j` that underflows (flush-to-zero included) is off by less than the
      smallest normal number tiny, so that all of them together change :math:`T` by less than
      :math:`2^{-10}` of its rounding unit :math:`\epsilon`. Training scales pass: in float32,
      on a 4096x1024 matrix with :math:`s` up to 1e4 (:math:`\epsilon` = 1e-8 inside the root) the
      bound is 4e-14, met by momenta from about 1e-14 on;
    * otherwise, with column maxima :math:`c_j = \max_i |M_{ij}|`,
      :math:`\rho_j = c_j s_j / \max_k c_k s_k` (formed from :math:`c_j` and :math:`s_j/\max s`) and
      :math:`q_j = \sum_i (M_{ij}/c_j)^2`, :math:`‖U‖_F = \max_k c_k s_k \sqrt{\sum_j \rho_j^2 q_j}`
      and the result is :math:`(M_{ij}/c_j)\,\rho_j\,\mathrm{target}/\sqrt{\sum_j \rho_j^2 q_j}`.
      Every factor is at most 1 in modulus and the root at least 1 (the largest entry's column),
      so nothing over- or underflows that could change the result in its leading digits, at any
      scale of M or s, unless :math:`c_j s_j/\max s` leaves the normal range (a momentum near
      1e-38 with column scales 1e-3 apart; forming U in float32 fails wherever :math:`c_j s_j`
      does). Two more column reductions of the momentum, one of them of a scaled copy.

    Both give the result as :math:`M_{ij} a_j b_j` with two per-column factors (:math:`a_j` alone
    may overflow where :math:`a_j b_j` does not), formed in the pass that writes the step. A zero
    column or a zero U stays zero.
    """
    def expand(x: Array) -> Array:
        return xp.expand_dims(x, axis=axis)

    def over_max(x: Array) -> Array:  # x / max(x) per vector, or x if that is zero (x >= 0)
        top = _per_matrix(xp, xp.max(x, axis=-1))
        return x / xp.where(top > 0, top, xp.ones_like(top))

    total = scaled_squared_norm(xp, m, scale, axis)
    rows, columns = m.shape[-2:]
    info = xp.finfo(m.dtype)
    # Each underflowing square or product is off by less than smallest_normal: together at most
    # 2^-10 of the dtype's rounding unit of T.
    top = xp.max(scale, axis=-1)
    lost = (rows * columns * (top * top) + scale.shape[-1]) * (info.smallest_normal * 2.0**10 / info.eps)
    plain = (total >= lost) & (total < float("inf"))

    def fast(m: Array, scale: Array, total: Array) -> tuple[Array, Array]:
        # T replaced where this branch is not taken: evaluated anyway, it must not overflow (warnings).
        factor = _renormalising_factor(xp, xp.where(plain, total, xp.ones_like(total)), target)
        return scale * _per_matrix(xp, factor), xp.ones_like(scale)

    def safe(m: Array, scale: Array, total: Array) -> tuple[Array, Array]:
        peaks = xp.max(xp.abs(m), axis=axis)
        inverse = 1.0 / xp.where(peaks > 0, peaks, xp.ones_like(peaks))
        ratios = m * expand(inverse)
        column_sums = sum_across(xp, ratios * ratios, axis)
        # s_j alone may span the float32 range (s/max s cannot overflow). No max of the column
        # maxima themselves: XLA merges it with their reduction into one over the whole matrix,
        # and then writes |M| out for the two reductions to share.
        relative = over_max(peaks * over_max(scale))
        norm = xp.sqrt(xp.sum(relative * relative * column_sums, axis=-1))
        return inverse, relative * _per_matrix(xp, target / xp.maximum(norm, xp.ones_like(norm)))

    a, b = cond_under_cpu_jit(xp, _per_matrix(xp, plain), fast, safe, m, scale, total)
    return (m * expand(a)) * expand(b)


def scaled_squared_norm(xp: Any, m: Array, scale: Array, axis: int) -> Array:
    r""":math:`‖M \operatorname{diag}(s)‖_F^2 = \sum_j s_j^2 \sum_i M_{ij}^2` (``axis=-2``;
    :math:`‖\operatorname{diag}(s) M‖_F^2` for ``axis=-1``) from the column sums of :math:`M^2`,
    without forming the product: a compiler fuses the sums with the pass that reads M. Of a
    stack ``(L, m, n)``: one value per matrix ``(L,)``."""
    return xp.sum(scale * scale * sum_across(xp, m * m, axis), axis=-1)


