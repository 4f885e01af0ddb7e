"""Batched damped inverses and solves (``precond_ref.linalg``) against closed forms, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from precond_ref.linalg import (
    DAMPED_INVERSE_ACCURACY,
    damped_inverse,
    damped_inverse_init,
    damped_inverse_stable,
    inverse,
    spd_inverse,
    symmetrize,
)
from precond_ref.testing.oracles import damped_inverse_residual, damped_solve


def _sherman_morrison(u: np.ndarray, lam: float) -> np.ndarray:
    """(u u^T + lam I)^{-1} = (I - u u^T / (lam + |u|^2)) / lam."""
    n = u.shape[-1]
    outer = u[..., :, None] * u[..., None, :]
    norm2 = np.sum(u * u, axis=-1)[..., None, None]
    return (np.eye(n) - outer / (lam + norm2)) / lam


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inverse_of_rank_one_stack_matches_sherman_morrison(backend, dtype):
    rng = np.random.default_rng(0)
    u = rng.standard_normal((3, 4, 5))
    lam = 0.3
    stats = (u[..., :, None] * u[..., None, :]).astype(dtype)
    expected = _sherman_morrison(u, lam)
    prev = np.zeros_like(stats)
    inv, failed = damped_inverse(backend.asarray(stats), lam, backend.asarray(prev))
    out = backend.to_numpy(inv)
    assert out.dtype == np.dtype(dtype)
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * np.abs(expected).max())
    assert backend.to_numpy(failed).shape == (3, 4) and not backend.to_numpy(failed).any()


def test_inverse_of_diagonal_blocks_is_reciprocal(backend):
    d = np.array([[0.0, 1.0, 4.0], [2.0, 0.5, 9.0]])
    stats = np.stack([np.diag(row) for row in d])
    lam = 0.25
    inv, _ = damped_inverse(backend.asarray(stats), lam, backend.asarray(np.zeros_like(stats)))
    expected = np.stack([np.diag(1.0 / (row + lam)) for row in d])
    np.testing.assert_allclose(backend.to_numpy(inv), expected, rtol=1e-14, atol=1e-15)


def test_inverts_the_matrix_as_given_and_the_stable_one_its_symmetric_part(backend):
    """Non-symmetric input: damped_inverse inverts F + lam I as given (the authors' plain call),
    damped_inverse_stable sym(F) + lam I."""
    f = np.array([[2.0, 10.0], [0.0, 3.0]])
    lam = 1.0
    prev = backend.asarray(np.zeros((2, 2)))
    sym_inv, _ = damped_inverse_stable(backend.asarray(f), lam, prev)
    raw_inv, _ = damped_inverse(backend.asarray(f), lam, prev)
    sym = np.array([[3.0, 5.0], [5.0, 4.0]])  # sym(f) + I
    np.testing.assert_allclose(backend.to_numpy(sym_inv), np.linalg.inv(sym), rtol=1e-13)
    a = f + np.eye(2)
    # Closed form of a 2x2 inverse.
    expected_raw = np.array([[a[1, 1], -a[0, 1]], [-a[1, 0], a[0, 0]]]) / (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0])
    np.testing.assert_allclose(backend.to_numpy(raw_inv), expected_raw, rtol=1e-13)


@pytest.mark.parametrize("invert", [damped_inverse, damped_inverse_stable])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_block_keeps_previous_inverse_and_is_flagged(backend, bad, invert):
    stats = np.stack([np.eye(2) * 3.0, np.eye(2), np.eye(2) * 2.0])
    stats[1, 0, 1] = stats[1, 1, 0] = bad
    prev = np.stack([np.eye(2) * 7.0] * 3)
    inv, flagged = invert(backend.asarray(stats), 1.0, backend.asarray(prev))
    out = backend.to_numpy(inv)
    np.testing.assert_allclose(out[0], np.eye(2) / 4.0, rtol=1e-14)
    np.testing.assert_array_equal(out[1], prev[1])
    np.testing.assert_allclose(out[2], np.eye(2) / 3.0, rtol=1e-14)
    np.testing.assert_array_equal(backend.to_numpy(flagged), [False, True, False])


@pytest.mark.parametrize("invert", [damped_inverse, damped_inverse_stable])
def test_damping_may_be_a_0d_array(backend, invert):
    xp = backend.xp
    stats = np.eye(3) * 2.0
    lam = xp.asarray(0.5, dtype=xp.float64)
    inv, flagged = invert(backend.asarray(stats), lam, backend.asarray(np.zeros((3, 3))))
    np.testing.assert_allclose(backend.to_numpy(inv), np.eye(3) / 2.5, rtol=1e-14)
    assert not bool(backend.to_numpy(flagged))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inverse_init_is_identity_over_damping(backend, dtype):
    stats = backend.asarray(np.zeros((2, 3, 4, 4), dtype=dtype))
    init = backend.to_numpy(damped_inverse_init(stats, 0.5))
    assert init.shape == (2, 3, 4, 4) and init.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(init, np.broadcast_to(np.eye(4) * 2.0, (2, 3, 4, 4)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_solve_matches_sherman_morrison(backend, dtype):
    rng = np.random.default_rng(1)
    u = rng.standard_normal((6, 4))
    rhs = rng.standard_normal((6, 4, 2))
    lam = 0.7
    stats = (u[:, :, None] * u[:, None, :]).astype(dtype)
    x = damped_solve(backend.asarray(stats), lam, backend.asarray(rhs.astype(dtype)))
    expected = _sherman_morrison(u, lam) @ rhs
    out = backend.to_numpy(x)
    assert out.dtype == np.dtype(dtype)
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# Large ‖F‖/λ: the damping below the rounding of F. damped_inverse_stable raises
# it to the precision floor τ‖F‖_F, τ = ε/accuracy, branch-free.


def _floor(dtype, norm):
    return np.finfo(dtype).eps / DAMPED_INVERSE_ACCURACY * norm


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stable_inverse_is_plain_lu_while_the_damping_is_resolved(backend, dtype):
    """[closed form] Where τ‖F‖_F <= λ (here ‖u‖²/λ <= 25) the floor is inactive: the result is the
    plain symmetrised LU inverse of sym(F) + λI bit for bit, equals Sherman–Morrison (uuᵀ + λI)^{-1} =
    (I - uuᵀ/(λ + ‖u‖²))/λ to a few roundings of κ <= 26 (tolerance 8κε), and nothing is flagged."""
    rng = np.random.default_rng(2)
    u = rng.standard_normal((5, 4))
    lam = float(np.max(np.sum(u * u, axis=-1))) / 25.0
    stats = (u[:, :, None] * u[:, None, :]).astype(dtype)
    prev = backend.asarray(np.zeros_like(stats))
    inv, flagged = damped_inverse_stable(backend.asarray(stats), lam, prev)
    damped = (stats + np.swapaxes(stats, -1, -2)) / 2 + (lam * np.eye(4)).astype(dtype)  # exact in either library
    lu = symmetrize(inverse(backend.xp, backend.asarray(damped)))
    np.testing.assert_array_equal(backend.to_numpy(inv), backend.to_numpy(lu))
    expected = _sherman_morrison(u, lam)
    kappa = 1.0 + float(np.max(np.sum(u * u, axis=-1))) / lam
    assert np.max(np.abs(backend.to_numpy(inv) - expected)) / np.abs(expected).max() < 8 * kappa * np.finfo(dtype).eps
    assert not backend.to_numpy(flagged).any()


@pytest.mark.parametrize("dtype, scale", [("float32", 1e8), ("float32", 1e20), ("float64", 1e17), ("float64", 1e200)])
def test_stable_inverse_raises_a_lost_damping_to_the_precision_floor(backend, dtype, scale):
    """[closed form] F = s·vvᵀ (‖v‖ = 1) with s/λ far beyond 1/ε: LU of F + λI is garbage (or raises:
    singular in the working precision). With λ_b = τ‖F‖_F = τs the result is
    (sI·vvᵀ + λ_b I)^{-1} = (I - vvᵀ s/(s + λ_b))/λ_b, to the accuracy the floor guarantees
    (relative error about κε = ε(s + λ_b)/λ_b ≈ accuracy; tolerance 2·accuracy): finite, every
    eigenvalue at most 1/λ_b < 1/λ (so never longer than the exact damped step), and not failed (the
    raised damping's result is used, the previous inverse is not kept). s = 1e20 in
    float32 and 1e200 in float64: ‖F‖_F² overflows unless the norm is scaled first."""
    v = np.array([1.0, -2.0, 2.0]) / 3.0
    stats = (scale * np.outer(v, v))[None].astype(dtype)
    lam = 1e-3
    prev = np.eye(3)[None].astype(dtype) * 7.0
    inv, failed = damped_inverse_stable(backend.asarray(stats), lam, backend.asarray(prev))
    out = backend.to_numpy(inv)[0].astype(np.float64)
    lam_b = _floor(dtype, scale * np.linalg.norm(np.outer(v, v)))  # ‖F‖_F without overflow
    assert lam_b > lam
    expected = (np.eye(3) - np.outer(v, v) * scale / (scale + lam_b)) / lam_b
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, expected, rtol=0, atol=2 * DAMPED_INVERSE_ACCURACY / lam_b)
    assert np.max(np.linalg.eigvalsh(out)) <= (1 + 2 * DAMPED_INVERSE_ACCURACY) / lam_b
    assert not bool(backend.to_numpy(failed)[0])


def test_exactly_singular_block_never_raises(backend):
    """float64, F = 1e17·11ᵀ, λ = 1e-3: F + λI rounds to an exactly singular matrix (NumPy/torch
    ``inv`` raise). :func:`damped_inverse` keeps the previous value and flags the block;
    :func:`damped_inverse_stable` inverts F + λ_b I with λ_b = τ‖F‖_F = τ·2e17 (finite, the
    direction (1, -1)/√2 whose damping was rounded away gets 1/λ_b, to the floor's accuracy), a
    result it uses, so it does not flag the block as failed."""
    stats = np.full((1, 2, 2), 1e17)
    prev = np.stack([np.eye(2) * 7.0])
    inv, failed = damped_inverse(backend.asarray(stats), 1e-3, backend.asarray(prev))
    out = backend.to_numpy(inv)
    assert np.all(np.isfinite(out))
    if not np.array_equal(out, prev):  # JAX's inv returns non-finite values instead: same outcome
        pytest.fail(f"a failed inverse must keep the previous value, got {out}")
    assert bool(backend.to_numpy(failed)[0])
    inv, failed = damped_inverse_stable(backend.asarray(stats), 1e-3, backend.asarray(prev))
    out = backend.to_numpy(inv)
    lam_b = _floor("float64", 2e17)
    assert np.all(np.isfinite(out))
    null = np.array([1.0, -1.0]) / np.sqrt(2.0)
    np.testing.assert_allclose(null @ out[0] @ null, 1 / lam_b, rtol=2 * DAMPED_INVERSE_ACCURACY)
    assert not bool(backend.to_numpy(failed)[0])


def test_residual_measures_the_inverse_error():
    """[derived] ‖(F + λI)X - I‖_F/√n is 0 for the exact inverse and ‖E‖_F/√n·... for a perturbed one:
    X = A^{-1} + δ·A^{-1} gives residual δ‖I‖_F/√n = δ."""
    rng = np.random.default_rng(4)
    u = rng.standard_normal((3, 4))
    stats = u[:, :, None] * u[:, None, :]
    exact = np.linalg.inv(stats + 0.5 * np.eye(4))
    np.testing.assert_allclose(damped_inverse_residual(stats, 0.5, exact), 0.0, atol=1e-13)
    np.testing.assert_allclose(damped_inverse_residual(stats, 0.5, 1.01 * exact), 0.01, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# spd_inverse: A^{-1} = L^{-T} L^{-1} with A = L L^T (Cholesky), the capturable inverse of SPD blocks.


def _spd_stack(k: int, conds: list, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, A^{-1}) in float64: a stack of Q diag(w) Q^T, one per condition number, eigenvalues
    log-spaced in [1/cond, 1], and its exact inverse Q diag(1/w) Q^T."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(conds), k, k)))
    w = np.stack([np.logspace(0.0, -np.log10(c), k) for c in conds])
    return (q * w[:, None, :]) @ q.mT, (q / w[:, None, :]) @ q.mT


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_spd_inverse_is_the_inverse_to_the_rounding_model(backend, dtype):
    """[rounding model; linalg.spd_inverse] For SPD A of order k and condition κ, the Cholesky
    inverse L^{-T} L^{-1} (torch) and the LU inverse (every other namespace, bit for bit the plain
    :func:`inverse`) are within a few k·u·κ of A^{-1}, relative (u the unit roundoff of the dtype;
    the rounding of A to the dtype alone costs about u·κ): tolerance 4·k·u·κ, per block."""
    k, conds = 12, [1.0, 1e2, 1e3 if dtype == "float32" else 1e8]
    a, exact = _spd_stack(k, conds, seed=5)
    got = spd_inverse(backend.xp, backend.asarray(a.astype(dtype)))
    out = backend.to_numpy(got)
    assert out.shape == a.shape and out.dtype == np.dtype(dtype)
    u = np.finfo(dtype).eps / 2
    for block, cond in enumerate(conds):
        error = np.linalg.norm(out[block] - exact[block]) / np.linalg.norm(exact[block])
        assert error <= 4 * k * u * cond, (block, cond, error)
    if backend.name != "torch":  # no triangular solve in the array API: the LU inverse
        np.testing.assert_array_equal(out, backend.to_numpy(inverse(backend.xp, backend.asarray(a.astype(dtype)))))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_spd_inverse_of_a_block_that_is_not_positive_definite_is_nan(dtype):
    """[linalg.spd_inverse] A block whose Cholesky fails (an eigenvalue -1/2: not positive definite)
    is NaN, as :func:`inverse` gives a singular block, so a caller's finiteness test rejects it alone;
    every other block of the stack is bit for bit what it is with that block positive definite (the
    blocks are independent)."""
    import array_api_compat.torch as xp
    import torch

    a, _ = _spd_stack(5, [1.0, 10.0, 100.0], seed=6)
    indefinite = a.copy()
    indefinite[1] = np.diag([1.0, 2.0, -0.5, 1.0, 3.0])
    got = spd_inverse(xp, torch.tensor(indefinite.astype(dtype))).numpy()
    want = spd_inverse(xp, torch.tensor(a.astype(dtype))).numpy()
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2]], want[[0, 2]])
    assert np.isfinite(want).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_spd_flag_changes_nothing_off_cuda(backend, dtype):
    """[linalg.inverse] ``symmetric_positive_definite=True`` routes only torch CUDA tensors to
    :func:`spd_inverse`; on a CPU and on every other namespace the inverse is the LU one, bit for
    bit (MBF's CPU trajectories are unchanged)."""
    a, _ = _spd_stack(6, [1.0, 1e3], seed=7)
    x = backend.asarray(a.astype(dtype))
    flagged = backend.to_numpy(inverse(backend.xp, x, symmetric_positive_definite=True))
    np.testing.assert_array_equal(flagged, backend.to_numpy(inverse(backend.xp, x)))
