"""The standard problems of precond_ref.testing: gradients, backends, dtypes, determinism."""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref.testing as prt
from precond_ref.tree import tree_flatten, tree_unflatten

PROBLEM_NAMES = prt.available_problems()


def _leaves(tree):
    return tree_flatten(tree)[0]


def test_registry_lists_every_problem():
    assert PROBLEM_NAMES == ["quadratic", "least_squares", "logistic", "online", "mlp", "cnn"]
    with pytest.raises(ValueError, match="unknown problem 'nope'; available problems: quadratic, least_squares"):
        prt.get_problem("nope")


@pytest.mark.parametrize("name", PROBLEM_NAMES)
@pytest.mark.parametrize("step", [0, 5])
def test_gradient_matches_finite_differences(name, step):
    """Central differences in float64 agree with the hand-derived gradient to 1e-6 relative."""
    problem = prt.get_problem(name)
    params = problem.init_params()
    leaves, treedef = tree_flatten(params)
    grads = _leaves(problem.grad(params, step))
    h = 1e-6
    for i, leaf in enumerate(leaves):
        numeric = np.zeros_like(leaf)
        for idx in np.ndindex(leaf.shape):
            plus = [x.copy() for x in leaves]
            minus = [x.copy() for x in leaves]
            plus[i][idx] += h
            minus[i][idx] -= h
            numeric[idx] = (
                float(problem.loss(tree_unflatten(treedef, plus), step))
                - float(problem.loss(tree_unflatten(treedef, minus), step))
            ) / (2 * h)
        scale = np.max(np.abs(grads[i])) + 1e-12
        assert np.max(np.abs(numeric - grads[i])) / scale < 1e-6, (name, treedef.paths[i])


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_gradient_matches_torch_autograd(name):
    """The array-API loss run on torch tensors is differentiable: autograd equals ``grad``."""
    torch = pytest.importorskip("torch")
    problem = prt.get_problem(name)
    params = problem.init_params("torch", "float64")
    leaves, treedef = tree_flatten(params)
    for leaf in leaves:
        leaf.requires_grad_(True)
    for step in (0, 7):
        loss = problem.loss(tree_unflatten(treedef, leaves), step)
        auto = torch.autograd.grad(loss, leaves)
        manual = _leaves(problem.grad(tree_unflatten(treedef, [x.detach() for x in leaves]), step))
        for a, m in zip(auto, manual):
            torch.testing.assert_close(a, m, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_every_backend_agrees_with_numpy(name, backend):
    problem = prt.get_problem(name)
    ref_loss, ref_grads = problem.value_and_grad(problem.init_params(), 2)
    params = problem.init_params(backend.xp, "float64")
    loss, grads = problem.value_and_grad(params, 2)
    assert loss.shape == ()
    np.testing.assert_allclose(backend.to_numpy(loss), ref_loss, rtol=1e-12)
    for g, r in zip(_leaves(grads), _leaves(ref_grads)):
        np.testing.assert_allclose(backend.to_numpy(g), r, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_float32_stays_float32(name, backend):
    problem = prt.get_problem(name)
    params = problem.init_params(backend.xp, "float32")
    loss, grads = problem.value_and_grad(params, 1)
    assert loss.dtype == backend.xp.float32
    assert all(g.dtype == backend.xp.float32 for g in _leaves(grads))
    ref = problem.loss(problem.init_params(), 1)
    np.testing.assert_allclose(float(backend.to_numpy(loss)), ref, rtol=1e-5)


def test_problems_are_deterministic_and_seeded():
    a, b, c = prt.get_problem("mlp"), prt.get_problem("mlp"), prt.get_problem("mlp", seed=1)
    for x, y in zip(_leaves(a.init_params()), _leaves(b.init_params())):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.data()["X"], b.data()["X"])
    assert not np.array_equal(a.data()["X"], c.data()["X"])


def test_quadratic_hessian_is_the_hessian():
    """The gradient is H(θ − θ*) and H has the documented spectrum (condition number)."""
    problem = prt.Quadratic(condition=50.0)
    hessian = problem.hessian()
    np.testing.assert_allclose(hessian, hessian.T, atol=0)
    eig = np.linalg.eigvalsh(hessian)
    np.testing.assert_allclose(eig[-1] / eig[0], 50.0, rtol=1e-10)
    params = problem.init_params()
    theta = np.concatenate([params["linear"]["weight"].reshape(-1), params["linear"]["bias"]])
    grads = problem.grad(params)
    flat = np.concatenate([grads["linear"]["weight"].reshape(-1), grads["linear"]["bias"]])
    np.testing.assert_allclose(flat, hessian @ (theta - problem.data()["minimizer"]), rtol=1e-12)


def test_online_loss_follows_the_stream():
    problem = prt.OnlineLogistic(horizon=4)
    params = {"w": np.linspace(-1.0, 1.0, 8)}
    data = problem.data()
    for t in (0, 1, 5):
        x, y = data["X"][t % 4], data["y"][t % 4]
        assert float(problem.loss(params, t)) == pytest.approx(np.log1p(np.exp(-y * x @ params["w"])), rel=1e-14)
    assert np.all(data["X"][:, -1] == 1.0)


def test_bad_params_name_the_problem():
    problem = prt.get_problem("mlp")
    params = problem.init_params()
    params["fc1"]["weight"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="mlp: 'fc1/weight' must have shape"):
        problem.loss(params)
    with pytest.raises(ValueError, match="must have the leaves"):
        problem.loss({"w": np.zeros(3)})
