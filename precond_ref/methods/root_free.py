r"""Root-free methods: RF-RMSProp and IF-Shampoo (Lin et al., ICML 2024), RF-AdamW as an extra.

Both methods precondition with an estimate of the *inverse* of the damped, batch-size-scaled
second moment of the gradient instead of its inverse square root, and IF-Shampoo tracks its
Kronecker factors by a multiplicative (Riemannian) update that needs only matrix products: no
eigendecomposition, inverse, solve or Cholesky factorisation anywhere in its path, which is why its
factors can live in bfloat16.

Both methods need the batch size :math:`B`, the number of examples the loss *averages* over:
:math:`B\,g g^\top` estimates the per-example second moment. Summing the loss instead of
averaging it makes that estimate wrong by a factor :math:`B^2`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Union

from .._backend import array_device, cast, is_number, is_zero, scalar_zero
from ..linalg import (
    along, frobenius, gram, half_precision_dtype, is_diagonal, kl_clip_of_quadratic, mean_trace, mode_product,
    product_except, times, times_transposed, unfolding_gram,
)
from ..engine.elementwise import ElementwiseRule, elementwise_transform
from ..engine.factors import identity, number, per_block
from ..engine import options
from ..engine.phases import prototype_schedule
from ..engine.tiles import TiledRule, TileLayout, old_layout_hint, tiled_transform
from ..transform import (
    ScalarOrSchedule, Transform, check_bool, check_choice, check_interval, check_learning_rate, check_mode,
    check_nonnegative, check_optional, check_positive_int, check_principled_only, check_unit_interval, mode_default,
)
from ..tree import Path

__all__ = ["rf_rmsprop", "rf_adamw", "if_shampoo", "prototype_lr_scale", "prototype_schedule"]

_KL_CLIP = 0.1  # principled default of if_shampoo's kl_clip (S8)
_BLOCK_SIZE = 64  # principled default of if_shampoo's block_size (S9; docs/methods/root_free.md)
_PRECONDITION_EVERY = 2  # principled default of if_shampoo's precondition_every (S7)
#: if_shampoo's default learning rate per mode: SIRFShampoo's 1e-3 (faithful); principled, the rate
#: that trains the small problems of docs/defaults.md (the torch class reads it too).
IF_SHAMPOO_LEARNING_RATE = {"faithful": 1e-3, "principled": 0.1}


# --------------------------------------------------------------------------------------------
# RF-RMSProp and RF-AdamW


def _check_rf_common(damping, weight_decay, batch_size, initial_scale, scale_by_batch_size, mode):
    faithful = check_mode(mode)
    check_interval("damping", damping, 0.0, math.inf, low_closed=faithful)  # λ > 0; faithful λ ≥ 0 (R2)
    check_nonnegative("weight_decay", weight_decay)
    options.check_batch_size(batch_size)
    check_nonnegative("initial_scale", initial_scale)
    check_bool("scale_by_batch_size", scale_by_batch_size)


def _divided(xp, numerator, denominator, faithful: bool):
    """``numerator ⊘ denominator``; faithful mode (λ ≥ 0) maps an exactly zero denominator to a
    zero step (R2)."""
    if not faithful:
        return numerator / denominator
    zero = denominator == 0.0
    safe = xp.where(zero, xp.ones_like(denominator), denominator)
    return xp.where(zero, scalar_zero(xp, numerator), numerator / safe)


class _RFStep(NamedTuple):
    """A step's scalars of RF-RMSProp and RF-AdamW: the learning rate ``lr`` (η_t), the batch size
    ``B`` (1 without ``scale_by_batch_size``), the bias corrections ``c1``, ``c2`` (1 without),
    ``lr_c1`` (η_t/c₁) and the decoupled weight decay's factor ``lr_wd`` (η_t κ; RF-AdamW)."""

    lr: Any
    B: Any
    c1: Any = 1
    c2: Any = 1
    lr_c1: Any = None
    lr_wd: Any = None


def _rf_step(name: str, xp, c, t) -> _RFStep:
    """η_t and B of this step (B from ``update(..., batch_size=)`` or the factory)."""
    B = options.batch_size(name, c.batch_size, t.extra) if c.scale_by_batch_size else 1
    return _RFStep(lr=t.value(c.learning_rate), B=B)


# RF-RMSProp (Lin et al. 2024, Figure 1), per entry:
#   s ← b₂ s + (1−b₂) B g⊙g                    (s₀ = 1)
#   Δ = g ⊘ (s + λ) + κ θ
#   v ← α₁ v + Δ;   θ ← θ − η v                 (α₁ = 0: θ ← θ − η Δ, no buffer)


class RFRMSPropConfig(NamedTuple):
    """RF-RMSProp's hyperparameters (:func:`rf_rmsprop`), validated there."""

    learning_rate: Any
    b2: Any
    damping: Any
    momentum: Any
    weight_decay: Any
    batch_size: Any
    initial_scale: Any
    scale_by_batch_size: bool
    faithful: bool
    use_momentum: bool
    use_decay: bool


class RFRMSPropState(NamedTuple):
    """A leaf's state: ``s`` (the second moment) and ``momentum`` (v; ``None`` when α₁ = 0)."""

    s: Any
    momentum: Any = None


def _rf_rmsprop_init(xp, c: RFRMSPropConfig, w, dtype) -> RFRMSPropState:
    dev = array_device(w)
    s = options.filled(xp, w.shape, c.initial_scale, dtype, dev)  # s₀ = 1
    return RFRMSPropState(s, xp.zeros(w.shape, dtype=dtype, device=dev) if c.use_momentum else None)


def _rf_rmsprop_direction(xp, c: RFRMSPropConfig, s, g, w):
    """Δ = g ⊘ (s + λ) + κ θ."""
    delta = _divided(xp, g, s + c.damping, c.faithful)
    return delta + c.weight_decay * w if c.use_decay else delta


def _rf_rmsprop_state(xp, c: RFRMSPropConfig, state: RFRMSPropState, g, w, h: _RFStep) -> RFRMSPropState:
    s = c.b2 * state.s + (1 - c.b2) * (h.B * (g * g))  # s ← b₂ s + (1−b₂) B g⊙g
    if not c.use_momentum:
        return RFRMSPropState(s)
    return RFRMSPropState(s, c.momentum * state.momentum + _rf_rmsprop_direction(xp, c, s, g, w))  # v ← α₁ v + Δ


