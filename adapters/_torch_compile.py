"""The compiled step of the torch optimizers: ``torch.compile`` of the core's pure ``update``.

Nothing here restates an update rule: the compiled function calls the core transform of a param
group and adds its updates to the parameters in place, and TorchInductor fuses the element-wise
work of the whole group (state updates, the non-finite selection, the parameter update) into a
few kernels. What the compiled code depends on is kept stable so that it compiles a bounded
number of times:

* the periodic-work decisions come in as a tuple of Python bools (``Transform.due``, evaluated on
  the host from the host step count), so a method with intervals compiles at most one graph per
  combination of decisions (two for a single interval), never one per step, and a combination
  made only at the schedule's start (a spread refresh's first step, every phase at once) runs
  eagerly;
* the learning rate is a 0-D tensor read by the kernels (schedulers change its value, not the
  graph);
* each param group's compiled function has a code object of its own, so its compilations never
  count against another group's or another optimizer's;
* a compiled function serves one transform (it is rebuilt when the transform is), and the modules
  it calls are not patched while it lives: its guards check the arguments that vary (tensor
  layouts, the state's structure, the interval decisions, the step's keyword arguments) and the
  ambient torch state, not the transform's closures or module globals. Those were most of the
  guards and most of a small step's time (measured: records/backends-measurements.md, "The torch
  adapter's compiled step").

An element-wise method (AGD, RF-RMSProp, RF-AdamW) in a param group of many tensors
(:data:`PER_LEAF_MIN_TENSORS`) compiles less: the engine's in-place step
(:func:`precond_ref.engine.elementwise.in_place_step`) calls one per-leaf function per large leaf
and per pack of small ones, and :class:`KernelWrites` compiles that function once per method,
dtype and option set of an optimizer (kept by it, and gone with it), for every length, so that
the first step of a large model compiles one small kernel rather than a graph of every leaf.
DASGO, whose leaves step independently but for the step's skip decision
(:func:`~precond_ref.engine.run.steps_leaf_by_leaf`), does likewise through :class:`LeafCalls`:
one call per leaf of the core update compiled for leaves of every size, one graph per layout.

If compilation fails (no C++ compiler for TorchInductor's CPU backend, an unsupported
operation), the optimizer says so once and runs the same core eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import numbers
import os
import sys
import threading
import types
import warnings
from typing import Any, Callable, Optional, Union

import torch

from precond_ref._backend import namespace_of
from precond_ref.engine.elementwise import EAGER_WRITES, in_place_step
from precond_ref.engine.matrices import transposed_view
from precond_ref.engine.run import steps_leaf_by_leaf
from precond_ref.engine.skip import gradient_ok
from precond_ref.transform import Transform
from precond_ref.tree import path_str, tree_flatten, tree_leaves

__all__ = ["ENVIRONMENT_VARIABLE", "compile_options", "CompiledStep", "check_capturable"]

#: ``PRECOND_REF_COMPILE=0`` runs every torch optimizer eagerly (``1`` compiles where supported);
#: the constructor's ``compile=`` argument wins over it.
ENVIRONMENT_VARIABLE = "PRECOND_REF_COMPILE"

CompileSetting = Union[None, bool, dict]


#: ``compile=None`` on a class that compiles by default compiles a param group of this many
#: elements or more, from its first step: its eager steps are slow enough that the first step's
#: compilation (seconds) is repaid within a few hundred steps. A smaller group steps eagerly
#: throughout: its compiled step saves about a millisecond whatever its size (the eager step's
#: cost is per operation, not per element), so a compilation of seconds pays only after
#: thousands of steps, which a test or a notebook never takes; deciding it at the first step,
#: from the group's size alone, means no run meets a compilation after its first steps. The
#: measurements behind the number: records/backends-measurements.md, "The torch adapter's
#: compiled step".
AUTO_MIN_ELEMENTS = 2**18


class Auto:
    """The default of a class that compiles where it pays: decided per param group, from its size,
    at its first step (the same answer at every later step)."""

    def options_for(self, numel: int) -> Optional[dict]:
        return {} if numel >= AUTO_MIN_ELEMENTS else None

    def __repr__(self) -> str:
        return "Auto()"


def compile_options(setting: CompileSetting, by_default: bool) -> Union[None, dict, Auto]:
    """The ``torch.compile`` keyword arguments to use, ``None`` for the eager path, or :class:`Auto`.

    ``setting`` is the constructor's ``compile``: ``None`` (the class default, overridden by the
    environment variable), ``True``/``False``, or a dict of ``torch.compile`` options
    (``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``).
    """
    if isinstance(setting, dict):
        return dict(setting)
    if setting is None:
        env = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
        if env in ("0", "false", "off", "no"):
            return None
        if env in ("1", "true", "on", "yes"):
            return {}
        return Auto() if by_default else None
    if not isinstance(setting, bool):
        raise TypeError(f"compile must be None, True, False or a dict of torch.compile options, got {setting!r}")
    return {} if setting else None


def _apply(
    transform: Transform, grads: Any, state: Any, params: Any, due: tuple, extra: dict, ok: Any = None,
    boxed: tuple = (),
) -> Any:
    """One core update of a param group: updates added to the parameters and the new state arrays
    written into the old ones, in place (Inductor then writes each result once, where it belongs).

    ``ok``: the skip decision of the step this update is part of (``update(..., gradients_ok=)``),
    or ``None`` (the update tests its gradients). Returns the new counters, the state entries not
    written in place (``{key: {name: array}}``) and the updates of 0-D parameters. Entries written in place are not returned: each output that
    aliases an input costs the compiled function's runtime wrapper a view per call, and the caller
    has them already. 0-D entries (state, and the updates of 0-D parameters) are returned instead
    of written: torch drops an in-place write into a 0-D float64 CPU input under
    ``aot_eager`` and Inductor (``a.add_(1.0)`` leaves ``a`` unchanged), and they cost nothing.
    ``boxed``: the ``(key, name)`` of the state entries given as 1-element views of 0-D entries
    (:func:`_boxed`), made 0-D again here.
    """
    if boxed:
        state = _unboxed(state, boxed)
    with_ok = {} if ok is None else {"gradients_ok": ok}
    updates, new_state = transform.update(grads, state, params, due=due, **with_ok, **extra)
    scalar_updates = []
    for p, u in zip(tree_leaves(params), tree_leaves(updates)):
        if p.ndim == 0:
            scalar_updates.append(u)
        else:
            p.add_(u)  # per leaf, not _foreach_add_: Inductor fuses it into the update's own loop
    returned: dict = {}
    for key, entries in new_state.groups.items():
        olds = state.groups[key]
        for name, value in entries.items():
            old = olds[name]
            if value is old:
                continue
            if value.ndim > 0:
                old.copy_(value)
            else:
                returned.setdefault(key, {})[name] = value
    return new_state.count, new_state.nonfinite_count, returned, scalar_updates


def _boxed(state: Any) -> tuple[Any, tuple]:
    """``state`` with its 0-D float64 CPU entries as 1-element views, and their ``(key, name)``.

    Dynamo gives such an input a symbolic float (it could be read as a Python number), which the
    graph never uses; torch then specialises it and traces the whole step a second time. A
    1-element view holds the same memory and is traced once.
    """
    boxed = tuple(
        (key, name) for key, entries in state.groups.items() for name, value in entries.items()
        if value.ndim == 0 and value.dtype == torch.float64 and value.device.type == "cpu"
    )
    if not boxed:
        return state, boxed
    groups = {key: dict(entries) for key, entries in state.groups.items()}
    for key, name in boxed:
        groups[key][name] = groups[key][name].reshape(1)
    return type(state)(state.count, state.nonfinite_count, groups), boxed


def _unboxed(state: Any, boxed: tuple) -> Any:
    """The inverse of :func:`_boxed`, inside the traced step."""
    groups = {key: {**entries} for key, entries in state.groups.items()}
    for key, name in boxed:
        groups[key][name] = groups[key][name].reshape(())
    return type(state)(state.count, state.nonfinite_count, groups)


#: Guards kept although they check the transform or a global: cheap, and about the inputs' tensors.
_KEPT_GUARD_TYPES = frozenset({"TENSOR_MATCH", "DUPLICATE_INPUT"})


def _guard_filter(entries: list, fixed: tuple = ("transform",)) -> list[bool]:
    """Which of dynamo's guards to keep: see the module's docstring; ``fixed`` names the argument
    (or closure variable) the compiled function serves alone, as dynamo names its guards."""
    return [
        entry.guard_type in _KEPT_GUARD_TYPES or not (entry.is_global or entry.name.split(".")[0] in fixed)
        for entry in entries
    ]


def _kernel_guard_filter(entries: list) -> list[bool]:
    """:func:`_guard_filter` of a per-leaf function (``KernelWrites``): its ``fn``, a closure
    variable, is fixed by its key."""
    return _guard_filter(entries, ("fn",))


def _holds_number(extra: dict) -> bool:
    return any(isinstance(value, numbers.Number) for value in extra.values())


_LRU_WARNING = "Dynamo detected a call to a `functools.lru_cache`"

#: Seconds a step may spend compiling before the optimizer says that it is compiling (once per
#: compiled function): a large param group's first step compiles for minutes on a CPU.
COMPILE_NOTICE_S = 5.0
_LOG = logging.getLogger("precond_ref")


@functools.cache
def _cached_helpers_traced_quietly() -> bool:
    """Tell dynamo that array_api_compat's ``functools.lru_cache`` helpers (the namespace lookups
    the core makes) may be traced without its warning (once per call site; harmless, and the
    user's to ignore). False where this torch has no such list: each call then filters the
    warning around itself (a cost per call: records/backends-measurements.md)."""
    allow = getattr(torch._dynamo.utils, "allow_lru_cache_wrapper_trace_without_warning", None)
    if allow is None:
        return False
    for name, module in list(sys.modules.items()):
        if name == "array_api_compat" or name.startswith("array_api_compat."):
            for value in list(vars(module).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    allow(value)
    return True


@contextlib.contextmanager
def _quiet_tracing() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LRU_WARNING)
        yield


_FRESH_COPIES = itertools.count()


def _fresh(function: Callable) -> Callable:
    """A copy of ``function`` with a code object of its own, under a name of its own.

    Dynamo keys its graph cache on the code object, and its record of which inputs changed between
    calls (automatic dynamic) on the code's file, line and name: with a shared name, a float that
    differs between two optimizers' transforms (ASGO's ``eps`` in two modes) would become symbolic
    in the second one's graph, which the core's checks cannot trace.
    """
    name = f"{function.__name__}_{next(_FRESH_COPIES)}"
    names = {"co_name": name, **({"co_qualname": name} if sys.version_info >= (3, 11) else {})}
    code = function.__code__.replace(**names)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


class CompiledStep:
    """The compiled :func:`_apply` of one transform (rebuilt when the transform is)."""

    def __init__(self, transform: Transform, options: dict, kernels: Optional[dict] = None) -> None:
        self.transform = transform
        self.options = dict(options)
        options = dict(self.options)
        if "mode" not in options:  # torch.compile takes a mode or options, not both
            inductor = {}
            if options.get("backend", "inductor") == "inductor":
                # Inductor's check of every input's sizes and strides repeats what dynamo's tensor
                # guards checked just before (its cost: records/backends-measurements.md).
                inductor["size_asserts"] = False
            options["options"] = {"guard_filter_fn": _guard_filter, **inductor, **options.get("options", {})}
        # A new Python number among the step's arguments (the last, smaller batch's batch_size)
        # compiles once more with it as a constant: automatic dynamic shapes would make it a
        # symbolic int, which the core's checks cannot trace (the step then fell back to eager).
        # torch.compile(dynamic=False) would patch dynamo's configuration around every call
        # (half of a small call's host time: records/backends-measurements.md); the patch is
        # applied here, and only to steps given a number. Nothing else among the arguments can
        # change size or value between compilations: a parameter's shape is fixed, and a different
        # set of parameters has other keys, which dynamo treats as new inputs.
        self._static = None if "dynamic" in options else torch._dynamo.config.patch(
            automatic_dynamic_shapes=False, assume_static_by_default=True
        )
        self._compiled = torch.compile(_fresh(_apply), fullgraph=True, **options)
        self._quiet = _cached_helpers_traced_quietly()
        # One graph per combination of interval decisions that recurs: a refresh spread over T phases
        # has T + 1 (all on the first step, then one phase a step), of which the first step's is
        # never made again and runs eagerly (``eager_patterns``: compiling it would cost the largest
        # graph's compilation for one step); T is more than dynamo's default limit of 8 graphs per
        # function for T >= 8, past which it would stop compiling, so the limit is raised around
        # this function's calls to what its schedule needs.
        self.eager_patterns = transient_patterns(transform)
        graphs = len(due_pattern_steps(transform)) - len(self.eager_patterns)
        self._limit = (
            torch._dynamo.config.patch(recompile_limit=graphs + 1)
            if graphs + 1 > torch._dynamo.config.recompile_limit else None
        )
        self._compiled_patterns: set = set()  # the interval decisions whose graph is made
        self._told = False
        # An element-wise rule's step of a group of many tensors runs as compiled per-leaf kernels
        # (KernelWrites) instead (PER_LEAF_MIN_TENSORS).
        self._in_place = in_place_step(transform)
        # ``kernels``: the owning optimizer's compiled kernels, shared by its compiled steps.
        kernels = {} if kernels is None else kernels
        self._writes = KernelWrites(self.options, kernels) if self._in_place is not None else None
        # A rule whose leaves step independently (steps_leaf_by_leaf) runs a large group's step as one
        # compiled call per leaf instead (LeafCalls).
        self._leaf_calls = LeafCalls(transform, self.options) if steps_leaf_by_leaf(transform) else None

    def _notice_if_slow(self, grads: Any) -> Optional[threading.Timer]:
        """A timer that says, once, that a step is compiling if it still is after
        :data:`COMPILE_NOTICE_S`."""
        if self._told:
            return None
        leaves = len(tree_flatten(grads)[0])

        def tell() -> None:
            self._told = True
            _LOG.warning(
                "precond_ref: compiling the optimizer's update of %d tensors with torch.compile (once per param "
                "group and pattern of refresh steps; minutes on a CPU for a large model). compile=False, or %s=0, "
                "steps eagerly instead", leaves, ENVIRONMENT_VARIABLE,
            )

        return _timer(tell)

    def __call__(self, grads: Any, state: Any, params: Any, due: tuple, extra: dict) -> Any:
        if self._in_place is not None and len(state.groups) >= PER_LEAF_MIN_TENSORS:
            new_state = self._writes.step(self._in_place, grads, state, params, extra)
            if new_state is not None:
                return new_state
        if self._leaf_calls is not None and len(state.groups) >= PER_LEAF_MIN_TENSORS:
            new_state = self._leaf_calls(grads, state, params, due, extra)
            if new_state is not None:
                return new_state
        timer = None
        if due not in self._compiled_patterns:  # this call may compile
            self._compiled_patterns.add(due)
            timer = self._notice_if_slow(grads)
        try:
            return self._call(grads, state, params, due, extra)
        finally:
            if timer is not None:
                timer.cancel()

    def _call(self, grads: Any, state: Any, params: Any, due: tuple, extra: dict) -> Any:
        static = extra and self._static is not None and _holds_number(extra)
        given, boxed = _boxed(state)
        if self._quiet and not static and self._limit is None:  # the step's common case: no context to enter
            out = self._compiled(self.transform, grads, given, params, due, extra, None, boxed)
        else:
            with contextlib.ExitStack() as around:
                if self._limit is not None:
                    around.enter_context(self._limit)
                if static:
                    around.enter_context(self._static)
                if not self._quiet:
                    around.enter_context(_quiet_tracing())
                out = self._compiled(self.transform, grads, given, params, due, extra, None, boxed)
        count, nonfinite_count, returned, scalar_updates = out
        groups = state.groups
        if returned:
            groups = {key: {**entries, **returned.get(key, {})} for key, entries in groups.items()}
        if scalar_updates:
            for p, u in zip([p for p in tree_flatten(params)[0] if p.ndim == 0], scalar_updates):
                p.add_(u)
        return type(state)(count, nonfinite_count, groups)


def _timer(tell: Callable[[], None]) -> threading.Timer:
    """``tell()`` after :data:`COMPILE_NOTICE_S` unless cancelled first (a logger message, not a
    warning: it runs on another thread)."""
    timer = threading.Timer(COMPILE_NOTICE_S, tell)
    timer.daemon = True
    timer.start()
    return timer


#: An element-wise rule's compiled step runs as per-leaf kernels (one compiled function for every
#: length, called once per large tensor and once per pack of small ones), and a leafwise rule's as
#: one call per leaf (:class:`LeafCalls`), in a param group of at least this many tensors, and as
#: one graph of the whole group's step in a smaller one. The
#: whole-group graph's compilation grows with the number of tensors (minutes for GPT-2-small's
#: 148 on a CPU), the per-leaf step's host cost with the number of calls (each step a few times
#: the whole graph's on a small model): docs/performance.md, "The first step at GPT-2-small".
PER_LEAF_MIN_TENSORS = 64


def _apply_leaf(transform: Transform, ok: Any, g: Any, state: Any, w: Any, due: tuple, extra: dict) -> Any:
    """:func:`_apply` of one leaf (a tree of that leaf alone), given the whole tree's skip
    decision ``ok`` (where it is false the core steps on zeros, keeps the state and returns a zero
    update), with no test of this leaf's gradient of its own."""
    return _apply(transform, g, state, w, due, extra, ok)


