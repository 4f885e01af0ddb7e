r"""Oracles: slow, plain computations to check fast ones against.

None of these runs inside an optimizer. Each computes, from its definition, a quantity that the
optimizers' own numerics (:mod:`precond_ref.linalg`, :mod:`precond_ref.sketch`) only approximate
or reach by another route, so that a test, or a user validating their own implementation, can
compare the two:

* :func:`inverse_root_residual`: how far a matrix :math:`Z` is from :math:`(A + sI)^{-1/p}`;
* :func:`damped_inverse_residual`: how far a stack :math:`X_b` is from
  :math:`(\operatorname{sym}(F_b) + \lambda I)^{-1}`;
* :func:`damped_solve`: :math:`(F_b + \lambda I)^{-1} B_b` by a solve instead of an inverse;
* :func:`fd_covariance`: the dense matrix that a Frequent Directions sketch stands for.

Each works in the namespace of its input, on a matrix or a stack of them (leading ``...`` axes).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from .._backend import as_operand, placement
from ..linalg import identity_like, per_matrix, symmetrize

__all__ = ["inverse_root_residual", "damped_inverse_residual", "damped_solve", "fd_covariance"]

Array = Any


def inverse_root_residual(a: Array, root: Array, p: int, *, shift: Any = 0.0) -> Array:
    r""":math:`\|Z^p (A + sI) - I\|_F` per matrix, shape ``a.shape[:-2]`` (``p`` matmuls).

    An upper bound on the largest :math:`|\lambda_i(Z^p(A + sI)) - 1|`, whatever produced
    :math:`Z` (``root``); NaN or Inf for a non-finite :math:`Z`. In floating point it carries a
    rounding error of about :math:`\varepsilon\,\kappa\sqrt k` (condition number :math:`\kappa`),
    so it validates roots of well-conditioned matrices; :func:`precond_ref.linalg.inverse_root`
    checks the iterations' own convergence instead. ``shift`` is a number or an array of the batch
    shape ``a.shape[:-2]``.
    """
    xp = array_namespace(a, root)
    eye = identity_like(a)
    s = as_operand(xp, shift, a.dtype)
    if hasattr(s, "shape"):
        s = s[..., None, None]
    product = xp.matmul(root, a + s * eye)
    for _ in range(p - 1):
        product = xp.matmul(root, product)
    return xp.linalg.matrix_norm(product - eye, ord="fro")


def damped_inverse_residual(matrices: Array, damping: Any, inverse: Array) -> Array:
    r"""Per block :math:`\|(\operatorname{sym}(F_b) + \lambda I) X_b - I\|_F / \sqrt n`, shape ``(...,)``.

    A backward-stable inverse has residual about :math:`n\varepsilon\,\kappa(F_b+\lambda I)`, so a
    residual of order 1e-2 or more means the damping was lost to rounding (see
    :func:`precond_ref.linalg.damped_inverse_stable`); non-finite input gives a non-finite residual. One
    matmul per block.
    """
    xp = array_namespace(matrices, inverse)
    n = matrices.shape[-1]
    product = xp.matmul(symmetrize(matrices), inverse) + damping * inverse - identity_like(inverse)
    return xp.linalg.matrix_norm(product, ord="fro") / math.sqrt(n)


def damped_solve(matrices: Array, damping: Any, rhs: Array) -> Array:
    r"""Batched solve :math:`(\operatorname{sym}(F_b) + \lambda I) X_b = B_b`, one call for the whole stack.

    The route that :func:`precond_ref.linalg.damped_inverse_stable` (an inverse, then a product) replaces:
    the two agree to rounding wherever :math:`F_b + \lambda I` is well conditioned. ``matrices``
    (..., n, n) symmetric PSD, ``damping`` a number or 0-D array with :math:`F_b + \lambda I`
    nonsingular, ``rhs`` (..., n, k) broadcast against ``matrices`` in the batch axes; returns
    :math:`X` (..., n, k). No fallback: a singular or non-finite block gives what the backend's
    ``solve`` gives (an exception, or non-finite entries).
    """
    xp = array_namespace(matrices, rhs)
    damped = symmetrize(matrices) + damping * identity_like(matrices)
    return per_matrix(xp, xp.linalg.solve, damped, rhs)


def fd_covariance(xp: Any, sketch: dict[str, Array], *, with_tail: bool = False) -> Array:
    r"""The dense :math:`\bar G = U \operatorname{diag}(\sigma^2) U^\top` of a Frequent Directions
    sketch (:func:`precond_ref.sketch.fd_init`), plus :math:`\rho^2 I` with ``with_tail``.

    O(d²) memory: what the sketch's O(dk) state stands for, for comparing two sketches (or a sketch
    with the exact covariance) as matrices.
    """
    basis, sigma = sketch["basis"], sketch["singular_values"]
    cov = xp.matmul(basis * (sigma * sigma)[..., None, :], basis.mT)
    if with_tail:
        d = basis.shape[-1 - 1]
        eye = xp.eye(d, dtype=basis.dtype, device=placement(xp, basis))
        root = sketch["escaped_root"][..., None, None]
        cov = cov + (root * root) * eye
    return cov
