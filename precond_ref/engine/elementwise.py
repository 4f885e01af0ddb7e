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
dtype, but for the ``scheduled`` fields, which are as given) and ``h`` this step's scalars,
``scalars(xp, c, t) -> NamedTuple`` (the learning rate at this step, bias corrections), written as
the paper's formulas of the configuration and the step's :class:`StepValues` ``t``, and made once
per step and dtype for all leaves (:func:`step_scalars`).

The engine does the rest: the state's dtype, the casts of gradient and parameter into it, the
hyperparameters as operands (:func:`~precond_ref.engine.options.operands`), the step's values a
rule's ``scalars`` reads (:class:`StepValues`: the step number, a hyperparameter at this step
widened to the state's dtype where it is an array of fewer bits), its scalars once per step and
every one of them that is an array cast to the state's dtype (:func:`step_scalars`), the
non-finite rule's selection of the new state before the update is formed from it, the packing
of small leaves into one flat leaf (``build_transform(elementwise=True)``), and the checks.

An adapter that can write arrays in place (the torch optimizers) may run a step through
:func:`in_place_step` instead of ``update``: the same numbers, but each leaf (and each flat pack
of small leaves) is one call of a pure per-leaf function, whose results its ``writes`` hook stores
into the parameter and the state entries, so that a compiler compiles that one small function
(once per rule, dtype and option set, for every length) rather than the step of a whole tree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

from array_api_compat import array_namespace

from .._backend import array_device, as_operand, cast, computed_once, device_key, is_dense, is_number, scalar_array, scalar_zero
from ..blocking import stack, unstack
from ..transform import PrecondState, Transform
from ..tree import path_str, tree_flatten
from .context import StepContext
from . import joined
from .joined import _dtypes, _flat
from . import skip
from .options import operands, widened
from .run import build_transform

__all__ = [
    "ElementwiseRule", "StepValues", "Writes", "EAGER_WRITES", "elementwise_transform", "in_place_step", "operands",
    "step_scalars", "step_values", "rule_step",
]

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
    #: the name of the dtype of the step number ``t.step`` and of ``t.scalar`` (:class:`StepValues`)
    #: where it is not the state's: faithful AGD's ``"float32"`` (the authors' step counter is a
    #: float32 tensor, whatever the parameters' dtype)
    counter: Optional[str] = None


class StepValues(NamedTuple):
    """What a rule's ``scalars`` reads of a step, made by the runner (:func:`step_scalars`) for each
    dtype a step's state is in:

    * ``count``: the updates applied before this one, a 0-D int32 array, and ``step``, the step
      number ``t = count + 1`` as a 0-D array of ``counter`` (the state's dtype, or the rule's
      :attr:`ElementwiseRule.counter`);
    * ``value(hyperparameter)``: its value at this step (a constant, or a schedule at ``count``),
      widened to ``dtype`` where it is an array of fewer bits
      (:func:`~precond_ref.engine.options.widened`, exact): an expression of hyperparameters is
      then formed in the step's precision or wider, and rounded to ``dtype`` once, where the runner
      casts the scalars (a float32 learning rate times a Python weight decay over float64
      parameters is not rounded to float32 on the way);
    * ``operand(hyperparameter)``: its value at this step as the configuration's fields are, an
      operand of ``dtype`` (:func:`~precond_ref._backend.as_operand`): a number as itself (a weak
      scalar), an array in ``dtype``. A factor that meets the step's arrays before the runner's
      cast takes this form where a number would be rounded to ``dtype`` there and a wider array
      would not (RF-AdamW's η_t/c₁, with c₁ in ``dtype``);
    * ``scalar(hyperparameter)``: its value at this step as a 0-D array of ``counter`` on
      ``device`` (a number too: an operand that the step's arithmetic rounds in ``counter``);
    * ``extra`` (``update``'s keyword arguments), the state's ``dtype`` and ``device``."""

    xp: Any
    count: Any
    at_count: Callable[[Any], Any]
    extra: dict
    dtype: Any
    device: Any
    counter: Any

    @property
    def step(self) -> Any:
        return self.xp.astype(self.count + 1, self.counter)

    def value(self, hyperparameter: Any) -> Any:
        return widened(self.xp, self.at_count(hyperparameter), self.dtype)

    def operand(self, hyperparameter: Any) -> Any:
        return as_operand(self.xp, self.at_count(hyperparameter), self.dtype)

    def scalar(self, hyperparameter: Any) -> Any:
        return scalar_array(self.xp, self.at_count(hyperparameter), self.counter, self.device)


