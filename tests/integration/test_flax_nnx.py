"""Flax NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with our optax transformations.

Invariant: ``nnx.Optimizer`` is optax's ``init``/``update`` applied to the model's ``nnx.Param``
leaves, so 5 training steps through it give the losses and parameters of the same transformation
run by hand (``tx.init`` / ``tx.update`` / ``optax.apply_updates``) on the pure dict of those
arrays (``nnx.split`` + ``nnx.to_pure_dict``), the same forward pass rebuilt by ``nnx.merge``.
NNX hands ``init`` the ``Param`` variables and ``update`` plain arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_cases import JAX_OPTIMIZERS, STEPS, assert_close, data  # noqa: E402

def _model():
    return nnx.Sequential(
        nnx.Linear(4, 8, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
        jax.nn.tanh,
        nnx.Linear(8, 1, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(1)),
    )


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("name", JAX_OPTIMIZERS)
def test_nnx_optimizer_equals_plain_optax(name):
    xs, ys = data()

    model = _model()
    optimizer = nnx.Optimizer(model, JAX_OPTIMIZERS[name](), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    nnx_losses = [nnx_step(model, optimizer, xs[i], ys[i]) for i in range(STEPS)]

    graphdef, params, rest = nnx.split(_model(), nnx.Param, ...)
    plain = nnx.to_pure_dict(params)
    tx = JAX_OPTIMIZERS[name]()
    state = tx.init(plain)

    @jax.jit
    def plain_step(plain, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest), x, y))(plain)
        updates, state = tx.update(grads, state, plain)
        return optax.apply_updates(plain, updates), state, loss

    plain_losses = []
    for i in range(STEPS):
        plain, state, loss = plain_step(plain, state, xs[i], ys[i])
        plain_losses.append(loss)

    assert_close(nnx_losses, plain_losses)
    assert_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), plain)
