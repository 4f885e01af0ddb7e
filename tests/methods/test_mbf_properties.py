"""Property tests of MBF (spec ``mbf.md`` section 6), float64, on numpy and array_api_strict.

Gradients and problems are drawn from a NumPy generator seeded by hypothesis; shapes, intervals
and hyperparameters are drawn by hypothesis.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

import precond_ref as pr
from precond_ref.linalg import damped_inverse
from precond_ref.testing.oracles import damped_solve

seeds = st.integers(0, 2**32 - 1)
intervals = st.integers(1, 4)
decays = st.floats(0.0, 0.95)
dampings = st.floats(1e-2, 10.0)


def _np(backend, tree):
    return backend.numpy_tree(tree)


def _run(backend, params, grads, **kw):
    """Updates (NumPy) of a fixed gradient sequence; params are not changed between steps.

    The identities of this file are those of the unclipped update (KL clipping, B7, has its own
    test), hence ``kl_clip=0`` unless a test sets it; and of the authors' schedule, every inverse at
    once (``refresh_phases=1``; the spread schedule has its own tests).
    """
    opt = pr.mbf(**{"kl_clip": 0.0, "refresh_phases": 1, **kw})
    p = backend.tree(params)
    state = opt.init(p)
    out = []
    for g in grads:
        updates, state = opt.update(backend.tree(g), state, p)
        out.append(_np(backend, updates))
    return out, state


def _ema_schedule(i, t1, t2):
    stats = i % t1 == 0
    inverse = (i <= t2 and i % t1 == 0) or i % t2 == 0
    return stats, inverse


# ---------------------------------------------------------------------------------------------


@given(seed=seeds, o=st.integers(1, 4), c=st.integers(1, 3), n_in=st.integers(2, 5), steps=st.integers(1, 6),
       t1=intervals, t2=intervals, rho=decays, mu=decays, lam=dampings)
def test_block_size_one_is_the_diagonal_rule(property_backend, seed, o, c, n_in, steps, t1, t2, rho, mu, lam):
    """M-I1 [derived]: a block of size 1 (1x1 conv; FC above ``max_block_dim``) gives
    D = m/(v + lambda), v = EMA_rho(g^2) on statistics steps, 1/(v + lambda) refreshed on inverse
    steps (spec 2.2 steps 2-3 with q = 1): the damped, root-free diagonal empirical Fisher with a
    heavy-ball numerator and no bias correction."""
    rng = np.random.default_rng(seed)
    params = {"pw": {"weight": rng.standard_normal((o, c, 1, 1))},
              "fc": {"bias": rng.standard_normal(o + 1), "weight": rng.standard_normal((o + 1, n_in))}}
    grads = [{k: {n: rng.standard_normal(v.shape) for n, v in d.items()} for k, d in params.items()} for _ in range(steps)]
    lr = 0.1
    updates, _ = _run(property_backend, params, grads, learning_rate=lr, damping=lam, momentum=mu, b2=rho,
                      statistics_every=t1, precondition_every=t2, max_block_dim=o)
    m = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    v = {k: {n: np.zeros_like(x) for n, x in d.items()} for k, d in params.items()}
    r = {k: {n: np.full_like(x, 1 / lam) for n, x in d.items()} for k, d in params.items()}
    for i, g in enumerate(grads):
        stats, inverse = _ema_schedule(i, t1, t2)
        for k, d in params.items():
            for n in d:
                m[k][n] = mu * m[k][n] + g[k][n]
                if stats:
                    v[k][n] = rho * v[k][n] + (1 - rho) * g[k][n] ** 2
                if inverse:
                    r[k][n] = 1 / (v[k][n] + lam)
                np.testing.assert_allclose(updates[i][k][n], -lr * r[k][n] * m[k][n], rtol=1e-12, atol=1e-15)


@given(seed=seeds, shape=st.sampled_from([(3,), (2, 2), (3, 3), (2, 2, 2)]), steps=st.integers(1, 5),
       t1=intervals, t2=intervals, rho=decays, mu=decays, lam=dampings)
def test_whole_layer_single_block_is_layerwise_natural_gradient(property_backend, seed, shape, steps, t1, t2, rho, mu, lam):
    """M-I2 [derived]: a conv layer with O = C = 1 is one q x q block, so
    D = (EMA_rho(vec g vec g^T) + lambda I)^{-1} vec m: the layer-wise (mini-batch-gradient)
    empirical-Fisher natural gradient with momentum (spec 2.2 step 2)."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"weight": rng.standard_normal((1, 1) + shape)}}
    grads = [{"conv": {"weight": rng.standard_normal((1, 1) + shape)}} for _ in range(steps)]
    lr = 0.5
    updates, _ = _run(property_backend, params, grads, learning_rate=lr, damping=lam, momentum=mu, b2=rho,
                      statistics_every=t1, precondition_every=t2)
    q = int(np.prod(shape))
    f = np.zeros((q, q))
    f_inv = np.eye(q) / lam
    m = np.zeros(q)
    for i, g in enumerate(grads):
        vec = g["conv"]["weight"].reshape(-1)
        m = mu * m + vec
        stats, inverse = _ema_schedule(i, t1, t2)
        if stats:
            f = rho * f + (1 - rho) * np.outer(vec, vec)
        if inverse:
            f_inv = np.linalg.inv(f + lam * np.eye(q))
        expected = -lr * (f_inv @ m).reshape((1, 1) + shape)
        np.testing.assert_allclose(updates[i]["conv"]["weight"], expected, rtol=1e-10, atol=1e-13)


