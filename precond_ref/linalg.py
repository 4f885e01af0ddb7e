r"""Shared matrix numerics: symmetrisation, inverse matrix roots of symmetric PSD matrices, a
direction renormalised to a fixed RMS at any scale.

Every function takes its namespace from its input, works on a matrix ``(k, k)`` or a batch
``(..., k, k)``, and computes in the input's dtype (callers cast to float32/float64 first: no
backend decomposes bf16/fp16). Nothing here raises on numerical failure; callers test the output
with ``xp.all(xp.isfinite(...))`` (specs README, rule 5).

Reference:

* :func:`inverse_root_eigh`: symmetrise, ``eigh``, clamp eigenvalues
  at a floor, add a shift, apply the power to the eigenvalues. Exact up to rounding; the oracle of
  every iterative root.

Batched damped inverses and solves of many small SPD blocks (:func:`damped_inverse`,
:func:`damped_inverse_stable`): one batched call for a whole stack, with a
finiteness fallback and, in :func:`damped_inverse_stable`, a damping floor at the precision of the
statistic (branch-free: no host synchronisation).

Iterative roots (matmul only, fixed step counts, so they jit and run on GPUs without host syncs):

* :func:`inverse_sqrt_polar_express`: the coupled Polar-Express iteration of the ASGO code
  (An et al. 2025, ``optimizers/utils/matrix_decom.py``), coefficients from Amsel et al. 2025.
* :func:`inverse_sqrt_newton_schulz`: the coupled Newton–Schulz iteration with the fixed
  polynomial :math:`(a, b, c) = (2, -3/2, 1/2)` of the ASGO code.
* :func:`inverse_root` with ``method="newton"``: the coupled inverse Newton iteration for
  :math:`A^{-1/p}` used by Shampoo implementations (Guo and Higham 2006; ASGO code
  ``_matrix_inverse_root_newton``).

Accuracy (8×8 SPD, float32, 10 steps, relative Frobenius error versus float64 eigh; spec
``asgo.md`` I14): Polar-Express 2.4e-7, 9.4e-7, 2.9e-5, 1.1e-3 and Newton–Schulz 7e-16, 1.8e-7,
2.5e-5, 1.8e-1 at condition numbers 1, 1e2, 1e4, 1e6. Both are accurate on the top eigen-direction
(≤ 6e-6) whatever the conditioning: the error sits in the smallest eigenvalues.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional, Sequence, Union

from array_api_compat import is_jax_namespace

from .blocking import roll_first_axis_last, stack, unstack
from ._backend import (
    array_device, as_operand, cast, computed_once, cond_under_cpu_jit, constant, float64_where_available, is_number,
    is_torch_namespace, is_tracer, is_zero, iterate, namespace_of, number, on_cpu, placement, select, sum_across,
    torch_compiling, widened_dtype, widening,
)

Array = Any
# A Python number, or an array broadcastable to the batch shape of the matrices (one value each).
Shift = Union[float, Array]


def symmetrize(a: Array) -> Array:
    """:math:`(A + A^\\top)/2` over the last two axes.

    Backends disagree on non-symmetric input to ``eigh`` (JAX symmetrises silently, NumPy and torch
    read one triangle), so every decomposition here starts from this.
    """
    return (a + a.mT) / 2.0


def eigh_widened(a: Array) -> tuple[Array, Array]:
    """``eigh(A)`` (eigenvalues ascending, eigenvectors), computed in float64 where the backend has
    it and returned in ``a``'s dtype: for the small Rayleigh-Ritz matrices of a subspace step
    (a few hundred rows), where a float32 LAPACK ``ssyevd`` can fail to converge. torch's CPU build
    (MKL 2024.2) raised on two such matrices of Sketchy's subspace step: one whose zero block held
    subnormal rounding noise (a cold step on an embedding gradient with 17 nonzero rows of 1024),
    and, with one thread, a 288 x 288 one with 196 eigenvalues at rounding level, whose copy scaled
    by 1024 decomposed. Both decompose in float64, as NumPy (which computes float32 ``eigh`` in
    float64) and JAX took them; the result is also accurate to float32's last bit. JAX without x64
    computes it in float64 too, within a :func:`~precond_ref._backend.widening` block.
    """
    xp = namespace_of(a)
    with widening(xp, a) as wide:
        if wide is None or a.dtype == wide:
            return per_matrix(xp, xp.linalg.eigh, a)
        values, vectors = per_matrix(xp, xp.linalg.eigh, xp.astype(a, wide))
        return xp.astype(values, a.dtype), xp.astype(vectors, a.dtype)


#: The orders at which torch decomposes a float32 matrix on CUDA with cuSOLVER's Jacobi ``syevj``
#: (above, ``syevd``; at most 32 in a batch, ``syevjBatched``), as profiled in docs/performance-archive.md.
CUDA_JACOBI_EIGH_ORDERS = range(33, 513)


def _cuda_float32(xp: Any, a: Array) -> bool:
    """Whether ``a`` is a float32 torch tensor on a CUDA device."""
    return is_torch_namespace(xp) and a.dtype == xp.float32 and getattr(a.device, "type", None) == "cuda"


def _reduced_svd(xp: Any) -> Any:
    """``svd(m, full_matrices=False)`` of ``xp`` as a one-argument function (for :func:`per_matrix`)."""
    return lambda m: xp.linalg.svd(m, full_matrices=False)


def symmetric_eigh(a: Array) -> tuple[Array, Array]:
    """``xp.linalg.eigh(a)``: eigenvalues ascending and eigenvectors of (stacks of) symmetric ``a``,
    by the faster exact route of ``a``'s device.

    A float32 tensor on CUDA of an order in :data:`CUDA_JACOBI_EIGH_ORDERS` is decomposed in
    float64 (:func:`eigh_widened`), which cuSOLVER computes by ``syevd``: faster than the float32
    Jacobi ``syevj`` torch picks there (docs/performance-archive.md), and more accurate. Everywhere else ``eigh``
    as it is (on a CPU float32 ``ssyevd`` is the faster; JAX's and CuPy's GPU routes unmeasured).
    """
    xp = namespace_of(a)
    if _cuda_float32(xp, a) and a.shape[-1] in CUDA_JACOBI_EIGH_ORDERS:
        return eigh_widened(a)
    return per_matrix(xp, xp.linalg.eigh, a)


def _svd_by_float64_gram(xp: Any, a: Array) -> bool:
    """Whether :func:`left_singular` takes ``a``'s float64 Gram: ``a`` is float32 and its backend
    computes float64 (:func:`~precond_ref._backend.widened_dtype`: JAX without x64 too)."""
    return a.dtype == xp.float32 and widened_dtype(xp, a) is not None


def left_singular(a: Array) -> tuple[Array, Array]:
    """``(W, s)``, the left singular vectors and the singular values (descending) of the thin SVD
    ``a = W diag(s) V^T`` of (stacks of) ``a`` with no more rows than columns: ``W, s, _ =
    svd(a, full_matrices=False)``.

    A float32 ``a`` whose backend has float64 takes the eigenpairs of its Gram ``a a^T`` formed and
    decomposed in float64 (``s = sqrt(max(lambda, 0))``), returned in float32. As accurate as the
    float32 SVD: the float64 Gram's rounding, a few ``u64 s_0^2``, stays below the float32 SVD's
    own error on ``s^2`` (``u32 s s_0``) down to ``s`` of a few ``u32 s_0`` (``u64 < u32^2``), where
    both are noise; ``W`` is orthonormal to float64 before its rounding to float32. And faster on
    every device measured: on CUDA torch's float32 ``svd`` is cuSOLVER's Jacobi ``gesvdj``, the
    slower (docs/performance-archive.md); on a CPU LAPACK's float32 ``gesdd`` is slower too
    (docs/methods/sketchy.md, "Long axes, intervals and cost"); on JAX without x64, whose GPU
    float32 ``svd`` is the slowest of these (docs/performance.md), within a
    :func:`~precond_ref._backend.widening` block. Elsewhere (float64 data, a backend without
    float64) the SVD as it is.
    """
    xp = namespace_of(a)
    if not _svd_by_float64_gram(xp, a):
        w, s, _ = per_matrix(xp, _reduced_svd(xp), a)
        return w, s
    with widening(xp, a) as float64:
        wide = xp.astype(a, float64)
        vectors, s = descending_singular(xp, *per_matrix(xp, xp.linalg.eigh, symmetrize(xp.matmul(wide, wide.mT))))
        return xp.astype(vectors, a.dtype), xp.astype(s, a.dtype)


def descending_singular(xp: Any, values: Array, vectors: Array) -> tuple[Array, Array]:
    """``(W, s)``, ``s`` descending, from the eigenpairs ``(lambda, W)`` (ascending, as ``eigh``
    gives them) of a Gram ``a a^T``: its left singular vectors and ``s = sqrt(max(lambda, 0))``."""
    values, vectors = xp.flip(values, axis=-1), xp.flip(vectors, axis=-1)
    return vectors, xp.sqrt(xp.maximum(values, number(xp, 0.0, values)))


def per_matrix(xp: Any, decomposition: Any, *operands: Array) -> Any:
    """``decomposition(*operands)``, a LAPACK call on stacks of matrices (``xp.linalg.eigh``,
    ``svd``, ``qr``, ``inv``, ``solve``): under ``jax.jit`` on a CPU with jaxlib < 0.11, one matrix
    at a time (``lax.map`` over the flattened batch), else as it is.

    jaxlib 0.10's CPU LAPACK kernels spread a batch over XLA's intra-op thread pool and wait for it
    from a thread of that pool; when XLA runs as many batched decompositions at once as the pool
    has threads (independent blocks of one step: 2 on a 2-core CPU), every thread waits and the
    step never ends (seen with eigh, svd, inv and solve; jaxlib 0.11 no longer does this). One
    matrix at a time gives each call a single matrix, which runs on the calling thread, and the
    same LAPACK routine gives the same numbers. Each operand is a stack of matrices whose batch
    axes broadcast against the first's.
    """
    a = operands[0]
    waits = (a.ndim > 2 and is_jax_namespace(xp) and is_tracer(a)  # traced only: an eager call runs alone
             and sys.modules["jax"].default_backend() == "cpu"
             and tuple(int(part) for part in sys.modules["jaxlib"].__version__.split(".")[:2]) < (0, 11))
    if not waits:
        return decomposition(*operands)
    jax = sys.modules["jax"]
    batch = tuple(a.shape[:-2])
    flat = tuple(xp.reshape(xp.broadcast_to(x, batch + tuple(x.shape[-2:])), (-1,) + tuple(x.shape[-2:])) for x in operands)
    out = jax.lax.map(lambda one: decomposition(*one), flat)
    return jax.tree_util.tree_map(lambda x: xp.reshape(x, batch + tuple(x.shape[1:])), out)


def inverse(xp: Any, a: Array, *, symmetric_positive_definite: bool = False) -> Array:
    """:math:`A^{-1}` for a stack of square matrices ``(..., k, k)`` by LU (through
    :func:`per_matrix`). A matrix whose LU has an exactly zero pivot gives non-finite entries on
    torch and JAX; NumPy raises ``LinAlgError`` for the whole call.

    On torch, ``torch.linalg.inv_ex`` with the blocks whose LAPACK/cuSOLVER ``info`` is non-zero set
    to NaN on the device. ``torch.linalg.inv`` instead reads ``info`` on the host to raise on a
    singular matrix (its ``aten::_linalg_check_errors``): on a GPU a synchronisation in every call,
    which also makes the step impossible to capture in a CUDA graph. JAX's ``inv`` returns
    non-finite entries for a singular matrix by itself.

    ``symmetric_positive_definite=True`` is the caller's promise that every matrix is symmetric
    positive definite. A torch tensor on a CUDA device is then inverted by Cholesky
    (:func:`spd_inverse`), which can be captured in a CUDA graph: torch's CUDA LU of a stack of
    matrices of order above 16 (more than 16 of them, or of order above 128) is MAGMA's batched
    ``getrf``, which cannot. Everywhere else the flag changes nothing (LU, bit for bit as without
    it).
    """
    if is_torch_namespace(xp):
        if symmetric_positive_definite and getattr(a.device, "type", None) == "cuda":
            return spd_inverse(xp, a)
        return per_matrix(xp, _torch_inverse_without_host_check, a)
    return per_matrix(xp, xp.linalg.inv, a)


def spd_inverse(xp: Any, a: Array) -> Array:
    r""":math:`A^{-1}` for a stack of symmetric positive definite matrices ``(..., k, k)`` by
    Cholesky: :math:`A = L L^\top`, :math:`A^{-1} = L^{-\top} L^{-1}` (``cholesky_inverse``).

    On torch, ``torch.linalg.cholesky_ex`` (cuSOLVER ``potrf`` / ``potrfBatched`` on CUDA, LAPACK
    on a CPU; the status stays on the device), :math:`X = L^{-1}` by ``torch.linalg.solve_triangular``
    (cuBLAS ``trsm`` / ``trsmBatched``) and the product :math:`X^\top X`: no step reads the host,
    so the call can be captured in a CUDA graph, which torch's batched LU of larger stacks
    (MAGMA's ``getrf``, :func:`inverse`) cannot. ``torch.cholesky_inverse`` would do the
    last two steps in one call but checks its status on the host. Only the lower triangle of
    :math:`A` is read. A matrix whose Cholesky fails (``info != 0``: not positive definite in the
    working precision) gives NaN, as :func:`inverse` gives for a singular one, so a caller's
    finiteness test rejects that block alone. The result is symmetric positive semi-definite up to
    the rounding of the product; its error is that of the LU inverse, a few
    :math:`k\,\varepsilon\,\kappa(A)` relative.

    Other namespaces have no triangular solve in the array API: there, :func:`inverse` (LU).
    """
    if not is_torch_namespace(xp):
        return inverse(xp, a)
    torch = sys.modules["torch"]
    factor, info = torch.linalg.cholesky_ex(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    factor_inverse = torch.linalg.solve_triangular(factor, eye, upper=False)  # X = L^-1
    result = factor_inverse.mT @ factor_inverse  # A^-1 = L^-T L^-1
    return torch.where((info == 0)[..., None, None], result, math.nan)


def _torch_inverse_without_host_check(a: Array) -> Array:
    torch = sys.modules["torch"]
    result, info = torch.linalg.inv_ex(a)
    return torch.where((info == 0)[..., None, None], result, math.nan)



def identity_like(a: Array) -> Array:
    """The ``(k, k)`` identity in ``a``'s dtype and device (broadcasts against a batch)."""
    xp = namespace_of(a)
    return xp.eye(a.shape[-1], dtype=a.dtype, device=placement(xp, a))


def trace(a: Array) -> Array:
    """Trace over the last two axes, shape ``a.shape[:-2]``."""
    xp = namespace_of(a)
    return xp.sum(xp.linalg.diagonal(a), axis=-1)


def _batch_scalar(xp: Any, value: Shift, ref: Array, trailing: int) -> Any:
    """A per-matrix scalar (Python number or batch-shaped array) with ``trailing`` unit axes added."""
    value = as_operand(xp, value, ref.dtype)
    return value[(...,) + (None,) * trailing] if hasattr(value, "shape") else value


def inverse_root_eigh(a: Array, p: float = 2, *, shift: Shift = 0.0) -> Array:
    r"""The reference inverse p-th root :math:`(\operatorname{sym}(A)_{\ge 0} + sI)^{-1/p}` of a
    symmetric PSD matrix by ``eigh``.

    With :math:`\operatorname{sym}(A) = V \operatorname{diag}(w) V^\top`, returns
    :math:`V \operatorname{diag}\bigl((\max(w, 0) + s)^{-1/p}\bigr) V^\top`: eigenvalues below 0
    (rounding can make those of a PSD matrix slightly negative) are raised to 0 before the shift.

    Parameters
    ----------
    a:
        ``(..., k, k)``, float32 or float64; only its symmetric part is used.
    p:
        The root, ``> 0`` (``2`` for the inverse square root).
    shift:
        :math:`s \ge 0` added to the clamped eigenvalues (damping); a number or an array of the
        batch shape ``a.shape[:-2]``.
    """
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p!r}")
    xp = namespace_of(a)
    w, v = symmetric_eigh(symmetrize(a))
    w = xp.maximum(w, number(xp, 0.0, w)) + _batch_scalar(xp, shift, w, 1)
    return xp.matmul(v * xp.expand_dims(w ** (-1.0 / p), axis=-2), v.mT)


