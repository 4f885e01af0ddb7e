r"""MBF: mini-block Fisher preconditioning (Bahamou, Goldfarb, Ren, AISTATS 2023)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

from array_api_compat import array_namespace

from .._backend import array_device, as_operand, cast, compute_dtype, cond, device_key, host_bool, is_zero, placement
from ..blocking import chunk_sizes, on_stacks
from ..linalg import all_finite, damped_inverse, damped_inverse_init, damped_inverse_stable, kl_clip_of_quadratic
from ..engine.phases import phase_share, refresh_runs, warmup_phase_due
from ..engine import FLAT_MAX_ELEMENTS, StepContext, build_transform, leafwise, weight_bias_groups
from ..transform import (
    Array,
    PrecondState,
    ScalarOrSchedule,
    Transform,
    check_choice,
    check_learning_rate,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from ..tree import Path, path_str, tree_flatten, tree_unflatten

__all__ = ["mbf", "MBFTransform"]

_FC_BLOCKS = ("columns_avg", "official_chunks")
_SECOND_MOMENTS = ("momentum", "gradient")

# Block kinds of a group (fixed by shapes and names, so Python-level, never traced).
_FC = "fc"  # 2-D weight [+ bias]: one O x O statistic per layer
_CONV = "conv"  # ndim >= 3 weight: one q x q statistic per (output, input) channel pair
_ELEMENTWISE = "elementwise"  # block size 1: 1x1 convs and FC layers above max_block_dim
_DIAGONAL = "diagonal"  # every other leaf: the authors' Adam-like rule for BN / conv biases
_KL_CLIP = 1e-4  # principled default of kl_clip (see the docstring, deviation B7)
_BLOCK_SIZE = 128  # principled default of block_size (measured: docs/methods/mbf.md, "Long axes")
_TAIL = "_tail"  # state-key suffix of the shorter last block of a blocked FC output axis


class MBFTransform(Transform):
    """:class:`~precond_ref.Transform` of :func:`mbf`, plus ``warm_start(state, grads_batches)``.

    Still the 2-tuple ``(init, update)``; ``warm_start`` is an attribute of the instance.
    """

    warm_start: Callable[[PrecondState, Iterable[Any]], PrecondState]


# --------------------------------------------------------------------------------------------
# Weight/bias pairing from tree paths (specs README section 5) and out-first canonicalisation.


def _is_out_last(path: Path, leaf: Any) -> bool:
    return bool(path) and path[-1] == "kernel" and len(leaf.shape) >= 2


def _to_out_first_perm(ndim: int) -> tuple[int, ...]:
    """Out-last (s..., I, O) -> out-first (O, I, s...); (I, O) -> (O, I)."""
    return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))


def _canonical(tree: Any) -> tuple[Any, Any, list[bool], list[Any]]:
    """``tree`` with every out-last ``kernel`` permuted to out-first (``tree`` itself when it has
    none); its treedef; which were; the canonical tree's leaves."""
    leaves, treedef = tree_flatten(tree)
    flags = [_is_out_last(path, leaf) for path, leaf in zip(treedef.paths, leaves)]
    if not any(flags):
        return tree, treedef, flags, leaves
    xp = array_namespace(*leaves)
    leaves = [
        xp.permute_dims(leaf, _to_out_first_perm(len(leaf.shape))) if flag else leaf for leaf, flag in zip(leaves, flags)
    ]
    return tree_unflatten(treedef, leaves), treedef, flags, leaves


def _restore(tree: Any, treedef: Any, flags: list[bool]) -> Any:
    """Inverse of :func:`_canonical` on a tree of the same structure."""
    if not any(flags):
        return tree
    leaves, _ = tree_flatten(tree)
    xp = array_namespace(*leaves)
    out = []
    for leaf, flag in zip(leaves, flags):
        if flag:
            perm = _to_out_first_perm(len(leaf.shape))
            leaf = xp.permute_dims(leaf, tuple(perm.index(k) for k in range(len(perm))))
        out.append(leaf)
    return tree_unflatten(treedef, out)


# --------------------------------------------------------------------------------------------
# Block kinds and the block layout of a group, from out-first shapes alone (static).


def _kind(leaves: Sequence[Any], max_block_dim: Optional[int]) -> str:
    weight = leaves[0]
    ndim = len(weight.shape)
    if len(leaves) == 2 or ndim == 2:
        big = max_block_dim is not None and weight.shape[0] > max_block_dim
        return _ELEMENTWISE if big else _FC
    if ndim >= 3:
        return _ELEMENTWISE if math.prod(weight.shape[2:]) == 1 else _CONV
    return _DIAGONAL


def _block_shape(leaves: Sequence[Any]) -> tuple[int, ...]:
    shape = tuple(leaves[0].shape)
    if len(shape) >= 3:
        return (shape[0], shape[1], math.prod(shape[2:]))
    return (shape[0], shape[1] + len(leaves) - 1)


def _to_block(xp: Any, leaves: Sequence[Any]) -> Any:
    """A group's gradient in block layout: [W | b] as (O, I[+1]), a conv weight as (O, C, q)."""
    weight = leaves[0]
    if len(weight.shape) >= 3:
        return xp.reshape(weight, _block_shape(leaves))
    if len(leaves) == 2:
        return xp.concat([weight, xp.expand_dims(leaves[1], axis=1)], axis=1)
    return weight


