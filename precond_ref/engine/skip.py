"""The non-finite rule, in one place: the test of a step's gradient (finite, and small enough that
every statistic built from it stays finite), the decision it gives (skip, or raise naming the
leaf), and its selections of the gradients a step computes on, the updates the parameters receive,
the state a step keeps and the counters it advances. The run loop (:mod:`~precond_ref.engine.run`)
and the in-place per-leaf step (:mod:`~precond_ref.engine.elementwise`) apply these same functions."""

from __future__ import annotations

import math
from typing import Any, Sequence

from array_api_compat import is_jax_namespace

from .._backend import (
    cast, compute_dtype, device_key, finite_or_zero, host_all_finite, host_bool, is_dense, is_tracer, select,
    selected_by_runs, sums_of_squares, torch_compiling,
)
from ..transform import PrecondState
from ..tree import Path, path_str
from .joined import leafwise

__all__ = [
    "OVERFLOW_MARGIN", "gradient_ok", "first_bad_gradient", "decision", "gradient_used", "entry_kept", "update_applied",
    "skipped_gradients", "finite_updates", "selected_state", "counted",
]

Array = Any


#: A gradient whose squared norm reaches this fraction of the largest number of its compute dtype
#: is treated like a non-finite one: every statistic built from products of gradient entries
#: (squares, outer products, Gram matrices, sums over the tensor) and scaled by up to 2^32 (a batch
#: size, a 1/damping) then stays finite. ‖g‖ ≥ 2.8e14 in float32, 6e149 in float64: a gradient
#: no training produces, whose squares would overflow a float32 statistic already at 1.8e19.
OVERFLOW_MARGIN = 2.0**-32


def gradient_ok(xp: Any, leaves: Sequence[Array]) -> Array:
    """0-D bool array: every gradient leaf is finite with a squared norm below the overflow margin.

    One sum of squares per leaf (in the compute dtype): NaN or Inf make it NaN or Inf, and a
    comparison with NaN is false; a compiler fuses it into one pass over each gradient, the only
    reduction the step's skip decision waits for.
    """
    wides: dict[Any, list[Array]] = {}
    for leaf in leaves:
        dtype = compute_dtype(xp, leaf.dtype)
        wides.setdefault((dtype, device_key(leaf)), []).append(cast(xp, leaf, dtype))  # 0-D results stack
    # One comparison per dtype and device, not per leaf: the 0-D operations of a step are kernel
    # launches on a GPU, and a model has dozens of small leaves.
    ok = None
    for (dtype, _), arrays in wides.items():
        values = sums_of_squares(xp, arrays)  # one operation for all, where the backend has one
        values = values if values is not None else [_sum_of_squares(xp, x) for x in arrays]
        limit = xp.finfo(dtype).max * OVERFLOW_MARGIN
        group_ok = values[0] < limit if len(values) == 1 else xp.all(xp.stack(values) < limit)
        ok = group_ok if ok is None else xp.logical_and(ok, group_ok)
    return ok


def decision(name: str, xp: Any, leaves: Sequence[Array], paths: Sequence[Path], on_nonfinite: str,
             given_ok: Any = None) -> tuple[Any, bool]:
    """The step's decision: ``ok`` (0-D bool: the step is applied) and whether it is known on the
    host to be applied (``finite_step``); with ``on_nonfinite="raise"``, ``FloatingPointError``
    naming the first offending leaf instead of a skip. ``given_ok``: the decision of a larger tree
    whose leaves are stepped one by one (``build_transform``'s ``independent_leaves``)."""
    if given_ok is not None and on_nonfinite == "raise":
        raise ValueError(f"{name}: gradients_ok is the skip decision of on_nonfinite='skip'")
    ok = gradient_ok(xp, leaves) if given_ok is None else given_ok
    if on_nonfinite == "raise":
        if is_tracer(ok):
            raise ValueError(
                f"{name}: on_nonfinite='raise' needs concrete arrays and cannot run under jax.jit; use on_nonfinite='skip'")
        if not bool(ok):
            raise FloatingPointError(f"{name}: {first_bad_gradient(xp, leaves, paths)}")
    # Where reading the skip predicate costs no synchronisation (NumPy, torch on the CPU,
    # eagerly), a step known to be finite makes none of the skip's selections: they would
    # select their first operand. Except of an operand that is not dense, whose selection
    # would also lay it out anew (is_dense): the later steps then round as they would have.
    # Every other step (a skipped one included) selects element-wise, never reading a device
    # value.
    return ok, on_nonfinite == "raise" or host_bool(xp, ok) is True


# The selections element-wise, one function per operand of a step.


def gradient_used(xp: Any, ok: Array, g: Array, zero: Array) -> Array:
    """The gradient a step computes on: ``g``, or zeros on a skipped step (its results are
    discarded, and NaN or huge inputs would only raise warnings or LAPACK errors on the way)."""
    return select(xp, ok, g, zero)


def entry_kept(xp: Any, ok: Array, new: Array, old: Array) -> Array:
    """A state entry after a step: ``new``, or ``old`` on a skipped step."""
    return select(xp, ok, new, old)