# --------------------------------------------------------------------------------------------
# Coupled polynomial iterations for A^{-1/2}.
#
# With Y_0 = A/nu and Z_0 = I, each step forms B = b (ZY) + c (ZY)^2 and sets
# Y <- a Y + Y B, Z <- a Z + B Z. All iterates are polynomials in A, so they commute; on an
# eigenvalue lambda, with x = sqrt(lambda/nu), Y/Z keeps the value x^2 and sqrt(Y Z) maps
# x -> a x + b x^3 + c x^5 (for Polar-Express and Newton-Schulz this drives x to 1). Hence
# Z -> (A/nu)^{-1/2} and the root is Z / sqrt(nu).

#: The Polar-Express (a, b, c) triples of the ASGO code, before the 1.01 safety margin.
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


#: The fixed (a, b, c) of the ASGO code's Newton–Schulz iteration.
NEWTON_SCHULZ_COEFFICIENTS = (2.0, -1.5, 0.5)


def polar_express_coefficients(steps: int) -> list[tuple[float, float, float]]:
    """The ``steps`` triples the ASGO code uses: the first seven divided by (1.01, 1.01³, 1.01⁵),
    the eighth as is and repeated beyond step 8; with ``steps < 8`` the first ``steps`` triples."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:-1]]
    safe.append(POLAR_EXPRESS_COEFFICIENTS[-1])
    return safe[:steps] + [safe[-1]] * (steps - len(safe))


def _coupled_inverse_sqrt(
    y: Array, nu: Array, coefficients: Sequence[tuple[float, float, float]]
) -> tuple[Array, Array, Array]:
    """Run the coupled iteration from Y_0 = ``y`` = A/``nu``, Z_0 = I; returns (Z/sqrt(nu), Z, Y)
    (the root of A, Z ≈ y^{-1/2}, ZY ≈ I)."""
    xp = namespace_of(y)
    z = xp.zeros_like(y) + identity_like(y)
    for a, b, c in coefficients:
        zy = xp.matmul(z, y)
        poly = b * zy + c * xp.matmul(zy, zy)
        y = a * y + xp.matmul(y, poly)
        z = a * z + xp.matmul(poly, z)
    return z / xp.sqrt(nu), z, y


def inverse_sqrt_polar_express(a: Array, steps: int = 10, *, eps: Shift = 0.0) -> Array:
    r""":math:`A^{-1/2}` by the coupled Polar-Express iteration of the ASGO code.

    :math:`\nu = 1.01\,\|A + \varepsilon I\|_F`, :math:`Y_0 = A/\nu` (``eps`` enters only the
    normaliser, as in the authors' ``_matrix_inverse_root_PolarExpress``), ``steps`` steps with
    :func:`polar_express_coefficients`, result :math:`Z/\sqrt\nu`. To root a damped matrix pass
    :math:`A + sI` and ``eps=0``.

    An exactly zero eigenvalue multiplies Z by :math:`a_j` at every step (null-space gain
    :math:`\prod_j a_j \approx 2.237\times10^4` for 10 steps); a slightly negative one is amplified
    further and can overflow. Damp rank-deficient input.

    Parameters
    ----------
    a:
        Symmetric PSD ``(..., k, k)``, float32 or float64 (the authors run float32).
    steps:
        Number of iterations (the authors use 10).
    eps:
        Absolute term inside the normaliser only; a number or a batch-shaped array.
    """
    xp = namespace_of(a)
    shifted = a if is_zero(eps) else a + _batch_scalar(xp, eps, a, 2) * identity_like(a)
    nu = 1.01 * xp.linalg.matrix_norm(shifted, ord="fro", keepdims=True)
    return _coupled_inverse_sqrt(a / nu, nu, polar_express_coefficients(steps))[0]


def inverse_sqrt_newton_schulz(a: Array, steps: int = 10, *, eps: Shift = 0.0) -> Array:
    r""":math:`A^{-1/2}` by the coupled Newton–Schulz iteration of the ASGO code.

    :math:`Y_0 = (A + \varepsilon I)/(\|A\|_F + \varepsilon)`, ``steps`` steps of the fixed triple
    :data:`NEWTON_SCHULZ_COEFFICIENTS` (:math:`x \mapsto 2x - 1.5x^3 + 0.5x^5`, which fixes 1 with
    zero slope), result :math:`Z/\sqrt{\|A\|_F}` (the authors'
    ``_matrix_inverse_root_newtonschulz``; the result
    is normalised without ``eps``). To root a damped matrix pass :math:`A + sI` and ``eps=0``.

    Converges for every eigenvalue in :math:`(0, \|A\|_F]`, slowly for small ones: the error sits
    in the smallest eigenvalues (I14).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    xp = namespace_of(a)
    norm = xp.linalg.matrix_norm(a, ord="fro", keepdims=True)
    if not is_zero(eps):
        e = _batch_scalar(xp, eps, a, 2)
        y = (a + e * identity_like(a)) / (norm + e)
    else:
        y = a / norm
    return _coupled_inverse_sqrt(y, norm, [NEWTON_SCHULZ_COEFFICIENTS] * steps)[0]


def _coupled_newton(a: Array, p: int, steps: int) -> tuple[Array, Array]:
    r"""``steps`` steps of the coupled inverse Newton iteration for :math:`A^{-1/p}`; returns
    (X, M), X ≈ the root and M ≈ I.

    With :math:`\alpha = -1/p`, :math:`z = (p+1)/(2\|A\|_F)`, :math:`X_0 = z^{1/p} I`,
    :math:`M_0 = zA`:

    .. math::

        M' = (1-\alpha) I + \alpha M, \qquad X \leftarrow X M', \qquad M \leftarrow M'^{\,p} M,

    so that :math:`M \to I` and :math:`X \to A^{-1/p}` (Guo and Higham 2006; the ASGO code's
    ``_matrix_inverse_root_newton``, the Shampoo baseline's root, which stops once
    :math:`\|M - I\|_F/\|M\|_F` is below a tolerance: here every step runs, and
    :func:`inverse_root` checks M afterwards).
    """
    xp = namespace_of(a)
    eye = identity_like(a)
    alpha = -1.0 / p
    z = (p + 1) / (2.0 * xp.linalg.matrix_norm(a, ord="fro", keepdims=True))
    x = z ** (1.0 / p) * (xp.zeros_like(a) + eye)
    m = z * a
    for _ in range(steps):
        m_prime = (1.0 - alpha) * eye + alpha * m
        x = xp.matmul(x, m_prime)
        for _ in range(p):
            m = xp.matmul(m_prime, m)
    return x, m


# --------------------------------------------------------------------------------------------
# Residual-checked roots: an iteration where matmuls are cheap, its convergence checked per matrix
# and the matrices that failed the check flagged for the caller to replace.

#: Largest distance from the identity, ``‖M - I‖_F``, of an iteration's convergence measure
#: (:func:`inverse_root`: Z·Y for the coupled polynomial iterations, M for Newton) accepted: the
#: eigenvalues of the iterate are then within 5% of their limit. Measured float32 values of
#: converged roots: 1e-6 (condition number 1) to 1.5e-3 (k = 1024, condition number 1e7);
#: iterations stopped before convergence leave 0.2 and more.
ROOT_RESIDUAL_TOLERANCE = 5e-2

#: The iterations :func:`inverse_root` runs (:func:`inverse_root_eigh` is the exact reference).
ROOT_METHODS = ("polar_express", "newton_schulz", "newton")


def auto_root_method(p: Array) -> str:
    """The inverse root of ``root_method="auto"`` for a stack of statistics ``p``: ``"eigh"`` for
    float64 (reference runs) and on CPUs, where a k×k ``eigh`` (LAPACK) costs about six k×k matmuls
    and is exact; the Polar-Express iteration (``"polar_express"``) on accelerators, where ``eigh``
    costs hundreds and synchronises with the host (cuSOLVER's info check), and the iteration's
    convergence check reads nothing on the host."""
    xp = namespace_of(p)
    return "eigh" if p.dtype == xp.float64 or on_cpu(xp, p) else "polar_express"


def inverse_root(
    a: Array, p: int = 2, *, shift: Shift = 0.0, method: str = "polar_express", steps: Optional[int] = None,
    tolerance: Optional[float] = ROOT_RESIDUAL_TOLERANCE,
) -> tuple[Array, Array]:
    r""":math:`(A + sI)^{-1/p}` of a stack of symmetric PSD matrices by a matmul iteration, and which
    matrices failed its convergence check: no branch, no host read.

    Parameters
    ----------
    a:
        ``(..., k, k)`` symmetric PSD and finite, float32 or float64; :math:`A + sI` must be
        positive definite.
    p:
        The root, an integer ``>= 1`` (``"polar_express"`` and ``"newton_schulz"``: 2 only).
    shift:
        :math:`s \ge 0`, a number or an array of the batch shape.
    method:
        ``"polar_express"`` (:func:`inverse_sqrt_polar_express`, 10 steps by default),
        ``"newton_schulz"`` (:func:`inverse_sqrt_newton_schulz`, 20 steps) or ``"newton"``
        (coupled inverse Newton, 30 steps), applied to :math:`A + sI`.
    steps:
        Iterations (``None``: the defaults above).
    tolerance:
        A matrix whose iteration ends farther than this from convergence
        (:data:`ROOT_RESIDUAL_TOLERANCE`), or not finite, failed the check. ``None`` skips the
        check.

    Returns
    -------
    (root, failed)
        The roots as the iteration left them, and int32 flags of the batch shape ``a.shape[:-2]``:
        1 for a matrix that failed the check, for the caller to replace (element-wise, e.g. by a
        previous root or an exact one), 0 otherwise (always 0 without a check).

    Notes
    -----
    The check costs one matmul per matrix for the polynomial iterations (Polar-Express itself: 4
    per step, 40 by default) and none for Newton. It measures convergence, not the rounding error
    of the result: that is about the error of a float32 ``eigh`` (``docs/methods/asgo.md`` lists
    both).
    """
    xp = namespace_of(a)
    if method not in ROOT_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, ROOT_METHODS))}, got {method!r}")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    if method != "newton" and p != 2:
        raise ValueError(f"method={method!r} computes inverse square roots only (p=2), got p={p!r}")
    eye = identity_like(a)
    damped = a + _batch_scalar(xp, shift, a, 2) * eye
    if method == "newton":
        root, m = _coupled_newton(damped, p, 30 if steps is None else steps)
        convergence = lambda: m  # noqa: E731
    else:
        # As inverse_sqrt_polar_express / inverse_sqrt_newton_schulz with eps = 0, keeping Y.
        nu = xp.linalg.matrix_norm(damped, ord="fro", keepdims=True)
        if method == "polar_express":
            nu = 1.01 * nu
            coefficients = polar_express_coefficients(10 if steps is None else steps)
        else:
            coefficients = [NEWTON_SCHULZ_COEFFICIENTS] * (20 if steps is None else steps)
        root, z, y = _coupled_inverse_sqrt(damped / nu, nu, coefficients)
        convergence = lambda: xp.matmul(z, y)  # noqa: E731
    if tolerance is None:
        return root, xp.zeros(a.shape[:-2], dtype=xp.int32, device=placement(xp, a))
    # The iteration's own measure of convergence, M -> I (Newton) or Z Y -> I (coupled polynomial
    # iterations, which keep Z Y = Z² A/ν): rounding enters it as ε·κ^{1/2}, not as ε·κ like the
    # residual of the result (testing.oracles.inverse_root_residual, which float32 roots of a
    # κ = 1e6 matrix do not pass even when exact).
    good = xp.linalg.matrix_norm(convergence() - eye, ord="fro") <= tolerance  # False for NaN
    return root, xp.astype(xp.logical_not(good), xp.int32)


