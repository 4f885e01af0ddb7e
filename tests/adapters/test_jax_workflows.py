"""The optax adapter inside the workflows optax users already have: wrappers of optax, jax's
transformations of a training step, and the ways a state is kept and handed back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import precond_ref.adapters.jax as pj

F32 = jnp.float32


def test_an_empty_state_can_be_donated():
    """``optax.masked`` selecting no parameter gives our transformation an empty tree, whose state
    is two counters. ``jax.jit(..., donate_argnums=...)`` on the optimizer state (optax's and
    jax's recipe for updating it in place) refuses one buffer donated twice, so the two counters
    must be two arrays, as each optax state's arrays are."""
    params = {"embed": jnp.ones((3, 2), F32), "norm": jnp.ones((2,), F32)}
    tx = optax.masked(pj.agd(learning_rate=1e-2), {"embed": False, "norm": False})
    step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
    state = tx.init(params)
    for _ in range(2):
        updates, state = step(params, state, params)
    inner = state.inner_state
    assert int(inner.count) == 2 and int(inner.nonfinite_count) == 0
    assert updates["embed"] is not None and bool(jnp.all(updates["embed"] == params["embed"]))


def test_a_chain_hands_its_extra_arguments_to_every_transformation():
    """optax gives every transformation of a chain all the chain's extra arguments
    (``GradientTransformationExtraArgs``): here the loss ``value`` that
    ``optax.contrib.reduce_on_plateau`` reads. Ours take those they read (``batch_size``) and
    leave the others, where the core refuses an update keyword no method reads (a misspelling)."""
    params = {"w": jnp.ones((3, 2), F32)}
    tx = optax.chain(pj.rf_adamw(learning_rate=1e-2, batch_size=4), optax.contrib.reduce_on_plateau(patience=1))
    state = tx.init(params)
    updates, state = tx.update(params, state, params, value=jnp.asarray(1.0, F32), batch_size=4)
    alone, _ = pj.rf_adamw(learning_rate=1e-2, batch_size=4).update(params, pj.rf_adamw(learning_rate=1e-2).init(params), params)
    assert bool(jnp.all(updates["w"] == alone["w"]))
