r"""ASGO and DASGO: one-sided structured preconditioning (An et al., arXiv 2503.20762).

ASGO keeps, per matrix parameter :math:`W \in \mathbb R^{m\times n}`, one statistic
:math:`P \approx \mathbb E[GG^\top]` (or :math:`G^\top G`) on its *smaller* side and steps along
:math:`P^{-1/2}M` (or :math:`MP^{-1/2}`), with :math:`M` the gradient momentum; DASGO keeps only the
diagonal of the statistic. Both renormalise the step to a fixed RMS. Leaves that are not matrices
go to a built-in Adam, as in the authors' trainer.

Layout of a leaf's state (arrays only):

* matrix leaves (ASGO): ``momentum`` (the leaf as an m×n matrix), ``statistic`` (k×k, or a batch of
  ``block_size`` chunks plus ``statistic_tail``), ``root`` (same shapes as the statistic; faithful
  mode keeps it only when ``precondition_every > 1``), ``failures`` (0-D int32: how many of this
  entry's preconditioner updates were discarded because their result was not usable (not finite,
  or an iterative root that did not converge); the previous preconditioner was kept: the previous
  root, in faithful mode the identity for a non-finite root, D6, D13);
* matrix leaves (DASGO): ``momentum`` and ``statistic`` (a vector along the preconditioned side);
* fallback leaves: ``mu``, ``nu`` (Adam moments in the leaf's shape).

The matrix view of a leaf is stored in the shape of ``momentum``: ≥3-D leaves are (first axis,
rest) in the out-first layout, or (all but the last axis, last axis) for an out-last Flax
``kernel``; an unmasked 1-D leaf is a 1×n row and a 0-D leaf a 1×1 matrix.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

from .._backend import array_device, compute_dtype, is_zero, select, squared_sums
from ..blocking import spread_schedule
from ..linalg import (
    ROOT_RESIDUAL_TOLERANCE, auto_root_method, identity_like, inverse_root, inverse_root_eigh, inverse_sqrt_newton_schulz,
    inverse_sqrt_polar_express, rms_renormalised, scaled_rms_renormalised, trace,
)
from ..engine.blockdiag import (
    FallbackMask, FallbackRule, OneSidedRule, block_diagonal_product, block_state, matrix_side, one_sided_transform, side_blocks,
)
from ..engine.factors import number, per_block
from ..engine.matrices import MatrixStack
from ..transform import (
    ScalarOrSchedule, Transform, check_choice, check_learning_rate, check_mode, check_nonnegative, check_optional,
    check_positive, check_positive_int, check_principled_only, check_unit_interval,
)
from ..tree import Path, path_str

__all__ = ["asgo", "dasgo", "PRINCIPLED_BLOCK_SIZE", "PRINCIPLED_PRECONDITION_EVERY"]

Array = Any

_SIDES = ("auto", "left", "right")
_ROOT_METHODS = ("auto", "eigh", "polar_express", "newton_schulz", "newton")

#: Principled ASGO's root refresh interval and block size (one number for every device), chosen by
#: measurement: ``docs/methods/asgo.md``, "Long axes, intervals and cost".
PRINCIPLED_PRECONDITION_EVERY = 2
PRINCIPLED_BLOCK_SIZE = 1024
#: asgo's default learning rate per mode: the authors' 1e-2 (faithful); principled, the rate that
#: trains the small problems of docs/defaults.md (the torch class reads it too).
ASGO_LEARNING_RATE = {"faithful": 1e-2, "principled": 0.0316}


class ASGOConfig(NamedTuple):
    """ASGO's hyperparameters (:func:`asgo`), validated and defaulted there; ``tolerance`` is the
    iterative root's convergence check (``None``: unchecked), ``summed`` Algorithm 1's AdaGrad sum,
    ``keeps_root`` whether the state stores the roots between refreshes."""

    learning_rate: Any
    b1: float
    b2: float
    weight_decay: float
    damping: float
    eps: float
    root_method: str
    root_steps: int
    tolerance: Optional[float]
    rms_target: Optional[float]
    summed: bool
    side: str
    block_size: Optional[int]
    faithful: bool
    keeps_root: bool = True


class DASGOConfig(NamedTuple):
    """DASGO's hyperparameters (:func:`dasgo`), validated there."""

    learning_rate: Any
    b1: float
    b2: float
    eps: float
    weight_decay: float
    rms_target: Optional[float]
    side: str
    faithful: bool


