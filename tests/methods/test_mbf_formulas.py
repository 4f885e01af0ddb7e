"""The named formula helpers of ``precond_ref.methods.mbf`` against their plain formulas.

Each test states the formula of the helper's docstring in the plainest loop NumPy allows and
compares in float64. Tolerances come from the rounding model: a sum of ``k`` products is within
``k * eps * sum|terms|`` of the exact value, and so is a loop that sums the same terms in another order.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

M = importlib.import_module("precond_ref.methods.mbf")  # the package re-exports the factory under this name
P = importlib.import_module("precond_ref.engine.parts")
#: the rule's configuration with the principled FC mini-blocks (the columns) and the authors' chunks
COLUMNS = M.MBFConfig(1e-3, 1e-3, 0.9, 0.9, 0.0, 0.999, 1e-8, "momentum", 0.0, "columns_avg", "principled")
CHUNKS = COLUMNS._replace(fc_blocks="official_chunks")

EPS = np.finfo(np.float64).eps


def _gram_tol(rows):
    """k eps sum_r |r r^T| for a sum of k outer products (the rows of ``rows``)."""
    k = rows.shape[0]
    return 4 * k * EPS * np.einsum("ri,rj->ij", np.abs(rows), np.abs(rows))


def test_faithful_chunk_statistic_is_the_mean_of_the_authors_chunks():
    """R^T R/(I+1), R = row-major reshape of H (O, I+1) to (I+1, O) (spec mbf.md 2.2 step 3): chunk r
    is the flat slice vec(H)[r O : (r+1) O], NOT a column of H; O != I+1 so the two differ."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 7))  # O = 4, I + 1 = 7
    flat = h.reshape(-1)
    chunks = np.stack([flat[r * 4 : (r + 1) * 4] for r in range(7)])
    plain = sum(np.outer(c, c) for c in chunks) / 7
    got = M._faithful_chunk_statistic(np, h)
    assert got.shape == (4, 4)
    np.testing.assert_array_less(np.abs(got - plain), _gram_tol(chunks) / 7 + 1e-300)
    columns = sum(np.outer(c, c) for c in h.T) / 7
    assert np.max(np.abs(columns - plain)) > 0.1  # the test can tell chunks from columns


def test_block_statistic_per_kind_is_the_plain_outer_product():
    """conv: g_b g_b^T per (o, c); block size 1: g*g; FC columns_avg: mean over the columns h_c h_c^T."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((3, 2, 4))
    got = M._block_statistic(np, COLUMNS, P.CONV, g)
    for o in range(3):
        for c in range(2):
            np.testing.assert_array_equal(got[o, c], np.outer(g[o, c], g[o, c]))  # one product each: exact
    np.testing.assert_array_equal(M._block_statistic(np, COLUMNS, P.ELEMENTWISE, g), g * g)
    h = rng.standard_normal((4, 5))
    plain = sum(np.outer(c, c) for c in h.T) / 5
    got = M._block_statistic(np, COLUMNS, P.FC, h)
    np.testing.assert_array_less(np.abs(got - plain), _gram_tol(h.T) / 5 + 1e-300)
    np.testing.assert_array_equal(M._block_statistic(np, CHUNKS, P.FC, h), M._faithful_chunk_statistic(np, h))


def test_precondition_per_kind_is_the_plain_block_product():
    """D_b = F_b^{-1} m_b: conv per (o, c); FC columns_avg F^{-1} H_m; the authors' chunks: every
    chunk r of vec(H_m) becomes F^{-1} r, written back to the same flat slice."""
    rng = np.random.default_rng(2)
    inv = rng.standard_normal((3, 2, 4, 4))
    m = rng.standard_normal((3, 2, 4))
    got = M._precondition(np, COLUMNS, P.CONV, inv, m)
    for o in range(3):
        for c in range(2):
            tol = 4 * 4 * EPS * (np.abs(inv[o, c]) @ np.abs(m[o, c]))
            np.testing.assert_array_less(np.abs(got[o, c] - inv[o, c] @ m[o, c]), tol + 1e-300)
    f_inv = rng.standard_normal((4, 4))
    h = rng.standard_normal((4, 7))
    tol_cols = 4 * 4 * EPS * (np.abs(f_inv) @ np.abs(h))
    np.testing.assert_array_less(np.abs(M._precondition(np, COLUMNS, P.FC, f_inv, h) - f_inv @ h), tol_cols + 1e-300)
    flat = h.reshape(-1)
    plain = np.concatenate([f_inv @ flat[r * 4 : (r + 1) * 4] for r in range(7)]).reshape(4, 7)
    tol = np.concatenate([4 * 4 * EPS * (np.abs(f_inv) @ np.abs(flat[r * 4 : (r + 1) * 4])) for r in range(7)]).reshape(4, 7)
    got = M._precondition(np, CHUNKS, P.FC, f_inv, h)
    np.testing.assert_array_less(np.abs(got - plain), tol + 1e-300)


def test_ema_statistic_keeps_the_statistic_when_the_new_one_is_not_finite():
    """F <- rho F + (1-rho) stat(g) (the same floating-point expression, so bitwise); a non-finite
    block keeps its F and counts one failure, the other blocks take their new value."""
    rng = np.random.default_rng(3)
    f, g, rho = rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((2, 2, 3)), np.float64(0.9)
    zero = np.zeros((), np.int32)
    new, count = P.finite_or_previous(np, M._ema_statistic(np, COLUMNS._replace(b2=rho), P.CONV, f, g), f, zero)
    np.testing.assert_array_equal(new, rho * f + (1.0 - rho) * (g[..., :, None] * g[..., None, :]))
    assert int(count) == 0
    g[0, 0, 0] = 1e200  # finite, its square overflows
    with np.errstate(over="ignore"):
        kept, count = P.finite_or_previous(np, M._ema_statistic(np, COLUMNS._replace(b2=rho), P.CONV, f, g), f, zero)
        expected = rho * f + (1.0 - rho) * (g[..., :, None] * g[..., None, :])
    np.testing.assert_array_equal(kept[0, 0], f[0, 0])
    np.testing.assert_array_equal(kept[0, 1], expected[0, 1])
    np.testing.assert_array_equal(kept[1], expected[1])
    assert int(count) == 1


def test_elementwise_inverse_is_the_reciprocal_with_a_fallback():
    """1/(v + lam) where v is finite (one rounding: bitwise), the previous value elsewhere, and the
    entries that were not finite."""
    v = np.array([0.0, 2.0, np.inf, np.nan])
    previous = np.full(4, 7.0)
    inverse, flagged = M._elementwise_inverse(np, COLUMNS._replace(damping=0.5), v, previous)
    np.testing.assert_array_equal(inverse, [1 / 0.5, 1 / 2.5, 7.0, 7.0])
    np.testing.assert_array_equal(flagged, [False, False, True, True])


def test_faithful_inverse_is_the_plain_inverse():
    """inv(F + lam I), not symmetrised: for a well-conditioned F + lam I the LU inverse is within
    c n eps kappa of the exact one (kappa = cond(F + lam I)); np.linalg.inv is the plain formula."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 5, 5))
    f = a @ a.mT + 0.01 * rng.standard_normal((3, 5, 5))  # slightly asymmetric: must not be symmetrised
    lam = 0.3
    plain = np.linalg.inv(f + lam * np.eye(5))
    got, flagged = M._faithful_inverse(f, lam, np.zeros_like(f))
    kappa = np.linalg.cond(f + lam * np.eye(5))
    tol = 50 * 5 * EPS * np.max(kappa) * np.max(np.abs(plain))
    assert np.max(np.abs(got - plain)) <= tol
    assert not np.any(flagged)


