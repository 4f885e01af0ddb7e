"""The loop oracles of ``precond_ref.testing.loops`` equal the library, method by method.

Each test runs an oracle (plain float64 loops, one block and one step at a time) and the library's
factory (``opt.init`` / ``opt.update``) side by side for several steps on a tiny tree of float64
NumPy parameters: a 2-D weight with its bias, a conv-like 4-D weight, a vector, and a matrix with a
side longer than a small ``block_size``. Gradients are deterministic (seeded noise plus a term in
the current parameters, so that the trajectory feeds back into them) and both follow the library's
parameters, so that every step compares the same input.

Tolerance, from the rounding model: two float64 computations of the same formula by different
operation orders differ by a few ulps per operation, growing with the number of steps; where an
inverse or inverse root enters, the relative error of the result is amplified by the condition
number of the damped matrix, at most :math:`(\\lVert F\\rVert + \\lambda)/\\lambda`. So each update
is compared as :math:`\\lVert u_{lib} - u_{oracle}\\rVert_\\infty \\le \\mathrm{rtol}\\,
\\lVert u_{oracle}\\rVert_\\infty` per leaf with ``rtol = 1e-10`` for element-wise methods and
``1e-10 × κ`` for the matrix ones (κ a bound on the condition number given with each test).
Where the library keeps float32 state on purpose the oracle emulates it in float32: faithful
DASGO's statistic operation for operation (the float64 bound holds), faithful ASGO's statistic and
iterative root with float32's bound (given there).
"""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.testing import loops

RTOL = 1e-10


def tiny_tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "fc": {"weight": rng.standard_normal((5, 3)), "bias": rng.standard_normal(5)},
        "conv": {"weight": rng.standard_normal((3, 2, 2, 2))},
        "vec": rng.standard_normal(6),
        "long": rng.standard_normal((10, 3)),
    }


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _flat(tree[key], prefix + (key,))
    else:
        yield "/".join(prefix), tree


def _map(f, *trees):
    if isinstance(trees[0], dict):
        return {k: _map(f, *(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def gradients(params: dict, t: int, zeros: bool = False) -> dict:
    """Seeded noise plus 0.3 × the parameters: deterministic, and different at every step. With
    ``zeros``, the gradients of ``vec`` and ``conv/weight`` are exactly zero on steps 2 and 3 (the
    methods' zero-gradient rules)."""
    rng = np.random.default_rng(100 + t)
    grads = _map(lambda p: rng.standard_normal(p.shape) + 0.3 * p, params)
    if zeros and t in (2, 3):
        grads["vec"] = np.zeros_like(grads["vec"])
        grads["conv"]["weight"] = np.zeros_like(grads["conv"]["weight"])
    return grads


def run_both(factory, oracle_cls, config: dict, *, steps: int = 10, rtol: float = RTOL, extra=None,
             oracle_config=None, params=None):
    """Run library and oracle ``steps`` steps; assert every update equal to ``rtol`` per leaf.
    ``config["zeros"]``: zero gradients on some steps (:func:`gradients`), not a hyperparameter."""
    extra = extra or {}
    config = dict(config)
    zeros = config.pop("zeros", False)
    params = tiny_tree() if params is None else params
    opt = factory(**config)
    state = opt.init(params)
    oracle = oracle_cls(params, **(config if oracle_config is None else oracle_config))
    for t in range(steps):
        grads = gradients(params, t, zeros)
        ours, state = opt.update(grads, state, params, **extra)
        theirs = oracle.step(grads, params, **extra)
        ours_flat, theirs_flat = dict(_flat(ours)), dict(_flat(theirs))
        assert ours_flat.keys() == theirs_flat.keys()
        for path, u in ours_flat.items():
            v = theirs_flat[path]
            scale = max(np.max(np.abs(v)), 1e-300)
            err = np.max(np.abs(np.asarray(u) - v))
            assert err <= rtol * scale, f"step {t}, {path}: |lib - oracle| = {err:.3e}, |oracle| = {scale:.3e}"
        params = _map(lambda p, u: p + np.asarray(u), params, ours)
    return params


# ------------------------------------------------------------------------------------------------
# RF-RMSProp, RF-AdamW: element-wise, no inverse (condition number 1).


@pytest.mark.parametrize("mode", ["principled", "faithful"])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "weight_decay": 0.1}, {"initial_scale": 0.0, "scale_by_batch_size": False}])
def test_rf_rmsprop(mode, options):
    """``LoopRFRMSProp`` = ``rf_rmsprop`` (spec root_free.md §2.1-2.2, paper Algorithm 1): s ← b2 s +
    (1−b2) B g², Δ = g/(s+λ) + κθ, heavy ball, per element; faithful with float64 state (R1)."""
    config = dict(learning_rate=0.05, b2=0.9, damping=1e-3, batch_size=4, mode=mode, **options)
    lib = dict(config, state_dtype=np.float64) if mode == "faithful" else config
    run_both(lambda **_: pr.rf_rmsprop(**lib), loops.LoopRFRMSProp, config)


