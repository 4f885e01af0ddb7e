r"""Sketchy (FD-Shampoo) and S-AdaGrad: Frequent Directions preconditioning (Feinberg et al., NeurIPS 2023).

Both methods replace a full second-moment statistic by a rank-k Frequent Directions sketch plus its
escaped mass (:mod:`precond_ref.sketch`), so a d-dimensional axis costs O(dk) memory instead of
O(d²):

* :func:`s_adagrad` -- full-matrix AdaGrad on the flattened parameter, with the statistic sketched;
* :func:`sketchy` -- Shampoo with each Kronecker factor sketched, composed as in the authors'
  tearfree optimizer (graft -> sketched direction with grafted norm -> momentum -> weight decay ->
  learning rate);
* :func:`scale_by_sketchy` -- the bare sketched Shampoo direction, for optax-style composition.

The rules below are written for one stack of blocks (a leading axis); the engine
(:mod:`precond_ref.engine.axes`) cuts each axis into runs of equal blocks, stacks the equal runs of
all leaves and runs the rules.
Sketchy's step (Algorithm 2, FD-Shampoo, composed as the authors' tearfree optimizer, spec
``fd_shampoo.md`` §2.3-2.4), for the merged gradient G of order N, each run of blocks of its mode-n
unfolding :math:`G_{(n)}`::

    1  v_t = β_g v + (1-β_g) G²,  D_g = G / √(v_t + ε_g)                  _graft
    2  (U, σ, ρ, w, w_⊥) = FD([√β U diag(σ), G_(n)])   (the runs due)       _sketch_refresh
    3  P(G) = G ×_1 P_1 ⋯ ×_N P_N,  P_n x = U diag(w) Uᵀx + w_⊥(x − UUᵀx)   _precondition
    4  U_t = P(G) ‖D_g‖_F / ‖P(G)‖_F  (D_g before start_preconditioning_step)  _grafted, _started
    5  m_t = μ m + U_t,  U_t ← U_t + μ m_t (Nesterov) or m_t               _sketchy_finish, _momentum
    6  ΔW = −η_t (U_t + λ W)                                               _sketchy_finish

with FD (:func:`precond_ref.sketch.fd_update`, in the units of ``sketch._in_units``, the cutoff of
``sketch._shrink``, the weights of ``sketch._weights``, the previous sketch kept by
``sketch._accepted`` where the step is not finite): the SVD :math:`P \operatorname{diag}(s) Q^\top` of
:math:`Z = [\sqrt\beta\, U \operatorname{diag}(\sigma), X]`, :math:`c = s_k`, :math:`\sigma' =
\sqrt{s_{:k}^2 - c^2}`, :math:`U' = P_{:,:k}`, :math:`\rho' = \gamma\rho + c^2`, :math:`w =
(\sigma'^2 + \rho' + \epsilon)^{-1/(2N)}`, :math:`w_\perp = (\rho' + \epsilon)^{-1/(2N)}`. S-AdaGrad's
step (Algorithm 1) on the flattened parameter x and its gradient g::

    1  (U, σ, ρ, w, w_⊥) = FD([√β U diag(σ), g]),  P(g) = (Ḡ + (ρ + δ + ε) I)^{-1/2} g    _adagrad_refresh
       between refreshes P(g) = (S + D)^{-1/2} g, g's own mass on the sketch's frame       _adagrad_keep
    2  m_t = μ m + P(g),  Δx = −η_t m_t − η_t λ x                                          _adagrad_finish
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

from .._backend import is_number, is_zero, ratio_or_zero
from ..blocking import merge_small_dims, spread_schedule
from ..engine.axes import AxesRule, LeafPlan, axes_transform, leaf_plan
from ..linalg import block_mode_products
from ..sketch import fd_apply, fd_apply_with_own_mass, fd_init, fd_update, fd_update_apply
from ..transform import (ScalarOrSchedule, Transform, check_bool, check_choice, check_int, check_interval,
                         check_learning_rate, check_mode, check_nonnegative, check_optional, check_positive_int,
                         check_principled_only)

__all__ = ["sketchy", "s_adagrad", "scale_by_sketchy", "SketchyConfig", "SAdaGradConfig", "PRINCIPLED_BLOCK_SIZE",
           "PRINCIPLED_PRECONDITION_EVERY"]

Array = Any
_GRAFTS = ("rmsprop", "sgd", "none")
#: The decompositions each method's ``decomposition`` takes (None: the mode's default).
_SKETCHY_DECOMPOSITIONS = (None, "auto", "svd", "gram", "incremental", "incremental_gram", "subspace")
_S_ADAGRAD_DECOMPOSITIONS = (None, "auto", "incremental_secular")
#: Principled defaults of :func:`sketchy` (docs/methods/sketchy.md, "Long axes, intervals and cost"):
#: merged axes longer than this are split into blocks with their own sketches, and the sketches are
#: updated every this many steps, each block in its own phase of the interval.
PRINCIPLED_BLOCK_SIZE = 1024
PRINCIPLED_PRECONDITION_EVERY = 3
#: Principled default of :func:`s_adagrad`'s ``precondition_every``.
S_ADAGRAD_PRECONDITION_EVERY = 1


# --------------------------------------------------------------------------------------------
# The state: a sketch per block


class _Sketch(NamedTuple):
    """One Frequent Directions sketch (:mod:`precond_ref.sketch`), or a stack of them for a run of
    equal blocks (leading axis): :math:`\\bar L = U \\operatorname{diag}(\\sigma^2) U^\\top`, the
    escaped mass :math:`\\rho` = ``escaped_root**2``, and the weights :math:`w, w_\\perp` of
    :math:`(\\bar L + \\rho I + \\epsilon I)^a` on the retained directions and on their complement."""

    basis: Array
    singular_values: Array
    escaped_root: Array
    basis_weights: Array
    complement_weight: Array


class _State(NamedTuple):
    """One leaf's state (Sketchy and S-AdaGrad), stored as the entries of
    :func:`precond_ref.tree.to_entries`: ``sketches/{n}/{j}/basis`` ... for ``sketches[n][j]``, the
    sketch of run ``j`` of axis ``n``'s blocks (:class:`~precond_ref.engine.axes.LeafPlan`);
    ``failures`` (0-D int32: how many of this entry's preconditioner updates were discarded because
    their result was not usable (not finite); the previous preconditioner was kept, one count per
    block whose sketch update was not finite); the graft's :math:`v` and the momentum :math:`m`
    (absent fields are None)."""

    sketches: tuple = ()
    failures: Optional[Array] = None
    graft_second_moment: Optional[Array] = None
    momentum: Optional[Array] = None


# --------------------------------------------------------------------------------------------
# Validation


def _check_shared(rank: Any, b2: Any, precondition_every: Any, spread_refresh: Any, block_size: Any, mode: Any) -> bool:
    """The arguments of both methods checked; whether ``mode`` is ``"faithful"``."""
    check_positive_int("rank", rank)
    check_interval("b2", b2, 0.0, 1.0, low_closed=False, high_closed=True)
    if precondition_every is not None:
        check_positive_int("precondition_every", precondition_every, allow_callable=True)
    check_optional(check_bool, "spread_refresh", spread_refresh)
    check_optional(check_positive_int, "block_size", block_size)
    return check_mode(mode)


def _resolve_schedule(
    faithful: bool, block_size: Optional[int], precondition_every: Any, spread_refresh: Optional[bool],
    principled_block_size: Optional[int], principled_every: int,
) -> tuple[Optional[int], tuple]:
    """``(block_size, dues)`` with the mode's defaults for the None arguments: the authors' in faithful
    mode (unblocked, every step, every block on the same steps), else ``principled_block_size``,
    ``principled_every`` and refreshes spread over the interval; ``dues`` the refresh predicate of
    each phase (:func:`precond_ref.blocking.spread_schedule`)."""
    every = (1 if faithful else principled_every) if precondition_every is None else precondition_every
    block_size = principled_block_size if block_size is None and not faithful else block_size
    return block_size, spread_schedule(every, not faithful and spread_refresh is not False)


# --------------------------------------------------------------------------------------------
# Sketchy


class SketchyConfig(NamedTuple):
    """Sketchy's validated hyperparameters, the mode's defaults resolved (:func:`sketchy`);
    ``learning_rate`` None for :func:`scale_by_sketchy`, ``fd`` the FD step's options
    (:func:`precond_ref.sketch.fd_update`), ``dues`` the refresh predicate of each phase."""

    learning_rate: Any
    rank: int
    fd: dict
    dues: tuple
    block_size: Optional[int]
    merge_dims: int
    max_precondition_dim: int
    precondition_1d: bool
    faithful: bool
    start_preconditioning_step: int
    graft: str
    graft_b2: Any
    graft_eps: Any
    momentum: Any
    nesterov: bool
    momentum_ema: bool
    weight_decay: Any
    has_momentum: bool
    has_weight_decay: bool


def _sketchy_plan(c: SketchyConfig, shape: tuple[int, ...], first_phase: int = 0) -> Optional[LeafPlan]:
    """None for graft-only leaves (spec §2.3 step 1), else the sketch layout of the merged axes."""
    if c.graft != "none":  # the authors skip preconditioning only when a graft exists
        blocked = [d if c.block_size is None else min(d, c.block_size) for d in shape]
        if (not c.precondition_1d and len(shape) <= 1) or any(d > c.max_precondition_dim for d in blocked):
            return None
    merged = merge_small_dims(shape, c.merge_dims)
    return leaf_plan(merged, c.rank, c.block_size, len(c.dues), first_phase)


def _graft(xp: Any, c: SketchyConfig, g: Array, v: Array) -> tuple[Array, Array]:
    """Step 1 for a leaf, or for leaves joined end to end: ``(v_t, D_g)``."""
    v = _second_moment(xp, v, g, c.graft_b2)  # v_t = β_g v_{t-1} + (1-β_g) G_t²
    return v, _rmsprop_graft(xp, g, v, c.graft_eps)  # D_g = G_t / √(v_t + ε_g)


def _second_moment(xp: Any, previous: Array, g: Array, decay: Any) -> Array:
    """``decay * previous + (1 - decay) * g**2``, or the sum ``previous + g**2`` when ``decay == 1``.

    ``(1 - decay) g`` is formed before the second factor of g, so a float32 gradient entry up to
    about 1.8e19 / sqrt(1 - decay) gives a finite moment (as torch's Adam), where ``g * g`` alone
    overflows at 1.8e19.
    """
    if isinstance(decay, numbers.Real):
        return previous + g * g if decay == 1.0 else ((1.0 - decay) * g) * g + decay * previous
    return xp.where(decay == 1.0, previous + g * g, ((1.0 - decay) * g) * g + decay * previous)


def _rmsprop_graft(xp: Any, g: Array, v: Array, graft_eps: Any) -> Array:
    """:math:`D_g = G / \\sqrt{v + \\epsilon_g}` where :math:`v > 0`, else 0 (:math:`v = 0` only
    where :math:`G = 0`, or its square underflowed: no 0/0 when :math:`\\epsilon_g = 0`). An
    :math:`\\epsilon_g` that is a normal number of G's dtype (the default 1e-23 in float32 and
    float64) makes every denominator positive: then the formula alone, three operations a leaf
    instead of six. It differs from the guarded form only where :math:`v = 0`: a zero G gives a zero
    of G's sign, and a G whose square underflowed (:math:`|G| \\lesssim 10^{-21}` in float32 at
    :math:`\\beta_g = 0.999`) gives :math:`G/\\sqrt{\\epsilon_g}`, the formula's value, not 0."""
    if is_number(graft_eps) and graft_eps >= float(xp.finfo(g.dtype).smallest_normal):
        return g / xp.sqrt(v + graft_eps)
    positive = v > 0.0
    return xp.where(positive, g / xp.sqrt(xp.where(positive, v, xp.ones_like(v)) + graft_eps), xp.zeros_like(g))


