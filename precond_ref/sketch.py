r"""Frequent Directions (FD): a rank-k sketch of a discounted covariance, in O(dk) memory.

The sketch tracks :math:`G_t = \sum_{s \le t} \beta^{t-s} X_s X_s^\top` (:math:`X_s \in
\mathbb{R}^{d \times m}`) by

.. math::

    \bar G_t = U \operatorname{diag}(\sigma^2) U^\top, \qquad \rho_t \ \text{(escaped mass)},

with :math:`U \in \mathbb{R}^{d\times k}` (orthonormal or zero columns) and :math:`\sigma \in
\mathbb{R}^k`. One update (Feinberg et al. 2023, Alg. 1 / Ghashami et al. 2016): take the thin SVD
:math:`P \operatorname{diag}(s) Q^\top` of :math:`Z = [\sqrt\beta\, U\operatorname{diag}(\sigma),\ X]`
(so :math:`s^2, P` are the eigenpairs of :math:`\beta\bar G + XX^\top`), shrink by the
:math:`(k+1)`-th value :math:`c = s_{k}` (0-based; 0 if it does not exist):

.. math::

    \sigma'_i = \sqrt{s_i^2 - c^2}, \qquad U' = P_{:, :k}, \qquad \rho' = \gamma\rho + c^2,

where :math:`\gamma` is the tail decay (:math:`\beta`, or :math:`\sqrt\beta` as in the authors'
tearfree code). Then :math:`\bar G' \preceq \beta \bar G + XX^\top \preceq \bar G' + c^2 I`
(FD's sandwich), hence :math:`\bar G_t \preceq G_t \preceq \bar G_t + \rho_t I` for
:math:`\gamma = \beta`.

The operator :math:`(\bar G + \rho I + \epsilon I)^a` is stored as weights on the retained
directions and on their complement, and applied in :math:`O(k \cdot \text{numel})` without any
:math:`d \times d` matrix (:func:`fd_apply`):

.. math::

    y = U \operatorname{diag}(w)\, U^\top x + w_\perp (x - U U^\top x), \quad
    w_i = (\sigma_i'^2 + \rho' + \epsilon)^a, \quad w_\perp = (\rho' + \epsilon)^a,

with :math:`w_i = 0` for directions whose :math:`\sigma'_i = 0` (they belong to the complement)
and :math:`w_\perp = 0` while :math:`\rho' = 0` (no mass has escaped: the complement is the null
space of the statistic, where the pseudo-inverse is 0). A gradient the sketch has not seen (S-AdaGrad
between refreshes) is applied with its own mass added on the sketch's frame
(:func:`fd_apply_with_own_mass`), which bounds the step as an FD update would.

A sketch is a dict of arrays (so it lives inside optimizer state):

============================ ======== =============================================================
key                          shape    meaning
============================ ======== =============================================================
``basis``                    (d, k)   :math:`U`
``singular_values``          (k,)     :math:`\sigma` (the sketch factor is :math:`U \operatorname{diag}(\sigma)`)
``escaped_root``             ()       :math:`\sqrt\rho` (a root, as :math:`\sigma`: float32 keeps the
                                      escaped mass of gradients down to ~1e-38, not only ~1e-19)
``basis_weights``            (k,)     :math:`w`
``complement_weight``        ()       :math:`w_\perp`
============================ ======== =============================================================

References
----------
Feinberg, Chen, Sun, Anil, Hazan. "Sketchy: Memory-efficient Adaptive Regularization with Frequent
Directions". NeurIPS 2023, arXiv:2302.03764. Liberty, "Simple and deterministic matrix sketching",
KDD 2013. Ghashami, Liberty, Phillips, Woodruff, "Frequent Directions: simple and deterministic
matrix sketching", SIAM J. Comput. 2016.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

from array_api_compat import is_array_api_strict_namespace, is_cupy_array

from ._backend import (
    clip, float64_where_available, host_bool, is_numpy_namespace, is_torch_namespace, is_tracer, is_zero, matmul,
    matmul_into, on_cpu, placement, select, state_owned, torch_compiling, widened_dtype,
)
from .engine.factors import constant, number
from .linalg import (
    _reduced_svd, all_finite, descending_singular, eigh_widened, left_singular, per_matrix, rank_one_update_eigh,
    symmetric_eigh, symmetrize,
)

Array = Any


SKETCH_KEYS = ("basis", "singular_values", "escaped_root", "basis_weights", "complement_weight")
_DECOMPOSITIONS = ("svd", "gram", "qr_svd", "incremental", "incremental_gram", "incremental_secular", "subspace", "auto")
# "auto" uses the (approximate) subspace iteration only for axes at least this long, where an
# exact d x d eigendecomposition per step is the cost that matters; shorter axes stay exact.
SUBSPACE_MIN_DIM = 256
#: A sketch whose basis (d, k) holds more than this many bytes takes the incremental path's
#: products with its frame [U, fresh] by blocks of rows, each block of the frame at most this many
#: bytes (:func:`frame_products_in_rows`), the new basis written over the old one where the array
#: can be written: its step then needs two such blocks and a few d-vectors beside its state, not
#: copies of its basis. A smaller sketch takes each product whole, in one call.
FD_ROWS_BYTES = 2**28


def fd_init(xp: Any, d: int, k: int, *, dtype: Any, device: Any, batch: tuple[int, ...] = ()) -> dict[str, Array]:
    """An empty sketch of an axis of length ``d`` keeping ``k <= d`` directions (all zeros).

    ``batch`` prepends stack dimensions (equal-shape blocks updated by one batched call).
    """
    if not 1 <= k <= d:
        raise ValueError(f"sketch rank k must be in [1, d] = [1, {d}], got {k}")
    shapes = ((d, k), (k,), (), (k,), ())  # of SKETCH_KEYS, in order
    return {key: xp.zeros(batch + shape, dtype=dtype, device=device) for key, shape in zip(SKETCH_KEYS, shapes)}


def shrink_cutoff_tolerance(xp: Any, dtype: Any, decomposition: str = "svd", widened: bool = False) -> float:
    """Relative level below which a singular value of the FD step is rounding noise (K3).

    For the SVD (and the ``"incremental"`` projection, whose residual carries an absolute error of
    a few unit roundoffs of the inputs), singular values carry an absolute error of a few unit
    roundoffs times the largest one, so :math:`c \\le 10 u\\, s_0` is treated as 0. The Gram,
    incremental-Gram and subspace paths square the matrix: their eigenvalues carry :math:`u\\, s_0^2`, i.e. singular
    values :math:`\\sqrt{u}\\, s_0`, so the test is :math:`c^2 \\le 10 u\\, s_0^2`. The secular path squares it
    too, unless it is ``widened`` (float32 data solved in float64, as accurate as the float32 SVD).
    """
    unit_roundoff = float(xp.finfo(dtype).eps) / 2.0
    if decomposition in ("gram", "incremental_gram", "subspace") or (decomposition == "incremental_secular" and not widened):
        return math.sqrt(10.0 * unit_roundoff)
    return 10.0 * unit_roundoff


def subspace_width(d: int, k: int) -> int:
    """Columns of the subspace iteration: k plus an oversampling of max(4, k/8), at most d.

    The oversampling sets the accuracy of the approximation near the k-th direction (and of the
    shrink value): on the stream measured in docs/methods/sketchy.md, k/16 gave 3e-2 relative error
    of the preconditioned direction, k/8 about 2e-2, k/4 1e-2.
    """
    return min(d, k + max(4, -(-k // 8)))


def resolve_decomposition(decomposition: str, d: int, k: int, m: int, secular: bool = False) -> str:
    """The path ``"auto"`` takes for a sketch of an axis of length d, rank k and m new columns.

    ``"incremental_secular"`` (exact) for one new column where ``secular`` (:func:`secular_by_default`
    of the data); else ``"incremental"`` (exact) when k + m < d; ``"subspace"`` (approximate) when
    the axis is long (d >= :data:`SUBSPACE_MIN_DIM`) and the iteration is at most half of it; else
    ``"gram"`` (the exact eigendecomposition of the d x d statistic). Other names are returned
    unchanged.
    """
    if decomposition != "auto":
        return decomposition
    if secular and m == 1:
        return "incremental_secular"
    if k + m < d:
        return "incremental"
    if d >= SUBSPACE_MIN_DIM and 2 * subspace_width(d, k) <= d:
        return "subspace"
    return "gram"


def secular_by_default(xp: Any, basis: Array) -> bool:
    """Whether ``"auto"`` decomposes one new column's core by its secular equation for a sketch of
    ``basis``'s dtype and device: a float32 torch tensor off a CPU, solved in float64 (as accurate
    as the float32 SVD). The secular solve calls no LAPACK routine and reads nothing on the host, so
    torch's captured CUDA step can hold it (torch's CUDA ``eigh`` and ``svd`` read their status on
    the host), which is where it was measured faster (docs/methods/sketchy.md, "The secular core").
    Elsewhere the core's SVD: on a CPU LAPACK's is the faster; CuPy's step is not captured (its
    capture refuses cuBLAS) and the secular solve's launches there are not measured; float64 data
    (reference runs) and float32 without float64 would get the Gram's accuracy, below the SVD's."""
    return (is_torch_namespace(xp) and basis.dtype == xp.float32 and not on_cpu(xp, basis)
            and float64_where_available(xp, basis) is not None)


def zero_rows_exact(decomposition: str, d: int, k: int, secular: bool = False) -> bool:
    """Whether the FD step of one new column (:func:`fd_update_apply`, :func:`fd_apply_with_own_mass`)
    of a sketch of an axis of length d and rank k, given zero rows appended to its basis and column,
    gives them zero rows and every other value as without them, to rounding: where it takes the
    incremental path (k + 1 < d, :func:`resolve_decomposition`; ``"incremental_secular"`` at every
    length), as it then does at every longer length, since zero rows add only zero terms to every
    product (U^T x, |x - U U^T x|, the new basis [U, fresh] W, its rows zero). ``secular`` as for
    :func:`resolve_decomposition`."""
    return resolve_decomposition(decomposition, d, k, 1, secular) in ("incremental", "incremental_secular")


def _probe(xp: Any, m: int, width: int, dtype: Any, device: Any) -> Array:
    """A fixed m x width matrix of pseudo-random entries in [-1, 1] (an int32 hash, no RNG state).

    The same on every backend and under compilation; used as the start of the subspace iteration
    (a random start is almost surely not orthogonal to any direction that matters).
    """
    prime = 32749  # squares of residues stay below 2**31: int32 is enough on every backend
    i = xp.arange(m, dtype=xp.int32, device=device) % prime
    j = xp.arange(width, dtype=xp.int32, device=device) % prime
    h = (i[:, None] * 7919 + j[None, :] * 6007 + 12345) % prime
    h = (h * h + 7) % prime
    h = (h * h + 13) % prime
    return xp.astype(h, dtype) * (2.0 / (prime - 1)) - 1.0


def _coordinates(xp: Any, basis: Array, x: Array) -> Array:
    """U^T x for U (..., d, k), x (..., d, m); a single column as (x^T U)^T (the same numbers:
    torch's batched CPU kernels multiply a row vector by a matrix several times faster than a
    transposed matrix by a column, and S-AdaGrad's blocks are such stacks)."""
    if x.shape[-1] == 1:
        return matmul(xp, x.mT, basis).mT
    return matmul(xp, basis.mT, x)


def _combination(xp: Any, basis: Array, coords: Array) -> Array:
    """U c for c (..., k, m); a single column as (c^T U^T)^T, as in :func:`_coordinates`."""
    if coords.shape[-1] == 1:
        return matmul(xp, coords.mT, basis.mT).mT
    return matmul(xp, basis, coords)


def _split_by_basis(xp: Any, basis: Array, x: Array) -> tuple[Array, Array]:
    """``(c, r)`` with ``c = U^T x`` and ``r = x - U c``, x's coordinates on the basis and its part
    outside span(U), by classical Gram-Schmidt applied twice ("twice is enough": r orthogonal to
    U to working precision)."""
    coords = _coordinates(xp, basis, x)
    residual = x - _combination(xp, basis, coords)
    again = _coordinates(xp, basis, residual)
    return coords + again, residual - _combination(xp, basis, again)


def _unit_column(xp: Any, r: Array) -> tuple[Array, Array]:
    """``(r / |r|, |r|)`` for columns r (..., d, 1); the zero column where ``|r| = 0``."""
    norm = xp.linalg.vector_norm(r, axis=-2, keepdims=True)
    return r / select(xp, norm > 0.0, norm, number(xp, 1.0, norm)), norm


class _Ritz(NamedTuple):
    """Singular values s (..., r), descending, of Z = [basis diag(scaled_sigma), x], and its top-k
    left singular vectors: either ``vectors`` (..., d, k), or, on the incremental path,
    ``[basis, fresh] @ frame[..., :, :k]`` with ``fresh`` (..., d, m) and the small orthogonal
    ``frame`` (..., k + m, k + m), which the caller masks and, on failure, replaces by
    ``identity`` = [I; 0] ((k + m) x k), so the big product is formed once. The incremental path also gives, to apply the sketch, x's coordinates:
    ``projection`` = [U, fresh]^T x (..., k + m, m), and ``data`` = frame^T [U, fresh]^T x computed as
    diag(s) V^T from the small SVD, exact zeros on null directions (see :func:`fd_update_apply`)."""

    s: Array
    vectors: Optional[Array] = None
    fresh: Optional[Array] = None
    frame: Optional[Array] = None
    projection: Optional[Array] = None
    data: Optional[Array] = None
    identity: Optional[Array] = None


def _incremental(
    xp: Any, basis: Array, scaled_sigma: Array, x: Array, core: str = "incremental", apply: bool = False,
    empty: bool = False,
) -> _Ritz:
    """Brand's incremental SVD: Z = [U, Q] K with Q an orthonormal basis of x's component outside
    span(U), so the left singular pairs (W, s) of the small (k+m) x (k+m) K give those of Z exactly
    (U orthonormal or zero columns): :func:`~precond_ref.linalg.left_singular` (``core`` =
    ``"incremental"``), the eigendecomposition of K K^T formed in K's dtype
    (``"incremental_gram"``, :func:`_left_singular_by_gram`), or, for one new column, that of
    K K^T = diag(sigma^2, 0) + [c; r] [c; r]^T by its secular equation (``"incremental_secular"``,
    :func:`_left_singular_by_secular`: no LAPACK call, no host read). With
    ``apply`` also the new data in the frame, W^T [coords; corner], diag(s) V^T's last m columns.
    Cost: four d x k x m products and one d x (k+m) x k, about one QR of Z.

    With ``empty`` (every sketch of the stack has sigma = 0, so Z = [0, x]): Q R = x, and K's
    pairs are R's (m x m) with the k zero directions of the sketch after them, W = [[0, I],
    [W_R, 0]]: the same pairs in exact arithmetic, without the products with U and with an m x m
    decomposition in place of the (k+m)-square one.
    """
    k = basis.shape[-1]
    if empty:
        coords, residual = xp.zeros(x.shape[:-2] + (k, x.shape[-1]), dtype=x.dtype, device=placement(xp, x)), x
    else:
        coords, residual = _split_by_basis(xp, basis, x)
    if x.shape[-1] == 1:
        fresh, corner = _unit_column(xp, residual)
    else:
        fresh, corner = per_matrix(xp, xp.linalg.qr, residual)
    projection = xp.concat([coords, corner], axis=-2)  # [U, fresh]^T x
    identity = _eye(xp, projection.shape[-2], k, x)  # [I; 0]
    if core == "incremental_secular":
        sigma = xp.concat([scaled_sigma, xp.zeros_like(projection[..., k:, 0])], axis=-1)
        w, s = _left_singular_by_secular(xp, sigma, projection[..., 0])  # [[diag σ, c], [0, r]]
    elif empty:
        w, s = _left_singular_by_gram(xp, corner) if core == "incremental_gram" else left_singular(corner)
        w, s = _after_empty_sketch(xp, w, s, k)
    else:
        factor = xp.concat([identity * scaled_sigma[..., None, :], projection], axis=-1)  # [[diag σ, c], [0, R]]
        w, s = _left_singular_by_gram(xp, factor) if core == "incremental_gram" else left_singular(factor)
    if not apply:
        return _Ritz(s, fresh=fresh, frame=w, identity=identity)
    return _Ritz(s, fresh=fresh, frame=w, projection=projection, data=matmul(xp, w.mT, projection), identity=identity)


def _eye(xp: Any, rows: int, columns: int, like: Array) -> Array:
    """``eye(rows, columns)`` of ``like``'s dtype and device, made once per shape, dtype and device
    (:func:`precond_ref.engine.factors.constant`): a constant of the step, not a kernel of it."""
    return constant(xp, ("[I; 0]", rows, columns, like.dtype),
                    lambda: xp.eye(rows, columns, dtype=like.dtype, device=placement(xp, like)), like)


def _after_empty_sketch(xp: Any, w: Array, s: Array, k: int) -> tuple[Array, Array]:
    """The left singular pairs ``(W, s)`` of the core [[0, 0], [0, R]] ((k+m)-square) from R's
    ``(w, s)`` (m x m, s descending): s followed by k zeros, and W = [[0, I_k], [w, 0]] (the sketch's
    k empty directions last, where a descending order puts them)."""
    m = w.shape[-1]
    batch, dtype, device = tuple(w.shape[:-2]), w.dtype, placement(xp, w)
    empty = xp.broadcast_to(xp.eye(k, dtype=dtype, device=device), batch + (k, k))
    top = xp.concat([xp.zeros(batch + (k, m), dtype=dtype, device=device), empty], axis=-1)
    bottom = xp.concat([w, xp.zeros(batch + (m, k), dtype=dtype, device=device)], axis=-1)
    values = xp.concat([s, xp.zeros(batch + (k,), dtype=s.dtype, device=device)], axis=-1)
    return xp.concat([top, bottom], axis=-2), values


def _left_singular_by_gram(xp: Any, a: Array) -> tuple[Array, Array]:
    """``(W, s)`` with ``a = W diag(s) V^T``, ``s`` descending, for (stacks of) ``a`` of d rows
    (the incremental path's square core, the Gram path's wide factor): ``a a^T = W diag(lambda)
    W^T`` by ``eigh``, ``s = sqrt(max(lambda, 0))`` (d values).

    About a third of an SVD's work (an eigh and a product against a thin SVD). The Gram's rounding
    (u s_0^2) limits s to an absolute sqrt(u) s_0, the accuracy of the ``"gram"`` and ``"subspace"``
    paths (``shrink_cutoff_tolerance``); W stays orthogonal to working precision.
    """
    return descending_singular(xp, *symmetric_eigh(symmetrize(matmul(xp, a, a.mT))))


def _left_singular_by_secular(xp: Any, sigma: Array, z: Array) -> tuple[Array, Array]:
    """``(W, s)``, s descending, of the square ``[diag(sigma[:-1]), z[:-1]; 0, z[-1]]`` with
    ``sigma[-1] = 0``: its Gram is ``diag(sigma^2) + z z^T``, decomposed by
    :func:`~precond_ref.linalg.rank_one_update_eigh`, ``s = sqrt(max(lambda, 0))``."""
    return descending_singular(xp, *rank_one_update_eigh(sigma * sigma, z))


def _subspace(xp: Any, basis: Array, scaled_sigma: Array, x: Array) -> _Ritz:
    """One block power step on M = Z Z^T from the previous basis, then Rayleigh-Ritz (approximate).

    Start: the retained directions, a fixed pseudo-random direction where the sketch has none yet,
    and ``subspace_width - k`` oversampling columns x @ probe from the range of the new data.
    Image M S = U diag(sigma^2) U^T S + x (x^T S), orthonormalised to Q; Ritz pairs from the
    eigendecomposition of Q^T M Q = B^T B with B = Z^T Q. Three d x m x width products with x
    (the exact paths need a d x d eigendecomposition when k + m >= d). docs/methods/sketchy.md
    gives the measured error against the exact step.
    """
    d, k = basis.shape[-2:]
    m = x.shape[-1]
    dtype, device = x.dtype, placement(xp, x)
    width = subspace_width(d, k)
    start = select(xp, scaled_sigma[..., None, :] > 0.0, basis, _probe(xp, d, k, dtype, device))
    if width > k:
        fresh = matmul(xp, x, _probe(xp, m, width - k, dtype, device))
        start = xp.concat([start, fresh], axis=-1)
    power = scaled_sigma * scaled_sigma
    image = matmul(xp, basis, matmul(xp, basis.mT, start) * power[..., :, None])
    image = image + matmul(xp, x, matmul(xp, x.mT, start))
    # Householder QR: orthonormal even for (nearly) dependent columns; a completion direction
    # outside range(M) gets a Ritz value at rounding level, which the shrink cutoff masks.
    q, _ = per_matrix(xp, xp.linalg.qr, image)
    proj_u = matmul(xp, basis.mT, q) * scaled_sigma[..., :, None]
    proj_x = matmul(xp, x.mT, q)
    h = matmul(xp, proj_u.mT, proj_u) + matmul(xp, proj_x.mT, proj_x)
    w, s = descending_singular(xp, *eigh_widened(symmetrize(h)))
    return _Ritz(s, vectors=matmul(xp, q, w[..., :, :k]))


def _descending_left_singular(
    xp: Any, basis: Array, scaled_sigma: Array, x: Array, decomposition: str, apply: bool, empty: bool,
) -> _Ritz:
    """Top-k left singular vectors and the singular values (..., r), descending, of
    Z = [basis diag(scaled_sigma), x] (..., d, k + m); r > k exactly when a shrink value exists.
    ``apply`` and ``empty`` as for :func:`_incremental` (the other paths need neither)."""
    d, k = basis.shape[-2:]
    if decomposition.startswith("incremental"):
        return _incremental(xp, basis, scaled_sigma, x, core=decomposition, apply=apply, empty=empty)
    if decomposition == "subspace":
        return _subspace(xp, basis, scaled_sigma, x)
    z = xp.concat([basis * scaled_sigma[..., None, :], x], axis=-1)
    n = z.shape[-1]
    if decomposition in ("svd", "qr_svd"):
        if decomposition == "qr_svd":
            # The authors' order of operations: R from a QR of z^T, then the SVD of R^T. A no-op
            # mathematically, kept so faithful mode rounds like the authors' code.
            z = per_matrix(xp, xp.linalg.qr, z.mT)[1].mT
        p, s, _ = per_matrix(xp, _reduced_svd(xp), z)
        return _Ritz(s, vectors=p[..., :k])
    # Gram path (K7): eigh of the smaller Gram matrix; cheaper when n << d, but squares the
    # condition number, so directions at rounding level are dropped (set to zero).
    if n < d:
        tiny_rel = float(xp.finfo(z.dtype).eps) * d  # d = max(d, n)
        gram = matmul(xp, z.mT, z)
        evals, v = symmetric_eigh(symmetrize(gram))
        evals, v = xp.flip(evals, axis=-1), xp.flip(v, axis=-1)
        evals = xp.maximum(evals, number(xp, 0.0, evals))
        keep = evals > tiny_rel * evals[..., :1]
        s = select(xp, keep, xp.sqrt(evals), number(xp, 0.0, evals))
        safe_s = select(xp, keep, s, number(xp, 1.0, s))
        p = matmul(xp, z, v[..., :, :k]) / safe_s[..., None, :k] * xp.astype(keep[..., :k], z.dtype)[..., None, :]
        return _Ritz(s, vectors=p)
    p, s = _left_singular_by_gram(xp, z)
    return _Ritz(s, vectors=p[..., :k])


def _warns_on_division_by_zero(xp: Any) -> bool:
    """Whether ``xp`` warns where IEEE arithmetic divides by zero (``0 ** -1``, ``log2(0)``): NumPy
    and array_api_strict (NumPy's arithmetic beneath)."""
    return is_numpy_namespace(xp) or is_array_api_strict_namespace(xp)


def _masked_power(xp: Any, base: Array, mask: Array, exponent: float, one: Array, zero: Array) -> Array:
    """``base ** exponent`` where ``mask``, else 0; ``one`` and ``zero`` are 0-D arrays of ``base``'s
    dtype (made once per step, not once per use). The entries ``mask`` leaves out are raised too
    (``0 ** negative`` is Inf there) and not selected: the same values as raising only the others.
    Where the backend warns on that (:func:`_warns_on_division_by_zero`) those entries are made 1 first."""
    if _warns_on_division_by_zero(xp):
        base = select(xp, mask, base, one)
    return select(xp, mask, base**exponent, zero)


def _power_of_two_scale(xp: Any, value: Array, one: Array) -> Array:
    """2**ceil(log2(value)) where value > 0, else 1: an exact (rounding-free) rescaling factor.

    The exponent is capped at the dtype's largest (2**128 is not a float32): in the top binade
    value / scale lies in (1, 2), still far from overflow once squared. ``one``: a 0-D 1 of
    ``value``'s dtype. A value that is not positive gives 1 by the last selection (its own power,
    0 for a 0 or NaN, is computed and not selected); where the backend warns on ``log2(0)``
    (:func:`_warns_on_division_by_zero`) such values are made 1 first.
    """
    positive = value > 0.0
    if _warns_on_division_by_zero(xp):
        value = select(xp, positive, value, one)
    top = float(math.frexp(float(xp.finfo(value.dtype).max))[1] - 1)
    return select(xp, positive, 2.0 ** xp.minimum(xp.ceil(xp.log2(value)), number(xp, top, value)), one)


def _in_units(xp: Any, x: Array, decayed: Array, kept_root: Array, one: Array, zero: Array) -> tuple[Array, Array, Array]:
    """``(x / u, u, ok)``: the unit :math:`u = 2^{\\lceil \\log_2 \\max(|x|, \\sqrt\\beta\\sigma,
    \\sqrt{\\gamma\\rho})\\rceil}` (``decayed`` = :math:`\\sqrt\\beta\\sigma`, ``kept_root`` =
    :math:`\\sqrt{\\gamma\\rho}`; :func:`_power_of_two_scale`) of each block, and whether its x is finite.

    An exact rescaling: squares are formed in these units, and divided by a unit once per factor,
    so squares of tiny data (float32 |g| ~ 1e-25) do not underflow against each other nor those of
    large data overflow, and updates are invariant to the data's scale (F-I11) up to rounding.
    NaN/Inf anywhere in x makes its largest magnitude non-finite (max propagates NaN). NumPy and
    torch raise inside the SVD on NaN/Inf (JAX returns NaN): such a block's x / u is zeros, and the
    caller discards its result, so a non-finite input never reaches the decomposition or the state.
    """
    largest_entry = xp.max(xp.abs(x), axis=(-2, -1))
    ok = largest_entry <= float(xp.finfo(x.dtype).max)  # False for NaN and Inf: one comparison
    largest = xp.maximum(select(xp, ok, largest_entry, zero), xp.max(decayed, axis=-1))
    scale = _power_of_two_scale(xp, xp.maximum(largest, kept_root), one)
    return select(xp, ok[..., None, None], x / scale[..., None, None], zero), scale, ok


def _shrink(
    xp: Any, s: Array, k: int, root: Array, zero: Array, tolerance: float, cutoff: bool
) -> tuple[Array, Array, Array]:
    """``(s, noise, c)``: the singular values s (..., r), descending, which of them are rounding
    noise (:math:`s_i \\le` ``tolerance`` :math:`s_0`, :func:`shrink_cutoff_tolerance`), and the
    shrink value :math:`c = s_k` (0 where no (k+1)-th value exists). With ``cutoff`` (K3) the noise
    values are set to 0, which keeps :math:`\\rho'` (and :math:`w_\\perp`) exactly 0 and
    rank-deficient directions masked until real mass arrives; without it a noise c is still 0 (it
    adds nothing to :math:`\\rho`)."""
    noise = s <= tolerance * s[..., :1]
    if cutoff:
        s = select(xp, noise, zero, s)
    has_shrink = k < s.shape[-1]
    shrink = s[..., k] if has_shrink else xp.broadcast_to(zero, tuple(root.shape))
    if has_shrink and not cutoff:
        shrink = select(xp, noise[..., k], zero, shrink)
    return s, noise, shrink


def _weights(
    xp: Any, undeflated: Array, mass: Array, mask: Array, present: Array, scale: Array, one: Array, zero: Array,
    exponent: float, eps: Any, relative_eps: bool, delta: Any,
) -> tuple[Array, Array]:
    """``(w, w_perp)``: :math:`w_i = (\\sigma_i'^2 + \\rho' + \\epsilon')^a` on the retained
    directions (``mask``), else 0, and :math:`w_\\perp = (\\rho' + \\epsilon')^a` where the
    complement has mass (``present``), else 0; from ``undeflated`` = :math:`(\\sigma'^2 + \\rho')/u^2`
    and ``mass`` = :math:`\\rho'/u^2` in the data's unit u (``scale``), with :math:`\\epsilon' =
    \\epsilon \\max_i(\\sigma_i'^2 + \\rho')` (``relative_eps``) or :math:`\\epsilon`, plus
    :math:`\\delta`. The weights' unit also covers the absolute shifts, which may dwarf the data
    (S-AdaGrad's :math:`\\delta` against tiny gradients: :math:`\\delta / u^2` would overflow); with
    no absolute shift (Sketchy's default, S-AdaGrad's :math:`\\delta = 0`) it is the data's unit,
    and nothing is rescaled."""
    absolute = delta if relative_eps else delta + eps
    if is_zero(absolute):
        weight_scale, ratio = scale, None
    else:
        weight_scale = _power_of_two_scale(xp, xp.maximum(scale, zero + absolute**0.5), one)
        ratio = scale / weight_scale
        undeflated = undeflated * (ratio * ratio)[..., None]
    if relative_eps:
        eps_abs = eps * xp.max(undeflated, axis=-1)
    else:
        eps_abs = eps / weight_scale / weight_scale
    shift = eps_abs if is_zero(delta) else eps_abs + delta / weight_scale / weight_scale
    unscale = weight_scale ** (2.0 * exponent)
    weights = _masked_power(xp, undeflated + shift[..., None], mask, exponent, one, zero) * unscale[..., None]
    mass = (mass if ratio is None else mass * ratio * ratio) + shift
    complement = _masked_power(xp, mass, xp.logical_and(present, mass > 0.0), exponent, one, zero) * unscale
    return weights, complement


def _accepted(
    xp: Any, sketch: dict[str, Array], ritz: _Ritz, keep: Array, small: dict[str, Array], chosen: Array,
    coefficients: Optional[Array] = None,
) -> tuple[dict[str, Array], Optional[Array]]:
    """The new sketch where ``chosen`` (the step finite and taken), the previous one elsewhere: a
    failed decomposition never poisons the sketch (specs README rule 5, deviation K4). The basis is
    :math:`U' = P_{:, :k}` with the directions ``keep`` masks zeroed; ``small`` holds the other
    fields. Also, on the incremental path, its frame [U, fresh] times ``coefficients`` (None
    without them), formed from the previous basis (:func:`frame_products_in_rows` for a sketch over
    :data:`FD_ROWS_BYTES`, which may write the new basis over it)."""
    basis = sketch["basis"]
    out = None
    if ritz.vectors is not None:
        new_basis = select(xp, chosen[..., None, None], ritz.vectors * keep, basis)
    else:
        # [U, fresh] @ rotation, with the mask and the fallback (the rotation [I; 0] reproduces U
        # exactly) folded into the small rotation: a single pass writes the d x k basis, contiguous
        # and already the previous one where the step is not taken (no selection of it after).
        d, k = basis.shape[-2:]
        rotation = select(xp, chosen[..., None, None], ritz.frame[..., :, :k] * keep, ritz.identity)
        if d * k * (xp.finfo(basis.dtype).bits // 8) > FD_ROWS_BYTES:
            new_basis, out = frame_products_in_rows(xp, basis, ritz.fresh, rotation, coefficients)
        else:
            frame = xp.concat([basis, ritz.fresh], axis=-1)
            new_basis = matmul(xp, frame, rotation)
            out = None if coefficients is None else _combination(xp, frame, coefficients)
    chosen_per_value = chosen[..., None]  # the selection for the k-vectors; the scalars take chosen
    small = {key: select(xp, chosen_per_value if value.ndim > chosen.ndim else chosen, value, sketch[key])
             for key, value in small.items()}
    return {"basis": new_basis, **small}, out


def frame_products_in_rows(
    xp: Any, basis: Array, fresh: Array, rotation: Array, coefficients: Optional[Array] = None,
) -> tuple[Array, Optional[Array]]:
    r"""``(F R, F c)`` for the frame :math:`F = [U, \text{fresh}]` (..., d, k + m), the rotation
    R (..., k + m, k) and coefficients c (..., k + m, n) (``None``: no second product, None
    returned), over consecutive blocks of rows of F of at most :data:`FD_ROWS_BYTES` each (at least
    one row):

    .. math::

        (F R)_{i,:} = F_{i,:} R, \qquad (F c)_{i,:} = F_{i,:}\, c \qquad \text{for every block of rows } i,

    so each entry is the same sum over k + m terms as in the whole product (the libraries may order
    it otherwise for a block than for the whole: a few units of rounding of :math:`|F_{i,:}|\,|R_{:,j}|`).
    Block i of F R needs only block i of U, so once that block has been copied into block i of F
    the product is written over it (by the matmul itself, :func:`precond_ref._backend.matmul_into`),
    in U's own array where the caller owns its state (:func:`precond_ref._backend.owned_state`: the
    torch optimizers, CuPy's captured step) and the array can be written (a torch tensor outside
    ``torch.compile`` that needs no gradient, a writable NumPy array, a CuPy array): the returned
    basis is then that array, and the caller's previous basis is overwritten. Elsewhere (the pure
    core's own calls, JAX) the blocks are joined into one new array. Beside U (and the new basis
    where it is not written over U) and the result's d x n rows this holds one block of F (and one
    of F R where they are joined).
    """
    d, width = fresh.shape[-2], basis.shape[-1] + fresh.shape[-1]
    row_bytes = math.prod(tuple(basis.shape[:-2])) * width * (xp.finfo(basis.dtype).bits // 8)
    rows = max(1, FD_ROWS_BYTES // row_bytes)
    in_place = _writable(xp, basis)
    blocks, outs = [], []
    for start in range(0, d, rows):
        stop = min(d, start + rows)
        frame = xp.concat([basis[..., start:stop, :], fresh[..., start:stop, :]], axis=-1)
        if coefficients is not None:
            outs.append(_combination(xp, frame, coefficients))
        if in_place:  # U's block has been copied into the frame: its rows take F R directly
            matmul_into(xp, frame, rotation, basis[..., start:stop, :])
        else:
            blocks.append(matmul(xp, frame, rotation))
        del frame  # this block's copy goes before the next block's is made
    new_basis = basis if in_place else xp.concat(blocks, axis=-2)
    return new_basis, None if coefficients is None else xp.concat(outs, axis=-2)


def _writable(xp: Any, a: Array) -> bool:
    """Whether the state entry ``a`` may be written in place by item assignment: within
    :func:`~precond_ref._backend.owned_state`, a torch tensor outside ``torch.compile`` that needs
    no gradient, a writable NumPy array, a CuPy array; never a JAX array (immutable) or a traced
    value, and never outside ``owned_state`` (the pure core writes no array it was given)."""
    if not state_owned() or is_tracer(a) or torch_compiling():
        return False
    if is_torch_namespace(xp):
        return not a.requires_grad
    if is_numpy_namespace(xp):
        return bool(a.flags.writeable)
    return is_cupy_array(a)


def fd_update(xp: Any, sketch: dict[str, Array], x: Array, **options: Any) -> tuple[dict[str, Array], Array]:
    r"""One FD step: add ``x @ x.T`` (``x`` of shape (..., d, m)) to the decayed sketch, refresh weights.

    Leading dimensions are a stack of independent sketches of equal shape (one batched call).

    Parameters
    ----------
    sketch:
        The state of :func:`fd_init` or a previous :func:`fd_update`.
    options:
        Keyword-only, as :func:`_fd_step` declares them (``exponent`` is required; the others have
        the defaults below).
    x:
        The new statistic's factor, (..., d, m); cast to the sketch dtype.
    exponent:
        :math:`a` of :math:`(\bar G + \rho I + \epsilon I)^a` (e.g. -1/2, or -1/(2N) per axis of an
        order-N tensor).
    decay:
        :math:`\beta` in (0, 1]: the sketch factor is scaled by :math:`\sqrt\beta`.
    tail_decay:
        :math:`\gamma` multiplying the escaped mass before adding :math:`c^2`; ``None`` means
        :math:`\beta` (the analysis). The authors' tearfree code uses :math:`\sqrt\beta`, which
        ``"sqrt"`` names: the root is then taken of ``decay`` as the step receives it (a
        hyperparameter array already cast to the computing dtype, so the root is not rounded to a
        narrower dtype first).
    eps, relative_eps:
        :math:`\epsilon`; if ``relative_eps`` and ``eps > 0`` it is multiplied by the largest
        undeflated eigenvalue :math:`\max_i(s_i^2 + \gamma\rho)`.
    delta:
        An absolute shift added like :math:`\epsilon` that also counts as mass: the complement
        weight is :math:`(\rho' + \delta + \epsilon)^a` whenever :math:`\rho' + \delta > 0`
        (S-AdaGrad's :math:`\alpha = \delta + \sum \rho`).
    cutoff:
        Treat singular values at rounding level (the shrink value and retained ones) as 0
        (deviation K3, :func:`shrink_cutoff_tolerance`). Without it (faithful mode) a rounding-level
        shrink value still adds nothing to :math:`\rho`, and rounding-level retained directions
        join the complement: their weight differs from the complement's only by rounding, and
        which basis a backend picks inside that null space must not change the answer.
    noise_is_mass:
        Faithful Sketchy: when the step has a (k+1)-th singular value (k + m > k and nonzero data)
        the complement counts as present even if that value is rounding noise, as it is in the
        authors' float32 run (their SVD returns about 1e-7 s_0, never exactly 0); so
        :math:`w_\perp = (\rho' + \epsilon)^a` there on every backend instead of depending on
        whether a backend's SVD rounds the value to exactly 0.
    decomposition:
        ``"svd"`` (thin SVD of the d x (k+m) factor), ``"qr_svd"`` (the same after a QR of the
        factor's transpose, the authors' order of operations), ``"gram"`` (eigh of the smaller
        Gram matrix), ``"incremental"`` (project x on the basis, QR of the residual, SVD of a
        (k+m)-square matrix: exact, about one d x (k+m) matmul pass; needs k + m < d, else the SVD),
        ``"incremental_gram"`` (the same with that small matrix's eigendecomposition of its Gram in
        place of its SVD: about a third of its work, the Gram path's accuracy; else ``"gram"``),
        ``"incremental_secular"`` (one new column, m = 1: the same small matrix's pairs from the secular
        equation of its rank-one Gram update, :func:`~precond_ref.linalg.rank_one_update_eigh`; no
        LAPACK call and no host read, so a CUDA step can be captured; any k <= d; the Gram path's
        accuracy in float64, the SVD's for float32 data where the backend has float64),
        ``"subspace"`` (one warm-started block power step with Rayleigh-Ritz: approximate, for long
        axes with k + m >= d; where :func:`subspace_width` reaches d it is the exact ``"gram"``
        path, as the whole axis is the subspace) or ``"auto"`` (:func:`resolve_decomposition`).
    maybe_empty:
        The caller's word that the sketch may be empty (every :math:`\sigma = 0`, as after
        :func:`fd_init`): where the sketch's values can be read on the host without a
        synchronisation (``_backend.host_bool``: NumPy, torch on a CPU outside ``torch.compile``)
        and are all 0, the incremental paths decompose x's m x m triangular factor alone instead of
        the (k+m)-square core (the same values in exact arithmetic; rounding differs).

    Returns
    -------
    (new_sketch, ok)
        ``ok`` is a bool array of the stack's shape, False when ``x`` or the decomposition is not
        finite; the previous sketch is then returned unchanged (the caller counts the failure).
        On the incremental paths a sketch whose basis exceeds :data:`FD_ROWS_BYTES` is stepped by
        blocks of rows (:func:`frame_products_in_rows`): within
        :func:`~precond_ref._backend.owned_state`, where its basis array can be written (torch,
        NumPy, CuPy), the new basis is written over it and returned as the same array, so the
        ``sketch`` passed in no longer holds the previous basis.
    """
    return _fd_step(xp, sketch, x, **options)[:2]


def fd_update_apply(xp: Any, sketch: dict[str, Array], x: Array, **options: Any) -> tuple[dict[str, Array], Array, Array]:
    r""":func:`fd_update`, then the new sketch applied to the same ``x``: ``(new_sketch, ok, P'(x))``.

    Equal to ``fd_apply(xp, new_sketch, x)`` in exact arithmetic (S-AdaGrad preconditions the
    gradient it has just added). On the ``"incremental"`` path it is computed from the small SVD
    instead: x's coordinates on the new directions are diag(s) V^T (exact zeros on null
    directions), so no :math:`w_\perp (x - U U^\top x)` is formed -- that difference is rounding
    while x lies in the sketch's span, and :math:`w_\perp / w` amplifies it (backends then agree to
    ~1e-13 instead of 1e-15 in float64); and one product with ``[U, fresh]`` gives the direction,
    where :func:`fd_apply` needs two with U. Options as for :func:`fd_update`.
    """
    return _fd_step(xp, sketch, x, apply=True, **options)


def _fd_step(
    xp: Any, sketch: dict[str, Array], x: Array, *, exponent: float, decay: float = 1.0,
    tail_decay: Union[None, float, str] = None, eps: float = 0.0, relative_eps: bool = True, delta: float = 0.0,
    cutoff: bool = False, noise_is_mass: bool = False, decomposition: str = "svd", accept: Optional[Array] = None,
    maybe_empty: bool = False, apply: bool = False,
) -> tuple[dict[str, Array], Array, Optional[Array]]:
    """:func:`fd_update`, and with ``apply`` also the new sketch applied to ``x`` (else None).

    ``accept`` (a 0-D bool array or None) is the caller's own keep-or-discard decision for this
    step (a transform's skip of a non-finite step): where it is False the previous sketch is
    returned, by the same selection that discards a failed decomposition, so the caller need not
    select every entry again. It does not change ``ok``. ``maybe_empty`` (a host bool) says that the
    sketch may be empty (a first step); see :func:`fd_update`.
    """
    if decomposition not in _DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {_DECOMPOSITIONS}, got {decomposition!r}")
    if isinstance(tail_decay, str) and tail_decay != "sqrt":
        raise ValueError(f"tail_decay must be a number, None or 'sqrt', got {tail_decay!r}")
    basis, sigma, root = sketch["basis"], sketch["singular_values"], sketch["escaped_root"]
    dtype = basis.dtype
    d, k = basis.shape[-2:]
    if x.ndim != basis.ndim or x.shape[-2] != d or tuple(x.shape[:-2]) != tuple(basis.shape[:-2]):
        expected = ", ".join(str(n) for n in tuple(basis.shape[:-2]) + (d,))
        raise ValueError(f"FD update expects x of shape ({expected}, m), got {tuple(x.shape)}")
    m = x.shape[-1]
    if decomposition == "incremental_secular" and m != 1:
        raise ValueError(f"decomposition='incremental_secular' adds one column a step, got {m}")
    decomposition = resolve_decomposition(decomposition, d, k, m, secular_by_default(xp, basis))
    if decomposition in ("incremental", "incremental_gram") and k + m >= d:
        # nothing to save: the factor is not tall (the whole-factor path of the same accuracy)
        decomposition = "svd" if decomposition == "incremental" else "gram"
    if decomposition == "subspace" and subspace_width(d, k) >= d:
        decomposition = "gram"  # an iterate as wide as the axis: the exact d x d problem
    x = unscaled = xp.astype(x, dtype, copy=False)
    gamma = decay if tail_decay is None else decay**0.5 if isinstance(tail_decay, str) else tail_decay
    zero, one = number(xp, 0.0, x), number(xp, 1.0, x)
    root_beta, kept_root = decay**0.5, root * gamma**0.5  # √β, √(γρ)
    decayed = sigma * root_beta  # √β σ
    x, scale, input_ok = _in_units(xp, x, decayed, kept_root, one, zero)  # X/u, u a power of two
    # An empty sketch (every sigma 0: Z = [0, X]) where the caller says it may be and the host
    # reads sigma without a synchronisation: the incremental path's m x m problem of X alone.
    empty = (maybe_empty and decomposition in ("incremental", "incremental_gram")
             and host_bool(xp, xp.all(sigma == 0.0)) is True)
    scaled_sigma = decayed / scale[..., None]
    ritz = _descending_left_singular(xp, basis, scaled_sigma, x, decomposition, apply, empty)  # Z/u = P diag(s) Qᵀ
    widened = dtype == xp.float32 and widened_dtype(xp, x) is not None
    tolerance = shrink_cutoff_tolerance(xp, dtype, decomposition, widened)
    s, noise, shrink = _shrink(xp, ritz.s, k, root, zero, tolerance, cutoff)  # c = s_k (0 at rounding level)
    top = s[..., :k]  # s >= 0 (or NaN) on every path, as the shrink value c
    deflated = xp.sqrt(xp.maximum(top - shrink[..., None], zero)) * xp.sqrt(top + shrink[..., None])  # σ'/u = √(s² − c²)
    scaled_root = kept_root / scale
    scaled_tail = scaled_root * scaled_root  # γρ/u²
    # gamma rho + c^2: c is either 0 or above the cutoff, a fraction of the unit (no underflow).
    mass = scaled_tail + shrink * shrink  # ρ'/u², ρ' = γρ + c²
    new_root = xp.sqrt(mass) * scale  # √ρ'
    # sigma'^2 + rho' computed directly, not by subtracting c^2 and adding it back (scaled units).
    undeflated = top * top + scaled_tail[..., None]  # (σ'² + ρ')/u²
    mask = deflated > 0.0  # the retained directions; with the cutoff a noise value is 0 already, so is its σ'
    if not cutoff:
        mask = xp.logical_and(mask, xp.logical_not(noise[..., :k]))
    new_sigma = select(xp, mask, deflated * scale[..., None], zero)  # σ'
    present = (new_root if is_zero(delta) else new_root + delta) > 0.0  # mass in the complement
    if noise_is_mass and k < s.shape[-1]:
        present = xp.logical_or(present, s[..., 0] > 0.0)
    weights, complement = _weights(  # w = (σ'² + ρ' + ε)^a, w_⊥ = (ρ' + ε)^a
        xp, undeflated, mass, mask, present, scale, one, zero, exponent, eps, relative_eps, delta,
    )

    factor = ritz.frame if ritz.vectors is None else ritz.vectors
    ok = xp.logical_and(input_ok, _finite_blocks(xp, [s, weights, complement[..., None], new_root[..., None]], factor))
    keep = xp.astype(mask, dtype)[..., None, :]
    chosen = ok if accept is None else xp.logical_and(ok, accept)
    small = dict(singular_values=new_sigma, escaped_root=new_root, basis_weights=weights, complement_weight=complement)
    # With apply, on the incremental path the new sketch applied to x as coefficients on the frame
    # [U, fresh], whose product with them is formed with the new basis; on the others fd_apply.
    on_frame = apply and ritz.vectors is None
    coefficients = _frame_direction(xp, sketch, ritz, mask, weights, complement, ok, scale) if on_frame else None
    new, out = _accepted(xp, sketch, ritz, keep, small, chosen, coefficients)
    if apply and not on_frame:
        out = fd_apply(xp, new, select(xp, input_ok[..., None, None], unscaled, zero))
    return new, ok, out


def _finite_blocks(xp: Any, vectors: Sequence[Array], matrices: Array) -> Array:
    """``all(isfinite(v), -1)`` for every ``v`` in ``vectors`` and ``all(isfinite(matrices), (-2, -1))``,
    joined by ``&``, per block of a stack.

    Eagerly the vectors are joined along their last axis and tested once (a reduction, not one per
    vector); on torch that test is one comparison with 0 of the two blocks' sums of ``x * 0`` added
    (:func:`~precond_ref.linalg.all_finite`'s test: each sum is ±0 when every entry is finite, else
    NaN, and so is their sum): one operation fewer than the two tests joined. Under
    ``torch.compile`` each vector is tested where it is, not joined: TorchInductor (on a CPU)
    writes the pieces of a join into the joined buffer and may then hand that buffer to another
    value while a later value still lives in a piece's place, so a step's basis weights were
    overwritten before the direction read them (faithful S-AdaGrad, several leaves in one graph);
    the compiler fuses the separate tests with the reductions anyway."""
    if not is_torch_namespace(xp):
        return xp.logical_and(all_finite(xp.concat(list(vectors), axis=-1), axis=(-1,)), all_finite(matrices, axis=(-2, -1)))
    if torch_compiling():
        finite = all_finite(matrices, axis=(-2, -1))
        for v in vectors:
            finite = xp.logical_and(finite, all_finite(v, axis=(-1,)))
        return finite
    return xp.sum(xp.concat(list(vectors), axis=-1) * 0.0, axis=-1) + xp.sum(matrices * 0.0, axis=(-2, -1)) == 0.0


def _frame_direction(
    xp: Any, sketch: dict[str, Array], ritz: _Ritz, mask: Array, weights: Array, complement: Array, ok: Array,
    scale: Array,
) -> Array:
    """The new sketch applied to x, as coefficients on the incremental path's frame [U, fresh].

    x's coordinates on the new directions [U, fresh] W are diag(s) V^T of the small SVD; each gets
    its weight (w on retained directions, w_perp on masked ones and on the dropped rest). No
    w_perp (x - U U^T x) is formed: that difference is rounding while x lies in the sketch's span,
    and w_perp / w would amplify it. Where the step failed, the previous sketch
    applied to x in its own coordinates [U^T x; fresh^T x] (x - [U, fresh] [U, fresh]^T x = 0).
    """
    rest = ritz.s.shape[-1] - weights.shape[-1]

    def on_frame(basis_weights: Array, complement: Array) -> Array:  # w, then w_perp on the rest of the frame
        return xp.concat([basis_weights, xp.broadcast_to(complement[..., None], complement.shape + (rest,))], axis=-1)

    new_weights = on_frame(select(xp, mask, weights, complement[..., None]), complement)
    new = matmul(xp, ritz.frame, new_weights[..., :, None] * ritz.data)
    old = on_frame(sketch["basis_weights"], sketch["complement_weight"])[..., :, None] * ritz.projection
    return select(xp, ok[..., None, None], new, old) * scale[..., None, None]


def fd_apply(xp: Any, sketch: dict[str, Array], x: Array) -> Array:
    r""":math:`U \operatorname{diag}(w) U^\top x + w_\perp (x - U U^\top x)` for ``x`` of shape (..., d, n).

    :math:`O(d k n)` flops and :math:`O(k n)` extra memory; equal to
    :math:`(\bar G + \rho I + \epsilon I)^a x` (F-I7) when every retained direction is nonzero.
    Leading dimensions are a stack of sketches, as in :func:`fd_update`.
    """
    basis = sketch["basis"]
    coords = _coordinates(xp, basis, x)
    complement_weight = sketch["complement_weight"][..., None, None]
    # U (diag(w) - w_perp) U^T x + w_perp x: one product with U less than the formula above.
    scaled = coords * (sketch["basis_weights"][..., :, None] - complement_weight)
    return _combination(xp, basis, scaled) + complement_weight * x


def fd_apply_with_own_mass(xp: Any, sketch: dict[str, Array], x: Array) -> Array:
    r"""The sketch applied to a column ``x`` (..., d, 1) it has not seen, with x's own mass added on
    the sketch's frame (exponent -1/2, S-AdaGrad's):

    .. math::

        c = U^\top x, \quad r = x - U c, \quad
        y = U \left[c_i\,(\mu_i + c_i^2)^{-1/2}\right]_i + (\mu_\perp + \lVert r\rVert^2)^{-1/2}\, r,

    with :math:`\mu_i = w_i^{-2}`, :math:`\mu_\perp = w_\perp^{-2}` the masses behind the stored
    weights (0 where a weight is 0: the pseudo-inverse's empty directions). That is
    :math:`(S + D)^{-1/2} x`, with :math:`S` the operator of :func:`fd_apply` (masses) and
    :math:`D = \operatorname{diag}(c_1^2, \dots, c_k^2, \lVert r\rVert^2)` on the orthonormal
    frame :math:`[U, r/\lVert r\rVert]`: the diagonal of :math:`x x^\top` on that frame, what x
    adds to the sketch, without the decomposition that adds it exactly. So, as after an FD step
    that has added x, no coordinate of y on the frame exceeds 1 in magnitude, whereas
    :func:`fd_apply` gives the unseen part of x the weight :math:`w_\perp`, unbounded.

    Computed in units of a power of two near x's largest entry (exact: the residual's norm does
    not underflow), each coordinate as :math:`t / \operatorname{hypot}(1, t)` with
    :math:`t = w_i c_i` (no square overflows; :math:`\operatorname{sign}(c_i)` where
    :math:`w_i = 0`), the residual's as :math:`\tau / \operatorname{hypot}(1, \tau)` along
    :math:`r / \lVert r\rVert`, :math:`\tau = w_\perp \lVert r\rVert`. A residual at rounding
    level (:math:`\lVert r\rVert \le 10 u \lVert x\rVert` after a second projection, as the FD
    step's: x in span(U)) counts as 0, as the FD step's cutoff counts it (its direction is noise,
    which a large :math:`w_\perp` or, where :math:`\mu_\perp = 0`, the weight
    :math:`1/\lVert r\rVert` would make a unit step).
    """
    if x.shape[-1] != 1:
        raise ValueError(f"fd_apply_with_own_mass takes one column x (..., d, 1), got shape {tuple(x.shape)}")
    basis = sketch["basis"]
    weights = sketch["basis_weights"][..., :, None]
    complement = sketch["complement_weight"][..., None, None]
    largest = xp.max(xp.abs(x), axis=(-2, -1))
    scale = _power_of_two_scale(xp, largest, xp.ones((), dtype=largest.dtype, device=placement(xp, largest)))[..., None, None]
    x = x / scale
    coords, residual = _split_by_basis(xp, basis, x)
    unit, norm = _unit_column(xp, residual)
    noise = shrink_cutoff_tolerance(xp, x.dtype) * xp.linalg.vector_norm(x, axis=-2, keepdims=True)
    along = select(xp, weights > 0.0, _saturated(xp, weights * scale * coords), xp.sign(coords))
    across = select(xp, complement > 0.0, _saturated(xp, complement * scale * norm), number(xp, 1.0, norm))
    across = select(xp, norm > noise, across, number(xp, 0.0, norm))
    return _combination(xp, basis, along) + across * unit


def _saturated(xp: Any, t: Array) -> Array:
    """``t / sqrt(1 + t^2)``, in (-1, 1), as ``t / hypot(1, t)`` with ``t`` capped at ``1/eps``,
    beyond which the value is +-1 to rounding (an infinite ``t`` gives +-1, not NaN)."""
    cap = 1.0 / float(xp.finfo(t.dtype).eps)
    t = clip(xp, t, -cap, cap)
    return t / xp.hypot(number(xp, 1.0, t), t)