# ------------------------------------------------------------------------------------------------
# The rule: pure functions of a batch of matrices (a leading ``...`` axis), left side;
# the right side is the transpose, and a blocked side has one P, Z per block of rows. The
# element-wise lines (M_t, P_t, v_t, s_t, the update) hold for any number of matrices at once.
#
#   M_t = μ M_{t-1} + (1-μ) G_t                                           _momentum
#   S_t = X Xᵀ,  X the rows of a block of G_t                              _asgo_terms
#   P_t = β₂ P_{t-1} + (1-β₂) S_t   (or P_{t-1} + S_t)                     _accumulated
#   P_t ← (P_t + P_tᵀ)/2   (principled, D10)                              symmetric
#   Z_t = (P_t + s_t I)^{-1/2},  s_t = δ tr(P_t)/k + ε   on refresh steps   _inverse_sqrt
#   U_t = Z_t M_t                                                          _asgo_direction
#   U_t ← r√(mn) U_t/‖U_t‖_F   at any scale (D2, D12)                     linalg.rms_renormalised
#   W_{t+1} = W_t - η_t (U_t + λ W_t)                                      _finish
#
# DASGO (right side): q_t = diag(G_tᵀ G_t) (_dasgo_terms), v_t = β₂ v_{t-1} + (1-β₂) q_t
# (_dasgo_statistic), U_t = M_t diag(s_t) with s_t = (v_t + ε)^{-1/2} (_dasgo_scale), renormalised
# by linalg.scaled_rms_renormalised. The leaves neither preconditions take the fallback Adam
# below. The engine runs the rules (engine.blockdiag.one_sided_transform).


def ema(old: Array, new: Array, decay: Any, lerp_form: bool = False) -> Array:
    """``decay·old + (1 - decay)·new``; with ``lerp_form`` (faithful mode), ``torch.lerp(old, new,
    1 - decay)`` as torch rounds it: ``old + w (new - old)`` for a weight ``w`` below 0.5 (or an
    array weight), else ``new - (new - old)(1 - w)`` (the authors' ``lerp_`` reproduced bit for bit)."""
    if not lerp_form:
        return decay * old + (1.0 - decay) * new
    weight = 1.0 - decay
    if hasattr(weight, "shape") or abs(weight) < 0.5:
        return old + weight * (new - old)
    return new - (new - old) * (1.0 - weight)


def _momentum(xp: Any, c: Any, old: Array, g: Array, zero: Array) -> Array:
    """``M_t = μ M_{t-1} + (1-μ) G_t``; principled mode flushes entries below the smallest normal
    number to ``zero`` (a 0-D zero of the momentum's dtype; D12, :func:`_flush_subnormal`)."""
    momentum = ema(old, g, c.b1, c.faithful)
    return momentum if c.faithful else _flush_subnormal(xp, momentum, zero)


def _flush_subnormal(xp: Any, x: Array, zero: Array) -> Array:
    """``x`` with subnormal entries set to zero (D12; what flush-to-zero hardware does).

    An EMA ``μ x`` of a value that stops receiving gradients decays geometrically, but round to
    nearest keeps the smallest subnormal fixed (``0.9 · 2^-149`` rounds back to ``2^-149``): without
    the flush an unused matrix would take steps of RMS r forever instead of reaching zero.
    """
    tiny = xp.finfo(x.dtype).smallest_normal
    return select(xp, xp.abs(x) < tiny, zero, x)


def _asgo_terms(xp: Any, c: ASGOConfig, s: MatrixStack) -> dict[str, Array]:
    """``S_t = X Xᵀ`` per block of the preconditioned side of a batch of matrices, ``X`` the block's rows of the
    oriented gradients: the chunks' (``statistic``) and a blocked side's shorter tail's
    (``statistic_tail``)."""
    x, x_tail = side_blocks(xp, s.g if s.left else s.g.mT, c.block_size)
    terms = {"statistic": x @ x.mT}
    if x_tail is not None:
        terms["statistic_tail"] = x_tail @ x_tail.mT
    return terms


def _accumulated(xp: Any, c: ASGOConfig, p_old: Array, s: Array) -> Array:
    """``P_t = β₂ P_{t-1} + (1-β₂) S_t`` (``summed``: ``P_{t-1} + S_t``)."""
    return p_old + s if c.summed else ema(p_old, s, c.b2, c.faithful)


def _inverse_sqrt(xp: Any, c: ASGOConfig, p: Array) -> tuple[Array, Optional[Array]]:
    """``Z = (P + sI)^{-1/2}`` of a batch of statistics (faithful: the authors' undamped root),
    and per block whether the checked iterative root failed its check (``None``: a root that is
    never checked); the engine keeps the previous root there (:func:`~precond_ref.engine.blockdiag.finite_root_or_previous`)."""
    if c.faithful:
        return _faithful_inverse_sqrt(xp, p, c.root_method, c.root_steps, c.eps)
    method = auto_root_method(p) if c.root_method == "auto" else c.root_method
    return _damped_inverse_sqrt(xp, p, c.damping, c.eps, method, c.root_steps, c.tolerance)