def _from_block(xp: Any, block: Any, leaves: Sequence[Any]) -> tuple[Any, ...]:
    """Inverse of :func:`_to_block`, shaped like ``leaves``."""
    weight = leaves[0]
    if len(weight.shape) >= 3:
        return (xp.reshape(block, tuple(weight.shape)),)
    if len(leaves) == 2:
        n_in = weight.shape[1]
        return (block[:, :n_in], block[:, n_in])
    return (block,)


# --------------------------------------------------------------------------------------------
# Blocking of a long FC output axis (principled; specs README section 6): the O x O statistic of
# ``columns_avg`` becomes ``full`` diagonal b x b blocks (one stack) plus a ``tail`` x ``tail``
# block for the rest. Every formula below acts on a leading ``...`` stack axis, so a blocked layer
# is one stack of row chunks of [W | b] and its tail, each its own mini-block Fisher statistic.


def _parts(kind: str, block_shape: tuple[int, ...], block_size: Optional[int]) -> tuple[tuple[str, int, int, Optional[tuple]], ...]:
    """The statistic blocks of a group as ``(state-key suffix, first row, end row, stack shape)``:
    one part covering every row unless an FC group's output axis is blocked, then the ``full`` row
    chunks as one stack ``(full, b, I')`` and the ``tail`` rows (suffix ``_tail``) as a matrix."""
    o = block_shape[0]
    if kind != _FC:
        return (("", 0, o, None),)
    b, full, tail = chunk_sizes(o, block_size)
    if not full:
        return (("", 0, o, None),)
    parts = (("", 0, full * b, (full, b) + tuple(block_shape[1:])),)
    return parts + ((_TAIL, full * b, o, None),) if tail else parts


def _statistic_shapes(kind: str, block_shape: tuple[int, ...], block_size: Optional[int]) -> dict[str, tuple[int, ...]]:
    """State-key suffix -> statistic shape of each part of a group: (O, C, q, q) for a conv,
    the block layout itself for block size 1, (O, O) for an unblocked FC group, and
    (full, b, b) plus (tail, tail) for a blocked one."""
    if kind == _CONV:
        return {"": block_shape + (block_shape[-1],)}
    if kind == _ELEMENTWISE:
        return {"": block_shape}
    return {
        suffix: (stack[:-2] if stack else ()) + ((stop - start, stop - start) if stack is None else (stack[-2], stack[-2]))
        for suffix, start, stop, stack in _parts(kind, block_shape, block_size)
    }


def _split_rows(xp: Any, x: Array, parts: Sequence[tuple]) -> list[Array]:
    """``x`` (block layout) cut into its parts (:func:`_parts`); ``[x]`` when unblocked (no copy)."""
    if len(parts) == 1:  # every row: unblocked, or full blocks only (a view)
        return [x if parts[0][3] is None else xp.reshape(x, parts[0][3])]
    return [x[start:stop, ...] if stack is None else xp.reshape(x[start:stop, ...], stack) for _, start, stop, stack in parts]


def _join_rows(xp: Any, pieces: Sequence[Array], parts: Sequence[tuple]) -> Array:
    """Inverse of :func:`_split_rows`."""
    if len(pieces) == 1 and parts[0][3] is None:
        return pieces[0]
    rows = [xp.reshape(p, (stop - start,) + tuple(p.shape[-1:])) for p, (_, start, stop, _) in zip(pieces, parts)]
    return rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)


# --------------------------------------------------------------------------------------------
# The formulas of one step, per block kind, each on a stack of blocks (any leading axes).


def _block_statistic(xp: Any, kind: str, g: Array, chunks: bool) -> Array:
    r"""The mini-block statistic of a gradient in block layout: :math:`g_b g_b^\top` per conv block,
    (O, C, q) -> (O, C, q, q); :math:`g \odot g` for block size 1; :math:`H_g H_g^\top/(I+1)` for an
    FC group (``columns_avg``), or the authors' chunks (:func:`_faithful_chunk_statistic`)."""
    if kind == _CONV:
        return xp.expand_dims(g, axis=-1) * xp.expand_dims(g, axis=-2)
    if kind == _ELEMENTWISE:
        return g * g
    if chunks:
        return _faithful_chunk_statistic(xp, g)
    return (g @ g.mT) / g.shape[-1]


def _faithful_chunk_statistic(xp: Any, h: Array) -> Array:
    r"""B1, the authors' FC statistic :math:`R^\top R/(I+1)` with :math:`R` the row-major reshape of
    :math:`H` (O, I+1) to (I+1, O): a raw ``view``, not a transpose (spec ``mbf.md`` 2.2 step 3)."""
    rows = xp.reshape(h, (h.shape[1], h.shape[0]))
    return (rows.mT @ rows) / h.shape[1]


def _precondition(xp: Any, kind: str, inverse: Array, m: Array, chunks: bool) -> Array:
    r""":math:`D_b = F_b^{-1} m_b` per mini-block: (O, C, q, q) times (O, C, q) for a conv,
    :math:`F^{-1} \odot m` for block size 1, :math:`F^{-1} H_m` for an FC group (``columns_avg``),
    or the authors' chunks (:func:`_faithful_chunk_precondition`)."""
    if kind == _CONV:
        return (inverse @ xp.expand_dims(m, axis=-1))[..., 0]
    if kind == _ELEMENTWISE:
        return inverse * m
    if chunks:
        return _faithful_chunk_precondition(xp, inverse, m)
    return inverse @ m


