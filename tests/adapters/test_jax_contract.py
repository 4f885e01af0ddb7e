"""Contract of every optax adapter, in the spirit of optax's contrib ``_common_test.py``.

Each test runs on every entry of ``cases.JAX_CASES``. JAX runs with x64 enabled in this suite
(conftest), so every array here is created with an explicit dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cases import JAX_CASES

pytestmark = pytest.mark.parametrize("case", JAX_CASES, ids=lambda c: c.id)

F32 = jnp.float32


def _parabola(params):
    return jnp.sum((params["w"] - 1.0) ** 2)


def _rosenbrock(params):
    x = params["x"]
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


_MIXED_TARGET_W = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], dtype=np.float32)
_MIXED_TARGET_B = np.array([0.25, -0.75], dtype=np.float32)


def _mixed(params):
    return jnp.sum((params["layer"]["kernel"] - _MIXED_TARGET_W) ** 2) + jnp.sum(
        (params["layer"]["bias"] - _MIXED_TARGET_B) ** 2
    )


PROBLEMS = {
    "parabola": (_parabola, lambda: {"w": jnp.zeros((4,), F32) + jnp.asarray([3.0, -2.0, 0.5, 4.0], F32)}),
    "rosenbrock": (_rosenbrock, lambda: {"x": jnp.asarray([-1.0, 1.0], F32)}),
    "mixed_1d_2d": (
        _mixed,
        lambda: {"layer": {"kernel": jnp.zeros((2, 3), F32), "bias": jnp.zeros((2,), F32)}},
    ),
}


_UPDATES: dict = {}
_MIXED_STEPS: dict = {}


def _one_update(case):
    """``case``'s optimizer and its update under ``jax.jit``, made once per case: the tests that
    take one update on the mixed problem's float32 leaves (a non-finite gradient, MultiSteps'
    expected update) share its compilation."""
    if case.id not in _UPDATES:
        opt = case.make()
        _UPDATES[case.id] = opt, jax.jit(lambda g, s, p: opt.update(g, s, p, **case.update_kwargs))
    return _UPDATES[case.id]


def _jitted_step(opt, loss, update_kwargs):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state

    return step


def _committed(tree):
    return jax.device_put(tree, jax.devices()[0])


def _mixed_step(case):
    """``case``'s optimizer and its jitted training step on the mixed problem, made once per case
    and always called with committed parameters (``_committed``): the convergence test on that
    problem, the committed-parameters test and the plain run of the inject_hyperparams test share
    one compilation, and each asserts it is the only one."""
    if case.id not in _MIXED_STEPS:
        opt = case.make()
        _MIXED_STEPS[case.id] = opt, _jitted_step(opt, _mixed, case.update_kwargs)
    return _MIXED_STEPS[case.id]


def _run(opt, loss, params, steps, update_kwargs, step=None):
    state = opt.init(params)
    step = _jitted_step(opt, loss, update_kwargs) if step is None else step
    for _ in range(steps):
        params, state = step(params, state)
    return params, state, step


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_converges(case, problem):
    """Parabola and mixed target: loss / 100 at least; Rosenbrock: loss / 10 (its valley is hard).
    Finite data never makes a non-finite update (no step is skipped). The step compiles once:
    parabola and Rosenbrock start from uncommitted parameters (``jnp.asarray``), the mixed target
    from committed ones (``_mixed_step``), and the state ``init`` makes is placed alike."""
    loss, make = PROBLEMS[problem]
    if problem == "mixed_1d_2d":
        opt, step = _mixed_step(case)
        params = _committed(make())
    else:
        opt, step = case.make(), None
        params = make()
    initial = float(loss(params))
    final_params, state, step = _run(opt, loss, params, case.steps, case.update_kwargs, step)
    final = float(loss(final_params))
    factor = 10.0 if problem == "rosenbrock" else 100.0
    assert np.isfinite(final) and int(state.nonfinite_count) == 0
    assert final < initial / factor, (initial, final)
    assert step._cache_size() == 1  # refresh and plain steps share one compilation


def _plain_configuration_only(case):
    """The optax plumbing (jit caching, MultiSteps, pytrees inside a chain) goes through the same
    adapter code whatever a method's mode or options: it is checked on each method's plain
    configuration (case ids without a variant suffix), which keeps the suite's time in bounds."""
    if "-" in case.id:
        pytest.skip("adapter plumbing: checked on the method's plain configuration")


