"""The stacked factors of dense or diagonal structure (:mod:`precond_ref.linalg`'s products,
:func:`precond_ref.engine.factors.identity`)
against the plain formulas their docstrings state, on stacks of blocks (a leading block axis b),
float64 NumPy.

Tolerances follow the rounding model of a length-k sum: ``|computed - exact| <= k * eps * Σ|terms|``
(the helpers may sum in another order than ``einsum``)."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from precond_ref import linalg as kl
from precond_ref.engine import factors as kf

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
    _close_sum(kl.times_transposed(xp, t, dense, axis), np.einsum(spec, t, dense),
               np.einsum(spec, np.abs(t), np.abs(dense)), d)
    diagonal = rng.standard_normal((2, d))
    shape = [2, 1, 1, 1]
    shape[axis] = d
    np.testing.assert_array_equal(kl.times_transposed(xp, t, diagonal, axis), t * diagonal.reshape(shape))


def test_gram_trace_identity_times_frobenius(rng):
    """KᵀK, Tr(A)/d, sI, K m and ‖m‖_F per block, dense (b, d, d) and diagonal (b, d)."""
    k, m = rng.standard_normal((3, 4, 4)), rng.standard_normal((3, 4, 4))
    _close_sum(kl.gram(xp, k), np.einsum("bij,bik->bjk", k, k), np.einsum("bij,bik->bjk", abs(k), abs(k)), 4)
    _close_sum(kl.times(xp, k, m), np.einsum("bij,bjk->bik", k, m), np.einsum("bij,bjk->bik", abs(k), abs(m)), 4)
    a = kl.gram(xp, k)
    _close_sum(kl.mean_trace(xp, a), np.trace(a, axis1=1, axis2=2) / 4, np.trace(abs(a), axis1=1, axis2=2) / 4, 4)
    np.testing.assert_array_equal(kf.identity(xp, k), np.eye(4))
    np.testing.assert_array_equal(kf.identity(xp, k, 0.5), 0.5 * np.eye(4))
    with kf.keeping_constants({}):  # made once per size, scale, dtype and device by a transform
        assert kf.identity(xp, k, 0.5) is kf.identity(xp, m, 0.5)
    _close_sum(kl.frobenius(xp, m), np.sqrt(np.sum(m * m, axis=(1, 2))), np.sqrt(np.sum(m * m, axis=(1, 2))), 16)
    kd, md = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    np.testing.assert_array_equal(kl.gram(xp, kd), kd * kd)
    np.testing.assert_array_equal(kl.times(xp, kd, md), kd * md)
    _close_sum(kl.mean_trace(xp, kd * kd), np.mean(kd * kd, axis=1), np.mean(kd * kd, axis=1), 4)
    assert kf.identity(xp, kd) == 1.0 and kf.identity(xp, kd, 0.5) == 0.5
    _close_sum(kl.frobenius(xp, md), np.sqrt(np.sum(md * md, axis=1)), np.sqrt(np.sum(md * md, axis=1)), 4)


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_unfolding_gram_is_the_gram_of_the_unfolding(rng, axis):
    """Y_(n)Y_(n)ᵀ: the mode-n unfolding (d_n × rest) times its transpose; diagonal: its diagonal."""
    y = rng.standard_normal((2, 3, 4, 5))
    moved = np.moveaxis(y, axis, 1).reshape(2, y.shape[axis], -1)
    want = np.einsum("bir,bjr->bij", moved, moved)
    bound = np.einsum("bir,bjr->bij", abs(moved), abs(moved))
    rest = moved.shape[-1]
    d = y.shape[axis]
    _close_sum(kl.unfolding_gram(xp, y, axis, np.eye(d)[None]), want, bound, rest)
    diag = kl.unfolding_gram(xp, y, axis, np.ones((2, d)))
    _close_sum(diag, np.diagonal(want, axis1=1, axis2=2), np.diagonal(bound, axis1=1, axis2=2), rest)


def test_product_except():
    """Π_{i≠n} values_i, the empty product 1."""
    values = [np.array([2.0, 3.0]), np.array([5.0, 7.0]), np.array([11.0, 13.0])]
    np.testing.assert_array_equal(kl.product_except(xp, values, 1, np.float64), [22.0, 39.0])
    assert kl.product_except(xp, values[:1], 0, np.float64) == 1.0