#: :class:`LeafCalls` compiles the step of a leaf of at least this many elements for its shape
#: (one graph per such shape) rather than for every size: TorchInductor's CPU code for a size it
#: does not know ran a large embedding's step much slower than the code for its shape, and the
#: step of a transformer's smaller matrices as fast; a model has few such leaves (embeddings,
#: output layers), each worth its own graph (measured: docs/performance.md, "The first step at GPT-2-small").
PER_SHAPE_MIN_ELEMENTS = 2**24


def _raise_postponed(owner: Any) -> None:
    """Raise, once, the compilation error an earlier step postponed (``owner.pending``) after
    finishing that step eagerly: at the start of the next step, before anything is written."""
    error, owner.pending = owner.pending, None
    if error is not None:
        raise error


class LeafCalls:
    """The compiled step of a :func:`~precond_ref.engine.run.steps_leaf_by_leaf` rule as one call
    per leaf of one function compiled for leaves of every size (``dynamic=True``): a large model's
    first step compiles the step of one leaf of each layout (rank, dtype, state entries: a matrix
    and a fallback vector), and of each shape of :data:`PER_SHAPE_MIN_ELEMENTS` elements or more,
    rather than a graph of every leaf. The step's skip decision is taken once over every gradient, eagerly, and is an
    operand of each call (:func:`_apply_leaf`); each call writes its leaf's parameter and state in
    place.

    A compilation that fails before the step has written anything propagates (the optimizer then
    runs the step eagerly and says so); one that fails later in a step (a leaf of another layout)
    finishes that step with :func:`_apply_leaf` run eagerly and is raised at the next step, before
    anything is written (as :class:`KernelWrites`).
    """

    def __init__(self, transform: Transform, options: dict) -> None:
        self.transform = transform
        options = {"fullgraph": True, **options}
        if "mode" not in options:
            options["options"] = {"guard_filter_fn": _guard_filter, **options.get("options", {})}
        self._any_size = torch.compile(_fresh(_apply_leaf), **{"dynamic": True, **options})
        self._per_shape = torch.compile(_fresh(_apply_leaf), **{"dynamic": False, **options})
        self._quiet = _cached_helpers_traced_quietly()
        self._first = True
        self.pending: Optional[BaseException] = None

    def __call__(self, grads: Any, state: Any, params: Any, due: tuple, extra: dict) -> Any:
        """The new state, or ``None`` (nothing written) for a group of zero-size leaves alone."""
        _raise_postponed(self)
        grad_leaves, treedef = tree_flatten(grads)
        live = [(path_str(path), _leaf_name(path, g), g, w) for path, g, w in zip(treedef.paths, grad_leaves, tree_flatten(params)[0])
                if state.groups[path_str(path)]]  # a zero-size leaf has no state and no step
        if not live:
            return None
        large = sum(g.numel() >= PER_SHAPE_MIN_ELEMENTS for _, _, g, _ in live)
        # one graph per large leaf's shape at most: dynamo's default limit of 8 would stop short
        shapes = torch._dynamo.config.patch(recompile_limit=max(large, torch._dynamo.config.recompile_limit))
        ok = gradient_ok(namespace_of(*grad_leaves), grad_leaves)  # the array API's torch: its astype widens bf16
        groups = dict(state.groups)
        scalars, eager = [], False
        timer, self._first = (_timer(self._tell) if self._first else None), False
        try:
            with contextlib.nullcontext() if self._quiet else _quiet_tracing():
                for n, (key, name, g, w) in enumerate(live):
                    leaf_state = type(state)(state.count, state.nonfinite_count, {path_str(name): groups[key]})
                    per_shape = g.numel() >= PER_SHAPE_MIN_ELEMENTS
                    if name:  # the leaf under the name the core reads it by
                        g, w = {name[0]: g}, {name[0]: w}
                    try:
                        if eager:
                            out = _apply_leaf(self.transform, ok, g, leaf_state, w, due, extra)
                        else:
                            with shapes if per_shape else contextlib.nullcontext():
                                step = self._per_shape if per_shape else self._any_size
                                out = step(self.transform, ok, g, leaf_state, w, due, extra)
                    except Exception as error:  # noqa: BLE001 - see the class docstring
                        if n == 0 or eager:
                            raise
                        self.pending, eager = error, True
                        out = _apply_leaf(self.transform, ok, g, leaf_state, w, due, extra)
                    count, nonfinite_count, returned, scalar_updates = out
                    if returned:
                        groups[key] = {**groups[key], **returned[path_str(name)]}
                    scalars += [(w, u) for u in scalar_updates]
        finally:
            if timer is not None:
                timer.cancel()
        for w, u in scalars:
            w.add_(u)
        return type(state)(count, nonfinite_count, groups)

    @staticmethod
    def _tell() -> None:
        _LOG.warning(
            "precond_ref: compiling the optimizer's update of one tensor of each layout with torch.compile (once per "
            "param group; seconds to a minute on a CPU). compile=False, or %s=0, steps eagerly instead",
            ENVIRONMENT_VARIABLE,
        )


