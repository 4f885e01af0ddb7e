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
space of the statistic, where the pseudo-inverse is 0).

A sketch is a dict of arrays (so it lives inside optimizer state):

============================ ======== =============================================================
key                          shape    meaning
============================ ======== =============================================================
``basis``                    (d, k)   :math:`U`
``singular_values``          (k,)     :math:`\sigma` (the sketch factor is :math:`U \operatorname{diag}(\sigma)`)
``escaped_mass``             ()       :math:`\rho`
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
from typing import Any, Optional

from array_api_compat import device as array_device

__all__ = [
    "SKETCH_KEYS",
    "fd_init",
    "fd_update",
    "fd_apply",
    "fd_covariance",
    "shrink_cutoff_tolerance",
    "subspace_width",
    "resolve_decomposition",
    "SUBSPACE_MIN_DIM",
]

Array = Any

SKETCH_KEYS = ("basis", "singular_values", "escaped_mass", "basis_weights", "complement_weight")
_DECOMPOSITIONS = ("svd", "gram", "qr_svd", "incremental", "subspace", "auto")
# "auto" uses the (approximate) subspace iteration only for axes at least this long, where an
# exact d x d eigendecomposition per step is the cost that matters; shorter axes stay exact.
SUBSPACE_MIN_DIM = 256


def fd_init(xp: Any, d: int, k: int, *, dtype: Any, device: Any, batch: tuple[int, ...] = ()) -> dict[str, Array]:
    """An empty sketch of an axis of length ``d`` keeping ``k <= d`` directions (all zeros).

    ``batch`` prepends stack dimensions (equal-shape blocks updated by one batched call).
    """
    if not 1 <= k <= d:
        raise ValueError(f"sketch rank k must be in [1, d] = [1, {d}], got {k}")
    return {
        "basis": xp.zeros(batch + (d, k), dtype=dtype, device=device),
        "singular_values": xp.zeros(batch + (k,), dtype=dtype, device=device),
        "escaped_mass": xp.zeros(batch, dtype=dtype, device=device),
        "basis_weights": xp.zeros(batch + (k,), dtype=dtype, device=device),
        "complement_weight": xp.zeros(batch, dtype=dtype, device=device),
    }


def shrink_cutoff_tolerance(xp: Any, dtype: Any, decomposition: str = "svd") -> float:
    """Relative level below which a singular value of the FD step is rounding noise (K3).

    For the SVD (and the ``"incremental"`` projection, whose residual carries an absolute error of
    a few unit roundoffs of the inputs), singular values carry an absolute error of a few unit
    roundoffs times the largest one, so :math:`c \\le 10 u\\, s_0` is treated as 0. The Gram and
    subspace paths square the matrix: their eigenvalues carry :math:`u\\, s_0^2`, i.e. singular
    values :math:`\\sqrt{u}\\, s_0`, so the test is :math:`c^2 \\le 10 u\\, s_0^2`.
    """
    unit_roundoff = float(xp.finfo(dtype).eps) / 2.0
    if decomposition in ("gram", "subspace"):
        return math.sqrt(10.0 * unit_roundoff)
    return 10.0 * unit_roundoff