def _rf_rmsprop_update(xp, c: RFRMSPropConfig, state: RFRMSPropState, g, w, h: _RFStep):
    v = state.momentum if c.use_momentum else _rf_rmsprop_direction(xp, c, state.s, g, w)
    return -h.lr * v  # θ ← θ − η v


RF_RMSPROP = ElementwiseRule(
    "rf_rmsprop", RFRMSPropState, _rf_rmsprop_init, partial(_rf_step, "rf_rmsprop"), _rf_rmsprop_state,
    _rf_rmsprop_update,
)


# RF-AdamW (the authors' myoptim/rfadamw.py), per entry:
#   θ ← θ (1 − η κ)                               (decoupled, applied first)
#   m ← b₁ m + (1−b₁) g;   s ← b₂ s + (1−b₂) B g⊙g   (s₀ = 1)
#   θ ← θ − η/c₁ · m ⊘ (s/c₂ + λ),   c_i = 1 − b_i^t with bias correction, else 1


class RFAdamWConfig(NamedTuple):
    """RF-AdamW's hyperparameters (:func:`rf_adamw`), validated there."""

    learning_rate: Any
    b1: Any
    b2: Any
    damping: Any
    weight_decay: Any
    bias_correction: bool
    batch_size: Any
    initial_scale: Any
    scale_by_batch_size: bool
    faithful: bool
    use_decay: bool


class RFAdamWState(NamedTuple):
    """A leaf's state: the moments ``m`` and ``s``."""

    m: Any
    s: Any


def _rf_adamw_init(xp, c: RFAdamWConfig, w, dtype) -> RFAdamWState:
    dev = array_device(w)
    return RFAdamWState(xp.zeros(w.shape, dtype=dtype, device=dev), options.filled(xp, w.shape, c.initial_scale, dtype, dev))


def _rf_adamw_step(xp, c: RFAdamWConfig, t) -> _RFStep:
    """η_t, B, η_t κ; with bias correction c_i = 1 − b_i^t (t = count + 1) and η_t/c₁ (η_t as the
    configuration's operands are, ``t.operand``: rounded to the step's dtype as a number would be)."""
    h = _rf_step("rf_adamw", xp, c, t)
    lr_wd = h.lr * c.weight_decay if c.use_decay else None
    if not c.bias_correction:
        return h._replace(lr_c1=h.lr / 1, lr_wd=lr_wd)
    step = t.step
    c1 = 1 - c.b1**step
    return h._replace(c1=c1, c2=1 - c.b2**step, lr_c1=t.operand(c.learning_rate) / c1, lr_wd=lr_wd)


def _rf_adamw_state(xp, c: RFAdamWConfig, state: RFAdamWState, g, w, h: _RFStep) -> RFAdamWState:
    m = c.b1 * state.m + (1 - c.b1) * g  # m ← b₁ m + (1−b₁) g
    s = c.b2 * state.s + (1 - c.b2) * (h.B * (g * g))  # s ← b₂ s + (1−b₂) B g⊙g
    return RFAdamWState(m, s)


def _rf_adamw_update(xp, c: RFAdamWConfig, state: RFAdamWState, g, w, h: _RFStep):
    step = h.lr_c1 * _divided(xp, state.m, state.s / h.c2 + c.damping, c.faithful)  # η/c₁ · m ⊘ (s/c₂ + λ)
    if c.use_decay:
        step = step + h.lr_wd * w  # + η κ θ
    return -step


RF_ADAMW = ElementwiseRule(
    "rf_adamw", RFAdamWState, _rf_adamw_init, _rf_adamw_step, _rf_adamw_state, _rf_adamw_update, computed=("c2", "lr_c1"),
)


