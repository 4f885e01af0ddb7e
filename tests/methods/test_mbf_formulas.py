"""The named formula helpers of ``precond_ref.methods.mbf`` against their plain formulas (issue 32 item 3).

Each test states the formula of the helper's docstring in the plainest loop NumPy allows and
compares in float64. Tolerances come from the rounding model: a sum of ``k`` products is within
``k * eps * sum|terms|`` of the exact value, and so is a loop that sums the same terms in another order.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

M = importlib.import_module("precond_ref.methods.mbf")  # the package re-exports the factory under this name

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
    got = M._block_statistic(np, M._CONV, g, chunks=False)
    for o in range(3):
        for c in range(2):
            np.testing.assert_array_equal(got[o, c], np.outer(g[o, c], g[o, c]))  # one product each: exact
    np.testing.assert_array_equal(M._block_statistic(np, M._ELEMENTWISE, g, chunks=False), g * g)
    h = rng.standard_normal((4, 5))
    plain = sum(np.outer(c, c) for c in h.T) / 5
    got = M._block_statistic(np, M._FC, h, chunks=False)
    np.testing.assert_array_less(np.abs(got - plain), _gram_tol(h.T) / 5 + 1e-300)
    np.testing.assert_array_equal(M._block_statistic(np, M._FC, h, chunks=True), M._faithful_chunk_statistic(np, h))


def test_precondition_per_kind_is_the_plain_block_product():
    """D_b = F_b^{-1} m_b: conv per (o, c); FC columns_avg F^{-1} H_m; the authors' chunks: every
    chunk r of vec(H_m) becomes F^{-1} r, written back to the same flat slice."""
    rng = np.random.default_rng(2)
    inv = rng.standard_normal((3, 2, 4, 4))
    m = rng.standard_normal((3, 2, 4))
    got = M._precondition(np, M._CONV, inv, m, chunks=False)
    for o in range(3):
        for c in range(2):
            tol = 4 * 4 * EPS * (np.abs(inv[o, c]) @ np.abs(m[o, c]))
            np.testing.assert_array_less(np.abs(got[o, c] - inv[o, c] @ m[o, c]), tol + 1e-300)
    f_inv = rng.standard_normal((4, 4))
    h = rng.standard_normal((4, 7))
    tol_cols = 4 * 4 * EPS * (np.abs(f_inv) @ np.abs(h))
    np.testing.assert_array_less(np.abs(M._precondition(np, M._FC, f_inv, h, chunks=False) - f_inv @ h), tol_cols + 1e-300)
    flat = h.reshape(-1)
    plain = np.concatenate([f_inv @ flat[r * 4 : (r + 1) * 4] for r in range(7)]).reshape(4, 7)
    tol = np.concatenate([4 * 4 * EPS * (np.abs(f_inv) @ np.abs(flat[r * 4 : (r + 1) * 4])) for r in range(7)]).reshape(4, 7)
    got = M._precondition(np, M._FC, f_inv, h, chunks=True)
    np.testing.assert_array_less(np.abs(got - plain), tol + 1e-300)


def test_ema_statistic_keeps_the_statistic_when_the_new_one_is_not_finite():
    """F <- rho F + (1-rho) stat(g) (the same floating-point expression, so bitwise); a non-finite
    result keeps F and counts one failure."""
    rng = np.random.default_rng(3)
    f, g, rho = rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((2, 2, 3)), np.float64(0.9)
    zero = np.zeros((), np.int32)
    new, count = M._ema_statistic(np, M._CONV, f, zero, g, rho, False)
    np.testing.assert_array_equal(new, rho * f + (1.0 - rho) * (g[..., :, None] * g[..., None, :]))
    assert int(count) == 0
    g[0, 0, 0] = 1e200  # finite, its square overflows
    with np.errstate(over="ignore"):
        kept, count = M._ema_statistic(np, M._CONV, f, zero, g, rho, False)
    np.testing.assert_array_equal(kept, f)
    assert int(count) == 1


def test_elementwise_inverse_is_the_reciprocal_with_a_fallback():
    """1/(v + lam) where v is finite (one rounding: bitwise), the previous value elsewhere, and a flag."""
    v = np.array([0.0, 2.0, np.inf, np.nan])
    previous = np.full(4, 7.0)
    inverse, flagged = M._elementwise_inverse(np, v, previous, 0.5)
    np.testing.assert_array_equal(inverse, [1 / 0.5, 1 / 2.5, 7.0, 7.0])
    assert bool(flagged)
    assert not bool(M._elementwise_inverse(np, v[:2], previous[:2], 0.5)[1])


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


def test_refresh_inverses_equals_one_group_at_a_time():
    """_refresh_inverses stacks the equal-size blocks of all groups (blocking.on_stacks); its result
    for a group must be the one it gives that group alone (bitwise: the same batched call per block),
    and a part is flagged iff one of ITS blocks was."""
    rng = np.random.default_rng(5)

    def psd(*shape):
        a = rng.standard_normal(shape + (shape[-1],))
        return a @ a.mT

    kinds = [M._FC, M._CONV, M._ELEMENTWISE, M._FC, M._CONV]
    stats = [psd(4), psd(3, 2, 4), np.abs(rng.standard_normal((4, 3))), psd(4), psd(2, 2, 4)]
    stats[3][0, 0] = np.nan  # the second FC group fails, the first must not
    previous = [np.full(s.shape, 2.0) for s in stats]
    inverses, flags = M._refresh_inverses(np, kinds, stats, previous, 0.1, M.damped_inverse_stable)
    for i in range(len(kinds)):
        alone, flag = M._refresh_inverses(np, kinds[i : i + 1], stats[i : i + 1], previous[i : i + 1], 0.1, M.damped_inverse_stable)
        np.testing.assert_array_equal(inverses[i], alone[0])
        assert inverses[i].shape == stats[i].shape
        assert bool(flags[i]) == bool(flag[0]) == (i == 3)
    np.testing.assert_array_equal(inverses[3], previous[3])  # a non-finite block keeps its previous inverse


@pytest.mark.parametrize("beta,count", [(0.999, 0), (0.999, 4), (0.9, 30), (0.0, 3)])
def test_bias_correction_is_one_minus_beta_power(beta, count):
    """-expm1((i+1) log beta) == 1 - beta^(i+1): the direct form loses ~(i+2) eps beta^(i+1)/(1-beta^(i+1))
    relative to cancellation; beta = 0 gives exactly 1."""
    got = float(M._bias_correction(np, beta, np.asarray(count), np.float64))
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


def test_join_rows_of_one_row_stack_is_a_view():
    """_join_rows inverts _split_rows; a layer cut into full blocks only (no tail) is one stack, joined
    back by a reshape (a view of the preconditioned stack, not a copy: the per-step stitch of the
    momentum's blocks costs no pass over the layer)."""
    h = np.arange(12.0 * 5).reshape(12, 5)
    parts = M._parts(M._FC, (12, 5), 4)
    assert len(parts) == 1
    pieces = M._split_rows(np, h, parts)
    joined = M._join_rows(np, pieces, parts)
    np.testing.assert_array_equal(joined, h)
    assert np.shares_memory(joined, pieces[0])
    tailed = M._parts(M._FC, (14, 5), 4)  # three blocks and a tail of 2: a concatenation
    h14 = np.arange(14.0 * 5).reshape(14, 5)
    np.testing.assert_array_equal(M._join_rows(np, M._split_rows(np, h14, tailed), tailed), h14)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
def test_inner_is_the_sum_of_the_products(shape):
    """<a, b> = sum over every axis of a * b (the KL clip's quadratic <D, m>, B7), as one dot
    product of the flattened arrays: within n eps sum|a b| of the loop over the n entries (Higham,
    Accuracy and Stability, eq. 3.5: any summation order of n products)."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    loop = 0.0
    for index in np.ndindex(*shape):
        loop += a[index] * b[index]
    got = M._inner(np, a, b)
    assert got.shape == ()
    n = a.size
    assert abs(float(got) - loop) <= 2 * n * EPS * float(np.sum(np.abs(a * b)))


@pytest.mark.parametrize("namespace", ["numpy", "array_api_strict"])
def test_finite_or_previous_is_the_selection(namespace):
    """_finite_or_previous is (where(all(isfinite(new)), new, previous), failures + not all finite)
    exactly, whether the decision is read on the host (NumPy) or stays an array (array_api_strict,
    never read by host_bool): a finite new is kept, one non-finite entry keeps previous and counts."""
    xp = np if namespace == "numpy" else pytest.importorskip(namespace)
    previous = xp.asarray([[1.0, 2.0], [3.0, 4.0]])
    failures = xp.asarray(2, dtype=xp.int32)
    finite = xp.asarray([[5.0, 6.0], [7.0, 8.0]])
    got, count = M._finite_or_previous(xp, finite, previous, failures)
    np.testing.assert_array_equal(np.asarray(got), [[5.0, 6.0], [7.0, 8.0]])
    assert int(count) == 2
    overflowed = xp.asarray([[5.0, float("inf")], [7.0, 8.0]])
    got, count = M._finite_or_previous(xp, overflowed, previous, failures)
    np.testing.assert_array_equal(np.asarray(got), [[1.0, 2.0], [3.0, 4.0]])
    assert int(count) == 3


def test_canonical_permutes_only_out_last_kernels():
    """_canonical: a Flax ``kernel`` (s..., I, O) becomes out-first (O, I, s...), every other leaf
    is unchanged, and a tree without one is returned itself (no rebuilt tree on the step's path);
    the leaves it returns are the canonical tree's, and _restore inverts it."""
    rng = np.random.default_rng(9)
    torch_like = {"fc": {"bias": rng.standard_normal(3), "weight": rng.standard_normal((3, 2))}}
    tree, _, flags, leaves = M._canonical(torch_like)
    assert tree is torch_like and flags == [False, False]
    assert leaves[0] is torch_like["fc"]["bias"] and leaves[1] is torch_like["fc"]["weight"]
    flax_like = {"conv": {"kernel": rng.standard_normal((5, 4, 2, 3))}, "dense": {"kernel": rng.standard_normal((2, 3))}}
    tree, treedef, flags, leaves = M._canonical(flax_like)
    assert flags == [True, True]
    np.testing.assert_array_equal(tree["conv"]["kernel"], np.transpose(flax_like["conv"]["kernel"], (3, 2, 0, 1)))
    np.testing.assert_array_equal(tree["dense"]["kernel"], flax_like["dense"]["kernel"].T)
    assert leaves[0] is tree["conv"]["kernel"] and leaves[1] is tree["dense"]["kernel"]
    back = M._restore(tree, treedef, flags)
    np.testing.assert_array_equal(back["conv"]["kernel"], flax_like["conv"]["kernel"])
