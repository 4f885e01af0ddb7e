r"""ASGO and DASGO: one-sided structured preconditioning (An et al., arXiv 2503.20762).

ASGO keeps, per matrix parameter :math:`W \in \mathbb R^{m\times n}`, one statistic
:math:`P \approx \mathbb E[GG^\top]` (or :math:`G^\top G`) on its *smaller* side and steps along
:math:`P^{-1/2}M` (or :math:`MP^{-1/2}`), with :math:`M` the gradient momentum; DASGO keeps only the
diagonal of the statistic. Both renormalise the step to a fixed RMS. Leaves that are not matrices
go to a built-in Adam, as in the authors' trainer.

Layout of a leaf's state (arrays only):

* matrix leaves (ASGO): ``momentum`` (the leaf as an m×n matrix), ``statistic`` (k×k, or a batch of
  ``block_size`` chunks plus ``statistic_tail``), ``root`` (same shapes as the statistic; faithful
  mode keeps it only when ``precondition_every > 1``), ``root_failures`` (0-D int32: roots that
  were not finite) and, in principled mode, ``root_fallbacks`` (0-D int32: iterative roots that did
  not converge and were recomputed by ``eigh``);
* matrix leaves (DASGO): ``momentum`` and ``statistic`` (a vector along the preconditioned side);
* fallback leaves: ``mu``, ``nu`` (Adam moments in the leaf's shape).

The matrix view of a leaf is stored in the shape of ``momentum``: ≥3-D leaves are (first axis,
rest) in the out-first layout, or (all but the last axis, last axis) for an out-last Flax
``kernel``; an unmasked 1-D leaf is a 1×n row and a 0-D leaf a 1×1 matrix.
"""

from __future__ import annotations

import math
import numbers
import sys
from functools import partial
from typing import Any, Callable, Optional, Union

from array_api_compat import is_jax_namespace

