"""Frequent Directions sketch (precond_ref.sketch) against an exact eigendecomposition.

Oracles are NumPy float64 eigendecompositions of the exact discounted statistic
G_t = sum_s beta^(t-s) X_s X_s^T; invariant ids refer to specs/fd_shampoo.md §6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from precond_ref.blocking import block_bounds, merge_small_dims, unfold
from precond_ref.sketch import (
    SUBSPACE_MIN_DIM,
    _in_units,
    _power_of_two_scale,
    _shrink,
    _weights,
    _split_by_basis,
    _probe,
    fd_apply,
    fd_apply_with_own_mass,
    fd_init,
    fd_update,
    fd_update_apply,
    resolve_decomposition,
    subspace_width,
)
from precond_ref.testing.oracles import fd_covariance

TOL = 1e-10


def _run(backend, d, k, xs, **kw):
    xp = backend.xp
    sketch = fd_init(xp, d, k, dtype=xp.float64, device=None)
    history = []
    for x in xs:
        sketch, ok = fd_update(xp, sketch, backend.asarray(x), **kw)
        assert bool(ok)
        history.append({key: backend.to_numpy(v) for key, v in sketch.items()})
    return history


def _exact(xs, beta):
    d = xs[0].shape[0]
    g = np.zeros((d, d))
    out = []
    for x in xs:
        g = beta * g + x @ x.T
        out.append(g.copy())
    return out


def _dense_cov(state):
    u, s = state["basis"], state["singular_values"]
    return (u * s**2) @ u.T


def _rho(state):
    """The escaped mass; the sketch stores its root."""
    return state["escaped_root"] ** 2


def _min_eig(a):
    return np.linalg.eigvalsh((a + a.T) / 2).min()


def _stream(seed, d, m, steps, rank_deficient=False):
    rng = np.random.default_rng(seed)
    scales = np.exp(-np.arange(d) / 2.0)  # a decaying spectrum, as in training
    xs = []
    for _ in range(steps):
        x = rng.standard_normal((d, m)) * scales[:, None]
        if rank_deficient:
            x = np.outer(rng.standard_normal(d) * scales, rng.standard_normal(m))
        xs.append(x)
    return xs


sizes = st.tuples(st.integers(2, 7), st.integers(1, 7), st.integers(1, 3), st.integers(1, 6)).map(
    lambda t: (t[0], min(t[1], t[0]), t[2], t[3])
)
# The exact decompositions of the FD step (the subspace iteration is approximate: tested below).
# "incremental" needs k + m < d and falls back to the SVD otherwise ("incremental_gram": to the
# Gram path); the sizes reach both.
EXACT_PATHS = st.sampled_from(["svd", "qr_svd", "gram", "incremental", "incremental_gram"])


@given(sizes=sizes, beta=st.sampled_from([1.0, 0.9, 0.5]), seed=st.integers(0, 2**16), path=EXACT_PATHS)
def test_sandwich(property_backend, sizes, beta, seed, path):
    """F-I1 (FD sandwich, Ghashami et al. 2016 Lemma; Sketchy Alg. 1 analysis):
    Ḡ_t ⪯ G_t^(β) ⪯ Ḡ_t + ρ_t I with the escaped mass decayed by β."""
    d, k, m, steps = sizes
    xs = _stream(seed, d, m, steps)
    states = _run(property_backend, d, k, xs, exponent=-0.5, decay=beta, eps=0.0, decomposition=path)
    for state, g in zip(states, _exact(xs, beta)):
        scale = max(1.0, np.abs(g).max())
        cov = _dense_cov(state)
        assert _min_eig(g - cov) >= -TOL * scale
        assert _min_eig(cov + _rho(state) * np.eye(d) - g) >= -TOL * scale


@given(sizes=sizes, beta=st.sampled_from([1.0, 0.9]), seed=st.integers(0, 2**16))
def test_sandwich_faithful_tail_decay(property_backend, sizes, beta, seed):
    """F-I1 with the authors' tail decay √β (≥ β): the upper bound holds with room,
    the lower bound is unaffected (the tail does not enter Ḡ)."""
    d, k, m, steps = sizes
    xs = _stream(seed, d, m, steps)
    states = _run(property_backend, d, k, xs, exponent=-0.5, decay=beta, tail_decay=math.sqrt(beta))
    for state, g in zip(states, _exact(xs, beta)):
        scale = max(1.0, np.abs(g).max())
        cov = _dense_cov(state)
        assert _min_eig(g - cov) >= -TOL * scale
        assert _min_eig(cov + _rho(state) * np.eye(d) - g) >= -TOL * scale


@given(sizes=sizes, beta=st.sampled_from([1.0, 0.9, 0.5]), seed=st.integers(0, 2**16), path=EXACT_PATHS)
def test_one_step_growth(property_backend, sizes, beta, seed, path):
    """F-I2 (derived from the FD step): (Ḡ_t + ρ_t I) − β(Ḡ_{t−1} + ρ_{t−1} I) ⪰ X_t X_tᵀ;
    for β = 1, Ḡ_t + ρ_t I is nondecreasing."""
    d, k, m, steps = sizes
    xs = _stream(seed, d, m, steps + 1)
    states = _run(property_backend, d, k, xs, exponent=-0.5, decay=beta, decomposition=path)
    eye = np.eye(d)
    for prev, cur, x in zip(states, states[1:], xs[1:]):
        scale = max(1.0, np.abs(_dense_cov(cur)).max())
        growth = _dense_cov(cur) + _rho(cur) * eye - beta * (_dense_cov(prev) + _rho(prev) * eye)
        assert _min_eig(growth - x @ x.T) >= -TOL * scale
        assert _rho(cur) >= beta * _rho(prev) - TOL * scale


@given(sizes=sizes, seed=st.integers(0, 2**16), path=EXACT_PATHS)
def test_escaped_trace_and_tail_bound(property_backend, sizes, seed, path):
    """F-I3 and F-I4 (β = 1; Ghashami et al. 2016 Thm. 1.1 / Sketchy Lemma on ρ):
    tr(G_T) − tr(Ḡ_T) ≥ (k+1)·ρ_T and ρ_T ≤ min_{0≤j≤k} λ_{j+1:d}(G_T)/(k+1−j)."""
    d, k, m, steps = sizes
    xs = _stream(seed, d, m, steps)
    state = _run(property_backend, d, k, xs, exponent=-0.5, decay=1.0, decomposition=path)[-1]
    g = _exact(xs, 1.0)[-1]
    rho = _rho(state)
    scale = max(1.0, np.trace(g))
    assert np.trace(g) - np.trace(_dense_cov(state)) >= (k + 1) * rho - TOL * scale
    lam = np.sort(np.linalg.eigvalsh(g))[::-1]
    bound = min(lam[j:].sum() / (k + 1 - j) for j in range(0, min(k, d - 1) + 1))
    assert rho <= bound + TOL * scale
    if k < d:
        assert rho <= lam[k:].sum() + TOL * scale


@given(sizes=sizes, beta=st.sampled_from([1.0, 0.9]), seed=st.integers(0, 2**16), path=EXACT_PATHS)
def test_sketch_is_shrunk_top_k(property_backend, sizes, beta, seed, path):
    """F-I5 (definition of the FD step): the new sketch has the top-k eigenvectors of
    βḠ_{t−1} + XXᵀ with eigenvalues (λ_i − λ_{k+1})₊."""
    d, k, m, steps = sizes
    xs = _stream(seed, d, m, steps + 1)
    states = _run(property_backend, d, k, xs, exponent=-0.5, decay=beta, decomposition=path)
    prev, cur, x = states[-2], states[-1], xs[-1]
    target = beta * _dense_cov(prev) + x @ x.T
    lam = np.sort(np.linalg.eigvalsh(target))[::-1]
    shrink = lam[k] if k < d else 0.0
    expected = np.clip(lam[:k] - shrink, 0.0, None)
    scale = max(1.0, lam[0])
    np.testing.assert_allclose(np.sort(cur["singular_values"] ** 2)[::-1], expected, atol=1e-9 * scale)
    # Eigenvectors: Ḡ' equals the shrunk spectral truncation of the target.
    w, v = np.linalg.eigh(target)
    order = np.argsort(w)[::-1][:k]
    dense = (v[:, order] * np.clip(w[order] - shrink, 0, None)) @ v[:, order].T
    np.testing.assert_allclose(_dense_cov(cur), dense, atol=1e-8 * scale)


@given(sizes=sizes, exponent=st.sampled_from([-0.5, -0.25, -1 / 6]), seed=st.integers(0, 2**16),
       eps=st.sampled_from([0.0, 1e-3]))
def test_apply_equals_dense_operator(property_backend, sizes, exponent, seed, eps):
    """F-I7 (derived): U diag(w) Uᵀx + w_⊥(I − UUᵀ)x = (Ḡ + ρI + ε_abs I)^a x when every retained
    σ' > 0 and ρ > 0; with ρ = 0 the complement (null space) gets weight 0 (pseudo-inverse).
    Run with the K3 cutoff, so that rounding-level directions count as null space."""
    d, k, m, steps = sizes
    xs = _stream(seed, d, m, steps)
    xp = property_backend.xp
    sketch = fd_init(xp, d, k, dtype=xp.float64, device=None)
    for x in xs:
        sketch, _ = fd_update(xp, sketch, property_backend.asarray(x), exponent=exponent, decay=0.9,
                              eps=eps, relative_eps=True, cutoff=True)
    state = {key: property_backend.to_numpy(v) for key, v in sketch.items()}
    sig, rho = state["singular_values"], float(_rho(state))
    undeflated = sig**2 + rho
    eps_abs = eps * undeflated.max()
    cov = _dense_cov(state) + rho * np.eye(d)
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    in_range = np.zeros(d, bool)
    if rho > 0:
        in_range[:] = True
    else:  # pseudo-inverse on the range of Ḡ only
        in_range = w > 1e-9 * max(1.0, w.max())
    powered = np.where(in_range, np.where(in_range, w + eps_abs, 1.0) ** exponent, 0.0)
    dense = (v * powered) @ v.T
    y = np.random.default_rng(seed + 1).standard_normal((d, 3))
    got = property_backend.to_numpy(fd_apply(xp, sketch, property_backend.asarray(y)))
    expect = dense @ y
    np.testing.assert_allclose(got, expect, rtol=1e-8, atol=1e-8 * np.abs(expect).max())


@given(d=st.integers(1, 6), m=st.integers(1, 3), steps=st.integers(1, 5), seed=st.integers(0, 2**16),
       beta=st.sampled_from([1.0, 0.9]), path=EXACT_PATHS)
def test_full_rank_is_exact(property_backend, d, m, steps, seed, beta, path):
    """F-I6 (k ≥ d): no mass escapes (ρ ≡ 0) and Ḡ_t equals the exact discounted statistic."""
    xs = _stream(seed, d, m, steps)
    states = _run(property_backend, d, d, xs, exponent=-0.5, decay=beta, decomposition=path)
    for state, g in zip(states, _exact(xs, beta)):
        assert _rho(state) == 0.0
        np.testing.assert_allclose(_dense_cov(state), g, atol=1e-10 * max(1.0, np.abs(g).max()))


def test_faithful_weights_match_authors_formula(backend):
    """The authors' own unit test (tearfree sketchy_test.test_epsilon): a sketch e_0 with tail 4,
    gradient 2·e_0 ⊗ e_0 on a 4x4 tensor, rank 1, no decay: w = (8·1.001)^(-1/4) with relative ε =
    1e-3, (8 + 1e-3)^(-1/4) with absolute ε."""
    xp = backend.xp
    d = 4
    sketch = fd_init(xp, d, 1, dtype=xp.float64, device=None)
    sketch = dict(sketch)
    sketch["basis"] = backend.asarray(np.eye(d, 1))
    sketch["escaped_root"] = backend.asarray(np.asarray(2.0))
    grad = np.zeros((d, d))
    grad[0, 0] = 2.0
    x = backend.asarray(grad)
    for relative, expected_w, expected_tail in (
        (True, (8 * 1.001) ** -0.25, (4 + 8e-3) ** -0.25),
        (False, (8 + 1e-3) ** -0.25, (4 + 1e-3) ** -0.25),
    ):
        new, ok = fd_update(xp, sketch, x, exponent=-0.25, decay=1.0, eps=1e-3, relative_eps=relative)
        assert bool(ok)
        np.testing.assert_allclose(backend.to_numpy(new["basis_weights"]), [expected_w], rtol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(new["complement_weight"]), expected_tail, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backends_agree_with_numpy(backend, dtype):
    """A few FD steps on every backend equal the NumPy result; the dtype is preserved."""
    import array_api_compat.numpy as np_xp

    d, k = 6, 2
    xs = [x.astype(dtype) for x in _stream(3, d, 3, 4)]
    ref = fd_init(np_xp, d, k, dtype=getattr(np_xp, dtype), device=None)
    xp = backend.xp
    got = fd_init(xp, d, k, dtype=getattr(xp, dtype), device=None)
    y = _stream(9, d, 2, 1)[0].astype(dtype)
    for x in xs:
        ref, _ = fd_update(np_xp, ref, x, exponent=-0.25, decay=0.9, eps=1e-7, relative_eps=True)
        got, _ = fd_update(xp, got, backend.asarray(x), exponent=-0.25, decay=0.9, eps=1e-7)
    for key in ref:
        assert got[key].dtype == getattr(xp, dtype)
    rtol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(backend.to_numpy(got["escaped_root"]), ref["escaped_root"], rtol=rtol)
    np.testing.assert_allclose(backend.to_numpy(got["basis_weights"]), ref["basis_weights"], rtol=rtol)
    np.testing.assert_allclose(backend.to_numpy(fd_covariance(xp, got)), fd_covariance(np_xp, ref),
                               rtol=rtol, atol=rtol * np.abs(fd_covariance(np_xp, ref)).max())
    out = backend.to_numpy(fd_apply(xp, got, backend.asarray(y)))
    np.testing.assert_allclose(out, fd_apply(np_xp, ref, y), rtol=rtol, atol=rtol * np.abs(out).max())


@pytest.mark.parametrize("m", [2, 12])
def test_gram_path_matches_svd(m):
    """K7: the Gram-eigh decomposition gives the same sketch as the SVD (both Gram orientations)."""
    import array_api_compat.numpy as xp

    d, k = 8, 3
    a = fd_init(xp, d, k, dtype=xp.float64, device=None)
    b = fd_init(xp, d, k, dtype=xp.float64, device=None)
    y = _stream(5, d, 2, 1)[0]
    for x in _stream(4, d, m, 5):
        a, _ = fd_update(xp, a, x, exponent=-0.25, decay=0.9, eps=1e-7)
        b, _ = fd_update(xp, b, x, exponent=-0.25, decay=0.9, eps=1e-7, decomposition="gram")
    np.testing.assert_allclose(_rho(b), _rho(a), rtol=1e-8)
    np.testing.assert_allclose(fd_covariance(xp, b), fd_covariance(xp, a), atol=1e-8)
    np.testing.assert_allclose(fd_apply(xp, b, y), fd_apply(xp, a, y), rtol=1e-7)


def test_zero_input_stays_zero():
    """F-I14 at the sketch level: zero statistics give an all-zero, finite sketch and output."""
    import array_api_compat.numpy as xp

    s = fd_init(xp, 5, 2, dtype=xp.float64, device=None)
    with np.errstate(all="raise"):  # no 0 ** negative is ever formed
        for _ in range(3):
            s, ok = fd_update(xp, s, np.zeros((5, 4)), exponent=-0.5, eps=0.0)
            assert bool(ok)
    for v in s.values():
        assert np.all(v == 0.0)
    assert np.all(fd_apply(xp, s, np.ones((5, 2))) == 0.0)


ALL_PATHS = ["svd", "qr_svd", "gram", "incremental", "incremental_gram", "subspace"]


@pytest.mark.parametrize("path", ALL_PATHS)
def test_nonfinite_input_keeps_previous_sketch(path):
    """K4, per block of a stack: a block whose input is not finite keeps its previous sketch
    bit for bit and reports it; the other block is updated as if alone."""
    import array_api_compat.numpy as xp

    d, k = 8, 2
    s = fd_init(xp, d, k, dtype=xp.float64, device=None, batch=(2,))
    s, _ = fd_update(xp, s, np.stack(_stream(1, d, 2, 2)), exponent=-0.5, decomposition=path)
    x = np.stack(_stream(2, d, 2, 2))
    x[1, 3, 0] = np.nan
    with np.errstate(all="ignore"):
        new, ok = fd_update(xp, s, x, exponent=-0.5, decomposition=path)
    assert ok.tolist() == [True, False]
    alone, _ = fd_update(xp, {key: v[0] for key, v in s.items()}, x[0], exponent=-0.5, decomposition=path)
    for key in s:
        np.testing.assert_array_equal(new[key][1], s[key][1])
        np.testing.assert_allclose(new[key][0], alone[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", ["svd", "incremental", "incremental_gram", "subspace"])
def test_failed_decomposition_keeps_previous_sketch(path, monkeypatch):
    """K4: a decomposition that returns NaN (JAX's SVD/eigh on failure) leaves the sketch bit for bit
    as it was, including the incremental path, whose fallback is the rotation [I; 0] of the basis."""
    import array_api_compat.numpy as xp

    d, k = 8, 2
    s, _ = fd_update(xp, fd_init(xp, d, k, dtype=xp.float64, device=None), _stream(1, d, 1, 1)[0],
                     exponent=-0.5, decomposition=path)

    def poisoned(decomposition):
        def call(*args, **kwargs):
            return tuple(np.full_like(np.asarray(a), np.nan) for a in decomposition(*args, **kwargs))
        return call

    for name in ("svd", "eigh"):
        monkeypatch.setattr(xp.linalg, name, poisoned(getattr(xp.linalg, name)))
    with np.errstate(all="ignore"):
        new, ok = fd_update(xp, s, _stream(2, d, 1, 1)[0], exponent=-0.5, decomposition=path)
    assert not bool(ok)
    for key in s:
        np.testing.assert_array_equal(new[key], s[key])


@pytest.mark.parametrize("path", ALL_PATHS)
def test_stacked_sketches_are_independent(path):
    """Equal-shape blocks updated by one batched call equal the blocks updated one at a time."""
    import array_api_compat.numpy as xp

    d, k, blocks = 12, 3, 3
    stacked = fd_init(xp, d, k, dtype=xp.float64, device=None, batch=(blocks,))
    single = [fd_init(xp, d, k, dtype=xp.float64, device=None) for _ in range(blocks)]
    streams = [_stream(seed, d, 4, 3) for seed in range(blocks)]
    for t in range(3):
        stacked, ok = fd_update(xp, stacked, np.stack([s[t] for s in streams]), exponent=-0.25, decay=0.9,
                                eps=1e-7, cutoff=True, decomposition=path)
        assert ok.tolist() == [True] * blocks
        single = [fd_update(xp, one, s[t], exponent=-0.25, decay=0.9, eps=1e-7, cutoff=True,
                            decomposition=path)[0] for one, s in zip(single, streams)]
    for b in range(blocks):
        np.testing.assert_allclose(fd_covariance(xp, stacked)[b], fd_covariance(xp, single[b]), rtol=1e-10,
                                   atol=1e-12 * np.abs(fd_covariance(xp, single[b])).max())
        for key in ("escaped_root", "basis_weights", "complement_weight"):
            np.testing.assert_allclose(stacked[key][b], single[b][key], rtol=1e-10)


def test_incremental_path_is_exact_and_tall_only():
    """Brand's incremental SVD: with k + m < d the sketch equals the SVD path's to rounding
    (the same FD step, F-I5), in float64 and float32 (tolerance: a few ulps of the dtype times
    the largest singular value, as for the SVD itself)."""
    import array_api_compat.numpy as xp

    d, k, m = 40, 6, 3
    for dtype, tol in ((xp.float64, 1e-12), (xp.float32, 2e-5)):
        a = fd_init(xp, d, k, dtype=dtype, device=None)
        b = fd_init(xp, d, k, dtype=dtype, device=None)
        for x in _stream(3, d, m, 8):
            x = x.astype(dtype)
            a, _ = fd_update(xp, a, x, exponent=-0.5, decay=0.9, cutoff=True, decomposition="svd")
            b, _ = fd_update(xp, b, x, exponent=-0.5, decay=0.9, cutoff=True, decomposition="incremental")
        scale = np.abs(fd_covariance(xp, a)).max()
        np.testing.assert_allclose(fd_covariance(xp, b), fd_covariance(xp, a), atol=tol * scale)
        np.testing.assert_allclose(_rho(b), _rho(a), rtol=50 * tol)
        u = b["basis"].astype(np.float64)
        np.testing.assert_allclose(u.T @ u, np.eye(k), atol=10 * tol)


@pytest.mark.parametrize("path", ["incremental", "gram"])
def test_exact_paths_by_the_cuda_routes_are_the_svd_path(path, monkeypatch):
    """The incremental path's float32 core goes through ``linalg.left_singular``'s float64 Gram (on
    every device with float64) and, on CUDA, the Gram path's eigh through ``symmetric_eigh``'s
    float64 ``syevd`` (taken here on CPU tensors):
    the float32 sketch still equals the SVD path's to the tolerance of
    ``test_incremental_path_is_exact_and_tall_only`` (a few ulps times the largest singular
    value). This checks the routes' wiring into the FD step (order of the pairs, the frame's data
    W^T [coords; corner]); their accuracy on ill-conditioned matrices is test_linalg's."""
    torch = pytest.importorskip("torch")
    import array_api_compat.numpy as xp
    import array_api_compat.torch as txp

    from precond_ref import linalg

    monkeypatch.setattr(linalg, "_cuda_float32", lambda ns, a: ns is txp and a.dtype == torch.float32)
    d, k, m, tol = 40, 6, 3, 2e-5
    if path == "gram":
        d = 36  # k + m < d: the Gram path's n x n Gram; order 36 is one torch gives syevj on CUDA
        m = 34  # n = k + m >= d: the d x d Gram
    a = fd_init(xp, d, k, dtype=xp.float32, device=None)
    b = fd_init(txp, d, k, dtype=torch.float32, device="cpu")
    for x in _stream(3, d, m, 8):
        x = x.astype(np.float32)
        a, _ = fd_update(xp, a, x, exponent=-0.5, decay=0.9, cutoff=True, decomposition="svd")
        b, _ = fd_update(txp, b, torch.from_numpy(x), exponent=-0.5, decay=0.9, cutoff=True, decomposition=path)
    b = {key: value.numpy() for key, value in b.items()}
    scale = np.abs(fd_covariance(xp, a)).max()
    np.testing.assert_allclose(fd_covariance(xp, b), fd_covariance(xp, a), atol=tol * scale)
    np.testing.assert_allclose(_rho(b), _rho(a), rtol=50 * tol)


