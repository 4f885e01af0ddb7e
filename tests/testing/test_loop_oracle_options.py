"""The loop oracles equal the library on options and regimes that ``test_loop_oracles.py`` leaves out.

Each case below exercises a line of a rule that the configurations of ``test_loop_oracles.py`` never
reach (an option at a non-default value, or a regime where a branch of the arithmetic matters), so
that a wrong exponent, coefficient or branch there changes the compared updates. The comparison and
its tolerances are those of ``test_loop_oracles.py`` (``run_both``: per leaf, ``1e-10`` relative to
the oracle's update for element-wise rules, times the condition bound of the damped operator where
an inverse or inverse root enters; faithful ASGO's float32 statistic and root: float32's bound 1e-4 of
``test_asgo_faithful``).
"""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.testing import loops
from test_loop_oracles import FD_KAPPA, RTOL, run_both, tiny_tree


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_agd_small_b1(mode):
    """AGD with β₁ < 1/2 (spec agd.md §2.3 step 4): the principled rule forms the stepwise difference
    s_t = (1−β₁)/(1−β₁^t)·(g_t − m_{t−1}/(1−β₁^{t−1})) (deviation D2's first form), a branch the
    β₁ = 0.9 cases never take; it must equal m̂_t − m̂_{t−1} of the oracle at every step t > 1."""
    config = dict(learning_rate=0.01, b1=0.3, b2=0.9, delta=0.05, mode=mode)
    run_both(pr.agd, loops.LoopAGD, config)


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_rf_adamw_initial_scale_and_unscaled(mode):
    """RF-AdamW's s₀ = ``initial_scale`` and ``scale_by_batch_size=False`` (B = 1; spec root_free.md
    §2.7, the authors' ``dummy_init``/``dummy_scaling`` ablations): s₀ enters every later s through the
    EMA, so a library that ignored it would differ from the oracle from the first step."""
    config = dict(learning_rate=0.01, b1=0.8, b2=0.9, damping=1e-3, batch_size=3, initial_scale=0.25,
                  scale_by_batch_size=False, bias_correction=True, mode=mode)
    lib = dict(config, state_dtype=np.float64) if mode == "faithful" else config
    run_both(lambda **_: pr.rf_adamw(**lib), loops.LoopRFAdamW, config)


def test_if_shampoo_unclamped_factor_step():
    """IF-Shampoo with ``clamp_factor_step=False`` (the first-order rule K_n ← K_n − β₂ K_n m_n, no
    1/max(1, ‖m_n‖_F); spec root_free.md §2.3): with B = 4 and unit-scale gradients ‖m_n‖_F exceeds 1,
    so the clamped and unclamped steps differ. β₂ = 0.05 keeps the unclamped iteration stable."""
    config = dict(learning_rate=0.05, momentum=0.9, preconditioner_lr=0.05, preconditioner_momentum=0.5,
                  damping=1e-2, batch_size=4, clamp_factor_step=False, block_size=2)
    run_both(pr.if_shampoo, loops.LoopIFShampoo, config)


@pytest.mark.parametrize("mode, options", [
    ("principled", {"graft_b2": 0.9, "graft_eps": 1e-2, "tail_decay": "sqrt_b2", "b2": 0.9}),
    ("principled", {"max_precondition_dim": 5, "merge_dims": 4, "weight_decay": 0.1}),
    ("faithful", {"tail_decay": "b2", "b2": 0.9, "graft_eps": 1e-2}),
])
def test_sketchy_rare_options(mode, options):
    """Sketchy's rarely set options against the oracle (spec fd_shampoo.md §2.2-2.4): the graft's own
    β_g and ε_g (D_g = G/√(v + ε_g), ε_g large enough to matter), the escaped mass's decay γ named
    explicitly against the mode's default (γ = √β₂ principled on request, γ = β₂ faithful on request),
    and ``max_precondition_dim`` = 5 (the 10×3 leaf is graft-only; the 5×3 weight, a side exactly at
    the limit, and the 3×2×2×2 conv weight, merged to 3×4×2, are preconditioned)."""
    config = dict(dict(learning_rate=0.01, rank=3, b2=0.99, eps=1e-4, momentum=0.9, merge_dims=2, mode=mode), **options)
    run_both(lambda **c: pr.sketchy(decomposition="svd", **c), loops.LoopSketchy, config, rtol=RTOL * FD_KAPPA)


@pytest.mark.parametrize("root_method, root_steps", [("newton_schulz", 3), ("polar_express", 2)])
def test_asgo_faithful_unconverged_root(root_method, root_steps):
    """Faithful ASGO's iterative root with few steps (spec asgo.md §2.3, §2.6: the authors run exactly
    ``root_steps`` iterations of the fixed (a, b, c) triples, no convergence check). With 20 steps the
    Newton–Schulz iterate has converged and one step more or less changes it by less than float32's
    bound of ``test_asgo_faithful`` (on these well-conditioned 3×3 statistics from about 5 steps); with
    3 (Polar-Express: 2) a step still moves it by about 1e-3 relative, so the root the library takes
    after exactly ``root_steps`` iterations is compared with the oracle's at that count.
    Tolerance: float32's bound of ``test_asgo_faithful`` (1e-4), on the smaller side of each matrix."""
    config = dict(learning_rate=0.01, b1=0.9, b2=0.8, weight_decay=0.1, mode="faithful", rms_target=None,
                  root_method=root_method, root_steps=root_steps)
    params = tiny_tree()
    params["conv"]["weight"] = params["conv"]["weight"].reshape(3, 8)
    run_both(pr.asgo, loops.LoopASGO, config, rtol=1e-4, params=params, steps=6)


def test_sketchy_faithful_complement_weight_before_escaped_mass():
    """Faithful Sketchy's complement weight while the escaped mass is still zero (spec fd_shampoo.md
    §2.2, the authors' FD step: a sketch whose stacked factor has more than k columns gives the
    complement the weight (ρ' + ε)^a even when ρ' = 0, rounding noise counting as mass). Rank 3 on the
    5×3 weight: the first sketch holds its three columns exactly, c = s_k = 0 and ρ' = 0; with
    ``precondition_every=2`` the next gradient is preconditioned by that sketch and has a part outside
    its span, on which the faithful step is (ε')^a times the part, not zero. Every step refreshing
    (the cases of ``test_loop_oracles.py``) leaves no such part: each gradient lies in its own sketch's
    span."""
    config = dict(learning_rate=0.01, rank=3, b2=0.99, eps=1e-4, momentum=0.9, merge_dims=2, mode="faithful",
                  precondition_every=2)
    run_both(lambda **c: pr.sketchy(decomposition="svd", **c), loops.LoopSketchy, config, rtol=RTOL * FD_KAPPA)