def rf_rmsprop(
    learning_rate: ScalarOrSchedule = 0.316,
    b2: float = 0.999,
    damping: float = 1e-4,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: Optional[int] = None,
    initial_scale: float = 1.0,
    scale_by_batch_size: bool = True,
    state_dtype: Any = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
) -> Transform:
    r"""RF-RMSProp: RMSProp without the square root, with a batch-size-scaled second moment.

    With gradient :math:`g` of a mean-over-:math:`B`-examples loss, EMA decay
    :math:`b_2 = 1-\beta_2`, damping :math:`\lambda`, weight decay :math:`\kappa` and heavy-ball
    momentum :math:`\alpha_1`:

    .. math::

        s &\leftarrow b_2\, s + (1-b_2)\, B\, g\odot g, \qquad s_0 = 1, \\
        \Delta &= g \oslash (s + \lambda) + \kappa\,\theta, \qquad
        v \leftarrow \alpha_1 v + \Delta, \qquad
        \theta \leftarrow \theta - \eta_t\, v .

    There is no bias correction: :math:`s_0 = 1` makes the first steps SGD-like
    (:math:`\Delta \approx g/(1+\lambda)`), so the learning rate is on SGD's scale, not Adam's.

    Parameters
    ----------
    learning_rate:
        :math:`\eta_t` (the paper's :math:`\beta_1`), a positive number or a schedule. Default 0.316,
        on SGD's scale (the statistic starts at 1): the rate of the sweep in ``docs/defaults.md``, near
        the best on three small problems and a half-decade below a rate that diverges on one. The
        authors' best CIFAR-100 CNN values (5e-3 to 1e-1) come with heavy-ball momentum 0.6 to 0.96,
        which multiplies the step by up to 25.
    b2:
        EMA decay of the second moment, :math:`1-\beta_2` in the paper (torch's ``alpha``).
    damping:
        :math:`\lambda`, added outside the EMA; > 0 (principled) or ≥ 0 (faithful).
    momentum:
        :math:`\alpha_1` in [0, 1), heavy ball on the preconditioned direction, no dampening.
    weight_decay:
        :math:`\kappa \ge 0`, added to the preconditioned direction (not preconditioned).
    batch_size:
        :math:`B`, the number of examples the loss **averages** over (a summed loss makes
        :math:`B g^2` wrong by :math:`B^2`); ``update(..., batch_size=)`` overrides it per call.
        Under gradient accumulation, the total number of examples in the accumulated mean; for
        token-averaged losses, the number of averaged terms.
    initial_scale:
        :math:`s_0` (0 is the authors' ``dummy_init`` ablation).
    scale_by_batch_size:
        ``False`` uses :math:`B = 1` (the authors' ``dummy_scaling`` ablation; no B needed).
    state_dtype:
        dtype of :math:`s` and :math:`v`: a dtype of the parameters' namespace, or its name
        (``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"``; resolved in that namespace at
        ``init``, an error there if it has none). Default: float32
        for bf16/fp16 parameters, else the parameter dtype (principled); float32 (faithful).
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``; see :func:`precond_ref.engine.build_transform`.

    Returns
    -------
    Transform
        ``update(grads, state, params=None, *, batch_size=None)``; ``params`` are needed when
        ``weight_decay > 0``.

    Notes
    -----
    ``mode="faithful"`` follows ``myoptim/rfrmsprop.py`` (class ``MyRmsProp``) of
    yorkerlin/remove-the-square-root at ``e26d7c9``. Deviations of the default mode (spec
    ``root_free.md`` §2.2):

    * R1: state in float32 for bf16/fp16 parameters and float64 for float64 parameters (the
      authors keep it in ``cast_dtype``, float32 by default, whatever the parameters).
    * R2: :math:`\lambda > 0` is required. Faithful mode accepts :math:`\lambda = 0` and maps an
      exactly zero denominator to a zero step (the authors' code produces Inf/NaN there).
    * R3: the caller's gradient is never overwritten (the authors' code writes :math:`\Delta`
      into it when the state dtype equals the gradient dtype).

    The step is not invariant to the loss scale: multiplying the loss by :math:`c` divides the
    step by :math:`c` once the statistic has adapted. Unscale gradients before ``update``.

    References
    ----------
    Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani. "Can We Remove the Square-Root in Adaptive
    Gradient Methods? A Second-Order Perspective". ICML 2024, arXiv:2402.03496 (RF-RMSProp,
    Figure 1 / Algorithm 1).
    """
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("b2", b2)
    check_unit_interval("momentum", momentum)
    _check_rf_common(damping, weight_decay, batch_size, initial_scale, scale_by_batch_size, mode)
    options.check_dtype("state_dtype", state_dtype)
    config = RFRMSPropConfig(
        learning_rate, b2, damping, momentum, weight_decay, batch_size, initial_scale, scale_by_batch_size,
        faithful=mode == "faithful", use_momentum=not is_zero(momentum), use_decay=not is_zero(weight_decay),
    )
    dtype = partial(options.state_dtype, requested=state_dtype, default=options.float32 if config.faithful else None)  # R1
    return elementwise_transform(RF_RMSPROP, config, state_dtype=dtype, reads_params=config.use_decay, on_nonfinite=on_nonfinite)


def rf_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    damping: float = 1e-4,
    weight_decay: float = 0.0,
    bias_correction: bool = False,
    batch_size: Optional[int] = None,
    initial_scale: float = 1.0,
    scale_by_batch_size: bool = True,
    state_dtype: Any = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
) -> Transform:
    r"""RF-AdamW — **an extra, not in the paper**: AdamW with a root-free, batch-scaled denominator.

    Added to the authors' experiment repository after publication (``myoptim/rfadamw.py``,
    commit ``c8d43f2``) and used in none of the paper's figures. With :math:`s = B v`:

    .. math::

        \theta &\leftarrow \theta (1 - \eta\kappa), \qquad
        m \leftarrow b_1 m + (1-b_1) g, \qquad
        s \leftarrow b_2 s + (1-b_2) B\, g\odot g, \qquad s_0 = 1, \\
        \theta &\leftarrow \theta - \frac{\eta}{c_1}\, m \oslash (s / c_2 + \lambda),

    with :math:`c_i = 1 - b_i^t` if ``bias_correction`` else 1.

    Parameters
    ----------
    learning_rate, b1, b2, damping, weight_decay, bias_correction:
        :math:`\eta`, the EMA decays, :math:`\lambda`, decoupled :math:`\kappa` (applied first),
        and the authors' bias-correction switch (off by default, as in their code). The learning
        rate is on SGD's scale, not Adam's: the statistic starts at 1 and :math:`m` is an
        uncorrected EMA, so the first steps are SGD's at :math:`\eta(1-b_1)`. Default 1: the rate
        of the sweep in ``docs/defaults.md``, near the best on three small problems and a
        half-decade below a rate that diverges on one (the method is not in the paper).
    batch_size, initial_scale, scale_by_batch_size, state_dtype, mode, on_nonfinite:
        As in :func:`rf_rmsprop` (the authors' :math:`v_0 = 1/B` is :math:`s_0 = 1`).

    Returns
    -------
    Transform
        As :func:`rf_rmsprop`.

    Notes
    -----
    Principled deviations R1–R3 as for :func:`rf_rmsprop`. With ``b1=0``, ``weight_decay=0`` and
    no bias correction it equals :func:`rf_rmsprop` with momentum 0 (spec I-P12).

    References
    ----------
    yorkerlin/remove-the-square-root ``myoptim/rfadamw.py`` (class ``MyAdamW``).
    """
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_bool("bias_correction", bias_correction)
    _check_rf_common(damping, weight_decay, batch_size, initial_scale, scale_by_batch_size, mode)
    options.check_dtype("state_dtype", state_dtype)
    config = RFAdamWConfig(
        learning_rate, b1, b2, damping, weight_decay, bias_correction, batch_size, initial_scale,
        scale_by_batch_size, faithful=mode == "faithful", use_decay=not is_zero(weight_decay),
    )
    dtype = partial(options.state_dtype, requested=state_dtype, default=options.float32 if config.faithful else None)  # R1
    return elementwise_transform(RF_ADAMW, config, state_dtype=dtype, reads_params=config.use_decay, on_nonfinite=on_nonfinite)