def _rotating_stream(seed, d, m, steps):
    """Gradients from a slowly rotating basis with a decaying spectrum (the top quarter of the
    directions holds about 95% of the mass), as training gradients are described in the paper."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    spec = np.exp(-np.arange(d) / (d / 12))
    xs = []
    for t in range(steps):
        if t:
            a = rng.standard_normal((d, d)) * 0.01
            basis = np.linalg.qr(basis + basis @ (a - a.T) * 0.5)[0]
        xs.append(basis @ (rng.standard_normal((d, m)) * np.sqrt(spec)[:, None]))
    return xs


def test_subspace_is_exact_when_the_range_fits():
    """The subspace iteration's Rayleigh-Ritz step is exact when the statistic's range (here a
    fixed 7-dimensional subspace, rank 7 < width = k + 4) lies in the span of the iterate, which
    one power step from a generic start reaches: it then equals the exact FD step to rounding
    (eigenvalues of Q^T M Q carry u * lambda_1)."""
    import array_api_compat.numpy as xp

    d, k, r, m = 64, 3, 7, 80
    rng = np.random.default_rng(5)
    span = np.linalg.qr(rng.standard_normal((d, r)))[0]
    a = fd_init(xp, d, k, dtype=xp.float64, device=None)
    b = fd_init(xp, d, k, dtype=xp.float64, device=None)
    for _ in range(4):
        x = span @ (rng.standard_normal((r, m)) * np.array([3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3])[:, None])
        a, _ = fd_update(xp, a, x, exponent=-0.25, decay=0.9, cutoff=True, decomposition="svd")
        b, ok = fd_update(xp, b, x, exponent=-0.25, decay=0.9, cutoff=True, decomposition="subspace")
        assert bool(ok)
        scale = np.abs(fd_covariance(xp, a)).max()
        np.testing.assert_allclose(fd_covariance(xp, b), fd_covariance(xp, a), atol=1e-11 * scale)
        np.testing.assert_allclose(_rho(b), _rho(a), rtol=1e-9)


def test_subspace_step_of_a_few_nonzero_rows_converges():
    """A cold subspace step on an embedding-like gradient (17 nonzero rows of 1024, float32, rank
    256): the iterate's completion columns give the Rayleigh-Ritz matrix a zero block of subnormal
    rounding noise, on which torch's CPU float32 ``eigh`` (MKL ``ssyevd``) failed to converge and
    raised (training stopped on the bench's GPT with ``decomposition="subspace"``). The Ritz matrix
    is decomposed in float64 (``linalg.eigh_widened``); the step is then finite and holds the
    17-dimensional range."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    for seed in range(3):
        rng = np.random.default_rng(seed)
        x = np.zeros((1024, 128), dtype=np.float32)
        rows = rng.permutation(1024)[:17]
        x[rows] = rng.standard_normal((17, 128)).astype(np.float32)
        sketch = fd_init(xp, 1024, 256, dtype=xp.float32, device="cpu")
        new, ok = fd_update(xp, sketch, torch.from_numpy(x), exponent=-0.25, cutoff=True, decomposition="subspace")
        assert bool(ok)
        sigma = new["singular_values"].numpy()
        assert int(np.count_nonzero(sigma)) == 17
        basis = new["basis"].numpy()[:, sigma > 0]
        # the retained directions span x's rows: projecting x on them leaves rounding only
        residual = x - basis @ (basis.T @ x)
        assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(x)


def test_subspace_as_wide_as_the_axis_is_the_gram_path():
    """Where ``subspace_width(d, k)`` reaches d the iterate spans the whole axis: the FD step takes
    the exact Gram path (d x d eigh), bitwise its result. (The Rayleigh-Ritz matrix of such an
    iterate, mostly zeros for a sketch of 29 retained directions of 128, made torch's one-thread
    CPU ``ssyevd`` fail to converge on the bench's GPT with ``decomposition="subspace"``.)"""
    import array_api_compat.numpy as xp

    d, k, m = 128, 128, 64
    assert subspace_width(d, k) >= d
    rng = np.random.default_rng(3)
    a = fd_init(xp, d, k, dtype=xp.float32, device=None)
    b = fd_init(xp, d, k, dtype=xp.float32, device=None)
    for _ in range(3):
        x = rng.standard_normal((d, m)).astype(np.float32)
        a, _ = fd_update(xp, a, x, exponent=-0.25, cutoff=True, decomposition="gram")
        b, ok = fd_update(xp, b, x, exponent=-0.25, cutoff=True, decomposition="subspace")
        assert bool(ok)
        for name in a:
            np.testing.assert_array_equal(b[name], a[name])


def test_subspace_tail_error():
    """The approximation error of the subspace path (one warm-started power step, Rayleigh-Ritz,
    oversampling k/8) against the exact FD step on a rotating stream, d = 128, k = 32, m = 128,
    beta = 0.999 -- the figures docs/methods/sketchy.md reports, with room:

    * first (cold) step: direction error <= 0.2, escaped mass >= 0.5 of the exact (measured 0.10, 0.68);
    * from the 5th step: one-step sandwich Gbar' <= beta Gbar + X X^T <= Gbar' + c^2 I violated by at
      most 5e-3 lambda_1 (measured 2.3e-3; the lower side holds), escaped mass 0.8-1.0 of the exact
      one (measured 0.88-0.92), direction (Gbar + rho I + eps)^(-1/4) y within 5e-2 (measured 3.2e-2);
    * the accumulated sandwich G_t <= Gbar_t + rho_t I violated by at most 1e-2 lambda_1 at the end.
    """
    import array_api_compat.numpy as xp

    d, k, m, beta = 128, 32, 128, 0.999
    exact = fd_init(xp, d, k, dtype=xp.float64, device=None)
    approx = fd_init(xp, d, k, dtype=xp.float64, device=None)
    y = np.random.default_rng(1).standard_normal((d, 8))
    g = np.zeros((d, d))
    opts = dict(exponent=-0.25, decay=beta, eps=1e-7, cutoff=True)
    for t, x in enumerate(_rotating_stream(0, d, m, 12)):
        g = beta * g + x @ x.T
        lam1 = np.linalg.eigvalsh(g)[-1]
        target = beta * fd_covariance(xp, approx) + x @ x.T
        prev_rho = _rho(approx)
        exact, _ = fd_update(xp, exact, x, decomposition="svd", **opts)
        approx, ok = fd_update(xp, approx, x, decomposition="subspace", **opts)
        assert bool(ok)
        cov = fd_covariance(xp, approx)
        shrink = _rho(approx) - beta * prev_rho
        lower = _min_eig(target - cov) / lam1
        upper = _min_eig(cov + shrink * np.eye(d) - target) / lam1
        ratio = _rho(approx) / _rho(exact)
        want = fd_apply(xp, exact, y)
        error = np.linalg.norm(fd_apply(xp, approx, y) - want) / np.linalg.norm(want)
        if t == 0:
            assert error <= 0.2 and ratio >= 0.5
        elif t >= 4:
            assert lower >= -1e-12 and upper >= -5e-3, (t, lower, upper)
            assert 0.8 <= ratio <= 1.0 and error <= 5e-2, (t, ratio, error)
    assert _min_eig(cov + _rho(approx) * np.eye(d) - g) >= -1e-2 * lam1


def _rotate_null_spaces(monkeypatch, xp, seed=0):
    """Make the namespace's SVD, eigh and QR return another valid answer on every null space, as
    another backend's LAPACK may: singular vectors (eigenvectors, Q columns) whose value is at
    rounding level (<= 4 eps of the largest, below the FD step's 10 u noise level) are mixed by a
    random orthogonal matrix (a sign flip when alone), and those singular values (eigenvalues)
    replaced by random ones of at most eps of the largest (LAPACK gives exact zeros for the exact
    zero columns of an unfilled sketch, CuPy gives values near 1e-17)."""
    rng = np.random.default_rng(seed)
    svd, eigh, qr = xp.linalg.svd, xp.linalg.eigh, xp.linalg.qr

    def mix(vectors, values):
        vectors, values = np.array(vectors, copy=True), np.array(values, copy=True)
        flat_v = vectors.reshape((-1,) + vectors.shape[-2:])
        flat_s = values.reshape((-1, values.shape[-1]))
        for v, s in zip(flat_v, flat_s):
            eps = np.finfo(v.dtype).eps * max(np.abs(s).max(), np.finfo(v.dtype).tiny)
            null = np.flatnonzero(np.abs(s) <= 4 * eps)
            s[null] = rng.uniform(0.0, eps, len(null))
            null = null[null < v.shape[-1]]
            if len(null):
                v[:, null] = v[:, null] @ np.linalg.qr(rng.standard_normal((len(null), len(null))))[0]
        return vectors, values

    def rotated_svd(a, full_matrices=True):
        u, s, vh = svd(a, full_matrices=full_matrices)
        u, s = mix(u, s)
        return u, s, vh

    def rotated_eigh(a):
        w, v = eigh(a)
        v, w = mix(v, w)
        return w, v

    def rotated_qr(a, mode="reduced"):
        q, r = qr(a, mode=mode)
        q, _ = mix(q, np.diagonal(np.asarray(r), axis1=-2, axis2=-1))
        return q, r

    monkeypatch.setattr(xp.linalg, "svd", rotated_svd)
    monkeypatch.setattr(xp.linalg, "eigh", rotated_eigh)
    monkeypatch.setattr(xp.linalg, "qr", rotated_qr)


@pytest.mark.parametrize("path", ["svd", "qr_svd", "gram", "incremental", "incremental_gram"])
@pytest.mark.parametrize("faithful", [True, False])
def test_answer_does_not_depend_on_the_null_space_basis(path, faithful, monkeypatch):
    """While the sketch is not full (rank-deficient early steps, a vector with
    rank 3), the decomposition's null space has no preferred basis, and CuPy's, NumPy's and torch's
    differ. The sketch, the weights and the preconditioned direction must not depend on it:
    rounding-level directions join the complement (both modes). Checked by rotating every null
    space the decompositions return; tolerance: the outputs' rounding (float64, 1e-12 relative)."""
    import array_api_compat.numpy as xp

    d, k = 7, 3
    opts = dict(exponent=-0.5, decay=0.9, eps=1e-7, decomposition=path)
    opts.update(dict(tail_decay=0.9**0.5, noise_is_mass=True) if faithful else dict(cutoff=True))
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((d, 1)) for _ in range(5)]
    y = rng.standard_normal((d, 4))

    def run():
        s = fd_init(xp, d, k, dtype=xp.float64, device=None)
        outs = []
        for x in xs:
            s, ok = fd_update(xp, s, x, **opts)
            assert bool(ok)
            outs.append((fd_apply(xp, s, y), fd_covariance(xp, s), _rho(s), s["complement_weight"]))
        return outs

    plain = run()
    _rotate_null_spaces(monkeypatch, xp)
    rotated = run()
    for a, b in zip(plain, rotated):
        for u, v in zip(a, b):
            np.testing.assert_allclose(v, u, rtol=1e-12, atol=1e-12 * max(np.abs(u).max(), 1e-300))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("m", [1, 3])
