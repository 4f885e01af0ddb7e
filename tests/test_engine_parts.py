"""The layout and the runner's helpers of ``precond_ref.engine.parts`` (MBF's mini-blocks and parts)
against their plain formulas (spec README sections 5-6).

Tolerances come from the rounding model: a sum of ``k`` products is within ``k * eps * sum|terms|``
of the exact value, and so is a loop that sums the same terms in another order.
"""

from __future__ import annotations

import numpy as np
import pytest

from precond_ref.engine import parts as P
from precond_ref.linalg import damped_inverse_stable

EPS = np.finfo(np.float64).eps


def test_refresh_parts_equals_one_group_at_a_time():
    """refresh_parts stacks the equal-size blocks of all groups (blocking.on_stacks); its result
    for a group must be the one it gives that group alone (bitwise: the same batched call per block),
    and a part counts the failed blocks of ITS own (an element-wise part: its non-finite entries) into
    the count of the group that owns it."""
    rng = np.random.default_rng(5)

    def psd(*shape):
        a = rng.standard_normal(shape + (shape[-1],))
        return a @ a.mT

    def invert(kind, f, before):
        if kind == P.ELEMENTWISE:
            return np.where(np.isfinite(f), 1.0 / (f + 0.1), before), np.logical_not(np.isfinite(f))
        return damped_inverse_stable(f, 0.1, before)

    kinds = [P.FC, P.CONV, P.ELEMENTWISE, P.FC, P.CONV]
    stats = [psd(4), psd(3, 2, 4), np.abs(rng.standard_normal((4, 3))), psd(4), psd(2, 2, 4)]
    stats[3][0, 0] = np.nan  # the second FC group fails, the first must not
    stats[4][1, 0, 2, 3] = np.inf  # one of the four blocks of the second conv group
    stats[2][0, 1] = stats[2][2, 2] = np.nan  # two entries of the element-wise group
    previous = [np.full(s.shape, 2.0) for s in stats]
    zero = np.zeros((), dtype=np.int32)
    inverses, counts = P.refresh_parts(np, kinds, range(5), stats, previous, [zero] * 5, invert)
    for i in range(len(kinds)):
        alone, count = P.refresh_parts(np, kinds[i : i + 1], [0], stats[i : i + 1], previous[i : i + 1], [zero], invert)
        np.testing.assert_array_equal(inverses[i], alone[0])
        assert inverses[i].shape == stats[i].shape
        assert int(counts[i]) == int(count[0]) == {2: 2, 3: 1, 4: 1}.get(i, 0)
    np.testing.assert_array_equal(inverses[3], previous[3])  # a non-finite block keeps its previous inverse
    # two groups, parts 0-2 of the first (no failure among them but the element-wise part's two) and
    # 3-4 of the second (1 + 1), each count added to the group's own, which starts at 5
    _, grouped = P.refresh_parts(np, kinds, [0, 0, 0, 1, 1], stats, previous, [zero + 5] * 2, invert)
    assert [int(n) for n in grouped] == [7, 7]




def test_join_rows_of_one_row_stack_is_a_view():
    """join_rows inverts parts; a layer cut into full blocks only (no tail) is one stack, joined
    back by a reshape (a view of the preconditioned stack, not a copy: the per-step stitch of the
    momentum's blocks costs no pass over the layer); an unblocked group is its own one part."""
    h = np.arange(12.0 * 5).reshape(12, 5)
    pieces = P.parts(np, h, P.FC, 4)
    assert list(pieces) == [""] and pieces[""].shape == (3, 4, 5)
    joined = P.join_rows(np, list(pieces.values()), h.shape)
    np.testing.assert_array_equal(joined, h)
    assert np.shares_memory(joined, pieces[""])
    h14 = np.arange(14.0 * 5).reshape(14, 5)  # three blocks and a tail of 2: a concatenation
    tailed = P.parts(np, h14, P.FC, 4)
    assert list(tailed) == ["", "_tail"] and tailed[""].shape == (3, 4, 5) and tailed["_tail"].shape == (2, 5)
    np.testing.assert_array_equal(P.join_rows(np, list(tailed.values()), h14.shape), h14)
    assert P.parts(np, h14, P.CONV, 4)[""] is h14 and P.parts(np, h14, P.FC, None)[""] is h14


@pytest.mark.parametrize("namespace", ["numpy", "array_api_strict"])
def test_finite_or_previous_is_the_selection(namespace):
    """finite_or_previous selects block-wise, where(all(isfinite(block)), new, previous), and adds
    the number of blocks kept, exactly, whether the decision is read on the host (NumPy) or stays an
    array (array_api_strict, never read by host_bool): a finite new is kept; one non-finite entry
    keeps its block's previous value and counts one; with block_ndim=0 each entry is a block."""
    xp = np if namespace == "numpy" else pytest.importorskip(namespace)
    previous = xp.asarray([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, -4.0]]])
    failures = xp.asarray(2, dtype=xp.int32)
    finite = xp.asarray([[[5.0, 6.0], [7.0, 8.0]], [[9.0, 10.0], [11.0, 12.0]]])
    got, count = P.finite_or_previous(xp, finite, previous, failures)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(finite))
    assert int(count) == 2
    one = xp.asarray([[[5.0, float("inf")], [7.0, 8.0]], [[9.0, 10.0], [11.0, 12.0]]])
    got, count = P.finite_or_previous(xp, one, previous, failures)
    np.testing.assert_array_equal(np.asarray(got), [[[1.0, 2.0], [3.0, 4.0]], [[9.0, 10.0], [11.0, 12.0]]])
    assert int(count) == 3
    both = xp.asarray([[[5.0, float("inf")], [7.0, 8.0]], [[9.0, 10.0], [float("nan"), 12.0]]])
    got, count = P.finite_or_previous(xp, both, previous, failures)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(previous))
    assert int(count) == 4
    got, count = P.finite_or_previous(xp, both, previous, failures, 0)
    np.testing.assert_array_equal(np.asarray(got), [[[5.0, 2.0], [7.0, 8.0]], [[9.0, 10.0], [-3.0, 12.0]]])
    assert int(count) == 4


def test_out_first_permutes_only_out_last_kernels():
    """out_first: a group's Flax ``kernel`` (s..., I, O) becomes out-first (O, I, s...), every other
    leaf is returned itself (no copy on the step's path), and ``back=True`` inverts it."""
    rng = np.random.default_rng(9)
    bias, weight = rng.standard_normal(3), rng.standard_normal((3, 2))
    same = P.out_first(np, [("fc", "bias"), ("fc", "weight")], [bias, weight])
    assert same[0] is bias and same[1] is weight
    conv, dense = rng.standard_normal((5, 4, 2, 3)), rng.standard_normal((2, 3))
    paths = [("conv", "kernel"), ("dense", "kernel")]
    canonical = P.out_first(np, paths, [conv, dense])
    np.testing.assert_array_equal(canonical[0], np.transpose(conv, (3, 2, 0, 1)))
    np.testing.assert_array_equal(canonical[1], dense.T)
    back = P.out_first(np, paths, canonical, back=True)
    np.testing.assert_array_equal(back[0], conv)
    np.testing.assert_array_equal(back[1], dense)