@given(seed=seeds, n_in=st.integers(1, 5), steps=st.integers(1, 5), rho=decays, mu=decays, lam=dampings,
       mode=st.sampled_from(["faithful", "principled"]))
def test_official_chunks_with_square_homogeneous_layer_are_right_sided(property_backend, seed, n_in, steps, rho, mu, lam, mode):
    """M-I3 [derived]: with the official chunking and O = I + 1 the chunks of the row-major
    reshape of H = [W | b] are its rows, so D_H = H_m (EMA(H_g^T H_g / O) + lambda I)^{-1}
    (spec 2.2 note c)."""
    rng = np.random.default_rng(seed)
    o = n_in + 1
    params = {"fc": {"bias": rng.standard_normal(o), "weight": rng.standard_normal((o, n_in))}}
    grads = [{"fc": {"bias": rng.standard_normal(o), "weight": rng.standard_normal((o, n_in))}} for _ in range(steps)]
    lr = 0.3
    updates, _ = _run(property_backend, params, grads, learning_rate=lr, damping=lam, momentum=mu, b2=rho,
                      statistics_every=1, precondition_every=1, fc_blocks="official_chunks", mode=mode)
    f = np.zeros((o, o))
    h_m = np.zeros((o, o))
    for i, g in enumerate(grads):
        h_g = np.concatenate([g["fc"]["weight"], g["fc"]["bias"][:, None]], axis=1)
        h_m = mu * h_m + h_g
        f = rho * f + (1 - rho) * h_g.T @ h_g / o
        d = h_m @ np.linalg.inv(f + lam * np.eye(o))
        np.testing.assert_allclose(updates[i]["fc"]["weight"], -lr * d[:, :n_in], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(updates[i]["fc"]["bias"], -lr * d[:, n_in], rtol=1e-10, atol=1e-13)


@given(seed=seeds, o=st.integers(1, 4), n_in=st.integers(1, 5), steps=st.integers(1, 5), rho=decays, mu=decays,
       lam=dampings, bias=st.booleans())
def test_columns_are_left_sided(property_backend, seed, o, n_in, steps, rho, mu, lam, bias):
    """M-I4 [derived]: with ``fc_blocks="columns_avg"`` D_H = (EMA(H_g H_g^T/n) + lambda I)^{-1} H_m,
    n = I + 1 with a bias (I without: extension E1); for a single example G = delta a^T the
    statistic is |a|^2 delta delta^T / n (a K-FAC-G-like factor) (spec 2.3 item 1)."""
    rng = np.random.default_rng(seed)
    params = {"fc": {"weight": rng.standard_normal((o, n_in))}}
    if bias:
        params["fc"] = {"bias": rng.standard_normal(o), "weight": params["fc"]["weight"]}
    grads = [{"fc": {k: rng.standard_normal(v.shape) for k, v in params["fc"].items()}} for _ in range(steps)]
    lr = 0.2
    updates, _ = _run(property_backend, params, grads, learning_rate=lr, damping=lam, momentum=mu, b2=rho,
                      statistics_every=1, precondition_every=1)
    n = n_in + bias
    f, h_m = np.zeros((o, o)), np.zeros((o, n))
    for i, g in enumerate(grads):
        h_g = np.concatenate([g["fc"]["weight"], g["fc"]["bias"][:, None]], 1) if bias else g["fc"]["weight"]
        h_m = mu * h_m + h_g
        f = rho * f + (1 - rho) * h_g @ h_g.T / n
        d = np.linalg.inv(f + lam * np.eye(o)) @ h_m
        np.testing.assert_allclose(updates[i]["fc"]["weight"], -lr * d[:, :n_in], rtol=1e-10, atol=1e-13)
        if bias:
            np.testing.assert_allclose(updates[i]["fc"]["bias"], -lr * d[:, n_in], rtol=1e-10, atol=1e-13)
    # Single example: G = delta a^T (bias entry of a = 1).
    delta, a = rng.standard_normal(o), rng.standard_normal(n_in)
    a_h = np.concatenate([a, [1.0]]) if bias else a
    g1 = {"fc": {"weight": np.outer(delta, a)}}
    if bias:
        g1["fc"] = {"bias": delta, "weight": g1["fc"]["weight"]}
    _, state = _run(property_backend, params, [g1], learning_rate=lr, b2=0.0)
    stat = property_backend.to_numpy(state.groups["fc/weight"]["statistic"])
    np.testing.assert_allclose(stat, (a_h @ a_h) * np.outer(delta, delta) / n, rtol=1e-12, atol=1e-14)


def _quadratic(rng, params, scale=1.0):
    """Per leaf f = scale/2 (x - x*)^T A (x - x*) with A SPD; returns the gradient function."""
    problems = {}
    for k, d in params.items():
        for n, v in d.items():
            size = v.size
            q = rng.standard_normal((size, size))
            problems[(k, n)] = (q @ q.T / size + 0.1 * np.eye(size), rng.standard_normal(size))

    def grad(p):
        return {k: {n: scale * (problems[(k, n)][0] @ (p[k][n].reshape(-1) - problems[(k, n)][1])).reshape(v.shape)
                    for n, v in d.items()} for k, d in p.items()}

    return grad


def _trajectory(backend, params, grad, steps, **kw):
    opt = pr.mbf(**{"kl_clip": 0.0, **kw})  # unclipped (see _run)
    p = backend.tree(params)
    state = opt.init(p)
    out = []
    for _ in range(steps):
        g = grad(_np(backend, p))
        updates, state = opt.update(backend.tree(g), state, p)
        p = pr.apply_updates(p, updates)
        out.append(_np(backend, p))
    return out


@given(seed=seeds, c=st.floats(0.05, 20.0), steps=st.integers(1, 6), t1=intervals, t2=intervals,
       mode=st.sampled_from(["faithful", "principled"]), fc_blocks=st.sampled_from(["columns_avg", "official_chunks"]))
def test_loss_scaling_covariance(property_backend, seed, c, steps, t1, t2, mode, fc_blocks):
    """M-I5 [derived]: loss * c with (lambda, alpha, wd) -> (c^2 lambda, c alpha, wd / c) leaves
    the trajectory unchanged: F scales by c^2 and m by c, so alpha (F + lambda I)^{-1} m and
    alpha wd w are unchanged (models without diagonal-rule leaves; spec 6)."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"weight": rng.standard_normal((2, 2, 2, 2))},
              "fc": {"bias": rng.standard_normal(3), "weight": rng.standard_normal((3, 2))},
              "pw": {"weight": rng.standard_normal((2, 3, 1))}}
    problem = np.random.default_rng(seed + 1)
    base = _quadratic(problem, params)
    hyper = dict(statistics_every=t1, precondition_every=t2, mode=mode, fc_blocks=fc_blocks, momentum=0.7, b2=0.8)
    a = _trajectory(property_backend, params, base, steps, learning_rate=0.05, damping=0.5, weight_decay=0.3, **hyper)

    def scaled(p):
        g = base(p)
        return {k: {n: c * x for n, x in d.items()} for k, d in g.items()}

    b = _trajectory(property_backend, params, scaled, steps, learning_rate=0.05 * c, damping=0.5 * c * c,
                    weight_decay=0.3 / c, **hyper)
    for pa, pb in zip(a, b):
        for k in pa:
            for n in pa[k]:
                np.testing.assert_allclose(pb[k][n], pa[k][n], rtol=1e-9, atol=1e-11)


@given(seed=seeds, steps=st.integers(1, 15), mu=decays, eta=st.floats(1e-3, 0.1), t1=intervals, t2=intervals)
def test_large_damping_is_heavy_ball_sgd(property_backend, seed, steps, mu, eta, t1, t2):
    """M-I6 [derived]: lambda -> infinity with alpha = lambda eta gives heavy-ball SGD,
    w <- w - eta m, m <- mu m + g, on every block-preconditioned leaf ((F + lambda I)^{-1} lambda
    = I + O(|F|/lambda))."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"weight": rng.standard_normal((2, 2, 2, 2))},
              "fc": {"bias": rng.standard_normal(3), "weight": rng.standard_normal((3, 2))}}
    grad = _quadratic(np.random.default_rng(seed + 1), params)
    lam = 1e8
    ours = _trajectory(property_backend, params, grad, steps, learning_rate=lam * eta, damping=lam, momentum=mu,
                       statistics_every=t1, precondition_every=t2)
    p = params
    m = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    for i in range(steps):
        g = grad(p)
        m = {k: {n: mu * m[k][n] + g[k][n] for n in d} for k, d in p.items()}
        p = {k: {n: p[k][n] - eta * m[k][n] for n in d} for k, d in p.items()}
        for k in p:
            for n in p[k]:
                np.testing.assert_allclose(ours[i][k][n], p[k][n], rtol=1e-6, atol=1e-7)