def test_update_apply_is_update_then_apply(path, m):
    """fd_update_apply = (fd_update, fd_apply of the new sketch to the same x), on every path and
    for a stack, while the sketch fills and after mass escapes (d = 24, k = 3). Tolerances: the
    state agrees norm-wise, to 16 x d x eps of each entry's largest value (the incremental path's
    basis product has one more column, so BLAS may sum its length-d dot products in another
    order: the per-element difference of a small entry can be 1e-13 relative); the apply's own
    rounding, amplified by w_perp / w_min (here <= 1e3) in fd_apply's cancellation."""
    import array_api_compat.numpy as xp

    d, k = 24, 3
    a = fd_init(xp, d, k, dtype=xp.float64, device=None, batch=(2,))
    b = dict(a)
    opts = dict(exponent=-0.5, decay=0.95, eps=1e-7, delta=1e-2, cutoff=True, decomposition=path)
    for x in (np.stack(_stream(seed, d, m, 2)) for seed in range(6)):
        a, ok_a = fd_update(xp, a, x, **opts)
        b, ok_b, y = fd_update_apply(xp, b, x, **opts)
        assert ok_a.tolist() == ok_b.tolist() == [True, True]
        for key in a:
            scale = float(np.abs(a[key]).max())
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=16 * d * np.finfo(np.float64).eps * scale)
        want = fd_apply(xp, a, x)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e3 * 1e-15 * np.abs(want).max())