# --------------------------------------------------------------------------------------------
# IF-Shampoo's rule, written for b tiles of one shape at once (a leading tile axis b): grouped
# tensors (b, d_1, ..., d_N), dense factors (b, d, d), diagonal factors (b, d); the products for
# both factor structures are precond_ref.linalg's. The layout (precond_ref.engine.tiles.TileLayout)
# says how a group is cut into tiles and when each tile refreshes (S9, S10); a refresh that is not
# usable keeps the old factors (S2, S3).
#
# IF-Shampoo, Lin et al. (ICML 2024) Figure 3 / spec §2.3, for a group G with factors K_n, P_n = K_nK_nᵀ
# (principled: for each tile of G, S9, with its own factors; tile t refreshes at its offset, S10):
#   if T(count):                                  every T steps, all axes from the old factors (_refresh)
#       Y   = √B·G ×_1 K_1ᵀ … ×_N K_Nᵀ;  t_i = Tr(K_iᵀK_i)/d_i
#       M_n = ½[λ Π_{i≠n} t_i K_nᵀK_n + Y_(n)Y_(n)ᵀ/Π_{i≠n} d_i − I]     (diagonal K_n: its diagonal)
#       m_n ← α₂ m_n + (1−α₂) M_n;  K_n ← K_n − β₂/max(1, ‖m_n‖_F)·K_n m_n   (S2, S3: kept if unusable)
#   D = G ×_1 P_1 … ×_N P_N  (_precondition);  D ← ν D, ν = min(1, √(κ_clip/(η²⟨D, G⟩)))  (S8, _kl_clip)
#   U = D + κW;  v ← α₁ v + U;  W ← W − η v   (_descend)


class IFShampooConfig(NamedTuple):
    """IF-Shampoo's hyperparameters (:func:`if_shampoo`), validated there."""

    learning_rate: Any
    momentum: Any
    preconditioner_lr: Any
    preconditioner_momentum: Any
    damping: Any
    weight_decay: Any
    batch_size: Any
    kl_clip: Any
    clamp_factor_step: bool
    faithful: bool
    use_momentum: bool
    use_factor_momentum: bool
    use_decay: bool
    use_kl_clip: bool


class _StackFactors(NamedTuple):
    """The state of one stack of tiles (:class:`~precond_ref.engine.tiles.TileStack`): its tiles'
    Kronecker factors and their Riemannian momenta, one array per axis with a leading tile axis (k
    tiles)."""

    factor: tuple  # K_1..K_N: (k, d_n, d_n), or (k, d_n) for a diagonal axis
    factor_momentum: tuple  # m_1..m_N of K_n's shape; () when α₂ = 0


class _IFShampooState(NamedTuple):
    """A group's state as named fields. Stored as the flat entries of their paths
    (:func:`precond_ref.tree.to_entries`: ``stacks/s/factor/n``, ``stacks/s/factor_momentum/n``,
    ``momentum/i``, ``preconditioner_lr_scale``, ``failures``). ``failures`` (0-D int32): how many of
    this entry's preconditioner updates were discarded because their result was not usable (not
    finite); the previous preconditioner was kept (S3: one count per tile whose factor step was
    discarded)."""

    stacks: tuple  # a _StackFactors per stack of the group's TilePlan (one stack of one tile when unblocked)
    momentum: tuple  # v of each member (weight[, bias]); () when α₁ = 0
    preconditioner_lr_scale: Any  # the group's β₂ multiplier (0-D); None without preconditioner_lr_scale
    failures: Any  # 0-D int32; None in faithful mode


class _IFShampooStep(NamedTuple):
    """A step's scalars: the batch size ``B``, the factor step size ``beta2`` (β₂), ``eta`` (η) and
    ``minus_eta`` (−η, the factor of the step)."""

    B: Any
    beta2: Any
    eta: Any
    minus_eta: Any


def _if_shampoo_step(c: IFShampooConfig, value, extra) -> _IFShampooStep:
    B = options.batch_size("if_shampoo", c.batch_size, extra)  # from update(..., batch_size=) or the factory
    eta = value(c.learning_rate)
    return _IFShampooStep(B, value(c.preconditioner_lr), eta, -eta)


def _init_factors(xp, c: IFShampooConfig, k: int, dims, diagonal, dtypes, dev) -> _StackFactors:
    """K_n = I for each of the ``k`` tiles of a stack (diagonal: a vector of ones), m_n = 0."""
    factors = tuple(xp.ones((k, d), dtype=dtype, device=dev) if diag
                    else xp.zeros((k, d, d), dtype=dtype, device=dev) + xp.eye(d, dtype=dtype, device=dev)
                    for d, diag, dtype in zip(dims, diagonal, dtypes))
    momenta = tuple(xp.zeros(K.shape, dtype=K.dtype, device=dev) for K in factors) if c.use_factor_momentum else ()
    return _StackFactors(factor=factors, factor_momentum=momenta)


def _factor_step(xp, grouped, factors, momenta, sqrt_batch, damping, factor_lr, factor_momentum, clamp):
    """One simultaneous inverse-free update of all Kronecker factors of a stack of groups (spec §2.3).

    ``M_n = ½[λ (Π_{i≠n} t_i) K_nᵀK_n + Y_(n)Y_(n)ᵀ/Π_{i≠n} d_i − I]`` with ``Y = √B·G ×_i K_iᵀ`` and
    ``t_i = Tr(K_iᵀK_i)/d_i``, all from the old factors; ``m_n ← α₂ m_n + (1−α₂) M_n``;
    ``K_n ← K_n − β₂/max(1, ‖m_n‖_F) · K_n m_n``. As in SIRFShampoo, the products and traces use
    ``K_n/√d_n`` (neutral in exact arithmetic, keeps low precision in range: ``λ/2·Π t_i·numel`` and
    ``d_n/2`` below undo it). ``factor_lr`` is a scalar or one value per group (b,). ``momenta``:
    None when α₂ = 0.
    """
    dims = tuple(grouped.shape[1:])
    scaled = [K * (1.0 / math.sqrt(d)) for K, d in zip(factors, dims)]  # K_n/√d_n
    Y = grouped * sqrt_batch
    for n, K in enumerate(scaled):
        Y = times_transposed(xp, cast(xp, Y, K.dtype), K, n + 1)  # Y = √B·G ×_1 K_1ᵀ … ×_N K_Nᵀ
    KtK = [gram(xp, K) for K in scaled]
    t = [mean_trace(xp, A) for A in KtK]  # t_i = Tr(K_iᵀK_i)/d_i
    new_factors, new_momenta = [], []
    for n, K in enumerate(factors):
        Y = cast(xp, Y, K.dtype)
        M = (KtK[n] * per_block(xp, (damping / 2) * product_except(xp, t, n, K.dtype) * math.prod(dims), K)
             + unfolding_gram(xp, Y, n + 1, K) * (dims[n] / 2) - identity(xp, K, 0.5))
        if momenta is not None:
            M = factor_momentum * momenta[n] + (1 - factor_momentum) * M  # m_n ← α₂ m_n + (1−α₂) M_n
            new_momenta.append(M)
        norm = frobenius(xp, M)
        step_size = factor_lr / xp.maximum(norm, number(xp, 1.0, norm)) if clamp else factor_lr
        new_factors.append(K - times(xp, K, M) * per_block(xp, step_size, K))  # K_n ← K_n − β₂/max(1,‖m_n‖)·K_n m_n
    return tuple(new_factors), (tuple(new_momenta) if momenta is not None else None)