def _sketch_refresh(xp: Any, c: SketchyConfig, sketch: _Sketch, x: Array, order: int, accept: Any, first: bool) -> tuple:
    """Step 2 on a stack of runs of a leaf of ``order`` N (merged axes), the weights for the exponent
    :math:`a = -1/(2N)` of each factor in the Kronecker root, the previous sketch where ``accept`` is
    False: ``(sketch, ok)``. On a first call (``first``) principled mode lets the FD step check for
    empty sketches and decompose X alone (deviation K8)."""
    new, ok = fd_update(xp, sketch._asdict(), x, exponent=-1.0 / (2 * order), accept=accept,  # FD([√β U diag(σ), X])
                        maybe_empty=first and not c.faithful, **c.fd)
    return _Sketch(**new), ok


def _precondition(xp: Any, c: SketchyConfig, gs: Sequence[Array], sketches: Sequence[tuple]) -> list[Array]:
    """Step 3 for leaves, each G in its merged shape with its ``sketches[n][j]`` (run j of axis n):
    :math:`P(G)`, each :math:`P_n` block-diagonal, of the blocks' :func:`precond_ref.sketch.fd_apply`
    (:func:`precond_ref.linalg.block_mode_products`: the equal blocks of all leaves at each axis in
    one call)."""
    factors = [[[(s.basis, s.basis_weights, s.complement_weight) for s in axis] for axis in leaf] for leaf in sketches]

    def p_n(u: Array, w: Array, w_perp: Array, x: Array) -> Array:
        return fd_apply(xp, dict(basis=u, basis_weights=w, complement_weight=w_perp), x)  # U diag(w) Uᵀ x + w_⊥ (x − U Uᵀ x)

    return block_mode_products(xp, gs, factors, p_n)  # P(G) = G ×_1 P_1 ⋯ ×_N P_N


