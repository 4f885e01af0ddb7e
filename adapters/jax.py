"""optax ``GradientTransformation`` front-ends for the core methods.

:func:`to_optax` turns a core :class:`precond_ref.Transform` into an
``optax.GradientTransformationExtraArgs``: any pytree (dicts, lists, Flax ``FrozenDict``,
dataclasses registered as pytrees), ``jax.jit`` with a single compilation, ``optax.chain``,
``optax.inject_hyperparams`` and ``optax.MultiSteps``. Leaf paths come from
``jax.tree_util.tree_flatten_with_path`` so that weight/bias pairing sees the user's names
(e.g. Flax ``kernel``/``bias``).

Updates have the parameters' dtype, as ``optax.apply_updates`` expects. A gradient of another
floating dtype than its parameter (bfloat16 gradients of float32 parameters: cast for
communication, or computed by a bfloat16 copy of the model) is taken as the parameter's dtype:
the core casts it where the update enters, so that the state and the updates are exactly those of
the gradient cast by the caller inside the jitted step (``optax.adamw`` takes such gradients
too). Without ``params`` a gradient is taken in its own dtype. Integer,
boolean and complex gradients, and gradients of another shape, are refused, naming the leaf.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import jax
import optax

import precond_ref as pr
from precond_ref.engine.options import CALL_KEYWORDS, UPDATE_KEYWORDS
from precond_ref.transform import PrecondState, Transform
from precond_ref.tree import path_str, tree_flatten

from ._keywords import check_keywords

__all__ = [
    "to_optax",
    "optax_factory",
    "state_shardings",
    "agd",
    "asgo",
    "dasgo",
    "mbf",
    "mbf_warm_start",
    "rf_rmsprop",
    "rf_adamw",
    "if_shampoo",
    "sketchy",
    "s_adagrad",
    "scale_by_sketchy",
]


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def _core_keys(paths: list) -> list[tuple]:
    """Each leaf's path as a tuple of plain keys, with a wrapper's ``.value`` dropped.

    A pytree node that holds its array as its only child under the attribute ``value`` (a Flax NNX
    ``Variable``) adds a trailing ``GetAttrKey('value')`` to the path of its leaf. ``nnx.Optimizer``
    calls ``init`` on the model's ``Variable``s and ``update`` on their bare arrays, so the two
    calls must key the same leaf alike: the state is stored by path. The key is dropped only where
    it is the node's only child; a dataclass whose field ``value`` has sibling fields keeps it, and
    so does a dict key ``"value"``.
    """
    keys = [tuple(_key(e) for e in path) for path in paths]
    children: dict[tuple, int] = {}
    for path in keys:
        if path:
            children[path[:-1]] = children.get(path[:-1], 0) + 1
    out = []
    for path, raw in zip(keys, paths):
        last = raw[-1] if raw else None
        if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value" and children[path[:-1]] == 1 and len(path) > 1:
            path = path[:-1]
        out.append(path or ("value",))
    return out


def _as_core_tree(tree: Any) -> tuple[dict, Any]:
    """The pytree as nested dicts keyed by its path entries, plus the treedef to rebuild it."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    nested: dict = {}
    for keys, (_, leaf) in zip(_core_keys([path for path, _ in with_paths]), with_paths):
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return nested, treedef


def _from_core_tree(nested: dict, like: Any) -> Any:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for keys in _core_keys([path for path, _ in with_paths]):
        node = nested
        for key in keys:
            node = node[key]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _standard_broadcasting() -> Any:
    """A context in which the core's operations broadcast as the array API standard does (an
    identity against a stack of blocks), whatever ``jax_numpy_rank_promotion`` the user set (its
    ``"raise"`` guards their own code). A new one per call: one object entered twice at once
    restores the wrong setting."""
    return jax.numpy_rank_promotion("allow")