# --------------------------------------------------------------------------------------------
# Batched damped inverses / solves of many small SPD blocks (MBF's mini-blocks; usable by any
# method whose curvature is a stack of independent damped matrices).
#
# ``matrices`` is a stack (..., n, n) of symmetric positive semi-definite statistics F_b; these
# helpers work on A_b = F_b + damping * I, which is positive definite for damping > 0. One call
# handles the whole stack (batched LAPACK/cuSOLVER), which is what keeps thousands of k^2 x k^2
# conv blocks cheap; per-block eigendecompositions would cost about ten times more.


def all_finite(x: Array, axis: tuple[int, ...]) -> Array:
    r"""``all(isfinite(x), axis=axis)``: is every entry of each block finite?

    Eagerly on torch, computed as ``sum(x * 0, axis=axis) == 0``: ``x * 0`` is ±0 for a finite
    entry and NaN for ±Inf or NaN (IEEE 754), so each block's sum is ±0 or NaN (it cannot
    overflow), and only NaN differs from 0. That is two passes over ``x`` and three operations,
    where torch's ``isfinite`` and ``all`` take five kernels (``==``, ``abs``, ``!=``, ``&``,
    ``all``). Elsewhere the plain formula: NumPy and CuPy test
    ``isfinite`` in one kernel, and a compiler fuses it with the reduction (and may simplify
    ``x * 0`` to zero, as TorchInductor does for an integer zero, which IEEE arithmetic does not
    allow).
    """
    xp = namespace_of(x)
    if is_torch_namespace(xp) and not torch_compiling():
        return xp.sum(x * 0.0, axis=axis) == 0.0
    return xp.all(xp.isfinite(x), axis=axis)


