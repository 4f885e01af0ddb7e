"""Equinox: ``eqx.filter(model, eqx.is_array)`` parameters and our optax transformations
under ``eqx.filter_jit``.

Invariant: the usual Equinox loop (``eqx.filter_value_and_grad``, ``tx.update`` on the filtered
module, ``eqx.apply_updates``) gives, over 5 steps, the losses and parameters of the same
transformation run by hand on a plain dict of the same arrays under the same names
(``{"layers": {i: {"weight", "bias"}}}``), the forward pass rebuilt with ``eqx.tree_at``: the
module pytree's attribute paths and its ``None`` holes (the activation, the static fields) name
and shape the state exactly as the dict does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

eqx = pytest.importorskip("equinox")

from jax_cases import JAX_OPTIMIZERS, STEPS, assert_close, data  # noqa: E402

LAYERS = (0, 1)


def _model():
    return eqx.nn.MLP(4, 1, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)


def _loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _as_dict(model):
    return {"layers": {i: {"weight": model.layers[i].weight, "bias": model.layers[i].bias} for i in LAYERS}}


def _with(model, plain):
    where = lambda m: [getattr(m.layers[i], k) for i in LAYERS for k in ("weight", "bias")]  # noqa: E731
    return eqx.tree_at(where, model, [plain["layers"][i][k] for i in LAYERS for k in ("weight", "bias")])


@pytest.mark.parametrize("name", list(JAX_OPTIMIZERS))
def test_equinox_filtered_params_equal_plain_optax(name):
    xs, ys = data()

    model = _model()
    tx = JAX_OPTIMIZERS[name]()
    state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def eqx_step(model, state, x, y):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, x, y)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    eqx_losses = []
    for i in range(STEPS):
        model, state, loss = eqx_step(model, state, xs[i], ys[i])
        eqx_losses.append(loss)

    template = _model()
    plain = _as_dict(template)
    tx = JAX_OPTIMIZERS[name]()
    plain_state = tx.init(plain)

    @jax.jit
    def plain_step(plain, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _loss(_with(template, p), x, y))(plain)
        updates, state = tx.update(grads, state, plain)
        return optax.apply_updates(plain, updates), state, loss

    plain_losses = []
    for i in range(STEPS):
        plain, plain_state, loss = plain_step(plain, plain_state, xs[i], ys[i])
        plain_losses.append(loss)

    assert_close(eqx_losses, plain_losses)
    assert_close(_as_dict(model), plain)