def _faithful_chunk_precondition(xp: Any, inverse: Array, h: Array) -> Array:
    r"""B1, the authors' FC direction: every row :math:`r` of :math:`R_m` = row-major reshape of
    :math:`H_m` to (I+1, O) becomes :math:`F^{-1} r`; the rows are reshaped back to (O, I+1)."""
    rows = xp.reshape(h, (h.shape[1], h.shape[0]))
    return xp.reshape(rows @ inverse.mT, tuple(h.shape))


def _ema_statistic(
    xp: Any, kind: str, statistic: Array, failures: Array, g: Array, rho: Array, chunks: bool
) -> tuple[Array, Array]:
    r""":math:`F \leftarrow \rho F + (1-\rho)\,\mathrm{stat}(g)` (:func:`_block_statistic`); a
    non-finite result (a finite float32 gradient can overflow its square) keeps :math:`F` and
    counts one failure."""
    new = rho * statistic + (1.0 - rho) * _block_statistic(xp, kind, g, chunks)
    return _finite_or_previous(xp, new, statistic, failures)


def _finite_or_previous(xp: Any, new: Array, previous: Array, failures: Array) -> tuple[Array, Array]:
    r"""``(new, failures)`` if every entry of ``new`` is finite, else ``(previous, failures + 1)``:
    ``where(all(isfinite(new)), new, previous)`` and the count. Where that decision reads on the
    host for free (:func:`precond_ref._backend.host_bool`: NumPy, a CPU tensor outside
    ``torch.compile``) a finite ``new`` is returned as it is, without the selection and the count's
    arithmetic (four operations per statistic on an eager CPU step)."""
    ok = all_finite(new, axis=tuple(range(new.ndim)))
    if host_bool(xp, ok):
        return new, failures
    return xp.where(ok, new, previous), failures + xp.astype(xp.logical_not(ok), failures.dtype)


def _elementwise_inverse(xp: Any, statistic: Array, previous: Array, damping: Any) -> tuple[Array, Array]:
    r""":math:`1/(v + \lambda)` element-wise where :math:`v` is finite, ``previous`` elsewhere; and
    whether any entry was not finite (the block-size-1 limit of the damped inverse, B4)."""
    finite = xp.isfinite(statistic)
    safe = xp.where(finite, statistic, xp.zeros_like(statistic))
    new = 1.0 / (safe + as_operand(xp, damping, statistic.dtype))
    return xp.where(finite, new, previous), xp.logical_not(xp.all(finite))


def _faithful_inverse(matrices: Array, damping: Any, previous: Array) -> tuple[Array, Array]:
    r"""B2/B6, the authors' plain ``inv``\ :math:`(F + \lambda I)`, not symmetrised and without the
    precision floor (the block-wise non-finite fallback is kept; :func:`precond_ref.linalg.damped_inverse`)."""
    return damped_inverse(matrices, damping, previous, symmetrize=False)


def _refresh_inverses(
    xp: Any,
    kinds: Sequence[str],
    statistics: Sequence[Array],
    previous: Sequence[Array],
    damping: Any,
    block_inverse: Callable[[Array, Any, Array], tuple[Array, Array]],
    run: tuple[int, int] = (0, 1),
    phases: int = 1,
) -> tuple[list[Array], list[Array]]:
    r"""The :math:`(F_b + \lambda I)^{-1}` of every statistic part (``block_inverse``, or
    :func:`_elementwise_inverse` for block size 1) whose blocks belong to the phases ``run`` =
    ``(first, stop)`` of ``phases``, the previous inverse for the others; and per part whether any
    refreshed block was flagged (B2, B6).

    The equal-size blocks of all parts (FC blocks of one size, convs with one kernel size) form
    one stack (:func:`precond_ref.blocking.on_stacks`); the run refreshes its contiguous share
    of each stack (:func:`_phase_share`) by one batched call. Element-wise parts refresh in phase 0."""

    def square(a: Array) -> Array:
        return _shaped(xp, a, (math.prod(a.shape[:-2]), a.shape[-1], a.shape[-1]))

    def invert(stack: Array, before: Array) -> tuple[Array, Array]:
        n = stack.shape[0]
        start, stop = phase_share(n, *run, phases)
        if stop - start == n:
            return block_inverse(stack, as_operand(xp, damping, stack.dtype), before)
        flagged = xp.zeros(stack.shape[:1], dtype=xp.bool, device=placement(xp, stack))
        if start == stop:
            return before, flagged
        inverse, flagged_share = block_inverse(
            stack[start:stop, ...], as_operand(xp, damping, stack.dtype), before[start:stop, ...]
        )
        inverse = xp.concat([before[:start, ...], inverse, before[stop:, ...]], axis=0)
        return inverse, xp.concat([flagged[:start], xp.astype(flagged_share, xp.bool), flagged[stop:]], axis=0)

    matrices = [(square(s), square(p)) for k, s, p in zip(kinds, statistics, previous) if k != _ELEMENTWISE]
    inverted = iter(on_stacks(xp, invert, matrices))
    inverses, flags = [], []
    for kind, statistic, before in zip(kinds, statistics, previous):
        if kind != _ELEMENTWISE:
            inverse, flagged_blocks = next(inverted)
            inverse, flagged = _shaped(xp, inverse, tuple(statistic.shape)), xp.any(flagged_blocks)
        elif run[0] == 0:
            inverse, flagged = _elementwise_inverse(xp, statistic, before, damping)
        else:
            inverse, flagged = before, xp.zeros((), dtype=xp.bool, device=placement(xp, before))
        inverses.append(inverse)
        flags.append(flagged)
    return inverses, flags