def damped_inverse_init(matrices: Array, damping: Any) -> Array:
    """``I / damping`` stacked like ``matrices``: the inverse of ``0 + damping*I``.

    The value a stored inverse holds before its first successful refresh.
    """
    xp = namespace_of(matrices)
    eye = identity_like(matrices) / damping
    return xp.broadcast_to(eye, matrices.shape) + xp.zeros_like(matrices)


def damped_inverse(matrices: Array, damping: Any, previous: Array) -> tuple[Array, Array]:
    r"""Batched :math:`(F_b + \lambda I)^{-1}` of the matrices exactly as given (not symmetrised:
    the reference code's plain ``inverse``, faithful MBF's), with a fallback to the previous inverse.

    Parameters
    ----------
    matrices:
        (..., n, n) stack of PSD statistics :math:`F_b` (float32 or float64).
    damping:
        :math:`\lambda > 0`, a Python number or a 0-D array.
    previous:
        (..., n, n) the inverses currently in use; a block whose new inverse is not finite keeps
        its previous value.

    Returns
    -------
    (inverse, failed)
        The new stack of inverses, and (...,) bool: the blocks that failed and kept ``previous``
        (for the caller's failure counter).

    Notes
    -----
    ``F_b + λI`` is formed in the working precision: when :math:`\lambda` is below the rounding of
    :math:`F_b`'s entries (:math:`\|F_b\|/\lambda \gtrsim 1/\varepsilon`, about 1e7 in float32
    for a rank-deficient :math:`F_b`) the damping is lost and the computed inverse can be garbage
    while finite. :func:`precond_ref.testing.oracles.damped_inverse_residual` detects that; :func:`damped_inverse_stable` raises
    the damping to the precision floor of :math:`F_b` instead and stays accurate. An exactly singular block makes
    NumPy raise ``LinAlgError`` inside ``inv``; that is caught here and every block of the call
    counts as failed (the previous inverses are kept). torch and JAX give that block non-finite
    entries instead (:func:`inverse`): it alone fails. Any other error of the call (a CUDA error,
    torch's synchronisation debug mode) propagates.
    """
    xp = namespace_of(matrices, previous)
    eye = identity_like(matrices)
    # A non-finite block is replaced by I before the call: inv maps Inf entries to finite
    # garbage (inv([[inf, 0], [0, 1]]) = [[0, 0], [0, 1]]) and NaN may make NumPy raise.
    finite_in = all_finite(matrices, axis=(-2, -1))
    damped = xp.where(finite_in[..., None, None], matrices + damping * eye, eye)
    try:
        result = inverse(xp, damped)
    except ValueError:  # NumPy's LinAlgError on an exactly singular block (torch and JAX give Inf/NaN)
        result = xp.full(damped.shape, xp.nan, dtype=damped.dtype, device=placement(xp, damped))
    ok = xp.logical_and(finite_in, all_finite(result, axis=(-2, -1)))
    return xp.where(ok[..., None, None], result, previous), xp.logical_not(ok)


#: Relative accuracy :func:`damped_inverse_stable` guarantees for its LU inverses: the damping is
#: raised until the condition number of ``F + λI`` is at most about ``DAMPED_INVERSE_ACCURACY / ε``.
DAMPED_INVERSE_ACCURACY = 1e-2


def _frobenius_norm(xp: Any, matrices: Array) -> Array:
    """Per-block Frobenius norm, scaled by the largest entry first so that it cannot overflow."""
    largest = xp.max(xp.abs(matrices), axis=(-2, -1))
    scale = xp.where(largest > 0.0, largest, xp.ones_like(largest))
    return scale * xp.linalg.matrix_norm(matrices / scale[..., None, None], ord="fro")


