"""The engine's runner of element-wise rules (RF-RMSProp, RF-AdamW, AGD).

An element-wise rule computes each entry of a leaf's update and state from the same entry of the
gradient, the parameter and the state alone. It is written as three pure functions of one leaf (or
of a flat vector of many: nothing in them reads a shape):

* ``init(xp, c, w, dtype) -> State``: the state of a parameter ``w``, a NamedTuple whose fields are
  arrays of ``w``'s shape in ``dtype`` (``None`` for a field the configuration switches off);
* ``state(xp, c, s, g, w, h) -> State``: the state after this step, from the state ``s``, the
  gradient ``g`` and the parameter ``w`` (both in the state's dtype; ``w`` is ``None`` when the
  rule does not read it);
* ``update(xp, c, s, g, w, h) -> update``: the step added to the parameter, from the state after
  this step;

with ``c`` the rule's configuration (a NamedTuple: its hyperparameters, as operands of the state's
dtype) and ``h`` this step's scalars, ``scalars(xp, config, t) -> NamedTuple`` (the learning rate at
this step, bias corrections; from the configuration as given and the step's :class:`StepValues`),
made once per step and dtype for all leaves.

The engine does the rest: the state's dtype, the casts of gradient and parameter into it, the
hyperparameters as operands (:func:`operands`), the scalars once per step (:func:`step_scalars`),
the non-finite rule's selection of the new state before the update is formed from it, the packing
of small leaves into one flat leaf (``build_transform(elementwise=True)``), and the checks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from .._backend import as_operand, array_device, cast, computed_once, is_number
from ..transform import Transform
from .context import StepContext
from .run import build_transform

__all__ = ["ElementwiseRule", "StepValues", "elementwise_transform", "operands", "step_scalars"]

Array = Any


class ElementwiseRule(NamedTuple):
    """An element-wise method (module docstring): its name, its state's NamedTuple class (fields
    named as the state entries are stored) and its four functions."""

    name: str
    State: type
    init: Callable[..., NamedTuple]
    scalars: Callable[..., NamedTuple]
    state: Callable[..., NamedTuple]
    update: Callable[..., Array]
    #: configuration fields read only by ``scalars`` (per-step values: the learning rate, schedules),
    #: which :func:`operands` leaves as they are
    scheduled: tuple = ("learning_rate",)
    #: step scalars formed from others (bias corrections, their quotients), which a compiler must
    #: compute once per step rather than inline into every element's loop (:func:`step_scalars`)
    computed: tuple = ()


class StepValues(NamedTuple):
    """What a rule's ``scalars`` may read of a step: ``count`` (updates applied before this one, a
    0-D int32 array), ``value(hyperparameter)`` (a constant, or a schedule at ``count``), ``extra``
    (``update``'s keyword arguments), the state's ``dtype`` and ``device``."""

    count: Any
    value: Callable[[Any], Any]
    extra: dict
    dtype: Any
    device: Any


def operands(xp: Any, config: NamedTuple, dtype: Any, scheduled: tuple = ()) -> NamedTuple:
    """``config`` with every numeric field but those ``scheduled`` as an operand of arithmetic in
    ``dtype`` (:func:`precond_ref._backend.as_operand`: a Python number as itself, an array
    hyperparameter, as ``optax.inject_hyperparams`` passes, as an array of ``dtype``); the others
    as they are."""
    return config._replace(**{
        name: as_operand(xp, value, dtype)
        for name, value in config._asdict().items()
        if name not in scheduled and (is_number(value) or (hasattr(value, "shape") and hasattr(value, "dtype")))
    })


def step_scalars(xp: Any, scalars: NamedTuple, computed: tuple) -> NamedTuple:
    """A rule's step scalars, those named in ``computed`` in the form a compiler computes once per
    step (:func:`precond_ref._backend.computed_once`: the same numbers)."""
    return scalars._replace(**{k: computed_once(xp, getattr(scalars, k)) for k in computed})


def elementwise_transform(
    rule: ElementwiseRule,
    config: NamedTuple,
    *,
    state_dtype: Callable[[Any, Any], Any],
    reads_params: bool,
    on_nonfinite: str,
) -> Transform:
    """The :class:`~precond_ref.transform.Transform` that runs ``rule`` with ``config``.

    ``state_dtype(xp, param_dtype)`` is the dtype of a leaf's state; ``reads_params``: whether the
    rule reads the parameters (then ``update`` requires them).
    """

    def init_group(leaves: tuple, paths: tuple, xp: Any) -> dict[str, Array]:
        (w,) = leaves
        dtype = state_dtype(xp, w.dtype)
        return _entries(rule.init(xp, operands(xp, config, dtype, rule.scheduled), w, dtype))

    def update_group(grads: tuple, state: dict, params: Optional[tuple], ctx: StepContext) -> tuple:
        xp = ctx.xp
        old = _fields(rule, state)
        first = next(v for v in old if v is not None)
        dtype, device = first.dtype, array_device(first)
        c = operands(xp, config, dtype, rule.scheduled)
        g = cast(xp, grads[0], dtype)
        w = cast(xp, params[0], dtype) if reads_params else None
        values = StepValues(ctx.count, ctx.value, ctx.extra, dtype, device)
        h = ctx.once((rule.name, "scalars", dtype, device), lambda: step_scalars(xp, rule.scalars(xp, config, values), rule.computed))
        new = rule.state(xp, c, old, g, w, h)
        # The non-finite rule's selection of the new state, before the update is formed from it:
        # a compiler then reads the stored entry rather than recomputing it from the old one.
        new = type(old)(*(n if n is None or n is o else ctx.unless_skipped(n, o) for n, o in zip(new, old)))
        return (rule.update(xp, c, new, g, w, h),), _entries(new)

    return build_transform(
        name=rule.name,
        init_group=init_group,
        update_group=update_group,
        on_nonfinite=on_nonfinite,
        elementwise=True,
        needs_params=reads_params,
    )


def _entries(state: NamedTuple) -> dict[str, Array]:
    """A rule's state as the engine stores it: ``{field: array}`` of the fields that are not ``None``."""
    return {name: value for name, value in state._asdict().items() if value is not None}


def _fields(rule: ElementwiseRule, entries: dict[str, Array]) -> NamedTuple:
    """The stored entries as the rule's state NamedTuple (an absent field is ``None``)."""
    return rule.State(*(entries.get(name) for name in rule.State._fields))