def _leaf_name(path: tuple, g: torch.Tensor) -> tuple:
    """The part of a leaf's ``path`` that its step of its own (:class:`LeafCalls`) keeps: the name
    of a leaf whose matrix view the core takes by its name (an out-last ``kernel``,
    :func:`~precond_ref.engine.matrices.transposed_view`, whose side is the other side of that
    view), so that it steps as in its tree; ``()`` for any other (the leaf alone, one graph for
    every name)."""
    return path[-1:] if transposed_view(tuple(g.shape), path) else ()


def _kernel_notice() -> None:
    _LOG.warning(
        "precond_ref: compiling the optimizer's element-wise step with torch.compile (once per method, dtype and "
        "option set of an optimizer, for tensors of every size; seconds to a minute on a CPU). compile=False, or "
        "%s=0, steps eagerly instead", ENVIRONMENT_VARIABLE,
    )


def _writing(fn: Callable) -> Callable:
    """``fn`` with its results written into its last operands (``Writes.kernel``'s contract), in
    place, as one function for ``torch.compile``: Inductor fuses the writes into the loop that
    computes them."""

    def write(*operands: torch.Tensor) -> None:
        results = fn(*operands)
        for target, value in zip(operands[len(operands) - len(results):], results):
            target.copy_(value)

    return write