def damped_inverse_stable(
    matrices: Array, damping: Any, previous: Array, *, accuracy: float = DAMPED_INVERSE_ACCURACY,
) -> tuple[Array, Array]:
    r"""Batched :math:`(\operatorname{sym}(F_b) + \lambda_b I)^{-1}` by LU, branch-free, with the
    damping raised to the precision floor of the stored statistic:

    .. math::

        \lambda_b = \max\bigl(\lambda,\ \tau\,\lVert F_b\rVert_F\bigr), \qquad
        \tau = \varepsilon / \text{accuracy}.

    Why: a block's LU inverse has relative error about :math:`\varepsilon\,\kappa` with
    :math:`\kappa = (\lVert F_b\rVert_2 + \lambda_b)/\lambda_b`, so :math:`\lambda_b \ge
    \tau\lVert F_b\rVert_F` keeps it below ``accuracy`` (1e-2). The same floor is where the
    statistic itself stops being known: ``eigh`` (or any backward-stable method) resolves an
    eigenvalue :math:`w` of the stored :math:`F_b` only to :math:`\pm\varepsilon\lVert F_b\rVert`,
    i.e. to ``accuracy`` relative only when :math:`w \ge \tau\lVert F_b\rVert`. Where
    :math:`\tau\lVert F_b\rVert_F \le \lambda` (the usual case) nothing changes and the result is
    the plain LU inverse, bit for bit. Where the damping would be lost to rounding
    (:math:`\lVert F_b\rVert/\lambda \gtrsim 1/\tau`, e.g. a gradient spike), every eigenvalue of the
    result is at most :math:`1/\lambda_b < 1/\lambda`: a step along a direction the statistic cannot
    resolve is shortened, never amplified by up to :math:`\lVert F_b\rVert/\lambda` as LU of the
    rounded :math:`F_b + \lambda I` (or treating an unresolved eigenvalue as zero) would.

    No value is read on the host (no branch, no fallback decomposition): the whole stack is one
    batched ``inv`` (:func:`inverse`, which on torch leaves LAPACK's status on the device) and
    element-wise work, so it runs under ``jax.jit`` and ``torch.compile`` and on a GPU without
    synchronisation. The damped matrix is symmetric positive definite (:math:`F_b` PSD,
    :math:`\lambda_b \ge \lambda > 0`, and :math:`\lambda_b` above the rounding of :math:`F_b`), so
    on torch CUDA tensors the inverse is by Cholesky (:func:`spd_inverse`), which CUDA graphs can
    capture; a block that is not positive definite after all keeps ``previous`` and is flagged.

    Parameters
    ----------
    matrices:
        (..., n, n) stack of symmetric PSD statistics :math:`F_b` (float32 or float64); only the
        symmetric part is used.
    damping:
        :math:`\lambda > 0`, a Python number or a 0-D array.
    previous:
        (..., n, n) the inverses in use; a block whose statistic or inverse is not finite keeps it.
    accuracy:
        The relative accuracy :math:`\varepsilon\kappa` the floor guarantees (default 1e-2).

    Returns
    -------
    (inverse, failed)
        The symmetrised inverses, and (...,) bool: the blocks that failed and kept ``previous``
        (for the caller's failure counter). A raised damping is not a failure: its result is used.
    """
    xp = namespace_of(matrices, previous)
    finite_in = all_finite(matrices, axis=(-2, -1))
    safe = xp.where(finite_in[..., None, None], symmetrize(matrices), xp.zeros_like(matrices))
    floor = (xp.finfo(safe.dtype).eps / accuracy) * _frobenius_norm(xp, safe)
    requested = xp.zeros_like(floor) + damping
    lam = xp.where(floor > requested, floor, requested)
    damped = safe + lam[..., None, None] * identity_like(safe)  # SPD: F PSD, lam_b > 0
    result = symmetrize(inverse(xp, damped, symmetric_positive_definite=True))
    ok = xp.logical_and(finite_in, all_finite(result, axis=(-2, -1)))
    return xp.where(ok[..., None, None], result, previous), xp.logical_not(ok)


# --------------------------------------------------------------------------------------------
# Tensor-times-matrix products of Kronecker-factored preconditioners (IF-Shampoo's factor
# updates): matmul only, batched over leading axes, so that the factors of several equal-shape
# tensors go through one call.


def _unfolded(xp: Any, tensor: Array, axis: int, batch: int) -> tuple[Array, Optional[tuple], Optional[tuple]]:
    """The mode-``axis`` unfolding of ``tensor`` (``batch`` leading batch axes) as a stack of matrices,
    and how to fold a product back: ``(B..., d, rest)`` where ``axis`` is the first tensor axis (a
    reshape; ``None, None``); else ``(B..., rest, d)`` with ``axis`` moved last, the moved tensor's
    shape and the permutation that moves it back (``None`` for the last axis, which needs no copy)."""
    ndim = len(tensor.shape)
    if not batch <= axis < ndim:
        raise ValueError(f"axis {axis} is not a tensor axis after the {batch} batch axes of shape {tuple(tensor.shape)}")
    lead, d = tuple(tensor.shape[:batch]), tensor.shape[axis]
    if axis == batch:
        return xp.reshape(tensor, lead + (d, -1)), None, None
    last = axis == ndim - 1
    moved = tensor if last else xp.permute_dims(tensor, (*range(axis), *range(axis + 1, ndim), axis))  # axis moved last
    back = None if last else (*range(axis), ndim - 1, *range(axis, ndim - 1))  # and back to its place
    return xp.reshape(moved, lead + (-1, d)), tuple(moved.shape), back


def mode_product(tensor: Array, matrix: Array, axis: int, *, transpose: bool = False) -> Array:
    r"""The mode product :math:`T \times_n M`: ``matrix`` multiplied onto axis ``n = axis`` of ``tensor``.

    ``result[..., j, ...] = sum_i M[j, i] T[..., i, ...]`` (with ``transpose=True``,
    ``M[i, j]``): the unfolding :math:`T_{(n)}` becomes :math:`M T_{(n)}` (or
    :math:`M^\top T_{(n)}`). For a matrix :math:`G`, axis 0 gives :math:`MG` and axis 1
    :math:`GM^\top`.

    Parameters
    ----------
    tensor:
        ``(B..., d_1, ..., d_N)``: a stack of tensors over the batch axes ``B...`` of ``matrix``.
    matrix:
        ``(B..., d, d)`` with ``d = tensor.shape[axis]``: one matrix per tensor of the stack.
    axis:
        The tensor axis, counted from the start of ``tensor`` (batch axes included, so at least
        ``len(B)``).
    transpose:
        Multiply by :math:`M^\top` instead of :math:`M`.

    One batched ``matmul``; the first and the last tensor axis need no copy.
    """
    xp = namespace_of(tensor, matrix)
    flat, moved, back = _unfolded(xp, tensor, axis, len(matrix.shape) - 2)
    m = matrix.mT if transpose else matrix
    if moved is None:  # the first tensor axis: M T_(n)
        return xp.reshape(xp.matmul(m, flat), tuple(tensor.shape))
    result = xp.reshape(xp.matmul(flat, m.mT), moved)
    return result if back is None else xp.permute_dims(result, back)


def mode_gram(tensor: Array, axis: int, *, batch: int = 0) -> Array:
    r""":math:`T_{(n)} T_{(n)}^\top`, the Gram matrix of the mode-``n`` unfolding, ``(B..., d_n, d_n)``.

    ``tensor`` is ``(B..., d_1, ..., d_N)`` with ``batch`` leading batch axes ``B...``; ``axis``
    counts from the start of ``tensor``. For a matrix :math:`Y`, axis 0 gives :math:`YY^\top` and
    axis 1 :math:`Y^\top Y`. One batched ``matmul``.
    """
    xp = namespace_of(tensor)
    flat, moved, _ = _unfolded(xp, tensor, axis, batch)
    return xp.matmul(flat, flat.mT) if moved is None else xp.matmul(flat.mT, flat)


# Kronecker factors of dense or diagonal structure, stacked: a dense factor a ``(b, d, d)`` stack,
# a diagonal one a ``(b, d)`` stack of its diagonals; each product one line of math for both
# structures (IF-Shampoo's factor step and preconditioning).


def along(xp, diagonal, axis: int, ndim: int):
    """A stack of diagonal factors (b, d) shaped to multiply ``axis`` of a (b, ...) tensor."""
    shape = [1] * ndim
    shape[0], shape[axis] = diagonal.shape
    return xp.reshape(diagonal, tuple(shape))


def is_diagonal(factor) -> bool:
    """A diagonal factor is stored as the (b, d) stack of its diagonals."""
    return factor.ndim == 2