def _grafted(xp: Any, graft_norm: Array, norm: Array) -> Array:
    """Step 4's scale :math:`\\lVert D_g\\rVert_F / \\lVert P(G)\\rVert_F` of :math:`P(G)`, 0 where
    :math:`P(G) = 0`, from the norms (of one leaf, or of many leaves stacked)."""
    return ratio_or_zero(xp, graft_norm, norm)


def _started(xp: Any, c: SketchyConfig, count: Array, u: Array, d_g: Array) -> Array:
    """Step 4 from step ``start_preconditioning_step`` on, the graft's :math:`D_g` before it."""
    if c.start_preconditioning_step == 0:
        return u
    return xp.where(count >= c.start_preconditioning_step, u, d_g)  # U_t = D_g while t < start


def _sketchy_finish(xp: Any, c: SketchyConfig, minus_lr: Any, u: Array, *rest: Array) -> tuple:
    """Steps 5 and 6 for a leaf, or for leaves joined end to end (``rest``: m_{t-1} with momentum,
    then W_t with weight decay): ``(-η_t (U_t + λ W_t), m_t)``, or the step alone."""
    if c.has_momentum:
        u, m = _momentum(xp, u, rest[0], c.momentum, c.nesterov, c.momentum_ema)  # 5
    if c.has_weight_decay:
        u = u + c.weight_decay * rest[-1]  # 6: U_t + λ W_t
    return (minus_lr * u, m) if c.has_momentum else (minus_lr * u,)


def _momentum(xp: Any, u: Array, previous: Array, momentum: float, nesterov: bool, ema: bool) -> tuple[Array, Array]:
    """:math:`m_t = \\mu m_{t-1} + c\\,U` (:math:`c = 1 - \\mu` with ``momentum_ema``, else 1) and
    the direction :math:`c\\,U + \\mu m_t` (Nesterov) or :math:`m_t`: ``(direction, m_t)``."""
    if ema:
        u = u * (1.0 - momentum)
    trace = u + momentum * previous
    return (u + momentum * trace if nesterov else trace), trace


_SKETCHY = AxesRule(
    State=_State, Block=_Sketch, plan=_sketchy_plan, empty=fd_init, refresh=_sketch_refresh, finish=_sketchy_finish,
    precondition=_precondition, graft=_graft, grafted=_grafted, started=_started,
)