def test_rf_rmsprop_faithful_zero_denominator():
    """R2: faithful mode with λ = 0 and s₀ = 0 maps the zero denominator of a zero gradient to a zero step."""
    config = dict(learning_rate=0.05, b2=0.9, damping=0.0, initial_scale=0.0, batch_size=2, mode="faithful")
    params = {"w": np.array([1.0, 2.0, 3.0])}
    opt, oracle = pr.rf_rmsprop(**config, state_dtype=np.float64), loops.LoopRFRMSProp(params, **config)
    state = opt.init(params)
    grads = {"w": np.array([0.0, 1.0, -2.0])}
    ours, _ = opt.update(grads, state, params)
    theirs = oracle.step(grads, params)
    np.testing.assert_allclose(ours["w"], theirs["w"], rtol=RTOL, atol=0)
    assert theirs["w"][0] == 0.0


@pytest.mark.parametrize("mode", ["principled", "faithful"])
@pytest.mark.parametrize("options", [{}, {"bias_correction": True, "weight_decay": 0.1}])
def test_rf_adamw(mode, options):
    """``LoopRFAdamW`` = ``rf_adamw`` (spec root_free.md §2.7): decoupled decay first, m and s = B v EMAs,
    θ ← θ − (η/c1) m/(s/c2 + λ); faithful with float64 state (R1)."""
    config = dict(learning_rate=0.01, b1=0.8, b2=0.9, damping=1e-3, batch_size=3, mode=mode, **options)
    lib = dict(config, state_dtype=np.float64) if mode == "faithful" else config
    run_both(lambda **_: pr.rf_adamw(**lib), loops.LoopRFAdamW, config)


# ------------------------------------------------------------------------------------------------
# AGD: element-wise, no inverse.


@pytest.mark.parametrize("mode", ["principled", "faithful"])
@pytest.mark.parametrize("options", [
    {},
    {"weight_decay": 0.1, "amsgrad": True},
    {"weight_decay": 0.1, "weight_decay_mode": "l2", "clip": 0.5},
    {"weight_decay": 0.1, "weight_decay_mode": "fixed", "delta": 0.5},
    {"weight_decay": 0.1, "win": True, "zeros": True},
    {"learning_rate": lambda count: 0.01 * 0.9**count, "delta": lambda count: 0.05 + 0.01 * count},
])
def test_agd(mode, options):
    """``LoopAGD`` = ``agd`` (spec agd.md §2.2-2.3, paper Algorithm 1): s_t = m̂_t − m̂_{t−1},
    b_t EMA of s², r = m̂/max(√b̂, δ); faithful with the authors' float32 bias-correction scalars."""
    config = dict(learning_rate=0.01, b1=0.9, b2=0.99, delta=0.05, mode=mode)
    config.update(options)
    run_both(pr.agd, loops.LoopAGD, config)


# ------------------------------------------------------------------------------------------------
# ASGO, DASGO.


@pytest.mark.parametrize("mode, options", [
    ("principled", {}),
    ("principled", {"side": "left", "rms_target": None}),
    ("principled", {"side": "auto", "fallback_weight_decay": 0.1, "b1": 0.0, "zeros": True}),
    ("faithful", {}),
    ("faithful", {"rms_target": None, "fallback_weight_decay": 0.1}),
])
def test_dasgo(mode, options):
    """``LoopDASGO`` = ``dasgo`` (spec asgo.md §2.6-2.7): U = M diag(v + ε)^{-1/2}, renormalised to RMS r,
    decoupled decay; non-matrix leaves by the fallback Adam; faithful with the float32 statistic."""
    config = dict(dict(learning_rate=0.01, b1=0.9, b2=0.9, eps=1e-8, weight_decay=0.1, mode=mode), **options)
    params = tiny_tree()
    if mode == "faithful":  # the authors' DASGO takes matrices only: a conv weight goes to the fallback
        params["conv"]["weight"] = params["conv"]["weight"].reshape(3, 8)
    run_both(pr.dasgo, loops.LoopDASGO, config, params=params)


