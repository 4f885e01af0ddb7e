"""Hyperparameters injected by ``optax.inject_hyperparams`` that the core reads as intervals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import precond_ref.adapters.jax as pj

F64 = jnp.float64
KWARGS = dict(learning_rate=1e-1, preconditioner_lr=0.5, damping=0.1, batch_size=1)


def _grads(params, i):
    return jax.tree_util.tree_map(lambda p: jnp.cos(3.0 * p + 0.7 * i) + 0.1 * p, params)


def test_if_shampoo_injected_interval_is_traced_and_changes_the_refresh_steps():
    """IF-Shampoo's ``precondition_every`` injected as a hyperparameter is traced under ``jax.jit``:
    one compilation, and setting it in the state between steps moves the refreshes.

    Invariant: the refresh runs on call c iff c % interval == 0 (``transform.is_due``), read from
    the interval of that call; so interval 3 for calls 0..3 and 2 for calls 4..8 refreshes at
    0, 3, 4, 6, 8, exactly what the plain transformation does when built with 3 for the first four
    calls and with 2 after them on the same state. Ignoring the change would skip the refresh at
    calls 4 and 8 and change those steps' updates. Before the fix the first traced call raised
    ``TracerBoolConversionError`` in ``is_due``.
    """
    params = {"w": jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(3, 2), F64), "b": jnp.asarray([0.2, -0.4], F64)}

    injected = optax.inject_hyperparams(pj.if_shampoo, static_args=("max_dense_dim",))(precondition_every=3, **KWARGS)
    step = jax.jit(injected.update)
    state = injected.init(params)
    assert jnp.issubdtype(state.hyperparams["precondition_every"].dtype, jnp.integer)
    got = []
    for i in range(9):
        if i == 4:
            state.hyperparams["precondition_every"] = jnp.asarray(2)  # as inject_hyperparams stores 3
        updates, state = step(_grads(params, i), state, params)
        got.append(updates)
    assert step._cache_size() == 1

    plain = {k: pj.if_shampoo(precondition_every=k, **KWARGS) for k in (3, 2)}
    inner = plain[3].init(params)
    for i in range(9):
        opt = plain[3] if i < 4 else plain[2]
        want, inner = jax.jit(opt.update)(_grads(params, i), inner, params)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=64 * np.finfo(np.float64).eps, atol=0), got[i], want
        )

    # The refresh at calls 4 and 8 matters: with interval 3 throughout, those steps differ.
    unchanged = pj.if_shampoo(precondition_every=3, **KWARGS)
    inner = unchanged.init(params)
    differs = []
    for i in range(9):
        want, inner = jax.jit(unchanged.update)(_grads(params, i), inner, params)
        differs.append(not np.allclose(np.asarray(got[i]["w"]), np.asarray(want["w"]), rtol=1e-9, atol=0))
    assert differs[4] and not any(differs[:4])