def step_values(ctx: StepContext, dtype: Any, device: Any) -> StepValues:
    """The :class:`StepValues` of the step ``ctx`` runs, for a state of ``dtype`` on ``device``, the
    step number in ``dtype``: what the matrix methods' runners hand a rule's step scalars (the
    fallback Adam's bias corrections, MBF's diagonal rule's)."""
    return StepValues(ctx.xp, ctx.count, ctx.value, ctx.extra, dtype, device, dtype)


def step_scalars(xp: Any, rule: ElementwiseRule, c: NamedTuple, count: Any, at_count: Callable[[Any], Any],
                 extra: dict, dtype: Any, device: Any) -> NamedTuple:
    """``rule``'s scalars of a step whose state is of ``dtype`` on ``device``: ``rule.scalars`` of
    the configuration ``c`` (its operands of ``dtype``) and the :class:`StepValues` of ``count``
    (``at_count(hyperparameter)``: its value at this step, as given), with

    * each field that is an array cast to ``dtype``: a scalar formed of a wider array (a float64
      learning rate, as the torch optimizers and ``optax.inject_hyperparams`` over a tree with
      float64 leaves pass it, over float32 parameters) would otherwise promote the update and the
      state out of ``dtype``, and one formed in float32 (faithful AGD's) is the state's operand;
      a number stays a Python number (:func:`~precond_ref._backend.as_operand`: a weak scalar,
      rounded to the dtype of the array it meets);
    * those named in ``rule.computed`` in the form a compiler computes once per step
      (:func:`precond_ref._backend.computed_once`: the same numbers)."""
    counter = dtype if rule.counter is None else getattr(xp, rule.counter)
    h = rule.scalars(xp, c, StepValues(xp, count, at_count, extra, dtype, device, counter))
    fields = {}
    for name, v in h._asdict().items():
        if v is not None:
            v = as_operand(xp, v, dtype) if is_number(v) else cast(xp, v, dtype)
        fields[name] = computed_once(xp, v) if name in rule.computed else v
    return h._replace(**fields)


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
        h = ctx.once((rule.name, "scalars", dtype, device),
                     lambda: step_scalars(xp, rule, c, ctx.count, ctx.value, ctx.extra, dtype, device))
        new, u = rule_step(xp, rule, c, old, g, w, h, ctx.unless_skipped)
        return (u,), _entries(new)

    transform = build_transform(
        name=rule.name,
        init_group=init_group,
        update_group=update_group,
        on_nonfinite=on_nonfinite,
        elementwise=True,
        needs_params=reads_params,
    )
    transform.update.in_place = _InPlace(rule, config, state_dtype, reads_params, on_nonfinite)  # type: ignore[attr-defined]
    return transform


class Writes(NamedTuple):
    """How :func:`in_place_step` stores its results: ``kernel(key, fn, operands)`` computes
    ``results = fn(*operands)`` and writes each result into the matching one of the last
    ``len(results)`` operands (arrays of its shape and dtype); ``key`` names ``fn`` (two calls
    with equal keys get the same function). ``copy(targets, sources)`` copies each source into
    its target."""

    kernel: Callable[[tuple, Callable, tuple], None]
    copy: Callable[[list, list], None]


def _write_results(key: tuple, fn: Callable, operands: tuple) -> None:
    results = fn(*operands)
    _copy(operands[len(operands) - len(results):], results)


def _copy(targets: Any, sources: Any) -> None:
    for target, source in zip(targets, sources):
        target[...] = source


#: :class:`Writes` by item assignment, eagerly (any library whose arrays are mutable).
EAGER_WRITES = Writes(_write_results, _copy)


def in_place_step(transform: Transform) -> Optional[Callable[..., Optional[PrecondState]]]:
    """The in-place step of ``transform`` if an element-wise rule runs it, else ``None``:
    ``step(grads, state, params, writes=EAGER_WRITES, **extra)`` adds this step's updates to the
    parameters and writes the new state into the state's arrays (``writes``), and returns the new
    :class:`PrecondState` (new counters, the same arrays); ``None``, having written nothing, when
    the trees or the state do not fit (``update`` then names the problem).

    The numbers are ``update``'s, added to the parameters: per leaf the gradient, the new state
    and the update selected by the step's non-finite test (one test of the whole gradient tree,
    an operand of every call, as are the step's scalars), the update's non-finite entries zeroed.
    The leaves are those ``update`` runs: a large leaf alone, the small ones of one dtype layout
    packed into one flat leaf (copied in, and their results copied back with ``writes.copy``), as
    is a leaf whose parameter or state is not dense (no flat view of it exists). Every call is
    on 1-D operands: ``fn`` (and ``key``) depend on the rule, its options and the dtypes, not on a
    leaf's size.
    """
    return getattr(transform.update, "in_place", None)