@given(seed=seeds, o=st.integers(1, 3), c=st.integers(1, 3), k=st.integers(1, 3), steps=st.integers(1, 4), rho=decays)
def test_conv_blocks_are_diagonal_blocks_of_the_layer_statistic(property_backend, seed, o, c, k, steps, rho):
    """M-I7 [derived]: each (o, c) block of F equals the (o, c) diagonal sub-block of the
    whole-layer EMA(vec g vec g^T) (no cross-channel terms; K-FAC would use G_oo A_cc)."""
    rng = np.random.default_rng(seed)
    shape = (o, c, k, k + 1)
    params = {"conv": {"weight": rng.standard_normal(shape)}}
    grads = [{"conv": {"weight": rng.standard_normal(shape)}} for _ in range(steps)]
    _, state = _run(property_backend, params, grads, learning_rate=0.1, b2=rho, statistics_every=1)
    stat = property_backend.to_numpy(state.groups["conv/weight"]["statistic"])
    full = np.zeros((np.prod(shape),) * 2)
    for g in grads:
        vec = g["conv"]["weight"].reshape(-1)
        full = rho * full + (1 - rho) * np.outer(vec, vec)
    q = k * (k + 1)
    for oo in range(o):
        for cc in range(c):
            start = (oo * c + cc) * q
            np.testing.assert_allclose(stat[oo, cc], full[start:start + q, start:start + q], rtol=1e-12, atol=1e-14)


