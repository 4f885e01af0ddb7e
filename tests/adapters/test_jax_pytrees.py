"""Pytrees whose leaves sit inside wrapper nodes (Flax NNX ``Variable``) and ``nnx.Optimizer``.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` calls ``tx.init`` on the model's ``Variable``s (each a
pytree node whose only child is its array, under the key ``GetAttrKey('value')``) and
``tx.update`` on bare arrays. The core stores its state by leaf path, so both calls must give a
leaf the same path: the optax adapter drops a ``.value`` attribute key that is a node's only child.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cases import JAX_CASES

PLAIN_CASES = [c for c in JAX_CASES if "-" not in c.id]  # one configuration per method
F64 = jnp.float64


@jax.tree_util.register_pytree_with_keys_class
class _Box:
    """A stand-in for an NNX ``Variable``: one array child keyed ``GetAttrKey('value')``."""

    def __init__(self, value):
        self.value = value

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("value"), self.value),), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Scaled:
    """A node with a field named ``value`` beside another field: its key must stay."""

    value: jax.Array
    scale: jax.Array


def _bare():
    return {
        "layer": {
            "kernel": jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(3, 4), F64),
            "bias": jnp.asarray([0.1, -0.2, 0.3, 0.0], F64),
        },
        "v": jnp.asarray([0.5, -1.5], F64),
    }


def _boxed(tree):
    return jax.tree_util.tree_map(_Box, tree)


def _grads(tree):
    return jax.tree_util.tree_map(lambda p: jnp.cos(3.0 * p) + 0.25, tree)


def _unbox(tree):
    return jax.tree_util.tree_map(lambda b: b.value, tree, is_leaf=lambda x: isinstance(x, _Box))


# The key rule lives in the adapter, the same for every method: checked on an element-wise method
# and on MBF, which pairs ``kernel`` with ``bias`` by name (all nine run through nnx.Optimizer below).
@pytest.mark.parametrize("case", [c for c in PLAIN_CASES if c.id in ("agd", "mbf")], ids=lambda c: c.id)
def test_wrapped_init_and_bare_update_share_the_state(case):
    """Invariant: a leaf wrapped in a single-child ``value`` node is the same leaf as the bare array
    (the wrapper changes no number), so ``init`` on the wrapped tree and ``update`` on the bare
    trees must run, key the state by the bare names (MBF and IF-Shampoo pair ``kernel`` with
    ``bias`` by those names), and give exactly the updates of the all-bare run; updates of wrapped
    gradients come back wrapped. Before the fix: "grads do not match the optimizer state"."""
    opt = case.make()
    # Jitted (one compilation per tree structure, rather than every operation of eager steps).
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, **case.update_kwargs))
    bare = _bare()
    want_state = opt.init(bare)
    want, _ = update(_grads(bare), want_state, bare)

    state = opt.init(_boxed(bare))
    assert set(state.groups) == set(want_state.groups)
    got, _ = update(_grads(bare), state, bare)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)

    boxed_updates, _ = update(_boxed(_grads(bare)), state, _boxed(bare))
    assert jax.tree_util.tree_structure(boxed_updates) == jax.tree_util.tree_structure(_boxed(bare))
    jax.tree_util.tree_map(np.testing.assert_array_equal, _unbox(boxed_updates), want)


def test_value_field_with_siblings_keeps_its_key():
    """Only a ``value`` key that is its node's only child is dropped: a dataclass with fields
    ``value`` and ``scale`` keeps both names (dropping one would collide with its parent's key)."""
    import precond_ref.adapters.jax as pj

    params = {"p": _Scaled(jnp.ones((2,), F64), jnp.ones((3,), F64))}
    opt = pj.agd(1e-2)
    state = opt.init(params)
    assert sorted(state.groups) == ["p/scale", "p/value"]
    updates, _ = opt.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    assert updates["p"].value.shape == (2,) and updates["p"].scale.shape == (3,)


def test_numpy_leaves_init_like_jax_arrays():
    """``init`` takes NumPy parameters, as optax's own transforms do: the state equals that of the
    same values as uncommitted jax arrays, and stays uncommitted (host arrays are placed on no
    device; committing it would compile a jitted step again once its parameters are jax arrays).
    Before the fix: ``AttributeError: 'numpy.ndarray' object has no attribute 'committed'``."""
    import precond_ref.adapters.jax as pj

    host = {"w": np.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": np.zeros(2)}
    opt = pj.agd(1e-2)
    state = opt.init(host)
    want = opt.init(jax.tree_util.tree_map(jnp.asarray, host))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, want)
    assert not any(leaf.committed for leaf in jax.tree_util.tree_leaves(state))


def test_optax_own_transform_takes_the_same_trees():
    """Control: optax's adam, whose state mirrors the parameter tree, takes wrapped parameters at
    ``init`` and the wrapped gradients at ``update`` (its state's nodes are the wrappers too), with
    the updates of the bare run; ours matches that and, above, also takes bare gradients."""
    opt = optax.adam(1e-2)
    bare = _bare()
    want, _ = opt.update(_grads(bare), opt.init(bare), bare)
    got, _ = opt.update(_boxed(_grads(bare)), opt.init(_boxed(bare)), _boxed(bare))
    jax.tree_util.tree_map(np.testing.assert_array_equal, _unbox(got), want)


@pytest.mark.parametrize("case", PLAIN_CASES, ids=lambda c: c.id)
def test_flax_nnx_optimizer(case):
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` steps a two-layer Flax NNX model with every
    method, as it does with ``optax.adam``: the parameters after two steps (under ``nnx.jit``) are
    exactly those of the same transformation driven by hand on the model's bare parameter arrays
    (under ``jax.jit``; same arithmetic)."""
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self):
            self.l1 = nnx.Linear(3, 4, rngs=nnx.Rngs(0), param_dtype=F64)
            self.l2 = nnx.Linear(4, 2, rngs=nnx.Rngs(1), param_dtype=F64)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    x = jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(4, 3), F64)

    def loss(model):
        return jnp.mean((model(x) - 1.0) ** 2)

    def pure_loss(p):
        m = Model()
        nnx.update(m, p)
        return loss(m)

    # Both runs jitted (one compilation each, rather than every operation of two eager steps):
    # the same operations on the same arrays, so the same numbers.
    @jax.jit
    def by_hand(params, state):
        updates, state = tx.update(jax.grad(pure_loss)(params), state, params, **case.update_kwargs)
        return optax.apply_updates(params, updates), state

    model = Model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = case.make()
    state = tx.init(params)
    for _ in range(2):
        params, state = by_hand(params, state)

    @nnx.jit
    def with_nnx(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model), **case.update_kwargs)

    model = Model()
    optimizer = nnx.Optimizer(model, optax.with_extra_args_support(tx) if case.update_kwargs else tx, wrt=nnx.Param)
    for _ in range(2):
        with_nnx(model, optimizer)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
