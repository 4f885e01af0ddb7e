"""The stacking helper against its plain formula: one call per member, no batching."""

import numpy as np
import pytest

from precond_ref.blocking import on_stacks, stack, unstack


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



def test_on_stacks_hands_torch_members_their_own_views():
    """On torch a stack is cut back by one ``split`` (``_backend.leading_slices``): members of
    leading lengths 2, 3 and 1 stacked together each get fn of their own operands, as views of the
    stack's result (a wrong cut of unequal lengths changes some member's result or shape)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    rng = np.random.default_rng(1)
    members = [tuple(torch.as_tensor(rng.standard_normal((k, 3, 3))) for _ in range(2)) for k in (2, 3, 1)]
    fn = _gram_and_trace(xt)
    out = on_stacks(xt, fn, members)
    for got, operands in zip(out, members):
        for g, w in zip(got, fn(*operands)):
            assert g.shape == w.shape and g._base is not None  # a view of the stack's result
            np.testing.assert_array_equal(g.numpy(), w.numpy())  # the same kernel per block: bitwise

def test_on_stacks_key_decides_the_groups():
    """A caller's key replaces the shape/dtype/device key: members it separates are never batched."""
    members = [(np.ones((1, 2)),), (np.ones((1, 2)),)]
    calls = []
    on_stacks(np, lambda a: (calls.append(a.shape[0]) or a,), members, key=lambda ops: id(ops))
    assert calls == [1, 1]


def test_stack_then_unstack_hands_each_member_its_own_operands():
    """``unstack(stack(members), [s.operands ...])[i] == members[i]`` (blocking.stack/unstack
    docstrings: concatenation along the leading axis in member order, slices handed back in that
    order): members of two layouts interleaved, leading lengths 1-3; a lone member gets its own
    arrays back (no copy), and a member left out of the stacks given to unstack gets None."""
    rng = np.random.default_rng(1)
    members = [(rng.standard_normal((k, 2)), rng.standard_normal((k,))) for k in (2, 1, 3)]
    members.insert(1, (rng.standard_normal((2, 5)), rng.standard_normal((2,))))
    stacks = stack(np, members)
    assert [s.indices for s in stacks] == [(0, 2, 3), (1,)]
    assert stacks[0].lengths == (2, 1, 3) and stacks[0].operands[0].shape == (6, 2)
    assert stacks[1].operands[0] is members[1][0]
    back = unstack(stacks, [s.operands for s in stacks], len(members))
    for got, operands in zip(back, members):
        for g, w in zip(got, operands):
            np.testing.assert_array_equal(g, w)
    assert back[1][0] is members[1][0]
    assert unstack(stacks[:1], [stacks[0].operands], len(members))[1] is None


def test_stack_labels_separate_members_of_one_layout():
    """Members of equal layout stack together unless their labels differ (blocking.stack: what the
    operands are, e.g. the names of state entries, is part of the grouping)."""
    members = [(np.ones((1, 2)),), (np.ones((2, 2)),), (np.ones((1, 2)),)]
    assert [s.indices for s in stack(np, members)] == [(0, 1, 2)]
    assert [s.indices for s in stack(np, members, labels=["m", "v", "m"])] == [(0, 2), (1,)]


def test_stack_groups_arrays_on_an_unhashable_device_by_device():
    """Arrays on one device whose device object is unhashable (CuPy 14's) stack together; arrays on
    another such device stack apart (the default key's device part is ``_backend.device_key``)."""
    from types import SimpleNamespace

    from test_backend import ArrayOn

    def concat(arrays, axis):
        return ArrayOn(np.concatenate([a.array for a in arrays], axis=axis), arrays[0].device.id)

    members = [(ArrayOn(np.ones((1, 2)), 0),), (ArrayOn(np.ones((1, 2)), 1),), (ArrayOn(np.ones((2, 2)), 0),)]
    stacks = stack(SimpleNamespace(__name__="stand_in", concat=concat), members)  # a namespace has a name
    assert [s.indices for s in stacks] == [(0, 2), (1,)]
    assert stacks[0].operands[0].shape == (3, 2) and stacks[0].operands[0].device.id == 0