def _damped_inverse_sqrt(
    xp: Any, p: Array, damping: float, eps: float, method: str, steps: int, tolerance: Optional[float]
) -> tuple[Array, Optional[Array]]:
    r"""``(P + sI)^{-1/2}`` with ``s = δ tr(P)/k + ε`` per block of a batch of PSD statistics, and
    per block whether the checked iterative root failed its check (int32; ``None`` for ``eigh`` and
    an unchecked iteration; D1, D5, D13).

    Computed in the scale-invariant form (D12): the root of ``P/τ + (δ + ε/τ) I``, ``τ = tr(P)/k``,
    times ``τ^{-1/2}``, which is the same matrix; neither the eigensolver nor an iteration's
    Frobenius normaliser then sees a statistic whose squares under- or overflow. The eigenvalues of
    ``P/τ + shift`` lie in ``[δ, k + δ]``: a condition number below ``k/δ + 1``, which the default 10
    Polar-Express steps cover for ``k/δ`` up to ~1e8 (spec I15). ``P = 0`` gives ``ε^{-1/2} I``.

    A block whose iteration failed its check gets the damped identity ``(τ(1 + δ) + ε)^{-1/2} I``
    instead (``ε^{-1/2} I`` for ``P = 0``): the root of ``P`` with its eigenvalues replaced by their
    mean, of the right scale, which the engine keeps where the block has no previous root (D13).
    """
    tau = trace(p) / p.shape[-1]
    zero = tau <= 0.0  # P = 0 (PSD): the root is ε^{-1/2} I, from τ = 1 and shift ε
    tau = select(xp, zero, number(xp, 1.0, tau), tau)
    shift = select(xp, zero, number(xp, 0.0, tau), number(xp, damping, tau)) + eps / tau
    normalised, scale = p / per_block(xp, tau, p), per_block(xp, tau**-0.5, p)
    if method == "eigh":
        return inverse_root_eigh(normalised, 2, shift=shift) * scale, None
    z, failed = inverse_root(normalised, 2, shift=shift, method=method, steps=steps, tolerance=tolerance)
    if tolerance is None:
        return z * scale, None
    isotropic = select(xp, zero, shift, shift + 1.0)  # the mean eigenvalue of P/τ (1; 0 for P = 0) + shift
    damped_identity = identity_like(p) * per_block(xp, isotropic**-0.5, p)
    return select(xp, per_block(xp, failed != 0, p), damped_identity, z) * scale, failed


def _faithful_inverse_sqrt(xp: Any, p: Array, method: str, steps: int, eps: float) -> tuple[Array, None]:
    """The authors' root: ``steps`` iterations (Polar-Express or Newton–Schulz) towards
    ``P^{-1/2}`` of the *undamped* statistic, ``eps`` only in the iteration's normaliser; never
    checked, so no block is rejected (the second result is ``None``)."""
    if method == "polar_express":
        return inverse_sqrt_polar_express(p, steps, eps=eps), None
    return inverse_sqrt_newton_schulz(p, steps, eps=eps), None


def _asgo_init(xp: Any, c: ASGOConfig, w: Array, path: Path) -> dict[str, Array]:
    """A matrix leaf's state: ``M_0 = 0``; per block ``P_0 = 0`` and ``Z_0 = I``."""
    m, n, k, momentum_dtype, p_dtype = _matrix_leaf(xp, "asgo", w, path, c.side, c.faithful)
    momentum = {"momentum": xp.zeros((m, n), dtype=momentum_dtype, device=array_device(w))}
    return {**momentum, **block_state(xp, k, c.block_size, p_dtype, array_device(w), c.keeps_root)}


def _asgo_direction(xp: Any, c: ASGOConfig, s: MatrixStack, new: dict, roots: dict) -> Array:
    """``U_t = Z_t M_t`` (``M_t Z_t`` on the right) of a batch of matrices, ``Z_t`` block-diagonal, in the gradients' dtype."""
    return block_diagonal_product(xp, roots["root"], roots.get("root_tail"), new["momentum"], s.left, s.g.dtype)


def _dasgo_init(xp: Any, c: DASGOConfig, w: Array, path: Path) -> dict[str, Array]:
    """A matrix leaf's state: ``M_0 = 0``, ``v_0 = 0``."""
    m, n, k, momentum_dtype, v_dtype = _matrix_leaf(xp, "dasgo", w, path, c.side, c.faithful)
    return {"momentum": xp.zeros((m, n), dtype=momentum_dtype, device=array_device(w)),
            "statistic": xp.zeros((k,), dtype=v_dtype, device=array_device(w))}


def _dasgo_terms(xp: Any, c: DASGOConfig, s: MatrixStack) -> dict[str, Array]:
    """``q_t = diag(G_tᵀ G_t)``, the column sums of squares of a batch of gradients (``diag(G_t G_tᵀ)``,
    the row sums, on the left side)."""
    return {"statistic": squared_sums(xp, s.g, -1 if s.left else -2)}


def _dasgo_statistic(xp: Any, c: DASGOConfig, v: Array, q: Array) -> Array:
    """``v_t = β₂ v_{t-1} + (1-β₂) q_t``."""
    return ema(v, q, c.b2, c.faithful)


def _dasgo_scale(xp: Any, c: DASGOConfig, v: Array) -> Array:
    """``s_t = (v_t + ε)^{-1/2}``, the direction's scale ``U_t = M_t diag(s_t)``."""
    return 1.0 / xp.sqrt(v + c.eps)