class _InPlace:
    """The in-place step of one element-wise transform (:func:`in_place_step`)."""

    def __init__(self, rule: ElementwiseRule, config: NamedTuple, state_dtype: Callable, reads_params: bool,
                 on_nonfinite: str) -> None:
        self.rule, self.config, self.state_dtype = rule, config, state_dtype
        self.reads_params, self.on_nonfinite = reads_params, on_nonfinite
        # The configuration's fields the per-leaf function reads as constants (the scheduled ones
        # are read by ``scalars`` alone); None when one is an array (``update`` runs such a rule).
        constants = tuple((k, v) for k, v in config._asdict().items() if k not in rule.scheduled)
        self.constants = None if any(hasattr(v, "shape") for _, v in constants) else constants
        self.functions: dict[tuple, Callable] = {}
        self.layouts: dict[tuple, tuple] = {}

    def entries(self, xp: Any, w: Any) -> tuple:
        """The state's entry names and dtype ``init`` gives a parameter of ``w``'s dtype."""
        key = (xp.__name__, w.dtype)
        if key not in self.layouts:
            dtype = self.state_dtype(xp, w.dtype)
            probe = self.rule.init(xp, operands(xp, self.config, dtype, self.rule.scheduled), w[(0,) * w.ndim], dtype)
            self.layouts[key] = (tuple(_entries(probe)), dtype)
        return self.layouts[key]

    def __call__(self, grads: Any, state: Any, params: Any, writes: Writes = EAGER_WRITES, **extra: Any) -> Any:
        if self.constants is None or not isinstance(state, PrecondState) or params is None:
            return None
        grad_leaves, treedef = tree_flatten(grads)
        param_leaves, param_def = tree_flatten(params)
        if not grad_leaves or param_def.paths != treedef.paths or len(state.groups) != len(grad_leaves):
            return None
        try:
            xp = array_namespace(*grad_leaves, *param_leaves)
        except TypeError:
            return None
        members, labels = [], []  # of the leaves with a state: (g, w, *entries), the entries' names
        for path, g, w in zip(treedef.paths, grad_leaves, param_leaves):
            entries = state.groups.get(path_str(path))
            if entries is None or tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype or not xp.isdtype(g.dtype, "real floating"):
                return None
            names, dtype = self.entries(xp, w) if math.prod(w.shape) else ((), None)  # a zero-size leaf: no state
            if tuple(entries) != names or any(tuple(v.shape) != tuple(w.shape) or v.dtype != dtype for v in entries.values()):
                return None
            if names:
                members.append((g, w, *entries.values()))
                labels.append(names)
        ok, finite_step = skip.decision(self.rule.name, xp, grad_leaves, treedef.paths, self.on_nonfinite)
        value = StepContext(xp=xp, count=state.count, extra=extra).value
        scalars: dict = {}
        targets, sources = [], []
        for s in stack(xp, [tuple(_flat(xp, a) for a in m) for m in members], key=_packable, labels=labels):
            g, w = s.operands[:2]
            dtype, device = s.operands[2].dtype, array_device(w)
            if (dtype, device_key(w)) not in scalars:
                c = operands(xp, self.config, dtype, self.rule.scheduled)
                h = step_scalars(xp, self.rule, c, state.count, value, extra, dtype, device)
                # the fields that are numbers or None, with their values (constants of the per-leaf
                # function), and the names of those that are arrays (its operands)
                numbers = tuple((k, v) for k, v in h._asdict().items() if v is None or is_number(v))
                held = tuple(k for k in h._fields if k not in dict(numbers))
                # As 1-element arrays, not 0-D: torch.compile reads a 0-D CPU float64 operand on the
                # host at every call (as a symbolic float); the same numbers either way.
                scalars[dtype, device_key(w)] = (numbers, held, h, tuple(xp.reshape(getattr(h, k), (1,)) for k in held))
            numbers, held, h, arrays = scalars[dtype, device_key(w)]
            names = labels[s.indices[0]]
            key = (self.rule.name, self.constants, numbers, names, str(dtype), str(g.dtype), str(getattr(device, "type", device)))
            if key not in self.functions:
                self.functions[key] = self.function(xp, dtype, h, held, names)
            writes.kernel(key, self.functions[key], (ok, arrays, *s.operands))
            if len(s.indices) > 1 or not all(map(is_dense, members[s.indices[0]][1:])):  # written into copies
                pieces = unstack([s], [s.operands[1:]], len(members))
                for i in s.indices:
                    targets += members[i][1:]
                    sources += [xp.reshape(piece, tuple(target.shape)) for target, piece in zip(members[i][1:], pieces[i])]
        if targets:
            writes.copy(targets, sources)
        return skip.counted(xp, ok, finite_step, state, state.groups)

    def function(self, xp: Any, dtype: Any, h: NamedTuple, held: tuple, names: tuple) -> Callable:
        """The per-leaf function: ``(ok, scalars, g, w, *entries) -> (w + update, *new entries)``
        for state entries ``names`` of ``dtype``, with the step's scalars ``held`` as operands and
        the others (numbers, ``None``) as constants: the rule's step (:func:`rule_step`, as
        ``update`` runs it) between the non-finite rule's selections."""
        rule, c, reads_params = self.rule, operands(xp, self.config, dtype, self.rule.scheduled), self.reads_params
        # The function keeps the scalars' type and numbers, not ``h``: a compiled one is shared by
        # every optimizer of the rule (adapters' kernel cache), and ``h``'s arrays are this step's.
        scalars, fields = type(h), {k: v for k, v in h._asdict().items() if k not in held}

        def step(ok: Any, arrays: tuple, g: Any, w: Any, *entries: Any) -> tuple:
            h_ = scalars(**fields, **{k: xp.reshape(a, ()) for k, a in zip(held, arrays)})
            zero = scalar_zero(xp, g)
            g_ = cast(xp, skip.gradient_used(xp, ok, g, zero), dtype)
            old = _fields(rule, dict(zip(names, entries)))
            new, u = rule_step(xp, rule, c, old, g_, cast(xp, w, dtype) if reads_params else None, h_,
                                lambda n, o: skip.entry_kept(xp, ok, n, o))
            return (w + skip.update_applied(xp, ok, cast(xp, u, g.dtype), zero), *(v for v in new if v is not None))

        return step


