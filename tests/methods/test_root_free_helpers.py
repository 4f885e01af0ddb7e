"""IF-Shampoo's rule functions (``precond_ref.methods.root_free``) on stacks of blocks (a leading
block axis b): the factor step acts block by block and states its formula, and the step's joined
and stacked execution changes no block's arithmetic. Float64 NumPy and torch."""

from __future__ import annotations

import math

import array_api_compat.numpy as xp
import numpy as np
import pytest

from precond_ref.methods import root_free as rf

EPS = np.finfo(np.float64).eps


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_factor_step_on_a_stack_is_the_step_of_each_block(rng):
    """The factor step acts block by block: on a stack of 3 groups it equals 3 separate calls,
    with one β₂ per block (the condition blocking.on_stacks puts on the function it batches)."""
    g = rng.standard_normal((3, 4, 2))
    factors = (np.eye(4)[None] + 0.1 * rng.standard_normal((3, 4, 4)), 1 + 0.1 * rng.standard_normal((3, 2)))
    momenta = tuple(0.1 * rng.standard_normal(f.shape) for f in factors)
    lr = np.array([0.1, 0.2, 0.3])
    args = (2.0, 1e-2)
    stacked = rf._factor_step(xp, g, factors, momenta, *args, lr, 0.5, True)
    for b in range(3):
        one = rf._factor_step(xp, g[b:b + 1], tuple(f[b:b + 1] for f in factors), tuple(m[b:b + 1] for m in momenta),
                              *args, lr[b:b + 1], 0.5, True)
        for s, o in zip(stacked[0] + stacked[1], one[0] + one[1]):
            np.testing.assert_allclose(s[b:b + 1], o, rtol=64 * EPS, atol=64 * EPS)


def test_factor_step_first_refresh_is_the_spec_formula(rng):
    """From identity factors (t_i = 1, K_nᵀK_n = I), one dense step of a matrix G with α₂ = 0:
    M_1 = ½[λ I + B G Gᵀ / d_2 − I], K_1 = I − β₂/max(1, ‖M_1‖_F) M_1 (spec §2.3)."""
    g = rng.standard_normal((1, 3, 4))
    batch, damping, lr = 4.0, 0.1, 0.3
    k, _ = rf._factor_step(xp, g, (np.eye(3)[None], np.eye(4)[None]), None, math.sqrt(batch), damping, lr, 0.0, True)
    m1 = 0.5 * (damping * np.eye(3) + batch * g[0] @ g[0].T / 4 - np.eye(3))
    want = np.eye(3) - lr / max(1.0, np.linalg.norm(m1)) * m1
    np.testing.assert_allclose(k[0][0], want, rtol=0, atol=64 * EPS * (1 + batch * np.abs(g[0]).max() ** 2 * 4))


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_if_shampoo_steps_are_the_same_when_large_stacks_stand_alone(monkeypatch, namespace):
    """A stack that stands alone instead of being concatenated with its equals
    (blocking.CPU_BATCHED_ENOUGH) changes no tile's arithmetic: three IF-Shampoo steps, with
    refreshes spread over two phases and two equal weights (so that both the refresh and the
    preconditioning batch stacks), give bitwise the same updates and state either way."""
    from precond_ref import blocking
    from precond_ref.tree import tree_flatten

    import precond_ref as pr

    ns = pytest.importorskip(namespace)
    rng = np.random.default_rng(5)
    arrays = [{k: rng.standard_normal(s) for k, s in (("a", (16, 12)), ("b", (16, 12)), ("c", (16,)))} for _ in range(4)]
    as_ns = ns.asarray if namespace == "numpy" else ns.tensor

    def run(threshold):
        monkeypatch.setattr(blocking, "CPU_BATCHED_ENOUGH", threshold)
        opt = pr.if_shampoo(batch_size=2, block_size=4, precondition_every=2)
        params = {k: as_ns(v) for k, v in arrays[0].items()}
        state, out = opt.init(params), []
        for grads in arrays[1:]:
            updates, state = opt.update({k: as_ns(v) for k, v in grads.items()}, state, params)
            out += [np.asarray(x) for x in tree_flatten(updates)[0]]
        return out + [np.asarray(x) for x in tree_flatten(state.groups)[0]]

    alone, together = run(40), run(10**9)  # a phase's stack of a weight: 6 tiles of 16 entries
    assert len(alone) == len(together)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