@given(seed=seeds, o=st.integers(1, 3), n_in=st.integers(1, 3), steps=st.integers(1, 8), rho=decays,
       lam=dampings, kind=st.sampled_from(["fc", "conv"]), fc_blocks=st.sampled_from(["columns_avg", "official_chunks"]))
def test_linear_rate_on_strongly_convex_quadratics(property_backend, seed, o, n_in, steps, rho, lam, kind, fc_blocks):
    """M-I8 [derived]: full-batch, mu = 0, T1 = T2 = 1, alpha <= lambda/L:
    f(x+) - f* <= (1 - alpha mu_f/(lambda + Lambda)) (f(x) - f*), with Lambda the largest block
    eigenvalue of the stored F (descent lemma, P^{-2} <= P^{-1}/lambda, PL inequality)."""
    rng = np.random.default_rng(seed)
    shape = (o, n_in) if kind == "fc" else (o, n_in, 2, 1)
    size = int(np.prod(shape))
    q = rng.standard_normal((size, size))
    a = q @ q.T / size + 0.05 * np.eye(size)
    eig = np.linalg.eigvalsh(a)
    mu_f, big_l = float(eig[0]), float(eig[-1])
    x_star = rng.standard_normal(size)
    f = lambda x: 0.5 * (x - x_star) @ a @ (x - x_star)  # noqa: E731
    alpha = float(lam / big_l)
    opt = pr.mbf(learning_rate=alpha, damping=lam, momentum=0.0, b2=rho, statistics_every=1, precondition_every=1,
                 fc_blocks=fc_blocks, kl_clip=0.0)  # the rate of the unclipped step
    p = {"layer": {"weight": property_backend.asarray(rng.standard_normal(shape))}}
    state = opt.init(p)
    for _ in range(steps):
        x = property_backend.to_numpy(p["layer"]["weight"]).reshape(-1)
        g = {"layer": {"weight": property_backend.asarray((a @ (x - x_star)).reshape(shape))}}
        updates, state = opt.update(g, state, p)
        p = pr.apply_updates(p, updates)
        x_new = property_backend.to_numpy(p["layer"]["weight"]).reshape(-1)
        stat = property_backend.to_numpy(state.groups["layer/weight"]["statistic"])
        big_lambda = max(np.linalg.eigvalsh(stat).max(), 0.0)
        bound = (1 - alpha * mu_f / (lam + big_lambda)) * f(x)
        assert f(x_new) <= bound * (1 + 1e-9) + 1e-14