def _add_flags(
    xp: Any, counts: Sequence[Array], before: Sequence[Array], owners: Sequence[int], flags: Sequence[Array]
) -> list[Array]:
    """Each group's failure count after one run of refreshes: ``before + 1`` (``before``: its count
    when the call's refreshes began) where any of its statistic parts (``owners[k]`` is the group
    of part ``k``) was flagged by this run, else ``counts`` unchanged. So a call counts one failure
    per flagged group, however its phases were split into runs (:func:`_refresh_runs`). A count
    that is still ``before`` itself (the call's first run) is ``before + flagged``, the same number."""
    flagged: list[Any] = [None] * len(counts)
    for owner, flag in zip(owners, flags):
        flagged[owner] = flag if flagged[owner] is None else xp.logical_or(flagged[owner], flag)
    return [
        c if f is None else b + xp.astype(f, b.dtype) if c is b else xp.where(f, b + 1, c)
        for c, b, f in zip(counts, before, flagged)
    ]


def _inner(xp: Any, a: Array, b: Array) -> Array:
    r""":math:`\langle a, b\rangle = \sum a_{j\ldots} b_{j\ldots}` over every axis, as a 0-D array: the
    dot product of the two flattened (dense: views) arrays, which reads each operand once, where
    ``sum(a * b)`` writes the product and reads it again (two passes more over a layer)."""
    return xp.reshape(a, (-1,)) @ xp.reshape(b, (-1,))


def _stack_key(x: Array) -> Any:
    """Arrays with equal keys (dtype and device) can be stacked."""
    return (x.dtype, device_key(x))


def _flat(xp: Any, x: Array) -> Array:
    """``x`` as a vector (a view; ``x`` itself when it is one)."""
    return x if len(x.shape) == 1 else xp.reshape(x, (-1,))


def _shaped(xp: Any, x: Array, shape: tuple[int, ...]) -> Array:
    """``x`` reshaped to ``shape`` (``x`` itself when it has it)."""
    return x if tuple(x.shape) == shape else xp.reshape(x, shape)


def _flat_key(operands: tuple) -> Any:
    """Which vectors an element-wise rule runs on concatenated (:func:`precond_ref.blocking.on_stacks`):
    those of one dtype and device of at most ``FLAT_MAX_ELEMENTS`` elements (the copies into and out
    of the concatenation cost a pass over the data, against a dozen operations per vector); a
    longer vector alone (the key ``None``)."""
    x = operands[0]
    return _stack_key(x) if x.shape[0] <= FLAT_MAX_ELEMENTS else None


def _bias_correction(xp: Any, beta: Any, count: Any, dtype: Any) -> Array:
    r""":math:`1 - \beta^{i+1}` (``count`` = :math:`i`) as ``-expm1((i+1) log β)``: no cancellation
    for β near 1 in float32 (the authors form it in float64 on the host); log 0 = -inf gives 1 for β = 0."""
    if hasattr(beta, "shape"):
        log_beta = xp.log(beta)
    else:
        log_beta = math.log(beta) if beta > 0.0 else -math.inf
    return -xp.expm1(xp.astype(count + 1, dtype) * log_beta)


# --------------------------------------------------------------------------------------------


