r"""AGD: auto-switchable optimizer using the stepwise gradient difference (Yue et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from .._backend import array_device, cast, compute_dtype, computed_once, float64_where_available, is_number, is_zero, placement, scalar_array
from ..engine import StepContext, build_transform
from ..transform import (
    ScalarOrSchedule,
    Transform,
    check_bool,
    check_choice,
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)

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
    if clip is not None:
        check_positive("clip", clip)
    check_bool("win", win)
    check_choice("mode", mode, ("principled", "faithful"))
    faithful = mode == "faithful"
    decay = None if is_zero(weight_decay) or win else weight_decay_mode
    if faithful:
        corrections, difference, ratio, extrapolate = (
            _faithful_corrections, _faithful_difference, _faithful_ratio, _faithful_win)
    else:
        corrections, difference, ratio, extrapolate = _corrections, _stepwise_difference, _ratio, _win

    def init_group(leaves, paths, xp):
        (param,) = leaves
        dtype = param.dtype if faithful else compute_dtype(xp, param.dtype)
        zeros = xp.zeros(param.shape, dtype=dtype, device=array_device(param))
        state = {"m": zeros, "b": zeros}
        if amsgrad:
            state["b_max"] = zeros
        if win:
            state["z"] = zeros if faithful else xp.astype(param, dtype, copy=True)
        return state

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
    # Faithful mode swaps in the authors' arithmetic for the bias corrections, s_t, r_t (which
    # their clip bounds before the factor sqrt(1 - b2^t)/(1 - b1^t)) and Win: the _faithful_ helpers.
    def update_group(grads, state, params, ctx: StepContext):
        xp, (g,), m, b = ctx.xp, grads, state["m"], state["b"]
        g = cast(xp, g, m.dtype)
        theta = None if params is None else cast(xp, params[0], m.dtype)
        lr, wd = ctx.value(learning_rate), ctx.value(weight_decay)
        if decay == "l2":
            g = g + wd * theta  # g_t + lambda theta_t
        c = corrections(xp, b1, b2, ctx.count, lr, ctx.value(delta), m.dtype)  # 1 - b^t, eta_t, delta_t
        m_new = ctx.unless_skipped(b1 * m + (1.0 - b1) * g, m)  # m_t
        s = difference(xp, b1, c, g, m, m_new)  # s_t = m^_t - m^_{t-1}
        new_state = _settle(ctx, state, m_new, b2 * b + (1.0 - b2) * (s * s))  # b_t, amsgrad's max
        r = ratio(xp, c, m_new, new_state.get("b_max", new_state["b"]))  # m^_t / max(sqrt(b^_t), delta)
        if clip is not None:
            r = xp.clip(r, -clip, clip)
        if win:
            new_theta, new_state["z"] = extrapolate(ctx, c, wd, theta, state["z"], r)
            return (new_theta - theta,), new_state
        updates = -(c.eta * r)  # -eta_t r_t
        if decay == "decoupled":
            updates = updates - (lr * wd) * theta
        elif decay == "fixed":
            updates = updates - wd * theta
        return (updates,), new_state

    return build_transform(
        name="agd",
        init_group=init_group,
        update_group=update_group,
        on_nonfinite=on_nonfinite,
        elementwise=True,
        needs_params=win or not is_zero(weight_decay),
    )


def _settle(ctx: StepContext, state: dict, m_new, b_new) -> dict:
    """The new state entries, selected for the non-finite skip before the step is formed from them
    (``m_new`` is selected already; ``b_max``, with ``amsgrad``, is the running maximum of ``b``)."""
    new_state = {"m": m_new, "b": ctx.unless_skipped(b_new, state["b"])}
    if "b_max" in state:
        b_max = ctx.xp.maximum(state["b_max"], new_state["b"])
        new_state["b_max"] = ctx.unless_skipped(b_max, state["b_max"])
    return new_state


# --------------------------------------------------------------------------------------------
# Principled mode (the default): bias corrections in the state dtype from an integer counter (D6)


class _Scalars(NamedTuple):
    """A step's scalars: ``t``, the bias corrections ``bc1 = 1 - b1^t`` and ``bc2 = 1 - b2^t``
    (in the state dtype), the step size ``eta`` and the switch threshold ``delta`` at this step."""

    t: Any
    bc1: Any
    bc2: Any
    eta: Any
    delta: Any


def _corrections(xp, b1, b2, count, lr, delta, dtype) -> _Scalars:
    """``1 - b1^t`` and ``1 - b2^t`` with ``t = count + 1``, in ``dtype``; ``eta = lr``."""
    t = xp.astype(count + 1, dtype)
    return _Scalars(t, computed_once(xp, 1.0 - b1**t), computed_once(xp, 1.0 - b2**t), lr, delta)


def _stepwise_difference(xp, b1, c: _Scalars, g, m, m_new):
    r"""``s_t = m_t/(1 - b1^t) - m_{t-1}/(1 - b1^{t-1})``, and ``s_1 = m_1/(1 - b1)``: the paper's
    :math:`\hat m_t - \hat m_{t-1}` with :math:`\hat m_0 = 0`, without its cancellation (D2).

    With ``m_t = b1 m_{t-1} + (1 - b1) g_t`` the difference is exactly
    ``(1 - b1)/(1 - b1^t) * (g_t - m_{t-1}/(1 - b1^{t-1}))`` (spec §2.3 step 4), which subtracts
    ``g_t`` from the old bias-corrected momentum instead of two nearly equal momenta. For
    ``b1 >= 1/2`` it is formed from the new momentum, ``m_{t-1} = (m_t - (1 - b1) g_t)/b1``:
    ``s_t = a g_t - d m_t`` with ``a = (1 - b1)/(b1 (1 - b1^{t-1}))`` and ``d = a/(1 - b1^t)``
    (``a = 0``, ``d = -1/(1 - b1)`` at ``t = 1``), so that no loop of a compiled step reads the old
    momentum after the momentum's own loop has overwritten it in place (which made XLA's CPU
    backend copy it; docs/backends.md, AGD). Its factor over the first form is
    ``(1 - b1^t)/(b1 (1 - b1^{t-1})) <= (1 + b1)/b1``, and so about its rounding error: for
    ``b1 < 1/2``, or a ``b1`` given as an array, the first form is used.
    """
    bc1_prev = 1.0 - b1 ** (c.t - 1.0)
    first = bc1_prev <= 0.0  # t = 1, where m_{t-1} = 0
    bc1_prev = xp.where(first, xp.ones_like(bc1_prev), bc1_prev)
    if is_number(b1) and b1 >= 0.5:
        a = (1.0 - b1) / (b1 * bc1_prev)
        d = computed_once(xp, xp.where(first, -xp.ones_like(a), a) / c.bc1)
        return computed_once(xp, xp.where(first, xp.zeros_like(a), a)) * g - d * m_new
    return computed_once(xp, (1.0 - b1) / c.bc1) * (g - m / computed_once(xp, bc1_prev))


def _ratio(xp, c: _Scalars, m_new, v):
    """``m^_t / max(sqrt(b^_t), delta)`` with ``m^_t = m_t/(1 - b1^t)``, ``b^_t = v/(1 - b2^t)``."""
    floor = scalar_array(xp, c.delta, v.dtype, array_device(v))
    return (m_new / c.bc1) / xp.maximum(xp.sqrt(v / c.bc2), floor)


def _win(ctx: StepContext, c: _Scalars, wd, theta, z, r):
    """Win's extrapolation with the step ``u = eta r`` (an extra of the authors' code, D4):
    ``z' = (z - u)/(1 + wd eta)`` and ``theta' = (theta - 2u + 2z')/(3 + 2 eta wd)``."""
    step = c.eta * r
    z_new = ctx.unless_skipped((z - step) / (1.0 + wd * c.eta), z)
    tau = 1.0 / (3.0 + 2.0 * c.eta * wd)
    return tau * (theta - 2.0 * step + 2.0 * z_new), z_new


# --------------------------------------------------------------------------------------------
# Faithful mode: the authors' arithmetic (atorch ``agd.py``)


class _FaithfulScalars(NamedTuple):
    """The authors' step scalars, float32 whatever the parameter dtype (their step counter is a
    float32 tensor), cast to the state dtype where they meet the state: ``inv_bc1 = 1/(1 - b1^t)``,
    ``inv_bc1_prev = 1/(1 - b1^{t-1})`` (1 at t = 1, where ``m_0 = 0``), ``eta = lr sqrt(1 -
    b2^t)/(1 - b1^t)``, ``floor = delta sqrt(1 - b2^t)``; and ``eta32``, ``eta`` in float32 (Win)."""

    inv_bc1: Any
    inv_bc1_prev: Any
    eta: Any
    floor: Any
    eta32: Any


def _faithful_corrections(xp, b1, b2, count, lr, delta, dtype) -> _FaithfulScalars:
    """The authors' float32 bias-correction scalars at ``t = count + 1`` (spec §2.2 steps 2, 7, 9)."""
    t = xp.astype(count + 1, xp.float32)
    wide = float64_where_available(xp, t) or xp.float32
    bc1 = 1.0 - _float32_power(xp, b1, t, wide)
    bc2 = 1.0 - _float32_power(xp, b2, t, wide)
    bc1_prev = xp.where(t == 1.0, xp.ones_like(t), 1.0 - _float32_power(xp, b1, t - 1.0, wide))
    sqrt_bc2 = computed_once(xp, _float32_sqrt(xp, bc2, wide))
    # torch multiplies a float32 tensor by a Python scalar in float32; explicit float32 operands
    # make every backend round exactly as it does.
    eta32 = scalar_array(xp, lr, xp.float32, array_device(t)) * sqrt_bc2 / bc1
    floor = scalar_array(xp, delta, xp.float32, array_device(t)) * sqrt_bc2
    return _FaithfulScalars(
        inv_bc1=computed_once(xp, xp.astype(1.0 / bc1, dtype)),
        inv_bc1_prev=computed_once(xp, xp.astype(1.0 / bc1_prev, dtype)),
        eta=computed_once(xp, xp.astype(eta32, dtype)),
        floor=computed_once(xp, xp.astype(floor, dtype)),
        eta32=eta32,
    )


def _faithful_difference(xp, b1, c: _FaithfulScalars, g, m, m_new):
    """``s_t = m_t/(1 - b1^t) - m_{t-1}/(1 - b1^{t-1})`` as the authors form it: two bias-corrected
    momenta in the state dtype, subtracted (spec §2.2 step 4)."""
    return m_new * c.inv_bc1 - m * c.inv_bc1_prev


def _faithful_ratio(xp, c: _FaithfulScalars, m_new, v):
    """``m_t / max(sqrt(v), delta sqrt(1 - b2^t))``: the authors' ratio before the factor
    ``sqrt(1 - b2^t)/(1 - b1^t)`` (in ``c.eta``), which is what their ``clip`` bounds (D3)."""
    return m_new / xp.maximum(xp.sqrt(v), c.floor)


def _faithful_win(ctx: StepContext, c: _FaithfulScalars, wd, theta, z, r):
    """:func:`_win` with the authors' float32 scalars, in their order (and their ``z_0 = 0``, D4)."""
    xp, dtype = ctx.xp, z.dtype
    wd32 = scalar_array(xp, wd, xp.float32, array_device(c.eta32))
    shrink = xp.astype(1.0 / (1.0 + wd32 * c.eta32), dtype)
    tau = 1.0 / (3.0 + (2.0 * c.eta32) * wd32)
    z_new = ctx.unless_skipped((z - c.eta * r) * shrink, z)
    new_theta = theta * xp.astype(tau, dtype) + xp.astype(-tau * (2.0 * c.eta32), dtype) * r
    return new_theta + xp.astype(2.0 * tau, dtype) * z_new, z_new


def _float32_power(xp, base, exponent, wide):
    """``float32(float32(base) ** exponent)``: the authors' ``beta ** step`` for their float32 step.

    Backends' float32 ``pow`` differ by ulps (on this project's CPU, for t = 1..2000, torch's
    vectorised kernel in 30-43 places per beta, XLA's in up to 322), and faithful trajectories
    amplify that; computed in float64 (``wide``, where the backend has it) and rounded once, the
    result is the float32 power every backend agrees on, which torch's 0-D CPU kernel returns for
    the authors' 0-D step too (for t = 1..199 and beta 0.9, 0.999, 0.95, all but one).
    """
    base32 = xp.full((), base, dtype=xp.float32, device=placement(xp, exponent))
    return xp.astype(xp.astype(base32, wide) ** xp.astype(exponent, wide), xp.float32)


def _float32_sqrt(xp, x, wide):
    """``float32(sqrt(float64(x)))`` for a float32 ``x``: the correctly rounded float32 square root.

    The authors take ``bias_correction2.sqrt()`` of a float32 0-D tensor, IEEE 754's float32 square
    root, which the standard requires to be correctly rounded and which CUDA (the authors' GPUs),
    NumPy and XLA return. torch's eager CPU kernel is not correctly rounded on every CPU:
    sqrt(float32(1 - 0.999^4)) = sqrt(0.0039939284) is 0.06319753 there and 0.06319754 correctly
    rounded, which moved faithful float64 trajectories by 4e-9 from step 4. The square root taken
    in float64 and rounded once to float32 is the correctly rounded one on every backend: float64
    carries 53 >= 2*24 + 2 bits, for which double rounding of a square root is innocuous
    (Figueroa 1995), and checked exhaustively over every float32 mantissa in [1, 4) with torch's
    float64 CPU kernel, itself off by one float64 ulp on 1.3% of those inputs. Where float64 is
    missing (``wide`` float32: JAX without x64, torch on MPS) this is the backend's float32 sqrt.
    """
    return xp.astype(xp.sqrt(xp.astype(x, wide)), xp.float32)