@given(seed=seeds, n_blocks=st.integers(1, 5), q=st.integers(1, 4))
def test_exact_block_newton_in_one_step(property_backend, seed, n_blocks, q):
    """M-I9 [derived]: a quadratic whose Hessian is block-diagonal on the mini-block partition is
    minimised in one step by x - (H_b + lambda I)^{-1} grad_b with lambda -> 0 and alpha = 1 (the
    batched block kernel, given F_b = H_b)."""
    xp = property_backend.xp
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n_blocks, q, q))
    hess = r @ np.swapaxes(r, -1, -2) + 0.5 * np.eye(q)
    x_star, x = rng.standard_normal((n_blocks, q, 1)), rng.standard_normal((n_blocks, q, 1))
    grad = hess @ (x - x_star)
    lam = 1e-12
    h = property_backend.asarray(hess)
    inv, failed = damped_inverse(h, lam, property_backend.asarray(np.zeros_like(hess)))
    step_inv = property_backend.to_numpy(xp.matmul(inv, property_backend.asarray(grad)))
    step_solve = damped_solve(h, lam, property_backend.asarray(grad))
    for step in (step_inv, property_backend.to_numpy(step_solve)):
        np.testing.assert_allclose(x - step, x_star, rtol=1e-8, atol=1e-8)
    assert not property_backend.to_numpy(failed).any()


@given(seed=seeds, o=st.integers(1, 4), n_in=st.integers(1, 4), steps=st.integers(1, 6), rho=decays, lam=dampings,
       t2=intervals)
