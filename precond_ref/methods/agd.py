r"""AGD: auto-switchable optimizer using the stepwise gradient difference (Yue et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from .._backend import array_device, clip, compute_dtype, float32_power, float32_sqrt, is_number, is_zero
from ..engine.elementwise import ElementwiseRule, elementwise_transform
from ..transform import ScalarOrSchedule, Transform, check_bool, check_choice, check_learning_rate, check_mode
from ..transform import check_nonnegative, check_optional, check_positive, check_unit_interval

__all__ = ["agd"]

_WEIGHT_DECAY_MODES = ("decoupled", "fixed", "l2")


def agd(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    delta: ScalarOrSchedule = 1e-5,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled",
    amsgrad: bool = False,
    clip: Optional[float] = None,
    win: bool = False,
    mode: str = "principled",
    on_nonfinite: str = "skip",
) -> Transform:
    r"""AGD, element-wise, with its auto-switch between SGD-momentum and adaptive steps.

    With bias-corrected momentum :math:`\hat m_t = m_t/(1-\beta_1^t)` and the EMA :math:`b_t` of
    squared *stepwise differences* :math:`s_t = \hat m_t - \hat m_{t-1}` (:math:`\hat m_0 = 0`):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        b_t = \beta_2 b_{t-1} + (1-\beta_2) s_t^2, \\
        \theta_{t+1} &= \theta_t - \eta_t\,
            \frac{\hat m_t}{\max\bigl(\sqrt{b_t/(1-\beta_2^t)},\ \delta\bigr)} - \eta_t \lambda \theta_t .

    A coordinate whose :math:`\sqrt{\hat b}` is below :math:`\delta` takes an SGD-momentum step of
    size :math:`\eta/\delta`; the others an adaptive step. With ``amsgrad`` the running maximum of
    the raw :math:`b` replaces :math:`b`.

    Parameters
    ----------
    learning_rate:
        :math:`\eta`, a positive number or a schedule ``count -> value``. The authors advise about a
        tenth of the AdamW learning rate for the same task.
    b1:
        EMA coefficient of the gradient, in [0, 1).
    b2:
        EMA coefficient of the squared stepwise difference, in [0, 1).
    delta:
        The switch threshold :math:`\delta > 0`, in gradient units (AGD is not invariant to the
        gradient scale). The authors' code default is 1e-5; their README suggests 1e-14 for
        Transformers and their CIFAR example uses 1e-8. A schedule is accepted.
    weight_decay:
        :math:`\lambda \ge 0`.
    weight_decay_mode:
        ``"decoupled"`` (:math:`-\eta\lambda\theta`, authors' ``weight_decouple=True``),
        ``"fixed"`` (:math:`-\lambda\theta`, ``fixed_decay=True``) or ``"l2"`` (:math:`g + \lambda\theta`,
        ``weight_decouple=False``).
    amsgrad:
        Use the running maximum of :math:`b`.
    clip:
        ``None`` or a positive bound on the preconditioned step; see the deviations below.
    win:
        The Win-style extrapolation of the authors' code (not part of the paper); needs ``params``.
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``; see :func:`precond_ref.engine.build_transform`.

    Returns
    -------
    Transform
        ``init(params)`` / ``update(grads, state, params)``; ``params`` are needed when
        ``weight_decay > 0`` or ``win``.

    Notes
    -----
    ``mode="faithful"`` reproduces ``atorch/optimizers/agd.py`` (atorch ``7fb7da8``, byte-identical
    to dlrover ``b5406a7``): state in the parameter dtype, the difference of bias-corrected momenta
    formed as written, the bias-correction scalars in float32 (the authors' step counter is a float32
    tensor), ``clip`` on the raw ratio :math:`m/\max(\sqrt b, \delta\sqrt{1-\beta_2^t})`, and Win's
    auxiliary iterate initialised at zero. Weight decay is applied first, and skipped with ``win``.

    Deviations of the default ``mode="principled"`` (spec ``agd.md`` §2.4):

    * D1: :math:`\delta > 0` is required in both modes (the authors accept 0, which gives NaN on a
      zero-gradient coordinate).
    * D2: state in float32 for bf16/fp16 parameters, and :math:`s_t` by the cancellation-free
      identity :math:`s_t = \frac{1-\beta_1}{\beta_1(1-\beta_1^{t-1})}(g_t - \hat m_t)`
      (:math:`t > 1`; :math:`s_1 = \hat m_1`), the spec's
      :math:`\frac{1-\beta_1}{1-\beta_1^t}(g_t - \hat m_{t-1})` rewritten with
      :math:`m_{t-1} = (m_t - (1-\beta_1) g_t)/\beta_1` so that it reads the new momentum. Its
      factor is :math:`(1-\beta_1^t)/(\beta_1(1-\beta_1^{t-1})) \le (1+\beta_1)/\beta_1` times the
      spec form's, and so about its rounding error: for :math:`\beta_1 < 1/2` (or a traced
      :math:`\beta_1`) the spec form is used.
    * D3: ``clip`` bounds the bias-corrected ratio, so :math:`|\Delta\theta_i| \le \eta\cdot` clip
      (the authors' threshold in these units drifts with :math:`t`).
    * D4: Win's auxiliary iterate starts at :math:`\theta_0` (the authors start it at 0, which
      shrinks the parameters to a third on the first step).
    * D5: ``"l2"`` never writes into the caller's gradient (the functional core mutates nothing).
    * D6: bias corrections computed in the compute dtype from an integer counter.

    References
    ----------
    Yue, Ye, Jiang, Liu, Zhang. "AGD: an Auto-switchable Optimizer using Stepwise Gradient
    Difference for Preconditioning Matrix". NeurIPS 2023, arXiv:2312.01658.
    """
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    if not callable(delta):
        check_positive("delta", delta)
    check_nonnegative("weight_decay", weight_decay)
    check_choice("weight_decay_mode", weight_decay_mode, _WEIGHT_DECAY_MODES)
    check_bool("amsgrad", amsgrad)
    check_optional(check_positive, "clip", clip)
    check_bool("win", win)
    faithful = check_mode(mode)
    config = AGDConfig(learning_rate, b1, b2, delta, weight_decay, amsgrad=amsgrad, clip=clip, win=win, faithful=faithful,
                       decay=None if is_zero(weight_decay) or win else weight_decay_mode)
    rule, state_dtype = (AGD_FAITHFUL, lambda xp, dtype: dtype) if faithful else (AGD, compute_dtype)  # D2: the state dtype
    return elementwise_transform(rule, config, state_dtype=state_dtype, reads_params=win or not is_zero(weight_decay),
                                 on_nonfinite=on_nonfinite)


# Yue et al. 2023, Algorithm 1, with the authors' bias corrections (spec agd.md §2.1-2.3);
# per coordinate, from m_0 = b_0 = 0 and m^_0 = 0:
#
#   g_t     <- g_t + lambda theta_t                        ("l2" decay only)
#   m_t     =  b1 m_{t-1} + (1 - b1) g_t,                  m^_t = m_t / (1 - b1^t)
#   s_t     =  m^_t - m^_{t-1}                             the stepwise difference
#   b_t     =  b2 b_{t-1} + (1 - b2) s_t^2,                b^_t = b_t / (1 - b2^t)
#              (amsgrad: b^_t from the running maximum of b_t)
#   r_t     =  m^_t / max(sqrt(b^_t), delta)               the auto-switch (clip: to [-clip, clip])
#   theta_{t+1} = theta_t - eta_t r_t - eta_t lambda theta_t   ("fixed": - lambda theta_t)
#
# Faithful mode swaps in the authors' arithmetic for the step's scalars, s_t and r_t (their clip
# bounds r_t before the factor sqrt(1 - b2^t)/(1 - b1^t)) and Win: the _faithful_ functions.


class AGDConfig(NamedTuple):
    """AGD's hyperparameters (:func:`agd`), validated there; ``decay`` is the weight decay's mode,
    ``None`` when it is off (or replaced by Win's)."""

    learning_rate: Any
    b1: Any
    b2: Any
    delta: Any
    weight_decay: Any
    amsgrad: bool
    clip: Optional[float]
    win: bool
    faithful: bool
    decay: Optional[str]


class AGDState(NamedTuple):
    """A leaf's state: the momentum ``m``, the EMA ``b`` of squared stepwise differences, its
    running maximum ``b_max`` (amsgrad) and Win's auxiliary iterate ``z``."""

    m: Any
    b: Any
    b_max: Any = None
    z: Any = None


class _Step(NamedTuple):
    """A step's scalars (:func:`_agd_scalars`, :func:`_faithful_scalars`): ``eta`` (η_t), ``lr_wd``
    (η_t λ), ``floor`` (δ); principled: ``bc1``, ``bc2`` (1 − β_i^t) and the coefficients of s_t,
    ``a``, ``d`` (β₁ ≥ 1/2) or ``k``, ``bc1_prev`` (:func:`_stepwise_difference`); faithful:
    ``inv_bc1``, ``inv_bc1_prev``; Win's ``win_shrink``, ``win_tau`` (faithful: ``win_r``, ``win_z``)."""

    eta: Any
    lr_wd: Any
    floor: Any
    bc1: Any = None
    bc2: Any = None
    a: Any = None
    d: Any = None
    k: Any = None
    bc1_prev: Any = None
    inv_bc1: Any = None
    inv_bc1_prev: Any = None
    win_shrink: Any = None
    win_tau: Any = None
    win_r: Any = None
    win_z: Any = None


def _agd_init(xp, c: AGDConfig, w, dtype) -> AGDState:
    zeros = xp.zeros(w.shape, dtype=dtype, device=array_device(w))
    z = (zeros if c.faithful else xp.astype(w, dtype, copy=True)) if c.win else None  # D4: z_0 = theta_0
    return AGDState(m=zeros, b=zeros, b_max=zeros if c.amsgrad else None, z=z)


def _agd_scalars(xp, c: AGDConfig, t) -> _Step:
    """The step's scalars at ``t = count + 1``, in the state dtype from an integer counter (D6):
    ``1 - b_i^t``, the floor ``delta`` as a 0-D array, the coefficients of s_t (D2) and Win's
    ``1 + wd eta`` and ``tau = 1/(3 + 2 eta wd)``."""
    lr, wd, step = t.value(c.learning_rate), t.value(c.weight_decay), t.step
    bc1, bc2 = 1.0 - c.b1**step, 1.0 - c.b2**step
    h = _Step(eta=lr, lr_wd=lr * wd, floor=t.scalar(c.delta), bc1=bc1, bc2=bc2)
    h = h._replace(**_difference_coefficients(xp, c.b1, bc1, 1.0 - c.b1 ** (step - 1.0)))
    if c.win:
        h = h._replace(win_shrink=1.0 + wd * lr, win_tau=1.0 / (3.0 + 2.0 * lr * wd))
    return h


def _agd_state(xp, c: AGDConfig, state: AGDState, g, w, h: _Step) -> AGDState:
    if c.decay == "l2":
        g = g + c.weight_decay * w  # g_t + lambda theta_t
    m = c.b1 * state.m + (1.0 - c.b1) * g  # m_t
    s = _faithful_difference(h, state.m, m) if c.faithful else _stepwise_difference(h, g, state.m, m)  # s_t
    b = c.b2 * state.b + (1.0 - c.b2) * (s * s)  # b_t
    b_max = xp.maximum(state.b_max, b) if c.amsgrad else None  # amsgrad's running maximum
    v = b if b_max is None else b_max
    z = _win_iterate(c, h, state.z, _auto_switch(xp, c, h, m, v)) if c.win else None  # Win's iterate, from r_t
    return AGDState(m, b, b_max, z)


def _agd_update(xp, c: AGDConfig, state: AGDState, g, w, h: _Step):
    r = _auto_switch(xp, c, h, state.m, state.b if state.b_max is None else state.b_max)  # r_t
    if c.win:
        return _win_step(c, h, w, state.z, r) - w
    update = -(h.eta * r)  # -eta_t r_t
    decay = {"decoupled": h.lr_wd, "fixed": c.weight_decay}.get(c.decay)  # eta_t lambda ("fixed": lambda; "l2": none)
    return update if decay is None else update - decay * w  # - eta_t lambda theta_t


def _auto_switch(xp, c: AGDConfig, h: _Step, m, v):
    """r_t = m^_t / max(sqrt(b^_t), delta), clipped to [-clip, clip] (faithful: the authors' ratio)."""
    r = _faithful_ratio(xp, h, m, v) if c.faithful else (m / h.bc1) / xp.maximum(xp.sqrt(v / h.bc2), h.floor)
    return r if c.clip is None else clip(xp, r, -c.clip, c.clip)


def _stepwise_difference(h: _Step, g, m_prev, m):
    r"""``s_t = m^_t - m^_{t-1}`` without its cancellation (D2): ``a g_t - d m_t`` for ``b1 >= 1/2``,
    else ``k (g_t - m_{t-1}/(1 - b1^{t-1}))``, with the coefficients of :func:`_difference_coefficients`."""
    return h.a * g - h.d * m if h.d is not None else h.k * (g - m_prev / h.bc1_prev)


def _difference_coefficients(xp, b1, bc1, bc1_prev) -> dict:
    r"""The coefficients of the stepwise difference (D2), from ``bc1 = 1 - b1^t`` and ``bc1_prev =
    1 - b1^{t-1}``.

    With ``m_t = b1 m_{t-1} + (1 - b1) g_t`` the difference is exactly
    ``k (g_t - m_{t-1}/(1 - b1^{t-1}))``, ``k = (1 - b1)/(1 - b1^t)`` (spec §2.3 step 4), which
    subtracts ``g_t`` from the old bias-corrected momentum instead of two nearly equal momenta.
    For ``b1 >= 1/2`` it is formed from the new momentum, ``m_{t-1} = (m_t - (1 - b1) g_t)/b1``:
    ``s_t = a g_t - d m_t`` with ``a = (1 - b1)/(b1 (1 - b1^{t-1}))`` and ``d = a/(1 - b1^t)``
    (``a = 0``, ``d = -1/(1 - b1)`` at ``t = 1``), so that the difference reads the new momentum
    only (docs/methods/agd.md, D2). Its factor over the first form is
    ``(1 - b1^t)/(b1 (1 - b1^{t-1})) <= (1 + b1)/b1``, and so about its rounding error: for
    ``b1 < 1/2``, or a ``b1`` given as an array, the first form is used.
    """
    first = bc1_prev <= 0.0  # t = 1, where m_{t-1} = 0
    bc1_prev = xp.where(first, xp.ones_like(bc1_prev), bc1_prev)
    if not (is_number(b1) and b1 >= 0.5):
        return dict(k=(1.0 - b1) / bc1, bc1_prev=bc1_prev)
    a = (1.0 - b1) / (b1 * bc1_prev)
    return dict(a=xp.where(first, xp.zeros_like(a), a), d=xp.where(first, -xp.ones_like(a), a) / bc1)


def _win_iterate(c: AGDConfig, h: _Step, z, r):
    """Win's auxiliary iterate ``z' = (z - u)/(1 + wd eta)`` from the step ``u = eta r`` (faithful:
    times the authors' float32 ``1/(1 + wd eta)``)."""
    return (z - h.eta * r) * h.win_shrink if c.faithful else (z - h.eta * r) / h.win_shrink


def _win_step(c: AGDConfig, h: _Step, theta, z, r):
    """Win's extrapolated iterate from the step ``u = eta r`` (an extra of the authors' code, D4):
    ``theta' = (theta - 2u + 2z')/(3 + 2 eta wd)`` (faithful: the authors' float32 coefficients)."""
    if c.faithful:
        return theta * h.win_tau + h.win_r * r + h.win_z * z
    return h.win_tau * (theta - 2.0 * (h.eta * r) + 2.0 * z)


# --------------------------------------------------------------------------------------------
# Faithful mode: the authors' arithmetic (atorch ``agd.py``)


def _faithful_scalars(xp, c: AGDConfig, t) -> _Step:
    """The authors' float32 bias-correction scalars at ``t = count + 1`` (spec §2.2 steps 2, 7, 9),
    float32 whatever the parameter dtype (their step counter is a float32 tensor: the rule's
    ``counter``, the dtype of ``t.step`` and ``t.scalar``): ``inv_bc1 = 1/(1 - b1^t)``,
    ``inv_bc1_prev = 1/(1 - b1^{t-1})`` (1 at t = 1, where ``m_0 = 0``), ``eta = lr sqrt(1 -
    b2^t)/(1 - b1^t)``, ``floor = delta sqrt(1 - b2^t)``; and Win's coefficients in the authors'
    order (and their ``z_0 = 0``, D4). The hyperparameters enter as float32 0-D arrays
    (``t.scalar``): torch multiplies a float32 tensor by a Python scalar in float32, and explicit
    float32 operands make every backend round as it does."""
    step = t.step
    bc1, bc2 = 1.0 - float32_power(xp, c.b1, step), 1.0 - float32_power(xp, c.b2, step)
    bc1_prev = xp.where(step == 1.0, xp.ones_like(step), 1.0 - float32_power(xp, c.b1, step - 1.0))
    sqrt_bc2 = float32_sqrt(xp, bc2)
    eta = t.scalar(c.learning_rate) * sqrt_bc2 / bc1
    h = _Step(eta=eta, lr_wd=t.value(c.learning_rate) * t.value(c.weight_decay), floor=t.scalar(c.delta) * sqrt_bc2,
              inv_bc1=1.0 / bc1, inv_bc1_prev=1.0 / bc1_prev)
    if c.win:
        wd = t.scalar(c.weight_decay)
        tau = 1.0 / (3.0 + (2.0 * eta) * wd)
        h = h._replace(win_shrink=1.0 / (1.0 + wd * eta), win_tau=tau, win_r=-tau * (2.0 * eta), win_z=2.0 * tau)
    return h


def _faithful_difference(h: _Step, m_prev, m):
    """``s_t = m_t/(1 - b1^t) - m_{t-1}/(1 - b1^{t-1})`` as the authors form it: two bias-corrected
    momenta in the state dtype, subtracted (spec §2.2 step 4)."""
    return m * h.inv_bc1 - m_prev * h.inv_bc1_prev


def _faithful_ratio(xp, h: _Step, m, v):
    """``m_t / max(sqrt(v), delta sqrt(1 - b2^t))``: the authors' ratio before the factor
    ``sqrt(1 - b2^t)/(1 - b1^t)`` (in ``eta``), which is what their ``clip`` bounds (D3)."""
    return m / xp.maximum(xp.sqrt(v), h.floor)


AGD = ElementwiseRule(
    "agd", AGDState, _agd_init, _agd_scalars, _agd_state, _agd_update, scheduled=("learning_rate", "delta"),
    computed=("eta", "floor", "bc1", "bc2", "a", "d", "k", "bc1_prev"),
)
AGD_FAITHFUL = AGD._replace(scalars=_faithful_scalars, computed=("eta", "floor", "inv_bc1", "inv_bc1_prev"),
                            counter="float32")  # the authors' step counter