def times_transposed(xp, tensor, factor, axis: int):
    """``T ×_axis Kᵀ``: contract ``axis`` of ``T`` with the first index of ``K`` (diagonal: ``T·k`` along it)."""
    if is_diagonal(factor):
        return tensor * along(xp, factor, axis, len(tensor.shape))
    return mode_product(tensor, factor, axis, transpose=True)


def gram(xp, factor):
    """``KᵀK`` (diagonal: ``k ⊙ k``)."""
    return factor * factor if is_diagonal(factor) else xp.matmul(factor.mT, factor)


def mean_trace(xp, gram):
    """``Tr(A)/d`` of a stack of (b, d, d) matrices; of a diagonal (b, d) its mean."""
    return xp.mean(gram if gram.ndim == 2 else xp.linalg.diagonal(gram), axis=-1)


def unfolding_gram(xp, tensor, axis: int, factor):
    """``Y_(n) Y_(n)ᵀ``, the Gram of the mode-``axis`` unfolding (diagonal ``factor``: its diagonal,
    the sum of ``Y ⊙ Y`` over the other axes)."""
    if not is_diagonal(factor):
        return mode_gram(tensor, axis, batch=1)
    rest = tuple(i for i in range(1, len(tensor.shape)) if i != axis)
    square = tensor * tensor
    return xp.sum(square, axis=rest) if rest else square


def times(xp, factor, matrix):
    """``K m`` (diagonal: ``k ⊙ m``)."""
    return factor * matrix if is_diagonal(factor) else xp.matmul(factor, matrix)


def frobenius(xp, matrix):
    """``‖m‖_F`` per block (diagonal: the vector norm)."""
    return xp.linalg.vector_norm(matrix, axis=-1) if matrix.ndim == 2 else xp.linalg.matrix_norm(matrix)


def product_except(xp, values, n: int, dtype):
    """``Π_{i≠n} values_i`` in ``dtype`` (the empty product is 1), multiplied left to right."""
    product = None
    for i, value in enumerate(values):
        if i != n:
            value = cast(xp, value, dtype)
            product = value if product is None else product * value
    return 1.0 if product is None else product


def block_mode_products(
    xp: Any, tensors: Sequence[Array], factors: Sequence[Sequence[Sequence[tuple]]], apply: Any,
) -> list[Array]:
    r""":math:`X \times_1 P_1 \cdots \times_N P_N` of each tensor :math:`X` of ``tensors``, each
    :math:`P_n` block-diagonal: ``factors[i][n]`` are the blocks of axis ``n`` of ``tensors[i]`` as
    stacks of consecutive equal blocks, in order, each a tuple of arrays whose first holds one
    ``(length, .)`` matrix per block along a leading axis (no leading axis where the axis is one
    block), :math:`P` of a stack applied to its rows of the unfolding, ``(count, length, m)``, as
    ``apply(*stack, rows)``.

    Axis by axis, :math:`X \times_n P_n` is :math:`P_n X_{(n)}` folded back: the axis multiplied
    is first, its rows cut into the stacks' blocks, and the result's first axis is then rolled last
    (:func:`precond_ref.blocking.roll_first_axis_last`; :math:`N` rolls restore the order). At each
    axis the stacks of one shape, dtype and device, across tensors, go through one call of ``apply``
    (:func:`precond_ref.blocking.stack`), which must act block by block along the leading axis.
    """
    xs = list(tensors)
    for n in range(max([0] + [len(f) for f in factors])):  # dynamo: no default=
        members, owners = [], []
        for i, x in enumerate(xs):
            if n >= len(factors[i]):
                continue
            flat = xp.reshape(x, (x.shape[0], math.prod(tuple(x.shape[1:]))))
            start = 0
            for blocks in factors[i][n]:
                if blocks[0].ndim == 2:  # the axis is one block: a stack of one
                    blocks = tuple(xp.expand_dims(v, axis=0) for v in blocks)
                count, length = blocks[0].shape[:2]
                members.append((*blocks, xp.reshape(flat[start:start + count * length, :], (count, length, flat.shape[-1]))))
                start += count * length
                owners.append(i)
        stacks = stack(xp, members)
        outputs = [(apply(*s.operands),) for s in stacks]
        pieces: list[list] = [[] for _ in xs]
        for i, (out,) in zip(owners, unstack(stacks, outputs, len(members))):
            pieces[i].append(xp.reshape(out, (out.shape[0] * out.shape[1], out.shape[-1])))
        for i, x in enumerate(xs):
            if pieces[i]:
                rows = pieces[i][0] if len(pieces[i]) == 1 else xp.concat(pieces[i], axis=0)
                xs[i] = roll_first_axis_last(xp, xp.reshape(rows, (x.shape[0],) + tuple(x.shape[1:])))
    return xs


def half_precision_dtype(x: Array) -> Any:
    """``bfloat16`` of ``x``'s namespace when ``x`` lives on an accelerator, else ``None``.

    The precision policy of matmul-only paths (IF-Shampoo's factors): GPUs and TPUs multiply bf16
    matrices several times faster than float32 (tensor cores); CPUs mostly do not (without AMX,
    x86 emulates them; measured in ``records/backends-measurements.md``).
    ``None`` on a CPU, and where the namespace has no ``bfloat16`` (NumPy, CuPy,
    ``array_api_strict``). A JAX array traced under ``jax.jit`` has no device; JAX's default
    backend decides then.
    """
    xp = namespace_of(x)
    if not hasattr(xp, "bfloat16"):
        return None
    dev = array_device(x)
    if dev is None and "jax" in sys.modules:
        kind = sys.modules["jax"].default_backend()
    else:
        kind = getattr(dev, "platform", None) or getattr(dev, "type", None) or str(dev)
    return xp.bfloat16 if str(kind).lower() in _ACCELERATORS else None


#: Device kinds (torch ``device.type``, JAX ``platform``) with fast bf16 matrix products.
_ACCELERATORS = frozenset({"cuda", "gpu", "rocm", "tpu", "xpu", "mps", "hpu"})


def kl_clip_factor(direction: Array, vector: Array, learning_rate: Any, kl_clip: Any) -> Array:
    r"""K-FAC's step clipping factor :math:`\nu = \min\bigl(1, \sqrt{\kappa / (\alpha^2 \langle D, v
    \rangle)}\bigr)` for a step :math:`-\alpha D` with :math:`D = P v`.

    :math:`\alpha^2 \langle D, v\rangle = \alpha^2 v^\top P v` is the squared length of the step in the
    metric :math:`P^{-1}` (the damped curvature the preconditioner :math:`P` inverts), i.e. the
    quadratic model's predicted change of the output distribution (a KL divergence for a true
    Fisher); scaling the step by :math:`\nu` bounds it by :math:`\kappa`. A stale or low-rank
    curvature estimate gives directions it has not seen the gain :math:`1/\lambda`; the clip stops
    such a step from growing without bound until the estimate catches up.

    References
    ----------
    Ba, Grosse, Martens. "Distributed Second-Order Optimization using Kronecker-Factored
    Approximations". ICLR 2017, section 5 (KL clipping). ``direction``/``vector``: arrays of one
    shape; ``learning_rate`` and ``kl_clip`` numbers or 0-D arrays. Returns a 0-D array.
    """
    xp = namespace_of(direction, vector)
    return kl_clip_of_quadratic(xp, xp.sum(direction * vector), learning_rate, kl_clip)


def kl_clip_of_quadratic(xp: Any, inner: Array, learning_rate: Any, kl_clip: Any) -> Array:
    r""":func:`kl_clip_factor` from the inner products :math:`q = \langle D, v\rangle`, entry by entry:
    :math:`\nu = \sqrt{\kappa/(\alpha^2 q)}` where :math:`\alpha^2 q > \kappa`, else 1 (so
    :math:`\min(1, \cdot)`, and 1 for :math:`q \le 0`). ``inner``: 0-D, or a vector of many blocks'
    :math:`q` (one computation for all of them: the KL clip of MBF's layers, IF-Shampoo's groups).
    :math:`\kappa = 0` is no clip (1): an array ``kl_clip`` (``optax.inject_hyperparams``) may
    be 0 at run time, where :math:`\sqrt{0/q}` would zero every step."""
    quadratic = learning_rate * learning_rate * inner
    clipped = quadratic > kl_clip
    if not is_number(kl_clip):
        clipped = xp.logical_and(clipped, kl_clip > 0)
    one = xp.ones_like(quadratic)
    return xp.where(clipped, xp.sqrt(kl_clip / xp.where(clipped, quadratic, one)), one)