def _finish(xp: Any, c: Any, minus_lr: Array, u: Array, w: Optional[Array]) -> Array:
    """The update ``-η_t (U_t + λ W_t)`` (``w``: ``None`` without weight decay)."""
    return minus_lr * (u if w is None else u + c.weight_decay * w)


# The fallback Adam: the leaves ASGO and DASGO do not precondition (biases, norms, masked leaves)
# step as in the authors' trainer (torch.optim.Adam), per entry and bias-corrected:
#
#   g_t ← g_t + λ W_t   (faithful: an L2 term; principled: decoupled below, D11)   _adam_state
#   m_t = β₁ m_{t-1} + (1-β₁) g_t,   v_t = β₂ v_{t-1} + (1-β₂) g_t²                 _adam_state
#   W_{t+1} = W_t - η_t/(1-β₁ᵗ) · m_t/(√v_t/√(1-β₂ᵗ) + ε)  (- η_t λ W_t)           _adam_scalars, _adam_update


class AdamConfig(NamedTuple):
    """The fallback Adam's hyperparameters (``fallback_b1`` ... of :func:`asgo`, :func:`dasgo`).
    ``faithful``: ``torch.optim.Adam`` (weight decay as an L2 term, EMA in ``torch.lerp`` form,
    state in the parameter's dtype); else decoupled weight decay and state in the compute dtype."""

    learning_rate: ScalarOrSchedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    faithful: bool

    @classmethod
    def checked(cls, learning_rate, b1, b2, eps, weight_decay, faithful) -> "AdamConfig":
        """The hyperparameters as the user gave them (``fallback_b1`` ...), validated."""
        check_unit_interval("fallback_b1", b1)
        check_unit_interval("fallback_b2", b2)
        check_positive("fallback_eps", eps)
        check_nonnegative("fallback_weight_decay", weight_decay)
        return cls(learning_rate, b1, b2, eps, weight_decay, faithful)


class AdamState(NamedTuple):
    """A fallback leaf's state: the Adam moments in the leaf's shape."""

    mu: Any
    nu: Any


class AdamStep(NamedTuple):
    """A step's scalars: ``minus_lr`` (``-η_t``), ``step`` (``-η_t/(1-β₁ᵗ)``) and ``root_bc2`` (``√(1-β₂ᵗ)``)."""

    minus_lr: Any
    step: Any
    root_bc2: Any


def _adam_init(xp: Any, c: AdamConfig, w: Array) -> AdamState:
    """``m_0 = v_0 = 0`` in the parameter's shape."""
    zeros = xp.zeros(w.shape, dtype=w.dtype if c.faithful else compute_dtype(xp, w.dtype), device=array_device(w))
    return AdamState(zeros, zeros)


def _adam_scalars(xp: Any, c: AdamConfig, t: Any, minus_lr: Array) -> AdamStep:
    """The bias corrections at step ``t.step`` (``count + 1``)."""
    step = t.step
    bc1 = 1.0 - c.b1**step
    bc2 = 1.0 - c.b2**step
    return AdamStep(minus_lr, minus_lr / bc1, xp.sqrt(bc2))


def _adam_state(xp: Any, c: AdamConfig, s: AdamState, g: Array, w: Optional[Array], h: AdamStep) -> AdamState:
    """``m_t``, ``v_t`` (faithful, with weight decay: of ``g_t + λ W_t``)."""
    if c.faithful and not is_zero(c.weight_decay):
        g = g + c.weight_decay * w  # g_t + λ W_t
    return AdamState(ema(s.mu, g, c.b1, c.faithful),  # m_t = β₁ m_{t-1} + (1-β₁) g_t
                     c.b2 * s.nu + (1.0 - c.b2) * (g * g))  # v_t = β₂ v_{t-1} + (1-β₂) g_t²


def _adam_update(xp: Any, c: AdamConfig, s: AdamState, g: Array, w: Optional[Array], h: AdamStep) -> Array:
    """The update ``-η_t/(1-β₁ᵗ) · m_t/(√v_t/√(1-β₂ᵗ) + ε)``, principled with ``- η_t λ W_t``."""
    update = h.step * (s.mu / (xp.sqrt(s.nu) / h.root_bc2 + c.eps))
    if c.faithful or is_zero(c.weight_decay):
        return update
    return update + (h.minus_lr * c.weight_decay) * w  # - η_t λ W_t (D11)


_ADAM = FallbackRule(AdamState, _adam_init, _adam_scalars, _adam_state, _adam_update)
_ASGO = OneSidedRule(init=_asgo_init, terms=_asgo_terms, momentum=_momentum, statistic=_accumulated, symmetric=True,
                     inverse_root=_inverse_sqrt, direction=_asgo_direction, scale=None, renormalise=rms_renormalised,
                     finish=_finish, fallback=_ADAM)
