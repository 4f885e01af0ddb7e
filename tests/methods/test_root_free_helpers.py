"""IF-Shampoo's step helpers (``precond_ref.methods.root_free``) against the plain formulas their
docstrings state, on stacks of blocks (a leading block axis b), float64 NumPy.

Tolerances follow the rounding model of a length-k sum: ``|computed - exact| <= k * eps * Σ|terms|``
(the helpers may sum in another order than ``einsum``)."""

from __future__ import annotations

import math

import array_api_compat.numpy as xp
import numpy as np
import pytest

from precond_ref.methods import root_free as rf

EPS = np.finfo(np.float64).eps


def _close_sum(got, want, abs_terms, k):
    """|got - want| <= 2 k eps Σ|terms| element-wise (both sides rounded, k-term sums)."""
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 2 * k * EPS * abs_terms + 1e-300)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_times_transposed_is_the_mode_product_with_the_transpose(rng, axis):
    """``T ×_n Kᵀ``: Y[b, .., j, ..] = Σ_i T[b, .., i, ..] K[b, i, j]; diagonal: T · k along axis n."""
    t = rng.standard_normal((2, 3, 4, 5))
    d = t.shape[axis]
    dense = rng.standard_normal((2, d, d))
    letters = "xyz"
    idx = "".join(letters)
    out = idx.replace(letters[axis - 1], "j")
    spec = f"b{idx},b{letters[axis - 1]}j->b{out}"
    _close_sum(rf._times_transposed(xp, t, dense, axis), np.einsum(spec, t, dense),
               np.einsum(spec, np.abs(t), np.abs(dense)), d)
    diagonal = rng.standard_normal((2, d))
    shape = [2, 1, 1, 1]
    shape[axis] = d
    np.testing.assert_array_equal(rf._times_transposed(xp, t, diagonal, axis), t * diagonal.reshape(shape))


def test_gram_trace_identity_times_frobenius(rng):
    """KᵀK, Tr(A)/d, I, K m and ‖m‖_F per block, dense (b, d, d) and diagonal (b, d)."""
    k, m = rng.standard_normal((3, 4, 4)), rng.standard_normal((3, 4, 4))
    _close_sum(rf._gram(xp, k), np.einsum("bij,bik->bjk", k, k), np.einsum("bij,bik->bjk", abs(k), abs(k)), 4)
    _close_sum(rf._times(xp, k, m), np.einsum("bij,bjk->bik", k, m), np.einsum("bij,bjk->bik", abs(k), abs(m)), 4)
    a = rf._gram(xp, k)
    _close_sum(rf._mean_trace(xp, a), np.trace(a, axis1=1, axis2=2) / 4, np.trace(abs(a), axis1=1, axis2=2) / 4, 4)
    np.testing.assert_array_equal(rf._identity(xp, k), np.eye(4))
    _close_sum(rf._frobenius(xp, m), np.sqrt(np.sum(m * m, axis=(1, 2))), np.sqrt(np.sum(m * m, axis=(1, 2))), 16)
    kd, md = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    np.testing.assert_array_equal(rf._gram(xp, kd), kd * kd)
    np.testing.assert_array_equal(rf._times(xp, kd, md), kd * md)
    _close_sum(rf._mean_trace(xp, kd * kd), np.mean(kd * kd, axis=1), np.mean(kd * kd, axis=1), 4)
    assert rf._identity(xp, kd) == 1.0
    _close_sum(rf._frobenius(xp, md), np.sqrt(np.sum(md * md, axis=1)), np.sqrt(np.sum(md * md, axis=1)), 4)


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_unfolding_gram_is_the_gram_of_the_unfolding(rng, axis):
    """Y_(n)Y_(n)ᵀ: the mode-n unfolding (d_n × rest) times its transpose; diagonal: its diagonal."""
    y = rng.standard_normal((2, 3, 4, 5))
    moved = np.moveaxis(y, axis, 1).reshape(2, y.shape[axis], -1)
    want = np.einsum("bir,bjr->bij", moved, moved)
    bound = np.einsum("bir,bjr->bij", abs(moved), abs(moved))
    rest = moved.shape[-1]
    d = y.shape[axis]
    _close_sum(rf._unfolding_gram(xp, y, axis, np.eye(d)[None]), want, bound, rest)
    diag = rf._unfolding_gram(xp, y, axis, np.ones((2, d)))
    _close_sum(diag, np.diagonal(want, axis1=1, axis2=2), np.diagonal(bound, axis1=1, axis2=2), rest)


def test_product_except():
    """Π_{i≠n} values_i, the empty product 1."""
    values = [np.array([2.0, 3.0]), np.array([5.0, 7.0]), np.array([11.0, 13.0])]
    np.testing.assert_array_equal(rf._product_except(xp, values, 1, np.float64), [22.0, 39.0])
    assert rf._product_except(xp, values[:1], 0, np.float64) == 1.0


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