class KernelWrites:
    """The engine's ``Writes`` for :func:`precond_ref.engine.elementwise.in_place_step` with each
    per-leaf function compiled: ``torch.compile(dynamic=True)`` on 1-D operands, so one
    compilation serves every leaf and pack of any length, and a step is one call per large leaf
    and per pack of small ones. The compiled functions are kept in ``kernels``, by the engine's
    key and the ``torch.compile`` options: the owning optimizer's dict, shared by its param groups
    and the compiled steps it rebuilds, and gone with it; the optimizer's first compilation says
    that it is compiling if it takes long. The copies back into packed leaves are one
    ``torch._foreach_copy_``.

    A compilation that fails before the step has written anything propagates (the optimizer then
    runs the step eagerly and says so); one that fails later in a step (a second kernel of another
    dtype) finishes that step eagerly and is raised at the next step, before anything is written.
    """

    def __init__(self, options: dict, kernels: dict) -> None:
        self.kernels = kernels
        self.options = {"fullgraph": True, "dynamic": True, **options}
        if "mode" not in options:  # guards on the tensors only: the function is fixed by its key
            self.options["options"] = {"guard_filter_fn": _kernel_guard_filter, **options.get("options", {})}
        self.options_key = repr(sorted(self.options.items()))
        self._quiet = _cached_helpers_traced_quietly()
        self.wrote = False
        self.pending: Optional[BaseException] = None

    def step(self, in_place: Callable, grads: Any, state: Any, params: Any, extra: dict) -> Any:
        _raise_postponed(self)
        self.wrote = False
        return in_place(grads, state, params, writes=self, **extra)

    def kernel(self, key: tuple, fn: Callable, operands: tuple) -> None:
        if self.pending is not None:  # a kernel failed earlier in this step: finish it eagerly
            EAGER_WRITES.kernel(key, fn, operands)
            return
        compiled = self.kernels.get((key, self.options_key))
        timer = None
        try:
            if compiled is None:
                timer = _timer(_kernel_notice) if not self.kernels else None
                compiled = self.kernels[(key, self.options_key)] = torch.compile(_fresh(_writing(fn)), **self.options)
            operands = tuple(map(_unviewed, operands))
            if self._quiet:
                compiled(*operands)
            else:
                with _quiet_tracing():
                    compiled(*operands)
        except Exception as error:  # noqa: BLE001 - see the class docstring
            self.kernels.pop((key, self.options_key), None)
            if not self.wrote:
                raise
            self.pending = error
            EAGER_WRITES.kernel(key, fn, operands)
        finally:
            if timer is not None:
                timer.cancel()
        self.wrote = True

    def copy(self, targets: list, sources: list) -> None:
        torch._foreach_copy_(targets, sources)