def _refresh(xp, c: IFShampooConfig, h: _IFShampooStep, G, s: _StackFactors) -> _StackFactors:
    """Figure 3's factor step on one stack of tiles (:func:`_factor_step`), step size ``h.beta2``: β₂,
    times each tile's group's ``preconditioner_lr_scale`` where there is one (one per tile)."""
    sqrt_B = math.sqrt(h.B) if is_number(h.B) else xp.sqrt(h.B)
    K, m = _factor_step(
        xp, G, s.factor, s.factor_momentum if c.use_factor_momentum else None, sqrt_B, c.damping, h.beta2,
        c.preconditioner_momentum, c.clamp_factor_step,
    )
    return _StackFactors(factor=K, factor_momentum=m or ())


def _precondition(xp, c: IFShampooConfig, grouped, factors):
    """``D = G ×_1 P_1 … ×_N P_N`` with ``P_n = K_n K_nᵀ`` for a stack of tiles. In faithful mode and
    for half-precision factors each factor is divided by ``σ_n = max(1, √max|K_n|)`` first and
    ``Π σ_n²`` multiplied back (SIRFShampoo's range device, neutral in exact arithmetic; needed by
    fp16 factors)."""
    rescale = c.faithful or any(xp.finfo(K.dtype).bits < 32 for K in factors)
    ndim = len(grouped.shape)
    scale_product = None
    for n, factor in enumerate(factors):
        if rescale:
            largest = xp.max(xp.abs(factor), axis=tuple(range(1, factor.ndim)))
            sigma = xp.maximum(xp.sqrt(largest), xp.ones_like(largest))
            factor = factor / per_block(xp, sigma, factor)
            scale_product = sigma * sigma if scale_product is None else scale_product * (sigma * sigma)
        grouped = cast(xp, grouped, factor.dtype)
        if is_diagonal(factor):
            grouped = grouped * along(xp, factor * factor, n + 1, ndim)
        else:
            grouped = mode_product(mode_product(grouped, factor, n + 1, transpose=True), factor, n + 1)
    if scale_product is not None:
        grouped = grouped * per_block(xp, xp.astype(scale_product, grouped.dtype), grouped)
    return grouped


def _tile_inner(xp, D, G):
    """``⟨D_b, G_b⟩`` for every tile b (G in D's dtype)."""
    return xp.sum(D * G, axis=tuple(range(1, len(D.shape))))


def _kl_clip(xp, c: IFShampooConfig, h: _IFShampooStep, inner):
    """S8's ``ν = min(1, √(κ/(η²⟨D, G⟩)))`` of every group from its ``⟨D, G⟩`` (a vector of groups;
    :func:`precond_ref.linalg.kl_clip_factor`'s formula)."""
    return kl_clip_of_quadratic(xp, inner, h.eta, c.kl_clip)


def _descend(xp, c: IFShampooConfig, operand, D, W, v, zero) -> tuple:
    """The last lines, element-wise; ``W`` (in D's dtype) is ``None`` without weight decay, ``v``
    without momentum."""
    U = D
    if W is not None:
        U = U + operand("weight_decay", U) * W  # U = D + κW
    if v is not None:
        U = operand("momentum", v) * v + cast(xp, U, v.dtype)  # v ← α₁ v + U
    else:
        U = cast(xp, U, zero.dtype)  # the leaf's work dtype
    return operand("minus_eta", U) * U, U  # W ← W − η v


def _nearest_diagonal(xp, K):
    """The diagonal factor nearest to each dense ``K`` of a stack in the entries it scales: the square
    root of the diagonal of ``P = K Kᵀ`` (S12: a vector's factor taken diagonal)."""
    return xp.sqrt(xp.sum(K * K, axis=2))  # √diag(K Kᵀ)


IF_SHAMPOO = TiledRule(
    "if_shampoo", _IFShampooState, _StackFactors, _if_shampoo_step, _init_factors, _refresh, _precondition,
    _tile_inner, _kl_clip, _descend, _nearest_diagonal,
)


# --------------------------------------------------------------------------------------------
# IF-Shampoo's factory and the prototype's options


_STRUCTURES = ("dense", "diagonal")
_FACTOR_ROUNDINGS = ("nearest", "stochastic")


def _check_tiling(layout: TileLayout, structures, max_dense_dim, factor_dtype) -> None:
    """:func:`if_shampoo`'s errors for its tiling options: the interval a positive
    integer or a predicate, ``stagger`` a bool; ``structures`` names a structure per axis, keyed by
    tensor rank; ``factor_dtype`` is a dtype (an array is a dtype that ``optax.inject_hyperparams``
    took for a schedule); ``block_size`` and ``max_dense_dim`` positive integers; ``group_scale`` a
    callable."""
    if not hasattr(layout.interval, "shape"):
        check_positive_int("precondition_every", layout.interval, allow_callable=True)
    if layout.block_size is not None:
        check_positive_int("block_size", layout.block_size)
    check_bool("spread_refresh", layout.stagger)
    if isinstance(structures, dict) and not all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in structures
    ):
        raise ValueError(f"structures: dict keys must be tensor ranks >= 1, got {sorted(structures, key=str)}")
    named = [structures] if structures is not None else []  # None: the default by rank, known names
    for value in structures.values() if isinstance(structures, dict) else named:
        for name in value if isinstance(value, (tuple, list)) else (value,):
            if name not in _STRUCTURES:
                raise ValueError(f"structures must name one of {_STRUCTURES} per axis, got {name!r}")
    for value in factor_dtype.values() if isinstance(factor_dtype, dict) else (factor_dtype,):
        for dtype in value if isinstance(value, (tuple, list)) else (value,):  # one per axis, or one for all
            options.check_dtype("factor_dtype", dtype)
    if max_dense_dim is not None and not hasattr(max_dense_dim, "shape"):
        check_positive_int("max_dense_dim", max_dense_dim)
    check_choice("factor_rounding", layout.factor_rounding, _FACTOR_ROUNDINGS)
    if layout.group_scale is not None and not callable(layout.group_scale):
        raise ValueError(f"preconditioner_lr_scale must be None or a callable path -> float, got {layout.group_scale!r}")


