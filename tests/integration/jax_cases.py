"""The optax transformations the Flax NNX and Equinox tests run, and how they compare trajectories.

``optax.adamw`` is the control: it must pass wherever ours are expected to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import precond_ref.adapters.jax as pj

# Small intervals so that the 5 steps hold refreshes; batch_size for the root-free method.
JAX_OPTIMIZERS = {
    "optax_adamw": lambda: optax.adamw(learning_rate=1e-2),
    "agd": lambda: pj.agd(learning_rate=1e-2),
    "mbf": lambda: pj.mbf(learning_rate=1e-2, damping=0.1, statistics_every=1, precondition_every=2),
    "asgo": lambda: pj.asgo(learning_rate=1e-2, precondition_every=2),
    "if_shampoo": lambda: pj.if_shampoo(learning_rate=1e-2, batch_size=4, precondition_every=2),
}
STEPS = 5


def data() -> tuple[jax.Array, jax.Array]:
    """``STEPS`` regression batches of 4 examples, float64 (the suite runs JAX with x64)."""
    x = jax.random.normal(jax.random.key(2), (STEPS, 4, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (STEPS, 4, 1), jnp.float64)
    return x, y


def assert_close(actual, expected) -> None:
    """Equal to 64 float64 ulps of each leaf's largest entry.

    Both sides run the same operations on the same values, each under one ``jax.jit``; XLA may
    still fuse the two programs differently and so reorder a sum of at most 32 terms here, which
    moves a result by at most 32 ulps of the largest term per step. Measured: exactly equal.
    A framework that hands the optimizer other leaves, names or state is off by far more.
    """
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype == np.float64 and a.shape == e.shape
        bound = 64 * np.finfo(np.float64).eps * max(np.max(np.abs(e)), np.finfo(np.float64).tiny)
        np.testing.assert_allclose(a, e, rtol=0, atol=bound)
