r"""MBF: mini-block Fisher preconditioning (Bahamou, Goldfarb, Ren, AISTATS 2023).

The rule, one stack of mini-blocks at a time (a leading ``...`` axis); the engine
(:mod:`precond_ref.engine.parts`) lays a layer out in blocks and parts and runs it. Per step
:math:`i` (Algorithm 1 with the authors' schedule, spec ``mbf.md`` 2.2-2.3), for each mini-block
:math:`b`::

    m      <- mu m + g                                                   _heavy_ball
    F_b    <- rho F_b + (1 - rho) g_b g_b^T          if i % T1 == 0       _ema_statistic, _schedule
    F_b^-1 <- (F_b + lam I)^-1                       if share p is due    _inverse (B2, B4, B6)
              share p due: (i <= T2 and i % T1 == 0) or i % T2 == (p T2) // P        _inverse_due
    D_b     = F_b^-1 m_b                                                 _precondition
    nu      = min(1, sqrt(kappa / (alpha_i^2 <D, m>)))   per layer       _quadratic, _step_size (B7)
    w      <- (1 - alpha_i wd) w - alpha_i nu D                          _step, _decay, _decayed
    diagonal rule (other leaves): a <- mu a + (1-mu) g, v <- b2' v + (1-b2') a^2,
                                  D = a / (eps + sqrt(v / (1-b2'^(i+1)))), nu = 1     _diagonal_rule
    warm start, gradients g_1..g_J: F_b <- ((j-1)/j) F_b + (1/j) g_jb g_jb^T          _warm_start_mean
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Optional

from .._backend import is_zero
from ..engine.parts import CONV, ELEMENTWISE, PartsRule, parts_transform
from ..linalg import damped_inverse, damped_inverse_init, damped_inverse_stable, kl_clip_of_quadratic
from ..transform import (
    Array, PrecondState, ScalarOrSchedule, Transform, check_choice, check_learning_rate, check_mode, check_nonnegative,
    check_optional, check_positive, check_positive_int, check_unit_interval, mode_default,
)

__all__ = ["mbf", "MBFTransform"]

_KL_CLIP = 1e-4  # principled default of kl_clip (see the docstring, deviation B7)
_BLOCK_SIZE = 128  # principled default of block_size (measured: docs/methods/mbf.md, "Long axes")
#: mbf's default learning rate per mode: the authors' MNIST 1e-5 (faithful); principled, the rate
#: that trains the small problems of docs/defaults.md (the torch class reads it too).
MBF_LEARNING_RATE = {"faithful": 1e-5, "principled": 1e-3}


class MBFTransform(Transform):
    """:class:`~precond_ref.Transform` of :func:`mbf`, plus ``warm_start(state, grads_batches)``.

    Still the 2-tuple ``(init, update)``; ``warm_start`` is an attribute of the instance.
    """

    warm_start: Callable[[PrecondState, Iterable[Any]], PrecondState]


class MBFConfig(NamedTuple):
    """The validated hyperparameters the rule reads (:func:`mbf`; the layout's are the engine's):
    :math:`\\alpha, \\lambda, \\mu, \\rho`, wd, :math:`\\beta_2', \\epsilon`, :math:`\\kappa`, and the
    schedule's :math:`T_1, T_2, P`."""

    learning_rate: ScalarOrSchedule
    damping: Any
    momentum: Any
    b2: Any
    weight_decay: Any
    diagonal_b2: Any
    diagonal_eps: Any
    diagonal_second_moment: str
    kl_clip: Any
    fc_blocks: str
    mode: str
    statistics_every: int = 1
    precondition_every: int = 1
    refresh_phases: int = 1


class DiagonalState(NamedTuple):
    """A leaf of the diagonal rule: the first moment :math:`a` and the second :math:`v`."""

    ema: Array
    second_moment: Array


def _init_part(xp: Any, c: MBFConfig, kind: str, shape: tuple, dtype: Any, device: Any) -> tuple[Array, Array]:
    statistic = xp.zeros(shape, dtype=dtype, device=device)  # F_b = 0
    if kind == ELEMENTWISE:
        return statistic, xp.ones(shape, dtype=dtype, device=device) / c.damping  # 1/lam
    return statistic, damped_inverse_init(statistic, c.damping)  # I/lam