_ASGO_FAITHFUL = _ASGO._replace(symmetric=False)  # the authors store P as accumulated
_DASGO = OneSidedRule(init=_dasgo_init, terms=_dasgo_terms, momentum=_momentum, statistic=_dasgo_statistic,
                      symmetric=False, inverse_root=None, direction=None, scale=_dasgo_scale,
                      renormalise=scaled_rms_renormalised, finish=_finish, fallback=_ADAM)


def asgo(
    learning_rate: Optional[ScalarOrSchedule] = None,
    b1: float = 0.9,
    b2: float = 0.8,
    weight_decay: float = 0.1,
    damping: Optional[float] = None,
    eps: Optional[float] = None,
    root_method: Optional[str] = None,
    root_steps: int = 10,
    root_tolerance: Optional[float] = None,
    precondition_every: Optional[int] = None,
    rms_target: Optional[float] = 0.2,
    accumulator: str = "ema",
    side: str = "auto",
    block_size: Optional[int] = None,
    fallback_mask: FallbackMask = None,
    fallback_b1: float = 0.9,
    fallback_b2: float = 0.95,
    fallback_eps: float = 1e-8,
    fallback_weight_decay: float = 0.0,
    mode: str = "principled",
    on_nonfinite: str = "skip",
    spread_refresh: Optional[bool] = None,
) -> Transform:
    r"""ASGO: one-sided matrix preconditioning on the smaller side of every matrix parameter.

    For a matrix parameter :math:`W \in \mathbb R^{m\times n}` with gradient :math:`G_t`, on the
    left side (:math:`m < n`; the right side is the transpose):

    .. math::

        M_t &= \mu M_{t-1} + (1-\mu) G_t, \qquad
        P_t = \beta_2 P_{t-1} + (1-\beta_2) G_t G_t^\top \quad (\text{or } P_{t-1} + G_tG_t^\top), \\
        U_t &= (P_t + s_t I)^{-1/2} M_t, \qquad s_t = \delta\,\operatorname{tr}(P_t)/k + \epsilon, \\
        W_{t+1} &= W_t - \eta_t \Bigl( r\sqrt{mn}\,\frac{U_t}{\|U_t\|_F} + \lambda W_t \Bigr).

    With ``b1=0``, ``accumulator="sum"``, ``rms_target=None``, ``weight_decay=0`` this is the
    idealised ASGO of the paper's Algorithm 1 (without projection):
    :math:`W_{t+1} = W_t - \eta V_t^{-1/2} G_t`, :math:`V_t = \sum_{s\le t} G_s G_s^\top`.

    Parameters
    ----------
    learning_rate:
        :math:`\eta > 0` or a schedule ``count -> value`` (also used by the fallback Adam).
        ``None``: 0.0316 in principled mode, the rate of the sweep in ``docs/defaults.md`` (near the
        best on three small problems, where the authors' 1e-2 makes under 0.8 of the best share on
        one); 1e-2 in faithful mode (the authors' code default and experiment value).
    b1:
        Momentum :math:`\mu \in [0, 1)`, EMA form.
    b2:
        EMA decay :math:`\beta_2 \in [0, 1)` of the statistic (unused with ``accumulator="sum"``).
    weight_decay:
        Decoupled weight decay :math:`\lambda \ge 0` (``-η λ W``).
    damping:
        Relative damping :math:`\delta \ge 0` on the mean eigenvalue :math:`\operatorname{tr}(P)/k`.
        Principled default 1e-4; faithful mode has none (any value raises).
    eps:
        Principled: absolute floor :math:`\epsilon \ge 0` of the shift (default 1e-30). Faithful:
        the term inside the Polar-Express / Newton–Schulz normaliser (default 1e-10).
    root_method:
        Principled: ``"auto"`` (default: ``"eigh"`` on CPUs and for float64, where it is exact and
        costs about six matmuls, the checked ``"polar_express"`` iteration on GPUs and other
        accelerators, where matmuls are cheap and ``eigh`` is slow), ``"eigh"``,
        ``"polar_express"``, ``"newton_schulz"`` or ``"newton"`` (coupled Newton); see
        :func:`precond_ref.linalg.inverse_root`. Faithful: ``"polar_express"`` (default) or
        ``"newton_schulz"``, the authors' iterations.
    root_steps:
        Iterations of the iterative roots (10, as the authors; principled ``"newton_schulz"`` and
        ``"newton"`` converge more slowly and want about 20 and 30).
    root_tolerance:
        Principled iterative roots: a block whose iteration ends farther than this from
        convergence (or not finite) keeps its previous root, and is counted in ``failures``
        (default :data:`precond_ref.linalg.ROOT_RESIDUAL_TOLERANCE`, 0.05; D13). The check and the
        replacement are element-wise on the device: no branch, no host read, capturable in a CUDA
        graph. ``math.inf`` turns the check off. Faithful mode has no check.
    precondition_every:
        Recompute the roots every ``precondition_every`` steps (the first update always does); the
        statistic is updated every step and the stored root is used in between. Principled default
        :data:`PRINCIPLED_PRECONDITION_EVERY` (chosen by measurement, ``docs/methods/asgo.md``,
        "Long axes, intervals and cost"); faithful default 1 (the authors' code).
    rms_target:
        :math:`r > 0`, the RMS of the step before :math:`\eta` (0.2), or ``None`` for no
        renormalisation.
    accumulator:
        ``"ema"`` (:math:`\beta_2` EMA, the authors' code) or ``"sum"`` (Algorithm 1's AdaGrad sum).
    side:
        ``"auto"`` (left if :math:`m < n`, else right), ``"left"`` or ``"right"``: sides of the
        (out, in) weight, its output rows and input columns; a Flax ``kernel`` (in, out) takes the
        same side of its layer.
    block_size:
        Principled only: split a preconditioned side longer than this into contiguous chunks of
        this size (the last may be shorter), each with its own statistic, damping and root; the RMS
        renormalisation stays per leaf. Equal chunks of all matrices are rooted in one batched call.
        ``None``: :data:`PRINCIPLED_BLOCK_SIZE` (one number for every device, chosen by
        measurement); a value at least every side length gives the unblocked method.
    spread_refresh:
        Principled only: with ``precondition_every = T > 1``, give every block a phase
        ``j < T`` (from its leaf's shape and its index along the side, :func:`precond_ref.engine.phases.hashed_phases`) and
        refresh it on the steps ``count ≡ j (mod T)`` (and on the first), so that each step
        computes about ``1/T`` of the roots instead of all of them every ``T``-th step; a static schedule, no host
        read. Default ``True`` in principled mode; ``False`` refreshes all blocks together.
    fallback_mask:
        Leaves handled by the fallback Adam: a tree of bools matching the parameters, or a callable
        ``(path, leaf) -> bool``. Default: leaves with fewer than 2 dimensions. An unmasked 1-D leaf
        is preconditioned as a 1×n row.
    fallback_b1, fallback_b2, fallback_eps, fallback_weight_decay:
        The fallback Adam (bias-corrected; the authors' trainer uses 0.9, 0.95, 1e-8, 0).
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``; see :func:`precond_ref.engine.build_transform`.

    Returns
    -------
    Transform
        ``init(params)`` / ``update(grads, state, params)``; ``params`` are needed when a weight
        decay is non-zero.

    Notes
    -----
    ``mode="faithful"`` reproduces ``optimizers/asgo.py`` of infinity-stars/ASGO (commit
    ``d3ef14b``): EMAs in ``torch.lerp`` form, no bias correction, the statistic in float32 whatever
    the parameter dtype and the momentum in the gradient dtype, the 10-step Polar-Express root of
    the undamped statistic recomputed every step with ``eps`` only in its normaliser, a non-finite
    root replaced by the identity, the 0.2·sqrt(mn) Frobenius renormalisation and decoupled weight
    decay; 1-D leaves go to the fallback Adam (``torch.optim.Adam`` semantics), ≥3-D leaves that
    are not masked raise. Embeddings are *not* routed to the fallback by name: pass a
    ``fallback_mask`` to reproduce the authors' GPT-2 runs.

    Deviations of the default ``mode="principled"`` (spec ``asgo.md`` §2.5):

    * D1: damping :math:`s = \delta\,\mathrm{tr}(P)/k + \epsilon` added to the statistic before
      the root, so rank-deficient statistics give the right direction (the undamped iteration
      amplifies the null space by :math:`\prod_j a_j \approx 2.2\times10^4`).
    * D2 (both modes): a zero direction gives a zero step (only weight decay acts) instead of a
      division by zero.
    * D3 (both modes): no assertion that the root is non-zero.
    * D4: ``precondition_every`` (principled default :data:`PRINCIPLED_PRECONDITION_EVERY`, the
      authors recompute every step), with the refreshes of the blocks spread over the interval
      (``spread_refresh``).
    * D5: the root by ``eigh`` on CPUs and for float64, by the 10-step Polar-Express iteration of
      the damped statistic on accelerators (``root_method="auto"``), whose convergence is checked
      (D13). The roots of all blocks of one shape, across the parameters of a call and the chunks
      of a blocked side, are computed together (one batched ``eigh`` or iteration).
    * D6: a non-finite root keeps the previous root (the identity before the first success)
      instead of the identity; failures are counted in ``failures``.
    * D7: momentum, statistic and root in the compute dtype (float32 for bf16/fp16 parameters,
      float64 for float64 ones); the authors' code fails for bf16 and float64 parameters.
    * D8: ≥3-D leaves are reshaped to matrices (conv weights); 0-D/1-D leaves go to the fallback.
    * D9: ``block_size`` (default :data:`PRINCIPLED_BLOCK_SIZE`): long sides are split into blocks.
    * D10: the statistic is stored symmetrised.
    * D11: the fallback Adam's weight decay is decoupled (AdamW) instead of an L2 term.
    * D12: scale-invariant numerics. The RMS renormalisation takes the Frobenius norm of
      :math:`U/\max|U|` (both modes), so a tiny or decayed direction cannot underflow its norm; the
      root is taken of :math:`P/\tau`, :math:`\tau = \operatorname{tr}(P)/k`, and rescaled; momentum
      entries below the smallest normal number are flushed to zero, so the step of a matrix whose
      gradient stays exactly zero has RMS :math:`r` and then becomes exactly zero.
    * D13: a block whose checked iterative root did not converge keeps its previous root (on the
      first update, which has none, the damped identity
      :math:`(\tau(1+\delta)+\epsilon)^{-1/2} I`), selected element-wise, and is counted in
      ``failures``: no ``eigh`` fallback, no branch and no host read, so the step can be
      captured in a CUDA graph. ``root_method="eigh"`` stays exact (a host read on CUDA).

    References
    ----------
    K. An, Y. Liu, R. Pan, Y. Ren, S. Ma, D. Goldfarb, T. Zhang. "ASGO: Adaptive Structured
    Gradient Optimization". arXiv:2503.20762 (NeurIPS 2025), Algorithm 1 (idealised ASGO) and the
    practical variant of the experiments; code https://github.com/infinity-stars/ASGO.
    """
    if learning_rate is None:
        check_mode(mode)
        learning_rate = ASGO_LEARNING_RATE[mode]
    faithful, fallback = _checked_shared(mode, learning_rate, b1, b2, weight_decay, rms_target, fallback_b1, fallback_b2,
                                         fallback_eps, fallback_weight_decay)
    check_choice("accumulator", accumulator, ("ema", "sum"))
    check_choice("side", side, _SIDES)
    check_positive_int("root_steps", root_steps)
    check_optional(check_positive_int, "precondition_every", precondition_every)
    if spread_refresh is not None and not isinstance(spread_refresh, bool):
        raise ValueError(f"spread_refresh must be True, False or None, got {spread_refresh!r}")
    if faithful:
        check_principled_only("damping", damping is not None, " (the authors' root is undamped)")
        check_principled_only("block_size", block_size is not None)
        check_principled_only("spread_refresh=True", spread_refresh, " (the authors refresh every root every step)")
        if root_method not in (None, "polar_express", "newton_schulz"):
            check_choice("root_method", root_method, _ROOT_METHODS)
            check_principled_only(f"root_method={root_method!r}", True, " (the authors use 'polar_express' or 'newton_schulz')")
        check_principled_only("root_tolerance", root_tolerance is not None, " (the authors' root is not checked)")
        precondition_every = 1 if precondition_every is None else precondition_every
        spread_refresh, damping, tolerance = False, 0.0, None
        root_method = "polar_express" if root_method is None else root_method
        eps = 1e-10 if eps is None else eps
    else:
        damping = 1e-4 if damping is None else damping
        eps = 1e-30 if eps is None else eps
        root_method = "auto" if root_method is None else root_method
        root_tolerance = ROOT_RESIDUAL_TOLERANCE if root_tolerance is None else root_tolerance
        if isinstance(root_tolerance, bool) or not isinstance(root_tolerance, numbers.Real) or not root_tolerance > 0:
            raise ValueError(f"root_tolerance must be a number > 0 (math.inf: no check), got {root_tolerance!r}")
        tolerance = None if math.isinf(root_tolerance) else root_tolerance
        block_size = PRINCIPLED_BLOCK_SIZE if block_size is None else block_size
        check_positive_int("block_size", block_size)
        precondition_every = PRINCIPLED_PRECONDITION_EVERY if precondition_every is None else precondition_every
        spread_refresh = True if spread_refresh is None else spread_refresh
    check_choice("root_method", root_method, _ROOT_METHODS)
    check_nonnegative("damping", damping)
    check_nonnegative("eps", eps)
    c = ASGOConfig(learning_rate, b1, b2, weight_decay, damping, eps, root_method, root_steps, tolerance, rms_target,
                   accumulator == "sum", side, block_size, faithful, keeps_root=not faithful or precondition_every != 1)
    return one_sided_transform(_ASGO_FAITHFUL if faithful else _ASGO, c, name="asgo", on_nonfinite=on_nonfinite,
                               fallback=fallback, fallback_mask=fallback_mask,
                               schedule=spread_schedule(precondition_every, spread_refresh))


