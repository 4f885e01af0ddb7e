"""The engine's run loop: :func:`build_transform` turns a method's per-group functions into a
:class:`~precond_ref.transform.Transform` over trees, and owns what every method shares (module
docstring of :mod:`precond_ref.engine`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from array_api_compat import is_jax_namespace

from .._backend import (
    IdentityDict,
    JAX_MATMUL_PRECISION as _JAX_PRECISION,
    NO_CONTEXT as _NO_CONTEXT,
    array_device,
    device_key,
    finite_or_zero,
    float32_matmul_precision,
    host_all_finite,
    host_bool,
    is_dense,
    is_tracer,
    namespace_of,
    remembered_slices,
    scalar_zero,
    selected_by_runs,
    torch_compiling,
)
from ..transform import Interval, LeafGroup, PrecondState, Transform, check_choice, is_due, singleton_groups
from ..tree import Path, path_str, tree_flatten, tree_unflatten
from .checks import check_fits, check_group, check_leaves, check_namespace, check_state_namespace, layout_of, unaliased
from .context import StepContext
from .factors import keeping_constants
from .joined import leafwise, pack
from .skip import first_bad_gradient, gradient_ok, gradient_used, update_applied

__all__ = ["build_transform", "steps_leaf_by_leaf"]

Array = Any


def build_transform(
    *,
    name: str,
    init_group: Callable[[tuple[Array, ...], tuple[Path, ...], Any], dict[str, Array]],
    update_group: Optional[Callable[..., tuple[tuple[Array, ...], dict[str, Array]]]] = None,
    update_groups: Optional[Callable[..., list[tuple[tuple[Array, ...], dict[str, Array]]]]] = None,
    group_leaves: Callable[[Sequence[Path], Sequence[Array]], list[LeafGroup]] = singleton_groups,
    on_nonfinite: str = "skip",
    needs_params: bool = False,
    intervals: Sequence[Interval] = (),
    matmul_precision: str = "highest",
    elementwise: bool = False,
    layout_hint: Optional[Callable[[dict, dict], str]] = None,
    legacy_names: Optional[Callable[[dict], dict]] = None,
    independent_leaves: bool = False,
) -> Transform:
    """Assemble a tree-level :class:`Transform` from a method's per-group functions.

    Parameters
    ----------
    name:
        The method's name, used in error messages.
    init_group:
        ``(leaves, paths, xp) -> {name: array}``: the state of one group. Zero-size groups are not
        passed to it (they get an empty state and zero updates).
    update_group:
        ``(grads, state, params, ctx) -> (updates, new_state)`` for one group; ``params`` is the
        group's tuple of parameters, or ``None`` when ``update`` was called without them.
        ``new_state`` must have the same names, shapes and dtypes as ``state``.
    update_groups:
        ``(grads, states, params, ctxs) -> [(updates, new_state), ...]``, given instead of
        ``update_group``: the same function over lists of all the (non-empty) groups of one call,
        in order, so that a method can stack blocks of equal shape across groups into one batched
        matmul or solve (one kernel instead of one per parameter on a GPU). ``ctxs[i]`` is the
        context ``update_group`` would get for group ``i``.
    group_leaves:
        ``(paths, leaves) -> [LeafGroup]``: which leaves form one block; singletons by default.
    on_nonfinite:
        ``"skip"``: a step whose gradient tree holds a NaN or Inf, or whose new state or updates
        would (a finite gradient so large that a statistic overflows), returns zero updates, leaves
        the state unchanged (the counter does not advance) and increments ``nonfinite_count``; the
        selection is element-wise (no device value is read), except where reading costs no
        synchronisation (NumPy; torch on the CPU outside ``torch.compile``: ``_backend.host_bool``),
        where a step read as finite makes no selections at all (the same numbers). ``"raise"``: ``FloatingPointError``
        naming the first offending gradient leaf, or the state entry that overflowed (needs
        concrete arrays, so it is refused under ``jax.jit``). ``update(..., gradients_ok=ok)``
        (``"skip"`` only) takes the decision ``ok`` (a 0-D bool array) instead of testing the
        gradients it is given: that of a larger tree whose leaves are stepped one by one
        (``independent_leaves``).
    needs_params:
        Whether ``update`` requires ``params`` (e.g. for weight decay).
    intervals:
        The intervals (ints or predicates ``calls -> bool``) that ``update_group`` passes to
        ``ctx.every``: :meth:`Transform.due` evaluates them on the host for compiled callers.
    matmul_precision:
        The float32 matmul precision of the step (:func:`float32_matmul_precision`); full float32 by
        default, which faithful modes must keep.
    elementwise:
        ``update_group`` computes each entry of a single leaf's updates and state from the same
        entry of its inputs alone (no reduction over the leaf, nothing read from its shape or path),
        and every state entry has the leaf's shape. Leaves of at most :data:`FLAT_MAX_ELEMENTS`
        elements (:data:`FLAT_MAX_TRACED_ELEMENTS` under ``torch.compile`` or ``jax.jit``) and of
        one dtype layout then run as one flat leaf through the whole step (skip
        decision, ``update_group``, selections): one trace under a compiler and one operation
        instead of one per parameter eagerly, with the same numbers. With ``on_nonfinite="skip"``
        only (``"raise"`` names the offending leaf); the overflow margin then applies to the flat
        leaf's squared norm, the sum of its leaves' (a stricter test).
    layout_hint:
        ``(found, layout) -> str``, both ``{entry: (shape, dtype)}``: text appended to the error for
        a state that does not fit the gradients, or ``""``; kept as ``init.layout_hint`` for
        adapters that check loaded state. Says which arguments reproduce the layout of a state saved
        with other settings.
    legacy_names:
        ``entries -> entries``: a group's state saved under older entry names, as the same
        arrays under the current names (the very dict given when no name is
        old). ``update`` renames such a state before anything else (a restored optax state keeps
        working; the state it returns has the current names); kept as ``init.legacy_names`` for
        adapters that rename on load (torch's ``load_state_dict``).
    independent_leaves:
        Each group is one leaf whose updates and new state ``update_group(s)`` computes from that
        leaf's arrays alone (``update_groups`` may stack leaves, but only to run them together):
        the update of a tree is then the updates of its leaves, each called alone as a tree of one
        leaf, given the whole tree's skip decision. With ``on_nonfinite="skip"`` the transform
        says so to adapters (:func:`steps_leaf_by_leaf`); ``"raise"`` reads the host per call.
    """
    check_choice("matmul_precision", matmul_precision, tuple(_JAX_PRECISION))
    check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
    if (update_group is None) == (update_groups is None):
        raise TypeError(f"{name}: build_transform needs exactly one of update_group and update_groups")
    if elementwise and (update_group is None or group_leaves is not singleton_groups):
        raise TypeError(f"{name}: elementwise=True needs update_group and the default singleton groups")
    if independent_leaves and group_leaves is not singleton_groups:
        raise TypeError(f"{name}: independent_leaves=True needs the default singleton groups")
    if update_groups is None:
        def update_groups(grads, states, params, contexts):
            return [update_group(g, s, p, c) for g, s, p, c in zip(grads, states, params, contexts)]
    runner = _Runner(name, init_group, update_groups, group_leaves, on_nonfinite, needs_params, tuple(intervals),
                     matmul_precision, elementwise, layout_hint)

    def init(params: Any) -> PrecondState:
        with keeping_constants(runner.constants):
            return runner.init(params)

    def update(
        grads: Any,
        state: PrecondState,
        params: Any = None,
        *,
        step: int | None = None,
        due: tuple[bool, ...] | None = None,
        gradients_ok: Any = None,
        **extra: Any,
    ) -> tuple[Any, PrecondState]:
        if legacy_names is not None and isinstance(state, PrecondState):
            state = renamed(state, legacy_names)
        return runner.update(grads, state, params, step, due, gradients_ok, extra)

    init.layout_hint = layout_hint  # type: ignore[attr-defined]
    init.legacy_names = legacy_names  # type: ignore[attr-defined]
    update.leafwise = independent_leaves and on_nonfinite == "skip"  # type: ignore[attr-defined]
    return Transform(init, update, runner.due, matmul_precision, group_leaves)


class _Runner:
    """The run loop of one transform (:func:`build_transform`): its checks, the non-finite rule,
    the call of the method's groups and the new counters, as named sub-steps in the order
    :meth:`step` runs them; and what the transform keeps (the state layouts, the shapes ``init``
    saw, the arrays a step makes once), which goes with it."""

    def __init__(self, name, init_group, update_groups, group_leaves, on_nonfinite, needs_params, intervals,
                 matmul_precision, elementwise, layout_hint):
        self.name, self.init_group, self.update_groups, self.group_leaves = name, init_group, update_groups, group_leaves
        self.on_nonfinite, self.needs_params, self.intervals = on_nonfinite, needs_params, intervals
        self.precision, self.elementwise, self.layout_hint = matmul_precision, elementwise, layout_hint
        # The state layout init_group gives a group's leaves, by group and leaf shapes/dtypes:
        # update compares it with the state it is given (the gradients stand in for the
        # parameters). init records the layouts it makes, so that update builds a state only for
        # gradients unlike the parameters init saw (a state from elsewhere, another dtype): no
        # second copy of the state.
        self.layouts: dict[tuple, dict[str, tuple]] = {}
        # The shapes init saw at each leaf path, so that update can name a gradient of the wrong
        # shape (a transposed one) when it is given no params and the state's layout would not
        # show it (S-AdaGrad's sketch of the flattened leaf). A set: one transform may be
        # initialised on several trees.
        self.leaf_shapes: dict[str, set] = {}
        # The arrays a step makes once and keeps (engine.factors.constant: identities, index
        # arrays), this transform's own: they go with it.
        self.constants: dict = {}

    def layout_key(self, group: LeafGroup, leaves: tuple[Array, ...], xp: Any) -> tuple:
        return (group.key, group.paths, tuple(tuple(x.shape) for x in leaves), tuple(x.dtype for x in leaves), xp.__name__)

    def layout_for(self, group: LeafGroup, leaves: tuple[Array, ...], xp: Any) -> dict[str, tuple]:
        key = self.layout_key(group, leaves, xp)
        if key not in self.layouts:
            self.layouts[key] = layout_of(self.init_group(leaves, group.paths, xp))
        return self.layouts[key]

    def init(self, params: Any) -> PrecondState:
        leaves, treedef = tree_flatten(params)
        xp = check_leaves(leaves, treedef.paths, f"{self.name}: params")
        dev = array_device(leaves[0])
        for path, leaf in zip(treedef.paths, leaves):
            self.leaf_shapes.setdefault(path_str(path), set()).add(tuple(leaf.shape))
        groups = {}
        for group in self.group_leaves(treedef.paths, leaves):
            members = tuple(leaves[i] for i in group.indices)
            if all(math.prod(leaf.shape) == 0 for leaf in members):
                groups[group.key] = {}
            else:
                groups[group.key] = unaliased(xp, self.init_group(members, group.paths, xp), members)
                self.layouts[self.layout_key(group, members, xp)] = layout_of(groups[group.key])
        return PrecondState(count=_counter(xp, dev), nonfinite_count=_counter(xp, dev), groups=groups)

    def due(self, step: int) -> tuple[bool, ...]:
        return tuple(bool(is_due(interval, step)) for interval in self.intervals)

    def update(self, grads: Any, state: PrecondState, params: Any, step: Any, due: Any, given_ok: Any,
               extra: dict) -> tuple[Any, PrecondState]:
        """:meth:`step` under the step's settings (matmul precision, kept slices and constants);
        an element-wise method's small leaves packed into one flat leaf for the whole step."""
        grad_leaves, treedef = tree_flatten(grads)
        try:
            xp = namespace_of(*grad_leaves)
        except TypeError:
            xp = None  # step names the problem
        args = (grads, state, params, step, due, given_ok, extra, grad_leaves, treedef, xp)
        if torch_compiling():  # nothing to set: the adapter sets the precision, and nothing is kept or remembered
            return self.packed_step(*args)
        with (float32_matmul_precision(xp, self.precision) if xp is not None else _NO_CONTEXT, remembered_slices(xp),
              keeping_constants(self.constants)):
            return self.packed_step(*args)

    def packed_step(self, grads: Any, state: PrecondState, params: Any, step: Any, due: Any, given_ok: Any,
                    extra: dict, grad_leaves: list, treedef: Any, xp: Any) -> tuple[Any, PrecondState]:
        """:meth:`step` of the tree, or, where an element-wise method's small leaves pack
        (:func:`~precond_ref.engine.joined.pack`), of the tree with them as one flat leaf."""
        packed = None
        if self.elementwise and self.on_nonfinite == "skip" and xp is not None:
            packed = pack(self.name, self.layout_for, grad_leaves, treedef, state, params, xp)
        if packed is None:
            return self.step(grads, state, params, step, due, given_ok, extra, (grad_leaves, treedef, xp))
        flat_grads, flat_state, flat_params, unpack = packed
        return unpack(*self.step(flat_grads, flat_state, flat_params, step, due, given_ok, extra))

    def step(self, grads: Any, state: PrecondState, params: Any, step: Any, due: Any, given_ok: Any,
             extra: dict, flat: Optional[tuple] = None) -> tuple[Any, PrecondState]:
        """One step of the tree: checks, the skip decision, the groups' updates and new state, the
        non-finite rule's selections, the counters. ``flat``: ``grads``' leaves, structure and
        namespace (``None`` where it has none) as :meth:`update` found them, or ``None``."""
        if not isinstance(state, PrecondState):
            raise TypeError(f"{self.name}: state must be the PrecondState returned by init, got {type(state)}")
        grad_leaves, treedef, xp = flat if flat is not None else (*tree_flatten(grads), None)
        xp = check_leaves(grad_leaves, treedef.paths, f"{self.name}: grads", xp)
        param_leaves = self.checked_params(xp, grad_leaves, treedef, params)
        groups = self.group_leaves(treedef.paths, grad_leaves)
        expected, found = {g.key for g in groups}, set(state.groups)
        if expected != found:
            raise ValueError(
                f"{self.name}: grads do not match the optimizer state: leaves missing from the state "
                f"{sorted(expected - found)}, state entries with no gradient {sorted(found - expected)}"
            )
        ok, finite_step = self.skip_decision(xp, grad_leaves, treedef, given_ok)
        ctx = self.phase_context(StepContext(xp=xp, count=state.count, extra=extra, shared={}, settled=IdentityDict(),
                                             ok=ok if self.on_nonfinite == "skip" else None, applied=finite_step),
                                 state, step, due)
        zeros = [ctx.once(("zero", g.dtype, device_key(g)), lambda g=g: scalar_zero(xp, g)) for g in grad_leaves]
        grad_leaves = self.skipped_gradients(xp, ok, finite_step, grad_leaves, zeros)
        updates, new_groups = self.run_groups(xp, ctx, groups, grad_leaves, param_leaves, state)
        updates = self.finite_updates(xp, ok, finite_step, updates, zeros)
        if self.on_nonfinite == "skip":
            new_groups = _selected_state(xp, ok, finite_step, ctx, state, new_groups)
        return tree_unflatten(treedef, updates), _counted(xp, ok, finite_step, state, new_groups)

    def checked_params(self, xp: Any, grad_leaves: list, treedef: Any, params: Any) -> Optional[list]:
        """The parameter leaves (``None`` without params), checked against the gradients: tree,
        library, shapes, dtypes; without params, the gradients' shapes against those ``init`` saw."""
        name = self.name
        if params is None:
            if self.needs_params:
                raise ValueError(f"{name}: update needs params (pass update(grads, state, params))")
            for path, g in zip(treedef.paths, grad_leaves):
                seen = self.leaf_shapes.get(path_str(path))
                if seen and tuple(g.shape) not in seen:
                    shapes = " or ".join(str(shape) for shape in sorted(seen))
                    raise ValueError(
                        f"{name}: gradient of {path_str(path)!r} has shape {tuple(g.shape)}, "
                        f"parameter has shape {shapes} (as given to init)"
                    )
            return None
        param_leaves, param_def = tree_flatten(params)
        if param_def.paths != treedef.paths:
            raise ValueError(
                f"{name}: grads and params have different tree structures: grads leaves "
                f"{[path_str(p) for p in treedef.paths]}, params leaves "
                f"{[path_str(p) for p in param_def.paths]}"
            )
        check_namespace(name, xp, treedef.paths, grad_leaves, param_leaves, "parameter")
        for path, g, p in zip(treedef.paths, grad_leaves, param_leaves):
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name}: gradient of {path_str(path)!r} has shape {tuple(g.shape)}, "
                    f"parameter has shape {tuple(p.shape)}"
                )
            if g.dtype != p.dtype:
                raise TypeError(
                    f"{name}: gradient of {path_str(path)!r} has dtype {g.dtype}, parameter has dtype {p.dtype}"
                )
        return param_leaves

    def skip_decision(self, xp: Any, grad_leaves: list, treedef: Any, given_ok: Any) -> tuple[Any, bool]:
        """The non-finite rule's decision: ``ok`` (0-D bool: the step is applied) and whether it is
        known on the host to be applied (``finite_step``). A caller that steps a tree leaf by leaf
        (``independent_leaves``) gives the whole tree's decision."""
        if given_ok is not None and self.on_nonfinite == "raise":
            raise ValueError(f"{self.name}: gradients_ok is the skip decision of on_nonfinite='skip'")
        ok = gradient_ok(xp, grad_leaves) if given_ok is None else given_ok
        if self.on_nonfinite == "raise":
            if is_tracer(ok):
                raise ValueError(
                    f"{self.name}: on_nonfinite='raise' needs concrete arrays and cannot run under "
                    "jax.jit; use on_nonfinite='skip'"
                )
            if not bool(ok):
                raise FloatingPointError(f"{self.name}: {first_bad_gradient(xp, grad_leaves, treedef.paths)}")
        # Where reading the skip predicate costs no synchronisation (NumPy, torch on the CPU,
        # eagerly), a step known to be finite makes none of the skip's selections: they would
        # select their first operand. Except of an operand that is not dense, whose selection
        # would also lay it out anew (is_dense): the later steps then round as they would have.
        # Every other step (a skipped one included) selects element-wise, never reading a device
        # value.
        return ok, self.on_nonfinite == "raise" or host_bool(xp, ok) is True

    def skipped_gradients(self, xp: Any, ok: Any, finite_step: bool, grad_leaves: list, zeros: list) -> list:
        """The gradients a step computes on: a skipped step's arithmetic runs on zeros (its results
        are discarded anyway, and NaN or huge inputs would only raise warnings (NumPy) or errors
        (LAPACK on NaN) on the way). Not on JAX for a method with reductions or matmuls: JAX
        neither warns nor raises (its factorisations return NaN), and XLA's CPU backend cannot fuse
        the selection into a column reduction (YNNPACK) or a matmul reading the gradient, so it
        wrote a zeroed copy. An element-wise method's loops take the selection in (measured:
        docs/backends.md). A 0-D zero per dtype and device serves every leaf's selections."""
        if not (self.elementwise or not is_jax_namespace(xp)):
            return grad_leaves
        chosen = [i for i, g in enumerate(grad_leaves) if not (finite_step and is_dense(g))]
        joined = leafwise(xp, lambda g, zero: gradient_used(xp, ok, g, zero),
                          [grad_leaves[i] for i in chosen], zeros=[zeros[i] for i in chosen])
        grad_leaves = list(grad_leaves)
        for i, g in zip(chosen, joined):
            grad_leaves[i] = g
        return grad_leaves

    def phase_context(self, ctx: StepContext, state: PrecondState, step: Any, due: Any) -> StepContext:
        """The step's periodic decisions: those a compiled caller took on the host (``due``), or
        the call number they are taken from (``step``, else the state's counters)."""
        if due is not None:
            if len(due) != len(self.intervals):
                raise ValueError(
                    f"{self.name}: due has {len(due)} decisions, the method declares {len(self.intervals)} intervals")
            return ctx._replace(due=tuple(zip(self.intervals, due)))
        return ctx._replace(calls=step if step is not None else state.count + state.nonfinite_count)

    def run_groups(self, xp: Any, ctx: StepContext, groups: list, grad_leaves: list, param_leaves: Optional[list],
                   state: PrecondState) -> tuple[list, dict]:
        """The method's updates and new state of every group (zero-size groups: zero updates, no
        state), checked against the old state, and the updates cast to the gradients' dtypes."""
        members = [
            (group, tuple(grad_leaves[i] for i in group.indices),
             None if param_leaves is None else tuple(param_leaves[i] for i in group.indices))
            for group in groups
        ]
        live = [m for m in members if not all(math.prod(leaf.shape) == 0 for leaf in m[1])]
        if not torch_compiling():  # dynamo cannot trace the dict compare; torch's .grad always fits
            for group, g, _ in live:
                check_state_namespace(self.name, xp, group, g, state.groups[group.key])
                check_fits(self.name, group, g, state.groups[group.key], self.layout_for(group, g, xp), self.layout_hint)
        results = self.update_groups(
            [g for _, g, _ in live], [state.groups[group.key] for group, _, _ in live], [p for _, _, p in live],
            [ctx._replace(paths=group.paths) for group, _, _ in live],
        ) if live else []
        by_key = {group.key: result for (group, _, _), result in zip(live, results)}
        updates: list[Any] = [None] * len(grad_leaves)
        new_groups = {}
        for group, g, _ in members:
            old = state.groups[group.key]
            upd, new = by_key[group.key] if group.key in by_key else (tuple(xp.zeros_like(leaf) for leaf in g), {})
            check_group(self.name, group, g, upd, old, new)
            for i, u in zip(group.indices, upd):
                target = grad_leaves[i].dtype
                updates[i] = u if u.dtype == target else xp.astype(u, target)
            new_groups[group.key] = new
        return updates, new_groups

    def finite_updates(self, xp: Any, ok: Any, finite_step: bool, updates: list, zeros: list) -> list:
        """The parameters never receive a NaN or Inf, whatever a method's numerics did; the step's
        own skip selects element-wise (no device read), fused into the kernels computing it."""
        if self.on_nonfinite == "skip" and not finite_step:  # the finite test below would not read the host
            return leafwise(xp, lambda u, zero: update_applied(xp, ok, u, zero), updates, zeros=zeros)
        if not (finite_step and host_all_finite(xp, updates)):  # the step's own test reads nothing else
            return leafwise(xp, lambda u, zero: finite_or_zero(xp, u, zero), updates, zeros=zeros)
        return updates


