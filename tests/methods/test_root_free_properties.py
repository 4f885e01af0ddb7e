"""Property tests of the root-free methods (spec ``root_free.md`` §6), float64 on NumPy and
``array_api_strict``. Only the Kronecker product of IF-Shampoo's factors is identifiable, so the
tests compare products or preconditioned quantities, never single factors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import precond_ref as pr
from precond_ref.transform import PrecondState

FIXED_POINT_STEPS = 120  # enough for 1e-9 with β₂ = 0.8 and λ ≥ 0.1


def _vectors(min_dim=1, max_dim=4, low=-2.0, high=2.0):
    return st.integers(min_dim, max_dim).flatmap(
        lambda d: st.lists(st.floats(low, high), min_size=d, max_size=d).map(np.array)
    )


def _matrix(rows, cols, scale=1.0):
    return st.lists(st.floats(-scale, scale), min_size=rows * cols, max_size=rows * cols).map(
        lambda v: np.array(v).reshape(rows, cols)
    )


def _with_group(state: PrecondState, key: str, **entries) -> PrecondState:
    groups = dict(state.groups)
    groups[key] = {**groups[key], **entries}
    return state._replace(groups=groups)


def _iterate(backend, opt, params, grad, steps):
    """Repeat one fixed gradient up to ``steps`` times; return the final state.

    It stops early after a step that moved no factor entry by more than 1e-13 of the largest
    magnitude of its factor: the iteration has then converged to the rounding level (a contraction
    moving by 1e-13 is within about 1e-12 of its fixed point), so further steps only repeat it.
    The callers still check the fixed point's equations to 1e-9, so an iteration that stalls
    anywhere else fails them."""
    params = backend.tree(params)
    grad = backend.tree(grad)
    state = opt.init(params)

    def factors(state):
        return {(name, key): _np(backend, v) for name, group in state.groups.items()
                for key, v in group.items() if "factor/" in key}

    before = factors(state)
    for _ in range(steps):
        _, state = opt.update(grad, state, params)
        after = factors(state)
        if all(np.max(np.abs(after[k] - before[k])) <= 1e-13 * np.max(np.abs(after[k])) for k in after):
            break
        before = after
    return state


def _np(backend, x):
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Fixed points of the factor updates (§2.5)


@settings(max_examples=8)
@given(g=_vectors(), batch=st.integers(1, 8), damping=st.floats(0.1, 1.0), momentum=st.sampled_from([0.0, 0.5]))
def test_fixed_point_1d_dense(property_backend, g, batch, damping, momentum):
    """I-P1: under a repeated gradient g, K Kᵀ → (B g gᵀ + λI)⁻¹ (spec §2.5, E[M] = 0 ⇔ KᵀSK = I)."""
    if not np.any(g):
        g = np.ones_like(g)
    opt = pr.if_shampoo(batch_size=batch, damping=damping, preconditioner_lr=0.8, precondition_every=1,
                        preconditioner_momentum=momentum, momentum=0.0, learning_rate=1e-3, structures="dense")
    state = _iterate(property_backend, opt, {"w": np.zeros_like(g)}, {"w": g}, FIXED_POINT_STEPS)
    k = _np(property_backend, state.groups["w"]["stacks/0/factor/0"])[0]
    want = np.linalg.inv(batch * np.outer(g, g) + damping * np.eye(g.size))
    np.testing.assert_allclose(k @ k.T, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@settings(max_examples=8)
@given(g=_vectors(), batch=st.integers(1, 8), damping=st.floats(0.1, 1.0))
def test_fixed_point_1d_diagonal(property_backend, g, batch, damping):
    """I-P1b / I-P8: a diagonal factor reaches k² = 1/(B g² + λ), RF-RMSProp's preconditioner at its
    own fixed point s = B g² (spec §2.5)."""
    if not np.any(g):  # an all-zero gradient skips the refresh (S2)
        g = np.ones_like(g)
    opt = pr.if_shampoo(batch_size=batch, damping=damping, preconditioner_lr=0.8, structures="diagonal",
                        precondition_every=1, momentum=0.0, learning_rate=1e-3)
    state = _iterate(property_backend, opt, {"w": np.zeros_like(g)}, {"w": g}, FIXED_POINT_STEPS)
    k = _np(property_backend, state.groups["w"]["stacks/0/factor/0"])[0]
    np.testing.assert_allclose(k * k, 1.0 / (batch * g * g + damping), rtol=1e-9)


@settings(max_examples=6)
@given(
    shape=st.tuples(st.integers(2, 3), st.integers(2, 4)),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
    damping=st.floats(0.1, 1.0),
)
def test_fixed_point_2d_flip_flop(property_backend, shape, seed, batch, damping):
    """I-P2: for a fixed G the factors solve the flip-flop equations of §2.5:
    Cᵀ S_C C = I with S_C = [λ Tr(KKᵀ) I + B G KKᵀ Gᵀ]/d_i and Kᵀ S_K K = I with
    S_K = [λ Tr(CCᵀ) I + B Gᵀ CCᵀ G]/d_o. The fixed point does not depend on the factor step size;
    at 0.9 the iteration reaches it within 1e-10 in at most ~110 steps over these ranges (200
    random draws), so 200 steps leave a margin."""
    g = np.random.default_rng(seed).normal(size=shape)
    opt = pr.if_shampoo(batch_size=batch, damping=damping, preconditioner_lr=0.9, momentum=0.0, learning_rate=1e-3,
                        precondition_every=1)
    state = _iterate(property_backend, opt, {"w": np.zeros(shape)}, {"w": g}, 200)
    c = _np(property_backend, state.groups["w"]["stacks/0/factor/0"])[0]
    k = _np(property_backend, state.groups["w"]["stacks/0/factor/1"])[0]
    d_o, d_i = shape
    pc, pk = c @ c.T, k @ k.T
    s_c = (damping * np.trace(pk) * np.eye(d_o) + batch * g @ pk @ g.T) / d_i
    s_k = (damping * np.trace(pc) * np.eye(d_i) + batch * g.T @ pc @ g) / d_o
    np.testing.assert_allclose(c.T @ s_c @ c, np.eye(d_o), atol=1e-9)
    np.testing.assert_allclose(k.T @ s_k @ k, np.eye(d_i), atol=1e-9)


# --------------------------------------------------------------------------------------------
# One factor step against the spec's formulas (I-P10, I-P11)


def _spec_factor_step(g, factors, batch, damping, lr):
    """Spec §2.3 written out without SIRFShampoo's scaling devices, every M_n from the old factors."""
    dims = g.shape
    y = np.sqrt(batch) * g
    for n, k in enumerate(factors):
        y = np.moveaxis(np.tensordot(k, y, axes=([0], [n])), 0, n)  # ×_n Kᵀ
    t = [np.trace(k.T @ k) / d for k, d in zip(factors, dims)]
    new = []
    for n, k in enumerate(factors):
        others = [i for i in range(len(dims)) if i != n]
        y_n = np.moveaxis(y, n, 0).reshape(dims[n], -1)
        m = 0.5 * (damping * np.prod([t[i] for i in others]) * k.T @ k
                   + y_n @ y_n.T / np.prod([dims[i] for i in others]) - np.eye(dims[n]))
        new.append(k - lr / max(1.0, np.linalg.norm(m)) * k @ m)
    return new


