"""Tensor-times-matrix products (``linalg.mode_product``, ``linalg.mode_gram``) against their
index definitions (written with ``np.einsum``), batched and unbatched, on every backend; and the
matmul precision policy (``linalg.half_precision_dtype``)."""

from __future__ import annotations

import numpy as np
import pytest

from precond_ref import linalg

# result[b, ..., j, ...] = sum_i M[b, j, i] T[b, ..., i, ...] for each tensor axis of a (b, 2, 3, 4) stack.
_PRODUCT = {1: "bji,bikl->bjkl", 2: "bji,bkil->bkjl", 3: "bji,bkli->bklj"}
# gram[b, i, j] = sum over the other axes of T[..., i, ...] T[..., j, ...]
_GRAM = {1: "bikl,bjkl->bij", 2: "bkil,bkjl->bij", 3: "bkli,bklj->bij"}


def _assert_same_products(got, want, bound, n):
    """|got - want| <= 2 γ_n (|A||B|) entry by entry, ``bound`` being |A||B|: two float64
    evaluations of the same sums of n products, in whatever order and with or without fused
    multiply-adds, each within γ_n = n u / (1 - n u) (u = 2^-53) of the exact one (Higham,
    Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.13). A tolerance relative to
    each entry would fail wherever a sum cancels and a CPU's BLAS orders it differently."""
    u = np.finfo(np.float64).eps / 2
    gamma = n * u / (1 - n * u)
    assert got.shape == want.shape
    excess = np.abs(got - want) - 2 * gamma * bound
    assert np.all(excess <= 0), f"largest excess over the bound: {excess.max():.3e}"


@pytest.mark.parametrize("axis", [1, 2, 3])
@pytest.mark.parametrize("transpose", [False, True])
def test_mode_product_is_the_index_definition(backend, axis, transpose):
    """[definition] (T ×_n M)[..., j, ...] = Σ_i M_ji T[..., i, ...] (Mᵀ with ``transpose``), one M
    per tensor of a stack; float64, so only summation-order rounding separates the two."""
    rng = np.random.default_rng(axis)
    t = rng.standard_normal((2, 2, 3, 4))
    m = rng.standard_normal((2, t.shape[axis], t.shape[axis]))
    mt = np.swapaxes(m, -1, -2) if transpose else m
    want = np.einsum(_PRODUCT[axis], mt, t)
    got = backend.to_numpy(linalg.mode_product(backend.asarray(t), backend.asarray(m), axis, transpose=transpose))
    assert got.shape == t.shape
    _assert_same_products(got, want, np.einsum(_PRODUCT[axis], np.abs(mt), np.abs(t)), t.shape[axis])


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_mode_gram_is_the_unfolding_gram(backend, axis):
    """[definition] T_(n) T_(n)ᵀ: the Gram matrix of the mode-n fibres, per tensor of a stack."""
    t = np.random.default_rng(10 + axis).standard_normal((2, 2, 3, 4))
    got = backend.to_numpy(linalg.mode_gram(backend.asarray(t), axis, batch=1))
    want = np.einsum(_GRAM[axis], t, t)
    assert got.shape == (2, t.shape[axis], t.shape[axis])
    _assert_same_products(got, want, np.einsum(_GRAM[axis], np.abs(t), np.abs(t)), t[0].size // t.shape[axis])


def test_matrix_cases_are_plain_products(backend):
    """[closed form] For a matrix G: G ×_0 M = MG, G ×_1 M = GMᵀ; the Grams are YYᵀ and YᵀY."""
    rng = np.random.default_rng(3)
    g, a, b = rng.standard_normal((3, 5)), rng.standard_normal((3, 3)), rng.standard_normal((5, 5))
    x, f, h = backend.asarray, backend.to_numpy, np.abs
    _assert_same_products(f(linalg.mode_product(x(g), x(a), 0)), a @ g, h(a) @ h(g), 3)
    _assert_same_products(f(linalg.mode_product(x(g), x(b), 1)), g @ b.T, h(g) @ h(b).T, 5)
    _assert_same_products(f(linalg.mode_product(x(g), x(b), 1, transpose=True)), g @ b, h(g) @ h(b), 5)
    _assert_same_products(f(linalg.mode_gram(x(g), 0)), g @ g.T, h(g) @ h(g).T, 5)
    _assert_same_products(f(linalg.mode_gram(x(g), 1)), g.T @ g, h(g).T @ h(g), 3)


def test_mode_axis_must_follow_the_batch_axes():
    t, m = np.zeros((2, 3, 4)), np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="batch axes"):
        linalg.mode_product(t, m, 0)
    with pytest.raises(ValueError, match="batch axes"):
        linalg.mode_gram(t, 3, batch=1)


def test_half_precision_dtype_only_on_accelerators(monkeypatch):
    """bf16 where the array lives on an accelerator and its namespace has bf16; None on a CPU and
    for namespaces without bf16 (NumPy). A JAX array traced under jit asks JAX's default backend."""
    import jax
    import jax.numpy as jnp
    import torch

    assert linalg.half_precision_dtype(np.ones(2)) is None
    assert linalg.half_precision_dtype(torch.ones(2)) is None
    assert linalg.half_precision_dtype(jnp.ones(2)) is None
    seen = []

    def traced(x):
        seen.append(linalg.half_precision_dtype(x))
        return x

    jax.jit(traced)(jnp.ones(2))
    assert seen == [None]  # this machine's default JAX backend is the CPU

    class Cuda:
        type = "cuda"

    monkeypatch.setattr(linalg, "array_device", lambda x: Cuda())
    assert linalg.half_precision_dtype(torch.ones(2)) == torch.bfloat16
    assert linalg.half_precision_dtype(np.ones(2)) is None  # NumPy has no bfloat16