def _sketchy_transform(
    *, name, learning_rate, rank, b2, eps, relative_eps, precondition_every, spread_refresh, start_preconditioning_step,
    graft, graft_b2, graft_eps, momentum, nesterov, momentum_ema, weight_decay, merge_dims, max_precondition_dim,
    precondition_1d, block_size, decomposition, tail_decay, mode, on_nonfinite,
) -> Transform:
    """Sketchy's arguments (:func:`sketchy`, :func:`scale_by_sketchy`) checked, its configuration
    with the mode's defaults, and its rule run by the engine."""
    faithful = _check_shared(rank, b2, precondition_every, spread_refresh, block_size, mode)
    check_nonnegative("eps", eps)
    check_bool("relative_eps", relative_eps)
    check_int("start_preconditioning_step", start_preconditioning_step, 0)
    check_choice("graft", graft, _GRAFTS)
    check_interval("graft_b2", graft_b2, 0.0, 1.0, low_closed=False, high_closed=True)
    check_nonnegative("graft_eps", graft_eps)
    check_interval("momentum", momentum, 0.0, 1.0, high_closed=True)
    check_bool("nesterov", nesterov)
    check_bool("momentum_ema", momentum_ema)
    check_nonnegative("weight_decay", weight_decay)
    check_int("merge_dims", merge_dims, 2)
    check_int("max_precondition_dim", max_precondition_dim, 1)
    check_bool("precondition_1d", precondition_1d)
    check_choice("decomposition", decomposition, _SKETCHY_DECOMPOSITIONS)
    check_choice("tail_decay", tail_decay, (None, "b2", "sqrt_b2"))
    if faithful:
        check_principled_only("block_size", block_size is not None, " (the authors' Sketchy has no blocking)", "in")
        check_principled_only("spread_refresh", spread_refresh, " (the authors update every sketch on the same steps)", "in")
    block_size, dues = _resolve_schedule(faithful, block_size, precondition_every, spread_refresh,
                                         PRINCIPLED_BLOCK_SIZE, PRINCIPLED_PRECONDITION_EVERY)
    square_root = tail_decay == "sqrt_b2" or tail_decay is None and faithful  # the authors' default: sqrt(b2)
    # the FD path: the authors' QR-then-SVD in faithful mode (for "svd" too), the fast "auto" in principled
    decomposition = "qr_svd" if faithful and decomposition in (None, "svd") else decomposition or "auto"
    fd_options = dict(
        # the root taken in the step, of b2 cast to the dtype it computes in (not of an array as given)
        decay=b2, tail_decay="sqrt" if square_root else b2, eps=eps, relative_eps=relative_eps,
        cutoff=not faithful, noise_is_mass=faithful, decomposition=decomposition,
    )
    c = SketchyConfig(
        learning_rate, rank, fd_options, dues, block_size, merge_dims, max_precondition_dim, precondition_1d, faithful,
        start_preconditioning_step, graft, graft_b2, graft_eps, momentum, nesterov, momentum_ema, weight_decay,
        not is_zero(momentum) and learning_rate is not None, not is_zero(weight_decay) and learning_rate is not None,
    )
    rule = _SKETCHY._replace(graft=_graft if graft == "rmsprop" else None, grafted=None if graft == "none" else _grafted)
    return axes_transform(rule, c, name=name, on_nonfinite=on_nonfinite)