def test_split_by_basis_is_the_projection_and_its_orthogonal_rest():
    """_split_by_basis(U, x) = (U^T x, x - U U^T x) [definition], with the rest orthogonal to U to
    working precision even where x lies almost in span(U) (one Gram-Schmidt pass leaves a rest of
    rounding of x, u |x|, along U; the second leaves u |r|): float32, |U^T r| <= 8 d u |r| with |r| of
    1 and 1e-5 of |x|."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(4)
    d, k = 256, 8
    u32 = float(np.finfo(np.float32).eps) / 2
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0]
    for tilt in (1.0, 1e-5):
        x = basis @ rng.standard_normal((k, 1)) + tilt * rng.standard_normal((d, 1))
        coords, rest = _split_by_basis(xp, basis.astype(np.float32), x.astype(np.float32))
        np.testing.assert_allclose(coords, basis.T @ x, rtol=0, atol=8 * d * u32 * np.linalg.norm(x))
        np.testing.assert_allclose(rest, x - basis @ (basis.T @ x), rtol=0, atol=8 * d * u32 * np.linalg.norm(x))
        assert np.abs(basis.T @ rest.astype(np.float64)).max() <= 8 * d * u32 * np.linalg.norm(rest)


def _masses(weights):
    """The masses behind stored weights of exponent -1/2: w^-2, and 0 where w = 0."""
    return np.where(weights > 0, np.where(weights > 0, weights, 1.0) ** -2.0, 0.0)


@given(sizes=sizes, seed=st.integers(0, 2**16), delta=st.sampled_from([0.0, 1e-3]), scale=st.sampled_from([1e-8, 1.0, 1e8]))
def test_apply_with_own_mass_is_the_sketch_plus_the_frame_diagonal(property_backend, sizes, seed, delta, scale):
    """fd_apply_with_own_mass(x) = (S + D)^{+1/2}-inverse applied to x [derived, its docstring]: S the
    dense operator of the stored weights (masses w_i^-2 on U, w_perp^-2 on the complement), D
    diag(c_i^2, |r|^2) on the frame [U, r/|r|] with c = U^T x, r = x - U c; the pseudo-inverse on
    directions of zero mass. Sketches filling (pseudo-inverse complement) and full (mass escaped),
    with and without delta, data of any scale (the sketch's and x's alike); float64 on every backend."""
    d, k, m, steps = sizes
    xp = property_backend.xp
    sketch = fd_init(xp, d, k, dtype=xp.float64, device=None)
    for x in _stream(seed, d, m, steps):
        sketch, _ = fd_update(xp, sketch, property_backend.asarray(x * scale), exponent=-0.5, decay=0.9, eps=1e-7,
                              delta=delta * scale**2, cutoff=True)
    state = {key: property_backend.to_numpy(v) for key, v in sketch.items()}
    u = state["basis"]
    x = np.random.default_rng(seed + 1).standard_normal((d, 1)) * scale
    c = u.T @ x
    r = x - u @ c
    mass = (u * _masses(state["basis_weights"])) @ u.T + _masses(state["complement_weight"]) * (np.eye(d) - u @ u.T)
    norm = np.linalg.norm(r)
    own = (u * (c[:, 0] ** 2)) @ u.T + (r @ r.T if norm > 1e-14 * np.linalg.norm(x) else 0.0)
    values, vectors = np.linalg.eigh(mass + own)
    keep = values > 1e-12 * values.max()
    expect = (vectors * np.where(keep, np.where(keep, values, 1.0) ** -0.5, 0.0)) @ vectors.T @ x
    got = property_backend.to_numpy(fd_apply_with_own_mass(xp, sketch, property_backend.asarray(x)))
    np.testing.assert_allclose(got, expect, rtol=1e-7, atol=1e-7 * np.abs(expect).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_apply_with_own_mass_bounds_each_frame_coordinate_by_one(dtype):
    """|u_i^T y| <= 1 and |y - U U^T y| <= 1 for y = fd_apply_with_own_mass(x) [derived:
    c (mu + c^2)^{-1/2} <= 1], whatever the stored weights (0, 1e-30 to 1e30: a sketch of tiny
    mass applied to a large unseen x, the case where fd_apply's w_perp r is unbounded) and the
    scale of x; finite in float32 (no square overflows) and a stack of sketches at once."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(0)
    d, k, n = 9, 3, 6
    basis, _ = np.linalg.qr(rng.standard_normal((n, d, k)))
    basis[1, :, 2] = 0.0  # a masked direction (weight 0, zero column)
    weights = np.array([[1e30, 1.0, 1e-30], [1e3, 1e-3, 0.0], [0.0, 0.0, 0.0], [1e-3, 1e-3, 1e-3], [1e10, 1e10, 1e10], [1.0, 2.0, 3.0]])
    complement = np.array([1e30, 1e-30, 0.0, 1e3, 0.0, 1.0])
    sketch = {"basis": basis.astype(dtype), "basis_weights": weights.astype(dtype), "complement_weight": complement.astype(dtype)}
    for scale in (1e-30, 1e-3, 1.0, 1e3, 1e30):
        x = (rng.standard_normal((n, d, 1)) * scale).astype(dtype)
        with np.errstate(over="ignore"):  # w c of 1e60 overflows to inf on the way to +-1
            y = fd_apply_with_own_mass(xp, sketch, x).astype(np.float64)
        assert np.isfinite(y).all()
        coords = np.swapaxes(basis, -1, -2) @ y
        rest = np.linalg.norm(y - basis @ coords, axis=(-2, -1))
        slack = 1.0 + 64 * np.finfo(dtype).eps
        assert np.abs(coords).max() <= slack and rest.max() <= slack, (scale, np.abs(coords).max(), rest.max())
    with pytest.raises(ValueError, match="one column"):
        fd_apply_with_own_mass(xp, sketch, np.ones((n, d, 2), dtype=dtype))


@pytest.mark.parametrize("complement", [0.0, 1e6])
def test_apply_with_own_mass_of_x_in_the_span_is_the_span_part_alone(complement):
    """x in span(U) (a block whose gradient keeps to the directions the sketch holds): its residual
    is rounding, which counts as 0 as in the FD step's cutoff [the helper's docstring], so the step
    is U [c_i (mu_i + c_i^2)^{-1/2}] alone, to float32 rounding; without the cutoff the residual's
    noise direction gets a unit step (weight 1/|r| where mu_perp = 0; w_perp saturated where large:
    entries of 0.05-0.17 here). Rounding model of the tolerance: the float32 coordinates c carry at
    most d u |x| each, c -> c (mu + c^2)^{-1/2} is w-Lipschitz, so each coordinate of the step is
    off by at most w_max d u |x| (plus a few u), which U spreads over the entries with norm at most
    sqrt(k) times that."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(3)
    d, k = 1024, 16
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0].astype(np.float32)  # orthonormal to float32
    weights = rng.uniform(0.5, 2.0, k).astype(np.float32)
    sketch = {"basis": basis, "basis_weights": weights, "complement_weight": np.asarray(complement, np.float32)}
    x = (basis @ rng.standard_normal((k, 1))).astype(np.float32)
    y = fd_apply_with_own_mass(xp, sketch, x)
    u64, x64, w64 = basis.astype(np.float64), x.astype(np.float64), weights.astype(np.float64)
    c = (u64.T @ x64)[:, 0]
    want = u64 @ (c * w64 / np.sqrt(1.0 + (w64 * c) ** 2))[:, None]
    u = float(np.finfo(np.float32).eps) / 2
    bound = np.sqrt(k) * (w64.max() * d * u * np.linalg.norm(x64) + 4 * u)
    np.testing.assert_allclose(y, want, rtol=0, atol=bound)


def test_update_apply_has_no_cancellation():
    """While x lies in the sketch's span (the sketch not yet full), x - U U^T x is rounding and
    fd_apply's w_perp (x - U U^T x) amplifies it by w_perp / w (here 1e4: delta = 1e-8 against
    |x|^2 ~ 1). fd_update_apply's incremental path works in the small SVD's coordinates, so its
    direction is exact to a few ulps: checked against float64 with the sketch and weights recomputed
    in extended precision (numpy longdouble) from the same float32 inputs would be overkill; instead
    against the closed form for one vector x into an empty sketch: P(x) = (|x|^2 + delta)^(-1/2) x."""
    import array_api_compat.numpy as xp

    d, k = 64, 4
    x = np.random.default_rng(0).standard_normal((d, 1))
    delta = 1e-8
    expect = x / np.sqrt(np.sum(x**2) + delta)
    for path, bound in (("incremental", 1e-15), ("svd", None)):
        s = fd_init(xp, d, k, dtype=xp.float64, device=None)
        _, _, y = fd_update_apply(xp, s, x, exponent=-0.5, eps=0.0, delta=delta, cutoff=True, decomposition=path)
        error = np.abs(y - expect).max() / np.abs(expect).max()
        if bound is not None:
            assert error <= 8 * np.finfo(np.float64).eps, error
        else:  # fd_apply's cancellation: w_perp / w = 1e4 times the rounding of x - U U^T x
            assert error > 8 * np.finfo(np.float64).eps or error == 0.0


def test_update_apply_on_failure_applies_the_previous_sketch(monkeypatch):
    """K4 with fd_update_apply: when the decomposition fails, the sketch is kept and the direction is
    the previous sketch applied to x (what fd_apply would give after the kept sketch)."""
    import array_api_compat.numpy as xp

    d, k = 16, 3
    opts = dict(exponent=-0.5, eps=1e-7, delta=0.1, cutoff=True, decomposition="incremental")
    s, _ = fd_update(xp, fd_init(xp, d, k, dtype=xp.float64, device=None), _stream(1, d, 1, 1)[0], **opts)
    s, _ = fd_update(xp, s, _stream(2, d, 1, 1)[0], **opts)
    x = _stream(3, d, 1, 1)[0]
    svd = xp.linalg.svd
    monkeypatch.setattr(xp.linalg, "svd", lambda *a, **kw: tuple(np.full_like(v, np.nan) for v in svd(*a, **kw)))
    with np.errstate(all="ignore"):
        new, ok, y = fd_update_apply(xp, s, x, **opts)
    assert not bool(ok)
    want = fd_apply(xp, s, x)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-14 * np.abs(want).max())


def test_probe_is_fixed_bounded_and_well_conditioned(backend):
    """_probe: the same entries on every backend (int32 arithmetic is exact), in [-1, 1], and
    columns far from dependent (condition number of a 512 x 288 probe below 10, as for Gaussian
    matrices of that shape, about (1 + sqrt(288/512)) / (1 - sqrt(288/512)) = 7)."""
    import array_api_compat.numpy as np_xp

    ref = _probe(np_xp, 512, 288, np.float64, None)
    got = backend.to_numpy(_probe(backend.xp, 512, 288, backend.xp.float64, None))
    np.testing.assert_array_equal(got, ref)
    assert np.abs(ref).max() <= 1.0
    singular = np.linalg.svd(ref, compute_uv=False)
    assert singular[0] / singular[-1] < 10.0


def test_power_of_two_scale():
    """2**ceil(log2(v)) for v > 0 (an exact rescaling: v / scale in (1/2, 1]), 1 for v = 0, and
    2**127 in float32's top binade (2**128 overflows: v / scale in (1, 2) there)."""
    import array_api_compat.numpy as xp

    v = np.array([0.0, 1e-30, 0.3, 1.0, 3.0, 4.0, 1.8e19, 1.7e38, 3e38], dtype=np.float32)
    scale = _power_of_two_scale(xp, v, np.ones((), dtype=np.float32))
    assert scale[0] == 1.0 and np.all(np.isfinite(scale))
    np.testing.assert_array_equal(np.frexp(scale[1:])[0], 0.5)  # powers of two
    ratio = v[1:-1] / scale[1:-1]
    assert np.all((ratio > 0.5) & (ratio <= 1.0))
    assert scale[-1] == 2.0**127