def update_applied(xp: Any, ok: Array, u: Array, zero: Array) -> Array:
    """The update the parameters receive: ``u`` with its non-finite entries zeroed, zeros on a
    skipped step. Two selections, not one on ``ok & isfinite(u)``: XLA's CPU backend does not fuse
    an expensive producer of ``u`` (a division) into a consumer that reads ``u`` twice, and would
    write ``u`` out."""
    return finite_or_zero(xp, select(xp, ok, u, zero), zero)


def skipped_gradients(xp: Any, ok: Any, finite_step: bool, grads: list, zeros: list, elementwise: bool) -> list:
    """The gradients a step computes on (:func:`gradient_used`, each leaf with its 0-D ``zeros``)
    for every leaf but a dense one of a step known to be applied. Not on JAX for a method with
    reductions or matmuls (not ``elementwise``): JAX neither warns nor raises (its factorisations
    return NaN), and XLA's CPU backend cannot fuse the selection into a column reduction (YNNPACK)
    or a matmul reading the gradient, so it wrote a zeroed copy. An element-wise method's loops
    take the selection in (measured: docs/backends.md)."""
    if not elementwise and is_jax_namespace(xp):
        return grads
    chosen = [i for i in range(len(grads)) if not (finite_step and is_dense(grads[i]))]
    grads = list(grads)
    used = leafwise(xp, lambda g, zero: gradient_used(xp, ok, g, zero), [grads[i] for i in chosen],
                    zeros=[zeros[i] for i in chosen])
    for i, g in zip(chosen, used):
        grads[i] = g
    return grads


def finite_updates(xp: Any, ok: Any, finite_step: bool, updates: list, zeros: list) -> list:
    """The updates the parameters receive: never a NaN or Inf, whatever a method's numerics did;
    a step not known to be applied selects element-wise (:func:`update_applied`, no device read),
    fused into the kernels computing it; ``finite_step`` is ``True`` for ``on_nonfinite="raise"``."""
    if not finite_step:  # the finite test below would not read the host
        return leafwise(xp, lambda u, zero: update_applied(xp, ok, u, zero), updates, zeros=zeros)
    if not host_all_finite(xp, updates):  # the step's own test reads nothing else
        return leafwise(xp, lambda u, zero: finite_or_zero(xp, u, zero), updates, zeros=zeros)
    return updates


def selected_state(xp: Any, ok: Any, finite_step: bool, settled: Any, old_groups: dict, new_groups: dict) -> dict:
    """The new state: each entry, or its old value on a skipped step; the entries of one name
    selected at once (:func:`precond_ref._backend.selected_by_runs`). An entry the step left
    untouched, or that the method selected (in ``settled``), needs no selection; nor does a dense
    one of a step known to be applied."""
    new_groups = {key: {**entries} for key, entries in new_groups.items()}
    pending: dict[str, list] = {}  # by entry name, in group order: (group, name, new, old)
    for key, entries in new_groups.items():
        for k, v in entries.items():
            old = old_groups[key][k]
            if v is not old and v not in settled and not (finite_step and is_dense(v)):
                pending.setdefault(k, []).append((key, k, v, old))
    items = [item for same in pending.values() for item in same]
    selected = selected_by_runs(xp, ok, [item[2] for item in items], [item[3] for item in items])
    for (key, k, _, _), v in zip(items, selected):
        new_groups[key][k] = v
    return new_groups


def counted(xp: Any, ok: Any, finite_step: bool, state: PrecondState, groups: dict) -> PrecondState:
    """The state after the step, with ``groups``: an applied step advances ``count`` (one addition
    when known on the host), a skipped one ``nonfinite_count``."""
    if finite_step:
        return PrecondState(count=state.count + 1, nonfinite_count=state.nonfinite_count, groups=groups)
    applied = xp.astype(ok, xp.int32)
    return PrecondState(count=state.count + applied, nonfinite_count=state.nonfinite_count + (1 - applied), groups=groups)


def _sum_of_squares(xp: Any, x: Array) -> Array:
    """``Σ x²``; under ``torch.compile`` summed along the rows first: the same sum in another order.

    TorchInductor's CPU code sums a whole tensor in one loop that carries its partial sum through
    memory (cascade summation), slower than the contiguous row sums (measured in
    ``records/backends-measurements.md``, "The contract's step"). The trailing axes are merged, not
    split: rows that cut across the tensor's own rows make it slower still. Eagerly the two sums
    would be two operations (kernel launches on a GPU) where one does; XLA gains nothing.
    """
    square = x * x
    if x.ndim < 2 or not torch_compiling():
        return xp.sum(square)
    return xp.sum(xp.sum(xp.reshape(square, (x.shape[0], math.prod(x.shape[1:]))), axis=-1))


def first_bad_gradient(xp: Any, leaves: Sequence[Array], paths: Sequence[Path], noun: str = "leaf") -> str:
    """What makes the first failing gradient fail :func:`gradient_ok`, naming it (``noun``: what
    the caller's API calls it, a leaf of a tree or a framework's parameter) by its path."""
    for path, leaf in zip(paths, leaves):
        if not bool(xp.all(xp.isfinite(leaf))):
            return f"non-finite gradient in {noun} {path_str(path)!r}"
        if not bool(gradient_ok(xp, [leaf])):
            return f"gradient of {noun} {path_str(path)!r} too large for the statistics (squared norm above {OVERFLOW_MARGIN} x the largest float)"
    return "non-finite gradient"  # pragma: no cover