def subspace_width(d: int, k: int) -> int:
    """Columns of the subspace iteration: k plus an oversampling of max(4, k/16), at most d."""
    return min(d, k + max(4, -(-k // 16)))


def resolve_decomposition(decomposition: str, d: int, k: int, m: int) -> str:
    """The path ``"auto"`` takes for a sketch of an axis of length d, rank k and m new columns.

    ``"incremental"`` (exact) when k + m < d; ``"subspace"`` (approximate) when the axis is long
    (d >= :data:`SUBSPACE_MIN_DIM`) and the iteration is at most half of it; else ``"gram"`` (the
    exact eigendecomposition of the d x d statistic). Other names are returned unchanged.
    """
    if decomposition != "auto":
        return decomposition
    if k + m < d:
        return "incremental"
    if d >= SUBSPACE_MIN_DIM and 2 * subspace_width(d, k) <= d:
        return "subspace"
    return "gram"


def _diag(xp: Any, v: Array) -> Array:
    """A (stack of) diagonal matrices from a (stack of) vectors."""
    k = v.shape[-1]
    return xp.eye(k, dtype=v.dtype, device=array_device(v)) * v[..., None, :]


def _probe(xp: Any, m: int, width: int, dtype: Any, device: Any) -> Array:
    """A fixed m x width matrix of pseudo-random entries in [-1, 1] (an int32 hash, no RNG state).

    The same on every backend and under compilation; used as the range-finder probe of the
    subspace iteration (a random start avoids a probe orthogonal to the new columns' span).
    """
    prime = 32749  # squares of residues stay below 2**31: int32 is enough on every backend
    i = xp.arange(m, dtype=xp.int32, device=device) % prime
    j = xp.arange(width, dtype=xp.int32, device=device) % prime
    h = (i[:, None] * 7919 + j[None, :] * 6007 + 12345) % prime
    h = (h * h + 7) % prime
    h = (h * h + 13) % prime
    return xp.astype(h, dtype) * (2.0 / (prime - 1)) - 1.0


def _orthonormal_columns(xp: Any, y: Array) -> Array:
    """An orthonormal basis of the columns of y (..., d, l); nearly dependent directions -> 0 columns.

    Column-scaled Gram eigendecomposition, twice (the second pass restores orthogonality to
    rounding level); cheaper than a Householder QR of a tall matrix on CPU and batched everywhere.
    """
    width = y.shape[-1]
    norms = xp.linalg.vector_norm(y, axis=-2, keepdims=True)
    q = y / xp.where(norms > 0.0, norms, xp.ones_like(norms))
    tol = float(xp.finfo(y.dtype).eps) * width
    for _ in range(2):
        gram = xp.matmul(q.mT, q)
        mu, vecs = xp.linalg.eigh((gram + gram.mT) / 2.0)
        keep = mu > tol * xp.max(mu, axis=-1, keepdims=True)
        inv_root = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, mu, xp.ones_like(mu))), xp.zeros_like(mu))
        q = xp.matmul(q, vecs) * inv_root[..., None, :]
    return q