def _counter(xp: Any, device: Any) -> Array:
    return xp.zeros((), dtype=xp.int32, device=device)


def _selected_state(xp: Any, ok: Any, finite_step: bool, ctx: StepContext, state: PrecondState, new_groups: dict) -> dict:
    """The non-finite rule's selection of the new state: each entry, or its old value on a skipped
    step; the pieces of one stack selected at once. An entry the step left untouched, or that the
    method selected (``ctx.settled``), needs no selection; nor does a dense one of a step known to
    be applied."""
    new_groups = {key: dict(entries) for key, entries in new_groups.items()}
    pending: dict[str, list] = {}  # by entry name, in group order: (group, new, old)
    for key, entries in new_groups.items():
        for k, v in entries.items():
            old = state.groups[key][k]
            if v is not old and v not in ctx.settled and not (finite_step and is_dense(v)):
                pending.setdefault(k, []).append((key, v, old))
    items = [(key, k, v, old) for k, same in pending.items() for key, v, old in same]
    selected = selected_by_runs(xp, ok, [v for _, _, v, _ in items], [old for _, _, _, old in items])
    for (key, k, _, _), v in zip(items, selected):
        new_groups[key][k] = v
    return new_groups


def _counted(xp: Any, ok: Any, finite_step: bool, state: PrecondState, new_groups: dict) -> PrecondState:
    """The new state with its counters: an applied step advances ``count`` (one addition when
    known on the host), a skipped one ``nonfinite_count``."""
    if finite_step:
        return PrecondState(count=state.count + 1, nonfinite_count=state.nonfinite_count, groups=new_groups)
    applied = xp.astype(ok, xp.int32)
    return PrecondState(count=state.count + applied, nonfinite_count=state.nonfinite_count + (1 - applied),
                        groups=new_groups)


def steps_leaf_by_leaf(transform: Transform) -> bool:
    """Whether an adapter may step ``transform``'s leaves one by one, each as a tree of one leaf
    given the whole tree's skip decision, and get the update of the whole tree: a transform of
    ``independent_leaves`` (:func:`build_transform`) with ``on_nonfinite="skip"``."""
    return bool(getattr(transform.update, "leafwise", False))


def renamed(state: PrecondState, legacy_names: Callable[[dict], dict]) -> PrecondState:
    """``state`` with every group's entries under the current names (``build_transform``'s
    ``legacy_names``); the very object when no group had an old name."""
    groups = {key: legacy_names(entries) for key, entries in state.groups.items()}
    if all(groups[key] is entries for key, entries in state.groups.items()):
        return state
    return state._replace(groups=groups)


