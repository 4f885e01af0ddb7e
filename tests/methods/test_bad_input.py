"""Bad input for all nine methods: zero-size parameters, gradients of another array library or of
the wrong shape. Each is either handled by the rule of the specs (zero-size: no state, zero
updates) or refused with an error that names the offending leaf and both sides."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import precond_ref as pr
from precond_ref.tree import tree_flatten

# Explicit learning rates (the factories' defaults are not what these tests are about).
METHODS = {
    "agd": lambda: pr.agd(learning_rate=1e-2),
    "asgo": lambda: pr.asgo(learning_rate=1e-2),
    "dasgo": lambda: pr.dasgo(learning_rate=1e-2),
    "sketchy": lambda: pr.sketchy(learning_rate=1e-2, rank=2),
    "s_adagrad": lambda: pr.s_adagrad(learning_rate=1e-2, rank=2),
    "rf_rmsprop": lambda: pr.rf_rmsprop(learning_rate=1e-2, batch_size=4),
    "rf_adamw": lambda: pr.rf_adamw(learning_rate=1e-2, batch_size=4),
    "if_shampoo": lambda: pr.if_shampoo(learning_rate=1e-2, batch_size=4, grouping="weight_bias"),
    "mbf": lambda: pr.mbf(learning_rate=1e-2),
}
method = pytest.mark.parametrize("name", sorted(METHODS))


def _layer(rng=None):
    rng = rng or np.random.default_rng(0)
    return {"l": {"weight": rng.standard_normal((3, 4)), "bias": rng.standard_normal(3)}}


def _needs_params(opt, params) -> bool:
    try:
        opt.update(params, opt.init(params))
    except ValueError as err:
        if "update needs params" in str(err):
            return True
        raise
    return False


@method
@pytest.mark.parametrize(
    "tree",
    [
        np.zeros((0, 3)),
        {"e": np.zeros((0, 3))},
        {"l": {"weight": np.zeros((0, 3)), "bias": np.zeros((0,))}},
    ],
    ids=["root", "alone", "weight-and-bias"],
)
def test_tree_of_zero_size_parameters_only(name, tree):
    """Specs README, shapes: a parameter with a zero-size axis is left unchanged with no state (no
    factor), and its update is zeros of its shape. With nothing but such leaves (a model whose
    only layer is empty) the methods that stack their blocks failed with IndexError."""
    opt = METHODS[name]()
    state = opt.init(tree)
    assert all(entries == {} for entries in state.groups.values())
    for _ in range(2):
        updates, state = opt.update(tree, state, tree)
        for u, p in zip(tree_flatten(updates)[0], tree_flatten(tree)[0]):
            assert u.shape == p.shape and u.dtype == p.dtype
    assert int(state.count) == 2 and all(entries == {} for entries in state.groups.values())


@method
def test_zero_size_parameter_beside_others_changes_nothing_else(name):
    """A zero-size leaf gets a zero-size update and no state, and the other leaves' updates are
    exactly those of the same tree without it (blocks are independent across parameters)."""
    rng = np.random.default_rng(1)
    params = {**_layer(rng), "v": rng.standard_normal(5)}
    grads = [{k: v for k, v in _layer(np.random.default_rng(i + 2)).items()} | {"v": np.cos(np.arange(5.0) + i)} for i in range(3)]
    with_empty = lambda tree: {**tree, "e": np.zeros((2, 0, 3))}  # noqa: E731

    opt, ref = METHODS[name](), METHODS[name]()
    state, ref_state = opt.init(with_empty(params)), ref.init(params)
    assert state.groups["e"] == {}
    for g in grads:
        updates, state = opt.update(with_empty(g), state, with_empty(params))
        want, ref_state = ref.update(g, ref_state, params)
        assert updates["e"].shape == (2, 0, 3)
        for a, b in zip(tree_flatten({k: updates[k] for k in want})[0], tree_flatten(want)[0]):
            np.testing.assert_array_equal(a, b)


@method
def test_gradients_of_another_array_library_are_refused_by_leaf(name):
    """JAX parameters (and state) with NumPy gradients of the same dtype: a TypeError that names
    the leaf and both libraries, with and without ``params`` (it failed inside array_api_compat,
    or silently returned arrays of the other library)."""
    opt = METHODS[name]()
    params = {"l": {k: jnp.asarray(v) for k, v in _layer()["l"].items()}}
    grads = _layer(np.random.default_rng(3))
    state = opt.init(params)
    words = r"gradient of 'l/(bias|weight)' is a numpy array, its {} a jax\.numpy array"
    with pytest.raises(TypeError, match=words.format("parameter")):
        opt.update(grads, state, params)
    # Whether a step needs ``params`` is the method's, not the array library's: asked of a fresh
    # optimizer on NumPy parameters (a JAX step outside jax.jit compiles each of its operations).
    if not _needs_params(METHODS[name](), _layer()):
        with pytest.raises(TypeError, match=words.format("optimizer state")):
            opt.update(grads, state)


@method
def test_transposed_gradient_is_refused_by_leaf(name):
    """A gradient of the parameter's size but another shape (transposed) raises ValueError naming
    the leaf and both shapes, with and without ``params``: S-AdaGrad, whose state sketches the
    flattened leaf, used to return an update of the gradient's shape; MBF named the unpaired bias."""
    opt = METHODS[name]()
    params = _layer()
    state = opt.init(params)
    grads = {"l": {"weight": np.ones((4, 3)), "bias": np.ones(3)}}
    message = re.escape("gradient of 'l/weight' has shape (4, 3), parameter has shape (3, 4)")
    with pytest.raises(ValueError, match=message):
        opt.update(grads, state, params)
    if not _needs_params(opt, params):
        with pytest.raises(ValueError, match=message):
            opt.update(grads, state)


@pytest.mark.parametrize(
    "grads, culprit",
    [
        ({"l": {"weight": np.ones((4, 3)), "bias": np.ones(3)}, "v": np.ones(5)}, "'l/weight' (4, 3)/float64"),
        ({"l": {"weight": np.ones((3, 4))}, "v": np.ones(5)}, "'l/weight' (3, 4)/float64"),
        ({"l": {"weight": np.ones((3, 4)), "bias": np.ones(3)}, "v": np.ones(6)}, "'v' (6,)/float64"),
    ],
    ids=["transposed", "bias-missing", "vector-length"],
)
def test_mbf_warm_start_names_the_leaf(grads, culprit):
    """MBF's warm start refuses a batch whose blocks do not fit the state, naming the leaf, its
    shape and dtype and the state's (it named the bias a transposed weight unpaired, and accepted a
    weight without its bias or a vector of another length)."""
    opt = METHODS["mbf"]()
    state = opt.init({**_layer(), "v": np.ones(5)})
    with pytest.raises(ValueError, match=re.escape(f"mbf.warm_start: the gradient of {culprit} does not fit the optimizer state")):
        opt.warm_start(state, [grads])