def test_jit_compiles_once_with_committed_params(case):
    """Committed parameters: the state ``init`` makes is committed alike, so the step's later calls
    (with its own committed results) hit the first call's compilation."""
    _plain_configuration_only(case)
    opt, step = _mixed_step(case)
    params = _committed(PROBLEMS["mixed_1d_2d"][1]())
    assert all(leaf.committed for leaf in jax.tree_util.tree_leaves(opt.init(params)))
    _run(opt, _mixed, params, 5, case.update_kwargs, step)
    assert step._cache_size() == 1


def test_inject_hyperparams_equals_plain(case):
    """Same trajectory with hyperparameters injected as state.

    inject_hyperparams stores them as float32 arrays: 1 - b2 for b2 = 0.999 then differs from the
    Python value by 1.3e-5 relative, hence rtol 1e-4 rather than rounding level.
    """
    params = _committed(PROBLEMS["mixed_1d_2d"][1]())
    opt, step = _mixed_step(case)
    plain, _, _ = _run(opt, _mixed, params, 10, case.update_kwargs, step)
    injected_opt = optax.inject_hyperparams(case.factory, static_args=case.static_args)(
        learning_rate=case.lr, **case.kwargs
    )
    injected, state, _ = _run(injected_opt, _mixed, PROBLEMS["mixed_1d_2d"][1](), 10, case.update_kwargs)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), plain, injected)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(case.lr)


def test_multisteps_zero_on_accumulation_steps(case):
    """MultiSteps(k=3): zero updates on the first two calls; the third applies the averaged gradient."""
    _plain_configuration_only(case)
    params = PROBLEMS["mixed_1d_2d"][1]()
    grads = [jax.grad(_mixed)(jax.tree_util.tree_map(lambda p, i=i: p + 0.1 * i, params)) for i in range(3)]
    opt = optax.MultiSteps(case.make(), every_k_schedule=3)
    state = opt.init(params)
    # one compilation for the three calls (eager MultiSteps re-traces its lax.cond on every call)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p, **case.update_kwargs))
    updates = None
    for i, g in enumerate(grads):
        updates, state = step(g, state, params)
        if i < 2:
            for leaf in jax.tree_util.tree_leaves(updates):
                assert not np.any(np.asarray(leaf))
    inner, update = _one_update(case)
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / 3.0, *grads)
    expected, _ = update(mean, inner.init(params), params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), updates, expected)


def test_dtype_and_shape_stability(case):
    """Updates have the parameters' dtype and shape; the state keeps its layout across steps. The
    tree holds one layer per dtype (float32, bfloat16, float64), so one compilation checks all
    three (each layer's kernel and bias share their dtype, as the methods that pair them need)."""
    params = {
        str(jnp.dtype(dtype)): {"kernel": jnp.full((3, 2), 0.5, dtype), "bias": jnp.zeros((2,), dtype)}
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float64)
    }
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.3, params)
    opt = case.make()
    state = opt.init(params)
    updates, new_state = jax.jit(lambda g, s, p: opt.update(g, s, p, **case.update_kwargs))(grads, state, params)
    for p, u in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(updates)):
        assert u.dtype == p.dtype and u.shape == p.shape
    assert {u.dtype for u in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float64)}
    layout = lambda s: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(new_state)
    assert layout(state) == layout(new_state)