@pytest.mark.parametrize("beta,count", [(0.999, 0), (0.999, 4), (0.9, 30), (0.0, 3)])
def test_bias_correction_is_one_minus_beta_power(beta, count):
    """-expm1((i+1) log beta) == 1 - beta^(i+1): the direct form loses ~(i+2) eps beta^(i+1)/(1-beta^(i+1))
    relative to cancellation; beta = 0 gives exactly 1."""
    got = float(M._bias_correction(np, beta, np.asarray(count + 1, np.float64)))  # step i + 1 = count + 1
    plain = 1.0 - beta ** (count + 1)
    rel = 8 * (count + 2) * EPS * max(beta ** (count + 1), EPS) / plain
    assert abs(got - plain) <= rel * plain


def test_kl_clip_of_quadratic_is_kl_clip_factor_per_layer():
    """nu_k = min(1, sqrt(kappa/(alpha^2 q_k))), 1 where alpha^2 q_k <= kappa (q_k <= 0 included):
    for every layer k of the vector, the value :func:`precond_ref.linalg.kl_clip_factor` gives that
    layer alone (B7, spec mbf.md 2.4). Same operations per entry in the same order: equal to the
    last bit, whatever the CPU's sqrt rounding."""
    from precond_ref.linalg import kl_clip_factor, kl_clip_of_quadratic

    rng = np.random.default_rng(3)
    layers = [(rng.standard_normal((4, 3)), rng.standard_normal((4, 3))) for _ in range(5)]
    layers.append((np.zeros((2, 2)), np.zeros((2, 2))))  # q = 0: no clip
    layers.append((np.ones((2, 2)), -np.ones((2, 2))))  # q < 0: no clip (a non-symmetric faithful inverse)
    lr, kappa = 0.7, 0.5
    quadratics = np.stack([np.sum(d * m) for d, m in layers])
    got = kl_clip_of_quadratic(np, quadratics, lr, kappa)
    want = np.stack([kl_clip_factor(d, m, lr, kappa) for d, m in layers])
    np.testing.assert_array_equal(got, want)
    assert np.sum(got < 1) >= 2 and got[-1] == 1 and got[-2] == 1  # both branches taken


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
def test_quadratic_is_the_sum_of_the_products(shape):
    """<a, b> = sum over every axis of a * b (the KL clip's quadratic <D, m>, B7), as one dot
    product of the flattened arrays: within n eps sum|a b| of the loop over the n entries (Higham,
    Accuracy and Stability, eq. 3.5: any summation order of n products)."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    loop = 0.0
    for index in np.ndindex(*shape):
        loop += a[index] * b[index]
    got = M._quadratic(np, COLUMNS, a, b)
    assert got.shape == ()
    n = a.size
    assert abs(float(got) - loop) <= 2 * n * EPS * float(np.sum(np.abs(a * b)))
