"""The engine's per-axis block layout (precond_ref/engine/axes.py): a leaf's axes cut into runs of
equal blocks with refresh phases, the runs of the phases due as members of stacks, the rows of an
unfolding cut into those runs and joined back,
stacks of bounded size, and the renaming of the entries
earlier versions wrote. Each test checks the plain statement of its docstring on small NumPy arrays
(float64; the same operations, so exact or a few ulps)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import array_api_compat.numpy as xp
import numpy as np

from precond_ref.blocking import stack
from precond_ref.engine import axes
from precond_ref.linalg import block_mode_products
from precond_ref.sketch import fd_apply, fd_init

rng = np.random.default_rng(0)


def test_spread_plan_splits_runs_and_keeps_layout_independent_of_first_phase():
    """A run of c equal blocks is cut into min(c, T) contiguous runs covering the same rows in
    order, with consecutive phases mod T; the shapes (the state's layout) do not depend on the
    leaf's first phase, only on T."""
    for phases in (1, 3, 10):
        plans = [axes.leaf_plan((5000, 300), 8, 1024, phases, first) for first in range(phases)]
        shapes = {tuple((r.start, r.length, r.count) for a in p.axes for r in a.runs) for p in plans}
        assert len(shapes) == 1
        axis0 = plans[0].axes[0].runs
        assert sum(r.count * r.length for r in axis0) == 5000
        assert [r.start for r in axis0] == sorted(r.start for r in axis0)
        assert len([r for r in axis0 if r.length == 1024]) == min(4, phases)
        units = [r for a in plans[2 % phases].axes for r in a.runs]
        assert [r.phase for r in units] == [(2 % phases + i) % phases for i in range(len(units))]


def test_runs_cut_an_unfolding_into_stacks_and_join_it_back():
    """run_rows: run j's rows [start, start + count*length) as a (count, length, n) stack;
    join_runs of all runs' stacks is the unfolding again (rows in order)."""
    plan = axes.leaf_plan((10, 3), 2, 4, 1)
    axis = plan.axes[0]
    assert [(r.start, r.length, r.count) for r in axis.runs] == [(0, 4, 2), (8, 2, 1)]
    flat = rng.standard_normal((10, 3))
    parts = [axes.run_rows(xp, axis, run, flat) for run in axis.runs]
    np.testing.assert_array_equal(parts[0][1], flat[4:8])
    np.testing.assert_array_equal(axes.join_runs(xp, axis, parts), flat)
    whole, columns = plan.axes[1], flat.T
    assert not whole.batched and axes.run_rows(xp, whole, whole.runs[0], columns) is columns


def test_runs_of_the_phases_not_decided_out():
    """_runs: the runs whose phase is not decided not due on the host (every run with ``kept``), leaf
    by leaf and axis by axis in order, each its block and its rows of its axis's unfolding (a
    leading axis of 1 on an unblocked axis)."""
    plan = axes.leaf_plan((10, 3), 2, 4, 3, 0)
    blocks = axes.empty_blocks(plan, lambda d, k, batch: (np.zeros(batch + (d, k)),))
    g = rng.standard_normal((10, 3))
    every = [(n, j, run.phase) for n, axis in enumerate(plan.axes) for j, run in enumerate(axis.runs)]
    assert sorted({p for _, _, p in every}) == [0, 1, 2]
    for decisions, kept in (([True, False, False], False), ([False, np.asarray(True), False], False),
                            ([False] * 3, False), ([False] * 3, True)):
        units, members = axes._runs(xp, [(g, plan, SimpleNamespace(sketches=blocks))], decisions, kept)
        assert units == [(0, n, j) for n, j, p in every if kept or decisions[p] is not False]
        for (_, n, j), member in zip(units, members):
            axis = plan.axes[n]
            rows = axes.run_rows(xp, axis, axis.runs[j], g if n == 0 else g.T)
            np.testing.assert_array_equal(member[-1], rows if axis.batched else rows[None])
            assert member[0].shape[0] == member[-1].shape[0]


def test_block_mode_products_apply_each_axis_blocks_in_turn():
    """linalg.block_mode_products over a plan's runs: G x_1 P_1 x_2 P_2 = P_1 G P_2^T for a matrix,
    with P_n = fd_apply of axis n's sketches (P_n symmetric), the first axis cut into two runs of
    blocks (block-diagonal P_1), the second one block."""
    plan = axes.leaf_plan((10, 3), 2, 4, 1)
    state = axes.empty_blocks(plan, lambda d, k, batch: fd_init(xp, d, k, dtype=np.float64, device=None, batch=batch))

    def random_sketch(s):
        d, k = s["basis"].shape[-2:]
        q = np.linalg.qr(rng.standard_normal(s["basis"].shape[:-2] + (d, d)))[0][..., :k]
        return dict(basis=q, basis_weights=rng.random(s["basis_weights"].shape) + 0.5,
                    complement_weight=rng.random(s["complement_weight"].shape) + 0.5)

    sketches = tuple(tuple(random_sketch(s) for s in axis) for axis in state)
    fields = lambda s: (s["basis"], s["basis_weights"], s["complement_weight"])  # noqa: E731
    apply = lambda u, w, c, rows: fd_apply(xp, dict(basis=u, basis_weights=w, complement_weight=c), rows)  # noqa: E731

    def dense(n):
        eye = np.eye(plan.merged_shape[n])
        return axes.join_runs(xp, plan.axes[n], [
            fd_apply(xp, sketches[n][j], axes.run_rows(xp, plan.axes[n], run, eye))
            for j, run in enumerate(plan.axes[n].runs)])

    g = rng.standard_normal((10, 3))
    (got,) = block_mode_products(xp, [g], [[[fields(s) for s in axis] for axis in sketches]], apply)
    np.testing.assert_allclose(got, dense(0) @ g @ dense(1).T, rtol=1e-12, atol=1e-14)


def test_chunks_hold_at_most_the_bound():
    """Members of one layout, in order, totalling at most the bound per chunk; a member over it
    alone; layouts in order of first appearance."""
    members = [(np.zeros((1, 10, 3)),), (np.zeros((2, 10, 3)),), (np.zeros((1, 40, 3)),), (np.zeros((1, 10, 3)),)]
    assert axes.bounded_chunks(np, members, limit=8 * 3 * 30) == [[0, 1], [3], [2]]


def test_chunks_packed_largest_first():
    """First-fit decreasing: each member, largest first, joins the first chunk it fits within the
    bound, so blocks of 3, 2, 1 and 2 units under a bound of 4 take two chunks ([3, 1], [2, 2]),
    where cutting them in order would take three; each chunk's members in order."""
    unit = 8 * 3 * 10
    members = [(np.zeros((n, 10, 3)),) for n in (3, 2, 1, 2)]
    assert axes.bounded_chunks(np, members, limit=4 * unit) == [[0, 2], [1, 3]]


def test_chunks_are_one_stack_each():
    """Each chunk is the members that ``blocking.stack`` makes one stack (one label, one layout):
    a member of another layout or label between two equal ones does not end their chunk, so a
    layout's blocks take one batched call while they fit the bound (the stacks a GPU step issues)."""
    members = [(np.zeros((1, 10, 3)),), (np.zeros((1, 40, 3)),), (np.zeros((1, 10, 3)),), (np.zeros((2, 10, 3)),)]
    labels = [0, 0, 0, 1]
    chunks = axes.bounded_chunks(np, members, 2**20, labels)
    assert chunks == [[0, 2], [1], [3]]
    for chunk in chunks:
        assert len(stack(np, [members[i] for i in chunk], labels=[labels[i] for i in chunk])) == 1


def test_legacy_names_map_each_old_entry_to_its_field():
    """``axis{n}_{name}`` -> ``sketches/{n}/0/{name}``, ``axis{n}_run{j}_{name}`` ->
    ``sketches/{n}/{j}/{name}``, other entries unchanged; a current state is the very dict."""
    legacy_names = axes.axis_legacy_names
    old = {"axis0_run1_basis": 1, "axis1_escaped_root": 2, "sketch_failures": 3, "momentum": 4,
           "axis0_run0_basis_weights": 5}
    assert legacy_names(old) == {"sketches/0/1/basis": 1, "sketches/1/0/escaped_root": 2,
                                 "sketch_failures": 3, "momentum": 4, "sketches/0/0/basis_weights": 5}
    current = {"sketches/0/0/basis": 1, "sketch_failures": 3}
    assert legacy_names(current) is current


def test_padded_lengths_within_the_growth_bound():
    """Runs of one label and rank that ``may_pad`` admits are padded to the longest among them while
    the padded rows stay within ``PAD_GROWTH`` (2) times the real ones, taken from the longest down:
    12 blocks of 10 and one of 7 all at 10 (130 rows for 127); one block of 100 with 10 of 8 not
    (1100 rows for 180), nor a run ``may_pad`` refuses, nor runs of another label or rank."""
    def member(count, length, rank=3):
        return (np.zeros((count, length, rank)), np.zeros((count, length, 1)))

    members = [member(12, 10), member(1, 7), member(1, 100), member(10, 8), member(2, 5), member(1, 9, rank=2), member(3, 6)]
    labels = [0, 0, 1, 1, 0, 0, 2]
    assert axes.padded_lengths(members, labels, lambda length, rank: length > 5) == [10, 10, 100, 8, 5, 9, 6]
    assert axes.padded_lengths(members, labels, lambda length, rank: False) == [10, 7, 100, 8, 5, 9, 6]


def test_a_skipped_step_counts_no_failure():
    """On a skipped step (the skip predicate ``ok`` False) a refresh that reports its blocks not
    finite adds nothing to the leaf's failure count, which is settled (the non-finite rule does not
    select it again): a skipped step keeps the state (specs README rule 5). On a step taken each
    failed block counts (here the 2 blocks of one run and the unstacked leaf's one)."""
    from typing import Any, NamedTuple

    from precond_ref._backend import IdentityDict
    from precond_ref.engine.context import StepContext

    class Block(NamedTuple):
        basis: Any

    def leaves():
        out = []
        for length in (8, 3):
            plan = axes.leaf_plan((length,), 2, 4, 1)
            blocks = axes.empty_blocks(plan, lambda d, k, batch: fd_init(xp, d, k, dtype=np.float64, device=None, batch=batch))
            state = SimpleNamespace(sketches=tuple(tuple(Block(b["basis"]) for b in axis) for axis in blocks),
                                    failures=np.zeros((), np.int32))
            out.append((np.ones(length), plan, state))
        return out

    def refresh(xp, c, block, rows, order, accept, first):
        return block, np.zeros(rows.shape[:1], dtype=bool), rows  # every block "not finite"

    rule = SimpleNamespace(Block=Block, refresh=refresh, keep=lambda xp, c, block, rows: rows)
    class Config(NamedTuple):  # a rule's configuration is a NamedTuple (the engine makes its operands per dtype)
        dues: tuple
        fd: dict

    c = Config(dues=(1,), fd={})
    for ok, expected in ((np.asarray(False), [0, 0]), (np.asarray(True), [2, 1])):
        ctx = StepContext(xp=xp, count=np.zeros((), np.int32), extra={}, ok=ok, settled=IdentityDict(), shared={})
        results = axes._stepped(xp, ctx, rule, c, leaves(), functools.partial(axes._chunks, xp, c))
        assert [int(failures) for _, failures, _ in results] == expected
        assert all(failures in ctx.settled for _, failures, _ in results)


def test_failure_counts_added_per_leaf_as_one_array_on_torch():
    """``_counted`` on torch: each leaf's count is its previous count plus its blocks' flags that are
    False (integer sums, exact), a leaf without blocks stays None and one without flags this step
    keeps its count; the new counts are 0-D views of one allocation, which the next step's join
    takes as it is (no copy)."""
    import array_api_compat.torch as tx
    import torch

    from precond_ref._backend import IdentityDict, joined
    from precond_ref.engine.context import StepContext

    ctx = StepContext(xp=tx, count=torch.zeros((), dtype=torch.int32), extra={}, ok=torch.tensor(True),
                      settled=IdentityDict(), shared={})
    failures = [torch.tensor(3, dtype=torch.int32), None, torch.tensor(0, dtype=torch.int32), torch.tensor(7, dtype=torch.int32),
                torch.tensor(1, dtype=torch.int32)]
    oks = [torch.tensor([False, False]), torch.tensor([True]), torch.tensor([False, False, True])]
    new = axes._counted(tx, ctx, failures, oks, [2, 0, 0, 1, 3])
    assert new[1] is None and [int(v) for v in new if v is not None] == [5, 0, 7, 3]
    assert all(v.ndim == 0 and v.dtype == torch.int32 and v in ctx.settled for v in new if v is not None)
    again = axes._counted(tx, ctx, new, [torch.tensor([False]), torch.tensor([False, False])], [1, 0, 0, 1, 1])
    assert [int(v) for v in again if v is not None] == [6, 0, 8, 4]
    counts = [torch.reshape(v, (1,)) for v in again if v is not None]
    assert joined(tx, counts).data_ptr() == counts[0].data_ptr()


def test_padded_join_is_padding_then_concatenation():
    """``padded_join`` equals ``concat([pad(a, length) for a in arrays])`` element for element,
    ``pad`` appending zero rows on axis 1: arrays of 3 and 4 rows padded to 5 around one of 5, and
    a non-contiguous slice (a step's block cut back to its rows) among them."""
    length = 5
    wide = rng.standard_normal((2, length, 3))
    arrays = [rng.standard_normal((2, 3, 3)), wide, wide[:, :4, :], rng.standard_normal((1, 4, 3))]

    def pad(a):
        return np.concatenate([a, np.zeros((a.shape[0], length - a.shape[1], a.shape[2]))], axis=1)

    expected = np.concatenate([pad(a) for a in arrays], axis=0)
    out = axes.padded_join(xp, arrays, length)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_counted_sums_each_leafs_failed_flags():
    """``_counted`` gives ``failures[o] + sum(not oks[i] for the blocks i of leaf o)`` for every leaf
    o with a count, the blocks leaf by leaf in order (as :func:`axes._runs` makes them): a leaf with
    no flag this step (its count kept), a leaf with several runs, and a step taken with its skip
    predicate read (``applied``, no predicate folded in)."""
    from precond_ref._backend import IdentityDict
    from precond_ref.engine.context import StepContext

    failures = [np.asarray(c, dtype=np.int32) for c in (3, 0, 7, 1)]
    owners = [0, 0, 0, 0, 2, 2, 3, 3]
    oks = [np.asarray([False, True]), np.asarray([False, True]), np.asarray([False]), np.asarray([True, False, True])]
    flags = [not ok for run in oks for ok in run]
    for ctx in (StepContext(xp=xp, count=np.zeros((), np.int32), extra={}),
                StepContext(xp=xp, count=np.zeros((), np.int32), extra={}, ok=np.asarray(True), settled=IdentityDict(),
                            shared={}, applied=True)):
        out = axes._counted(xp, ctx, failures, oks, [owners.count(o) for o in range(4)])
        expected = [int(failures[o]) + sum(f for f, owner in zip(flags, owners) if owner == o) for o in range(4)]
        assert [int(v) for v in out] == expected == [5, 0, 8, 2]
        assert all(v.shape == () and v.dtype == np.int32 for v in out)


def test_finite_blocks_is_both_tests_per_block(monkeypatch):
    """``sketch._finite_blocks`` is ``all(isfinite(v), -1)`` for each vector operand ``&
    all(isfinite(m), (-2, -1))`` per block, on torch (one comparison of the summed ``x * 0`` of the
    vectors joined) as on NumPy, and on the branch ``torch.compile`` takes (each vector tested
    where it is, not joined): blocks with a NaN or an Inf in a vector or the matrices, or in
    neither (and large finite entries, whose ``x * 0`` is still 0)."""
    import array_api_compat.torch as tx
    import torch

    from precond_ref import sketch

    vectors = rng.standard_normal((5, 4)) * 1e300
    matrices = rng.standard_normal((5, 3, 3))
    vectors[1, 2], matrices[2, 0, 1], vectors[3, 0], matrices[4, 2, 2] = np.nan, np.inf, -np.inf, np.nan
    expected = np.all(np.isfinite(vectors), axis=-1) & np.all(np.isfinite(matrices), axis=(-2, -1))
    assert expected.tolist() == [True, False, False, False, False]
    pieces = [vectors[:, :2], vectors[:, 2:3], vectors[:, 3:]]
    np.testing.assert_array_equal(sketch._finite_blocks(xp, pieces, matrices), expected)
    torch_pieces = [torch.from_numpy(v) for v in pieces]
    np.testing.assert_array_equal(sketch._finite_blocks(tx, torch_pieces, torch.from_numpy(matrices)).numpy(), expected)
    monkeypatch.setattr(sketch, "torch_compiling", lambda: True)
    np.testing.assert_array_equal(sketch._finite_blocks(tx, torch_pieces, torch.from_numpy(matrices)).numpy(), expected)


def test_vector_norms_are_each_arrays_norm():
    """``_backend.vector_norms`` is ``[vector_norm(a) for a in arrays]``; on torch's CPU (one
    ``_foreach_norm``) the very numbers, for contiguous and transposed arrays of two dtypes."""
    import array_api_compat.torch as tx
    import torch

    from precond_ref._backend import vector_norms

    arrays = [torch.randn(6, 5).T, torch.randn(7), torch.randn(3, 4, dtype=torch.float64)[:, :2]]
    for got, a in zip(vector_norms(tx, arrays), arrays):
        assert got.dtype == a.dtype and torch.equal(got, torch.linalg.vector_norm(a))
    numpy_arrays = [a.numpy() for a in arrays]
    assert [float(v) for v in vector_norms(xp, numpy_arrays)] == [float(xp.linalg.vector_norm(a)) for a in numpy_arrays]


def test_finish_gets_minus_learning_rate_in_the_learning_rates_form():
    """``_finished`` gives ``rule.finish`` :math:`-\\eta_t` (``StepContext.negated(..., weak=True)``):
    a Python number for a learning rate that is a number at this step (a Python float, a NumPy
    scalar, a schedule's NumPy scalar), so that S-AdaGrad's ``-η λ`` is a product of two numbers
    rounded once; for an array learning rate the 0-D array of the direction's dtype that the
    one-sided layout gets (``negated`` without ``weak``), made once per update for all leaves of
    that dtype, a schedule evaluated once."""
    from typing import Any, NamedTuple

    from precond_ref._backend import IdentityDict
    from precond_ref.engine.context import StepContext

    class Config(NamedTuple):
        learning_rate: Any
        has_momentum: bool = False
        has_weight_decay: bool = False

    seen = []
    rule = SimpleNamespace(finish=lambda xp_, c, minus_lr, u: (seen.append(minus_lr) or minus_lr * u,))
    directions = [np.ones((2, 3), np.float32), np.ones((4,), np.float32), np.ones((3,), np.float64)]
    calls = []

    def schedule(count):
        calls.append(count)
        return np.float64(0.5) ** (count + 1)

    for learning_rate, want in ((0.0137, -0.0137), (np.float32(0.25), -0.25), (schedule, -0.25)):
        seen.clear()
        ctx = StepContext(xp=xp, count=np.asarray(1, np.int32), extra={}, settled=IdentityDict(), shared={})
        axes._finished(xp, ctx, rule, Config(learning_rate), directions, [None] * 3, None)
        assert all(type(v) is float and v == want for v in seen), seen
    assert len(calls) == 1
    for learning_rate in (np.asarray(0.0137, np.float64), lambda count: np.asarray(0.0137, np.float64)):
        seen.clear()
        ctx = StepContext(xp=xp, count=np.asarray(1, np.int32), extra={}, settled=IdentityDict(), shared={})
        axes._finished(xp, ctx, rule, Config(learning_rate), directions, [None] * 3, None)
        made = {str(v.dtype): v for v in seen}  # one array per dtype, whether the leaves of a dtype were joined or not
        assert set(made) == {"float32", "float64"} and all(any(v is w for w in made.values()) for v in seen)
        assert all(v.shape == () for v in seen)
        assert made["float32"] is ctx.negated("learning_rate", learning_rate, np.dtype(np.float32), "cpu")
        assert made["float64"] == -np.float64(0.0137) and made["float32"] == -np.float32(0.0137)