def sketchy(
    learning_rate: ScalarOrSchedule = 1e-3,
    rank: int = 128,
    b2: float = 0.999,
    eps: float = 1e-7,
    relative_eps: bool = True,
    precondition_every: Union[int, Callable, None] = None,
    start_preconditioning_step: int = 0,
    graft: str = "rmsprop",
    graft_b2: float = 0.999,
    graft_eps: float = 1e-23,
    momentum: float = 0.9,
    nesterov: bool = True,
    momentum_ema: bool = False,
    weight_decay: float = 0.0,
    merge_dims: int = 1024,
    max_precondition_dim: int = 4096,
    precondition_1d: bool = False,
    block_size: Optional[int] = None,
    decomposition: Optional[str] = None,
    tail_decay: Optional[str] = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
    spread_refresh: Optional[bool] = None,
) -> Transform:
    r"""Sketchy (FD-Shampoo): Shampoo with every Kronecker factor kept as a rank-k FD sketch.

    For a parameter merged to an order-N tensor with mode-n unfoldings :math:`G_{(n)}`, each axis
    keeps an FD sketch (:mod:`precond_ref.sketch`) of :math:`L_n = \sum_s \beta^{t-s}
    G_{(n),s} G_{(n),s}^\top` (a discounted sum, no :math:`1-\beta` factor):
    :math:`L_n \approx \bar L_n + \rho_n I` with :math:`\bar L_n = U_n\operatorname{diag}(\sigma_n^2)
    U_n^\top`. The direction is

    .. math::

        P(G) = G \times_1 (\bar L_1 + \rho_1 I + \epsilon_1 I)^{-1/(2N)} \cdots
               \times_N (\bar L_N + \rho_N I + \epsilon_N I)^{-1/(2N)},

    applied in :math:`O(k\cdot\text{numel})` per axis without forming any :math:`d\times d` matrix,
    with :math:`\epsilon_n = \epsilon \max_i(\sigma_{n,i}^2 + \rho_n)` (relative) or :math:`\epsilon`.
    The sketches are updated from the current gradient every ``precondition_every`` steps (gradients
    of other steps are not accumulated); in principled mode each block's sketch in its own phase of
    that interval (``spread_refresh``). Then, as in the authors' tearfree
    optimizer,

    .. math::

        u = P(G)\,\frac{\lVert \mathrm{graft}(G)\rVert_F}{\lVert P(G)\rVert_F}, \quad
        \mathrm{graft}(G) = G / \sqrt{v + \epsilon_g},\ v \leftarrow \beta_g v + (1-\beta_g) G^2,

    (the graft alone before ``start_preconditioning_step``), heavy-ball "trace" momentum
    :math:`m \leftarrow u + \mu m`, :math:`u \leftarrow u + \mu m` (Nesterov) or :math:`u \leftarrow m`,
    then :math:`u \leftarrow u + \lambda w` and :math:`\Delta w = -\eta_t u`.

    Parameters
    ----------
    learning_rate:
        :math:`\eta`, a positive number or a schedule ``count -> value``, applied last. Default 1e-3,
        chosen on small problems (docs/defaults.md). A step is larger than Adam's at the same rate:
        the graft has no bias correction (the first steps are up to :math:`1/\sqrt{1-\beta_g}`, about
        32x, an RMS-normalised gradient) and the trace momentum sums to about :math:`1/(1-\mu)` = 10x
        for a steady gradient; on ``bench``'s reference GPT (6 layers, width 512) this rate diverges
        (docs/defaults.md, "On a GPT").
    rank:
        Sketch rank k per axis (clipped to the axis length; to the block length when blocked).
    b2:
        :math:`\beta \in (0, 1]` of the statistics (1: plain sum, AdaGrad-style).
    eps, relative_eps:
        :math:`\epsilon \ge 0`, relative to the largest undeflated eigenvalue of each axis by default.
    precondition_every:
        Sketch update interval (an integer, or a predicate ``count -> bool``); None: the mode's
        default, :data:`PRINCIPLED_PRECONDITION_EVERY` (3) in principled mode, 1 (the authors')
        in faithful mode. The first update refreshes every sketch.
    spread_refresh:
        Principled only (default True there): with an integer interval T > 1, a leaf's block runs
        take consecutive phases (from a phase set by the leaf's shape) and a run in phase p is
        updated when ``count % T == p`` (:class:`precond_ref.blocking.PhaseDue`), so every step carries about
        1/T of the model's FD updates instead of every T-th step all of them. False: all on the
        steps ``count % T == 0``.
    start_preconditioning_step:
        Use the graft alone while ``count`` is below this (the sketches are still updated).
    graft:
        ``"rmsprop"`` (default), ``"sgd"`` (norm of the raw gradient) or ``"none"`` (the sketched
        direction as is; then every leaf is preconditioned, 1-D and very large ones included, as in
        the authors' code).
    graft_b2, graft_eps:
        RMSProp graft decay (1 gives AdaGrad's sum) and its additive :math:`\epsilon_g`; no bias
        correction.
    momentum, nesterov, momentum_ema:
        :math:`\mu \in [0, 1]`; Nesterov form; ``momentum_ema`` scales the update by
        :math:`1-\mu` before the trace.
    weight_decay:
        :math:`\lambda \ge 0`, added after momentum and before the learning rate.
    merge_dims:
        Adjacent axes are merged left to right while their product stays at most this
        (``(3, 3, 64, 128) -> (576, 128)``); unit axes vanish.
    max_precondition_dim:
        Leaves with a dimension above this (after blocking) get the graft only.
    precondition_1d:
        Precondition vectors too (one sketch, exponent -1/2) instead of graft only.
    block_size:
        Principled only: split every merged axis longer than this into contiguous chunks, each with
        its own sketch (a block-diagonal factor; specs README §6). None: the mode's default,
        :data:`PRINCIPLED_BLOCK_SIZE` (1024) in principled mode, unblocked in faithful mode (the
        authors'). An integer >= 1; a value at least every merged axis is the unblocked method.
    decomposition:
        The Frequent Directions path (:func:`precond_ref.sketch.fd_update`): ``"svd"`` (thin SVD of
        the d x (k + m) factor, the authors'), ``"gram"`` (eigh of the smaller Gram matrix: faster
        when k + m << d, but squares the condition number), ``"incremental"`` (exact, for
        k + m < d: the SVD of a (k + m)-square core), ``"incremental_gram"`` (the same with the
        core's Gram eigh: about a third of its work, the Gram path's accuracy), ``"subspace"``
        (approximate, for long axes) or ``"auto"`` (principled default:
        :func:`precond_ref.sketch.resolve_decomposition`). None: ``"auto"``, or the authors' QR
        and SVD in faithful mode.
    tail_decay:
        ``"b2"`` or ``"sqrt_b2"``: decay of the escaped mass; ``None`` picks the mode's default.
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``; see :func:`precond_ref.engine.build_transform`.

    Returns
    -------
    Transform
        ``init(params)`` / ``update(grads, state, params)``; ``params`` are needed only when
        ``weight_decay > 0``. Per leaf the state holds, for each merged axis (and block) of length
        d, ``basis`` (d, k), ``singular_values``/``basis_weights`` (k) and two scalars -- about
        k(m + n) numbers for an m x n matrix -- plus the graft accumulator and the momentum (both
        of the parameter's shape) and a ``failures`` counter.

    Notes
    -----
    ``mode="faithful"`` reproduces google-research/precondition ``tearfree`` (commit ``239a8cd``:
    ``optimizer.py`` composing ``grafting.py``, ``second_order.py`` with ``reshaper.py``,
    ``sketchy.py`` and ``momentum.py``) to about 1e-6 relative per step in float32. Both modes share
    the guards the specs README requires (non-finite gradients skipped or raised; a non-finite
    decomposition keeps the previous sketch and increments ``failures``; no 0/0 in the graft).

    Deviations of the default ``mode="principled"`` (spec ``fd_shampoo.md`` §2.4):

    * K1: the escaped mass decays by :math:`\beta` (as the sketch does, so sketch and tail describe
      the same discounted statistic); the authors decay it by :math:`\sqrt\beta`
      (``tail_decay="sqrt_b2"``, the faithful default).
    * K2: state in the compute dtype (float64 for float64 parameters; float32 for bf16/fp16); the
      authors' code is float32-only. Faithful mode also follows the compute dtype instead of failing.
    * K3: singular values at rounding level (below :math:`10u\,s_0`, u the unit roundoff) are set
      to 0, so the escaped mass and complement weight stay exactly 0 and rank-deficient directions
      stay masked until real mass arrives; the authors' exact shrink makes a rounding-level
      :math:`\rho` whose :math:`\rho^a` is huge when :math:`\epsilon` is absolute or 0.
    * K4: (both modes) a non-finite gradient never reaches the sketch (skip/raise policy), and a
      non-finite decomposition keeps the previous sketch; the authors store NaN factors.
    * K5: (both modes) no unit axis reaches the sketch: merging removes them (the authors raise on
      unit axes only when they reach the sketch, which merging prevents).
    * K6: ``block_size`` (default 1024; not in the authors' Sketchy), and the sketches updated every
      3 steps with the blocks' updates spread over the interval (``precondition_every``,
      ``spread_refresh``; the authors update every sketch every step). docs/methods/sketchy.md,
      "Long axes, intervals and cost", has the measurements behind these defaults.
    * K7: ``decomposition="gram"`` is offered in both modes (the authors use the SVD, after a QR
      of the factor that is a mathematical no-op).
    * K8: on a first call known on the host (``update(..., step=0)``, as the torch classes pass
      it), where the sketches' values are read on the host for free (NumPy, torch on a CPU) and
      are all 0, the incremental FD step decomposes the m x m triangular factor of X alone: the
      same step in exact arithmetic, without the (k+m)-square core (docs/methods/sketchy.md).

    The authors' Adafactor graft and their post-paper extensions (rank reallocation, EKFAC-style
    basis, power-law tail fit) are not implemented.

    References
    ----------
    Feinberg, Chen, Sun, Anil, Hazan. "Sketchy: Memory-efficient Adaptive Regularization with
    Frequent Directions". NeurIPS 2023, arXiv:2302.03764 (Algorithm 2, FD-Shampoo, with the FD
    update of Algorithm 1). Gupta, Koren, Singer. "Shampoo: Preconditioned Stochastic Tensor
    Optimization". ICML 2018.
    """
    check_learning_rate("learning_rate", learning_rate)
    return _sketchy_transform(
        name="sketchy", learning_rate=learning_rate, rank=rank, b2=b2, eps=eps,
        relative_eps=relative_eps, precondition_every=precondition_every, spread_refresh=spread_refresh,
        start_preconditioning_step=start_preconditioning_step, graft=graft, graft_b2=graft_b2,
        graft_eps=graft_eps, momentum=momentum, nesterov=nesterov, momentum_ema=momentum_ema,
        weight_decay=weight_decay, merge_dims=merge_dims, max_precondition_dim=max_precondition_dim,
        precondition_1d=precondition_1d, block_size=block_size, decomposition=decomposition,
        tail_decay=tail_decay, mode=mode, on_nonfinite=on_nonfinite,
    )