def mbf(
    learning_rate: ScalarOrSchedule = 1e-5,
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
        :math:`\lambda=3\cdot10^{-3}`). Default 1e-5: their MNIST value, and with the default
        damping the effective heavy-ball rate :math:`\alpha/\lambda = 10^{-2}` of their CIFAR-100 run.
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
        mode bounds long axes by ``block_size`` instead; version 0.1.0 used 4096 here).
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
    ``failures`` (inverse or statistic refreshes that produced non-finite values and were
    rejected, and principled inverse refreshes that had to raise the damping, B6; one per call
    and layer however many of its blocks did); diagonal-rule
    leaves hold ``ema`` (:math:`a`) and ``second_moment`` (:math:`v`).

    On an inverse step the blocks of all layers with the same block size (FC row chunks of one
    size, convs with one kernel size) that are due are inverted by one batched call: with
    ``refresh_phases`` P, one call for the due shares where the step is known on the host (all of
    them in the warm-up, one after it), one per due share under ``jit`` without it. No step reads
    a device value (the inverse is branch-free; the intervals are host decisions given
    ``update(..., step=)``); on torch the batched inverse is ``inv_ex``, whose status stays on the
    device (:func:`precond_ref.linalg.inverse`).

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
      :math:`\lambda_b = \max(\lambda, 100\,\varepsilon\|F\|_F)`, before the LU inverse
      (:func:`precond_ref.linalg.damped_inverse_stable`): where :math:`\|F\|/\lambda \gtrsim
      1/(100\varepsilon)` (a gradient spike) the authors' inverse is garbage or singular; here it
      is accurate to 1e-2 and no longer than the exact damped inverse along any direction. Each
      refresh that raised a layer's damping counts one ``failures``.
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
    check_learning_rate("learning_rate", learning_rate)
    check_positive("damping", damping)
    check_unit_interval("momentum", momentum)
    check_unit_interval("b2", b2)
    check_nonnegative("weight_decay", weight_decay)
    check_positive_int("statistics_every", statistics_every)
    check_positive_int("precondition_every", precondition_every)
    if fc_blocks is not None:
        check_choice("fc_blocks", fc_blocks, _FC_BLOCKS)
    check_unit_interval("diagonal_b2", diagonal_b2)
    check_positive("diagonal_eps", diagonal_eps)
    check_choice("diagonal_second_moment", diagonal_second_moment, _SECOND_MOMENTS)
    if max_block_dim is not None:
        check_positive_int("max_block_dim", max_block_dim)
    if kl_clip is not None:
        check_nonnegative("kl_clip", kl_clip)
    if block_size is not None:
        check_positive_int("block_size", block_size)
    if refresh_phases is not None:
        check_positive_int("refresh_phases", refresh_phases)
        if refresh_phases > precondition_every:
            raise ValueError(
                f"refresh_phases must be at most precondition_every ({precondition_every}): each phase "
                f"refreshes on its own call of the interval, got {refresh_phases!r}"
            )
    check_choice("mode", mode, ("principled", "faithful"))
    faithful = mode == "faithful"
    if fc_blocks is None:
        fc_blocks = "official_chunks" if faithful else "columns_avg"
    chunks = fc_blocks == "official_chunks"
    if block_size is not None and (faithful or chunks):
        raise ValueError(
            f"block_size={block_size!r} needs mode='principled' with fc_blocks='columns_avg' (the authors' "
            "code and its chunked FC statistic have one O x O block per layer)"
        )
    if faithful and refresh_phases not in (None, 1):
        raise ValueError(f"refresh_phases={refresh_phases!r} needs mode='principled' (the authors refresh every inverse at once)")
    if block_size is None and not faithful and not chunks:
        block_size = _BLOCK_SIZE
    if refresh_phases is None:
        refresh_phases = 1 if faithful else max(1, precondition_every // statistics_every)
    if kl_clip is None:
        kl_clip = 0.0 if faithful else _KL_CLIP
    # An array weight decay (optax.inject_hyperparams) may be traced: always apply it then.
    decays = not is_zero(weight_decay)
    t1, t2 = statistics_every, precondition_every

    # mbngd_if_inverse (every statistics step up to T2, then every T2 steps), spread over
    # refresh_phases shares of the blocks: one interval predicate per phase.
    phase_due = tuple(
        (lambda calls, phase=phase: warmup_phase_due(calls, phase, refresh_phases, t1, t2)) for phase in range(refresh_phases)
    )

    block_inverse = _faithful_inverse if faithful else damped_inverse_stable  # B2, B6

    # ``cond`` branches are made once per (namespace, kinds): JAX caches a traced branch by the
    # function's identity, so a fresh closure per call would trace it again on every eager step.
    # A dict keyed by the namespace's name, not ``functools.cache``: dynamo warns on every
    # lru_cache-wrapped call it traces, and cannot compare modules as dict keys (nor, before
    # torch 2.13, take a module's id).
    branches: dict[tuple, tuple[Callable, Callable]] = {}

    def statistic_branches(xp: Any, kind: str) -> tuple[Callable, Callable]:
        key = ("statistic", xp.__name__, kind)
        if key not in branches:
            branches[key] = (
                lambda f, n, g, rho: _ema_statistic(xp, kind, f, n, g, rho, chunks),
                lambda f, n, g, rho: (f, n),
            )
        return branches[key]

    def inverse_branches(xp: Any, kinds: tuple[str, ...], owners: tuple[int, ...], run: tuple[int, int]) -> tuple[Callable, Callable]:
        key = ("inverse", xp.__name__, kinds, owners, run)
        if key not in branches:

            def refresh(f: list, inv: list, n: list, before: list) -> tuple[list, list]:
                inverses, flags = _refresh_inverses(xp, kinds, f, inv, damping, block_inverse, run, refresh_phases)
                return inverses, _add_flags(xp, n, before, owners, flags)

            branches[key] = (refresh, lambda f, inv, n, before: (inv, n))
        return branches[key]

    def diagonal_rule(xp: Any, g: Array, ema: Array, second: Array, ctx: StepContext) -> tuple[Array, Array, Array]:
        r"""The authors' Adam-like rule for conv biases and normalisation parameters, element-wise:
        :math:`a \leftarrow \mu a + (1-\mu) g`, :math:`v \leftarrow \beta_2' v + (1-\beta_2') a^2`
        (or :math:`g^2`), :math:`D = a / (\epsilon + \sqrt{v / (1 - \beta_2'^{\,i+1})})`; returns the
        step :math:`-\alpha_i D`, :math:`a` and :math:`v`."""
        dtype = g.dtype
        mu, beta = as_operand(xp, momentum, dtype), as_operand(xp, diagonal_b2, dtype)
        ema = mu * ema + (1.0 - mu) * g
        tracked = ema if diagonal_second_moment == "momentum" else g
        second = beta * second + (1.0 - beta) * (tracked * tracked)
        correction = ctx.once(
            ("diagonal_correction", dtype, array_device(g)), lambda: _bias_correction(xp, beta, ctx.count, dtype)
        )
        eps = as_operand(xp, diagonal_eps, dtype)
        direction = ema / (eps + xp.sqrt(second / correction))
        return direction * ctx.negated("learning_rate", learning_rate, dtype, array_device(g)), ema, second

    # -- per-group init / update (leaves are out-first here; see _canonical) ----------------------

    def init_group(leaves, paths, xp):
        kind = _kind(leaves, max_block_dim)
        dtype = compute_dtype(xp, leaves[0].dtype)
        dev = array_device(leaves[0])
        if kind == _DIAGONAL:
            zeros = xp.zeros(tuple(leaves[0].shape), dtype=dtype, device=dev)
            return {"ema": zeros, "second_moment": zeros}
        shape = _block_shape(leaves)
        zeros = xp.zeros(shape, dtype=dtype, device=dev)
        failures = xp.zeros((), dtype=xp.int32, device=dev)
        if kind == _ELEMENTWISE:
            inverse = xp.ones(shape, dtype=dtype, device=dev) / as_operand(xp, damping, dtype)
            return {"momentum": zeros, "statistic": zeros, "inverse": inverse, "failures": failures}
        state = {"momentum": zeros, "failures": failures}
        for suffix, stat_shape in _statistic_shapes(kind, shape, block_size).items():
            state["statistic" + suffix] = statistic = xp.zeros(stat_shape, dtype=dtype, device=dev)
            state["inverse" + suffix] = damped_inverse_init(statistic, as_operand(xp, damping, dtype))
        return state

    def check_layout(kind: str, shape: tuple, state: dict, paths: Sequence[Path]) -> None:
        """Refuse, naming the leaf and the argument that reproduces it, a state whose statistic
        blocks are not the ones this ``block_size`` makes (e.g. one saved before blocking)."""
        want = {"statistic" + suffix: s for suffix, s in _statistic_shapes(kind, shape, block_size).items()}
        have = {k: tuple(v.shape) for k, v in state.items() if k.startswith("statistic")}
        if have != want:
            names = ", ".join(repr(path_str(p)) for p in paths)
            old = "" if kind != _FC or len(have) != 1 else f" (block_size={shape[0]} or larger reproduces it)"
            raise ValueError(
                f"mbf: the optimizer state of {names} has statistic blocks {have}, but block_size={block_size} "
                f"makes {want}: a state saved with another block_size or max_block_dim{old}; build the "
                "optimizer with the settings that saved it (version 0.1.0's principled layout was one "
                "O x O block per FC layer: block_size at least every layer's output size, max_block_dim=4096)"
            )

    def step_sizes(xp: Any, directions: Sequence[Array], momenta: Sequence[Array], ctx: StepContext) -> list[Array]:
        r"""B7, per block group: :math:`-\alpha_i \nu`, the factor of its direction :math:`D` in the
        step, :math:`\nu = \min(1, \sqrt{\kappa/(\alpha_i^2\langle D, m\rangle)})` (one
        :func:`precond_ref.linalg.kl_clip_of_quadratic` for all groups of a dtype and device); :math:`-\alpha_i` when
        :math:`\kappa = 0`."""
        rates = [ctx.negated("learning_rate", learning_rate, d.dtype, array_device(d)) for d in directions]
        if is_zero(kl_clip):
            return rates
        stacks: dict[Any, list[int]] = {}
        for k, d in enumerate(directions):
            stacks.setdefault(_stack_key(d), []).append(k)
        sizes: list[Any] = [None] * len(directions)
        for members in stacks.values():
            first = directions[members[0]]
            lr = ctx.scalar("learning_rate", learning_rate, first.dtype, array_device(first))
            quadratics = xp.stack([_inner(xp, directions[k], momenta[k]) for k in members])
            scaled = rates[members[0]] * kl_clip_of_quadratic(xp, quadratics, lr, as_operand(xp, kl_clip, first.dtype))
            for k, size in zip(members, xp.unstack(scaled)):
                sizes[k] = size
        return sizes

    def descend(xp: Any, step: tuple, params: Any, ctx: StepContext) -> tuple:
        r"""The update of the step :math:`s = -\alpha_i D` (:func:`step_sizes`) with decoupled weight
        decay, :math:`w \leftarrow (1 - \alpha_i\,\mathrm{wd})\, w + s`: :math:`s - \alpha_i\,\mathrm{wd}\, w`."""
        if not decays:
            return step
        dtype, device = step[0].dtype, array_device(step[0])
        lr = ctx.scalar("learning_rate", learning_rate, dtype, device)
        decay = ctx.once(("decay", dtype, device), lambda: lr * as_operand(xp, weight_decay, dtype))
        return tuple(s - decay * cast(xp, p, dtype) for s, p in zip(step, params))

    # One step, Bahamou et al. 2023 Alg. 1 with the authors' schedule (spec mbf.md 2.2-2.3); i = updates
    # already applied, per layer (block leaves) or leaf (diagonal rule); b runs over the mini-blocks,
    # an FC layer's being its row chunks (_parts: a leading stack axis, one statistic per chunk):
    #   m   <- mu m + g                                                      heavy ball, raw gradient
    #   F_b <- rho F_b + (1 - rho) g_b g_b^T                 if i % T1 == 0   statistics (2.2 steps 2-3)
    #   F_b^-1 <- (F_b + lam I)^-1    if (i <= T2 and i % T1 == 0) or i % T2 == phase_b T2 // P   (B2, B6, B4)
    #   D_b = nu F_b^-1 m_b                                                  nu: KL clip (B7)
    #   diagonal rule: a <- mu a + (1-mu) g, v <- b2' v + (1-b2') a^2, D = a / (eps + sqrt(v / (1-b2'^(i+1))))
    #   w   <- (1 - alpha_i wd) w - alpha_i D
    def update_groups(grads_list, states, params_list, ctxs: list[StepContext]):
        xp, n = ctxs[0].xp, len(grads_list)
        statistics_due = ctxs[0].every(t1)
        kinds = [_kind(grads, max_block_dim) for grads in grads_list]
        dtypes = [s["ema"].dtype if k == _DIAGONAL else s["momentum"].dtype for k, s in zip(kinds, states)]
        grads_list = [tuple(cast(xp, g, dtype) for g in grads) for grads, dtype in zip(grads_list, dtypes)]
        blocked = [i for i in range(n) if kinds[i] != _DIAGONAL]
        steps, new_states = [None] * n, [None] * n  # steps: -alpha_i D per leaf (-alpha_i nu D, blocks)
        diagonal = [i for i in range(n) if kinds[i] == _DIAGONAL]  # element-wise: small leaves as one vector
        flat = [tuple(_flat(xp, x) for x in (grads_list[i][0], states[i]["ema"], states[i]["second_moment"])) for i in diagonal]
        for i, (step, ema, second) in zip(diagonal, on_stacks(xp, lambda *a: diagonal_rule(xp, *a, ctxs[0]), flat, _flat_key)):
            shape = tuple(grads_list[i][0].shape)
            steps[i] = (_shaped(xp, step, shape),)
            new_states[i] = {"ema": _shaped(xp, ema, shape), "second_moment": _shaped(xp, second, shape)}
        g = {i: _to_block(xp, grads_list[i]) for i in blocked}  # [g_W | g_b] (O, I+1), conv (O, C, q)
        parts = {i: _parts(kinds[i], tuple(g[i].shape), block_size) for i in blocked}  # row blocks (..., b, I+1)
        def heavy_ball(old: Array, grad: Array) -> Array:  # m <- mu m + g (kept on a skipped step)
            return ctxs[0].unless_skipped(as_operand(xp, momentum, old.dtype) * old + grad, old)

        # on the blocks of one layout joined end to end (leafwise)
        m = dict(zip(blocked, leafwise(xp, heavy_ball, [states[i]["momentum"] for i in blocked], [g[i] for i in blocked],
                                       ctx=ctxs[0])))
        statistic, failures = {}, {}
        for i in blocked:
            failures[i] = states[i]["failures"]
            for (suffix, *_), g_part in zip(parts[i], _split_rows(xp, g[i], parts[i])):
                statistic[i, suffix], failures[i] = cond(
                    xp, statistics_due, *statistic_branches(xp, kinds[i]),
                    states[i]["statistic" + suffix], failures[i], g_part, as_operand(xp, b2, dtypes[i]),
                )  # fmt: skip
        members = [(i, suffix) for i in blocked for suffix, *_ in parts[i]]  # every statistic part
        owners = tuple(blocked.index(i) for i, _ in members)
        inverse = {key: states[key[0]]["inverse" + key[1]] for key in members}
        counts = before = [failures[i] for i in blocked]  # a refresh call counts one failure per group
        decisions = [ctxs[0].every(interval) for interval in phase_due] if members else []
        for due, first, stop in refresh_runs(xp, decisions):  # due phases first..stop-1, one batched call
            refreshed, counts = cond(
                xp, due, *inverse_branches(xp, tuple(kinds[i] for i, _ in members), owners, (first, stop)),
                [statistic[key] for key in members], [inverse[key] for key in members], counts, before,
            )  # fmt: skip
            inverse = dict(zip(members, refreshed))
        d = {}
        for i in blocked:
            m_parts = _split_rows(xp, m[i], parts[i])
            d[i] = _join_rows(
                xp, [_precondition(xp, kinds[i], inverse[i, suffix], m_part, chunks) for (suffix, *_), m_part in zip(parts[i], m_parts)], parts[i]
            )  # fmt: skip
        sizes = step_sizes(xp, [d[i] for i in blocked], [m[i] for i in blocked], ctxs[0])  # -alpha_i nu
        for i, count, size in zip(blocked, counts, sizes):
            steps[i] = _from_block(xp, size * d[i], grads_list[i])
            new_states[i] = {"momentum": m[i], "failures": count}
            for suffix, *_ in parts[i]:
                new_states[i]["statistic" + suffix] = statistic[i, suffix]
                new_states[i]["inverse" + suffix] = inverse[i, suffix]
        return [(descend(xp, u, p, ctx), s) for u, s, p, ctx in zip(steps, new_states, params_list, ctxs)]

    def canonical_groups(paths, leaves):
        # Leaves arrive out-first (see _canonical), so a ``kernel`` is paired by its first axis.
        return weight_bias_groups(paths, leaves, kernel_out_last=False)

    inner = build_transform(
        name="mbf",
        init_group=init_group,
        update_groups=update_groups,
        group_leaves=canonical_groups,
        on_nonfinite=on_nonfinite,
        needs_params=decays,
        intervals=(t1,) + phase_due,
    )

    def init(params: Any) -> PrecondState:
        canonical = _canonical(params)[0]
        return inner.init(canonical)

    def update(grads: Any, state: PrecondState, params: Any = None, **extra: Any):
        canonical_grads, treedef, flags, leaves = _canonical(grads)
        if isinstance(state, PrecondState):
            for group in canonical_groups(treedef.paths, leaves):
                members = tuple(leaves[i] for i in group.indices)
                entries, kind = state.groups.get(group.key), _kind(members, max_block_dim)
                shape = _block_shape(members) if kind != _DIAGONAL else None
                # Only a state whose momentum fits the gradient: other mismatches are the framework's.
                if shape is not None and entries and "momentum" in entries and tuple(entries["momentum"].shape) == shape:
                    check_layout(kind, shape, entries, group.paths)
        canonical_params = None if params is None else _canonical(params)[0]
        updates, new_state = inner.update(canonical_grads, state, canonical_params, **extra)
        return _restore(updates, treedef, flags), new_state

    def warm_start(state: PrecondState, grads_batches: Iterable[Any]) -> PrecondState:
        if not isinstance(state, PrecondState):
            raise TypeError(f"mbf.warm_start: state must be the PrecondState returned by init, got {type(state)}")
        groups = dict(state.groups)
        running: dict[str, Any] = {}
        n_batches = 0
        for grads in grads_batches:
            _, treedef, _, leaves = _canonical(grads)
            xp = array_namespace(*leaves)
            finite = None
            for leaf in leaves:
                leaf_finite = xp.all(xp.isfinite(leaf))
                finite = leaf_finite if finite is None else xp.logical_and(finite, leaf_finite)
            batch_groups = canonical_groups(treedef.paths, leaves)
            _check_warm_start_batch(groups, batch_groups, leaves)
            for group in batch_groups:
                key = group.key
                entries = groups[key]
                members = tuple(leaves[i] for i in group.indices)
                kind = _kind(members, max_block_dim)
                if kind == _DIAGONAL or not entries:
                    continue
                dtype = entries["statistic"].dtype
                block = _to_block(xp, tuple(xp.astype(g, dtype) for g in members))
                parts = _parts(kind, tuple(block.shape), block_size)
                for (suffix, *_), g_part in zip(parts, _split_rows(xp, block, parts)):
                    stat = _block_statistic(xp, kind, g_part, chunks)
                    if (key, suffix) not in running:
                        zero = xp.zeros((), dtype=xp.int32, device=placement(xp, stat))
                        running[key, suffix] = (xp.zeros_like(stat), zero)
                    mean, j = running[key, suffix]
                    j = j + xp.astype(finite, j.dtype)
                    # The authors' running mean F <- ((j-1)/j) F + stat/j, over finite batches only.
                    weight = xp.astype(finite, dtype) / xp.astype(xp.maximum(j, xp.ones_like(j)), dtype)
                    stat = xp.where(finite, stat, xp.zeros_like(stat))
                    mean = xp.where(finite, (1.0 - weight) * mean + weight * stat, mean)
                    running[key, suffix] = (mean, j)
            n_batches += 1
        if n_batches == 0:
            raise ValueError("mbf.warm_start: grads_batches is empty")
        for (key, suffix), (mean, j) in running.items():
            entries = dict(groups[key])
            entries["statistic" + suffix] = xp.where(j > 0, mean, entries["statistic" + suffix])
            groups[key] = entries
        return PrecondState(state.count, state.nonfinite_count, groups)

    def _check_warm_start_batch(groups: dict, batch_groups: list, leaves: list) -> None:
        """Refuse, naming the leaves and shapes, a batch whose blocks are not the state's: a block
        whose gradient has another shape (a transposed weight, a weight without its bias) or that
        the state does not have (checked first on the blocks the state has, which name the
        culprit: a transposed weight unpairs its bias, whose block is then the missing one)."""

        def described(group) -> str:
            return ", ".join(f"{path_str(p)!r} {tuple(leaves[i].shape)}" for p, i in zip(group.paths, group.indices))

        missing = []
        for group in batch_groups:
            entries = groups.get(group.key)
            if entries is None:
                missing.append(group)
                continue
            if not entries:  # a zero-size block: no state
                continue
            members = tuple(leaves[i] for i in group.indices)
            if _kind(members, max_block_dim) == _DIAGONAL:
                entry, shape = "ema", tuple(members[0].shape)
            else:
                entry, shape = "momentum", tuple(_block_shape(members))
            found = tuple(entries[entry].shape) if entry in entries else None
            if found != shape:
                have = f"{entry!r} {found}" if found is not None else f"no {entry!r} (a block of another kind)"
                raise ValueError(
                    f"mbf.warm_start: the gradient of {described(group)} does not fit the optimizer state "
                    f"of its block (state has {have}, the gradient needs {entry!r} {shape}); a transposed "
                    "gradient, or a weight without its bias?"
                )
        if missing:
            raise ValueError(
                f"mbf.warm_start: the gradient of {described(missing[0])} is not a block of the optimizer "
                f"state (its blocks: {sorted(groups)})"
            )

    # group_leaves on the caller's (raw) tree: out-last kernels pair by their last axis
    transform = MBFTransform(init, update, inner.due, inner.matmul_precision, weight_bias_groups)
    transform.warm_start = warm_start
    return transform