def test_principled_keep_unusable_per_block():
    """S2/S3 per block: a zero-gradient block keeps its old state, a non-finite new state is
    discarded and flagged as failed (the caller counts the flags), an ordinary block takes the new state."""
    grouped = np.stack([np.zeros((2, 2)), np.ones((2, 2)), np.ones((2, 2))])
    old = (np.zeros((3, 2, 2)),)
    new = (np.stack([np.ones((2, 2)), np.full((2, 2), np.inf), np.full((2, 2), 2.0)]),)
    *kept, failed = rf._principled_keep_unusable(xp, grouped, old, new)
    np.testing.assert_array_equal(kept[0], np.stack([old[0][0], old[0][1], np.full((2, 2), 2.0)]))
    np.testing.assert_array_equal(failed, [False, True, False])


@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 5), (2, 3, 2, 2)])
def test_each_block_reduces_every_entry_of_a_block(rng, shape):
    """``_each_block(xp, xp.all | xp.any, mask)`` is ``all``/``any`` over every axis but the first
    (boolean: exact), also for a mask that is a transposed (non-contiguous) view."""
    for mask in (rng.random(shape) < 0.9, np.moveaxis(rng.random(shape[:1] + shape[1:][::-1]) < 0.9, 1, -1)):
        mask[0] = True  # one block all true, so that ``all`` is true somewhere
        axes = tuple(range(1, mask.ndim))
        np.testing.assert_array_equal(rf._each_block(xp, xp.all, mask), np.all(mask, axis=axes))
        np.testing.assert_array_equal(rf._each_block(xp, xp.any, mask), np.any(mask, axis=axes))


def test_each_block_is_one_reduction_in_torch():
    """The reason for ``_each_block``: on torch, ``all`` over several axes through the array API
    is a transpose, a flatten, the reduction and a cast; over the (b, -1) view it is a view and
    one reduction, whatever the rank."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace
    from dispatched import Dispatched

    mask = torch.rand(4, 3, 5, 6, dtype=torch.float64) < 0.5
    txp = array_namespace(mask)
    for reduce in (txp.all, txp.any):
        with Dispatched() as seen:
            rf._each_block(txp, reduce, mask)
        assert len(seen.names) == 2 and seen.names[0] in ("view", "reshape", "_unsafe_view"), seen.names


def test_principled_keep_unusable_of_usable_blocks_is_the_new_state_itself(rng):
    """Where reading a device value is free (NumPy here), a stack whose every block has a non-zero
    gradient and a finite new state returns the new state itself (what ``where`` would select,
    without the copies) and no failures."""
    grouped = rng.normal(size=(3, 2, 2))
    old, new = (rng.normal(size=(3, 2, 2)),), (rng.normal(size=(3, 2, 2)),)
    *kept, failed = rf._principled_keep_unusable(xp, grouped, old, new)
    assert kept[0] is new[0]
    np.testing.assert_array_equal(failed, [False, False, False])


def test_if_shampoo_eager_cpu_step_selects_nothing():
    """torch eagerly on the CPU (reading is free): a step with finite gradients and usable factor
    steps makes no element-wise selection (no ``where``: S2/S3 keep the whole new stack) and adds
    nothing to ``factor_failures`` (no ``sum`` of the (b,) failure flags; the finiteness tests,
    :func:`precond_ref.linalg.all_finite`, sum (b, n) stacks), on refresh steps (every tile on the
    first, half of them later) and between. ``kl_clip=0``: S8's ν has a ``where`` and a ``sum``
    of its own."""
    torch = pytest.importorskip("torch")
    from dispatched import Dispatched

    import precond_ref as pr

    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(8, 6, generator=g, dtype=torch.float64),
              "v": torch.randn(5, generator=g, dtype=torch.float64)}
    opt = pr.if_shampoo(batch_size=2, block_size=4, kl_clip=0.0)
    state = opt.init(params)
    for _ in range(3):
        grads = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
        with Dispatched() as seen:
            _, state = opt.update(grads, state, params)
        flag_sums = [key for key in seen.calls if "sum" in key[0] and key[1] is not None and len(key[1]) == 1]
        assert "bmm" in seen.names and "where" not in seen.names and not flag_sums, seen.names
    assert int(state.groups["w"]["factor_failures"]) == 0


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_if_shampoo_steps_are_the_same_when_large_stacks_stand_alone(monkeypatch, namespace):
    """A stack that stands alone instead of being concatenated with its equals
    (blocking._batched_enough_on_cpu) changes no tile's arithmetic: three IF-Shampoo steps, with
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