# The root (P + sI)^{-1/2} of a block has eigenvalues of P/τ + δ in [δ, k + δ] (τ = tr(P)/k), so its
# condition number is below k/δ + 1; with k ≤ 5 and δ = 1e-2 that is 501, and the step's relative
# error is bounded by about that times the float64 rounding of the statistic.
ASGO_KAPPA = 5 / 1e-2 + 1


@pytest.mark.parametrize("options", [
    {},
    {"block_size": 2},
    {"block_size": 2, "precondition_every": 3},
    {"block_size": 2, "precondition_every": 3, "spread_refresh": False, "accumulator": "sum", "b1": 0.0, "zeros": True},
    {"side": "left", "rms_target": None, "precondition_every": 1},
])
def test_asgo(options):
    """``LoopASGO`` = ``asgo(root_method="eigh")`` (spec asgo.md §2.3-2.5): per block of the side,
    P_j EMA of X_j X_jᵀ, Z_j = (P_j + s_j I)^{-1/2} by eigh on the block's phase, U = blockdiag(Z) M,
    renormalised to RMS r; tolerance 1e-10 × the blocks' condition bound."""
    config = dict(dict(learning_rate=0.01, b1=0.9, b2=0.8, weight_decay=0.1, damping=1e-2), **options)
    run_both(lambda **c: pr.asgo(root_method="eigh", **c), loops.LoopASGO, config, rtol=RTOL * ASGO_KAPPA)


# ------------------------------------------------------------------------------------------------
# MBF: per mini-block (F + λI)^{-1}; the damped blocks' condition number is at most (‖F‖ + λ)/λ,
# below 1e3 for these gradients (‖F‖ ≲ 20) and λ = 0.05.

MBF_KAPPA = 1e3


@pytest.mark.parametrize("mode, options", [
    ("principled", {}),
    ("principled", {"block_size": 2, "weight_decay": 0.1, "zeros": True}),
    ("principled", {"block_size": 2, "precondition_every": 6, "statistics_every": 2}),
    ("principled", {"block_size": 2, "precondition_every": 6, "statistics_every": 2, "refresh_phases": 1, "kl_clip": 0.0}),
    ("principled", {"max_block_dim": 4, "diagonal_second_moment": "gradient"}),
    ("principled", {"fc_blocks": "official_chunks", "learning_rate": 0.5}),
    ("faithful", {}),
    ("faithful", {"weight_decay": 0.1, "precondition_every": 3, "statistics_every": 2}),
])
def test_mbf(mode, options):
    """``LoopMBF`` = ``mbf`` (spec mbf.md §2.2-2.4, paper Algorithm 1): per mini-block F_b EMA on
    statistics steps, (F_b + λI)^{-1} on its share's refresh steps, D_b = F_b^{-1} m_b, the per-layer
    KL clip, the diagonal rule elsewhere; weight+bias as one [W | b] layer; tolerance 1e-10 × 1e3."""
    config = dict(learning_rate=0.02, damping=0.05, momentum=0.8, b2=0.7, statistics_every=1,
                  precondition_every=1, diagonal_b2=0.99, diagonal_eps=1e-6, mode=mode)
    config.update(options)
    run_both(pr.mbf, loops.LoopMBF, config, rtol=RTOL * MBF_KAPPA)


# ------------------------------------------------------------------------------------------------
# IF-Shampoo: matmuls only, no inverse; rounding accumulates through the factor recursion
# K_n ← K_n(I − β₂ m_n) (a contraction for the clamped step), a few ulps per product per step.


@pytest.mark.parametrize("mode, options", [
    ("principled", {}),
    ("principled", {"structures": None, "block_size": 2}),  # S12: a vector's factor diagonal, in blocks
    ("principled", {"block_size": 2, "precondition_every": 3}),
    ("principled", {"block_size": 2, "precondition_every": 3, "spread_refresh": False, "weight_decay": 0.1}),
    ("principled", {"grouping": "weight_bias", "block_size": 4, "preconditioner_momentum": 0.0, "kl_clip": 0.0}),
    ("principled", {"structures": "diagonal", "learning_rate": 0.3, "zeros": True}),
    ("principled", {"block_size": 2, "zeros": True}),
    ("principled", {"max_dense_dim": 4, "preconditioner_lr_scale": lambda path: 0.25 if "bias" in path else 1.0}),
    ("faithful", {}),
    ("faithful", {"grouping": "weight_bias", "momentum": 0.0, "weight_decay": 0.1, "precondition_every": 2}),
    ("faithful", {"precondition_every": pr.prototype_schedule(3), "preconditioner_lr_scale": pr.prototype_lr_scale,
                  "learning_rate": lambda count: 0.05 / (1 + count)}),
])
def test_if_shampoo(mode, options):
    """``LoopIFShampoo`` = ``if_shampoo`` (spec root_free.md §2.3-2.4, paper Figure 3): per tile, the
    simultaneous factor step M_n, m_n, K_n on its phase's refresh steps; D = G ×_n K_nK_nᵀ, the KL
    clip per group, weight decay and heavy ball per leaf."""
    config = dict(learning_rate=0.05, momentum=0.9, preconditioner_lr=0.2, preconditioner_momentum=0.5,
                  damping=1e-2, batch_size=4, mode=mode)
    config.update(options)
    run_both(pr.if_shampoo, loops.LoopIFShampoo, config)