def scale_by_sketchy(
    rank: int = 128,
    b2: float = 0.999,
    eps: float = 1e-7,
    relative_eps: bool = True,
    precondition_every: Union[int, Callable, None] = None,
    merge_dims: int = 1024,
    block_size: Optional[int] = None,
    decomposition: Optional[str] = None,
    tail_decay: Optional[str] = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
    spread_refresh: Optional[bool] = None,
) -> Transform:
    r"""The bare sketched Shampoo direction :math:`P(G)` of :func:`sketchy` (no graft, momentum,
    weight decay or learning rate; every leaf preconditioned, vectors with exponent -1/2).

    ``updates`` are :math:`+P(G)`; chain a learning rate (e.g. ``optax.scale(-lr)``) to descend.
    Arguments and deviations as in :func:`sketchy`.
    """
    return _sketchy_transform(
        name="scale_by_sketchy", learning_rate=None, rank=rank, b2=b2, eps=eps,
        relative_eps=relative_eps, precondition_every=precondition_every, spread_refresh=spread_refresh,
        start_preconditioning_step=0, graft="none", graft_b2=0.999, graft_eps=0.0, momentum=0.0,
        nesterov=False, momentum_ema=False, weight_decay=0.0, merge_dims=merge_dims,
        max_precondition_dim=1, precondition_1d=True, block_size=block_size,
        decomposition=decomposition, tail_decay=tail_decay, mode=mode, on_nonfinite=on_nonfinite,
    )


# --------------------------------------------------------------------------------------------
# S-AdaGrad