def _along(xp: Any, a: Array, indices: Array, axis: int) -> Array:
    """``take_along_axis(a, indices, axis)`` with non-negative ``indices`` (an ``argsort``'s) broadcast
    to ``a``'s shape: on torch one ``gather`` (``array_api_compat``'s ``take_along_axis`` first maps
    negative indices, three more operations, and torch's ``take_along_dim`` adds a fourth)."""
    indices = xp.broadcast_to(indices, a.shape)
    if is_torch_namespace(xp):
        return sys.modules["torch"].gather(a, axis, indices)
    return xp.take_along_axis(a, indices, axis=axis)


def rank_one_update_eigh(d: Array, z: Array) -> tuple[Array, Array]:
    r"""Eigenvalues (ascending) and orthonormal eigenvectors of :math:`A = \operatorname{diag}(d) + z z^\top`
    for (stacks of) vectors ``d``, ``z`` of shape (..., n): ``eigh(A)`` without a LAPACK call, a host
    read or a shape that depends on the data (the secular equation; Golub 1973, Bunch, Nielsen and
    Sorensen 1978, with the eigenvectors of Gu and Eisenstat 1994).

    Computed in float64 where the backend has it (as :func:`left_singular`), returned in ``d``'s dtype.

    1. Units: :math:`A = u^2 (\operatorname{diag}(d') + z' z'^\top)` with :math:`u` a power of two and
       :math:`|d'_i|, z_i'^2 \le 1` (exact).
    2. Ascending poles :math:`d_1 \le \dots \le d_n`; for each group of equal poles a Householder
       reflection :math:`H` maps the group's part of :math:`z` onto its first member, so
       :math:`H A H = \operatorname{diag}(d) + y y^\top` with one nonzero :math:`y_i` per group.
    3. Deflation: where :math:`|y_i|\,\|y\| \le 8 u_{\mathrm{round}} \max(\max_j |d_j|, \|y\|^2)` (a change
       of :math:`A` at its rounding level) the pair is :math:`(d_i, e_i)`; the other ("active") poles are
       distinct.
    4. Each active pole :math:`d_i` has one eigenvalue in :math:`(d_i, d_{i^+})`, :math:`d_{i^+}` the
       next active pole (:math:`d_i + \|y\|^2` above the largest), the root of the secular equation
       :math:`f(\lambda) = 1 + \sum_j y_j^2 / (d_j - \lambda) = 0` (:math:`f` increases from
       :math:`-\infty` to :math:`+\infty` there). It is found as :math:`\lambda = o_i + \tau_i` from the
       nearer end :math:`o_i` of the interval (so :math:`d_j - \lambda = (d_j - o_i) - \tau_i` keeps
       :math:`\tau_i`'s relative accuracy), by a fixed number of geometric bisections of :math:`|\tau_i|`
       (the new end :math:`\sqrt{lo \cdot hi}`) between a lower bound from the equation and half the
       interval: each halves :math:`\log(hi/lo)`, so the bracket's ratio falls below 2 within
       :math:`\log_2` of the exponent range's bits and then shrinks to the unit roundoff as fast as
       an arithmetic bisection would, enough steps for every bit of the dtype.
    5. The vector :math:`\hat y` for which the computed eigenvalues are exact,
       :math:`\hat y_j^2 = \prod_i (\lambda_i - d_j) / \prod_{i \ne j} (d_i - d_j)` (as products of
       ratios in (0, 1)), and the eigenvectors :math:`v_i \propto (\operatorname{diag}(d) - \lambda_i I)^{-1} \hat y`,
       orthogonal to working precision however close the eigenvalues; then :math:`H v_i` in the
       original order.

    Cost: :math:`O(n^2)` element-wise work per bisection step (65 in float64, eight array
    operations each) and one
    :math:`n \times n \times n` product. Accuracy: eigenvalues and :math:`V \Lambda V^\top - A` within a
    small multiple of :math:`u_{\mathrm{round}} \|A\|`, :math:`V^\top V - I` within a few :math:`n\,u_{\mathrm{round}}`
    (``tests/test_linalg_secular.py`` against ``eigh``). JAX without x64 solves it in float64 too,
    within a :func:`~precond_ref._backend.widening` block.
    """
    xp = namespace_of(d, z)
    with widening(xp, d) as wide:
        return _rank_one_update_eigh(xp, d, z, wide)


