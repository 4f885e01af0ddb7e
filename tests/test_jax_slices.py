"""What a jitted JAX step joins (docs/engine.md, "Persistent stacks"): within one update the
leading-axis slices a step cuts are remembered, so that a join of consecutive ones is their array
(``_backend.remembered_slices``, ``joined``, ``selected_by_runs``) and a stack of rows is a gather
(``stacked``); IF-Shampoo's gradient tiles are one gather.
Every result equals the plain formula (``concat``, ``stack``, ``where``, ``_cut_each``) exactly:
these are rearrangements, no arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from precond_ref._backend import (  # noqa: E402
    joined, leading_rows, leading_slices, remembered_slices, selected_by_runs, stacked,
)


def _equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def test_a_join_of_remembered_slices_is_their_array():
    """Within ``remembered_slices``: a join of all consecutive slices of an array is that very
    array, of some of them its one slice, and a join mixing them with other arrays joins each
    run as one piece; always equal to ``concat``. Outside it nothing is remembered."""
    a = jnp.arange(12.0).reshape(6, 2)
    other = jnp.ones((1, 2))
    with remembered_slices(jnp):
        s = leading_slices(a, (1, 2, 3))
        assert joined(jnp, s) is a
        part = joined(jnp, s[1:])
        assert _equal(part, a[1:]) and part is not a
        mixed = joined(jnp, [other, s[0], s[1], other])
        assert _equal(mixed, jnp.concatenate([other, a[:3], other]))
        assert _equal(joined(jnp, [s[1], s[0]]), jnp.concatenate([s[1], s[0]]))  # out of order: a concat
    outside = leading_slices(a, (1, 2, 3))
    assert joined(jnp, outside) is not a and _equal(joined(jnp, outside), a)


def test_a_stack_of_remembered_rows_is_a_gather_of_them():
    """``stacked`` of rows (``leading_rows``) of one or more arrays, in any order, equals
    ``stack``; consecutive rows of one array are its slice."""
    a, b = jnp.arange(5.0), 10.0 + jnp.arange(3.0)
    with remembered_slices(jnp):
        ra, rb = leading_rows(jnp, a), leading_rows(jnp, b)
        assert stacked(jnp, ra) is a
        for rows in ([ra[3], ra[1], ra[1]], [rb[2], ra[0], rb[0], ra[4]], ra[1:4]):
            assert _equal(stacked(jnp, rows), jnp.stack(rows))


def test_selected_by_runs_selects_the_slices_of_one_array_at_once():
    """The non-finite rule's selection of news that are slices of one array, in any order and
    interleaved with other arrays, equals ``where(ok, new, old)`` pair by pair, and is one
    selection: under jit one ``select_n`` for the slices, one per other array."""
    whole = jnp.arange(10.0).reshape(5, 2)

    def select_all(ok, whole, olds, lone, lone_old):
        with remembered_slices(jnp):
            s = leading_slices(whole, (2, 1, 2))
            news = [s[2], lone, s[0], s[1]]
            return selected_by_runs(jnp, ok, news, [olds[2], lone_old, olds[0], olds[1]])

    olds = [-jnp.ones((2, 2)), -2 * jnp.ones((1, 2)), -3 * jnp.ones((2, 2))]
    lone, lone_old = jnp.ones(3), jnp.zeros(3)
    s = [whole[:2], whole[2:3], whole[3:]]
    for ok in (True, False):
        out = select_all(jnp.asarray(ok), whole, olds, lone, lone_old)
        want = [jnp.where(ok, new, old) for new, old in zip([s[2], lone, s[0], s[1]], [olds[2], lone_old, olds[0], olds[1]])]
        assert all(_equal(g, w) for g, w in zip(out, want))
    jaxpr = jax.make_jaxpr(select_all)(jnp.asarray(True), whole, olds, lone, lone_old)
    assert _count(jaxpr.jaxpr, "select_n") == 2


def _count(jaxpr, primitive: str) -> int:
    """The ``primitive``'s equations in ``jaxpr`` and the jaxprs it calls (``jnp.where`` is one)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == primitive
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                n += _count(getattr(inner, "jaxpr", inner), primitive)
    return n


def test_the_skip_test_of_many_small_leaves_of_one_shape():
    """``gradient_ok`` (every leaf finite with a squared norm below the margin) on JAX, of several
    small leaves of one shape: a leaf with a NaN or one whose own squared norm passes the limit
    fails it; leaves whose norms are each below it pass, however many."""
    from precond_ref.engine.skip import OVERFLOW_MARGIN, gradient_ok

    big = float(np.sqrt(np.finfo(np.float32).max * OVERFLOW_MARGIN))  # squared norm at the limit
    leaves = [jnp.full((8,), 1.0, dtype=jnp.float32) for _ in range(5)] + [jnp.ones((3, 3), dtype=jnp.float32)]
    assert bool(gradient_ok(jnp, leaves))
    near = [leaf * (0.3 * big / 8**0.5) if leaf.shape == (8,) else leaf for leaf in leaves]  # each below it
    assert bool(gradient_ok(jnp, near))
    for bad in (leaves[:2] + [leaves[2].at[3].set(jnp.nan)] + leaves[3:], leaves[:4] + [leaves[4].at[0].set(2 * big)] + leaves[5:]):
        assert not bool(gradient_ok(jnp, bad))