def to_optax(transform: Transform) -> optax.GradientTransformationExtraArgs:
    """Wrap a core transform as an optax transformation.

    The keyword arguments of ``update`` the core takes (``batch_size=``; ``step=``, the call's
    index, which decides the periodic work from a value the caller holds rather than from the
    state's counters) are passed to it, the others dropped, so it composes with ``optax.chain``
    and other ``GradientTransformationExtraArgs``.
    """

    # The state must be committed to a device exactly when the parameters are: otherwise the
    # second step sees arguments placed differently from the first and jit compiles again.
    # Built under jit it is uncommitted; it is then placed like the parameters (state_shardings)
    # when every parameter is a committed jax.Array (a NumPy leaf is never committed).
    jitted_init = jax.jit(transform.init)

    def init_fn(params: Any) -> Any:
        if _is_params_placeholder(params):
            # optax.tree.map_params asks for the state's structure with a placeholder for params;
            # no field of this state is a copy of the parameter tree (see state_shardings).
            return PrecondState(_NOT_PARAMS, _NOT_PARAMS, _NOT_PARAMS)
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            # No parameter to step (optax.masked or multi_transform selecting none, or an empty
            # tree): an empty state, as every optax transformation's. The two counters are two
            # arrays: one buffer in two leaves cannot be donated (jax.jit's donate_argnums).
            return PrecondState(*(jax.numpy.zeros((), jax.numpy.int32) for _ in range(2)), {})
        core_params, _ = _as_core_tree(params)
        with _standard_broadcasting():
            state = jitted_init(core_params)
        if all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed for x in leaves):
            state = jax.device_put(state, _shardings_like(state, core_params))
        return state

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        if not jax.tree_util.tree_leaves(updates) and isinstance(state, PrecondState) and state.groups == {}:
            return updates, state._replace(count=state.count + 1)
        core_grads, _ = _as_core_tree(updates)
        core_params = None if params is None else _as_core_tree(params)[0]
        # optax hands every transformation of a chain all the chain's extra arguments (a loss
        # value for another one); the core takes only its own: the call's index and decisions
        # (``step``, ``due``, ``gradients_ok``) and the per-call inputs of the methods.
        core_extra = {key: value for key, value in extra_args.items() if key in CALL_KEYWORDS or key in UPDATE_KEYWORDS}
        with _standard_broadcasting():
            core_updates, new_state = transform.update(core_grads, state, core_params, **core_extra)
        return _from_core_tree(core_updates, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Sharded parameters: where the state lives.


class _NotParams:
    """Marks the state fields that hold no copy of the parameter tree (for optax.tree.map_params)."""

    def __repr__(self) -> str:
        return "<not params>"


_NOT_PARAMS = _NotParams()


def _is_params_placeholder(params: Any) -> bool:
    return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree_util.tree_leaves(params)


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The same devices, every one holding the whole array."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if sharding.is_fully_replicated:
        return sharding
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("devices",)), jax.sharding.PartitionSpec())


def _entry_sharding(param_sharding: jax.sharding.Sharding, param_shape: tuple, shape: tuple) -> jax.sharding.Sharding:
    """A state entry keeps the parameter's mesh axis on each leading dimension it shares (same
    size, divisible by the axis); its other dimensions, and every entry of a parameter that is not
    a ``NamedSharding``, are replicated (or kept whole on a single device)."""
    if not isinstance(param_sharding, jax.sharding.NamedSharding):
        return param_sharding if tuple(shape) == tuple(param_shape) else _replicated(param_sharding)
    mesh = param_sharding.mesh
    spec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
    axes = []
    for dim, size in enumerate(shape):
        axis = spec[dim] if dim < len(param_shape) and size == param_shape[dim] else None
        if axis is not None:
            names = axis if isinstance(axis, tuple) else (axis,)
            if size % math.prod(mesh.shape[a] for a in names):
                axis = None
        axes.append(axis)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))


