"""The stacking helper against its plain formula: one call per member, no batching."""

import numpy as np
import pytest

from precond_ref.blocking import on_stacks


def _gram_and_trace(xp):
    def fn(a, b):
        return (xp.matmul(a, xp.matrix_transpose(a)) + b, xp.sum(b, axis=(-2, -1)))

    return fn


def test_on_stacks_equals_one_call_per_member():
    """on_stacks(fn, members)[i] == fn(*members[i]) for a block-wise fn (blocking.on_stacks docstring):
    members of two shapes and two dtypes, leading lengths 1-3, interleaved, so that a wrong split or
    a group that mixes shapes changes some member's result."""
    rng = np.random.default_rng(0)
    shapes = [(2, 3, 3), (1, 4, 4), (3, 3, 3), (1, 3, 3), (2, 4, 4)]
    members = []
    for n, (k, d, _) in enumerate(shapes):
        dtype = np.float32 if n == 3 else np.float64
        a = rng.standard_normal((k, d, d)).astype(dtype)
        members.append((a, rng.standard_normal((k, d, d)).astype(dtype)))
    calls = []

    def counted(a, b):
        calls.append(a.shape[0])
        return _gram_and_trace(np)(a, b)

    out = on_stacks(np, counted, members)
    assert sorted(calls) == [1, 3, 5]  # float64 3x3: 2+3 blocks; float32 3x3 alone; 4x4: 1+2
    for got, operands in zip(out, members):
        want = _gram_and_trace(np)(*operands)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)  # the same kernel per block: bitwise


def test_on_stacks_key_decides_the_groups():
    """A caller's key replaces the shape/dtype/device key: members it separates are never batched."""
    members = [(np.ones((1, 2)),), (np.ones((1, 2)),)]
    calls = []
    on_stacks(np, lambda a: (calls.append(a.shape[0]) or a,), members, key=lambda ops: id(ops))
    assert calls == [1, 1]
