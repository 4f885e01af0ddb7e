"""optax ``GradientTransformation`` front-ends for the core methods.

:func:`to_optax` turns a core :class:`precond_ref.Transform` into an
``optax.GradientTransformationExtraArgs``: any pytree (dicts, lists, Flax ``FrozenDict``,
dataclasses registered as pytrees), ``jax.jit`` with a single compilation, ``optax.chain``,
``optax.inject_hyperparams`` and ``optax.MultiSteps``. Leaf paths come from
``jax.tree_util.tree_flatten_with_path`` so that weight/bias pairing sees the user's names
(e.g. Flax ``kernel``/``bias``). Updates have the dtype of the gradients (= the parameters').
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax

import precond_ref as pr
from precond_ref.transform import Transform

__all__ = [
    "to_optax",
    "optax_factory",
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


def _as_core_tree(tree: Any) -> tuple[dict, Any]:
    """The pytree as nested dicts keyed by its path entries, plus the treedef to rebuild it."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    nested: dict = {}
    for path, leaf in with_paths:
        keys = tuple(_key(e) for e in path) or ("value",)
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return nested, treedef


def _from_core_tree(nested: dict, like: Any) -> Any:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in with_paths:
        node = nested
        for key in tuple(_key(e) for e in path) or ("value",):
            node = node[key]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def to_optax(transform: Transform) -> optax.GradientTransformationExtraArgs:
    """Wrap a core transform as an optax transformation.

    Extra keyword arguments of ``update`` (e.g. ``batch_size=``) are passed to the core, so it
    composes with ``optax.chain`` and other ``GradientTransformationExtraArgs``.
    """

    # The state must be committed to a device exactly when the parameters are: otherwise the
    # second step sees arguments placed differently from the first and jit compiles again.
    # Built under jit it is uncommitted; it is then committed to the parameters' placement if any.
    jitted_init = jax.jit(transform.init)

    def init_fn(params: Any) -> Any:
        core_params, _ = _as_core_tree(params)
        state = jitted_init(core_params)
        first = jax.tree_util.tree_leaves(params)[:1]
        if first and not isinstance(first[0], jax.core.Tracer) and first[0].committed:
            state = jax.device_put(state, first[0].sharding)
        return state

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        core_grads, _ = _as_core_tree(updates)
        core_params = None if params is None else _as_core_tree(params)[0]
        core_updates, new_state = transform.update(core_grads, state, core_params, **extra_args)
        return _from_core_tree(core_updates, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optax_factory(core_factory: Callable[..., Transform]) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """The optax version of a core factory, with the same signature and docstring.

    ``functools.wraps`` keeps the signature visible to ``optax.inject_hyperparams``.
    """

    @functools.wraps(core_factory)
    def factory(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        return to_optax(core_factory(*args, **kwargs))

    return factory


agd = optax_factory(pr.agd)

mbf = optax_factory(pr.mbf)


def mbf_warm_start(state: Any, grads_batches: Any, **mbf_kwargs: Any) -> Any:
    """MBF's warm start (spec ``mbf.md`` 2.5) for the state of :func:`mbf`.

    ``grads_batches`` is a finite iterable of gradient pytrees (same structure as the parameters)
    computed at the initial parameters with labels sampled from the model's predictive
    distribution; ``mbf_kwargs`` are the arguments the optimizer was built with. Returns the
    state with every block statistic replaced by the mean of the batches' block statistics. For
    an ``optax.inject_hyperparams`` state, pass its ``inner_state``.
    """
    core = pr.mbf(**mbf_kwargs)
    return core.warm_start(state, (_as_core_tree(g)[0] for g in grads_batches))


asgo = optax_factory(pr.asgo)
dasgo = optax_factory(pr.dasgo)
# Root-free methods: B (examples the loss averages) as batch_size= of the factory or of update.
rf_rmsprop = optax_factory(pr.rf_rmsprop)
rf_adamw = optax_factory(pr.rf_adamw)
if_shampoo = optax_factory(pr.if_shampoo)
sketchy = optax_factory(pr.sketchy)
s_adagrad = optax_factory(pr.s_adagrad)
scale_by_sketchy = optax_factory(pr.scale_by_sketchy)