@settings(max_examples=20)
@given(
    shape=st.sampled_from([(3,), (2, 3), (3, 2, 2)]),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 6),
    damping=st.floats(0.0, 1.0),
    lr=st.floats(0.01, 0.5),
)
def test_factor_step_matches_spec_formula(property_backend, shape, seed, batch, damping, lr):
    """I-P10 / I-P11: one refresh from random factors equals §2.3's update computed without the
    K/√d and σ scaling devices (they are neutral) and with all M_n from the old factors
    (simultaneous update); the parameter step is then −η G ×_n K_nK_nᵀ."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=shape)
    factors = [np.eye(d) + 0.3 * rng.normal(size=(d, d)) for d in shape]
    opt = pr.if_shampoo(batch_size=batch, damping=damping, preconditioner_lr=lr, preconditioner_momentum=0.0,
                        momentum=0.0, learning_rate=0.1, kl_clip=0.0, structures="dense")  # the unclipped step (S8 tested alone)
    xb = property_backend
    state = opt.init({"w": xb.asarray(np.zeros(shape))})
    state = _with_group(state, "w", **{f"stacks/0/factor/{n}": xb.asarray(k[None]) for n, k in enumerate(factors)})
    updates, state = opt.update({"w": xb.asarray(g)}, state)
    want = _spec_factor_step(g, factors, batch, damping, lr)
    for n, k in enumerate(want):
        np.testing.assert_allclose(_np(xb, state.groups["w"][f"stacks/0/factor/{n}"])[0], k, rtol=1e-11, atol=1e-12)
    u = g
    for n, k in enumerate(want):
        u = np.moveaxis(np.tensordot(k @ k.T, u, axes=([1], [n])), 0, n)
    np.testing.assert_allclose(_np(xb, updates["w"]), -0.1 * u, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# First-order preconditioner invariance (I-P3)


def _one_step_precision(backend, k0, g, batch, damping, lr):
    opt = pr.if_shampoo(batch_size=batch, damping=damping, preconditioner_lr=lr, preconditioner_momentum=0.0,
                        momentum=0.0, structures="dense")
    state = opt.init({"w": backend.asarray(np.zeros_like(g))})
    state = _with_group(state, "w", **{"stacks/0/factor/0": backend.asarray(k0[None])})
    _, state = opt.update({"w": backend.asarray(g)}, state)
    k1 = _np(backend, state.groups["w"]["stacks/0/factor/0"])[0]
    return np.linalg.inv(k1 @ k1.T)


@settings(max_examples=25)
@given(
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    g_scale=st.sampled_from([0.1, 1.0, 10.0]),
    batch=st.integers(1, 8),
    damping=st.floats(0.01, 1.0),
)
def test_first_order_invariance_is_an_ema_on_the_precision(property_backend, dim, seed, g_scale, batch, damping):
    """I-P3: one factor step equals, up to O(β̃²), the EMA S ← (1 − β̃)S + β̃(B ggᵀ + λI) on the
    precision S = (KKᵀ)⁻¹, with the clamped step β̃ = β₂/max(1, ‖M‖_F) (K ← K(I − β̃M) with
    M = ½[Kᵀ(Bggᵀ + λI)K − I] gives (KKᵀ)⁻¹ = S + β̃(H − S) + O(β̃²)). Halving β₂ quarters the
    error; g_scale = 10 makes ‖M‖_F > 1, so the clamp is exercised."""
    rng = np.random.default_rng(seed)
    g = g_scale * rng.normal(size=dim)
    k0 = np.eye(dim) + 0.2 * rng.normal(size=(dim, dim))
    h = batch * np.outer(g, g) + damping * np.eye(dim)
    s0 = np.linalg.inv(k0 @ k0.T)
    m = 0.5 * (k0.T @ h @ k0 - np.eye(dim))
    errors = []
    for lr in (2e-3, 1e-3):
        eff = lr / max(1.0, np.linalg.norm(m))
        ema = (1 - eff) * s0 + eff * h
        got = _one_step_precision(property_backend, k0, g, batch, damping, lr)
        errors.append(np.linalg.norm(got - ema) / np.linalg.norm(ema))
    assert errors[0] < 1e-4
    if errors[1] > 1e-12:  # above rounding: the error is second order
        assert 3.5 < errors[0] / errors[1] < 4.5, errors


# --------------------------------------------------------------------------------------------
# Kronecker (affine) equivariance of IF-Shampoo (I-P4)


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(2, 3), st.integers(2, 4)),
    momentum=st.sampled_from([0.0, 0.7]),
    factor_momentum=st.sampled_from([0.0, 0.5]),
    weight_decay=st.sampled_from([0.0, 0.05]),
    every=st.integers(1, 2),
)
def test_kronecker_equivariance(property_backend, seed, shape, momentum, factor_momentum, weight_decay, every):
    """I-P4: with λ = 0, W' = A W Bᵀ, gradients of f'(W') = f(A⁻¹W'B⁻ᵀ) (G' = A⁻ᵀ G B⁻¹) and initial
    factors C'₀ = A C₀, K'₀ = B K₀, every iterate satisfies W'_t = A W_t Bᵀ (Y, hence M_n, is
    unchanged; P'_C = A P_C Aᵀ, P'_K = B P_K Bᵀ), with momentum, Riemannian momentum, the clamp
    and weight decay."""
    rng = np.random.default_rng(seed)
    d_o, d_i = shape
    a = np.eye(d_o) + 0.4 * rng.normal(size=(d_o, d_o))
    b = np.eye(d_i) + 0.4 * rng.normal(size=(d_i, d_i))
    target = rng.normal(size=shape)
    x = rng.normal(size=(5, d_i))

    def grad(w):  # f(W) = ½‖X Wᵀ − X targetᵀ‖² / 5
        return (w - target) @ x.T @ x / 5

    def grad_primed(w_primed):
        w = np.linalg.solve(a, w_primed) @ np.linalg.inv(b).T
        return np.linalg.inv(a).T @ grad(w) @ np.linalg.inv(b)

    opt = pr.if_shampoo(learning_rate=0.05, momentum=momentum, preconditioner_lr=0.2,
                        preconditioner_momentum=factor_momentum, damping=0.0, weight_decay=weight_decay,
                        batch_size=3, precondition_every=every)
    xb = property_backend
    w = rng.normal(size=shape)
    w_primed = a @ w @ b.T
    state = opt.init({"w": xb.asarray(w)})
    state_primed = _with_group(opt.init({"w": xb.asarray(w_primed)}), "w",
                               **{"stacks/0/factor/0": xb.asarray(a[None]), "stacks/0/factor/1": xb.asarray(b[None])})
    for _ in range(6):
        u, state = opt.update({"w": xb.asarray(grad(w))}, state, {"w": xb.asarray(w)})
        up, state_primed = opt.update({"w": xb.asarray(grad_primed(w_primed))}, state_primed,
                                      {"w": xb.asarray(w_primed)})
        w = w + _np(xb, u["w"])
        w_primed = w_primed + _np(xb, up["w"])
        np.testing.assert_allclose(w_primed, a @ w @ b.T, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------
# RF-RMSProp: scale equivariance (I-P5) and loss scaling (I-P6)


@settings(max_examples=30)
@given(
    dim=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    momentum=st.sampled_from([0.0, 0.8]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    b2=st.floats(0.0, 0.99),
)
def test_rf_rmsprop_scale_equivariance(property_backend, dim, seed, momentum, weight_decay, b2):
    """I-P5: with λ = 0, θ' = a ⊙ θ, gradients of f'(θ') = f(θ'/a) (g' = g/a) and s'₀ = s₀/a² give
    θ'_t = a ⊙ θ_t (s' = s/a², Δ' = (g/a)/(s/a²) = a Δ). Root-based RMSProp fails this."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.uniform(-2, 2, size=dim))
    target = rng.normal(size=dim)
    curvature = np.exp(rng.uniform(-1, 1, size=dim))

    def grad(theta):
        return curvature * (theta - target) + 0.1 * np.sin(theta)

    opt = pr.rf_rmsprop(0.05, b2=b2, damping=0.0, momentum=momentum, weight_decay=weight_decay, batch_size=4,
                        mode="faithful", state_dtype=property_backend.xp.float64)
    xb = property_backend
    theta = rng.normal(size=dim)
    theta_p = a * theta
    state = opt.init({"w": xb.asarray(theta)})
    state_p = _with_group(opt.init({"w": xb.asarray(theta_p)}), "w", s=xb.asarray(1.0 / a**2))
    for _ in range(8):
        u, state = opt.update({"w": xb.asarray(grad(theta))}, state, {"w": xb.asarray(theta)})
        up, state_p = opt.update({"w": xb.asarray(grad(theta_p / a) / a)}, state_p, {"w": xb.asarray(theta_p)})
        theta = theta + _np(xb, u["w"])
        theta_p = theta_p + _np(xb, up["w"])
        np.testing.assert_allclose(theta_p, a * theta, rtol=1e-10, atol=1e-12)


@settings(max_examples=30)
@given(g=_vectors(low=0.1, high=3.0), c=st.floats(0.01, 100.0), batch=st.integers(1, 16))
def test_rf_rmsprop_loss_scaling(property_backend, g, c, batch):
    """I-P6: with λ = 0, b2 = 0 (s = B g²), no momentum or decay, the step is 1/(B g) and scaling
    the loss by c divides it by c (root-free steps are not scale-invariant; Adam's would be)."""
    opt = pr.rf_rmsprop(1.0, b2=0.0, damping=0.0, batch_size=batch, mode="faithful",
                        state_dtype=property_backend.xp.float64)
    xb = property_backend
    state = opt.init({"w": xb.asarray(np.zeros_like(g))})
    u, _ = opt.update({"w": xb.asarray(g)}, state)
    uc, _ = opt.update({"w": xb.asarray(c * g)}, state)
    np.testing.assert_allclose(_np(xb, u["w"]), -1.0 / (batch * g), rtol=1e-13)
    np.testing.assert_allclose(_np(xb, uc["w"]), _np(xb, u["w"]) / c, rtol=1e-13)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 3))