# ------------------------------------------------------------------------------------------------
# Sketchy, S-AdaGrad: the library's exact FD paths (the thin SVD; S-AdaGrad's exact "incremental"
# path, rank + 1 < d). The operator (Ḡ + ρI + εI)^a, |a| ≤ 1/2, amplifies the rounding of a
# decomposition by at most its condition number ((e_max + shift)/shift)^{1/2}: with a relative
# ε = 1e-4 that is below 1e2; with S-AdaGrad's absolute δ ≥ 1e-2 and e_max ≤ 1e3 (ten gradients of
# squared norm below 1e2) below 3.2e2.

FD_KAPPA = (1 + 1e3 / 1e-2) ** 0.5


@pytest.mark.parametrize("mode, options", [
    ("principled", {}),
    ("principled", {"block_size": 2, "rank": 1}),
    ("principled", {"block_size": 4, "rank": 2, "precondition_every": 3, "weight_decay": 0.1, "b2": 0.9}),
    ("principled", {"block_size": 4, "rank": 2, "precondition_every": 2, "spread_refresh": False, "graft": "sgd"}),
    ("principled", {"rank": 2, "precondition_1d": True, "nesterov": False, "momentum_ema": True,
                    "start_preconditioning_step": 3, "relative_eps": False, "eps": 1e-2}),
    ("principled", {"rank": 2, "graft": "none", "zeros": True}),
    ("faithful", {}),
    ("faithful", {"rank": 2, "b2": 0.9, "precondition_1d": True}),
])
def test_sketchy(mode, options):
    """``LoopSketchy`` = ``sketchy(decomposition="svd")`` (spec fd_shampoo.md §2.2-2.4, paper Algorithm
    2): per axis block, the FD step of its rows of G_(n) on its phase's steps, P(G) axis by axis, the
    RMSProp graft norm, trace momentum, decay; tolerance 1e-10 × the operator's condition bound."""
    config = dict(dict(learning_rate=0.01, rank=3, b2=0.99, eps=1e-4, momentum=0.9, merge_dims=2, mode=mode), **options)
    run_both(lambda **c: pr.sketchy(decomposition="svd", **c), loops.LoopSketchy, config,
             rtol=RTOL * FD_KAPPA)


@pytest.mark.parametrize("mode, options", [
    ("principled", {}),
    ("principled", {"block_size": 5, "b2": 0.9, "momentum": 0.5, "weight_decay": 0.1, "delta": 1e-3}),
    ("principled", {"block_size": 5, "precondition_every": 3}),
    ("principled", {"precondition_every": 2, "spread_refresh": False, "zeros": True}),
    ("faithful", {"delta": 1e-2}),
    ("faithful", {"delta": 0.1, "rank": 4}),
])
def test_s_adagrad(mode, options):
    """``LoopSAdaGrad`` = ``s_adagrad`` (spec fd_shampoo.md §2.5-2.6, paper Algorithm 1): the FD step
    of the flattened gradient (or each block) and (Ḡ + (ρ+δ)I + εI)^{-1/2} g; between refreshes the
    last sketch with g's own mass; tolerance 1e-10 × the operator's condition bound."""
    config = dict(dict(learning_rate=0.05, rank=2, mode=mode), **options)
    if mode == "principled":
        config["eps"] = 1e-4
    run_both(pr.s_adagrad, loops.LoopSAdaGrad, config, rtol=RTOL * FD_KAPPA)


# Faithful ASGO keeps its statistic in float32 and roots it by the authors' float32 iteration: the
# oracle emulates that, and the two differ by float32 rounding (u₃₂ = 6e-8) of the statistic and of
# the iteration's steps (10 to 20), amplified by the statistic's condition number (below 1e2 for
# these full-rank 3×3 statistics of random gradients, on the smaller side): u₃₂·1e2·20 ≈ 1e-4. On
# the larger side the statistic is rank-deficient and the undamped iteration amplifies its null
# space (spec §2.6), beyond any rounding bound: faithful ASGO is compared on the smaller side only.