def _shardings_like(state: PrecondState, core_params: dict) -> PrecondState:
    """A sharding per state leaf: each block's entries follow the sharding of the block's first
    parameter (the group key is that parameter's path), the counters are replicated."""
    leaves, treedef = tree_flatten(core_params)
    by_key = {path_str(path): leaf for path, leaf in zip(treedef.paths, leaves)}
    counters = _replicated(leaves[0].sharding)
    groups = {}
    for key, entries in state.groups.items():
        param = by_key.get(key)
        groups[key] = {
            name: counters if param is None else _entry_sharding(param.sharding, tuple(param.shape), tuple(value.shape))
            for name, value in entries.items()
        }
    return PrecondState(counters, counters, groups)


def state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """The shardings of ``optimizer``'s state for parameters sharded as ``params``, without
    computing the state.

    ``params`` are arrays (or ``jax.ShapeDtypeStruct`` with a ``sharding``) of the parameters as
    they are sharded. Each block's state follows the sharding of the block's first parameter
    where its shape allows, as this module's ``init`` places it (see :func:`to_optax`). Use the
    result as ``out_shardings`` of a jitted ``init``, or as the state's ``in_shardings``/
    ``out_shardings`` of a training step, which then compiles once. ``optimizer`` is one of this
    module's transformations, alone or inside optax's combinators (``optax.chain``,
    ``optax.masked``, ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...): the states of
    optax's own transformations that are copies of the parameter tree (an ``optax.trace`` buffer,
    ``MultiSteps``' accumulated gradients) follow the parameters' shardings, their other arrays
    (counters, injected hyperparameters, which optax's ``init`` leaves on the default device) are
    replicated.
    """
    state = jax.eval_shape(optimizer.init, params)
    ours = [node for node in jax.tree.leaves(state, is_leaf=_is_precond_state) if _is_precond_state(node)]
    if not ours:
        raise TypeError(
            "state_shardings needs a transformation of precond_ref.adapters.jax (alone or inside optax's "
            f"combinators), got a state with none: {type(state).__name__}"
        )
    core_params = _as_core_tree(params)[0]
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    replicated = _replicated(jax.tree.leaves(params)[0].sharding)
    # optax's own sub-states: a copy of the parameter tree follows the parameters (a masked-out
    # leaf stays a MaskedNode), everything else is replicated; ours are placed by block below.
    around = optax.tree.map_params(
        optimizer,
        lambda value, sharding: value if isinstance(value, optax.MaskedNode) else sharding,
        state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda node: isinstance(node, optax.MaskedNode),
    )
    return jax.tree.map(
        lambda node, other: _shardings_like(node, core_params) if _is_precond_state(node) else other,
        state,
        around,
        is_leaf=_is_precond_state,
    )


def _is_precond_state(node: Any) -> bool:
    return isinstance(node, PrecondState)