def _unviewed(x: Any) -> Any:
    """``x``, or for a view (a leaf's flat view) a tensor on the same memory that is not a view:
    dynamo guards on a view input's base, which would compile the kernel again for a leaf whose
    flat operands are not views (a 1-D leaf, a pack)."""
    if not isinstance(x, torch.Tensor) or x._base is None:
        return x
    return torch.empty((0,), dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())


def notice_eager(owner: str, error: BaseException) -> None:
    """The one-line notice of a compiled path that could not be used."""
    def first_line(e: BaseException) -> str:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

    reason = f"{type(error).__name__}: {first_line(error)[:200]}"
    # Inductor's BackendCompilerFailed says only "backend='inductor' raised:"; the cause follows.
    inner = getattr(error, "inner_exception", None) or error.__cause__
    if inner is not None and inner is not error:
        reason += f" <- {type(inner).__name__}: {first_line(inner)[:200]}"
    warnings.warn(
        f"{owner}: torch.compile failed ({reason}); running the same update eagerly "
        f"(pass compile=False or set {ENVIRONMENT_VARIABLE}=0 to skip the attempt)",
        RuntimeWarning,
        stacklevel=4,
    )


def due_pattern_steps(transform: Transform, steps: int = 1024) -> dict[tuple, int]:
    """The different tuples of interval decisions (``Transform.due``) of the first ``steps`` steps,
    each with the first step that makes it (``{(): 0}`` without periodic work): a compiled step
    compiles one graph per tuple, on that step, except for the :func:`transient_patterns`."""
    due = getattr(transform, "due", None)
    if due is None:
        return {(): 0}
    first: dict[tuple, int] = {}
    for step in range(steps):
        first.setdefault(tuple(due(step)), step)
    return first