def _heavy_ball(xp: Any, c: MBFConfig, m: Array, g: Array) -> Array:
    return c.momentum * m + g  # m <- mu m + g (raw gradient, no dampening)


def _block_statistic(xp: Any, c: MBFConfig, kind: str, g: Array) -> Array:
    r"""The mini-block statistic of a gradient in block layout: :math:`g_b g_b^\top` per conv block,
    (O, C, q) -> (O, C, q, q); :math:`g \odot g` for block size 1; :math:`H_g H_g^\top/(I+1)` for an
    FC group (``columns_avg``), or the authors' chunks (:func:`_faithful_chunk_statistic`)."""
    if kind == CONV:
        return xp.expand_dims(g, axis=-1) * xp.expand_dims(g, axis=-2)  # g_b g_b^T
    if kind == ELEMENTWISE:
        return g * g
    if c.fc_blocks == "official_chunks":
        return _faithful_chunk_statistic(xp, g)
    return (g @ g.mT) / g.shape[-1]  # H_g H_g^T / (I+1)


def _faithful_chunk_statistic(xp: Any, h: Array) -> Array:
    r"""B1, the authors' FC statistic :math:`R^\top R/(I+1)` with :math:`R` the row-major reshape of
    :math:`H` (O, I+1) to (I+1, O): a raw ``view``, not a transpose (spec ``mbf.md`` 2.2 step 3)."""
    rows = xp.reshape(h, (h.shape[1], h.shape[0]))
    return (rows.mT @ rows) / h.shape[1]


def _ema_statistic(xp: Any, c: MBFConfig, kind: str, statistic: Array, g: Array) -> Array:
    return c.b2 * statistic + (1.0 - c.b2) * _block_statistic(xp, c, kind, g)  # F <- rho F + (1-rho) stat(g)


def _inverse(xp: Any, c: MBFConfig, kind: str, statistic: Array, previous: Array) -> tuple[Array, Array]:
    r""":math:`(F_b + \lambda_b I)^{-1}` of a stack of blocks and which failed: symmetrised, the
    damping raised to the precision floor (B2, B6; :func:`precond_ref.linalg.damped_inverse_stable`),
    or the authors' plain inverse (:func:`_faithful_inverse`); for block size 1 the reciprocal of
    each entry (:func:`_elementwise_inverse`)."""
    if kind == ELEMENTWISE:
        return _elementwise_inverse(xp, c, statistic, previous)
    if c.mode == "faithful":
        return _faithful_inverse(statistic, c.damping, previous)
    return damped_inverse_stable(statistic, c.damping, previous)


def _faithful_inverse(matrices: Array, damping: Any, previous: Array) -> tuple[Array, Array]:
    r"""B2/B6, the authors' plain ``inv``\ :math:`(F + \lambda I)`, not symmetrised and without the
    precision floor (the block-wise non-finite fallback is kept; :func:`precond_ref.linalg.damped_inverse`)."""
    return damped_inverse(matrices, damping, previous)


def _elementwise_inverse(xp: Any, c: MBFConfig, statistic: Array, previous: Array) -> tuple[Array, Array]:
    r""":math:`1/(v + \lambda)` element-wise where :math:`v` is finite, ``previous`` elsewhere; and
    the entries that were not finite (the block-size-1 limit of the damped inverse, B4)."""
    finite = xp.isfinite(statistic)
    safe = xp.where(finite, statistic, xp.zeros_like(statistic))
    new = 1.0 / (safe + c.damping)
    return xp.where(finite, new, previous), xp.logical_not(finite)


def _precondition(xp: Any, c: MBFConfig, kind: str, inverse: Array, m: Array) -> Array:
    r""":math:`D_b = F_b^{-1} m_b` per mini-block: (O, C, q, q) times (O, C, q) for a conv,
    :math:`F^{-1} \odot m` for block size 1, :math:`F^{-1} H_m` for an FC group (``columns_avg``),
    or the authors' chunks (:func:`_faithful_chunk_precondition`)."""
    if kind == CONV:
        return (inverse @ xp.expand_dims(m, axis=-1))[..., 0]
    if kind == ELEMENTWISE:
        return inverse * m
    if c.fc_blocks == "official_chunks":
        return _faithful_chunk_precondition(xp, inverse, m)
    return inverse @ m


