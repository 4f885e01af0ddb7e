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
]

Array = Any

SKETCH_KEYS = ("basis", "singular_values", "escaped_mass", "basis_weights", "complement_weight")
_DECOMPOSITIONS = ("svd", "gram", "qr_svd")


def fd_init(xp: Any, d: int, k: int, *, dtype: Any, device: Any) -> dict[str, Array]:
    """An empty sketch of an axis of length ``d`` keeping ``k <= d`` directions (all zeros)."""
    if not 1 <= k <= d:
        raise ValueError(f"sketch rank k must be in [1, d] = [1, {d}], got {k}")
    return {
        "basis": xp.zeros((d, k), dtype=dtype, device=device),
        "singular_values": xp.zeros((k,), dtype=dtype, device=device),
        "escaped_mass": xp.zeros((), dtype=dtype, device=device),
        "basis_weights": xp.zeros((k,), dtype=dtype, device=device),
        "complement_weight": xp.zeros((), dtype=dtype, device=device),
    }


def shrink_cutoff_tolerance(xp: Any, dtype: Any, decomposition: str = "svd") -> float:
    """Relative level below which a singular value of the FD step is rounding noise (K3).

    For the SVD, singular values carry an absolute error of a few unit roundoffs times the
    largest one, so :math:`c \\le 10 u\\, s_0` is treated as 0. The Gram path squares the matrix:
    its eigenvalues carry :math:`u\\, s_0^2`, i.e. singular values :math:`\\sqrt{u}\\, s_0`, so the
    test is :math:`c^2 \\le 10 u\\, s_0^2`.
    """
    unit_roundoff = float(xp.finfo(dtype).eps) / 2.0
    if decomposition == "gram":
        return math.sqrt(10.0 * unit_roundoff)
    return 10.0 * unit_roundoff


def _descending_left_singular(xp: Any, z: Array, decomposition: str) -> tuple[Array, Array]:
    """Left singular vectors P (d, r) and singular values s (r,), descending, of z (d, n)."""
    d, n = z.shape
    if decomposition == "svd":
        p, s, _ = xp.linalg.svd(z, full_matrices=False)
        return p, s
    if decomposition == "qr_svd":
        # The authors' order of operations: R from a QR of z^T, then the SVD of R^T. A no-op
        # mathematically, but it decides whether a rounding-level shrink value comes out as exactly
        # 0 or as ~1e-7 s_0, which faithful mode must reproduce (see deviation K3).
        _, r_factor = xp.linalg.qr(z.mT)
        p, s, _ = xp.linalg.svd(r_factor.mT, full_matrices=False)
        return p, s
    # Gram path (K7): eigh of the smaller Gram matrix; cheaper when n << d, but squares the
    # condition number, so directions at rounding level are dropped (set to zero).
    tiny_rel = float(xp.finfo(z.dtype).eps) * max(d, n)
    if n < d:
        gram = xp.matmul(z.mT, z)
        gram = (gram + gram.mT) / 2.0
        evals, v = xp.linalg.eigh(gram)
        evals, v = xp.flip(evals, axis=0), xp.flip(v, axis=1)
        evals = xp.maximum(evals, xp.zeros_like(evals))
        keep = evals > tiny_rel * evals[0]
        s = xp.where(keep, xp.sqrt(evals), xp.zeros_like(evals))
        safe_s = xp.where(keep, s, xp.ones_like(s))
        p = xp.matmul(z, v) / safe_s * xp.astype(keep, z.dtype)
        return p, s
    gram = xp.matmul(z, z.mT)
    gram = (gram + gram.mT) / 2.0
    evals, p = xp.linalg.eigh(gram)
    evals, p = xp.flip(evals, axis=0), xp.flip(p, axis=1)
    evals = xp.maximum(evals, xp.zeros_like(evals))
    return p, xp.sqrt(evals)