@pytest.mark.parametrize("options", [
    {},
    {"root_method": "newton_schulz", "root_steps": 20, "rms_target": None, "fallback_weight_decay": 0.1},
    {"precondition_every": 2},
])
def test_asgo_faithful(options):
    """``LoopASGO(mode="faithful")`` = ``asgo(mode="faithful")`` (spec asgo.md §2.3, §2.6): float32
    statistic in lerp form, the undamped Polar-Express (or Newton–Schulz) root in float32, RMS
    renormalisation; matrices only (the conv weight as a 3×8 matrix), vectors by torch's Adam."""
    config = dict(dict(learning_rate=0.01, b1=0.9, b2=0.8, weight_decay=0.1, mode="faithful"), **options)
    params = tiny_tree()
    params["conv"]["weight"] = params["conv"]["weight"].reshape(3, 8)
    run_both(pr.asgo, loops.LoopASGO, config, rtol=1e-4, params=params)


# ------------------------------------------------------------------------------------------------
# Defaults: an oracle built with no hyperparameters states the same method as its factory called
# with none (the learning rate included, resolved by the mode where the factory's default depends
# on it). Only what the method cannot run without is given, to both: the batch size of the
# root-free methods. Faithful RF-RMSProp and RF-AdamW keep float32 state by default, which the
# float64 oracles do not emulate: the library is given ``state_dtype=float64`` (as above).
# Tolerances by the rounding model above, with the condition bound of each method's default
# damping where an inverse or inverse root enters: ASGO's relative δ = 1e-4 on blocks of k ≤ 5
# (k/δ + 1); Sketchy's relative ε = 1e-7 ((1 + 1/ε)^{1/2}); S-AdaGrad's absolute ε = 1e-7 with
# e_max ≤ 1e3 ((1 + e_max/ε)^{1/2}; faithful's undamped operator acts on the span of six random
# gradients, conditioned far better); MBF's λ = 1e-3 with ‖F‖ ≲ 20 ((‖F‖ + λ)/λ). Faithful ASGO:
# float32's bound of ``test_asgo_faithful``.

DEFAULT_CASES = [
    ("agd", "LoopAGD", {}, RTOL, RTOL),
    ("asgo", "LoopASGO", {}, RTOL * (5 / 1e-4 + 1), 1e-4),
    ("dasgo", "LoopDASGO", {}, RTOL, RTOL),
    ("sketchy", "LoopSketchy", {}, RTOL * (1 + 1e7) ** 0.5, RTOL * (1 + 1e7) ** 0.5),
    ("s_adagrad", "LoopSAdaGrad", {}, RTOL * (1 + 1e3 / 1e-7) ** 0.5, RTOL * (1 + 1e3 / 1e-7) ** 0.5),
    ("rf_rmsprop", "LoopRFRMSProp", {"batch_size": 4}, RTOL, RTOL),
    ("rf_adamw", "LoopRFAdamW", {"batch_size": 4}, RTOL, RTOL),
    ("if_shampoo", "LoopIFShampoo", {"batch_size": 4}, RTOL, RTOL),
    ("mbf", "LoopMBF", {}, RTOL * (1 + 20 / 1e-3), RTOL * (1 + 20 / 1e-3)),
]


@pytest.mark.parametrize("mode", ["principled", "faithful"])
@pytest.mark.parametrize("method, oracle, required, rtol_principled, rtol_faithful", DEFAULT_CASES,
                         ids=[c[0] for c in DEFAULT_CASES])
def test_oracle_defaults_are_the_factory_defaults(method, oracle, required, rtol_principled, rtol_faithful, mode):
    """Every oracle at its defaults equals its factory at its defaults, in both modes, step by step:
    the oracle's default hyperparameters (the learning rate among them) are the factory's."""
    config = dict(required, mode=mode)
    lib = dict(config)
    if method in ("rf_rmsprop", "rf_adamw") and mode == "faithful":
        lib["state_dtype"] = np.float64
    params = tiny_tree()
    if method in ("asgo", "dasgo") and mode == "faithful":  # the authors' ASGO and DASGO take matrices only
        params["conv"]["weight"] = params["conv"]["weight"].reshape(3, 8)
    run_both(lambda **_: getattr(pr, method)(**lib), getattr(loops, oracle), config, steps=6, params=params,
             rtol=rtol_principled if mode == "principled" else rtol_faithful)
