"""Batched damped inverses and solves (``precond_ref.linalg``) against closed forms, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from precond_ref.linalg import (
    damped_inverse,
    damped_inverse_checked,
    damped_inverse_eigh,
    damped_inverse_init,
    damped_inverse_residual,
    damped_solve,
)


def _int0(backend, value=0):
    xp = backend.xp
    return xp.asarray(value, dtype=xp.int32)


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
    inv, failures = damped_inverse(backend.asarray(stats), lam, backend.asarray(prev), _int0(backend))
    out = backend.to_numpy(inv)
    assert out.dtype == np.dtype(dtype)
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * np.abs(expected).max())
    assert int(backend.to_numpy(failures)) == 0


def test_inverse_of_diagonal_blocks_is_reciprocal(backend):
    d = np.array([[0.0, 1.0, 4.0], [2.0, 0.5, 9.0]])
    stats = np.stack([np.diag(row) for row in d])
    lam = 0.25
    inv, _ = damped_inverse(backend.asarray(stats), lam, backend.asarray(np.zeros_like(stats)), _int0(backend))
    expected = np.stack([np.diag(1.0 / (row + lam)) for row in d])
    np.testing.assert_allclose(backend.to_numpy(inv), expected, rtol=1e-14, atol=1e-15)


def test_symmetrize_uses_the_symmetric_part(backend):
    """Non-symmetric input: principled inverts sym(F) + lam I, the plain call F + lam I."""
    f = np.array([[2.0, 10.0], [0.0, 3.0]])
    lam = 1.0
    prev = backend.asarray(np.zeros((2, 2)))
    sym_inv, _ = damped_inverse(backend.asarray(f), lam, prev, _int0(backend))
    raw_inv, _ = damped_inverse(backend.asarray(f), lam, prev, _int0(backend), symmetrize=False)
    sym = np.array([[3.0, 5.0], [5.0, 4.0]])  # sym(f) + I
    np.testing.assert_allclose(backend.to_numpy(sym_inv), np.linalg.inv(sym), rtol=1e-13)
    a = f + np.eye(2)
    # Closed form of a 2x2 inverse.
    expected_raw = np.array([[a[1, 1], -a[0, 1]], [-a[1, 0], a[0, 0]]]) / (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0])
    np.testing.assert_allclose(backend.to_numpy(raw_inv), expected_raw, rtol=1e-13)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_block_keeps_previous_inverse_and_counts(backend, bad):
    stats = np.stack([np.eye(2) * 3.0, np.eye(2), np.eye(2) * 2.0])
    stats[1, 0, 1] = stats[1, 1, 0] = bad
    prev = np.stack([np.eye(2) * 7.0] * 3)
    inv, failures = damped_inverse(backend.asarray(stats), 1.0, backend.asarray(prev), _int0(backend, 4))
    out = backend.to_numpy(inv)
    np.testing.assert_allclose(out[0], np.eye(2) / 4.0, rtol=1e-14)
    np.testing.assert_array_equal(out[1], prev[1])
    np.testing.assert_allclose(out[2], np.eye(2) / 3.0, rtol=1e-14)
    assert int(backend.to_numpy(failures)) == 5


def test_damping_may_be_a_0d_array(backend):
    xp = backend.xp
    stats = np.eye(3) * 2.0
    lam = xp.asarray(0.5, dtype=xp.float64)
    inv, failures = damped_inverse(backend.asarray(stats), lam, backend.asarray(np.zeros((3, 3))), _int0(backend))
    np.testing.assert_allclose(backend.to_numpy(inv), np.eye(3) / 2.5, rtol=1e-14)
    assert int(backend.to_numpy(failures)) == 0


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
    x, ok = damped_solve(backend.asarray(stats), lam, backend.asarray(rhs.astype(dtype)))
    expected = _sherman_morrison(u, lam) @ rhs
    out = backend.to_numpy(x)
    assert out.dtype == np.dtype(dtype)
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
    assert backend.to_numpy(ok).all()


def test_solve_flags_nonfinite_blocks_and_zeros_them(backend):
    stats = np.stack([np.eye(2), np.eye(2)])
    stats[0, 0, 0] = np.nan
    rhs = np.ones((2, 2, 1))
    x, ok = damped_solve(backend.asarray(stats), 1.0, backend.asarray(rhs))
    np.testing.assert_array_equal(backend.to_numpy(ok), [False, True])
    np.testing.assert_array_equal(backend.to_numpy(x)[0], np.zeros((2, 1)))
    np.testing.assert_allclose(backend.to_numpy(x)[1], np.full((2, 1), 0.5), rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# Large ‖F‖/λ (issue 16 item 2): the damping below the rounding of F.


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eigh_inverse_matches_sherman_morrison_when_resolved(backend, dtype):
    """[closed form] (uuᵀ + λI)^{-1} = (I - uuᵀ/(λ + ‖u‖²))/λ. With ‖u‖²/λ = 25 the rounding level
    ν = ε‖F‖_F is far below λ, so the eigh inverse is the exact one up to a few roundings of
    κ = 26: tolerance 8·κ·ε."""
    rng = np.random.default_rng(2)
    u = rng.standard_normal((5, 4))
    lam = float(np.min(np.sum(u * u, axis=-1))) / 25.0
    stats = (u[:, :, None] * u[:, None, :]).astype(dtype)
    inv, failures = damped_inverse_eigh(backend.asarray(stats), lam, backend.asarray(np.zeros_like(stats)), _int0(backend))
    expected = _sherman_morrison(u, lam)
    kappa = 1.0 + float(np.max(np.sum(u * u, axis=-1))) / lam
    tol = 8 * kappa * np.finfo(dtype).eps
    assert np.max(np.abs(backend.to_numpy(inv) - expected)) / np.abs(expected).max() < tol
    assert int(backend.to_numpy(failures)) == 0


def test_eigh_inverse_bounds_unresolved_eigenvalues(backend):
    """[derived] Eigenvalues of F below its rounding level ν = ε‖F‖_F are raised to ν, so every
    eigenvalue of the computed inverse is at most 1/(ν + λ) (up to rounding), however small λ:
    float32, F = diag(1e8, 0.5, 0) + rounding, λ = 1e-3. LU of the same F + λI in float32 gives
    eigenvalues up to 1/λ = 1e3 along the direction that F's storage cannot resolve."""
    stats = np.diag([1e8, 0.5, 0.0]).astype(np.float32)
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((3, 3)))
    stats = (q @ stats.astype(np.float64) @ q.T).astype(np.float32)
    lam = 1e-3
    inv, _ = damped_inverse_eigh(backend.asarray(stats), lam, backend.asarray(np.zeros_like(stats)), _int0(backend))
    out = backend.to_numpy(inv).astype(np.float64)
    assert np.all(np.isfinite(out))
    nu = np.finfo(np.float32).eps * np.linalg.norm(stats.astype(np.float64))
    # ν ≈ 12 > 0.5: both small eigenvalues are unresolved and raised to ν (1e-3: rounding of F).
    eigenvalues = np.linalg.eigvalsh((out + out.T) / 2)
    np.testing.assert_allclose(eigenvalues[1:], 1 / (nu + lam), rtol=1e-3)
    assert eigenvalues[0] < 1e-3 / (nu + lam)  # the resolved 1e8 direction stays small