def _descending_left_singular(
    xp: Any, basis: Array, scaled_sigma: Array, x: Array, decomposition: str
) -> tuple[Array, Array]:
    """Top-k left singular vectors P (..., d, k) and singular values s (..., r), descending, of
    Z = [basis diag(scaled_sigma), x] (..., d, k + m); r > k exactly when a shrink value exists."""
    d, k = basis.shape[-2:]
    m = x.shape[-1]
    if decomposition == "incremental":
        # Z = [U, Q] K with Q an orthonormal basis of x's component outside span(U):
        # the SVD of the small (k+m) x (k+m) K is the SVD of Z (exact; Brand's incremental SVD).
        coords = xp.matmul(basis.mT, x)
        residual = x - xp.matmul(basis, coords)
        again = xp.matmul(basis.mT, residual)  # "twice is enough" re-orthogonalisation
        residual = residual - xp.matmul(basis, again)
        coords = coords + again
        if m == 1:
            norm = xp.linalg.vector_norm(residual, axis=-2, keepdims=True)
            fresh = residual / xp.where(norm > 0.0, norm, xp.ones_like(norm))
            corner = norm
        else:
            fresh, corner = xp.linalg.qr(residual)
        top = xp.concat([_diag(xp, scaled_sigma), coords], axis=-1)
        bottom = xp.concat([xp.zeros(corner.shape[:-1] + (k,), dtype=x.dtype, device=array_device(x)),
                            corner], axis=-1)
        w, s, _ = xp.linalg.svd(xp.concat([top, bottom], axis=-2), full_matrices=False)
        p = xp.matmul(basis, w[..., :k, :k]) + xp.matmul(fresh, w[..., k:, :k])
        return p, s
    if decomposition == "subspace":
        # One block power step on M = Z Z^T from the previous basis (warm start), with fresh
        # directions from a probe of x where the sketch has none, then Rayleigh-Ritz. Approximate:
        # see docs/methods/sketchy.md for the measured tail error.
        width = subspace_width(d, k)
        fresh = xp.matmul(x, _probe(xp, m, width, x.dtype, array_device(x)))
        start = xp.concat(
            [xp.where(scaled_sigma[..., None, :] > 0.0, basis, fresh[..., :k]), fresh[..., k:]], axis=-1
        )
        power = scaled_sigma * scaled_sigma
        image = xp.matmul(basis, xp.matmul(basis.mT, start) * power[..., :, None])
        image = image + xp.matmul(x, xp.matmul(x.mT, start))
        q = _orthonormal_columns(xp, image)
        proj_u = xp.matmul(basis.mT, q) * scaled_sigma[..., :, None]
        proj_x = xp.matmul(x.mT, q)
        h = xp.matmul(proj_u.mT, proj_u) + xp.matmul(proj_x.mT, proj_x)
        theta, w = xp.linalg.eigh((h + h.mT) / 2.0)
        theta, w = xp.flip(theta, axis=-1), xp.flip(w, axis=-1)
        s = xp.sqrt(xp.maximum(theta, xp.zeros_like(theta)))
        return xp.matmul(q, w[..., :, :k]), s
    z = xp.concat([basis * scaled_sigma[..., None, :], x], axis=-1)
    n = z.shape[-1]
    if decomposition == "svd":
        p, s, _ = xp.linalg.svd(z, full_matrices=False)
        return p[..., :k], s
    if decomposition == "qr_svd":
        # The authors' order of operations: R from a QR of z^T, then the SVD of R^T. A no-op
        # mathematically, kept so faithful mode rounds like the authors' code.
        _, r_factor = xp.linalg.qr(z.mT)
        p, s, _ = xp.linalg.svd(r_factor.mT, full_matrices=False)
        return p[..., :k], s
    # Gram path (K7): eigh of the smaller Gram matrix; cheaper when n << d, but squares the
    # condition number, so directions at rounding level are dropped (set to zero).
    tiny_rel = float(xp.finfo(z.dtype).eps) * max(d, n)
    if n < d:
        gram = xp.matmul(z.mT, z)
        evals, v = xp.linalg.eigh((gram + gram.mT) / 2.0)
        evals, v = xp.flip(evals, axis=-1), xp.flip(v, axis=-1)
        evals = xp.maximum(evals, xp.zeros_like(evals))
        keep = evals > tiny_rel * evals[..., :1]
        s = xp.where(keep, xp.sqrt(evals), xp.zeros_like(evals))
        safe_s = xp.where(keep, s, xp.ones_like(s))
        p = xp.matmul(z, v) / safe_s[..., None, :] * xp.astype(keep, z.dtype)[..., None, :]
        return p[..., :k], s
    gram = xp.matmul(z, z.mT)
    evals, p = xp.linalg.eigh((gram + gram.mT) / 2.0)
    evals, p = xp.flip(evals, axis=-1), xp.flip(p, axis=-1)
    evals = xp.maximum(evals, xp.zeros_like(evals))
    return p[..., :k], xp.sqrt(evals)


def _masked_power(xp: Any, base: Array, mask: Array, exponent: float) -> Array:
    """``base ** exponent`` where ``mask``, else 0, never forming ``0 ** negative`` (no Inf)."""
    safe = xp.where(mask, base, xp.ones_like(base))
    return xp.where(mask, safe**exponent, xp.zeros_like(base))


def _power_of_two_scale(xp: Any, value: Array) -> Array:
    """2**ceil(log2(value)) where value > 0, else 1: an exact (rounding-free) rescaling factor."""
    positive = value > 0.0
    safe = xp.where(positive, value, xp.ones_like(value))
    return xp.where(positive, 2.0 ** xp.ceil(xp.log2(safe)), xp.ones_like(value))