def transient_patterns(transform: Transform, steps: int = 1024) -> frozenset:
    """The tuples of interval decisions that the first ``steps // 2`` steps make and the next
    ``steps // 2`` do not: the schedule's start, which a periodic schedule never makes again (a
    refresh spread over phases: every phase on the first step; MBF: every inverse phase on each
    statistics step of its warm-up). A compiled step runs them eagerly rather than compile a graph
    for a few steps (:attr:`CompiledStep.eager_patterns`). An interval longer than ``steps // 2``
    recurs only after these steps: its refresh steps then run eagerly too, one step in that many."""
    due = getattr(transform, "due", None)
    if due is None:
        return frozenset()
    late = {tuple(due(step)) for step in range(steps // 2, steps)}
    return frozenset(p for p in (tuple(due(step)) for step in range(steps // 2)) if p not in late)


def check_capturable(owner: str, transform: Transform, params: list[tuple[str, torch.Tensor]]) -> None:
    """``capturable=True``: every parameter on a CUDA device, and no periodic work.

    A captured CUDA graph replays its kernels without the host: interval decisions made on the host
    at capture time would be replayed forever, so methods with periodic work (at intervals other
    than 1) cannot be captured.
    """
    due = getattr(transform, "due", None)
    if due is None or any(not all(due(step)) for step in range(1024)):
        raise ValueError(
            f"{owner}: capturable=True needs a step without periodic work (its interval decisions are made on the "
            "host, which a replayed CUDA graph never consults): set the method's intervals to 1"
        )
    for name, p in params:
        if p.device.type != "cuda":
            raise ValueError(
                f"{owner}: capturable=True needs CUDA parameters (CUDA-graph capture); parameter {name!r} is on {p.device}"
            )
