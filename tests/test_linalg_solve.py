"""Batched damped inverses and solves (``precond_ref.linalg``) against closed forms, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from precond_ref.linalg import damped_inverse, damped_inverse_init, damped_solve


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