def test_statistics_are_symmetric_psd_and_inverse_spectrum_is_bounded(property_backend, seed, o, n_in, steps, rho, lam, t2):
    """M-I11 [derived]: principled F stays symmetric PSD, and the stored inverse has eigenvalues
    in [1/(lambda + |F_b|), 1/lambda] for the F_b it was computed from (F_b + lambda I >= lambda I)."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"weight": rng.standard_normal((o, n_in, 2, 2))},
              "fc": {"bias": rng.standard_normal(o), "weight": rng.standard_normal((o, n_in))}}
    opt = pr.mbf(learning_rate=0.1, damping=lam, b2=rho, statistics_every=1, precondition_every=t2, refresh_phases=1)
    p = property_backend.tree(params)
    state = opt.init(p)
    inverted_from = {}
    for i in range(steps):
        g = {k: {n: 10 * rng.standard_normal(v.shape) for n, v in d.items()} for k, d in params.items()}
        _, state = opt.update(property_backend.tree(g), state, p)
        for key in ("conv/weight", "fc/weight"):
            entries = _np(property_backend, state.groups[key])
            stat = entries["statistic"]
            np.testing.assert_array_equal(stat, np.swapaxes(stat, -1, -2))
            assert np.linalg.eigvalsh(stat).min() >= -1e-12 * max(1.0, np.abs(stat).max())
            if _ema_schedule(i, 1, t2)[1]:
                inverted_from[key] = stat
            norm = np.linalg.eigvalsh(inverted_from[key]).max(axis=-1)
            eig = np.linalg.eigvalsh(entries["inverse"])
            assert np.all(eig <= (1 / lam) * (1 + 1e-9))
            assert np.all(eig.min(axis=-1) >= (1 / (lam + norm)) * (1 - 1e-9))


@given(seed=seeds, mu=decays, beta=st.floats(0.5, 0.999), steps=st.integers(1, 6))
def test_diagonal_rule_bias_correction_closed_form(property_backend, seed, mu, beta, steps):
    """[derived from the diagonal rule, paper's Adam-like update for BN/bias
    leaves]: with ``diagonal_second_moment="gradient"`` and a constant gradient g from step 0,
    v_t = (1 - β'^{t+1}) g², so the bias-corrected v_t/(1 - β'^{t+1}) is exactly g² and, with
    a_t = (1 - μ^{t+1}) g (the first moment is not corrected, as in the authors' code),
    D_t = (1 - μ^{t+1}) g/(ε + |g|) and the update is -α D_t. A missing or off-by-one correction
    changes every step."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(4) + np.sign(rng.standard_normal(4))  # |g| >= ~0 but rarely tiny
    params = {"norm": {"scale": np.zeros(4)}}
    eps, lr = 1e-8, 0.1
    out, _ = _run(
        property_backend, params, [{"norm": {"scale": g}}] * steps, learning_rate=lr, momentum=mu,
        diagonal_b2=beta, diagonal_eps=eps, diagonal_second_moment="gradient",
    )
    for t, u in enumerate(out):
        expected = -lr * (1 - mu ** (t + 1)) * g / (eps + np.abs(g))
        np.testing.assert_allclose(u["norm"]["scale"], expected, rtol=1e-12, atol=1e-15)


@given(seed=seeds, kappa=st.sampled_from([1e-6, 1e-4, 1e-2, 1.0]), lam=dampings)
def test_kl_clip_bounds_each_blocks_step(property_backend, seed, kappa, lam):
    """B7 (Ba et al. 2017, section 5): on the first step (m = g) each block's step is the unclipped
    one scaled by nu = min(1, sqrt(kappa / (alpha^2 <D, m>))), with alpha^2 <D, m> = -alpha <u0, g>
    for the unclipped step u0 = -alpha D, so the clipped step's squared length in the metric
    F + lambda I, nu^2 alpha^2 <D, m>, is at most kappa. The diagonal rule (1-D leaves) is never clipped, nor is faithful mode."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"weight": rng.standard_normal((3, 2, 2, 2))},
              "fc": {"weight": rng.standard_normal((4, 3)), "bias": rng.standard_normal(4)},
              "norm": {"scale": rng.standard_normal(5)}}
    grads = {k: {n: 10.0 * rng.standard_normal(v.shape) for n, v in d.items()} for k, d in params.items()}
    alpha = 0.3
    kw = dict(learning_rate=alpha, damping=lam)
    p, g = property_backend.tree(params), property_backend.tree(grads)
    steps = {}
    for name, extra in [("clipped", dict(kl_clip=kappa)), ("plain", dict(kl_clip=0.0)), ("faithful", dict(mode="faithful"))]:
        opt = pr.mbf(**kw, **extra)
        steps[name] = _np(property_backend, opt.update(g, opt.init(p), p)[0])
    for layer, leaves in (("conv", ("weight",)), ("fc", ("weight", "bias")), ("norm", ("scale",))):
        u0 = np.concatenate([steps["plain"][layer][n].ravel() for n in leaves])
        u = np.concatenate([steps["clipped"][layer][n].ravel() for n in leaves])
        gb = np.concatenate([grads[layer][n].ravel() for n in leaves])
        quadratic = -alpha * (u0 @ gb)
        nu = 1.0 if layer == "norm" or quadratic <= kappa else np.sqrt(kappa / quadratic)
        np.testing.assert_allclose(u, nu * u0, rtol=1e-12, atol=0.0)
        faithful = np.concatenate([steps["faithful"][layer][n].ravel() for n in leaves])
        if layer == "conv":  # conv blocks: faithful = unclipped principled up to B2/B6 rounding
            np.testing.assert_allclose(faithful, u0, rtol=0.0, atol=1e-9 * np.abs(u0).max())