def rule_step(xp: Any, rule: Any, c: NamedTuple, old: NamedTuple, g: Any, w: Any, h: NamedTuple,
              kept: Callable) -> tuple[NamedTuple, Any]:
    """The step of an element-wise rule (an :class:`ElementwiseRule`, or a matrix method's
    :class:`~precond_ref.engine.blockdiag.FallbackRule`: the same ``state`` and ``update``) of one leaf: its new state, each entry it changed as ``kept(new, old)`` (the
    non-finite rule's selection, before the update is formed from it: a compiler then reads the
    stored entry rather than recomputing it from the old one), and the update."""
    new = rule.state(xp, c, old, g, w, h)
    new = type(old)(*(n if n is None or n is o else kept(n, o) for n, o in zip(new, old)))
    return new, rule.update(xp, c, new, g, w, h)


def _packable(operands: tuple) -> Any:
    """:func:`blocking.stack`'s key of a leaf's flattened operands: their dtypes for a leaf small
    enough to pack, ``None`` (alone) for a larger one. Each leaf alone costs a call of a compiled
    function, as a leaf of a compiled ``update`` costs a kernel: the limit is the one measured for
    that (:data:`~precond_ref.engine.joined.FLAT_MAX_TRACED_ELEMENTS`), past which copying a leaf
    into and out of the pack costs more than its call."""
    return _dtypes(operands) if operands[0].shape[0] <= joined.FLAT_MAX_TRACED_ELEMENTS else None


def _entries(state: NamedTuple) -> dict[str, Array]:
    """A rule's state as the engine stores it: ``{field: array}`` of the fields that are not ``None``."""
    return {name: value for name, value in zip(state._fields, state) if value is not None}


def _fields(rule: ElementwiseRule, entries: dict[str, Array]) -> NamedTuple:
    """The stored entries as the rule's state NamedTuple (an absent field is ``None``)."""
    return rule.State(*(entries.get(name) for name in rule.State._fields))