def test_stack_keeps_a_member_whose_key_is_none_alone():
    """A key of ``None`` keeps its member alone (blocking.stack docstring), whatever the labels;
    the other members group by their keys."""
    members = [(np.ones((k, 2)),) for k in (1, 2, 3, 4)]
    stacks = stack(np, members, key=lambda ops: None if ops[0].shape[0] % 2 else "even", labels=[None] * 4)
    assert [s.indices for s in stacks] == [(0,), (1, 3), (2,)]


@pytest.mark.parametrize("interval", [2, 5, 10])
def test_spread_schedule_gives_every_step_one_phase(interval):
    """Invariant (``PhaseDue``'s formula, ``count == 0 or count % T == phase``): on the first update
    every phase is due (no block starts from an empty factor); afterwards exactly the phase
    ``count mod T`` is due, so every block refreshes once in any T consecutive steps, on a host
    int (a bool) and on a 0-D integer array (a 0-D bool array: no host read) alike."""
    from precond_ref.blocking import PhaseDue, spread_schedule

    schedule = spread_schedule(interval, True)
    assert schedule == tuple(PhaseDue(interval, j) for j in range(interval))
    due = lambda count: {j for j, p in enumerate(schedule) if bool(p(count))}  # noqa: E731
    assert due(0) == set(range(interval))
    for count in range(1, 3 * interval + 1):
        assert due(count) == {count % interval}
        value = schedule[count % interval](np.asarray(count, dtype=np.int32))
        assert value.shape == () and bool(value)
    assert spread_schedule(interval, False) == (interval,)
    assert spread_schedule(1, True) == (1,)
    every_third = lambda count: count % 3 == 0  # noqa: E731
    assert spread_schedule(every_third, True) == (every_third,)


def test_stable_hash_is_the_polynomial_hash():
    """``stable_hash`` is ``Σ ord(c_i) 31^(n-1-i) mod 1000003`` (its docstring), written out here
    with Python's big integers; it depends on the text alone (not on Python's salted ``hash``)."""
    from precond_ref.blocking import stable_hash

    for text in ("", "w", "blocks.0.mlp.weight", "head/kernel" * 20):
        n = len(text)
        assert stable_hash(text) == sum(ord(c) * 31 ** (n - 1 - i) for i, c in enumerate(text)) % 1_000_003


def test_a_member_already_a_large_batch_on_the_cpu_stacks_alone(monkeypatch):
    """blocking.stack: on a CPU, a member whose first operand has at least
    CPU_BATCHED_ENOUGH entries forms a stack of its own, its operands uncopied; smaller members of
    its layout still concatenate; on_stacks gives each member fn of its own operands either way."""
    from precond_ref import blocking

    monkeypatch.setattr(blocking, "CPU_BATCHED_ENOUGH", 12)
    rng = np.random.default_rng(2)
    members = [(rng.standard_normal((k, 2, 3)), rng.standard_normal((k, 2, 2))) for k in (1, 2, 1, 3)]
    stacks = stack(np, members)
    assert [s.indices for s in stacks] == [(0, 2), (1,), (3,)]  # 2 x 2 x 3 = 12 entries: alone
    assert stacks[1].operands[0] is members[1][0] and stacks[2].operands[1] is members[3][1]
    fn = _gram_and_trace(np)
    for got, operands in zip(on_stacks(np, fn, members), members):
        for g, w in zip(got, fn(*operands)):
            np.testing.assert_array_equal(g, w)
    monkeypatch.setattr(blocking, "CPU_BATCHED_ENOUGH", 10**9)
    assert [s.indices for s in stack(np, members)] == [(0, 1, 2, 3)]