def test_exactly_singular_block_never_raises(backend):
    """float64, F = 1e17·11ᵀ, λ = 1e-3: F + λI rounds to an exactly singular matrix (NumPy/torch
    ``inv`` raise). :func:`damped_inverse` keeps the previous value and counts a failure;
    :func:`damped_inverse_checked` recomputes by eigh (finite, eigenvalues <= 1/(ν + λ)) and
    counts one fallback. (ν = ε‖F‖_F = 2e17·ε ≈ 44.)"""
    stats = np.full((1, 2, 2), 1e17)
    prev = np.stack([np.eye(2) * 7.0])
    inv, failures = damped_inverse(backend.asarray(stats), 1e-3, backend.asarray(prev), _int0(backend))
    out = backend.to_numpy(inv)
    assert np.all(np.isfinite(out))
    if not np.array_equal(out, prev):  # JAX's inv returns non-finite values instead: same outcome
        pytest.fail(f"a failed inverse must keep the previous value, got {out}")
    assert int(backend.to_numpy(failures)) == 1
    inv, failures = damped_inverse_checked(backend.asarray(stats), 1e-3, backend.asarray(prev), _int0(backend))
    out = backend.to_numpy(inv)
    nu = np.finfo(np.float64).eps * 2e17
    assert np.all(np.isfinite(out))
    assert np.max(np.linalg.eigvalsh(out[0])) <= (1 + 1e-6) / (nu + 1e-3)
    null = np.array([1.0, -1.0]) / np.sqrt(2.0)  # the direction whose damping was rounded away
    np.testing.assert_allclose(null @ out[0] @ null, 1 / (nu + 1e-3), rtol=1e-6)
    assert int(backend.to_numpy(failures)) == 1


def test_checked_inverse_keeps_lu_result_and_counts_nothing_when_well_conditioned(backend):
    """[closed form] Well-conditioned blocks (κ <= 26): the LU inverse passes the residual check
    (residual ≈ n ε κ << 1e-2) and is returned unchanged, with no fallback counted."""
    rng = np.random.default_rng(4)
    u = rng.standard_normal((3, 4))
    stats = u[:, :, None] * u[:, None, :]
    prev = backend.asarray(np.zeros_like(stats))
    lu, _ = damped_inverse(backend.asarray(stats), 0.5, prev, _int0(backend))
    checked, failures = damped_inverse_checked(backend.asarray(stats), 0.5, prev, _int0(backend))
    np.testing.assert_array_equal(backend.to_numpy(checked), backend.to_numpy(lu))
    assert int(backend.to_numpy(failures)) == 0
    residual = backend.to_numpy(damped_inverse_residual(backend.asarray(stats), 0.5, checked))
    assert residual.shape == (3,) and np.all(residual < 1e-12)