from .._backend import (
    array_device,
    cast,
    compute_dtype,
    computed_once,
    cond_under_cpu_jit,
    float64_where_available,
    is_zero,
    placement,
    scalar_zero,
    select,
)
from ..blocking import chunk_sizes, spread_schedule
from ..linalg import (
    ROOT_RESIDUAL_TOLERANCE,
    all_finite,
    identity_like,
    inverse_root,
    inverse_sqrt_newton_schulz,
    inverse_sqrt_polar_express,
    symmetrize,
    trace,
)
from ..engine import StepContext, build_transform
from ..engine.matrices import MatrixStack, hand_back, joined_leaves, matrix_stacks
from ..engine.phases import hashed_phases, refresh_due
from ..transform import (
    ScalarOrSchedule,
    Transform,
    check_choice,
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from ..tree import Path, path_str, tree_flatten

__all__ = ["asgo", "dasgo", "PRINCIPLED_BLOCK_SIZE", "PRINCIPLED_PRECONDITION_EVERY"]

Array = Any
FallbackMask = Union[None, Any, Callable[[Path, Array], bool]]

_MODES = ("principled", "faithful")
_SIDES = ("auto", "left", "right")
_ROOT_METHODS = ("auto", "eigh", "polar_express", "newton_schulz", "newton")

#: Principled ASGO's root refresh interval and block size (one number for every device), chosen by
#: measurement: ``docs/methods/asgo.md``, "Long axes, intervals and cost".
PRINCIPLED_PRECONDITION_EVERY = 2
PRINCIPLED_BLOCK_SIZE = 1024


# ------------------------------------------------------------------------------------------------
# Shared pieces: matrix view, side, EMA in the authors' interpolation form, fallback Adam.


def _matrix_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(m, n) of a leaf's matrix view (module docstring)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if path and path[-1] == "kernel":
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


#: ASGO's stacked state entries, and its counters (:func:`precond_ref.engine.matrices.hand_back`)
_STACKED = ("momentum", "statistic", "statistic_tail", "root", "root_tail")
_COUNTERS = ("root_failures", "root_fallbacks")


def _is_left(side: str, m: int, n: int) -> bool:
    """Whether ``side`` preconditions the left side of an m×n matrix."""
    return _resolve_side(m, n, side) == "left"


def _resolve_side(m: int, n: int, side: str) -> str:
    """``"auto"``: the smaller side, the right one for a square matrix (spec §2.1)."""
    if side == "auto":
        return "left" if m < n else "right"
    return side


def _lerp(start: Array, end: Array, weight: Any) -> Array:
    """``start + weight (end - start)`` in the two-branch form of ``torch.lerp`` (the authors' EMA),
    so faithful mode rounds as their ``lerp_`` does (one form for an array weight)."""
    if hasattr(weight, "shape") or abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _ema(xp: Any, old: Array, new: Array, decay: float, faithful: bool) -> Array:
    if faithful:
        return _lerp(old, new, 1.0 - decay)
    return decay * old + (1.0 - decay) * new


def _check_faithful_matrix(name: str, param: Array, path: Path) -> None:
    """Faithful modes take matrices only, as the authors' code; anything else raises, naming the leaf."""
    if param.ndim != 2:
        raise ValueError(
            f"{name}(mode='faithful'): parameter {path_str(path)!r} has shape {tuple(param.shape)}; "
            f"the authors' {name.upper()} accepts only matrices. Mask it to the fallback Adam "
            "(fallback_mask) or use mode='principled', which reshapes tensors to matrices"
        )


def _fallback_predicate(fallback_mask: FallbackMask) -> Callable[[Path, Array], bool]:
    """``(path, leaf) -> bool``: does this leaf go to the fallback Adam?"""
    if fallback_mask is None:
        return lambda path, leaf: leaf.ndim < 2
    if callable(fallback_mask):
        return lambda path, leaf: bool(fallback_mask(path, leaf))
    leaves, treedef = tree_flatten(fallback_mask)
    table = dict(zip(treedef.paths, leaves))
    for path, flag in table.items():
        if not isinstance(flag, bool):
            raise ValueError(
                f"fallback_mask must be a tree of bools or a callable (path, leaf) -> bool; "
                f"entry {path_str(path)!r} is {flag!r}"
            )

    def lookup(path: Path, leaf: Array) -> bool:
        if path not in table:
            raise ValueError(f"fallback_mask has no entry for parameter {path_str(path)!r}")
        return table[path]

    return lookup


def _check_fallback_hyperparameters(b1: float, b2: float, eps: float, weight_decay: float) -> None:
    check_unit_interval("fallback_b1", b1)
    check_unit_interval("fallback_b2", b2)
    check_positive("fallback_eps", eps)
    check_nonnegative("fallback_weight_decay", weight_decay)


def _adam_init(xp: Any, param: Array, faithful: bool) -> dict[str, Array]:
    dtype = param.dtype if faithful else compute_dtype(xp, param.dtype)
    zeros = xp.zeros(param.shape, dtype=dtype, device=array_device(param))
    return {"mu": zeros, "nu": zeros}


def _adam_update(
    g: Array,
    state: dict[str, Array],
    param: Optional[Array],
    ctx: StepContext,
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    faithful: bool,
) -> tuple[Array, dict[str, Array]]:
    """Bias-corrected Adam. Faithful: ``torch.optim.Adam`` (weight decay as an L2 term, the
    authors' trainer); principled: decoupled weight decay (AdamW)."""
    xp = ctx.xp
    dtype = state["mu"].dtype
    dev = array_device(state["mu"])
    g = cast(xp, g, dtype)
    w = None if param is None else cast(xp, param, dtype)
    if faithful and not is_zero(weight_decay):
        g = g + weight_decay * w
    mu = ctx.unless_skipped(_ema(xp, state["mu"], g, b1, faithful), state["mu"])
    nu = ctx.unless_skipped(b2 * state["nu"] + (1.0 - b2) * (g * g), state["nu"])
    lr = ctx.scalar("learning_rate", learning_rate, dtype, dev)

    def corrections() -> tuple[Array, Array]:
        t = xp.astype(ctx.count + 1, dtype)
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        return -(lr / bc1), xp.sqrt(bc2)

    neg_step, root_bc2 = ctx.once(("fallback_adam", dtype, dev), corrections)
    update = neg_step * (mu / (xp.sqrt(nu) / root_bc2 + eps))
    if not faithful and not is_zero(weight_decay):
        update = update - (lr * weight_decay) * w
    return update, {"mu": mu, "nu": nu}


def _fallback_step(hyperparameters: tuple, g: Array, state: dict, param: Optional[Array], ctx: StepContext) -> tuple:
    """The fallback Adam's step of one leaf (or of leaves joined), as ``((update,), new state)``;
    ``hyperparameters``: ``_adam_update``'s, from the learning rate to ``faithful``."""
    u, new = _adam_update(g, state, param, ctx, *hyperparameters)
    return (u,), new


def _fallback_leaves(xp: Any, grads: list, states: list, params: list, ctx: StepContext, step: Callable) -> tuple:
    """The groups' results with the fallback Adam's leaves (state ``mu``) stepped by ``step``, all
    of them in one pass (:func:`precond_ref.engine.matrices.joined_leaves`), the others ``None``;
    and the indices of the others (the matrix leaves)."""
    results: list[Any] = [None] * len(grads)
    adam = [i for i, state in enumerate(states) if "mu" in state]
    for i, result in zip(adam, joined_leaves(xp, step, [(grads[i][0], states[i], _param(params, i)) for i in adam], ctx)):
        results[i] = result
    return results, [i for i, state in enumerate(states) if "mu" not in state]


def _wide_dtype(xp: Any, x: Array) -> Any:
    """float64 for a float32 ``x`` where the backend has it (not JAX without x64, not torch MPS),
    else ``None``.

    Every float32 number squares into the float64 range without underflow or overflow (2^-149 and
    2^128 square to 2^-298 and 2^256), so a float64 sum of squares is the Frobenius norm of any
    float32 array in one pass, whatever its scale.
    """
    if x.dtype != xp.float32:
        return None
    return float64_where_available(xp, x)


def _renormalising_factor(xp: Any, sum_of_squares: Array, target: float) -> Array:
    """``target / sqrt(sum_of_squares)``, and ``target`` for a zero sum (a zero direction stays zero)."""
    norm = xp.sqrt(sum_of_squares)
    return target / select(xp, norm > 0, norm, xp.ones_like(norm))


def _rms_renormalise(xp: Any, u: Array, rms_target: Optional[float], faithful: bool) -> Array:
    """``u · r·sqrt(mn)/‖u‖_F`` for an m×n ``u`` (each matrix of a stack ``(L, m, n)`` by its own
    norm): RMS(u) = r for every finite non-zero u, and a zero u stays zero (D2).

    Scale-invariant (D12): neither the squares nor the factor may under- or overflow, whatever the
    scale of u (a direction of size 1e-30, or a subnormal one, is renormalised like one of size 1).
    Principled float32 (the compute dtype of float32, bf16 and fp16 parameters): the norm (squares
    and their sum) and the factor's product in float64 (:func:`_wide_dtype`), one reduction over
    each matrix and one float64 copy of u, scaled in place, then rounded once to u's dtype. Otherwise
    (faithful mode, which keeps the authors' float32 arithmetic; float64; no float64 on the
    backend) u is first divided by its largest magnitude, so the norm is taken of entries in
    [-1, 1] with at least one of modulus 1 (>= 1 and <= sqrt(mn)): one more pass.
    """
    rows, columns = u.shape[-2:]
    if rms_target is None or rows * columns == 0:
        return u
    target = rms_target * math.sqrt(rows * columns)
    matrices = (-2, -1)
    wide = None if faithful else _wide_dtype(xp, u)
    if wide is not None:
        w = xp.astype(u, wide)  # a new array: scaled in place below, no second float64 copy
        norm = xp.linalg.matrix_norm(w, ord="fro", keepdims=True)
        w *= target / select(xp, norm > 0, norm, xp.ones_like(norm))
        return xp.astype(w, u.dtype)
    peak = xp.max(xp.abs(u), axis=matrices, keepdims=True)
    v = u / select(xp, peak > 0, peak, xp.ones_like(peak))
    norm = xp.linalg.matrix_norm(v, ord="fro", keepdims=True)
    # norm >= 1 unless u == 0, where v == 0 and any divisor >= 1 keeps the step exactly zero.
    return v * (target / xp.maximum(norm, xp.ones_like(norm)))


def _column_factored_renormalise(xp: Any, m: Array, scale: Array, axis: int, target: float) -> Array:
    r"""``U · target/‖U‖_F`` for ``U = M diag(s)`` (``axis=0``; ``diag(s) M`` for ``axis=1``) without
    float64 and without forming ``U`` first: D12 in the compute dtype.

    Two ways to the same result (to rounding), chosen per step without a host read
    (:func:`~precond_ref.transform.cond_under_cpu_jit`):

    * the column sums :math:`\sigma_j = \sum_i M_{ij}^2` and :math:`T = \sum_j s_j^2 \sigma_j`,
      formed as they stand, and :math:`M_{ij}\,s_j\,\mathrm{target}/\sqrt{T}`: one reduction of
      the stored momentum. Valid where :math:`T` is finite and
      :math:`T \ge 2^{10}\,(\mathrm{tiny}/\epsilon)\,(mn \max_j s_j^2 + n)`: a square or a product
      :math:`s_j^2\sigma_j` that underflows (flush-to-zero included) is off by less than the
      smallest normal number tiny, so that all of them together change :math:`T` by less than
      :math:`2^{-10}` of its rounding unit :math:`\epsilon`. Training scales pass: in float32,
      on a 4096x1024 matrix with :math:`s` up to 1e4 (:math:`\epsilon` = 1e-8 inside the root) the
      bound is 4e-14, met by momenta from about 1e-14 on;
    * otherwise, with column maxima :math:`c_j = \max_i |M_{ij}|`,
      :math:`\rho_j = c_j s_j / \max_k c_k s_k` (formed from :math:`c_j` and :math:`s_j/\max s`) and
      :math:`q_j = \sum_i (M_{ij}/c_j)^2`, :math:`‖U‖_F = \max_k c_k s_k \sqrt{\sum_j \rho_j^2 q_j}`
      and the result is :math:`(M_{ij}/c_j)\,\rho_j\,\mathrm{target}/\sqrt{\sum_j \rho_j^2 q_j}`.
      Every factor is at most 1 in modulus and the root at least 1 (the largest entry's column),
      so nothing over- or underflows that could change the result in its leading digits, at any
      scale of M or s, unless :math:`c_j s_j/\max s` leaves the normal range (a momentum near
      1e-38 with column scales 1e-3 apart; forming U in float32 fails wherever :math:`c_j s_j`
      does). Two more column reductions of the momentum, one of them of a scaled copy.

    Both give the result as :math:`M_{ij} a_j b_j` with two per-column factors (:math:`a_j` alone
    may overflow where :math:`a_j b_j` does not), formed in the pass that writes the step. A zero
    column or a zero U stays zero.
    """
    def expand(x: Array) -> Array:
        return xp.expand_dims(x, axis=axis)

    def over_max(x: Array) -> Array:  # x / max(x), or x if that is zero (x >= 0)
        top = xp.max(x)
        return x / xp.where(top > 0, top, xp.ones_like(top))

    total = _scaled_squared_norm(xp, m, scale, axis)
    rows, columns = m.shape
    info = xp.finfo(m.dtype)
    # Each underflowing square or product is off by less than smallest_normal: together at most
    # 2^-10 of the dtype's rounding unit of T.
    top = xp.max(scale)
    lost = (rows * columns * (top * top) + scale.shape[0]) * (info.smallest_normal * 2.0**10 / info.eps)
    plain = (total >= lost) & (total < float("inf"))

    def fast(m: Array, scale: Array, total: Array) -> tuple[Array, Array]:
        # T replaced where this branch is not taken: evaluated anyway, it must not overflow (warnings).
        factor = _renormalising_factor(xp, xp.where(plain, total, xp.ones_like(total)), target)
        return scale * factor, xp.ones_like(scale)

    def safe(m: Array, scale: Array, total: Array) -> tuple[Array, Array]:
        peaks = xp.max(xp.abs(m), axis=axis)
        inverse = 1.0 / xp.where(peaks > 0, peaks, xp.ones_like(peaks))
        ratios = m * expand(inverse)
        column_sums = _sum_across(xp, ratios * ratios, axis)
        # s_j alone may span the float32 range (s/max s cannot overflow). No max of the column
        # maxima themselves: XLA merges it with their reduction into one over the whole matrix,
        # and then writes |M| out for the two reductions to share.
        relative = over_max(peaks * over_max(scale))
        norm = xp.sqrt(xp.sum(relative * relative * column_sums))
        return inverse, relative * (target / xp.maximum(norm, xp.ones_like(norm)))

    a, b = cond_under_cpu_jit(xp, plain, fast, safe, m, scale, total)
    return (m * expand(a)) * expand(b)


def _scaled_squared_norm(xp: Any, m: Array, scale: Array, axis: int) -> Array:
    r""":math:`‖M \operatorname{diag}(s)‖_F^2 = \sum_j s_j^2 \sum_i M_{ij}^2` (``axis=0``;
    :math:`‖\operatorname{diag}(s) M‖_F^2` for ``axis=1``) from the column sums of :math:`M^2`,
    without forming the product: a compiler fuses the sums with the pass that reads M."""
    return xp.sum(scale * scale * _sum_across(xp, m * m, axis))


def _sum_across(xp: Any, x: Array, axis: int) -> Array:
    """``xp.sum(x, axis=axis)`` of a matrix; column sums (axis 0) add blocks of 16 rows first.

    The same sum in another order. TorchInductor's CPU code otherwise walks the matrix in strips
    of 8 columns from the first row to the last, a 4-KiB stride per row; summed in blocks, it reads
    whole rows (measurements: docs/backends.md, "ASGO and DASGO").
    """
    rows = x.shape[0] // _ROW_BLOCK * _ROW_BLOCK
    if axis != 0 or rows < 2 * _ROW_BLOCK:
        return xp.sum(x, axis=axis)
    blocks = xp.reshape(x[:rows, :], (rows // _ROW_BLOCK, _ROW_BLOCK, x.shape[1]))
    total = xp.sum(xp.sum(blocks, axis=1), axis=0)
    return total if rows == x.shape[0] else total + xp.sum(x[rows:, :], axis=0)


_ROW_BLOCK = 16


def _flush_subnormal(xp: Any, x: Array, zero: Array) -> Array:
    """``x`` with subnormal entries set to zero (D12; what flush-to-zero hardware does).

    An EMA ``μ x`` of a value that stops receiving gradients decays geometrically, but round to
    nearest keeps the smallest subnormal fixed (``0.9 · 2^-149`` rounds back to ``2^-149``): without
    the flush an unused matrix would take steps of RMS r forever instead of reaching zero.
    """
    tiny = xp.finfo(x.dtype).smallest_normal
    return select(xp, xp.abs(x) < tiny, zero, x)


def _zero(ctx: StepContext, x: Array) -> Array:
    """A 0-D zero of ``x``'s dtype on its device, made once per update (the one the transform
    makes for its own selections)."""
    return ctx.once(("zero", x.dtype, array_device(x)), lambda: scalar_zero(ctx.xp, x))


def _finish(
    xp: Any,
    u: Array,
    param: Optional[Array],
    shape: tuple[int, ...],
    neg_lr: Array,
    weight_decay: float,
) -> Array:
    """``-η (U + λ W)`` in the leaf's shape, given ``-η``."""
    u = u if tuple(u.shape) == shape else xp.reshape(u, shape)
    if not is_zero(weight_decay):
        u = u + weight_decay * cast(xp, param, u.dtype)
    return neg_lr * u


def _on_cpu(xp: Any, x: Array) -> bool:
    """Whether ``x`` lives in host memory, where a k×k ``eigh`` (LAPACK) costs about six k×k
    matmuls; on GPUs it costs hundreds, and synchronises with the host (cuSOLVER's info check)."""
    dev = array_device(x)
    if is_jax_namespace(xp):
        platform = getattr(dev, "platform", None)  # None for a tracer: the default backend
        return (platform or sys.modules["jax"].default_backend()) == "cpu"
    kind = getattr(dev, "type", None)  # torch
    if isinstance(kind, str):
        return kind == "cpu"
    return "cpu" in str(dev).lower()  # NumPy "cpu", array_api_strict CPU_DEVICE; CuPy devices are GPUs


def _root_method_for(xp: Any, p: Array, root_method: str) -> str:
    """``root_method="auto"``: ``eigh`` for float64 (reference runs) and on CPUs, where it is
    the cheaper and exact choice; the checked Polar-Express iteration on accelerators."""
    if root_method != "auto":
        return root_method
    return "eigh" if p.dtype == xp.float64 or _on_cpu(xp, p) else "polar_express"


# ------------------------------------------------------------------------------------------------
# ASGO


def asgo(
    learning_rate: ScalarOrSchedule = 1e-2,
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
        convergence is recomputed by ``eigh`` and counted in ``root_fallbacks`` (default
        :data:`precond_ref.linalg.ROOT_RESIDUAL_TOLERANCE`, 0.05). The check reads one bool on the
        host per refresh step (a synchronisation on a GPU, except under ``jax.jit``);
        ``math.inf`` turns it off: matmuls only, no host read. Faithful mode has no check.
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
        ``"auto"`` (left if :math:`m < n`, else right), ``"left"`` or ``"right"``.
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
      the damped statistic on accelerators (``root_method="auto"``), whose convergence is checked:
      a block that did not converge is recomputed by ``eigh`` and counted (``root_fallbacks``).
      The roots of all blocks of one shape, across the parameters of a call and the chunks of a
      blocked side, are computed together (one batched ``eigh`` or iteration).
    * D6: a non-finite root keeps the previous root (the identity before the first success)
      instead of the identity; failures are counted in ``root_failures``.
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

    References
    ----------
    K. An, Y. Liu, R. Pan, Y. Ren, S. Ma, D. Goldfarb, T. Zhang. "ASGO: Adaptive Structured
    Gradient Optimization". arXiv:2503.20762 (NeurIPS 2025), Algorithm 1 (idealised ASGO) and the
    practical variant of the experiments; code https://github.com/infinity-stars/ASGO.
    """
    check_choice("mode", mode, _MODES)
    faithful = mode == "faithful"
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_nonnegative("weight_decay", weight_decay)
    check_choice("accumulator", accumulator, ("ema", "sum"))
    check_choice("side", side, _SIDES)
    check_positive_int("root_steps", root_steps)
    if precondition_every is not None:
        check_positive_int("precondition_every", precondition_every)
    if spread_refresh is not None and not isinstance(spread_refresh, bool):
        raise ValueError(f"spread_refresh must be True, False or None, got {spread_refresh!r}")
    if rms_target is not None:
        check_positive("rms_target", rms_target)
    _check_fallback_hyperparameters(fallback_b1, fallback_b2, fallback_eps, fallback_weight_decay)
    if faithful:
        if damping is not None:
            raise ValueError(
                "damping is not available with mode='faithful' (the authors' root is undamped); "
                "use mode='principled'"
            )
        if block_size is not None:
            raise ValueError("block_size is not available with mode='faithful'; use mode='principled'")
        if spread_refresh:
            raise ValueError(
                "spread_refresh=True is not available with mode='faithful' (the authors refresh every root "
                "every step); use mode='principled'"
            )
        precondition_every = 1 if precondition_every is None else precondition_every
        spread_refresh = False
        if root_method not in (None, "polar_express", "newton_schulz"):
            check_choice("root_method", root_method, _ROOT_METHODS)
            raise ValueError(
                f"root_method={root_method!r} is not available with mode='faithful' (the authors use "
                "'polar_express' or 'newton_schulz'); use mode='principled'"
            )
        if root_tolerance is not None:
            raise ValueError(
                "root_tolerance is not available with mode='faithful' (the authors' root is not checked); "
                "use mode='principled'"
            )
        root_method = "polar_express" if root_method is None else root_method
        eps = 1e-10 if eps is None else eps
        damping = 0.0
    else:
        damping = 1e-4 if damping is None else damping
        eps = 1e-30 if eps is None else eps
        root_method = "auto" if root_method is None else root_method
        root_tolerance = ROOT_RESIDUAL_TOLERANCE if root_tolerance is None else root_tolerance
        if isinstance(root_tolerance, bool) or not isinstance(root_tolerance, numbers.Real) or not root_tolerance > 0:
            raise ValueError(f"root_tolerance must be a number > 0 (math.inf: no check), got {root_tolerance!r}")
        block_size = PRINCIPLED_BLOCK_SIZE if block_size is None else block_size
        check_positive_int("block_size", block_size)
        precondition_every = PRINCIPLED_PRECONDITION_EVERY if precondition_every is None else precondition_every
        spread_refresh = True if spread_refresh is None else spread_refresh
    check_choice("root_method", root_method, _ROOT_METHODS)
    check_nonnegative("damping", damping)
    check_nonnegative("eps", eps)
    goes_to_fallback = _fallback_predicate(fallback_mask)
    keeps_root = (not faithful) or precondition_every != 1
    schedule = spread_schedule(precondition_every, spread_refresh)
    tolerance = None if faithful or math.isinf(root_tolerance) else root_tolerance

    def init_group(leaves, paths, xp):
        (param,), (path,) = leaves, paths
        if goes_to_fallback(path, param):
            return _adam_init(xp, param, faithful)
        if faithful:
            _check_faithful_matrix("asgo", param, path)
        dev = array_device(param)
        m, n = _matrix_shape(tuple(param.shape), path)
        k = m if _resolve_side(m, n, side) == "left" else n
        c = compute_dtype(xp, param.dtype)
        momentum_dtype = param.dtype if faithful else c
        stat_dtype = xp.float32 if faithful else c
        state = {"momentum": xp.zeros((m, n), dtype=momentum_dtype, device=dev)}
        b, full, tail = chunk_sizes(k, block_size)
        stat_shape = (full, b, b) if full else (k, k)
        state["statistic"] = xp.zeros(stat_shape, dtype=stat_dtype, device=dev)
        if keeps_root:
            state["root"] = xp.zeros(stat_shape, dtype=stat_dtype, device=dev) + xp.eye(
                b, dtype=stat_dtype, device=dev
            )
        if tail:
            state["statistic_tail"] = xp.zeros((tail, tail), dtype=stat_dtype, device=dev)
            state["root_tail"] = xp.eye(tail, dtype=stat_dtype, device=dev)
        state["root_failures"] = xp.zeros((), dtype=xp.int32, device=dev)
        if not faithful:
            state["root_fallbacks"] = xp.zeros((), dtype=xp.int32, device=dev)
        return state

    def inverse_sqrt(xp, p: Array) -> tuple[Array, Array]:
        """Z = (P + sI)^{-1/2} of a stack of statistics, and per block whether it fell back to eigh."""
        if faithful:
            return _faithful_inverse_sqrt(xp, p, root_method, root_steps, eps)
        method = _root_method_for(xp, p, root_method)
        return _damped_inverse_sqrt(xp, p, damping, eps, method, root_steps, tolerance)

    # The step, in the order of the algorithm, on a stack of equal matrices: the matrix leaves of
    # one shape, dtype and device along a leading axis (MatrixStack), so that each line is one
    # operation per stack. Left side; the right side is its transpose, and a blocked side has one
    # P, Z per chunk of rows:
    #
    #   1  M_t = μ M_{t-1} + (1-μ) G_t                                     _momentum
    #   2  P_t = β₂ P_{t-1} + (1-β₂) G_t G_tᵀ   (or P_{t-1} + G_t G_tᵀ)     _second_moment
    #   3  if the block's phase is due (t ≡ j mod T, spread_schedule):  engine.phases.refresh_due
    #        Z_t = (P_t + s_t I)^{-1/2},  s_t = δ tr(P_t)/k + ε             _damped_inverse_sqrt
    #        Z_t = Z_{t-1} where that is not finite (D6)                    _finite_root_or_previous
    #   4  U_t = Z_t M_t                                                    _block_diagonal_product
    #   5  W_{t+1} = W_t - η_t (r√(mn) U_t/‖U_t‖_F + λ W_t)               _rms_renormalise, _finish
    #
    # Leaves that are not matrices take a bias-corrected Adam step, all of them in one pass
    # (_adam_update, engine.matrices.joined_leaves). The stacks are formed by engine.matrices.matrix_stacks
    # and handed back leaf by leaf by engine.matrices.hand_back.
    def update_groups(grads, states, params, ctxs):
        xp, ctx = ctxs[0].xp, ctxs[0]
        results, matrices = _fallback_leaves(xp, grads, states, params, ctx, fallback)
        stacks = matrix_stacks(xp, grads, states, params, matrices, _STACKED, partial(_is_left, side), not is_zero(weight_decay))
        if not stacks:
            return results
        new = []
        for s in stacks:
            g_o = s.g if s.left else s.g.mT  # rows: the preconditioned side
            b, full, tail = chunk_sizes(g_o.shape[-2], block_size)
            entries = {"momentum": _momentum(xp, s.state["momentum"], s.g, b1, faithful, _zero(ctx, s.g))}  # 1
            entries["statistic"] = statistic(xp, s.state["statistic"], _chunk_rows(xp, g_o, b, full))  # 2
            if tail:
                entries["statistic_tail"] = statistic(xp, s.state["statistic_tail"], g_o[..., full * b :, :])
            new.append(entries)

        # 3: the roots due at this step, those of one block shape (across matrices and chunks) in one batch.
        dues = [ctx.every(interval) if keeps_root else True for interval in schedule]
        units, owners, keys = _root_units(xp, stacks, new, previous_root, len(dues) > 1)
        due_roots = refresh_due(xp, dues, hashed_phases(keys, len(dues)), units, partial(root_or_previous, xp), partial(_unrefreshed, xp))
        refreshed = [(z, None, None) if r is None else r for (_, z), r in zip(units, due_roots)]
        roots = _collect_roots(xp, owners, stacks, new, refreshed)

        for s, entries, z in zip(stacks, new, roots):
            dtype = compute_dtype(xp, s.g.dtype)
            u = _block_diagonal_product(xp, z["root"], z.get("root_tail"), entries["momentum"], s.left, dtype)  # 4
            u = _rms_renormalise(xp, u, rms_target, faithful)  # 5
            neg_lr = ctx.negated("learning_rate", learning_rate, dtype, array_device(s.g))
            step = _finish(xp, u, s.param, tuple(u.shape), neg_lr, weight_decay)
            # Principled: a stack whose blocks were none refreshed keeps the stored roots themselves.
            if keeps_root and (faithful or "root_failures" in z):
                entries.update({name: z[name] for name in ("root", "root_tail") if name in z})
            counts = {name: z[name] for name in ("root_failures", "root_fallbacks") if name in z}
            for i, result in hand_back(xp, s, states, step, entries, counts, ctx, _COUNTERS):
                results[i] = result
        return results

    def statistic(xp, p_old: Array, x: Array) -> Array:
        return _second_moment(xp, p_old, x, b2, accumulator == "sum", faithful)

    def previous_root(xp, s: "MatrixStack", statistic_name: str, p: Array) -> Array:
        """The roots kept where a refresh is not due: the stored ones (faithful mode stores none
        when it roots every step: the identity)."""
        stored = s.state.get("root" if statistic_name == "statistic" else "root_tail")
        return xp.zeros_like(p) + identity_like(p) if stored is None else stored

    def root_or_previous(xp, p: Array, previous: Array) -> tuple[Array, Array, Array]:
        """A refreshed root, and where it is not finite (D6) the previous one (principled) or the
        identity (faithful: the authors' replacement)."""
        kept = xp.zeros_like(p) + identity_like(p) if faithful else previous
        return _finite_root_or_previous(xp, p, kept, inverse_sqrt)

    fallback = partial(_fallback_step, (learning_rate, fallback_b1, fallback_b2, fallback_eps, fallback_weight_decay, faithful))

    return build_transform(
        name="asgo",
        init_group=init_group,
        update_groups=update_groups,
        on_nonfinite=on_nonfinite,
        needs_params=not is_zero(weight_decay) or not is_zero(fallback_weight_decay),
        intervals=schedule,
        layout_hint=_layout_hint,
    )


# ------------------------------------------------------------------------------------------------
# DASGO


def dasgo(
    learning_rate: ScalarOrSchedule = 1e-3,
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
        :math:`\eta > 0` or a schedule (the authors' constructor default 1e-3; their config 1e-2).
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
        ASGO); faithful mode allows only ``"right"``.
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
    check_choice("mode", mode, _MODES)
    faithful = mode == "faithful"
    check_learning_rate("learning_rate", learning_rate)
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    if faithful:
        check_nonnegative("eps", eps)
        if side != "right":
            raise ValueError(
                f"side={side!r} is not available with mode='faithful' (the authors precondition the "
                "columns, side='right'); use mode='principled'"
            )
    else:
        check_positive("eps", eps)
        check_choice("side", side, _SIDES)
    check_nonnegative("weight_decay", weight_decay)
    if rms_target is not None:
        check_positive("rms_target", rms_target)
    _check_fallback_hyperparameters(fallback_b1, fallback_b2, fallback_eps, fallback_weight_decay)
    goes_to_fallback = _fallback_predicate(fallback_mask)

    def init_group(leaves, paths, xp):
        (param,), (path,) = leaves, paths
        if goes_to_fallback(path, param):
            return _adam_init(xp, param, faithful)
        if faithful:
            _check_faithful_matrix("dasgo", param, path)
        dev = array_device(param)
        m, n = _matrix_shape(tuple(param.shape), path)
        k = m if _resolve_side(m, n, side) == "left" else n
        c = compute_dtype(xp, param.dtype)
        return {
            "momentum": xp.zeros((m, n), dtype=param.dtype if faithful else c, device=dev),
            "statistic": xp.zeros((k,), dtype=xp.float32 if faithful else c, device=dev),
        }

    # The step, in the order of the algorithm (right side; the left side is its transpose), per
    # leaf: stacking DASGO's equal matrices made its CPU step slower, eager and compiled (the
    # copies into and out of the stacks cost more than the operations they save):
    #
    #   1  M_t = μ M_{t-1} + (1-μ) G_t                                     _momentum
    #   2  v_t = β₂ v_{t-1} + (1-β₂) diag(G_tᵀ G_t)                         _squared_sums
    #   3  U_t = M_t diag(v_t + ε)^{-1/2}
    #   4  W_{t+1} = W_t - η_t (r√(mn) U_t/‖U_t‖_F + λ W_t)               _renormalise_scaled, _finish
    def update_group(grads, state, params, ctx: StepContext):
        (g,), param, xp = grads, (None if params is None else params[0]), ctx.xp
        if "mu" in state:  # not a matrix: the fallback Adam
            (u,), new = fallback(g, state, param, ctx)
            return (u,), new
        m, n = state["momentum"].shape
        axis = 1 if _resolve_side(m, n, side) == "left" else 0  # the axis the statistic sums over
        dtype = compute_dtype(xp, g.dtype)
        g_mat = cast(xp, xp.reshape(g, (m, n)), dtype)
        momentum = _momentum(xp, state["momentum"], g_mat, b1, faithful, _zero(ctx, g_mat))
        momentum = ctx.unless_skipped(momentum, state["momentum"])  # 1
        q = cast(xp, _squared_sums(xp, g_mat, axis), state["statistic"].dtype)
        v = ctx.unless_skipped(_ema(xp, state["statistic"], q, b2, faithful), state["statistic"])  # 2
        scale = computed_once(xp, cast(xp, 1.0 / xp.sqrt(v + eps), dtype))  # 3: diag(v_t + ε)^{-1/2}
        u = _renormalise_scaled(xp, cast(xp, momentum, dtype), scale, axis, rms_target, faithful)  # 3, 4
        neg_lr = ctx.negated("learning_rate", learning_rate, dtype, array_device(g))
        return (_finish(xp, u, param, tuple(g.shape), neg_lr, weight_decay),), {"momentum": momentum, "statistic": v}

    fallback = partial(_fallback_step, (learning_rate, fallback_b1, fallback_b2, fallback_eps, fallback_weight_decay, faithful))

    return build_transform(
        name="dasgo",
        init_group=init_group,
        update_group=update_group,
        on_nonfinite=on_nonfinite,
        needs_params=not is_zero(weight_decay) or not is_zero(fallback_weight_decay),
    )


# ------------------------------------------------------------------------------------------------
# Helpers of the two steps: each docstring states the formula it computes; the forms that differ
# from that formula (for a compiler, or for scale invariance) are checked against it in
# tests/methods/test_asgo_helpers.py.


def _param(params: Any, index: int) -> Optional[Array]:
    """The parameter of group ``index`` (``None`` when the transform was given none)."""
    return None if params[index] is None else params[index][0]


def _momentum(xp: Any, old: Array, g: Array, b1: float, faithful: bool, zero: Array) -> Array:
    """``M_t = μ M_{t-1} + (1-μ) G_t`` in the momentum's dtype; principled mode flushes entries
    below the smallest normal number to ``zero`` (a 0-D zero of that dtype; D12, :func:`_flush_subnormal`)."""
    momentum = _ema(xp, old, cast(xp, g, old.dtype), b1, faithful)
    return momentum if faithful else _flush_subnormal(xp, momentum, zero)


def _layout_hint(found: dict[str, tuple], layout: dict[str, tuple]) -> str:
    """For a state whose statistic has another block layout than this ``block_size`` makes (one
    saved by another setting, e.g. by a version whose default was no blocking): the
    ``block_size`` that continues it."""
    if "statistic" not in found or "statistic" not in layout:
        return ""
    shape = found["statistic"][0]
    if found["statistic"] == layout["statistic"]:
        return ""
    what = "is unblocked" if len(shape) == 2 and "statistic_tail" not in found else f"has blocks of {shape[-1]}"
    again = f"block_size={shape[-1]}" + (" (or larger)" if len(shape) == 2 else "")
    return (
        f" Or a state saved with another block size: its statistic {shape} {what}; build the optimizer with "
        f"{again} to continue from it (the principled default is {PRINCIPLED_BLOCK_SIZE}; earlier versions did not block)"
    )


def _chunk_rows(xp: Any, x: Array, b: int, full: int) -> Array:
    """The first ``full·b`` rows of each matrix of ``x`` (a matrix or a stack ``(L, rows,
    columns)``) as one stack ``(L·full, b, columns)`` of row chunks, the chunks of each matrix in
    order; ``x`` itself when ``full == 0`` (unblocked)."""
    if not full:
        return x
    return xp.reshape(x[..., : full * b, :], (-1, b, x.shape[-1]))


def _second_moment(xp: Any, p_old: Array, x: Array, b2: float, summed: bool, faithful: bool) -> Array:
    """``P_t = β₂ P_{t-1} + (1-β₂) X Xᵀ`` (``summed``: ``P_{t-1} + X Xᵀ``) per block of a stack,
    in the statistic's dtype; principled mode stores it symmetrised (D10)."""
    s = cast(xp, x @ x.mT, p_old.dtype)
    p = p_old + s if summed else _ema(xp, p_old, s, b2, faithful)
    return p if faithful else symmetrize(p)


def _as_stack(xp: Any, x: Array) -> Array:
    """A matrix as a stack of one block; a stack as itself."""
    return x if x.ndim == 3 else xp.expand_dims(x, axis=0)


def _blockwise(xp: Any, x: Array) -> Array:
    """Per-block scalars ``(n,)`` shaped ``(n, 1, 1)`` to scale a stack of blocks."""
    return xp.expand_dims(xp.expand_dims(x, axis=-1), axis=-1)


def _damped_inverse_sqrt(
    xp: Any, p: Array, damping: float, eps: float, method: str, steps: int, tolerance: Optional[float]
) -> tuple[Array, Array]:
    r"""``(P + sI)^{-1/2}`` with ``s = δ tr(P)/k + ε`` per block of a stack of PSD statistics, and
    per block whether the iterative root fell back to ``eigh`` (int32; D1, D5).

    Computed in the scale-invariant form (D12): the root of ``P/τ + (δ + ε/τ) I``, ``τ = tr(P)/k``,
    times ``τ^{-1/2}``, which is the same matrix; neither the eigensolver nor an iteration's
    Frobenius normaliser then sees a statistic whose squares under- or overflow. The eigenvalues of
    ``P/τ + shift`` lie in ``[δ, k + δ]``: a condition number below ``k/δ + 1``, which the default 10
    Polar-Express steps cover for ``k/δ`` up to ~1e8 (spec I15). ``P = 0`` gives ``ε^{-1/2} I``.
    """
    tau = trace(p) / p.shape[-1]
    zero = tau <= 0.0  # P = 0 (PSD): the root is ε^{-1/2} I, from τ = 1 and shift ε
    tau = select(xp, zero, xp.ones_like(tau), tau)
    shift = select(xp, zero, xp.zeros_like(tau), damping + xp.zeros_like(tau)) + eps / tau
    z, fell_back = inverse_root(p / _blockwise(xp, tau), 2, shift=shift, method=method, steps=steps, tolerance=tolerance)
    return z * _blockwise(xp, tau**-0.5), fell_back


def _faithful_inverse_sqrt(xp: Any, p: Array, method: str, steps: int, eps: float) -> tuple[Array, Array]:
    """The authors' root: ``steps`` iterations (Polar-Express or Newton–Schulz) towards
    ``P^{-1/2}`` of the *undamped* statistic, ``eps`` only in the iteration's normaliser; never
    checked, so no block falls back (the second result is all zeros)."""
    no_fallback = xp.zeros(p.shape[:1], dtype=xp.int32, device=placement(xp, p))
    if method == "polar_express":
        return inverse_sqrt_polar_express(p, steps, eps=eps), no_fallback
    return inverse_sqrt_newton_schulz(p, steps, eps=eps), no_fallback


def _finite_root_or_previous(
    xp: Any, p: Array, previous: Array, inverse_sqrt: Callable[[Any, Array], tuple[Array, Array]]
) -> tuple[Array, Array, Array]:
    """Per block of a stack: ``Z = inverse_sqrt(P)`` where ``P`` and ``Z`` are finite, else
    ``previous`` (D6); returns (roots, failed, fell back), the last two int32 per block.

    A non-finite statistic never reaches the decomposition (NumPy and torch ``eigh`` raise on it,
    JAX returns NaN): the identity is rooted in its place and the block counts as failed.
    """
    p_ok = all_finite(p, axis=(-2, -1))
    z, fell_back = inverse_sqrt(xp, select(xp, _blockwise(xp, p_ok), p, identity_like(p)))
    ok = xp.logical_and(all_finite(z, axis=(-2, -1)), p_ok)
    return select(xp, _blockwise(xp, ok), z, previous), xp.astype(xp.logical_not(ok), xp.int32), fell_back


def _unrefreshed(xp: Any, p: Array, previous: Array) -> tuple[Array, Array, Array]:
    """A stack of blocks whose phase is not due on this call: its roots as they were, no failure
    and no fallback counted (the other branch of :func:`_finite_root_or_previous`)."""
    none = xp.zeros(p.shape[:1], dtype=xp.int32, device=placement(xp, p))
    return previous, none, none


_ROOT_OF = {"statistic": "root", "statistic_tail": "root_tail"}


def _root_units(
    xp: Any, stacks: list[MatrixStack], statistics: list[dict[str, Array]], previous: Callable, split: bool
) -> tuple[list[tuple[Array, Array]], list[tuple[int, str]], list[tuple[str, int]]]:
    """The units a refresh schedules, ``(P, previous Z)`` stacks of blocks, with the owner of each
    (``(stack, statistic name)``, units listed in block order) and its phase key ``(matrix sides in
    increasing order, block index along the side)`` (:func:`precond_ref.engine.phases.hashed_phases`).

    A stack's statistic is one unit, but (``split``) for a side of several chunks, whose blocks
    take different phases: one unit per block. The tail is one unit, index the number of chunks.
    The key holds the sides, not the path: a leaf's phases must not depend on how the parameters
    are named (torch's named and unnamed parameters, optax's tree paths) or grouped, so that a
    resumed or regrouped run refreshes on the same steps; and in increasing order, so that a weight
    and its transpose (an out-first conv weight and a Flax kernel) refresh alike (spec §4, I1, I6).
    """
    units, owners, keys = [], [], []
    for index, (s, entries) in enumerate(zip(stacks, statistics)):
        sides = str(tuple(sorted(s.g.shape[-2:])))
        p = _as_stack(xp, entries["statistic"])
        chunks = p.shape[0] // len(s.leaves) if p.shape[-1] < s.g.shape[-2 if s.left else -1] else 0
        z = _as_stack(xp, previous(xp, s, "statistic", entries["statistic"]))
        if split and chunks > 1:
            units += [(p[j : j + 1, ...], z[j : j + 1, ...]) for j in range(p.shape[0])]
            keys += [(sides, j % chunks) for j in range(p.shape[0])]
            owners += [(index, "statistic")] * p.shape[0]
        else:
            units.append((p, z))
            keys.append((sides, 0))
            owners.append((index, "statistic"))
        if "statistic_tail" in entries:
            p = entries["statistic_tail"]
            units.append((_as_stack(xp, p), _as_stack(xp, previous(xp, s, "statistic_tail", p))))
            keys.append((sides, chunks))
            owners.append((index, "statistic_tail"))
    return units, owners, keys


def _collect_roots(
    xp: Any, owners: list[tuple[int, str]], stacks: list[MatrixStack], statistics: list[dict], refreshed: list[tuple]
) -> list[dict[str, Array]]:
    """Per stack: its roots in the shapes of its statistics (the units of one statistic joined in
    order) and, where any of its blocks was refreshed, per leaf the sums of its blocks' failure and
    fallback counts (int32: a vector, one entry per leaf; 0-D for a leaf alone in its stack)."""
    parts: dict[tuple[int, str], list[tuple]] = {}
    for owner, result in zip(owners, refreshed):
        parts.setdefault(owner, []).append(result)
    roots: list[dict[str, Any]] = [{} for _ in stacks]
    for (index, name), results in parts.items():
        zs = [z for z, _, _ in results]
        z = zs[0] if len(zs) == 1 else xp.concat(zs, axis=0)
        roots[index][_ROOT_OF[name]] = z if statistics[index][name].ndim == 3 else z[0, ...]
        if all(failed is None for _, failed, _ in results):
            continue
        leaves = len(stacks[index].leaves)
        for position, counter in ((1, "root_failures"), (2, "root_fallbacks")):
            counts = [r[position] if r[position] is not None else xp.zeros(r[0].shape[:1], dtype=xp.int32, device=placement(xp, r[0])) for r in results]
            per_block = cast(xp, counts[0] if len(counts) == 1 else xp.concat(counts, axis=0), xp.int32)
            if leaves == 1:
                per_leaf = xp.sum(per_block, dtype=xp.int32)
            elif per_block.shape[0] == leaves:
                per_leaf = per_block
            else:
                per_leaf = xp.sum(xp.reshape(per_block, (leaves, -1)), axis=1, dtype=xp.int32)
            entry = roots[index]
            entry[counter] = entry[counter] + per_leaf if counter in entry else per_leaf
    return roots


def _block_diagonal_product(
    xp: Any, z: Array, z_tail: Optional[Array], momentum: Array, left: bool, dtype: Any
) -> Array:
    """``U = Z M`` (``left``) or ``M Z`` with ``Z = blockdiag(Z_1, ..., Z_c, Z_tail)``, in
    ``dtype``, for a momentum ``M`` (a matrix, or a stack of ``L`` matrices, each with its own
    ``Z``). ``z`` holds the roots: one k×k matrix per momentum (unblocked: a matrix, or a stack
    ``(L, k, k)``), or the ``c`` chunks of each in order (a stack ``(L·c, b, b)``, ``b < k``);
    ``z_tail`` the tail roots, if any (one per momentum). Blocked on the right it is ``M Zᵀ``,
    equal for the symmetric roots of statistics.

    Unblocked, the product is taken in the natural orientation, so faithful mode multiplies as
    the authors do; blocked, on the rows of the oriented momentum (its transpose on the right).
    """
    z_p = cast(xp, z, dtype)
    m_p = cast(xp, momentum, dtype)
    k, b = m_p.shape[-2 if left else -1], z_p.shape[-1]
    if b == k:
        return z_p @ m_p if left else m_p @ z_p
    m_o = m_p if left else m_p.mT
    full = k // b
    u_o = xp.reshape(z_p @ _chunk_rows(xp, m_o, b, full), (*m_o.shape[:-2], full * b, m_o.shape[-1]))
    if z_tail is not None:
        u_o = xp.concat([u_o, cast(xp, z_tail, dtype) @ m_o[..., full * b :, :]], axis=-2)
    return u_o if left else u_o.mT


def _squared_sums(xp: Any, g: Array, axis: int) -> Array:
    """``Σ_i G_ij²`` (``axis=0``: ``diag(GᵀG)``; ``axis=1``: ``diag(GGᵀ)``), by :func:`_sum_across`.

    On JAX the squares are formed as ``(G/2)·G`` and the sums doubled (exact but for subnormals),
    so that XLA does not share one ``G·G`` with the non-finite check's sum and write it out for
    two CPU reductions (``docs/backends.md``, ASGO and DASGO).
    """
    if is_jax_namespace(xp):
        return _sum_across(xp, (g * 0.5) * g, axis) * 2
    return _sum_across(xp, g * g, axis)


def _renormalise_scaled(
    xp: Any, m: Array, scale: Array, axis: int, rms_target: Optional[float], faithful: bool
) -> Array:
    """``r√(mn) U/‖U‖_F`` for ``U = M diag(s)`` (``axis=0``; ``diag(s) M`` for ``axis=1``), a zero
    ``U`` staying zero (D2); ``U`` itself for ``rms_target=None``.

    Faithful mode forms ``U`` and renormalises it as ASGO does (:func:`_rms_renormalise`).
    Principled mode never needs ``U`` before the pass that writes the step: ``‖U‖_F²`` comes from
    the column sums of ``M²`` (:func:`_scaled_squared_norm`) and the factor joins the per-column
    scale. float32 is summed in float64 where the backend has it (:func:`_wide_dtype`), else
    without float64 by :func:`_column_factored_renormalise` (D12 at any scale).
    """
    rows, columns = m.shape
    if faithful or rms_target is None or rows * columns == 0:
        return _rms_renormalise(xp, m * xp.expand_dims(scale, axis=axis), rms_target, faithful)
    target = rms_target * math.sqrt(rows * columns)
    wide = _wide_dtype(xp, m)
    if wide is None:
        return _column_factored_renormalise(xp, m, scale, axis, target)
    m_w, scale_w = xp.astype(m, wide), xp.astype(scale, wide)
    factor = _renormalising_factor(xp, _scaled_squared_norm(xp, m_w, scale_w, axis), target)
    return xp.astype(m_w * xp.expand_dims(computed_once(xp, scale_w * factor), axis=axis), m.dtype)
