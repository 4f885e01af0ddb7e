r"""ASGO's conditioning on rank-deficient gradients (docs/methods/asgo.md, "Conditioning").

The first principled step of an m×k matrix (k ≤ m, the right side; a wide leaf is its transpose on
the left side), weight decay 0: ``M = (1-μ)G``, ``P = (1-β₂)GᵀG``, ``s = δ tr(P)/k + ε``, so the
direction before the RMS renormalisation is

    U = M (P + sI)^{-1/2} = (1-μ)(1-β₂)^{-1/2} f(G),   f(G) = G (GᵀG + s'I)^{-1/2},
    s' = δ‖G‖_F²/k + ε/(1-β₂),

and with the SVD ``G = Σ σ_i a_i b_iᵀ`` (σ_1 ≥ … ≥ σ_k ≥ 0), ``f(G) = Σ φ(σ_i) a_i b_iᵀ``,
``φ(σ) = σ/√(σ² + s')``. The derivative of such a singular-value function, s' held fixed, acts in
the singular bases through φ'(σ_i), the divided differences (φ(σ_i) ∓ φ(σ_j))/(σ_i ∓ σ_j) and,
on the rows outside G's column space, φ(σ_i)/σ_i (the standard formula for the Fréchet
derivative of a function of the singular values, as for the polar factor). φ is increasing and
concave with φ(0) = 0, so every one of them is at most φ(σ_k)/σ_k = 1/√(σ_k² + s') (mean value
theorem, and φ'(σ) ≤ φ(σ)/σ), and that gain is attained by ``E = e b_kᵀ`` with ``e`` outside G's
column space: a row the gradient leaves at zero (an embedding row no token of the batch touched)
along the direction ``b_k`` its rows span least (a null direction when G is rank-deficient). s'
depends on G too: ``ds' = 2δ⟨G, E⟩/k``, and ``‖∂f/∂s'‖_F = ½√(Σσ_i²/(σ_i²+s')³)``, whose product is at
most ``‖E‖ √(Σ t_i/(1+t_i)³)/‖G‖_F`` with ``t_i = σ_i²/s'`` (each term ≤ 4/27). The RMS
renormalisation projects out the change along U and divides by ‖U‖, so it never increases the
relative change. Hence the relative amplification of the step,
``(‖ΔU‖/‖U‖)/(‖E‖/‖G‖)``, is at most

    κ = ‖G‖_F / (√(σ_k² + s') ‖f(G)‖_F)  +  √(Σ t_i/(1+t_i)³) / ‖f(G)‖_F,

and the worst direction above (⟨G, E⟩ = 0, orthogonal to U) realises the first term exactly
to first order. For a rank-r gradient (σ_k = 0) of equal singular values, κ ≈ √(k/(δr)).
"""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.testing.loops import LoopASGO

U64 = np.finfo(np.float64).eps / 2  # the unit roundoff of float64
RHO = 1e-7  # the relative size of the gradient perturbations
#: The relative accuracy of a converged, checked Polar-Express root: the check keeps the
#: eigenvalues of Z·Y within ``root_tolerance`` (0.05) of 1, so Z is within 2.6% of the exact root
#: (docs/methods/asgo.md, D13), and the gain (one eigenvalue of Z) and ‖f(G)‖ (the others) each
#: move by at most that.
POLAR_EXPRESS_ACCURACY = (1.0 + 0.026) / (1.0 - 0.026) - 1.0


def embedding_gradient(rng, m, n, rows):
    """An embedding-like gradient: ``rows`` non-zero rows of the tall orientation (the tokens of a
    batch), each a random vector along the short side; rank ``rows`` when that is at most the
    short side. A wide leaf (m < n) is its transpose."""
    tall, short = max(m, n), min(m, n)
    g = np.zeros((tall, short))
    touched = rng.choice(tall, rows, replace=False)
    g[touched] = rng.standard_normal((rows, short)) * rng.uniform(0.5, 2.0, size=(rows, 1))
    return (g if m >= n else g.T), [i for i in range(tall) if i not in set(touched)]


def derived_bound(h, delta, eps=1e-30, b2=0.8):
    """``(gain, extra, worst)`` of the oriented (tall) gradient ``h``: the first term of κ (the gain of
    the worst direction), the bound on the second, and the worst direction's right vector ``b_k``."""
    k = h.shape[1]
    _, sigma, vt = np.linalg.svd(h, full_matrices=True)
    sigma = np.concatenate([sigma, np.zeros(k - sigma.size)])
    s_prime = delta * np.sum(h * h) / k + eps / (1.0 - b2)
    f_norm = np.sqrt(np.sum(sigma**2 / (sigma**2 + s_prime)))
    t = sigma**2 / s_prime
    gain = np.linalg.norm(h) / (np.sqrt(sigma[-1] ** 2 + s_prime) * f_norm)
    extra = np.sqrt(np.sum(t / (1.0 + t) ** 3)) / f_norm
    return gain, extra, vt[-1]