def _faithful_chunk_precondition(xp: Any, inverse: Array, h: Array) -> Array:
    r"""B1, the authors' FC direction: every row :math:`r` of :math:`R_m` = row-major reshape of
    :math:`H_m` to (I+1, O) becomes :math:`F^{-1} r`; the rows are reshaped back to (O, I+1)."""
    rows = xp.reshape(h, (h.shape[1], h.shape[0]))
    return xp.reshape(rows @ inverse.mT, tuple(h.shape))


def _quadratic(xp: Any, c: MBFConfig, d: Array, m: Array) -> Array:
    r""":math:`\langle D, m\rangle = \sum D_{j\ldots} m_{j\ldots}` of a layer, the quadratic of its KL
    clip (B7), as the dot product of the flattened arrays."""
    return xp.reshape(d, (-1,)) @ xp.reshape(m, (-1,))  # <D, m>


def _step_size(xp: Any, c: MBFConfig, quadratics: Array, lr: Array, minus_lr: Array) -> Array:
    r""":math:`-\alpha_i \nu` of each layer of a stack, from their :math:`\langle D, m\rangle` (B7;
    :func:`precond_ref.linalg.kl_clip_of_quadratic`)."""
    return minus_lr * kl_clip_of_quadratic(xp, quadratics, lr, c.kl_clip)  # nu = min(1, sqrt(kappa / (alpha^2 <D, m>)))


def _step(xp: Any, c: MBFConfig, size: Array, d: Array) -> Array:
    return size * d  # -alpha_i nu D (nu = 1 without the clip, and for the diagonal rule)


def _decay(xp: Any, c: MBFConfig, lr: Array) -> Array:
    return lr * c.weight_decay  # alpha_i wd


def _decayed(xp: Any, c: MBFConfig, step: Array, w: Array, decay: Array) -> Array:
    return step - decay * w  # w <- (1 - alpha_i wd) w - alpha_i nu D


def _diagonal_rule(xp: Any, c: MBFConfig, s: DiagonalState, g: Array, correction: Array) -> tuple[Array, DiagonalState]:
    """The authors' Adam-like rule for conv biases and normalisation parameters, element-wise: the
    direction :math:`D` and the state after the step."""
    a = c.momentum * s.ema + (1.0 - c.momentum) * g  # a <- mu a + (1 - mu) g
    tracked = a if c.diagonal_second_moment == "momentum" else g
    v = c.diagonal_b2 * s.second_moment + (1.0 - c.diagonal_b2) * (tracked * tracked)  # v <- b2' v + (1 - b2') a^2
    return a / (c.diagonal_eps + xp.sqrt(v / correction)), DiagonalState(a, v)  # D = a / (eps + sqrt(v / (1 - b2'^(i+1))))


def _bias_correction(xp: Any, beta: Any, step: Any) -> Array:
    r""":math:`1 - \beta^{i+1}` (``step`` = :math:`i + 1`) as ``-expm1((i+1) log β)``: no cancellation
    for β near 1 in float32 (the authors form it in float64 on the host); log 0 = -inf gives 1 for β = 0."""
    if hasattr(beta, "shape"):
        log_beta = xp.log(beta)
    else:
        log_beta = math.log(beta) if beta > 0.0 else -math.inf
    return -xp.expm1(step * log_beta)


def _diagonal_correction(xp: Any, c: MBFConfig, t: Any) -> Array:
    return _bias_correction(xp, c.diagonal_b2, t.step)  # 1 - b2'^(i+1), t.step = i + 1


def _warm_start_mean(xp: Any, c: MBFConfig, mean: Array, statistic: Array, j: Array) -> Array:
    r"""The running mean of the warm start after its :math:`j`-th gradient (spec ``mbf.md`` 2.5)."""
    weight = 1.0 / j
    return (1.0 - weight) * mean + weight * statistic  # F <- ((j-1)/j) F + (1/j) stat(g_j)


def _schedule(c: MBFConfig) -> tuple[int, tuple[Callable[[Any], Any], ...]]:
    r"""The authors' intervals (spec ``mbf.md`` 2.2): the statistics on the steps :math:`i \bmod T_1 = 0`
    (an interval), and for each share :math:`p` of the :math:`P` = ``refresh_phases`` shares of a stack
    of equal blocks the predicate of its inverses' refresh, :func:`_inverse_due`."""
    return c.statistics_every, tuple((lambda i, p=p: _inverse_due(c, p, i)) for p in range(c.refresh_phases))


