"""The fallback rule of a matrix method: the leaves it does not precondition (biases, norms, any
leaf a ``fallback_mask`` names) step by an element-wise rule of their own (ASGO's and DASGO's
bias-corrected Adam, ``methods/asgo.py``). This module routes the leaves to it and runs it: all
such leaves in one element-wise pass per dtype and device (:func:`fallback_leaves`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

from .._backend import array_device, cast
from ..tree import Path, path_str, tree_flatten
from .context import StepContext
from .joined import leafwise

__all__ = ["FallbackMask", "FallbackRule", "fallback_predicate", "fallback_step", "fallback_leaves"]

Array = Any
FallbackMask = Union[None, Any, Callable[[Path, Array], bool]]


class FallbackRule(NamedTuple):
    """An element-wise rule for the leaves a matrix method does not precondition, of one leaf (or
    of many joined into one flat vector: nothing in it reads a shape), with ``c`` its configuration
    (which holds ``learning_rate``):

    ``init(xp, c, w) -> State`` (a NamedTuple of arrays in ``w``'s shape);
    ``scalars(xp, c, count, minus_lr) -> Step``: the step's scalars from ``count`` (the updates
    before this one, a 0-D int32 array) and ``-η_t`` (a 0-D array of the state's dtype), made once
    per step, dtype and device;
    ``state(xp, c, s, g, w, h) -> State``: the state after this step (``g`` and ``w`` in the
    state's dtype; ``w`` is ``None`` when the transform does not read the parameters);
    ``update(xp, c, s, g, w, h)``: the step added to the parameter, from the state after it.
    """

    State: type
    init: Callable
    scalars: Callable
    state: Callable
    update: Callable


def fallback_predicate(fallback_mask: FallbackMask) -> Callable[[Path, Array], bool]:
    """``(path, leaf) -> bool``: does this leaf go to the fallback rule? ``None``: leaves of fewer
    than 2 dimensions; a callable ``(path, leaf) -> bool``; or a tree of bools like the parameters."""
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


def fallback_step(rule: FallbackRule, c: Any, g: Array, state: dict, param: Any, ctx: StepContext) -> tuple:
    """The fallback rule's step of one leaf (or of leaves joined), as ``((update,), new state)``:
    the gradient and parameter cast to the state's dtype, the step's scalars made once per update
    (``-η_t`` the one the matrix step shares, :meth:`StepContext.negated`), and the new state
    selected for the non-finite rule before the update is formed from it."""
    xp = ctx.xp
    old = rule.State(**state)
    dtype, device = old[0].dtype, array_device(old[0])
    g = cast(xp, g, dtype)
    w = None if param is None else cast(xp, param, dtype)
    h = ctx.once(("fallback", dtype, device),
                 lambda: rule.scalars(xp, c, ctx.count, ctx.negated("learning_rate", c.learning_rate, dtype, device)))
    new = rule.State(*(ctx.unless_skipped(n, o) for n, o in zip(rule.state(xp, c, old, g, w, h), old)))
    return (rule.update(xp, c, new, g, w, h),), new._asdict()


def fallback_leaves(xp: Any, grads: list, states: list, params: Any, ctx: StepContext, rule: FallbackRule, c: Any) -> tuple:
    """The groups' results with the fallback rule's leaves (those whose state is ``rule.State``'s)
    stepped, all of them in one pass (:func:`~precond_ref.engine.joined.leafwise`), the others
    ``None``; and the indices of the others (the matrix leaves)."""
    names = rule.State._fields
    results: list[Any] = [None] * len(grads)
    ours = [i for i, state in enumerate(states) if set(state) == set(names)]
    with_param = bool(ours) and params[ours[0]] is not None

    def step(g: Array, *arrays: Array) -> tuple:  # the leaf's entries, then its parameter
        (u,), new = fallback_step(rule, c, g, dict(zip(names, arrays)), arrays[-1] if with_param else None, ctx)
        return (u, *(new[k] for k in names))

    operands = [[grads[i][0] for i in ours], *([states[i][k] for i in ours] for k in names)]
    operands += [[params[i][0] for i in ours]] if with_param else []
    for i, (u, *entries) in zip(ours, leafwise(xp, step, *operands, ctx=ctx) if ours else ()):
        results[i] = ((u,), dict(zip(names, entries)))
    return results, [i for i, result in enumerate(results) if result is None]