def optax_factory(
    core_factory: Callable[..., Transform], static: tuple[str, ...] = (), switches: tuple[str, ...] = ()
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """The optax version of a core factory, with its arguments and docstring.

    ``optax.inject_hyperparams`` turns every numeric argument it sees into an array (traced under
    ``jax.jit``). Two kinds of arguments therefore default to ``None`` here, meaning the core's
    default, which inject_hyperparams leaves alone:

    * ``static``: numbers that fix array shapes, loop lengths or the steps that refresh a
      preconditioner, or that a check made on the host reads (ASGO's ``root_tolerance``). Given
      as arrays they raise a ``ValueError`` naming the ``static_args`` to
      pass to ``inject_hyperparams``.
    * ``switches``: coefficients whose zero default means "no state buffer" (``momentum=0``). An
      array may be non-zero, so an injected one always gets its buffer; left at ``None`` the state
      has the layout of the plain transformation.

    So plain ``optax.inject_hyperparams(factory)(learning_rate=...)`` works. ``learning_rate`` is
    annotated ``optax.ScalarOrSchedule`` (optax's marker for arguments that take a schedule).
    """
    signature = inspect.signature(core_factory)
    core_defaults = {name: signature.parameters[name].default for name in static + switches}
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name in core_defaults and parameter.default is not None:
            annotation = parameter.annotation
            parameter = parameter.replace(
                default=None, annotation=f"Optional[{annotation}]" if isinstance(annotation, str) else annotation
            )
        if parameter.name == "learning_rate":
            parameter = parameter.replace(annotation=optax.ScalarOrSchedule)
        parameters.append(parameter)
    presented = signature.replace(parameters=parameters)
    name = core_factory.__name__

    @functools.wraps(core_factory)
    def factory(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        check_keywords(name, presented, kwargs)
        arguments = presented.bind(*args, **kwargs).arguments
        injected = tuple(arg for arg in static if hasattr(arguments.get(arg), "shape"))
        if injected:
            raise ValueError(
                f"{name}: {', '.join(injected)} must be "
                + ("a Python number" if len(injected) == 1 else "Python numbers")
                + " (fixing array shapes, loop lengths, refresh steps or a check made on the host), got an array; "
                "optax.inject_hyperparams makes every numeric argument an array: use "
                f"optax.inject_hyperparams({name}, static_args={injected!r})"
            )
        for arg, default in core_defaults.items():
            if arg in arguments and arguments[arg] is None and default is not None:
                del arguments[arg]
        try:
            core = core_factory(**arguments)
        except (ValueError, TypeError) as error:
            # Named by the factory, as the optimizer's other errors are: inside an optax.chain the
            # check's own words ("learning_rate must be ...") would not say which optimizer it is.
            if str(error).startswith(f"{name}:"):
                raise
            raise type(error)(f"{name}: {error}") from error
        return to_optax(core)

    factory.__signature__ = presented  # type: ignore[attr-defined]
    return factory


agd = optax_factory(pr.agd)

mbf = optax_factory(pr.mbf, static=("statistics_every", "precondition_every", "max_block_dim", "block_size", "refresh_phases"))


def mbf_warm_start(state: Any, grads_batches: Any, **mbf_kwargs: Any) -> Any:
    """MBF's warm start (spec ``mbf.md`` 2.5) for the state of :func:`mbf`.

    ``grads_batches`` is a finite iterable of gradient pytrees (same structure as the parameters)
    computed at the initial parameters with labels sampled from the model's predictive
    distribution; ``mbf_kwargs`` are the arguments the optimizer was built with. Returns the
    state with every block statistic replaced by the mean of the batches' block statistics. For
    an ``optax.inject_hyperparams`` state, pass its ``inner_state``.
    """
    core = pr.mbf(**mbf_kwargs)
    with _standard_broadcasting():
        return core.warm_start(state, (_as_core_tree(g)[0] for g in grads_batches))


asgo = optax_factory(pr.asgo, static=("root_steps", "precondition_every", "block_size", "spread_refresh", "root_tolerance"))
dasgo = optax_factory(pr.dasgo)
# Root-free methods: B (examples the loss averages) as batch_size= of the factory or of update.
rf_rmsprop = optax_factory(pr.rf_rmsprop, switches=("momentum",))
rf_adamw = optax_factory(pr.rf_adamw)
# precondition_every of if_shampoo may be an array (a traced interval works there).
if_shampoo = optax_factory(pr.if_shampoo, static=("max_dense_dim", "block_size", "spread_refresh"))
sketchy = optax_factory(
    pr.sketchy,
    static=("rank", "precondition_every", "start_preconditioning_step", "merge_dims", "max_precondition_dim", "block_size"),
)
s_adagrad = optax_factory(pr.s_adagrad, static=("rank", "block_size", "precondition_every"), switches=("momentum",))
scale_by_sketchy = optax_factory(pr.scale_by_sketchy, static=("rank", "precondition_every", "merge_dims", "block_size"))