def dasgo(
    learning_rate: ScalarOrSchedule = 1e-2,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    rms_target: Optional[float] = 0.2,
    side: str = "right",
    fallback_mask: FallbackMask = None,
    fallback_b1: float = 0.9,
    fallback_b2: float = 0.95,
    fallback_eps: float = 1e-8,
    fallback_weight_decay: float = 0.0,
    mode: str = "principled",
    on_nonfinite: str = "skip",
) -> Transform:
    r"""DASGO: ASGO with the diagonal of the one-sided statistic (per-column scaling).

    On the right side (the authors' choice), with :math:`q_t = \operatorname{diag}(G_t^\top G_t)`
    the column sums of squares:

    .. math::

        M_t &= \mu M_{t-1} + (1-\mu) G_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) q_t, \\
        U_t &= M_t \operatorname{diag}(v_t + \epsilon)^{-1/2}, \qquad
        W_{t+1} = W_t - \eta_t \Bigl( r\sqrt{mn}\,\frac{U_t}{\|U_t\|_F} + \lambda W_t \Bigr).

    Parameters
    ----------
    learning_rate:
        :math:`\eta > 0` or a schedule. Default 1e-2, the authors' config (their constructor's
        default is 1e-3): on each of the three small problems of ``docs/defaults.md`` it makes at
        least 0.85 of the best share of Adam's progress that the sweep found.
    b1, b2:
        Momentum and statistic EMA coefficients in [0, 1).
    eps:
        :math:`\epsilon` inside the square root (faithful: ``>= 0``; principled: ``> 0``).
    weight_decay:
        Decoupled weight decay :math:`\lambda \ge 0`.
    rms_target:
        :math:`r > 0` (0.2) or ``None``.
    side:
        ``"right"`` (columns, the authors), ``"left"`` (rows) or ``"auto"`` (the smaller side, as
        ASGO); faithful mode allows only ``"right"``. Sides of the (out, in) weight: a Flax
        ``kernel`` (in, out) takes the same side of its layer (``"right"``: its input side).
    fallback_mask, fallback_b1, fallback_b2, fallback_eps, fallback_weight_decay:
        As :func:`asgo`.
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``.

    Returns
    -------
    Transform

    Notes
    -----
    ``mode="faithful"`` reproduces ``optimizers/dasgo.py`` of infinity-stars/ASGO (``d3ef14b``):
    statistic in float32, momentum in the gradient dtype, ``lerp`` EMAs, no bias correction; ≥3-D
    leaves that are not masked raise (the authors' code fails on them).

    Deviations of the default ``mode="principled"`` (spec ``asgo.md`` §2.7): D2 (a zero direction
    gives a zero step, in both modes), D7 (state in the compute dtype), D8 (≥3-D leaves reshaped to
    matrices, 0-D/1-D leaves to the fallback), the ``side`` option, and D11 (the fallback Adam's
    weight decay is decoupled), D12 (scale-invariant renormalisation, momentum flushed below the
    normal range).

    References
    ----------
    K. An et al. "ASGO: Adaptive Structured Gradient Optimization". arXiv:2503.20762; DASGO is in
    the authors' repository (https://github.com/infinity-stars/ASGO, ``optimizers/dasgo.py``).
    """
    faithful, fallback = _checked_shared(mode, learning_rate, b1, b2, weight_decay, rms_target, fallback_b1, fallback_b2,
                                         fallback_eps, fallback_weight_decay)
    if faithful:
        check_nonnegative("eps", eps)
        check_principled_only(f"side={side!r}", side != "right", " (the authors precondition the columns, side='right')")
    else:
        check_positive("eps", eps)
        check_choice("side", side, _SIDES)
    c = DASGOConfig(learning_rate, b1, b2, eps, weight_decay, rms_target, side, faithful)
    return one_sided_transform(_DASGO, c, name="dasgo", on_nonfinite=on_nonfinite, fallback=fallback,
                               fallback_mask=fallback_mask)