def fd_update(
    xp: Any,
    sketch: dict[str, Array],
    x: Array,
    *,
    exponent: float,
    decay: float = 1.0,
    tail_decay: Optional[float] = None,
    eps: float = 0.0,
    relative_eps: bool = True,
    delta: float = 0.0,
    cutoff: bool = False,
    noise_is_mass: bool = False,
    decomposition: str = "svd",
) -> tuple[dict[str, Array], Array]:
    r"""One FD step: add ``x @ x.T`` (``x`` of shape (..., d, m)) to the decayed sketch, refresh weights.

    Leading dimensions are a stack of independent sketches of equal shape (one batched call).

    Parameters
    ----------
    sketch:
        The state of :func:`fd_init` or a previous :func:`fd_update`.
    x:
        The new statistic's factor, (..., d, m); cast to the sketch dtype.
    exponent:
        :math:`a` of :math:`(\bar G + \rho I + \epsilon I)^a` (e.g. -1/2, or -1/(2N) per axis of an
        order-N tensor).
    decay:
        :math:`\beta` in (0, 1]: the sketch factor is scaled by :math:`\sqrt\beta`.
    tail_decay:
        :math:`\gamma` multiplying the escaped mass before adding :math:`c^2`; ``None`` means
        :math:`\beta` (the analysis). The authors' tearfree code uses :math:`\sqrt\beta`.
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
        (k+m)-square matrix: exact, about one d x (k+m) matmul pass; needs k + m < d),
        ``"subspace"`` (one warm-started block power step with Rayleigh-Ritz: approximate, for long
        axes with k + m >= d) or ``"auto"`` (:func:`resolve_decomposition`).

    Returns
    -------
    (new_sketch, ok)
        ``ok`` is a bool array of the stack's shape, False when ``x`` or the decomposition is not
        finite; the previous sketch is then returned unchanged (the caller counts the failure).
    """
    if decomposition not in _DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {_DECOMPOSITIONS}, got {decomposition!r}")
    basis, sigma, rho = sketch["basis"], sketch["singular_values"], sketch["escaped_mass"]
    dtype = basis.dtype
    d, k = basis.shape[-2:]
    if x.ndim != basis.ndim or x.shape[-2] != d or tuple(x.shape[:-2]) != tuple(basis.shape[:-2]):
        expected = ", ".join(str(n) for n in tuple(basis.shape[:-2]) + (d,))
        raise ValueError(f"FD update expects x of shape ({expected}, m), got {tuple(x.shape)}")
    m = x.shape[-1]
    decomposition = resolve_decomposition(decomposition, d, k, m)
    if decomposition == "incremental" and k + m >= d:
        decomposition = "svd"  # nothing to save: the factor is not tall
    x = xp.astype(x, dtype)
    # NumPy and torch raise inside the SVD on NaN/Inf (JAX returns NaN): feed zeros instead and
    # discard the result, so a non-finite input never reaches the decomposition or the state.
    input_ok = xp.all(xp.isfinite(x), axis=(-2, -1))
    x = xp.where(input_ok[..., None, None], x, xp.zeros_like(x))
    gamma = decay if tail_decay is None else tail_decay
    kept_tail = rho * gamma

    # Work in units of a power of two near the largest entry (exact rescaling): squares of
    # gradients near the float32 range (|g| >= 1.8e19) never overflow inside the update.
    root_beta = decay**0.5
    largest = xp.maximum(xp.max(xp.abs(x), axis=(-2, -1)), xp.max(sigma, axis=-1) * root_beta)
    scale = _power_of_two_scale(xp, xp.maximum(largest, xp.sqrt(kept_tail)))
    p, s = _descending_left_singular(
        xp, basis, sigma * root_beta / scale[..., None], x / scale[..., None, None], decomposition
    )
    r = s.shape[-1]

    zero = xp.zeros((), dtype=dtype, device=array_device(s))
    tol = shrink_cutoff_tolerance(xp, dtype, decomposition) * s[..., :1]
    noise = s <= tol
    if cutoff:
        # Singular values at rounding level are 0: this keeps rho' (and w_perp) exactly 0 and
        # rank-deficient directions masked until real mass arrives.
        s = xp.where(noise, xp.zeros_like(s), s)
    shrink = xp.maximum(s[..., k], zero) if k < r else xp.zeros_like(rho)
    if k < r and not cutoff:
        shrink = xp.where(noise[..., k], xp.zeros_like(shrink), shrink)
    top = xp.maximum(s[..., :k], zero)
    deflated = xp.sqrt(xp.maximum(top - shrink[..., None], zero)) * xp.sqrt(top + shrink[..., None])
    scaled_tail = kept_tail / (scale * scale)
    new_rho = kept_tail + (shrink * scale) ** 2
    # sigma'^2 + rho' computed directly, not by subtracting c^2 and adding it back (scaled units).
    undeflated = top * top + scaled_tail[..., None]

    mask = xp.logical_and(deflated > 0.0, xp.logical_not(noise[..., :k]))
    new_basis = p * xp.astype(mask, dtype)[..., None, :]
    new_sigma = xp.where(mask, deflated * scale[..., None], xp.zeros_like(deflated))
    if relative_eps:
        eps_abs = eps * xp.max(undeflated, axis=-1)
    else:
        eps_abs = eps / (scale * scale)
    shift = eps_abs + delta / (scale * scale)
    unscale = scale ** (2.0 * exponent)
    weights = _masked_power(xp, undeflated + shift[..., None], mask, exponent) * unscale[..., None]
    present = (new_rho + delta) > 0.0
    if noise_is_mass and k < r:
        present = xp.logical_or(present, s[..., 0] > 0.0)
    mass = scaled_tail + shrink * shrink + shift
    complement = _masked_power(xp, mass, xp.logical_and(present, mass > 0.0), exponent) * unscale

    new = {
        "basis": new_basis,
        "singular_values": new_sigma,
        "escaped_mass": new_rho,
        "basis_weights": weights,
        "complement_weight": complement,
    }
    ok = xp.logical_and(input_ok, xp.all(xp.isfinite(p), axis=(-2, -1)))
    ok = xp.logical_and(ok, xp.all(xp.isfinite(s), axis=-1))
    ok = xp.logical_and(ok, xp.all(xp.isfinite(weights), axis=-1))
    ok = xp.logical_and(ok, xp.isfinite(complement))
    ok = xp.logical_and(ok, xp.isfinite(new_rho))
    # Never let a failed decomposition poison the sketch (specs README rule 5, deviation K4).
    new = {
        key: xp.where(xp.reshape(ok, ok.shape + (1,) * (value.ndim - ok.ndim)), value, sketch[key])
        for key, value in new.items()
    }
    return new, ok


