"""The non-finite rule's test: is a step's gradient usable (finite, and small enough that every
statistic built from it stays finite)?"""

from __future__ import annotations

import math
from typing import Any, Sequence

from array_api_compat import is_jax_namespace

from .._backend import cast, compute_dtype, device_key, finite_or_zero, select, sums_of_squares, torch_compiling
from ..tree import Path, path_str

__all__ = ["OVERFLOW_MARGIN", "gradient_ok", "first_bad_gradient", "gradient_used", "entry_kept", "update_applied"]

Array = Any


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
        wides.setdefault(_dtype_and_device(leaf, dtype), []).append(cast(xp, leaf, dtype))
    sums: dict[Any, list[Array]] = {}
    for key, arrays in wides.items():
        together = sums_of_squares(xp, arrays)  # one operation for all, where the backend has one
        if together is None and is_jax_namespace(xp):
            together = _stacked_sums(xp, arrays)
        sums[key] = together if together is not None else [_sum_of_squares(xp, x) for x in arrays]
    # One comparison per dtype and device, not per leaf: the 0-D operations of a step are kernel
    # launches on a GPU, and a model has dozens of small leaves.
    ok = None
    for (dtype, _), values in sums.items():
        limit = xp.finfo(dtype).max * OVERFLOW_MARGIN
        if len(values) == 1 and values[0].ndim == 0:
            group_ok = values[0] < limit
        elif all(v.ndim == 0 for v in values):
            group_ok = xp.all(xp.stack(values) < limit)
        else:  # some sums come as the rows of a stack (_stacked_sums)
            group_ok = xp.all(xp.concat([xp.reshape(v, (-1,)) for v in values]) < limit)
        ok = group_ok if ok is None else xp.logical_and(ok, group_ok)
    return ok


# The non-finite rule element-wise, one function per operand of a step: the in-place step
# (engine.elementwise) and the run loop (engine.run) apply these same selections.


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


#: entries: the largest leaf :func:`_stacked_sums` stacks with others of its shape (a copy of it).
STACKED_SUM_MAX_ELEMENTS = 2**16


def _stacked_sums(xp: Any, arrays: Sequence[Array]) -> list:
    """``Σ x²`` of each array, on JAX: the arrays of one shape of at most
    :data:`STACKED_SUM_MAX_ELEMENTS` entries stacked, each stack's sums one row sum (a (k,) vector
    of its arrays' sums), the others summed alone (0-D). XLA's CPU backend reduces a small array
    alone in up to three kernels (its square, a windowed partial sum, the sum), and a model has
    dozens of small leaves (biases, norms' scales); a stack of them is one copy and two kernels."""
    by_shape: dict = {}
    for x in arrays:
        small = math.prod(x.shape) <= STACKED_SUM_MAX_ELEMENTS and x.ndim > 0
        by_shape.setdefault(tuple(x.shape) if small else ("alone", len(by_shape)), []).append(x)
    out = []
    for same in by_shape.values():
        if len(same) == 1:
            out.append(_sum_of_squares(xp, same[0]))
        else:
            square = xp.stack(same)
            square = square * square
            out.append(xp.sum(xp.reshape(square, (len(same), math.prod(same[0].shape))), axis=1))
    return out


def _dtype_and_device(leaf: Array, dtype: Any) -> tuple:
    """A key grouping leaves whose 0-D results can be stacked: ``dtype`` and the leaf's device."""
    return (dtype, device_key(leaf))


def first_bad_gradient(xp: Any, leaves: Sequence[Array], paths: Sequence[Path]) -> str:
    for path, leaf in zip(paths, leaves):
        if not bool(xp.all(xp.isfinite(leaf))):
            return f"non-finite gradient in leaf {path_str(path)!r}"
        if not bool(gradient_ok(xp, [leaf])):
            return f"gradient of leaf {path_str(path)!r} too large for the statistics (squared norm above {OVERFLOW_MARGIN} x the largest float)"
    return "non-finite gradient"  # pragma: no cover