def rounding_factor(h):
    """The dimension factor of the rounding model: the relative error of one computed first step is
    at most ``rounding_factor · u · κ``: ``m`` from the sums of GᵀG and of the norm, ``2k`` from the
    symmetric eigensolver's backward error and the sums of M·Z, each a backward error reaching U
    through κ; a backward error of P reaches the rotation between G's range and the null space
    through the divided difference ((λ_r+s)^{-1/2} − s^{-1/2})/λ_r, a factor ‖G‖_F/σ_r more (σ_r
    the smallest non-zero singular value)."""
    m, k = h.shape
    sigma = np.linalg.svd(h, compute_uv=False)
    sigma_r = sigma[sigma > sigma[0] * k * U64].min()
    return (m + 2 * k) * np.linalg.norm(h) / sigma_r


def first_steps(m, n, delta, root_method, gradients):
    """The first principled update of ``asgo`` (float64 NumPy) and of the float64 loop oracle for each
    gradient, learning rate 1, no weight decay, the root refreshed on the step."""
    options = dict(learning_rate=1.0, weight_decay=0.0, damping=delta, precondition_every=1)
    fast, oracle = [], []
    for g in gradients:
        params = {"w": np.zeros((m, n))}
        opt = pr.asgo(root_method=root_method, **options)
        fast.append(opt.update({"w": g}, opt.init(params), params)[0]["w"])
        oracle.append(LoopASGO(params, **options).step({"w": g}, params)["w"])
    return fast, oracle


def amplification(u0, u1):
    return np.linalg.norm(u1 - u0) / np.linalg.norm(u0) / RHO


CASES = [(shape, rows, delta) for shape in [(50, 8), (8, 50)] for rows in (1, 2, 8) for delta in (1e-2, 1e-4, 1e-6)]


@pytest.mark.parametrize("root_method", ["eigh", "polar_express"])
@pytest.mark.parametrize("shape, rows, delta", CASES)
def test_first_step_amplification_is_the_derived_condition_number(shape, rows, delta, root_method):
    """The relative change of the first step over that of the gradient (module docstring): in the
    worst direction ``e b_kᵀ`` it equals the derived gain ‖G‖/(√(σ_k² + s')‖f(G)‖), for the fast
    core and the float64 loop oracle alike (it is the method's, not the numerics'); in random
    directions it is at most κ. Tolerance: the second-order terms of a perturbation of size
    ``t = ρ‖G‖`` (φ(t) = (t/√s')(1 − t²/(2s') + …) with ``t²/s' ≤ ρ²k/δ``; the renormalisation of
    ``f + Δ``, Δ ⟂ f, shortens a change of relative size x = ρ·gain by 3x²/8; the shift ``δt²/k`` of
    s', relative at most ρ²), and the rounding of the two evaluations, ``2·rounding_factor·u·κ``
    of ‖U‖ against a difference of ρ·gain·‖U‖; the Polar-Express root moves the gain by its
    accuracy (:data:`POLAR_EXPRESS_ACCURACY`)."""
    m, n = shape
    rng = np.random.default_rng(7)
    g, untouched = embedding_gradient(rng, m, n, rows)
    h = g if m >= n else g.T
    gain, extra, b_k = derived_bound(h, delta)
    worst = np.zeros_like(h)
    worst[untouched[0]] = b_k
    random = rng.standard_normal(h.shape)
    perturbed = [h + RHO * np.linalg.norm(h) * e / np.linalg.norm(e) for e in (worst, random)]
    orient = (lambda x: x) if m >= n else (lambda x: x.T)
    fast, oracle = first_steps(m, n, delta, root_method, [g] + [orient(p) for p in perturbed])
    kappa = gain + extra
    tolerance = RHO**2 * h.shape[1] / delta + (RHO * kappa) ** 2 + RHO + 2 * rounding_factor(h) * U64 * kappa / (RHO * gain)
    if root_method == "polar_express":
        tolerance += POLAR_EXPRESS_ACCURACY
    for steps in (fast, oracle):
        assert abs(amplification(steps[0], steps[1]) / gain - 1.0) <= tolerance
        assert amplification(steps[0], steps[2]) <= kappa * (1.0 + tolerance)


@pytest.mark.parametrize("shape, rows, delta", CASES)
def test_fast_core_agrees_with_the_loop_oracle_within_rounding_times_conditioning(shape, rows, delta):
    """The fast core's first step (``root_method="auto"``: ``eigh`` for float64) and the float64 loop
    oracle's, on an embedding-like gradient and a perturbation of it, agree within the rounding of
    both, ``2·rounding_factor·u·κ`` relative (κ of the module docstring): the amplification of the
    test above is the exact map's, which both compute, not an error of the fast path."""
    m, n = shape
    rng = np.random.default_rng(11)
    g, _ = embedding_gradient(rng, m, n, rows)
    h = g if m >= n else g.T
    gain, extra, _ = derived_bound(h, delta)
    e = rng.standard_normal(g.shape)
    fast, oracle = first_steps(m, n, delta, "auto", [g, g + RHO * np.linalg.norm(g) * e / np.linalg.norm(e)])
    bound = 2 * rounding_factor(h) * U64 * (gain + extra)
    for u, reference in zip(fast, oracle):
        assert np.linalg.norm(u - reference) / np.linalg.norm(reference) <= bound