def _per_axis(option: Any, rank: int, what: str, where: str) -> tuple:
    """SIRFShampoo's per-rank option format, one value per axis of the ``rank``-D tensor of
    ``where``: a single value, or ``{rank: value or tuple per axis}``."""
    if isinstance(option, dict):
        if rank not in option:
            raise ValueError(
                f"if_shampoo: {what} has no entry for the {rank}-D preconditioned tensor of {where!r} "
                f"(keys {sorted(option)})"
            )
        option = option[rank]
    if isinstance(option, (tuple, list)):
        if len(option) != rank:
            raise ValueError(
                f"if_shampoo: {what} for {where!r} lists {len(option)} entries, but its preconditioned "
                f"tensor has {rank} axes (one Kronecker factor each)"
            )
        return tuple(option)
    return (option,) * rank


def _diagonal_axes(structures, max_dense_dim, dims: tuple, where: str) -> tuple:
    """Which axes of a group's tensor have a diagonal factor: those ``structures`` names so (``None``:
    the axis of a vector, S12), and those longer than ``max_dense_dim`` (S4)."""
    if structures is None:
        # A vector's dense tiles would hold block_size times its entries, a diagonal factor one per entry.
        kinds = ("diagonal",) if len(dims) == 1 else ("dense",) * len(dims)
    else:
        kinds = _per_axis(structures, len(dims), "structures", where)
    limit = None if max_dense_dim is None else int(max_dense_dim)
    return tuple(kind == "diagonal" or (limit is not None and d > limit) for d, kind in zip(dims, kinds))


def _factor_dtypes(factor_dtype, faithful: bool, stochastic: bool, xp, leaf, rank: int, where: str) -> list:
    """The factors' dtype per axis (S1): ``factor_dtype``, else the parameters' (faithful), else for
    parameters of at most 32 bits bf16 where the factors are kept by stochastic rounding and the
    array library has bf16, else :func:`precond_ref.linalg.half_precision_dtype`'s choice; else the
    parameters' compute dtype."""
    dtypes = []
    for dtype in _per_axis(factor_dtype, rank, "factor_dtype", where):
        if dtype is None and faithful:
            dtype = leaf.dtype
        elif dtype is None and xp.finfo(leaf.dtype).bits <= 32:
            dtype = getattr(xp, "bfloat16", None) if stochastic else half_precision_dtype(leaf)
        dtypes.append(options.state_dtype(xp, leaf.dtype, dtype, name="factor_dtype"))
    return dtypes


def prototype_lr_scale(path: Path) -> float:
    """The prototype's factor-step scale: 0.25 for parameters named ``*norm*``, ``*proj*``, ``*bias*``.

    ``LocalOptimizer_GGT`` (yorkerlin/remove-the-square-root ``myoptim/ifshampoo.py``) applies it to
    the dotted parameter name; here it is matched on every key of the path.
    """
    name = ".".join(str(k) for k in path)
    return 0.25 if any(word in name for word in ("norm", "proj", "bias")) else 1.0