def _rank_one_update_eigh(xp: Any, d: Array, z: Array, wide: Any) -> tuple[Array, Array]:
    """:func:`rank_one_update_eigh`, computed in ``wide`` (float64, or ``None``: ``d``'s dtype)."""
    out_dtype = d.dtype
    if wide is not None:
        d, z = xp.astype(d, wide), xp.astype(z, wide)
    n, device = d.shape[-1], array_device(d)
    finfo = xp.finfo(d.dtype)
    eps, smallest = float(finfo.eps), float(finfo.smallest_normal)
    # the numbers the selections take, 0-D arrays made once (:func:`~precond_ref._backend.number`)
    zero, one, minus_one, infinity = (number(xp, value, d) for value in (0.0, 1.0, -1.0, math.inf))
    # 1. A = u^2 (diag(d') + z' z'^T), u a power of two.
    size = xp.maximum(xp.max(xp.abs(z), axis=-1), xp.sqrt(xp.max(xp.abs(d), axis=-1)))
    unit = 2.0 ** xp.ceil(xp.log2(xp.where(size > 0.0, size, one)))
    d, z = d / (unit * unit)[..., None], z / unit[..., None]
    # 2. Ascending poles; a reflection per group of equal poles: H z = y.
    order = xp.argsort(d, axis=-1, stable=True)
    d, z = _along(xp, d, order, -1), _along(xp, z, order, -1)
    same = d[..., :, None] == d[..., None, :]
    first = xp.ones(d.shape[:-1] + (1,), dtype=xp.bool, device=device)
    leader = xp.concat([first, d[..., 1:] != d[..., :-1]], axis=-1)
    group_norm = xp.sqrt(xp.sum(xp.where(same, (z * z)[..., None, :], zero), axis=-1))
    signed_norm = xp.where(z >= 0.0, one, minus_one) * group_norm
    v = z + xp.where(leader, signed_norm, zero)
    vv = xp.sum(xp.where(same, (v * v)[..., None, :], zero), axis=-1)
    beta = xp.where(vv > 0.0, 2.0 / xp.where(vv > 0.0, vv, one), zero)
    eye = constant(xp, ("eye", n, d.dtype), lambda: xp.eye(n, dtype=d.dtype, device=device), d)
    reflection = eye - xp.where(same, (beta * v)[..., :, None] * v[..., None, :], zero)  # H
    y = xp.where(leader, -signed_norm, zero)
    # 3. Deflation at the rounding level of A.
    y2 = xp.sum(y * y, axis=-1)
    level = (8.0 * eps) * xp.maximum(xp.max(xp.abs(d), axis=-1), y2)
    active = xp.logical_and(leader, xp.abs(y) * xp.sqrt(y2)[..., None] > level[..., None])
    w = xp.where(active, y * y, zero)
    # 4. The secular equation on each active pole's interval (d_i, upper_i).
    above = xp.logical_and(active[..., None, :], d[..., None, :] > d[..., :, None])
    top = xp.logical_not(xp.any(above, axis=-1))
    upper = xp.where(top, d + y2[..., None], xp.min(xp.where(above, d[..., None, :], infinity), axis=-1))
    half = (upper - d) / 2.0
    weights, columns_active = w[..., None, :], active[..., None, :]  # rows of (..., 1, n), made once

    # f(lambda_i) = 1 + sum_j w_j / (d_j - lambda_i), d_j - lambda_i = delta_ij - tau_i, is tested
    # against 0 as its sum s against -1: fl(1 + s) has the sign of 1 + s (it is exact for s in
    # [-2, -1/2] by Sterbenz's lemma; elsewhere one term exceeds twice the other and the rounded
    # sum keeps its sign), so the tests are the same, and one operation a step fewer. ``delta``'s
    # inactive columns are poles at infinity (:func:`poles_of`): their terms, 0 / inf, are the 0
    # that their weight gives, with no 0 / 0 where such a pole meets lambda_i.
    def poles_of(delta: Array) -> Array:
        return xp.where(columns_active, delta, infinity)

    def f_minus_one(poles: Array, tau: Array) -> Array:
        return xp.sum(weights / (poles - tau[..., None]), axis=-1)

    below_half = f_minus_one(poles_of(d[..., None, :] - d[..., :, None]), half) >= -1.0  # the root in the lower half
    from_pole = xp.logical_or(top, below_half)
    origin = xp.where(from_pole, d, upper)
    delta = d[..., None, :] - origin[..., :, None]  # d_j - o_i
    direction = xp.where(from_pole, one, minus_one)
    # |tau| >= y_o^2 / (1 + 2 sum_{d_j > o} y_j^2 / (d_j - o)) from the pole below, and
    # >= y_o^2 / (2 sum_{d_j < o} y_j^2 / (o - d_j)) from the one above (|tau| <= half the interval).
    apart = delta != 0.0
    at_origin = xp.sum(xp.where(apart, zero, w[..., None, :]), axis=-1)
    reach = xp.where(apart, w[..., None, :] / xp.where(apart, xp.abs(delta), one), zero)
    beyond = xp.sum(xp.where((delta > 0.0) == from_pole[..., None], reach, zero), axis=-1)
    hi = xp.where(top, y2[..., None], half)
    twice = 2.0 * beyond
    bound = xp.where(from_pole, 1.0 + twice, twice)
    lo = xp.where(active, at_origin / xp.where(active, bound, one), hi)
    lo = xp.minimum(xp.maximum(lo, number(xp, smallest, lo)), hi)
    steps = round(-math.log2(eps)) + math.ceil(math.log2(-math.log2(smallest) - math.log2(eps))) + 2

    # The bisection's test, one comparison a step: with the poles signed by the direction, row i's
    # sum_j w_j / (direction_i (d_j - o_i) - mid) is direction_i times f's sum at tau_i = direction_i mid
    # (each term negated exactly where direction_i = -1). The root lies beyond mid, away from the
    # origin, where f(o_i + tau_i) < 0 from the pole below (the signed sum < -1) and where
    # f(o_i + tau_i) >= 0 from the pole above (the signed sum <= 1: below the float after 1).
    signed_poles = direction[..., None] * poles_of(delta)
    threshold = xp.where(from_pole, minus_one, number(xp, 1.0 + eps, d))

    def bisect(bracket: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bracket
        mid = xp.sqrt(lo * hi)
        up = f_minus_one(signed_poles, mid) < threshold
        return xp.where(up, mid, lo), xp.where(up, hi, mid)

    lo, hi = iterate(xp, steps, bisect, (lo, hi))
    tau = direction * ((lo + hi) / 2.0)
    # 5. y_hat_j^2 = prod_i |lambda_i - d_j| / |d_i' - d_j|, d_i' = d_i below d_j, the next pole above it.
    pairs = xp.logical_and(active[..., :, None], active[..., None, :])
    below = d[..., :, None] < d[..., None, :]
    paired = xp.where(below, d[..., :, None], upper[..., :, None]) - d[..., None, :]
    paired = xp.where(xp.logical_or(below, xp.logical_not(top[..., :, None])), xp.abs(paired), one)
    ratio = xp.where(pairs, xp.abs(tau[..., :, None] - delta) / xp.where(pairs, paired, one), one)
    y_hat = xp.where(active, xp.where(y >= 0.0, one, minus_one) * xp.sqrt(xp.prod(ratio, axis=-2)), zero)
    columns = xp.where(pairs.mT, y_hat[..., :, None] / xp.where(pairs.mT, delta.mT - tau[..., None, :], one), zero)
    norms = xp.sqrt(xp.sum(columns * columns, axis=-2))
    columns = xp.where(active[..., None, :], columns / xp.where(active, norms, one)[..., None, :], eye)
    values = xp.where(active, origin + tau, d) * (unit * unit)[..., None]
    vectors = _along(xp, xp.matmul(reflection, columns), xp.argsort(order, axis=-1)[..., :, None], -2)
    ascending = xp.argsort(values, axis=-1, stable=True)
    values, vectors = _along(xp, values, ascending, -1), _along(xp, vectors, ascending[..., None, :], -1)
    return xp.astype(values, out_dtype), xp.astype(vectors, out_dtype)


# ------------------------------------------------------------------------------------------------
# Renormalising a direction to a fixed RMS at any scale (ASGO and DASGO, spec ``asgo.md`` D2, D12):
# ``r·sqrt(mn)·U/‖U‖_F`` of each m×n matrix of a stack, a zero matrix staying zero. The plain
# formula under- or overflows for a direction of size 1e-30 or 1e30 (its squares leave the range),
# and the products of a scaled direction ``M diag(s)`` may too. The forms here give the formula's
# result to rounding at every scale: in float64 where the backend has it for a float32 direction
# (every float32 square is a normal float64 number), else scaled by the largest entry first, or,
# for ``M diag(s)``, from per-column maxima chosen per step without a host read.


def wide_dtype(xp: Any, x: Array) -> Any:
    """float64 for a float32 ``x`` where the backend has it (not JAX without x64, not torch MPS),
    else ``None``: every float32 number squares into the float64 range without underflow or
    overflow (2^-149 and 2^128 square to 2^-298 and 2^256), so a float64 sum of squares is the
    Frobenius norm of any float32 array in one pass, whatever its scale."""
    if x.dtype != xp.float32:
        return None
    return float64_where_available(xp, x)


def wide_target(xp: Any, rms_target: Any, size: int, wide: Any) -> Any:
    """``r·sqrt(mn)`` (``size`` = mn) for a renormalisation computed in ``wide``: an array ``r`` (a
    hyperparameter as ``optax.inject_hyperparams`` passes it, cast to the direction's narrower
    dtype) taken in ``wide`` first, so that the product is rounded once, from ``wide``, as a
    Python number's is (not to the narrower dtype first)."""
    return as_operand(xp, rms_target, wide) * math.sqrt(size)


def _renormalising_factor(xp: Any, sum_of_squares: Array, target: float) -> Array:
    """``target / sqrt(sum_of_squares)``, and ``target`` for a zero sum (a zero direction stays zero)."""
    return target / nonzero_divisor(xp, xp.sqrt(sum_of_squares))


def nonzero_divisor(xp: Any, norm: Array) -> Array:
    """``norm``, with 1 where it is zero (the divisor that keeps a zero direction zero)."""
    return select(xp, norm > 0, norm, number(xp, 1.0, norm))


def per_matrix_column(xp: Any, x: Array) -> Array:
    """Per-matrix values of a stack ``(L,)`` shaped ``(L, 1)`` to scale its vectors ``(L, k)``; a
    0-D value (one matrix) as it is."""
    return x if x.ndim == 0 else xp.expand_dims(x, axis=-1)


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
    wide = None if exact_dtype else wide_dtype(xp, u)
    if wide is not None:
        w = xp.astype(u, wide)  # a new array: scaled in place below, no second float64 copy
        norm = xp.linalg.matrix_norm(w, ord="fro", keepdims=True)
        w *= wide_target(xp, rms_target, rows * columns, wide) / nonzero_divisor(xp, norm)
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
    wide = wide_dtype(xp, m)
    if wide is None:
        return column_factored_renormalise(xp, m, scale, axis, target)
    m_w, scale_w = xp.astype(m, wide), xp.astype(scale, wide)
    factor = _renormalising_factor(xp, scaled_squared_norm(xp, m_w, scale_w, axis), wide_target(xp, rms_target, rows * columns, wide))
    return xp.astype(m_w * xp.expand_dims(computed_once(xp, scale_w * per_matrix_column(xp, factor)), axis=axis), m.dtype)


def scaled_squared_norm(xp: Any, m: Array, scale: Array, axis: int) -> Array:
    r""":math:`‖M \operatorname{diag}(s)‖_F^2 = \sum_j s_j^2 \sum_i M_{ij}^2` (``axis=-2``;
    :math:`‖\operatorname{diag}(s) M‖_F^2` for ``axis=-1``) from the column sums of :math:`M^2`,
    without forming the product: a compiler fuses the sums with the pass that reads M. Of a
    stack ``(L, m, n)``: one value per matrix ``(L,)``."""
    return xp.sum(scale * scale * sum_across(xp, m * m, axis), axis=-1)


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
        top = per_matrix_column(xp, xp.max(x, axis=-1))
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
        return scale * per_matrix_column(xp, factor), xp.ones_like(scale)

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
        return inverse, relative * per_matrix_column(xp, target / xp.maximum(norm, xp.ones_like(norm)))

    a, b = cond_under_cpu_jit(xp, per_matrix_column(xp, plain), fast, safe, m, scale, total)
    return (m * expand(a)) * expand(b)
