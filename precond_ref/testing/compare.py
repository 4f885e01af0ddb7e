"""Compare two trajectories and say where they part: the first step, parameter and index.

An element of a candidate's parameters *diverges* from the reference when
``|candidate - reference| > atol + rtol * |reference|`` (NumPy's ``allclose`` rule), or when
exactly one of the two is not finite. Steps are scanned in order (step 0 is the initial
parameters, step ``t`` the parameters after ``t`` updates), and within a step the leaves in tree
order and the elements in row-major order, so the reported divergence is the first one an
implementation produces. These helpers need NumPy; arrays of any backend are accepted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from ..tree import path_str, tree_flatten
from .trajectory import Trajectory, to_numpy

__all__ = ["Divergence", "Comparison", "compare_trajectories", "assert_trajectories_close", "default_tolerances"]

# Tolerances by the precision of the runs compared (the lower of the two).
_TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (1e-5, 1e-7)}


def default_tolerances(dtype: str) -> tuple[float, float]:
    """``(rtol, atol)`` used when none are given: (1e-10, 1e-12) for float64, (1e-5, 1e-7) otherwise.

    The float32 values are per-step agreement for identical arithmetic in a different order;
    long float32 runs of chaotic problems can legitimately drift further.
    """
    return _TOLERANCES.get(dtype, _TOLERANCES["float32"])


@dataclasses.dataclass(frozen=True)
class Divergence:
    """The first element where two trajectories disagree beyond tolerance.

    Attributes
    ----------
    step:
        0 for the initial parameters, ``t`` for the parameters after ``t`` updates.
    path:
        The parameter's leaf path (``"fc1/weight"``).
    index:
        The element's index in that parameter (``()`` for a 0-D parameter).
    reference, candidate:
        The two values.
    abs_error:
        ``|candidate - reference|`` (``inf`` when it is not finite).
    rel_error:
        ``abs_error / max(|reference|, |candidate|)`` (0 when both are 0).
    tolerance:
        ``atol + rtol * |reference|`` at this element.
    count:
        How many elements of all parameters diverge at this step.
    """

    step: int
    path: str
    index: tuple
    reference: float
    candidate: float
    abs_error: float
    rel_error: float
    tolerance: float
    count: int

    def __str__(self) -> str:
        where = "the initial parameters" if self.step == 0 else f"step {self.step} (after update {self.step})"
        index = "" if self.index == () else f" at index {self.index}"
        return (
            f"first divergence at {where}: parameter {self.path!r}{index}: reference {self.reference!r}, "
            f"candidate {self.candidate!r}, |difference| {self.abs_error:.3e} (relative {self.rel_error:.3e}, "
            f"tolerance {self.tolerance:.3e}); {self.count} element(s) diverge at this step"
        )


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_trajectories`.

    Attributes
    ----------
    ok:
        True when no element diverges on the steps both trajectories have, and their lengths agree.
    first_divergence:
        The first :class:`Divergence`, or ``None``.
    steps_compared:
        Number of parameter sets compared (``min`` of the two lengths).
    max_abs_error, max_rel_error:
        Per step, the largest absolute and relative difference over all elements. An element that
        is the same NaN or infinity in both counts as 0, one that is not finite in one only as ``inf``.
    loss_abs_error:
        Per step, ``|candidate loss - reference loss|`` by the same rule (empty when a side has no losses).
    rtol, atol:
        The tolerances used.
    lengths:
        The two trajectories' numbers of parameter sets.
    """

    ok: bool
    first_divergence: Optional[Divergence]
    steps_compared: int
    max_abs_error: list
    max_rel_error: list
    loss_abs_error: list
    rtol: float
    atol: float
    lengths: tuple

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines = []
        if self.first_divergence is None:
            # Agreeing values with different lengths is no agreement: the first line says both.
            both = "" if self.lengths[0] == self.lengths[1] else "the "
            lines.append(
                f"trajectories agree on {both}{self.steps_compared} parameter sets "
                f"{'both have ' if both else ''}(rtol {self.rtol:g}, atol {self.atol:g}); "
                f"max relative difference {max(self.max_rel_error, default=0.0):.3e}"
            )
        else:
            lines.append(str(self.first_divergence))
        if self.lengths[0] != self.lengths[1]:
            lines.append(f"lengths differ: reference has {self.lengths[0]} parameter sets, candidate {self.lengths[1]}")
        lines.append("step  max |difference|  max relative" + ("  |loss difference|" if self.loss_abs_error else ""))
        for t in range(self.steps_compared):
            loss = f"  {self.loss_abs_error[t]:.3e}" if t < len(self.loss_abs_error) else ""
            flag = "  <- first divergence" if self.first_divergence is not None and t == self.first_divergence.step else ""
            lines.append(f"{t:4d}  {self.max_abs_error[t]:16.3e}  {self.max_rel_error[t]:12.3e}{loss}{flag}")
        return "\n".join(lines)


def _as_steps(trajectory: Any) -> tuple[list[list[tuple[str, Any]]], list]:
    """Per step, the (path, leaf) pairs; and the losses if known."""
    if isinstance(trajectory, Trajectory):
        sets, losses = trajectory.params, list(trajectory.losses)
    elif isinstance(trajectory, Sequence) and not isinstance(trajectory, (str, bytes)):
        sets, losses = list(trajectory), []
    else:
        raise TypeError(
            "a trajectory must be a precond_ref.testing.Trajectory or a sequence of parameter trees, "
            f"got {type(trajectory).__name__}"
        )
    steps = []
    for tree in sets:
        leaves, treedef = tree_flatten(tree)
        steps.append([(path_str(p), leaf) for p, leaf in zip(treedef.paths, leaves)])
    return steps, losses


