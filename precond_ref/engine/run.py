"""The engine's run loop: :func:`build_transform` turns a method's per-group functions into a
:class:`~precond_ref.transform.Transform` over trees, and owns what every method shares (module
docstring of :mod:`precond_ref.engine`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from .._backend import (
    IdentityDict, JAX_MATMUL_PRECISION as _JAX_PRECISION, NO_CONTEXT as _NO_CONTEXT, array_device, device_key,
    float32_matmul_precision, is_number, namespace_of, remembered_slices, scalar_zero, torch_compiling,
)
from ..transform import Interval, LeafGroup, PrecondState, Transform, check_choice, is_due, singleton_groups
from ..tree import Path, path_str, tree_flatten, tree_leaves, tree_unflatten
from . import skip
from .checks import (
    check_due, check_fits, check_group, check_groups, check_leaves, check_params, check_state_namespace, check_step, layout_of,
    unaliased,
)
from .context import StepContext
from .factors import keeping_constants
from .joined import pack
from .options import check_update_keywords

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
        The method's name, used in error messages; kept as ``update.method`` for adapters that
        answer per method (CuPy's captured step: whether CuPy can capture it).
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
        arrays under the current names (the very dict given when no name is old). ``update``
        migrates the entries of a group that do not fit its layout (a restored optax state keeps
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
                     matmul_precision, elementwise, layout_hint, legacy_names)

    def init(params: Any) -> PrecondState:
        with keeping_constants(runner.constants):
            return runner.init(params)

    def update(grads: Any, state: PrecondState, params: Any = None, *, step: int | None = None,
               due: tuple[bool, ...] | None = None, gradients_ok: Any = None, **extra: Any) -> tuple[Any, PrecondState]:
        if extra:
            check_update_keywords(name, extra)
        return runner.update(grads, state, params, step, due, gradients_ok, extra)

    init.layout_hint = layout_hint  # type: ignore[attr-defined]
    init.legacy_names = legacy_names  # type: ignore[attr-defined]
    update.leafwise = independent_leaves and on_nonfinite == "skip"  # type: ignore[attr-defined]
    update.method = name  # type: ignore[attr-defined]
    return Transform(init, update, runner.due, matmul_precision, group_leaves)


class _Runner:
    """The run loop of one transform (:func:`build_transform`): its checks, the non-finite rule,
    the call of the method's groups and the new counters, as named sub-steps in the order
    :meth:`step` runs them; and what the transform keeps (the state layouts, the shapes ``init``
    saw, the arrays a step makes once), which goes with it."""

    def __init__(self, name, init_group, update_groups, group_leaves, on_nonfinite, needs_params, intervals,
                 matmul_precision, elementwise, layout_hint, legacy_names):
        self.name, self.init_group, self.update_groups, self.group_leaves = name, init_group, update_groups, group_leaves
        self.on_nonfinite, self.needs_params, self.intervals = on_nonfinite, needs_params, intervals
        # StepContext.every's declarations: the intervals that are numbers and the others (predicates,
        # arrays), each as (position, interval) pairs
        self.declared = tuple(tuple((i, x) for i, x in enumerate(intervals) if is_number(x) == number) for number in (True, False))
        self.precision, self.elementwise = matmul_precision, elementwise
        self.layout_hint, self.legacy_names = layout_hint, legacy_names
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
        groups, paths = {}, {}
        for group in self.group_leaves(treedef.paths, leaves):
            if group.key in paths:  # the state of both would be one entry, read and written by each
                raise ValueError(
                    f"{self.name}: params leaves {paths[group.key]!r} and {group.paths[0]!r} have the same name "
                    f"{group.key!r} (a key holding '/', or keys 1 and '1'); rename one")
            paths[group.key] = group.paths[0]
            members = tuple(leaves[i] for i in group.indices)
            if all(math.prod(leaf.shape) == 0 for leaf in members):
                groups[group.key] = {}
            else:
                groups[group.key] = unaliased(xp, self.init_group(members, group.paths, xp), members)
                self.layouts[self.layout_key(group, members, xp)] = layout_of(groups[group.key])
        return PrecondState(count=xp.zeros((), dtype=xp.int32, device=dev),
                            nonfinite_count=xp.zeros((), dtype=xp.int32, device=dev), groups=groups)

    def due(self, step: int) -> tuple[bool, ...]:
        check_step(self.name, step)
        return tuple(bool(is_due(interval, step)) for interval in self.intervals)

    def update(self, grads: Any, state: PrecondState, params: Any, step: Any, due: Any, given_ok: Any,
               extra: dict) -> tuple[Any, PrecondState]:
        """:meth:`step` under the step's settings (matmul precision, kept slices and constants), of
        the tree or, where an element-wise method's small leaves pack
        (:func:`~precond_ref.engine.joined.pack`), of the tree with them as one flat leaf."""
        leaves, treedef = tree_flatten(grads)
        try:
            xp = namespace_of(*leaves)
        except TypeError:
            xp = None  # step names the problem
        if xp is not None and params is not None:
            leaves = parameter_dtyped(xp, leaves, params)

        def packed_step() -> tuple[Any, PrecondState]:
            packed = None
            if self.elementwise and self.on_nonfinite == "skip" and xp is not None:
                packed = pack(self.name, self.layout_for, leaves, treedef, state, params, xp)
            if packed is None:
                return self.step(leaves, treedef, xp, state, params, step, due, given_ok, extra)
            flat_grads, flat_state, flat_params, unpack, members = packed
            return unpack(*self.step(*tree_flatten(flat_grads), xp, flat_state, flat_params, step, due, given_ok, extra,
                                     members))

        if torch_compiling():  # nothing to set: the adapter sets the precision, and nothing is kept or remembered
            return packed_step()
        with (float32_matmul_precision(xp, self.precision) if xp is not None else _NO_CONTEXT, remembered_slices(xp),
              keeping_constants(self.constants)):
            return packed_step()

    def step(self, grad_leaves: list, treedef: Any, xp: Any, state: PrecondState, params: Any, step: Any, due: Any,
             given_ok: Any, extra: dict, members: Optional[dict] = None) -> tuple[Any, PrecondState]:
        """One step of the tree of ``grad_leaves`` (namespace ``xp``, ``None`` where they have
        none): checks, the skip decision, the groups' updates and new state, the non-finite rule's
        selections (:mod:`~precond_ref.engine.skip`), the counters. ``members``: the parameters'
        paths of each flat leaf of a packed tree by its key (:func:`~precond_ref.engine.joined.pack`),
        which the checks of its step name."""
        if not isinstance(state, PrecondState):
            raise TypeError(f"{self.name}: state must be the PrecondState returned by init, got {type(state)}")
        xp = check_leaves(grad_leaves, treedef.paths, f"{self.name}: grads", xp)
        param_leaves = check_params(self.name, xp, grad_leaves, treedef.paths, params, self.needs_params, self.leaf_shapes)
        groups = check_groups(self.name, self.group_leaves(treedef.paths, grad_leaves), state.groups)
        ok, finite_step = skip.decision(self.name, xp, grad_leaves, treedef.paths, self.on_nonfinite, given_ok)
        # The step's periodic decisions: those a compiled caller took on the host (due), or the
        # call number they are taken from (step, else the state's counters).
        if due is None:
            if step is not None:
                check_step(self.name, step)
            calls = step if step is not None else state.count + state.nonfinite_count
        else:
            check_due(self.name, due, len(self.intervals))
            calls, due = None, (*self.declared, due)
        ctx = StepContext(xp=xp, count=state.count, extra=extra, calls=calls, due=due, shared={}, settled=IdentityDict(),
                          ok=ok if self.on_nonfinite == "skip" else None, applied=finite_step)
        # A 0-D zero per dtype and device serves every leaf's selections.
        zeros = [ctx.once(("zero", g.dtype, device_key(g)), lambda g=g: scalar_zero(xp, g)) for g in grad_leaves]
        grad_leaves = skip.skipped_gradients(xp, ok, finite_step, grad_leaves, zeros, self.elementwise)
        updates, old_groups, new_groups = self.run_groups(xp, ctx, groups, grad_leaves, param_leaves, state.groups,
                                                          members or {})
        updates = skip.finite_updates(xp, ok, finite_step, updates, zeros)
        if self.on_nonfinite == "skip":
            new_groups = skip.selected_state(xp, ok, finite_step, ctx.settled, old_groups, new_groups)
        return tree_unflatten(treedef, updates), skip.counted(xp, ok, finite_step, state, new_groups)

    def run_groups(self, xp: Any, ctx: StepContext, groups: list, grad_leaves: list, param_leaves: Optional[list],
                   olds: dict, flat_members: dict) -> tuple[list, dict, dict]:
        """The method's updates and new state of every group (zero-size groups: zero updates, no
        state), checked against the old state ``olds``, and the updates cast to the gradients'
        dtypes; with the old state, a group's entries that do not fit its layout (saved by an
        earlier version) migrated by ``legacy_names``: a current state runs no migration.
        ``flat_members``: the members' paths of a packed tree's flat leaves, by key (:meth:`step`)."""
        members = [(group, tuple(grad_leaves[i] for i in group.indices),
                    None if param_leaves is None else tuple(param_leaves[i] for i in group.indices)) for group in groups]
        live = [m for m in members if any(math.prod(leaf.shape) for leaf in m[1])]
        # Not under dynamo, which cannot trace the dict compare: torch's .grad always fits, and the
        # torch adapter migrates a state on load.
        if not torch_compiling():
            for group, g, _ in live:
                check_state_namespace(self.name, xp, group, g, olds[group.key])
                layout = self.layout_for(group, g, xp)
                if layout_of(olds[group.key]) != layout:
                    if self.legacy_names is not None:
                        olds = {**olds, group.key: self.legacy_names(olds[group.key])}
                    check_fits(self.name, group, g, olds[group.key], layout, self.layout_hint)
        outs = self.update_groups(
            [g for _, g, _ in live], [olds[group.key] for group, _, _ in live], [p for _, _, p in live],
            [ctx._replace(paths=group.paths) for group, _, _ in live],
        ) if live else []
        results = {group.key: out for (group, _, _), out in zip(live, outs)}
        updates: list[Any] = [None] * len(grad_leaves)
        new_groups = {}
        for group, g, _ in members:
            upd, new = results.get(group.key) or (tuple(xp.zeros_like(leaf) for leaf in g), {})
            check_group(self.name, group, g, upd, olds[group.key], new, flat_members.get(group.key))
            for i, u in zip(group.indices, upd):
                updates[i] = u if u.dtype == grad_leaves[i].dtype else xp.astype(u, grad_leaves[i].dtype)
            new_groups[group.key] = new
        return updates, olds, new_groups


def parameter_dtyped(xp: Any, grads: list, params: Any) -> list:
    """The gradient leaves ``grads``, each real floating one of another real floating dtype than its
    parameter cast to the parameter's dtype (a bfloat16 gradient of a float32 parameter: the
    gradient as float32), so that the step (the pack, the checks, the skip decision, the state,
    the updates) sees exactly what it sees for a gradient of the parameter's dtype. The parameter
    is the leaf of ``params`` of the same shape at the same position. The very list where nothing
    is cast. Everything else (another library, shape or tree, a non-floating or complex leaf) is
    left as given, for the checks to refuse."""
    param_leaves = tree_leaves(params)
    if len(param_leaves) != len(grads):
        return grads
    targets = [p.dtype if getattr(p, "shape", None) is not None and tuple(p.shape) == tuple(g.shape) else None
               for g, p in zip(grads, param_leaves)]
    cast = [i for i, (g, dtype) in enumerate(zip(grads, targets)) if dtype is not None and g.dtype != dtype]
    if not cast:
        return grads
    grads = list(grads)
    for i in cast:
        g, dtype = grads[i], targets[i]
        try:
            both_real = xp.isdtype(g.dtype, "real floating") and xp.isdtype(dtype, "real floating")
        except (TypeError, ValueError):  # a dtype of another library: the checks name it
            both_real = False
        if both_real:
            grads[i] = xp.astype(g, dtype)
    return grads


def steps_leaf_by_leaf(transform: Transform) -> bool:
    """Whether an adapter may step ``transform``'s leaves one by one, each as a tree of one leaf
    given the whole tree's skip decision, and get the update of the whole tree: a transform of
    ``independent_leaves`` (:func:`build_transform`) with ``on_nonfinite="skip"``."""
    return bool(getattr(transform.update, "leafwise", False))

