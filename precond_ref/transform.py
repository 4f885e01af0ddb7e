"""The public contract: :class:`Transform`, :class:`PrecondState`, schedules, leaf groups, and the
validation helpers every method's factory uses.

A method is a factory returning a :class:`Transform` (``init``/``update``, optax's shape). How a
method's per-group functions become one lives in :mod:`precond_ref.engine`, which runs every method
(layout, stacking, the non-finite rule, dtypes, operands, migration, execution);
:func:`build_transform` and the other names of the engine that this module has always offered stay
importable from here.

The state is a :class:`PrecondState` of arrays only (no Python scalars), so it is a JAX pytree that
``jax.jit`` can carry, and its per-group dictionaries map one-to-one onto a torch ``state_dict``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Hashable, Iterable, NamedTuple, Sequence, Union

from array_api_compat import array_namespace

from ._backend import (
    as_operand, cast, compute_dtype, computed_once, cond, cond_under_cpu_jit, float32_matmul_precision,
    float64_where_available, is_number, is_zero, placement, scalar_array, scalar_zero,
)
from .tree import Path, path_str, tree_map


__all__ = [
    "Transform", "PrecondState", "LeafGroup", "Schedule", "apply_updates", "schedule_value", "compute_dtype",
    "float64_where_available", "scalar_array", "cast", "scalar_zero", "placement", "computed_once", "is_zero",
    "is_due", "Interval", "float32_matmul_precision", "cond", "cond_under_cpu_jit", "singleton_groups",
    "missing_members", "check_interval", "check_positive", "check_nonnegative", "check_unit_interval",
    "check_choice", "check_int", "check_positive_int", "check_learning_rate", "check_bool", "check_mode",
    "check_optional", "check_principled_only", "mode_default",
]


Array = Any
Schedule = Callable[[Array], Any]
ScalarOrSchedule = Union[float, Schedule]


def _nothing_due(step: int) -> tuple[bool, ...]:
    return ()


class LeafGroup(NamedTuple):
    """Leaves that one method treats as one block (usually a single parameter)."""

    key: str
    indices: tuple[int, ...]
    paths: tuple[Path, ...]


def singleton_groups(paths: Sequence[Path], leaves: Sequence[Array]) -> list[LeafGroup]:
    """The default grouping: every leaf is its own block."""
    return [LeafGroup(path_str(p), (i,), (p,)) for i, p in enumerate(paths)]


class Transform(NamedTuple):
    """A pure optimizer: ``state = init(params)``; ``updates, state = update(grads, state, params)``.

    ``updates`` are *added* to the parameters (learning rate and sign included), as in optax.
    Methods that need more than gradients take it as keyword arguments of ``update``
    (``batch_size=`` for the root-free methods and IF-Shampoo; every method takes it, and refuses a
    keyword no method reads).

    Methods with periodic work (a root every ``precondition_every`` steps, ...) decide on which
    call it runs from the number of calls made before (skipped non-finite steps included). Given
    ``update(..., step=i)`` with ``i`` that number as a Python int, the decision is made on the
    host: no device value is read, which keeps a GPU step free of host synchronisations. Without
    it, the decision reads the state's counters (a ``lax.cond`` under ``jax.jit``; a device read
    elsewhere). ``due(i)`` returns those host decisions as a tuple of bools, which a compiled caller
    passes as ``update(..., due=due(i))`` so that the compiled code depends on them alone.

    ``group_leaves(paths, leaves)`` gives the groups of leaves the method treats as one block (a
    weight with its bias for MBF and IF-Shampoo's ``grouping="weight_bias"``), for an adapter that
    must apply :func:`missing_members`.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    due: Callable[[int], tuple[bool, ...]] = _nothing_due
    #: The float32 matmul precision ``update`` runs at (see :func:`float32_matmul_precision`).
    matmul_precision: str = "highest"
    group_leaves: Callable[[Sequence[Any], Sequence[Any]], list[LeafGroup]] = singleton_groups


class PrecondState(NamedTuple):
    """State of every method.

    Attributes
    ----------
    count:
        0-D int32 array, the number of updates applied (skipped non-finite steps excluded).
    nonfinite_count:
        0-D int32 array, the number of updates skipped because a gradient was not finite.
    groups:
        ``{group key: {name: array}}``; the key is the path string of the group's first leaf.
    """

    count: Array
    nonfinite_count: Array
    groups: dict[str, dict[str, Array]]


Interval = Union[int, Callable[[Any], Any]]


def is_due(interval: Interval, calls: Any) -> Any:
    """Whether periodic work with this interval runs on the call numbered ``calls`` (0-based).

    ``calls % interval == 0``, so the first call runs it; a callable interval is a predicate
    ``calls -> bool``. ``calls`` is a Python int (host decision, a Python bool) or a 0-D integer
    array (a 0-D bool array); predicates must accept both. An interval given as a 0-D integer
    array (``optax.inject_hyperparams`` passes one, traced under ``jax.jit``) gives a 0-D bool
    array whatever ``calls`` is, never a host read: :func:`cond` then selects on the device.
    """
    if callable(interval):
        return interval(calls)
    if not hasattr(interval, "shape") and interval == 1:
        return True  # statically: no branch, whatever calls is
    return calls % interval == 0



def schedule_value(hyperparameter: ScalarOrSchedule, count: Array) -> Any:
    """Evaluate a constant-or-schedule hyperparameter at ``count``.

    A number comes back as :func:`as_operand` makes it (a NumPy scalar as a Python float: as an
    operand it would try to absorb arrays of other namespaces, ``np.float64(0.1) * x`` fails for an
    ``array_api_strict`` array); an array as it is.
    """
    value = hyperparameter(count) if callable(hyperparameter) else hyperparameter
    return as_operand(None, value, None) if is_number(value) else value


def missing_members(groups: Sequence[LeafGroup], present: Sequence[bool]) -> list[int]:
    """The leaves without a gradient that share a group with a leaf that has one.

    The rule for a partial gradient of a multi-leaf group (in torch, a weight whose bias has no
    gradient, or the reverse): such a leaf takes part in its group's step with a zero gradient and
    is left unchanged (its update is dropped and its own step count is not advanced), so that the
    group keeps one state and one step count; at the next step where both have gradients they are
    stepped together again. ``present[i]`` says whether leaf ``i`` has a gradient. A JAX or NumPy
    gradient tree has every leaf, so only the torch adapter meets the case.
    """
    return [i for g in groups if any(present[j] for j in g.indices) for i in g.indices if not present[i]]


# --------------------------------------------------------------------------------------------
# Hyperparameter validation: a bad value raises ValueError naming the argument and the range.
# Values that are arrays (optax.inject_hyperparams passes them, possibly traced) are not checked.


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_interval(
    name: str, value: Any, low: float, high: float, *, low_closed: bool = True, high_closed: bool = False,
) -> None:
    """``value`` in the interval between ``low`` and ``high`` (closed ends as flagged)."""
    if isinstance(value, bool) or (not is_number(value) and not hasattr(value, "shape")):
        _fail(name, value, "a real number")
    if not is_number(value):
        return
    ok = (value >= low if low_closed else value > low) and (value <= high if high_closed else value < high)
    if not ok or math.isnan(value):
        lo = "[" if low_closed else "("
        hi = "]" if high_closed else ")"
        _fail(name, value, f"in {lo}{low}, {high}{hi}")


def check_positive(name: str, value: Any) -> None:
    check_interval(name, value, 0.0, math.inf, low_closed=False)


def check_nonnegative(name: str, value: Any) -> None:
    check_interval(name, value, 0.0, math.inf)


def check_unit_interval(name: str, value: Any) -> None:
    """A decay or momentum coefficient in [0, 1)."""
    check_interval(name, value, 0.0, 1.0)


def check_learning_rate(name: str, value: Any) -> None:
    """A non-negative number or a schedule ``count -> value``.

    Zero is allowed, as in ``torch.optim``: schedulers such as ``CosineAnnealingLR(eta_min=0)``
    reach it, and the step is then zero (state statistics still advance, as in Adam).
    """
    if not callable(value):
        check_nonnegative(name, value)


def check_int(name: str, value: Any, low: int, *, allow_callable: bool = False) -> None:
    """An integer at least ``low`` (not a bool), or with ``allow_callable`` a callable."""
    if allow_callable and callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        extra = " or a callable count -> bool" if allow_callable else ""
        _fail(name, value, f"an integer >= {low}{extra}")


def check_positive_int(name: str, value: Any, *, allow_callable: bool = False) -> None:
    check_int(name, value, 1, allow_callable=allow_callable)


def check_choice(name: str, value: Any, choices: Iterable[Hashable]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def check_mode(mode: Any) -> bool:
    """A method's ``mode``, ``"principled"`` or ``"faithful"``; returns whether it is ``"faithful"``."""
    check_choice("mode", mode, ("principled", "faithful"))
    return mode == "faithful"


def check_principled_only(option: str, given: Any, why: str = "", preposition: str = "with") -> None:
    """An option the authors' code does not have, ``given`` in faithful mode: raises, naming it and
    ``why`` (the caller passes ``given`` only where ``mode`` is faithful)."""
    if given:
        raise ValueError(f"{option} is not available {preposition} mode='faithful'{why}; use mode='principled'")


def mode_default(value: Any, faithful: bool, faithful_default: Any, principled_default: Any) -> Any:
    """``value``, or where it is None (left to its default) the default of the mode."""
    if value is not None:
        return value
    return faithful_default if faithful else principled_default


def check_optional(check: Callable[[str, Any], None], name: str, value: Any) -> None:
    """``check(name, value)`` unless ``value`` is ``None`` (an option left to its default)."""
    if value is not None:
        check(name, value)


# --------------------------------------------------------------------------------------------


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf-wise, each result in its parameter's dtype."""

    def add(p: Array, u: Array) -> Array:
        xp = array_namespace(p, u)
        return p + (u if u.dtype == p.dtype else xp.astype(u, p.dtype))

    return tree_map(add, params, updates)


# --------------------------------------------------------------------------------------------
# Names of the engine (precond_ref.engine) offered here since before it existed; resolved on first
# use, so that importing the contract does not import the engine, which builds on it.

_ENGINE_NAMES = {
    "build_transform": "run",
    "StepContext": "context",
    "settle_pieces": "context",
    "leafwise": "joined",
    "FLAT_MAX_ELEMENTS": "joined",
    "FLAT_MAX_TRACED_ELEMENTS": "joined",
    "weight_bias_groups": "layout",
    "gradient_ok": "skip",
    "OVERFLOW_MARGIN": "skip",
}


def __getattr__(name: str) -> Any:
    module = _ENGINE_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"precond_ref.engine.{module}"), name)