def _inverse_due(c: MBFConfig, p: int, i: Any) -> Any:
    r"""Whether share :math:`p` refreshes its inverses on step :math:`i` (a host int or a 0-D array):
    every statistics step of the warm-up :math:`i \le T_2`, then :math:`i \bmod T_2 = \lfloor p T_2 / P
    \rfloor`, so each block is refreshed once every :math:`T_2` steps and the shares take turns.
    :math:`P = 1` is the authors' ``(i <= T2 and i % T1 == 0) or i % T2 == 0`` (M-I10)."""
    t1, t2 = c.statistics_every, c.precondition_every
    return ((i <= t2) & (i % t1 == 0)) | (i % t2 == (p * t2) // c.refresh_phases)


_RULE = PartsRule(
    name="mbf", init_part=_init_part, momentum=_heavy_ball, statistic=_block_statistic, ema=_ema_statistic, inverse=_inverse,
    direction=_precondition, quadratic=_quadratic, step_size=_step_size, step=_step, decay=_decay, decayed=_decayed,
    diagonal=_diagonal_rule, correction=_diagonal_correction, warm_start=_warm_start_mean, schedule=_schedule, State=DiagonalState,
)


def mbf(
    learning_rate: Optional[ScalarOrSchedule] = None,
    damping: float = 1e-3,
    momentum: float = 0.9,
    b2: float = 0.9,
    weight_decay: float = 0.0,
    statistics_every: int = 10,
    precondition_every: int = 100,
    fc_blocks: Optional[str] = None,
    diagonal_b2: float = 0.999,
    diagonal_eps: float = 1e-8,
    diagonal_second_moment: str = "momentum",
    max_block_dim: Optional[int] = None,
    kl_clip: Optional[float] = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
    block_size: Optional[int] = None,
    refresh_phases: Optional[int] = None,
) -> MBFTransform:
    r"""MBF, the mini-block Fisher method: block-diagonal empirical Fisher with small dense blocks.

    Per step :math:`i` (updates already applied) with the mini-batch gradient :math:`g`, the
    heavy-ball momentum :math:`m \leftarrow \mu m + g` and, for each mini-block :math:`b` of a
    layer with gradient slice :math:`g_b`,

    .. math::

        F_b &\leftarrow \rho F_b + (1-\rho)\, g_b g_b^\top
            &&\text{if } i \bmod T_1 = 0, \\
        F_b^{-1} &\leftarrow (F_b + \lambda I)^{-1}
            &&\text{if } (i \le T_2 \wedge i \bmod T_1 = 0) \vee i \bmod T_2 = 0, \\
        w_b &\leftarrow (1 - \alpha_i\,\mathrm{wd})\, w_b - \alpha_i\, F_b^{-1} m_b .

    Mini-blocks: a conv weight (O, C, s...) has one :math:`q\times q` block per (output, input)
    channel pair, :math:`q=\prod s_i`; a fully connected layer :math:`H=[W \mid b]\in
    \mathbb R^{O\times(I+1)}` (bias as the homogeneous column) has one shared :math:`O\times O`
    matrix, averaged over its :math:`I+1` mini-blocks (see ``fc_blocks``). Every other leaf (conv
    biases, normalisation scales/shifts, unpaired 1-D and 0-D leaves) uses the authors' diagonal
    rule :math:`a \leftarrow \mu a + (1-\mu) g`, :math:`v \leftarrow \beta_2' v + (1-\beta_2') a^2`,
    :math:`D = a / (\epsilon + \sqrt{v/(1-\beta_2'^{\,i+1})})`, :math:`w \leftarrow (1-\alpha_i
    \mathrm{wd}) w - \alpha_i D`. Statistics use the mini-batch-averaged gradient (not
    per-example gradients), and are applied to the momentum. In the heavily damped regime the step
    is about :math:`(\alpha/\lambda) m`: :math:`\alpha/\lambda` is the effective heavy-ball rate.

    Parameters
    ----------
    learning_rate:
        :math:`\alpha`, a positive number or a schedule ``count -> value``. The authors used 1e-5
        (MNIST autoencoder, :math:`\lambda=3\cdot10^{-4}`) and 3e-5 (CIFAR-100 VGG16,
        :math:`\lambda=3\cdot10^{-3}`). ``None``: 1e-3 in principled mode, the rate of the sweep in
        ``docs/defaults.md`` (near the best on three small problems, where 1e-5 makes about 0.02 of
        Adam's progress on a small CNN; the KL clip, B7, bounds its steps); 1e-5 in faithful mode,
        their MNIST value, and with the default damping the effective heavy-ball rate
        :math:`\alpha/\lambda = 10^{-2}` of their CIFAR-100 run.
    damping:
        :math:`\lambda > 0`, added to every block before inversion.
    momentum:
        :math:`\mu \in [0, 1)`, heavy ball on the raw gradient (no dampening); also the EMA
        coefficient of the diagonal rule's first moment :math:`a`.
    b2:
        :math:`\rho \in [0, 1)`, EMA decay of the block statistics.
    weight_decay:
        Decoupled, on every leaf (biases and norm parameters included; mask them out if needed).
    statistics_every:
        :math:`T_1`: statistics are updated when ``count % T1 == 0``.
    precondition_every:
        :math:`T_2`: inverses are refreshed when ``count % T2 == 0``, and also on every
        statistics step up to ``count <= T2`` (the authors' warm-up of the inverse schedule).
    fc_blocks:
        ``"columns_avg"`` (principled default): mini-block = one column of :math:`H` (the outgoing
        weights of an input unit), all columns share :math:`F = \mathrm{EMA}(H_g H_g^\top/(I+1))`
        and :math:`D_H = (F+\lambda I)^{-1} H_m`. ``"official_chunks"`` (faithful default): the
        authors' code, chunks of a row-major reshape of :math:`H` to :math:`(I+1, O)`.
    diagonal_b2, diagonal_eps:
        :math:`\beta_2'` and :math:`\epsilon` of the diagonal rule.
    diagonal_second_moment:
        ``"momentum"`` (the authors: :math:`v` tracks :math:`a^2`) or ``"gradient"`` (:math:`g^2`).
    max_block_dim:
        FC layers with more than this many outputs use the block-size-1 limit
        :math:`D = m/(v+\lambda)`, :math:`v = \mathrm{EMA}_\rho(g^2)`, instead of an
        :math:`O\times O` matrix (or its ``block_size`` blocks). ``None``: unlimited (principled
        mode bounds long axes by ``block_size`` instead).
    block_size:
        Principled, ``columns_avg`` only: an FC layer's output axis longer than this is cut into
        chunks of ``block_size`` rows (the last one shorter), each with its own
        :math:`b\times b` statistic and inverse: the diagonal blocks of the :math:`O\times O`
        statistic, a finer member of the same mini-block family (spec README section 6). The
        equal-size blocks of all layers are inverted by one batched call. ``None``: 128 (chosen by
        cost and quality, ``docs/methods/mbf.md``, "Long axes, intervals and cost"); any value at
        least every layer's output size gives one :math:`O\times O` block per layer.
    refresh_phases:
        :math:`P`: after the warm-up, the blocks of each equal-size stack are split into
        :math:`P` contiguous shares and share :math:`p` refreshes its inverses on the calls with
        ``calls % T2 == (p T2) // P``, so each inverse is still refreshed once per :math:`T_2`
        calls but no call pays for all of them. ``None``: :math:`\max(1, T_2 // T_1)` in
        principled mode (one share per statistics step), 1 (all at once) in faithful mode.
    kl_clip:
        :math:`\kappa`: each block's step :math:`\alpha D` is scaled by :math:`\nu = \min(1,
        \sqrt{\kappa/(\alpha^2\langle D, m\rangle)})` (K-FAC's KL clipping, B7;
        :func:`precond_ref.linalg.kl_clip_factor`). ``None``: 1e-4 in principled mode, off (0) in
        faithful mode; 0 turns it off.
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``; see :func:`precond_ref.engine.build_transform`.

    Returns
    -------
    MBFTransform
        ``init(params)``, ``update(grads, state, params)`` (``params`` needed when
        ``weight_decay > 0``), and ``warm_start(state, grads_batches)``: replaces every block
        statistic :math:`F` by the mean of the block statistics of the given gradient trees (the
        authors compute them at the initial parameters with labels sampled from the model's
        predictive distribution), leaving everything else unchanged. Non-finite gradient trees
        are skipped.

    Notes
    -----
    Weights and biases are paired from tree paths: sibling ``weight``/``bias`` (out-first, torch)
    or ``kernel``/``bias`` (out-last, Flax, transposed internally). State per group: ``momentum``
    (block layout: :math:`[W\mid b]` as (O, I+1), conv as (O, C, q)), ``statistic``, ``inverse``
    (an FC layer cut into blocks: (full, b, b), plus ``statistic_tail`` / ``inverse_tail`` for
    the shorter last block),
    ``failures`` (0-D int32: how many of this entry's preconditioner updates were discarded
    because their result was not usable (not finite); the previous preconditioner was kept. Each
    block whose statistic or inverse update was discarded counts one, block size 1 each entry; a
    damping raised by B6 is not counted, its result is used); diagonal-rule
    leaves hold ``ema`` (:math:`a`) and ``second_moment`` (:math:`v`).

    On an inverse step the blocks of all layers with the same block size (FC row chunks of one
    size, convs with one kernel size) that are due are inverted by one batched call: with
    ``refresh_phases`` P, one call for the due shares where the step is known on the host (all of
    them in the warm-up, one after it), one per due share under ``jit`` without it. No step reads
    a device value (the inverse is branch-free; the intervals are host decisions given
    ``update(..., step=)``); on torch the batched inverse leaves its status on the device: LU by
    ``inv_ex`` (:func:`precond_ref.linalg.inverse`), except principled mode on CUDA, which inverts its
    symmetric positive definite blocks by Cholesky (:func:`precond_ref.linalg.spd_inverse`), so that
    the inverse steps too can be captured in a CUDA graph. Faithful mode keeps the authors' LU of
    the unsymmetrised matrix everywhere.

    ``mode="faithful"`` reproduces ``mbngd_update`` + ``update_parameter`` of the authors' code
    (achrafba96/mbf ``b0ace6e``, algorithm ``MBNGD-all-to-one-Avg``) on finite inputs. Deviations
    of the default ``mode="principled"`` (spec ``mbf.md`` section 2.4):

    * B1: FC mini-blocks are the columns of :math:`[W \mid b]` (left-sided :math:`(F+\lambda
      I)^{-1}H_m`); the authors reshape :math:`[W\mid b]` row-major to :math:`(I+1, O)`, which is a
      block structure only when :math:`O = I+1` (then right-sided). ``fc_blocks`` selects either.
    * B2: :math:`F+\lambda I` is symmetrised before and its inverse after the batched ``inv``
      (faithful: plain ``inv``). Both modes reject a non-finite inverse or statistic block-wise,
      keep the previous value (:math:`I/\lambda` before the first success) and count a failure.
    * B6: the damping of each block is raised to the precision floor of its statistic,
      :math:`\lambda_b = \max(\lambda, 100\,\varepsilon\|F\|_F)`, before the inverse
      (:func:`precond_ref.linalg.damped_inverse_stable`): where :math:`\|F\|/\lambda \gtrsim
      1/(100\varepsilon)` (a gradient spike) the authors' inverse is garbage or singular; here it
      is accurate to 1e-2 and no longer than the exact damped inverse along any direction. A raised
      damping is not a failure (its result is used) and is not counted in ``failures``.
    * B3: state in the compute dtype (float64 for float64 parameters; the authors' models are
      float32). bf16/fp16 parameters keep float32 state in both modes (no backend inverts in bf16).
    * B4: long FC output axes are cut into ``block_size`` blocks (default 128; faithful: one
      :math:`O\times O` block per layer), and the inverse refreshes are spread over
      ``refresh_phases`` shares (default :math:`T_2/T_1`; faithful: all at once). FC layers with
      more than ``max_block_dim`` outputs use the block-size-1 limit instead (default unlimited).
    * B5: ``damping > 0`` is required (both modes).
    * B7: the step of every block (not the diagonal rule's) is clipped, per layer, to
      :math:`\alpha^2\langle D, m\rangle = \alpha^2 m^\top(F+\lambda I)^{-1}m \le \kappa`
      (``kl_clip``, default 1e-4; Ba et al. 2017). Between refreshes, directions the statistic has
      not seen get the gain :math:`1/\lambda`; with :math:`\alpha/\lambda \gtrsim 1` the heavy
      ball then diverges (torch's ``test_optim`` problem at :math:`\alpha=\lambda=10^{-3}`: loss
      149 to 2.5e21 in 20 steps). In the authors' regime (:math:`\alpha \approx 10^{-5}`) the clip
      never acts; the bound on :math:`m^\top(F+\lambda I)^{-1}m` is :math:`\kappa/\alpha^2`, so with
      large learning rates (:math:`\alpha \gtrsim 10^{-2}`) on a well-damped problem it throttles
      the step: raise ``kl_clip`` with :math:`\alpha^2` there, or set it to 0.
    * E1 (both modes): a 2-D weight without a bias uses :math:`H = W`. E2: any conv with
      ndim >= 3. E3: every other leaf uses the diagonal rule (the authors' code exits).
    * 1x1 convs (:math:`q = 1`) use the element-wise form :math:`m/(v+\lambda)`, identical to the
      :math:`1\times1` block inverse.
    * The diagonal rule's first moment :math:`a` is stored only for diagonal-rule leaves, and the
      heavy-ball momentum only for block leaves (the authors keep both for every leaf; each is
      unused on the other kind).

    References
    ----------
    Bahamou, Goldfarb, Ren. "A Mini-Block Fisher Method for Deep Neural Networks". AISTATS 2023,
    PMLR 206:9191-9220, arXiv:2202.04124. Authors' code: github.com/achrafba96/mbf
    (``mbf/train.py``: ``mbngd_update``, ``mbngd_if_inverse``, ``get_warm_start``).
    """
    faithful = check_mode(mode)
    if learning_rate is None:
        learning_rate = MBF_LEARNING_RATE[mode]
    check_learning_rate("learning_rate", learning_rate)
    check_positive("damping", damping)
    check_unit_interval("momentum", momentum)
    check_unit_interval("b2", b2)
    check_nonnegative("weight_decay", weight_decay)
    check_positive_int("statistics_every", statistics_every)
    check_positive_int("precondition_every", precondition_every)
    if fc_blocks is not None:
        check_choice("fc_blocks", fc_blocks, ("columns_avg", "official_chunks"))
    check_unit_interval("diagonal_b2", diagonal_b2)
    check_positive("diagonal_eps", diagonal_eps)
    check_choice("diagonal_second_moment", diagonal_second_moment, ("momentum", "gradient"))
    check_optional(check_positive_int, "max_block_dim", max_block_dim)
    check_optional(check_nonnegative, "kl_clip", kl_clip)
    check_optional(check_positive_int, "block_size", block_size)
    check_optional(check_positive_int, "refresh_phases", refresh_phases)
    if refresh_phases is not None and refresh_phases > precondition_every:
        raise ValueError(
            f"refresh_phases must be at most precondition_every ({precondition_every}): each phase "
            f"refreshes on its own call of the interval, got {refresh_phases!r}"
        )
    fc_blocks = mode_default(fc_blocks, faithful, "official_chunks", "columns_avg")
    chunks = fc_blocks == "official_chunks"
    if block_size is not None and (faithful or chunks):
        raise ValueError(
            f"block_size={block_size!r} needs mode='principled' with fc_blocks='columns_avg' (the authors' "
            "code and its chunked FC statistic have one O x O block per layer)"
        )
    if faithful and refresh_phases not in (None, 1):
        raise ValueError(f"refresh_phases={refresh_phases!r} needs mode='principled' (the authors refresh every inverse at once)")
    block_size = mode_default(block_size, faithful or chunks, None, _BLOCK_SIZE)  # None: one O x O block per FC layer
    refresh_phases = mode_default(refresh_phases, faithful, 1, max(1, precondition_every // statistics_every))
    kl_clip = mode_default(kl_clip, faithful, 0.0, _KL_CLIP)
    config = MBFConfig(
        learning_rate, damping, momentum, b2, weight_decay, diagonal_b2, diagonal_eps, diagonal_second_moment,
        kl_clip, fc_blocks, mode, statistics_every, precondition_every, refresh_phases,
    )  # fmt: skip
    *transform, warm_start = parts_transform(
        _RULE, config, max_block_dim=max_block_dim, block_size=block_size, on_nonfinite=on_nonfinite,
        clips=not is_zero(kl_clip), decays=not is_zero(weight_decay),  # an array may be traced: always applied
    )  # fmt: skip
    result = MBFTransform(*transform)
    result.warm_start = warm_start
    return result