def test_in_units_is_an_exact_power_of_two_rescaling():
    """_in_units: each block's unit u is the power of two with max(|x|, sqrt(beta) sigma,
    sqrt(gamma rho)) in (u/2, u] (the exact rescaling the FD step works in, F-I11), x / u exact (x
    recovered bitwise from it), and a block whose x is not finite is flagged and given zeros."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 6, 2)) * np.array([1e-25, 1.0, 3e18, 1.0])[:, None, None]).astype(np.float32)
    x[3, 2, 1] = np.nan
    decayed = np.abs(rng.standard_normal((4, 3))).astype(np.float32) * np.float32(1e-3)
    kept_root = np.array([0.0, 5.0, 0.0, 0.0], dtype=np.float32)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)
    scaled, unit, ok = _in_units(xp, x, decayed, kept_root, one, zero)
    np.testing.assert_array_equal(ok, [True, True, True, False])
    np.testing.assert_array_equal(np.frexp(unit)[0], 0.5)
    largest = np.maximum(np.maximum(np.abs(x).max(axis=(1, 2)), decayed.max(axis=1)), kept_root)[:3]
    assert np.all((largest > unit[:3] / 2) & (largest <= unit[:3]))
    np.testing.assert_array_equal(scaled[:3] * unit[:3, None, None], x[:3])
    np.testing.assert_array_equal(scaled[3], 0.0)


@pytest.mark.parametrize("cutoff", [True, False])
def test_shrink_value_is_s_k_and_zero_at_rounding_level(cutoff):
    """_shrink (K3): the shrink value c = s_k (0 when there is no (k+1)-th value); the values at
    most ``tolerance`` s_0 are noise, set to 0 with the cutoff; without it the values stay, and a
    noise c is 0 (it adds nothing to the escaped mass)."""
    import array_api_compat.numpy as xp

    s = np.array([[4.0, 2.0, 1.0], [4.0, 2.0, 1e-9], [4.0, 1e-9, 1e-12]])
    root, zero = np.zeros(3), np.zeros(())
    got, noise, c = _shrink(xp, s, 2, root, zero, 1e-8, cutoff)
    np.testing.assert_array_equal(noise, s <= 1e-8 * s[:, :1])
    np.testing.assert_array_equal(got, np.where(noise, 0.0, s) if cutoff else s)
    np.testing.assert_array_equal(c, [1.0, 0.0, 0.0])
    _, _, none = _shrink(xp, s, 3, root, zero, 1e-8, cutoff)
    np.testing.assert_array_equal(none, 0.0)


@pytest.mark.parametrize("relative_eps, delta", [(True, 0.0), (True, 1e6), (False, 0.0), (False, 1e-3)])
def test_weights_are_the_shifted_powers(relative_eps, delta):
    """_weights: w_i = (sigma_i'^2 + rho' + eps')^a on the retained directions, else 0, and
    w_perp = (rho' + eps')^a where the complement has mass, else 0 (module docstring), eps' =
    eps max_i(sigma_i'^2 + rho') (relative) or eps, plus delta; given in the data's unit u (a power
    of two) and computed in a unit that also covers delta: equal to the formula in float64 to a few
    ulps of each power (rtol 1e-14)."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(4)
    unit = np.array([2.0**-30, 1.0, 2.0**20])
    undeflated, mass = rng.random((3, 4)) + 0.5, rng.random(3)
    mask = np.array([[True, True, False, True]] * 3)
    present = np.array([True, False, True])
    eps, a = 1e-3, -0.25
    w, w_perp = _weights(xp, undeflated, mass, mask, present, unit, np.ones(()), np.zeros(()), a, eps, relative_eps, delta)
    true_undeflated, true_mass = undeflated * unit[:, None] ** 2, mass * unit**2
    shift = (eps * true_undeflated.max(axis=1) if relative_eps else eps) + delta
    np.testing.assert_allclose(w, np.where(mask, (true_undeflated + np.asarray(shift)[..., None]) ** a, 0.0), rtol=1e-14)
    np.testing.assert_allclose(w_perp, np.where(present, (true_mass + shift) ** a, 0.0), rtol=1e-14)