def _masked_power(xp: Any, base: Array, mask: Array, exponent: float) -> Array:
    """``base ** exponent`` where ``mask``, else 0, never forming ``0 ** negative`` (no Inf)."""
    safe = xp.where(mask, base, xp.ones_like(base))
    return xp.where(mask, safe**exponent, xp.zeros_like(base))


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
    decomposition: str = "svd",
) -> tuple[dict[str, Array], Array]:
    r"""One FD step: add ``x @ x.T`` (``x`` of shape (d, m)) to the decayed sketch, refresh weights.

    Parameters
    ----------
    sketch:
        The state of :func:`fd_init` or a previous :func:`fd_update`.
    x:
        The new statistic's factor, (d, m); cast to the sketch dtype.
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
        (deviation K3, :func:`shrink_cutoff_tolerance`).
    decomposition:
        ``"svd"`` (thin SVD of the d x (k+m) factor), ``"qr_svd"`` (the same after a QR of the
        factor's transpose, the authors' order of operations) or ``"gram"`` (eigh of the smaller
        Gram matrix).

    Returns
    -------
    (new_sketch, ok)
        ``ok`` is a 0-D bool array, False when ``x`` or the decomposition is not finite; the
        previous sketch is then returned unchanged (the caller counts the failure).
    """
    if decomposition not in _DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {_DECOMPOSITIONS}, got {decomposition!r}")
    basis, sigma, rho = sketch["basis"], sketch["singular_values"], sketch["escaped_mass"]
    dtype = basis.dtype
    d, k = basis.shape
    if x.ndim != 2 or x.shape[0] != d:
        raise ValueError(f"FD update expects x of shape ({d}, m), got {tuple(x.shape)}")
    x = xp.astype(x, dtype)
    # NumPy and torch raise inside the SVD on NaN/Inf (JAX returns NaN): feed zeros instead and
    # discard the result, so a non-finite input never reaches the decomposition or the state.
    input_ok = xp.all(xp.isfinite(x))
    x = xp.where(input_ok, x, xp.zeros_like(x))
    gamma = decay if tail_decay is None else tail_decay

    # Hyperparameters may be arrays (e.g. injected by optax): no Python branching on their values.
    factor = basis * (sigma * decay**0.5)
    z = xp.concat([factor, x], axis=1)
    p, s = _descending_left_singular(xp, z, decomposition)
    r = s.shape[0]

    zero = xp.zeros((), dtype=dtype, device=array_device(s))
    if cutoff:
        # Singular values at rounding level are 0: this keeps rho' (and w_perp) exactly 0 and
        # rank-deficient directions masked until real mass arrives.
        tol = shrink_cutoff_tolerance(xp, dtype, decomposition)
        s = xp.where(s <= tol * s[0], xp.zeros_like(s), s)
    shrink = xp.maximum(s[k], zero) if k < r else zero
    top = xp.maximum(s[:k], zero)
    deflated = xp.sqrt(xp.maximum(top - shrink, zero)) * xp.sqrt(top + shrink)
    kept_tail = rho * gamma
    new_rho = kept_tail + shrink * shrink
    # sigma'^2 + rho' computed directly, not by subtracting c^2 and adding it back.
    undeflated = top * top + kept_tail

    mask = deflated > 0.0
    new_basis = p[:, :k] * xp.astype(mask, dtype)
    new_sigma = xp.where(mask, deflated, xp.zeros_like(deflated))
    eps_abs = eps * xp.max(undeflated) if relative_eps else eps
    weights = _masked_power(xp, undeflated + eps_abs + delta, mask, exponent)
    mass = new_rho + delta
    complement = _masked_power(xp, mass + eps_abs, mass > 0.0, exponent)

    new = {
        "basis": new_basis,
        "singular_values": new_sigma,
        "escaped_mass": new_rho,
        "basis_weights": weights,
        "complement_weight": complement,
    }
    ok = xp.logical_and(input_ok, xp.all(xp.isfinite(p)))
    ok = xp.logical_and(ok, xp.all(xp.isfinite(s)))
    ok = xp.logical_and(ok, xp.all(xp.isfinite(weights)))
    ok = xp.logical_and(ok, xp.all(xp.isfinite(complement)))
    # Never let a failed decomposition poison the sketch (specs README rule 5, deviation K4).
    new = {key: xp.where(ok, value, sketch[key]) for key, value in new.items()}
    return new, ok


def fd_apply(xp: Any, sketch: dict[str, Array], x: Array) -> Array:
    r""":math:`U \operatorname{diag}(w) U^\top x + w_\perp (x - U U^\top x)` for ``x`` of shape (d, n).

    :math:`O(d k n)` flops and :math:`O(k n)` extra memory; equal to
    :math:`(\bar G + \rho I + \epsilon I)^a x` (F-I7) when every retained direction is nonzero.
    """
    basis = sketch["basis"]
    weights = sketch["basis_weights"]
    coords = xp.matmul(basis.mT, x)
    scaled = coords * xp.reshape(weights, (weights.shape[0], 1))
    low_rank = xp.matmul(basis, scaled)
    complement = x - xp.matmul(basis, coords)
    return low_rank + sketch["complement_weight"] * complement


def fd_covariance(xp: Any, sketch: dict[str, Array], *, with_tail: bool = False) -> Array:
    r"""The dense :math:`\bar G = U \operatorname{diag}(\sigma^2) U^\top` (plus :math:`\rho I`).

    O(d^2): for tests and for users validating their own sketch, never used by the optimizers.
    """
    basis, sigma = sketch["basis"], sketch["singular_values"]
    cov = xp.matmul(basis * (sigma * sigma), basis.mT)
    if with_tail:
        d = basis.shape[0]
        cov = cov + sketch["escaped_mass"] * xp.eye(d, dtype=basis.dtype, device=array_device(basis))
    return cov