def test_bfloat16_gradients_of_float32_parameters_step_as_float32(case):
    """Gradients of another floating dtype than their parameters (bfloat16 for communication, or
    from a bfloat16 copy of the model) are taken as the parameters' dtype, as optax.adamw takes
    them: the jitted step of bfloat16 gradients of float32 parameters is the very program of a
    step that casts the same gradients to float32 itself, so that every step of their
    trajectories is the same computation, bit for bit; its updates are float32 and its state
    keeps init's layout (a float32 state stays float32).

    The programs are compared as ``jax.jit`` lowers them (dead code dropped), which costs no
    compilation. The caller's cast is inside the step: a cast outside hands XLA float32 inputs,
    whose fusions may round differently. The cast is the engine's, before any method's code: it
    is checked on each method's plain configuration here (two traces each), and on every mode by
    ``tests/test_transform.py``'s NumPy trajectories."""
    if "-" in case.id:
        pytest.skip("the engine's cast of the gradients: checked on the method's plain configuration")
    params = PROBLEMS["mixed_1d_2d"][1]()
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, jnp.bfloat16), params)
    opt = case.make()
    state = opt.init(params)

    def lowered(cast):
        def step(g, params, state):
            if cast:
                g = jax.tree.map(lambda x, p: x.astype(p.dtype), g, params)
            updates, state = opt.update(g, state, params, **case.update_kwargs)
            return updates, optax.apply_updates(params, updates), state

        return jax.jit(step).lower(grads, params, state)

    taken = lowered(cast=False)
    assert taken.as_text() == lowered(cast=True).as_text()
    updates, new_params, new_state = taken.out_info
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(F32)}
    layout = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert layout(new_params) == layout(params) and layout(new_state) == layout(state)


class _Layer(NamedTuple):
    kernel: jax.Array
    bias: jax.Array


def test_arbitrary_pytree_and_chain(case):
    """Nested lists, tuples and NamedTuples go through, also inside optax.chain under jit."""
    _plain_configuration_only(case)
    params = {"layers": [_Layer(jnp.ones((2, 3), F32), jnp.zeros((3,), F32)), (jnp.ones((4,), F32),)]}
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.2), params)
    opt = optax.chain(optax.clip_by_global_norm(1.0), case.make())
    state = opt.init(params)
    updates, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, **case.update_kwargs))(grads, state, params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    assert any(bool(jnp.any(u != 0)) for u in jax.tree_util.tree_leaves(updates))


def test_nonfinite_gradient_is_skipped_under_jit(case):
    params = PROBLEMS["mixed_1d_2d"][1]()
    opt, update = _one_update(case)
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), params)
    updates, new_state = update(grads, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
    assert int(new_state.nonfinite_count) == 1 and int(new_state.count) == 0
    for a, b in zip(jax.tree_util.tree_leaves(state.groups), jax.tree_util.tree_leaves(new_state.groups)):
        np.testing.assert_array_equal(a, b)


def test_an_empty_selection_of_parameters_is_an_empty_state(case):
    """optax's own transformations take a tree with no parameter to step (``optax.masked`` with
    every mask entry False, ``optax.multi_transform`` whose labels give this optimizer none,
    ``init({})``): an empty state, and updates passed through, jitted. The core refuses a tree
    without arrays (a user error there); the optax adapter used to raise "params has no array
    leaves" from inside optax's wrappers."""
    params = {"embed": jnp.ones((5, 3), F32), "norm": jnp.ones((3,), F32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    adam = optax.adam(1e-2)
    masked = optax.masked(case.make(), {"embed": False, "norm": False})
    split = optax.multi_transform({"precond": case.make(), "adam": adam}, {"embed": "adam", "norm": "adam"})
    for tx, want in ((masked, grads), (split, adam.update(grads, adam.init(params), params)[0])):
        state = tx.init(params)
        step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, **case.update_kwargs))
        for _ in range(2):
            updates, state = step(grads, state, params)
        jax.tree.map(np.testing.assert_array_equal, step(grads, tx.init(params), params)[0], want)
    empty = case.make()
    updates, state = empty.update({}, empty.init({}), {})
    assert updates == {} and state.groups == {} and int(state.count) == 1


def test_an_invalid_hyperparameter_is_refused_naming_the_optimizer(case):
    """A hyperparameter the core's checks refuse is refused when the factory is called, in words
    that name the factory: inside an ``optax.chain`` the check's own words ("learning_rate must
    be in [0.0, inf)") would not say which of the chain's optimizers was given it."""
    name = case.factory.__name__
    for bad, words in ((-1e-3, "must be in [0.0, inf)"), ("1e-3", "must be a real number")):
        with pytest.raises(ValueError) as raised:
            optax.chain(optax.clip_by_global_norm(1.0), case.factory(**{**case.kwargs, "learning_rate": bad}))
        assert str(raised.value).startswith(f"{name}: learning_rate {words}"), str(raised.value)