def test_resolve_decomposition():
    """"auto": exact incremental for tall factors (k + m < d), the subspace iteration for long axes
    where it is at most half the axis, else the exact Gram path; named paths pass through."""
    assert subspace_width(1024, 256) == 288 and subspace_width(40, 3) == 7 and subspace_width(6, 5) == 6
    assert resolve_decomposition("auto", 1024, 256, 16) == "incremental"
    assert resolve_decomposition("auto", 1024, 256, 1024) == "subspace"
    assert resolve_decomposition("auto", SUBSPACE_MIN_DIM - 1, 8, 4096) == "gram"
    assert resolve_decomposition("auto", 300, 200, 300) == "gram"  # 2 * 225 > 300
    assert resolve_decomposition("svd", 1024, 256, 1024) == "svd"


def test_auto_takes_the_secular_core_for_one_column_off_a_cpu(monkeypatch):
    """"auto" with one new column (S-AdaGrad's step) for a float32 torch tensor off a CPU is the
    secular core (no LAPACK call, no host read: torch's CUDA step captures it), at every length; a
    CPU, several columns, float64 data, NumPy (as CuPy) and JAX keep the other paths."""
    import array_api_compat.numpy as xnp
    import array_api_compat.torch as xp
    import jax.numpy as jnp
    import torch

    from precond_ref import sketch

    assert resolve_decomposition("auto", 1024, 256, 1, secular=True) == "incremental_secular"
    assert resolve_decomposition("auto", 100, 100, 1, secular=True) == "incremental_secular"  # k + 1 > d
    assert resolve_decomposition("auto", 1024, 256, 16, secular=True) == "incremental"
    assert resolve_decomposition("auto", 1024, 256, 1) == "incremental"
    assert resolve_decomposition("svd", 1024, 256, 1, secular=True) == "svd"
    x = torch.zeros((8, 1), dtype=torch.float32)
    assert not sketch.secular_by_default(xp, x)
    monkeypatch.setattr(sketch, "on_cpu", lambda xp, x: False)  # as for a GPU array
    assert sketch.secular_by_default(xp, x)
    assert not sketch.secular_by_default(xp, x.double())  # the Gram's accuracy in float64
    assert not sketch.secular_by_default(xnp, np.zeros((8, 1), dtype=np.float32))  # not captured: the SVD
    assert not sketch.secular_by_default(jnp, jnp.zeros((8, 1), dtype=jnp.float32))


