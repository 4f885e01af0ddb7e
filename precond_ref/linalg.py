"""Shared numerics: inverse roots, batched damped solves, symmetrisation, damping.

Every function takes its array namespace from its inputs and runs unchanged on NumPy, CuPy,
PyTorch, JAX and ``array_api_strict``. Decompositions run in float32/float64 only (specs README,
rule 3); numerical failure is detected with ``isfinite``, never with ``try``/``except`` (rule 5).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device as array_device

Array = Any

__all__ = [
    "damped_inverse",
    "damped_solve",
    "damped_inverse_init",
]


# --------------------------------------------------------------------------------------------
# Batched damped inverses / solves of many small SPD blocks (MBF's mini-blocks; usable by any
# method whose curvature is a stack of independent damped matrices).
#
# ``matrices`` is a stack (..., n, n) of symmetric positive semi-definite statistics F_b; these
# helpers work on A_b = F_b + damping * I, which is positive definite for damping > 0. One call
# handles the whole stack (batched LAPACK/cuSOLVER), which is what keeps thousands of k^2 x k^2
# conv blocks cheap; per-block eigendecompositions would cost about ten times more.


def _symmetric_part(xp: Any, a: Array) -> Array:
    return (a + a.mT) * 0.5


def _identity_like(xp: Any, matrices: Array) -> Array:
    n = matrices.shape[-1]
    return xp.eye(n, dtype=matrices.dtype, device=array_device(matrices))


def _blockwise_finite(xp: Any, x: Array) -> Array:
    """(...,) bool: is every entry of each trailing (n, m) block finite?"""
    return xp.all(xp.isfinite(x), axis=(-2, -1))


def damped_inverse_init(matrices: Array, damping: Any) -> Array:
    """``I / damping`` stacked like ``matrices``: the inverse of ``0 + damping*I``.

    The value a stored inverse holds before its first successful refresh.
    """
    xp = array_namespace(matrices)
    eye = _identity_like(xp, matrices) / damping
    return xp.broadcast_to(eye, matrices.shape) + xp.zeros_like(matrices)


def damped_inverse(
    matrices: Array,
    damping: Any,
    previous: Array,
    failures: Array,
    *,
    symmetrize: bool = True,
) -> tuple[Array, Array]:
    r"""Batched :math:`(F_b + \lambda I)^{-1}` with a fallback to the previous inverse.

    Parameters
    ----------
    matrices:
        (..., n, n) stack of symmetric PSD statistics :math:`F_b` (float32 or float64).
    damping:
        :math:`\lambda > 0`, a Python number or a 0-D array.
    previous:
        (..., n, n) the inverses currently in use; a block whose new inverse is not finite keeps
        its previous value.
    failures:
        0-D integer counter; incremented by one when any block of this call failed.
    symmetrize:
        Form :math:`\mathrm{sym}(F_b) + \lambda I` and symmetrise the computed inverse (the
        default; specs README rule 4). ``False`` inverts :math:`F_b + \lambda I` exactly as given,
        as reference code that calls a plain ``inverse`` does.

    Returns
    -------
    (inverse, failures)
        The new stack of inverses and the updated counter.
    """
    xp = array_namespace(matrices, previous)
    if symmetrize:
        matrices = _symmetric_part(xp, matrices)
    eye = _identity_like(xp, matrices)
    # A non-finite block is replaced by I before the call: inv maps Inf entries to finite
    # garbage (inv([[inf, 0], [0, 1]]) = [[0, 0], [0, 1]]) and NaN may make NumPy/torch raise.
    finite_in = _blockwise_finite(xp, matrices)
    damped = xp.where(finite_in[..., None, None], matrices + damping * eye, eye)
    inverse = xp.linalg.inv(damped)
    if symmetrize:
        inverse = _symmetric_part(xp, inverse)
    ok = xp.logical_and(finite_in, _blockwise_finite(xp, inverse))
    inverse = xp.where(ok[..., None, None], inverse, previous)
    failed = xp.astype(xp.logical_not(xp.all(ok)), failures.dtype)
    return inverse, failures + failed


def damped_solve(
    matrices: Array,
    damping: Any,
    rhs: Array,
    *,
    symmetrize: bool = True,
) -> tuple[Array, Array]:
    r"""Batched solve :math:`(F_b + \lambda I) X_b = B_b`, one call for the whole stack.

    Parameters
    ----------
    matrices:
        (..., n, n) stack of symmetric PSD :math:`F_b`.
    damping:
        :math:`\lambda` (a number or 0-D array); :math:`F_b + \lambda I` must be nonsingular.
    rhs:
        (..., n, k) right-hand sides, broadcast against ``matrices`` in the batch axes.
    symmetrize:
        Solve with :math:`\mathrm{sym}(F_b)` (default).

    Returns
    -------
    (solution, ok)
        ``solution`` (..., n, k) with non-finite blocks (a failed solve) replaced by zeros, and
        ``ok`` (...,) bool marking the blocks whose solve was finite.
    """
    xp = array_namespace(matrices, rhs)
    if symmetrize:
        matrices = _symmetric_part(xp, matrices)
    eye = _identity_like(xp, matrices)
    finite_in = _blockwise_finite(xp, matrices)
    damped = xp.where(finite_in[..., None, None], matrices + damping * eye, eye)
    solution = xp.linalg.solve(damped, rhs)
    ok = xp.logical_and(finite_in, _blockwise_finite(xp, solution))
    solution = xp.where(ok[..., None, None], solution, xp.zeros_like(solution))
    return solution, ok