def test_zero_gradient_leaves_factors_unchanged(property_backend, seed, steps):
    """I-P13 (S2): in principled mode an all-zero group gradient leaves K_n and m_n unchanged."""
    rng = np.random.default_rng(seed)
    xb = property_backend
    opt = pr.if_shampoo(batch_size=2, preconditioner_lr=0.3, precondition_every=1)
    params = {"w": xb.asarray(rng.normal(size=(2, 3)))}
    state = opt.init(params)
    for _ in range(steps):
        _, state = opt.update({"w": xb.asarray(rng.normal(size=(2, 3)))}, state)
    _, after = opt.update({"w": xb.asarray(np.zeros((2, 3)))}, state)
    for name in ("stacks/0/factor/0", "stacks/0/factor/1", "stacks/0/factor_momentum/0", "stacks/0/factor_momentum/1"):
        np.testing.assert_array_equal(_np(xb, after.groups["w"][name]), _np(xb, state.groups["w"][name]))


@given(seed=st.integers(0, 2**32 - 1), kappa=st.sampled_from([1e-6, 1e-3, 1e-1, 10.0]), batch=st.integers(1, 8))
def test_if_shampoo_kl_clip_bounds_the_step(property_backend, seed, kappa, batch):
    """S8 (Ba et al. 2017, section 5): the preconditioned gradient D = Pg is scaled by
    nu = min(1, sqrt(kappa / (eta^2 <D, g>))) before the momentum. On the first step (momentum
    buffer 0) the step is -eta nu D, so it is the unclipped step u0 = -eta D times nu, with
    eta^2 <D, g> = -eta <u0, g>; faithful mode is never clipped."""
    rng = np.random.default_rng(seed)
    g = {"w": 30.0 * rng.normal(size=(3, 4)), "b": 30.0 * rng.normal(size=5)}
    eta = 0.5
    xb = property_backend
    # faithful's dense vector factors, so that the unclipped steps agree
    kw = dict(learning_rate=eta, batch_size=batch, damping=1e-3, preconditioner_lr=0.3, structures="dense")
    steps = {}
    for name, extra in [("clipped", dict(kl_clip=kappa)), ("plain", dict(kl_clip=0.0)), ("faithful", dict(mode="faithful"))]:
        opt = pr.if_shampoo(**kw, **extra)
        params = {k: xb.asarray(np.zeros_like(v)) for k, v in g.items()}
        updates, _ = opt.update({k: xb.asarray(v) for k, v in g.items()}, opt.init(params))
        steps[name] = {k: _np(xb, v) for k, v in updates.items()}
    for key in g:
        u0, u = steps["plain"][key], steps["clipped"][key]
        quadratic = -eta * float(np.sum(u0 * g[key]))
        nu = 1.0 if quadratic <= kappa else np.sqrt(kappa / quadratic)
        np.testing.assert_allclose(u, nu * u0, rtol=1e-12, atol=0.0)
        np.testing.assert_allclose(steps["faithful"][key], u0, rtol=1e-10, atol=1e-300)


