"""The optax adapter inside the workflows optax users already have: wrappers of optax, jax's
transformations of a training step, and the ways a state is kept and handed back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.extend
import optax
import pytest

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


def _conds(jaxpr) -> int:
    """The ``lax.cond`` equations of a jaxpr, those of its sub-jaxprs (jit, scan, ...) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "cond"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _conds(sub)
    return count


def test_step_given_to_optax_reaches_the_core_and_keeps_the_refresh_a_branch_under_vmap():
    """``update(..., step=i)`` (the call's index) is passed through the optax transformation to the
    core, which then decides the periodic work from ``i`` rather than from the state's counters.

    Under ``jax.vmap`` over an ensemble the counters are batched (each member has its own, since a
    member skips a non-finite step alone), so the refresh's ``lax.cond`` on them becomes a select
    and every step computes the refresh; ``step`` mapped with ``in_axes=None`` is one value for
    every member, and the refresh stays one ``lax.cond`` (docs/adapters/jax.md). Same operations on
    the same values either way: the members' trajectories agree to XLA's reordering of a sum of at
    most 8 terms per step (8 ulps of float64 per step, relative; 1e-13 over 6 steps leaves a
    margin). Also through ``optax.chain``, which hands ``step`` to each of its transformations."""
    tx = optax.chain(optax.clip_by_global_norm(10.0), pj.asgo(learning_rate=1e-2, precondition_every=3))
    loss = lambda p, x: jnp.sum((x @ p["w"]) ** 2)  # noqa: E731
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4, 4))}  # 3 members of one 4 x 4 layer
    batches = jax.random.normal(jax.random.key(1), (6, 3, 8, 4))

    def member_step(p, s, x, *step):
        updates, s = tx.update(jax.grad(loss)(p, x), s, p, **({"step": step[0]} if step else {}))
        return optax.apply_updates(p, updates), s

    counted = jax.vmap(member_step)
    given = jax.vmap(member_step, in_axes=(0, 0, 0, None))
    state = jax.vmap(tx.init)(params)
    assert _conds(jax.make_jaxpr(counted)(params, state, batches[0]).jaxpr) == 0  # a select
    assert _conds(jax.make_jaxpr(given)(params, state, batches[0], jnp.int32(0)).jaxpr) == 1
    a, b = (params, state), (params, state)
    counted, given = jax.jit(counted), jax.jit(given)
    for i, x in enumerate(batches):
        a, b = counted(*a, x), given(*b, x, jnp.int32(i))
    assert int(b[1][1].count[0]) == 6
    scale = float(jnp.max(jnp.abs(a[0]["w"])))
    assert float(jnp.max(jnp.abs(a[0]["w"] - b[0]["w"]))) <= 1e-13 * scale


def test_a_step_that_is_not_a_call_index_is_refused_in_optax_words():
    """The core's check of ``step`` (a non-negative integer, or a 0-D integer array) reaches an
    optax user: a float would be accepted by the interval's ``%`` and move every refresh off its
    call, silently."""
    params = {"w": jnp.ones((3, 2), F32)}
    tx = pj.asgo(learning_rate=1e-2)
    state = tx.init(params)
    for bad, kind in ((-1, ValueError), (1.0, TypeError), (jnp.float32(1.0), TypeError)):
        try:
            tx.update(params, state, params, step=bad)
        except kind as error:
            assert "step must be the number of earlier calls" in str(error)
        else:
            raise AssertionError(f"step={bad!r} was accepted")


RANK_PROMOTING = [
    ("if_shampoo", {"batch_size": 8}),
    ("mbf", {}),
    ("mbf", {"mode": "faithful"}),
    ("asgo", {"block_size": 2}),
    ("asgo", {"root_method": "polar_express"}),
    ("s_adagrad", {"rank": 2, "block_size": 4}),
    ("s_adagrad", {"decomposition": "incremental_secular"}),
]


@pytest.mark.parametrize("name, kwargs", RANK_PROMOTING, ids=lambda v: v if isinstance(v, str) else str(v))
def test_a_step_under_rank_promotion_raise_is_the_step_without_it(name, kwargs):
    """``jax_numpy_rank_promotion="raise"`` (a setting some JAX codebases run under, to catch their
    own broadcasting mistakes) does not reach the core, which broadcasts as the array API standard
    does (an identity against a stack of blocks): ``init`` and two jitted updates take exactly the
    steps they take without the setting (the same program), and the user's setting holds again
    around them. These configurations each broadcast a lower-rank operand (the identity of IF-Shampoo's
    factors, MBF's damping, ASGO's blocks and iterative root, S-AdaGrad's blocks and secular
    solver): under the setting they raised ``ValueError``."""
    params = {"d": {"kernel": jnp.linspace(-1.0, 1.0, 30, dtype=F32).reshape(6, 5), "bias": jnp.zeros(5, F32)},
              "v": jnp.ones(7, F32)}
    tx = getattr(pj, name)(**kwargs)

    def run() -> tuple:
        state = tx.init(params)
        step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.sin, p), s, p))
        p = params
        for _ in range(2):
            updates, state = step(p, state)
            assert jax.config.jax_numpy_rank_promotion == setting
            p = optax.apply_updates(p, updates)
        return p, state

    setting = jax.config.jax_numpy_rank_promotion
    plain = run()
    with jax.numpy_rank_promotion("raise"):
        setting = "raise"
        guarded = run()
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), plain, guarded))


@pytest.mark.parametrize("name", ["agd", "if_shampoo", "sketchy"])
def test_maximize_is_refused_naming_the_optax_way_which_maximises(name):
    """torch.optim's ``maximize`` given to an optax factory is refused naming what optax does
    instead, and that way maximises: ``optax.chain(optax.scale(-1.0), <method>)`` on a loss steps
    exactly as the method on the negated loss (the negation is exact), under ``jax.jit``."""
    kwargs = {"batch_size": 4} if name == "if_shampoo" else {}
    with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword 'maximize'; optax transformations "
                                        r"minimise: negate the loss, or put optax\.scale\(-1\.0\) before the method"):
        getattr(pj, name)(maximize=True, **kwargs)
    params = {"w": jnp.arange(6.0).reshape(3, 2) / 7, "b": jnp.ones(2)}

    def loss(p):
        return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum(p["b"] * p["w"][0])

    runs = []
    for opt, sign in ((optax.chain(optax.scale(-1.0), getattr(pj, name)(**kwargs)), 1.0), (getattr(pj, name)(**kwargs), -1.0)):
        p, state = params, opt.init(params)
        step = jax.jit(lambda p, state, opt=opt, sign=sign: opt.update(jax.grad(lambda q: sign * loss(q))(p), state, p))
        for _ in range(3):
            updates, state = step(p, state)
            p = optax.apply_updates(p, updates)
        runs.append(p)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])))
    assert float(loss(runs[0])) > float(loss(params))