def s_adagrad(
    learning_rate: ScalarOrSchedule = 0.316,
    rank: int = 128,
    delta: float = 0.0,
    eps: Optional[float] = None,
    b2: float = 1.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    block_size: Optional[int] = None,
    mode: str = "principled",
    on_nonfinite: str = "skip",
    precondition_every: Union[int, Callable, None] = None,
    spread_refresh: Optional[bool] = None,
    decomposition: Optional[str] = None,
) -> Transform:
    r"""S-AdaGrad: full-matrix AdaGrad with the statistic kept as a rank-k FD sketch.

    On the flattened parameter :math:`x \in \mathbb{R}^d` with gradients :math:`g_t`, FD keeps
    :math:`\bar G_t = U \operatorname{diag}(\sigma^2) U^\top` and the escaped mass :math:`\rho_t`
    with :math:`\bar G_t \preceq G_t = \sum_{s\le t} \beta^{t-s} g_s g_s^\top \preceq \bar G_t +
    \rho_t I`, and

    .. math::

        m_t = \mu\, m_{t-1} + (\bar G_t + (\rho_t + \delta) I + \epsilon_t I)^{-1/2} g_t, \qquad
        x_{t+1} = x_t - \eta_t m_t - \eta_t \lambda x_t,

    with the inverse root restricted to the range (pseudo-inverse) while :math:`\rho_t + \delta = 0`,
    and :math:`\epsilon_t = \epsilon \max_i(\sigma_i^2 + \rho_{t-1})`. The sketch is updated every
    step, in O(dk) memory and O(dk^2) time.

    Parameters
    ----------
    learning_rate:
        :math:`\eta`, a positive number or a schedule (the authors tune it over 49 log-spaced values
        in [1e-6, 1]). Default 0.316: the rate of the sweep in ``docs/defaults.md``, near the best
        on three small problems and a half-decade below a rate that trains worse (1e-2, as
        ``torch.optim.Adagrad``, made under a tenth of Adam's progress on the README's MLP).
    rank:
        Retained directions k (the authors' sketch size is :math:`\ell = k + 1`); clipped to d.
    delta:
        :math:`\delta \ge 0`, the initial diagonal regularisation (the authors' :math:`\alpha_0`).
    eps:
        Relative :math:`\epsilon \ge 0` (principled default 1e-7); not available in faithful mode.
    b2:
        :math:`\beta \in (0, 1]`; 1 (default) is AdaGrad's sum. Faithful mode needs 1.
    momentum:
        Heavy-ball :math:`\mu \in [0, 1)` (principled only).
    weight_decay:
        Decoupled :math:`\lambda \ge 0` (principled only).
    block_size:
        Principled only: sketch contiguous chunks of the flattened parameter separately (an integer
        >= 1; default None, the whole parameter, as the authors).
    precondition_every:
        Principled only: add the gradient to the sketch every this many steps (default None: 1,
        every step, as the authors); between, the gradient is preconditioned by the last sketch
        with its own mass on the sketch's frame (:func:`precond_ref.sketch.fd_apply_with_own_mass`:
        each coordinate of the step at most 1, as on a refresh step; the last sketch alone leaves
        the part it has not seen unbounded, and diverged on every seed measured).
    spread_refresh:
        Principled only (default True): with ``precondition_every = T > 1``, the block runs take
        phases as in :func:`sketchy`, so each step updates about 1/T of the blocks.
    mode:
        ``"principled"`` (default) or ``"faithful"``.
    on_nonfinite:
        ``"skip"`` (default) or ``"raise"``.
    decomposition:
        Principled only: how the FD step decomposes the (k + 1)-square core of its incremental
        update (:func:`precond_ref.sketch.fd_update`): None (default, ``"auto"``: the secular core
        for float32 torch tensors on a GPU, :func:`precond_ref.sketch.secular_by_default`;
        else its SVD, or the whole factor's where k + 1 >= d) or ``"incremental_secular"`` (the
        secular equation of the core's rank-one Gram update,
        :func:`precond_ref.linalg.rank_one_update_eigh`: no LAPACK call and no host read, so a CUDA
        step can be captured) on every device. Faithful mode takes the authors' SVD.

    Returns
    -------
    Transform
        ``init(params)`` / ``update(grads, state, params)``; per leaf (and block) of size d the state
        holds ``basis`` (d, k), two k-vectors and two scalars, plus the momentum if used.

    Notes
    -----
    ``mode="faithful"`` reproduces ``_fd_update_fn`` with the S-AdaGrad factors of
    google-research/precondition ``oco/algorithms.py`` (commit ``239a8cd``): an FD sketch of
    :math:`\ell = k + 1` rows without decay, :math:`\alpha = \delta + \sum_t \rho_t`, and
    :math:`P^\top \operatorname{diag}((\alpha + s)^{-1/2}) P g + \alpha^{-1/2}(g - P^\top P g)`
    with :math:`x^{-1/2} := 0` for :math:`x \le 0` (spec §2.5; it equals this module's FD step
    with rank :math:`\ell - 1` and absolute shift :math:`\delta`, F-I8). The authors run in float64
    and assert :math:`\ell \le d`; here the compute dtype is used and k is clipped to d.

    Deviations of the default ``mode="principled"`` (spec ``fd_shampoo.md`` §2.6):

    * relative :math:`\epsilon` (default 1e-7) on top of :math:`\delta`, and the K3 cutoff of
      rounding-level singular values: with :math:`\delta = 0` rank-deficient early steps make a
      rounding-level :math:`\rho` whose :math:`\rho^{-1/2} \approx 10^{30}` amplifies rounding (the
      authors' iterate reaches 1e31 within 20 steps in that regime);
    * optional decay ``b2 < 1`` (escaped mass decayed by :math:`\beta` too), ``momentum``,
      ``weight_decay`` and ``block_size``, absent from the authors' code;
    * compute dtype per the specs README (float32 state for bf16/fp16 parameters);
    * (both modes) non-finite gradients never reach the sketch, a non-finite decomposition keeps the
      previous sketch and increments ``failures``.

    A block whose sketch basis exceeds :data:`precond_ref.sketch.FD_ROWS_BYTES` (256 MiB) is
    stepped by blocks of rows (:func:`precond_ref.sketch.frame_products_in_rows`). A caller that owns
    its state (the torch class, CuPy's captured step: :func:`precond_ref._backend.owned_state`) has
    the new basis written over the state's own array: a step then holds a bounded workspace beside
    the state, not a second copy of it. The pure ``update`` writes no array it was given.

    Without ``momentum`` no state entry has the parameter's shape (the sketch is of the flattened
    gradient): ``update`` without ``params`` then cannot tell a gradient of another shape but the
    same size (e.g. transposed) from the right one. Pass ``params`` to have it named.

    References
    ----------
    Feinberg, Chen, Sun, Anil, Hazan. "Sketchy: Memory-efficient Adaptive Regularization with
    Frequent Directions". NeurIPS 2023, arXiv:2302.03764 (S-AdaGrad, Algorithm 1, and its regret
    bound; Appendix A experiments).
    """
    check_learning_rate("learning_rate", learning_rate)
    faithful = _check_shared(rank, b2, precondition_every, spread_refresh, block_size, mode)
    check_nonnegative("delta", delta)
    check_optional(check_nonnegative, "eps", eps)
    check_interval("momentum", momentum, 0.0, 1.0)
    check_nonnegative("weight_decay", weight_decay)
    check_choice("decomposition", decomposition, _S_ADAGRAD_DECOMPOSITIONS)
    if faithful:
        def differs(value: Any, default: Any) -> bool:  # an array (optax.inject_hyperparams, traced) cannot be checked
            return isinstance(value, numbers.Real) and not hasattr(value, "shape") and value != default

        refused = dict(eps=differs(eps, 0), b2=differs(b2, 1.0), momentum=differs(momentum, 0),
                       weight_decay=differs(weight_decay, 0), block_size=block_size is not None,
                       precondition_every=precondition_every is not None and precondition_every != 1,
                       spread_refresh=bool(spread_refresh), decomposition=decomposition is not None)
        for option, given in refused.items():
            check_principled_only(option, given, " (the authors' S-AdaGrad has no such option)", "in")
    eps = 0.0 if faithful else 1e-7 if eps is None else eps  # the mode's default
    fd_options = dict(
        decay=b2, tail_decay=b2, eps=eps, relative_eps=True, delta=delta,
        cutoff=not faithful, decomposition="svd" if faithful else decomposition or "auto",
    )
    block_size, dues = _resolve_schedule(faithful, block_size, precondition_every, spread_refresh, None,
                                         S_ADAGRAD_PRECONDITION_EVERY)
    c = SAdaGradConfig(learning_rate, rank, fd_options, dues, block_size, momentum, weight_decay, not is_zero(momentum),
                       not is_zero(weight_decay))
    return axes_transform(_S_ADAGRAD, c, name="s_adagrad", on_nonfinite=on_nonfinite)