@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 8), batch=st.integers(1, 8),
       b1=st.sampled_from([0.0, 0.5, 0.9]), b2=st.sampled_from([0.5, 0.999]), bias_correction=st.booleans())
def test_rf_adamw_constant_gradient_closed_form(property_backend, seed, steps, batch, b1, b2, bias_correction):
    """RF-AdamW's rule (docstring, authors' ``MyAdamW``) for a constant gradient g, no weight decay:
    m_t = (1 - b1^t) g (an EMA, not a heavy-ball sum), s_t = b2^t + (1 - b2^t) B g^2 (s_0 = 1), and the
    step is -eta m_t/c1 / (s_t/c2 + lambda), c_i = 1 - b_i^t with bias correction, else 1."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(3, 2))
    eta, lam = 0.05, 1e-3
    opt = pr.rf_adamw(learning_rate=eta, b1=b1, b2=b2, damping=lam, batch_size=batch, bias_correction=bias_correction)
    xb = property_backend
    params = {"w": xb.asarray(np.zeros_like(g))}
    state = opt.init(params)
    for t in range(1, steps + 1):
        updates, state = opt.update({"w": xb.asarray(g)}, state, params)
        m, s = (1 - b1**t) * g, b2**t + (1 - b2**t) * batch * g * g
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        np.testing.assert_allclose(_np(xb, updates["w"]), -eta * (m / c1) / (s / c2 + lam), rtol=1e-12, atol=0.0)