def _checked_shared(mode: str, learning_rate: Any, b1: float, b2: float, weight_decay: float, rms_target: Optional[float],
                    *fallback: float) -> tuple[bool, AdamConfig]:
    """The options ASGO and DASGO share, validated: whether ``mode`` is faithful, and the fallback
    Adam of ``fallback`` (``fallback_b1``, ``fallback_b2``, ``fallback_eps``, ``fallback_weight_decay``)."""
    faithful = check_mode(mode)
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_nonnegative("weight_decay", weight_decay)
    check_optional(check_positive, "rms_target", rms_target)
    return faithful, AdamConfig.checked(learning_rate, *fallback, faithful)


def _matrix_leaf(xp: Any, name: str, param: Array, path: Path, side: str, faithful: bool) -> tuple:
    """A matrix leaf's (m, n) (its matrix view), the length k of its preconditioned side, and the
    dtypes of its momentum and statistic: faithful, the parameter's and float32, as the authors'
    code (which takes matrices only: anything else raises, naming the leaf); else the compute dtype."""
    if faithful and param.ndim != 2:
        raise ValueError(
            f"{name}(mode='faithful'): parameter {path_str(path)!r} has shape {tuple(param.shape)}; "
            f"the authors' {name.upper()} accepts only matrices. Mask it to the fallback Adam "
            "(fallback_mask) or use mode='principled', which reshapes tensors to matrices"
        )
    m, n, left = matrix_side(side, tuple(param.shape), path)
    dtype = compute_dtype(xp, param.dtype)
    return m, n, (m if left else n), (param.dtype if faithful else dtype), (xp.float32 if faithful else dtype)