class SAdaGradConfig(NamedTuple):
    """S-AdaGrad's validated hyperparameters (:func:`s_adagrad`), ``fd`` the FD step's options and
    ``dues`` the refresh predicate of each phase."""

    learning_rate: Any
    rank: int
    fd: dict
    dues: tuple
    block_size: Optional[int]
    momentum: Any
    weight_decay: Any
    has_momentum: bool
    has_weight_decay: bool


def _adagrad_plan(c: SAdaGradConfig, shape: tuple[int, ...], first_phase: int = 0) -> LeafPlan:
    """The sketch layout of the flattened parameter: one axis, cut into blocks."""
    return leaf_plan((math.prod(shape),), c.rank, c.block_size, len(c.dues), first_phase)


def _adagrad_refresh(xp: Any, c: SAdaGradConfig, sketch: _Sketch, x: Array, order: int, accept: Any, first: bool) -> tuple:
    r"""Step 1 on a stack of runs when the sketch is due: the FD step adds the gradient's rows x
    (n, length, 1) to each sketch and applies the new sketch to them in one pass
    (:func:`precond_ref.sketch.fd_update_apply`; the previous sketch where ``accept`` is False):
    ``(sketch, ok, P(g))``; ``order`` (1, the flattened parameter) and ``first`` as for
    :func:`_sketch_refresh`, the exponent being AdaGrad's -1/2."""
    new, ok, out = fd_update_apply(xp, sketch._asdict(), x, exponent=-0.5, accept=accept, **c.fd)  # (Ḡ + ρI + εI)^{-1/2} g
    return _Sketch(**new), ok, out


def _adagrad_keep(xp: Any, c: SAdaGradConfig, sketch: _Sketch, x: Array) -> Array:
    r"""Step 1 between refreshes: the last sketch applied with x's own mass on its frame,
    :math:`(S + D)^{-1/2} x` (:func:`precond_ref.sketch.fd_apply_with_own_mass`: the last sketch
    alone, :math:`(\bar G + \rho I + \epsilon I)^{-1/2} x`, leaves the part of x it has not seen
    unbounded, and diverged on every seed measured)."""
    return fd_apply_with_own_mass(xp, sketch._asdict(), x)


def _adagrad_finish(xp: Any, c: SAdaGradConfig, minus_lr: Any, direction: Array, *rest: Array) -> tuple:
    """Step 2 (``minus_lr``: -η_t; ``rest``: m with momentum, then x with weight decay):
    ``(updates, m)`` or ``(updates,)``, for one leaf or the leaves of one layout joined end to end."""
    if c.has_momentum:
        direction = m = c.momentum * rest[0] + direction  # m_t = μ m_{t-1} + P(g)
    updates = minus_lr * direction  # −η_t m_t
    if c.has_weight_decay:
        updates = updates + (minus_lr * c.weight_decay) * rest[-1]  # − η_t λ x
    return (updates, m) if c.has_momentum else (updates,)


_S_ADAGRAD = AxesRule(
    State=_State, Block=_Sketch, plan=_adagrad_plan, empty=fd_init, refresh=_adagrad_refresh,
    finish=_adagrad_finish, keep=_adagrad_keep,
)
