"""The fallback Adam of a matrix method: the leaves it does not precondition (biases, norms, any
leaf a ``fallback_mask`` names) take a bias-corrected Adam step, as in the authors' trainers
(ASGO, DASGO). Such a leaf's state is ``mu``, ``nu`` (the Adam moments in the leaf's shape); all
of them step in one element-wise pass per dtype and device (:func:`fallback_leaves`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

from .._backend import array_device, cast, compute_dtype, ema, is_zero
from ..transform import ScalarOrSchedule, check_nonnegative, check_positive, check_unit_interval
from ..tree import Path, path_str, tree_flatten
from .context import StepContext
from .matrices import joined_leaves

__all__ = ["FallbackMask", "FallbackAdam", "fallback_predicate", "adam_init", "adam_update", "fallback_leaves"]

Array = Any
FallbackMask = Union[None, Any, Callable[[Path, Array], bool]]


class FallbackAdam(NamedTuple):
    """The fallback Adam's hyperparameters. ``faithful``: ``torch.optim.Adam`` (weight decay as an
    L2 term, EMA in ``torch.lerp`` form, state in the parameter's dtype); else decoupled weight
    decay (AdamW) and state in the compute dtype."""

    learning_rate: ScalarOrSchedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    faithful: bool

    @classmethod
    def checked(cls, learning_rate, b1, b2, eps, weight_decay, faithful) -> "FallbackAdam":
        """The hyperparameters as the user gave them (``fallback_b1`` ...), validated."""
        check_unit_interval("fallback_b1", b1)
        check_unit_interval("fallback_b2", b2)
        check_positive("fallback_eps", eps)
        check_nonnegative("fallback_weight_decay", weight_decay)
        return cls(learning_rate, b1, b2, eps, weight_decay, faithful)


def fallback_predicate(fallback_mask: FallbackMask) -> Callable[[Path, Array], bool]:
    """``(path, leaf) -> bool``: does this leaf go to the fallback Adam? ``None``: leaves of fewer
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


def adam_init(xp: Any, param: Array, faithful: bool) -> dict[str, Array]:
    """``mu = nu = 0`` in the parameter's shape."""
    dtype = param.dtype if faithful else compute_dtype(xp, param.dtype)
    zeros = xp.zeros(param.shape, dtype=dtype, device=array_device(param))
    return {"mu": zeros, "nu": zeros}


def adam_update(
    g: Array, state: dict[str, Array], param: Optional[Array], ctx: StepContext, h: FallbackAdam
) -> tuple[Array, dict[str, Array]]:
    """Bias-corrected Adam: ``mu = b1 mu + (1-b1) g``, ``nu = b2 nu + (1-b2) g²``, the step
    ``-lr mu/(1-b1^t) / (sqrt(nu/(1-b2^t)) + eps)``, weight decay as :class:`FallbackAdam` says."""
    xp = ctx.xp
    dtype = state["mu"].dtype
    dev = array_device(state["mu"])
    g = cast(xp, g, dtype)
    w = None if param is None else cast(xp, param, dtype)
    if h.faithful and not is_zero(h.weight_decay):
        g = g + h.weight_decay * w
    mu = ctx.unless_skipped(ema(state["mu"], g, h.b1, h.faithful), state["mu"])
    nu = ctx.unless_skipped(h.b2 * state["nu"] + (1.0 - h.b2) * (g * g), state["nu"])
    lr = ctx.scalar("learning_rate", h.learning_rate, dtype, dev)

    def corrections() -> tuple[Array, Array]:
        t = xp.astype(ctx.count + 1, dtype)
        bc1 = 1.0 - h.b1**t
        bc2 = 1.0 - h.b2**t
        # (-lr)/bc1 is -(lr/bc1) exactly; -lr is the step's own, made once (StepContext.negated)
        return ctx.negated("learning_rate", h.learning_rate, dtype, dev) / bc1, xp.sqrt(bc2)

    neg_step, root_bc2 = ctx.once(("fallback_adam", dtype, dev), corrections)
    update = neg_step * (mu / (xp.sqrt(nu) / root_bc2 + h.eps))
    if not h.faithful and not is_zero(h.weight_decay):
        update = update - (lr * h.weight_decay) * w
    return update, {"mu": mu, "nu": nu}


def adam_step(h: FallbackAdam, g: Array, state: dict, param: Optional[Array], ctx: StepContext) -> tuple:
    """The fallback Adam's step of one leaf (or of leaves joined), as ``((update,), new state)``."""
    u, new = adam_update(g, state, param, ctx, h)
    return (u,), new


def fallback_leaves(xp: Any, grads: list, states: list, params: Any, ctx: StepContext, h: FallbackAdam) -> tuple:
    """The groups' results with the fallback Adam's leaves (state ``mu``) stepped, all of them in
    one pass (:func:`precond_ref.engine.matrices.joined_leaves`), the others ``None``; and the
    indices of the others (the matrix leaves)."""
    results: list[Any] = [None] * len(grads)
    adam = [i for i, state in enumerate(states) if "mu" in state]
    leaves = [(grads[i][0], states[i], None if params[i] is None else params[i][0]) for i in adam]
    for i, result in zip(adam, joined_leaves(xp, lambda *a: adam_step(h, *a), leaves, ctx)):
        results[i] = result
    return results, [i for i, state in enumerate(states) if "mu" not in state]