def if_shampoo(
    learning_rate: Optional[ScalarOrSchedule] = None,
    momentum: float = 0.9,
    preconditioner_lr: ScalarOrSchedule = 0.01,
    preconditioner_momentum: float = 0.5,
    damping: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: Optional[int] = None,
    precondition_every: Union[None, int, Callable[[Any], Any]] = None,
    structures: Union[None, str, dict] = None,
    max_dense_dim: Optional[int] = None,
    factor_dtype: Any = None,
    factor_rounding: Optional[str] = None,
    grouping: str = "per_parameter",
    preconditioner_lr_scale: Optional[Callable[[Path], float]] = None,
    clamp_factor_step: bool = True,
    kl_clip: Optional[float] = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
    block_size: Optional[int] = None,
    spread_refresh: Optional[bool] = None,
) -> Transform:
    r"""IF-Shampoo: inverse- and root-free Kronecker-factored preconditioning (matmul only).

    A group's gradient is arranged as a tensor :math:`G` of shape :math:`(d_1,\dots,d_N)` (size-1
    axes squeezed; with ``grouping="weight_bias"`` a bias is an extra column of its weight). Each
    axis has a factor :math:`K_n` (identity at start), :math:`P_n = K_n K_n^\top`. On refresh steps,
    from the old factors (all axes simultaneously), with :math:`Y = \sqrt{B}\,G \times_1 K_1^\top
    \cdots \times_N K_N^\top` and :math:`t_i = \operatorname{Tr}(K_i^\top K_i)/d_i`:

    .. math::

        M_n &= \tfrac12\Bigl[\lambda \bigl(\textstyle\prod_{i\ne n} t_i\bigr) K_n^\top K_n
              + \frac{Y_{(n)} Y_{(n)}^\top}{\prod_{i\ne n} d_i} - I\Bigr]
              \quad(\text{diagonal structure: its diagonal}), \\
        m_n &\leftarrow \alpha_2 m_n + (1-\alpha_2) M_n, \qquad
        K_n \leftarrow K_n - \frac{\beta_2}{\max(1, \lVert m_n\rVert_F)} K_n m_n .

    Every step, with the raw gradient: :math:`U = G \times_1 P_1 \cdots \times_N P_N + \kappa W`,
    :math:`v \leftarrow \alpha_1 v + U`, :math:`W \leftarrow W - \eta_t v`.

    At a fixed point :math:`P_n = S_n^{-1}` with :math:`S_n = [\lambda \prod_{i\ne n}\operatorname{Tr}P_i\,
    I + B\,\mathbb E\,G_{(n)}(\otimes_{i\ne n}P_i)G_{(n)}^\top]/\prod_{i\ne n} d_i`: for a vector,
    :math:`KK^\top \to (B\,\mathbb E\,gg^\top + \lambda I)^{-1}` (root-free full-matrix RMSProp); for a
    matrix the "flip-flop" Kronecker estimate of :math:`B\,\mathrm{vec}(G)\mathrm{vec}(G)^\top + \lambda I`.

    Parameters
    ----------
    learning_rate:
        :math:`\eta_t` (paper :math:`\beta_1`), positive or a schedule. ``None``: 0.1 in principled
        mode, the rate of the sweep in ``docs/defaults.md`` (near the best on three small problems,
        where 1e-3 makes a fifth of Adam's progress or less); 1e-3 in faithful mode (SIRFShampoo).
    momentum:
        :math:`\alpha_1` in [0, 1), heavy ball on the preconditioned step.
    preconditioner_lr:
        :math:`\beta_2 > 0` (or a schedule), the factor step size.
    preconditioner_momentum:
        :math:`\alpha_2` in [0, 1), Riemannian momentum on the factors (0: no buffer).
    damping:
        :math:`\lambda \ge 0`.
    weight_decay:
        :math:`\kappa \ge 0`, added to the preconditioned step (not preconditioned).
    batch_size:
        :math:`B`, the number of examples the loss **averages** over; a summed loss makes
        :math:`B\,gg^\top` wrong by :math:`B^2`. ``update(..., batch_size=)`` overrides it per call.
    precondition_every:
        :math:`T`: factors refresh when ``count % T == 0`` (so on the first update), or a predicate
        ``count -> bool`` such as :func:`prototype_schedule`. ``None``: 2 in principled mode (the
        authors' runs; docs/methods/root_free.md has the measurements), 1 in faithful mode (SIRFShampoo). Under ``optax.inject_hyperparams`` a
        callable must be listed in ``static_args``.
    structures:
        ``"dense"``, ``"diagonal"``, or SIRFShampoo's ``{rank: name or tuple of names per axis}``.
        ``None``: in principled mode (S12) a diagonal factor for a vector (a bias, a norm's scale),
        cut into ``block_size`` blocks as a dense axis is, and dense factors for every axis of a
        matrix or higher tensor; in faithful mode ``"dense"``. A state saved with a vector's dense
        tiles loads: each becomes the diagonal factor :math:`\sqrt{\operatorname{diag}(KK^\top)}`
        of the same tile, its factor momentum zero.
    max_dense_dim:
        Axes longer than this get a diagonal factor (S4; the paper's and SIRFShampoo's device for
        long axes). Default ``None``: no axis is diagonal for its length (principled mode cuts long
        axes into blocks instead, ``block_size``).
    factor_dtype:
        dtype of the factors and their momenta (a dtype of the parameters' namespace or its name, as
        ``state_dtype`` of :func:`rf_rmsprop`; or a dict like ``structures``). Default, principled: bf16 (the paper's half-precision mode) for
        parameters of at most 32 bits, on every device whose namespace has bf16 (torch, JAX; with
        ``factor_rounding="nearest"`` only where they live on an accelerator), else the compute
        dtype (NumPy: float32; float64 parameters keep float64); faithful: the parameter dtype. Under
        ``optax.inject_hyperparams`` list it in ``static_args`` (a dtype is callable).
    factor_rounding:
        How factors narrower than the compute dtype (bf16) are kept: ``"stochastic"`` (principled
        default, S1): the factor step and the preconditioning compute in the compute dtype
        (float32) and the refreshed
        factors and factor momenta are stored to bf16 by stochastic rounding
        (:func:`precond_ref.engine.rounding.round_stochastic`: the expected stored value is the
        computed one), so that a factor step smaller than bf16's spacing (about 1e-3 at the
        default :math:`\beta_2` against :math:`2^{-7}` near 1) is kept on average instead of lost;
        ``"nearest"`` (faithful default, SIRFShampoo's): they compute in the factors' dtype, each
        result rounded to nearest.
        The random bits are a hash of the step count and the element's place in its tile:
        reproducible, no state (every tile uses the same bits at a place in a step; each element's
        rounding is still unbiased over the steps). It applies to bf16 factors; another dtype narrower than the compute dtype
        (float16, float32 factors of float64 parameters) computes in its own dtype and rounds to
        nearest (stochastic rounding here truncates float32's bits, which only bf16 is).
    grouping:
        ``"per_parameter"`` or ``"weight_bias"`` (see :func:`precond_ref.engine.weight_bias_groups`).
    preconditioner_lr_scale:
        ``None`` or ``path -> float > 0`` multiplying :math:`\beta_2` per group (path of the group's
        first leaf); :func:`prototype_lr_scale` reproduces the authors' prototype.
    clamp_factor_step:
        The :math:`1/\max(1, \lVert m_n\rVert_F)` clamp (turn off only to study the first-order rule).
    kl_clip:
        :math:`\kappa`: the preconditioned gradient :math:`D = Pg` is scaled by :math:`\nu = \min(1,
        \sqrt{\kappa/(\eta^2\langle D, g\rangle)})` before the momentum (K-FAC's KL clipping, S8;
        :func:`precond_ref.linalg.kl_clip_factor`). ``None``: 0.1 in principled mode, off (0) in
        faithful mode; 0 turns it off.
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``.
    block_size:
        S9 (principled only): every dense axis longer than this is cut into contiguous blocks
        (:func:`precond_ref.blocking.block_bounds`), and each tile of the tensor is an independent
        IF-Shampoo block with its own factors (Distributed Shampoo's blocking: the block-diagonal
        part of the preconditioner); tiles of one shape, across parameters too, are stacked into
        one batched product. The KL clip and the momentum stay per parameter. ``None``: 64 in
        principled mode (one number for every device; docs/methods/root_free.md, "Long axes,
        intervals and cost", has the measurements); a value at least every axis is the unblocked
        method. An integer >= 1; refused in faithful mode.
    spread_refresh:
        S10: tile ``t`` of a blocked parameter refreshes on the calls where
        ``count % T == t % T`` (:class:`precond_ref.blocking.PhaseDue`), so its factor steps are spread
        over the interval ``T`` instead of all falling on one call. ``None``: on in principled mode
        (no effect on an unblocked parameter, or with a callable ``precondition_every``).

    Returns
    -------
    Transform
        ``update(grads, state, params=None, *, batch_size=None)``; ``params`` are needed when
        ``weight_decay > 0``.

    Notes
    -----
    ``mode="faithful"`` reproduces ``SIRFShampoo`` (f-dangel/sirfshampoo ``7bc5eaf``, structures from
    singd ``1ac69a3``), including its neutral scaling devices (:math:`K_n/\sqrt{d_n}` in the factor
    update, :math:`\sigma_n` when preconditioning). Deviations of the default mode (spec §2.4):

    * S1: factors and factor momenta stored in bf16 for parameters of at most 32 bits (float64
      parameters: float64; NumPy, which has no bf16: the compute dtype), unless ``factor_dtype``
      says otherwise; the factor step and the preconditioning compute in the compute dtype
      (float32) and the refreshed factors are stored by stochastic rounding
      (``factor_rounding="stochastic"``), so that steps below bf16's spacing are kept on average:
      within seed noise of float32 factors on every task measured (docs/performance.md).
      Rounded to nearest instead (the authors' bf16 mode) they lose most factor steps at the
      default :math:`\beta_2` and track the fixed point to about 2e-1 relative (float32: 3e-6;
      spec §5).
    * S2: a group whose gradient is exactly zero skips the factor update (the authors' factors
      drift toward the damping-only fixed point, without bound when :math:`\lambda = 0`).
    * S3: a factor update that produces a non-finite factor is discarded and counted in the
      group's ``failures``.
    * S4: axes longer than ``max_dense_dim`` get diagonal factors, only on request (before
      ``block_size`` existed: 4096 by default).
    * S5: :math:`B` is an argument (the torch adapter offers the authors' forward-hook counting).
    * S6: the momentum buffer is in the compute dtype (the authors': the parameter dtype).
    * S7: the factors refresh every 2 calls by default (the authors' runs; SIRFShampoo: every call).
    * S8: the preconditioned gradient of each group is clipped to :math:`\eta^2\langle Pg, g\rangle
      \le \kappa` (``kl_clip``, default 0.1; Ba et al. 2017), then enters the momentum. Near an
      optimum :math:`gg^\top \to 0` and :math:`P \to \lambda^{-1}I`: on Rosenbrock's function
      (curvature 1000 at the optimum) the unclipped method at :math:`\eta = 10^{-3}` reaches
      :math:`10^{-5}` of the optimum, then diverges to 3e34 within 10 000 steps; clipped, the
      step stays bounded until the factors adapt, and it converges.
    * S9: axes longer than ``block_size`` (64) are cut into blocks, each tile with its own factors.
    * S10: the tiles of a blocked parameter refresh at staggered calls of the interval.
    * S12 (``structures=None``): a vector's factor is diagonal (a root-free RMSProp of its entries),
      cut into ``block_size`` blocks: dense 64x64 tiles would hold 64 times its entries.

    Groups whose grouped tensors and factors have one shape and dtype are stacked: each product
    of the factor step and of the preconditioning runs once for the stack
    (:func:`precond_ref.linalg.mode_product`, :func:`~precond_ref.linalg.mode_gram`). No step
    reads a device value.

    The prototype used for the paper (``LocalOptimizer_GGT``) equals faithful mode plus
    ``preconditioner_lr_scale=prototype_lr_scale`` and ``precondition_every=prototype_schedule(T)``.
    Only the Kronecker product of the factors is identifiable (:math:`cP_1 \otimes P_2/c`).

    References
    ----------
    Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani. "Can We Remove the Square-Root in Adaptive
    Gradient Methods? A Second-Order Perspective". ICML 2024, arXiv:2402.03496 (IF-Shampoo,
    Figure 3). Clean implementation: https://github.com/f-dangel/sirfshampoo.
    """
    faithful = check_mode(mode)
    learning_rate = IF_SHAMPOO_LEARNING_RATE[mode] if learning_rate is None else learning_rate
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("momentum", momentum)
    check_learning_rate("preconditioner_lr", preconditioner_lr)
    check_unit_interval("preconditioner_momentum", preconditioner_momentum)
    check_nonnegative("damping", damping)
    check_nonnegative("weight_decay", weight_decay)
    options.check_batch_size(batch_size)
    check_choice("grouping", grouping, ("per_parameter", "weight_bias"))
    check_bool("clamp_factor_step", clamp_factor_step)
    check_optional(check_nonnegative, "kl_clip", kl_clip)
    check_principled_only("block_size", faithful and block_size is not None, " (SIRFShampoo has no blocking)")
    precondition_every = mode_default(precondition_every, faithful, 1, _PRECONDITION_EVERY)  # S7
    block_size = mode_default(block_size, faithful, None, _BLOCK_SIZE)  # S9: long axes cut into blocks
    spread_refresh = mode_default(spread_refresh, faithful, False, True)  # S10
    kl_clip = mode_default(kl_clip, faithful, 0.0, _KL_CLIP)  # S8
    structures = "dense" if structures is None and faithful else structures  # principled None: vectors diagonal (S12)
    factor_rounding = mode_default(factor_rounding, faithful, "nearest", "stochastic")  # S1
    config = IFShampooConfig(
        learning_rate, momentum, preconditioner_lr, preconditioner_momentum, damping, weight_decay, batch_size, kl_clip,
        clamp_factor_step, faithful, use_momentum=not is_zero(momentum),
        use_factor_momentum=not is_zero(preconditioner_momentum), use_decay=not is_zero(weight_decay),
        use_kl_clip=not is_zero(kl_clip),
    )
    layout = TileLayout(  # S1, S6: factors and momentum in the parameters' dtype only in faithful mode; S3 counted
        block_size, precondition_every, spread_refresh, partial(_diagonal_axes, structures, max_dense_dim),
        partial(_factor_dtypes, factor_dtype, faithful, factor_rounding == "stochastic"), vectors_cut=structures is None,
        parameter_dtype=faithful, weight_bias=grouping == "weight_bias", group_scale=preconditioner_lr_scale,
        counted=not faithful, old_layout=None if faithful else old_layout_hint, factor_rounding=factor_rounding,
    )
    _check_tiling(layout, structures, max_dense_dim, factor_dtype)
    return tiled_transform(IF_SHAMPOO, config, layout, on_nonfinite=on_nonfinite)