def test_cutoff_keeps_rank_deficient_stream_bounded():
    """K3: rank-1 inputs in float32 with ε = 0: without the cutoff the rounding-level shrink gives a
    huge complement weight; with it the complement weight stays exactly 0 until mass escapes."""
    import array_api_compat.numpy as xp

    d, k = 16, 4
    rng = np.random.default_rng(0)
    v = rng.standard_normal(d).astype(np.float32)
    s = fd_init(xp, d, k, dtype=xp.float32, device=None)
    for _ in range(10):
        x = (v * rng.standard_normal()).astype(np.float32)[:, None]
        s, _ = fd_update(xp, s, x, exponent=-0.5, eps=0.0, cutoff=True)
        assert _rho(s) == 0.0 and s["complement_weight"] == 0.0
    probe = rng.standard_normal((d, 1)).astype(np.float32)
    assert np.linalg.norm(fd_apply(xp, s, probe)) < 10 * np.linalg.norm(probe)


def test_bad_arguments():
    import array_api_compat.numpy as xp

    with pytest.raises(ValueError, match="rank"):
        fd_init(xp, 3, 4, dtype=xp.float64, device=None)
    s = fd_init(xp, 3, 2, dtype=xp.float64, device=None)
    with pytest.raises(ValueError, match=r"\(3, m\)"):
        fd_update(xp, s, np.zeros((4, 1)), exponent=-0.5)
    with pytest.raises(ValueError, match="decomposition"):
        fd_update(xp, s, np.zeros((3, 1)), exponent=-0.5, decomposition="qr")