def fd_apply(xp: Any, sketch: dict[str, Array], x: Array) -> Array:
    r""":math:`U \operatorname{diag}(w) U^\top x + w_\perp (x - U U^\top x)` for ``x`` of shape (..., d, n).

    :math:`O(d k n)` flops and :math:`O(k n)` extra memory; equal to
    :math:`(\bar G + \rho I + \epsilon I)^a x` (F-I7) when every retained direction is nonzero.
    Leading dimensions are a stack of sketches, as in :func:`fd_update`.
    """
    basis = sketch["basis"]
    coords = xp.matmul(basis.mT, x)
    complement_weight = sketch["complement_weight"][..., None, None]
    # U (diag(w) - w_perp) U^T x + w_perp x: one product with U less than the formula above.
    scaled = coords * (sketch["basis_weights"][..., :, None] - complement_weight)
    return xp.matmul(basis, scaled) + complement_weight * x


def fd_covariance(xp: Any, sketch: dict[str, Array], *, with_tail: bool = False) -> Array:
    r"""The dense :math:`\bar G = U \operatorname{diag}(\sigma^2) U^\top` (plus :math:`\rho I`).

    O(d^2): for tests and for users validating their own sketch, never used by the optimizers.
    """
    basis, sigma = sketch["basis"], sketch["singular_values"]
    cov = xp.matmul(basis * (sigma * sigma)[..., None, :], basis.mT)
    if with_tail:
        d = basis.shape[-1 - 1]
        eye = xp.eye(d, dtype=basis.dtype, device=array_device(basis))
        cov = cov + sketch["escaped_mass"][..., None, None] * eye
    return cov