def _precision(trajectory: Any, first_leaf: Any) -> str:
    if isinstance(trajectory, Trajectory):
        return trajectory.dtype
    return "float64" if "64" in str(getattr(first_leaf, "dtype", "")) else "float32"


def _loss_difference(a: float, b: float) -> float:
    """``|a - b|``, by the parameters' rule: 0 for the same NaN or infinity, else infinite if not finite."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    difference = abs(a - b)
    return difference if math.isfinite(difference) else math.inf


def compare_trajectories(
    reference: Any,
    candidate: Any,
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> Comparison:
    """Compare ``candidate`` with ``reference``, step by step and element by element.

    Parameters
    ----------
    reference, candidate:
        :class:`~precond_ref.testing.Trajectory` objects, or sequences of parameter trees
        (``[params_0, params_1, ...]``, nested dicts/lists of arrays of any backend) with the same
        leaf paths and shapes.
    rtol, atol:
        Tolerances of the ``allclose`` rule; by default :func:`default_tolerances` of the lower
        precision of the two.

    Returns
    -------
    Comparison
        Truthy when they agree; ``str()`` gives a readable report, including the first step,
        parameter path and index where they diverge and by how much.
    """
    import numpy as np

    ref_steps, ref_losses = _as_steps(reference)
    cand_steps, cand_losses = _as_steps(candidate)
    if not ref_steps or not cand_steps:
        raise ValueError("cannot compare an empty trajectory")
    ref_paths = [p for p, _ in ref_steps[0]]
    cand_paths = [p for p, _ in cand_steps[0]]
    if sorted(ref_paths) != sorted(cand_paths):
        raise ValueError(f"the trajectories have different parameters: reference {ref_paths}, candidate {cand_paths}")
    # Match leaves by path: the order may differ between steps (JAX rebuilds dicts with sorted keys).
    reordered = []
    for t, step in enumerate(cand_steps):
        by_path = dict(step)
        if sorted(by_path) != sorted(ref_paths):
            raise ValueError(f"step {t}: the candidate has parameters {sorted(by_path)}, the reference {sorted(ref_paths)}")
        reordered.append([(p, by_path[p]) for p in ref_paths])
    cand_steps = reordered
    precisions = {_precision(reference, ref_steps[0][0][1]), _precision(candidate, cand_steps[0][0][1])}
    default = default_tolerances("float64" if precisions == {"float64"} else "float32")
    rtol = default[0] if rtol is None else float(rtol)
    atol = default[1] if atol is None else float(atol)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not value >= 0.0:  # a negative or NaN tolerance flags every element, agreeing ones too
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    n = min(len(ref_steps), len(cand_steps))
    first = None
    max_abs, max_rel = [], []
    for t in range(n):
        step_abs = step_rel = 0.0
        count = 0
        step_first = None
        for (path, r_leaf), (_, c_leaf) in zip(ref_steps[t], cand_steps[t]):
            r = np.asarray(to_numpy(r_leaf), dtype=np.float64)
            c = np.asarray(to_numpy(c_leaf), dtype=np.float64)
            if r.shape != c.shape:
                raise ValueError(f"step {t}: parameter {path!r} has shape {r.shape} in the reference, {c.shape} in the candidate")
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(c - r)
                both = np.maximum(np.abs(r), np.abs(c))
                rel = np.where(diff == 0.0, 0.0, diff / np.where(both > 0.0, both, 1.0))
                tol = atol + rtol * np.abs(r)
                finite_mismatch = np.isfinite(r) != np.isfinite(c)
                same_nonfinite = ~np.isfinite(r) & ~np.isfinite(c) & ((r == c) | (np.isnan(r) & np.isnan(c)))
                bad = finite_mismatch | (~same_nonfinite & ~(diff <= tol))
                # An element that is the same NaN or infinity in both runs agrees: difference 0.
                # Any other non-finite difference (a NaN or infinity against a number, +inf
                # against -inf, or an overflow) is infinite, so the report never prints NaN.
                diff = np.where(same_nonfinite, 0.0, np.where(np.isfinite(diff), diff, np.inf))
                rel = np.where(same_nonfinite, 0.0, np.where(np.isfinite(rel), rel, np.inf))
            if diff.size:
                step_abs = max(step_abs, float(np.max(diff)))
                step_rel = max(step_rel, float(np.max(rel)))
            count += int(np.count_nonzero(bad))
            if step_first is None and bad.any():
                flat = int(np.flatnonzero(bad.reshape(-1))[0])
                index = tuple(int(i) for i in np.unravel_index(flat, r.shape)) if r.ndim else ()
                step_first = (path, index, float(r[index]), float(c[index]), float(diff[index]), float(rel[index]), float(tol[index]))
        max_abs.append(step_abs)
        max_rel.append(step_rel)
        if first is None and step_first is not None:
            path, index, rv, cv, d, rl, tl = step_first
            first = Divergence(t, path, index, rv, cv, d, rl, tl, count)
    loss_errors = []
    if ref_losses and cand_losses:
        loss_errors = [_loss_difference(float(a), float(b)) for a, b in zip(ref_losses[:n], cand_losses[:n])]
    lengths = (len(ref_steps), len(cand_steps))
    return Comparison(
        ok=first is None and lengths[0] == lengths[1],
        first_divergence=first,
        steps_compared=n,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        loss_abs_error=loss_errors,
        rtol=rtol,
        atol=atol,
        lengths=lengths,
    )


def assert_trajectories_close(reference: Any, candidate: Any, *, rtol: Optional[float] = None, atol: Optional[float] = None) -> Comparison:
    """:func:`compare_trajectories`, raising ``AssertionError`` with the report when they differ."""
    comparison = compare_trajectories(reference, candidate, rtol=rtol, atol=atol)
    if not comparison.ok:
        raise AssertionError(str(comparison))
    return comparison