def test_merge_small_dims():
    """The authors' reshaper rule (distributed_shampoo.merge_small_dims) and its docstring examples."""
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024) == (1024, 2048, 12)
    assert merge_small_dims((1, 2, 768, 1, 2048), 1024) == (2, 768, 2048)
    assert merge_small_dims((3, 3, 64, 128), 1024) == (576, 128)
    assert merge_small_dims((64, 64, 3, 3), 1024) == (64, 576)
    assert merge_small_dims((3, 100), 1024) == (300,)
    assert merge_small_dims((1, 1), 1024) == ()
    assert merge_small_dims((), 1024) == ()
    assert merge_small_dims((2000, 1, 5), 1024) == (2000, 5)  # a unit axis after an emitted product vanishes too


def test_block_bounds_and_unfold():
    assert block_bounds(10, None) == ((0, 10),)
    assert block_bounds(10, 10) == ((0, 10),)
    assert block_bounds(10, 4) == ((0, 4), (4, 8), (8, 10))
    import array_api_compat.numpy as xp

    x = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(unfold(xp, x, 1), np.moveaxis(x, 1, 0).reshape(3, 8))


def test_eager_torch_matmul_and_where_are_one_operation_each():
    """On torch, for operands of one dtype, the FD module's products and selections are
    ``torch.matmul`` / ``torch.where`` themselves: one top-level operation each, where
    ``array_api_compat``'s wrappers first convert both operands to their (own) common dtype (two
    more operations per call, ~25 of ~170 per FD step). The numbers are the wrappers', bit for bit."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as txp

    from precond_ref._backend import matmul, select

    a, b = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.randn(2, 5, 4) > 0
    zero = torch.zeros((), dtype=torch.float64)

    def top_level(fn):
        with torch.profiler.profile() as prof:
            out = fn()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        return out, [e.name for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]

    product, names = top_level(lambda: matmul(txp, a, b))
    assert names == ["aten::matmul"]
    assert torch.equal(product, txp.matmul(a, b))
    chosen, names = top_level(lambda: select(txp, mask, product, zero))
    assert names == ["aten::where"]
    assert torch.equal(chosen, txp.where(mask, product, zero))
    sketch = fd_init(txp, 5, 2, dtype=torch.float64, device="cpu")
    _, names = top_level(lambda: fd_apply(txp, sketch, torch.randn(5, 3, dtype=torch.float64)))
    assert "aten::matmul" in names and "aten::to" not in names  # the apply of every step


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_left_singular_by_gram_is_the_svd_at_the_gram_accuracy(dtype):
    """``sketch._left_singular_by_gram`` against its formula: W diag(s) reproduces a's left singular
    pairs, W W^T = I, s descending. Rounding model: the Gram a a^T and its eigh carry about
    n u s_0^2 absolute error on each eigenvalue, so s_i = sqrt(lambda_i) is within
    sqrt(n u) s_0 of the SVD's; and W^T a = diag(s) V^T has orthogonal rows of norms s (its Gram is
    diag(s^2) within n u s_0^2)."""
    import array_api_compat.numpy as xp
    from precond_ref.sketch import _left_singular_by_gram

    rng = np.random.default_rng(3)
    n = 24
    u = float(np.finfo(dtype).eps) / 2
    for spread in (1.0, 1e-3, 1e-6):
        q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
        q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
        singular = np.geomspace(1.0, spread, n)
        singular[-3:] = 0.0  # a null space, as on the incremental path's cold steps
        a = ((q1 * singular) @ q2.T).astype(dtype)
        w, s = _left_singular_by_gram(xp, np.stack([a, 2.0 * a]))
        reference = np.linalg.svd(a.astype(np.float64), compute_uv=False)
        for j, factor in enumerate((1.0, 2.0)):
            assert np.all(np.diff(s[j]) <= 0)
            np.testing.assert_allclose(s[j], factor * reference, rtol=0, atol=4 * math.sqrt(n * u) * factor)
            np.testing.assert_allclose(w[j].T @ w[j], np.eye(n), rtol=0, atol=8 * n * u)
            coords = w[j].T.astype(np.float64) @ (factor * a.astype(np.float64))
            np.testing.assert_allclose(coords @ coords.T, np.diag(s[j].astype(np.float64) ** 2), rtol=0,
                                       atol=8 * n * u * factor**2)


def test_constants_of_the_fd_step_do_not_collide_with_other_cached_constants():
    """The FD step's [I; 0] ((k + m) x k, ``sketch._eye``) comes from the cache of constants a
    transform keeps (``engine.factors.constant`` within ``keeping_constants``), which other modules
    fill too: an identity ``scale·I`` of ``engine.factors.identity`` made first (its key of size and
    scale 1.0 equals the FD step's in value for a column count 1) must not be handed back for it (a
    (2, 2) identity would turn a (3, 1) basis into (3, 2)); nor does any other maker with an equal
    key get it (the maker is in the key). What is kept is in the transform's dict alone: outside
    it, a constant is made anew."""
    from precond_ref.engine.factors import constant, identity, keeping_constants
    from precond_ref.sketch import _eye

    factors = np.zeros((1, 2, 2))  # a stack of one 2 x 2 factor
    kept: dict = {}
    with keeping_constants(kept):
        np.testing.assert_array_equal(identity(np, factors), np.eye(2))
        np.testing.assert_array_equal(_eye(np, 2, 1, factors), np.eye(2, 1))
        first = constant(np, ("same key",), lambda: np.zeros(1), factors)
        second = constant(np, ("same key",), lambda: np.ones(2), factors)
        assert identity(np, factors) is identity(np, factors)
    np.testing.assert_array_equal(first, np.zeros(1))
    np.testing.assert_array_equal(second, np.ones(2))
    assert len(kept) == 4
    assert identity(np, factors) is not identity(np, factors)
