"""What the shared step machinery costs per leaf in an eager torch step.

An eager step's time on a CPU is dominated by the number of operations it dispatches (tens of
microseconds each), not by their arithmetic. These tests count the operations torch's dispatcher
sees (``TorchDispatchMode``: one per call into the dispatcher from Python, composite operations as
the primitives they decompose into) and pin how many of them the machinery around a method adds
for each further leaf: the non-finite policy, the packing of element-wise methods, the stacking of
equal blocks. The numbers these forms compute are pinned elsewhere (tests/test_sync_free.py runs
every method with a skipped step on plain NumPy, where the skip predicate is read, and on a namespace
that forbids reading it, and requires equal results; tests/test_nonfinite.py the skip rule).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from dispatched import Dispatched  # noqa: E402

from array_api_compat import array_namespace  # noqa: E402

from precond_ref._backend import finite_or_zero, host_bool, select, sums_of_squares  # noqa: E402
from precond_ref.blocking import on_stacks  # noqa: E402
from precond_ref.transform import build_transform  # noqa: E402


def _dispatched(fn) -> list[str]:
    with Dispatched() as counter:
        fn()
    return counter.names


def _momentum(**options):
    """A method of exactly two operations per leaf: ``m <- m + g`` (state), ``u = -0.1 m``."""

    def init_group(leaves, paths, xp):
        return {"m": xp.zeros_like(leaves[0])}

    def update_group(grads, state, params, ctx):
        m = state["m"] + grads[0]
        return (m * -0.1,), {"m": m}

    return build_transform(name="momentum", init_group=init_group, update_group=update_group, **options)


def _leaves(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(shape, generator=generator, dtype=torch.float32) for i, shape in enumerate(shapes)}


def _ops_of_a_step(transform, shapes, *, bad=False):
    params = _leaves(shapes)
    grads = _leaves(shapes, seed=1)
    if bad:
        grads["w0"].view(-1)[0] = float("nan")
    state = transform.init(params)
    _, state = transform.update(_leaves(shapes, seed=2), state, params, step=0)  # warm: layouts recorded
    return _dispatched(lambda: transform.update(grads, state, params, step=1))


@pytest.mark.parametrize("elementwise", [False, True])
def test_a_finite_eager_step_adds_one_operation_per_leaf(elementwise):
    """A finite eager torch step on the CPU costs the method's own operations per leaf and nothing
    more. The skip predicate is read on the host there (no synchronisation on a CPU), so a finite
    step makes none of the skip's selections (gradients, updates, state entries: they would select
    their first operand); the decision is one ``_foreach_powsum`` for all leaves of a dtype, and
    the updates' guard against NaN/Inf one ``_foreach_norm(inf)`` read on the host (the
    per-leaf guard, ``finite_or_zero``, runs only when an update is not finite). Leaves of distinct
    shapes, so that nothing stacks; 2-D, so that packed ones are reshaped. Leaves packed by an
    element-wise method cost only their reshapes into and out of the flat leaf (gradient,
    parameter and state entry in; update and entry out): the method runs once on the flat leaf.
    Before these rules: ten operations per leaf besides the method's."""
    transform = _momentum(elementwise=elementwise)
    few = [(3, k) for k in range(2, 6)]
    many = few + [(5, k) for k in range(2, 6)]
    added = len(many) - len(few)
    extra = len(_ops_of_a_step(transform, many)) - len(_ops_of_a_step(transform, few))
    per_leaf = 5 if elementwise else 2  # reshapes / the method's own two
    assert extra == per_leaf * added


def test_a_skipped_eager_step_still_selects_element_wise():
    """A skipped step (a NaN gradient) takes the element-wise rule: the gradients are zeroed, the
    updates are zero, the state is the old one, and the skipped steps' counter advances. The
    gradients' and the updates' selections are made on the leaves joined end to end
    (``transform.leafwise``: one ``where`` each for all the leaves, one ``nan_to_num`` for the
    updates), the state entries' leaf by leaf."""
    transform = _momentum()
    shapes = [(3, 2), (3, 4)]
    params = _leaves(shapes)
    state = transform.init(params)
    _, state = transform.update(_leaves(shapes, seed=2), state, params, step=0)
    grads = _leaves(shapes, seed=1)
    grads["w1"][0, 0] = float("inf")
    updates, after = transform.update(grads, state, params, step=1)
    assert all(bool(torch.all(u == 0)) for u in updates.values())
    for key in state.groups:
        torch.testing.assert_close(after.groups[key]["m"], state.groups[key]["m"], rtol=0, atol=0)
    assert int(after.count) == 1 and int(after.nonfinite_count) == 1
    names = _ops_of_a_step(transform, shapes, bad=True)
    assert names.count("where") == 2 + len(shapes)  # the gradients, the updates, each state entry
    assert names.count("nan_to_num") == 1 and names.count("cat") == 2


def test_host_bool_reads_only_where_reading_is_free():
    """``host_bool`` reads NumPy arrays and CPU tensors, never a traced or compiled value."""
    xp_torch = array_namespace(torch.zeros(1))
    xp_numpy = array_namespace(np.zeros(1))
    assert host_bool(xp_torch, torch.tensor(True)) is True
    assert host_bool(xp_numpy, np.asarray(False)) is False
    seen = []

    @torch.compile(fullgraph=True, dynamic=False)
    def compiled(x):
        seen.append(host_bool(xp_torch, x > 0))
        return x + 1

    compiled(torch.ones(()))
    assert seen == [None]


def test_select_and_finite_or_zero_on_torch_are_one_operation_each():
    """``select`` of two tensors of one dtype (a 0-D zero included) is one ``where`` (no dtype
    fix-up ``to``); ``finite_or_zero`` is one ``nan_to_num`` that keeps every finite entry (±max,
    -0.0 with its sign) and zeroes NaN and ±Inf, as ``where(isfinite(u), u, 0)``."""
    xp = array_namespace(torch.zeros(1))
    big = float(np.finfo(np.float32).max)
    u = torch.tensor([np.nan, np.inf, -np.inf, big, -big, -0.0, 1.5], dtype=torch.float32)
    zero = torch.zeros((), dtype=torch.float32)
    ok = torch.tensor(True)
    assert _dispatched(lambda: select(xp, ok, u, zero)) == ["where"]
    assert _dispatched(lambda: finite_or_zero(xp, u, zero)) == ["nan_to_num"]
    got = finite_or_zero(xp, u, zero)
    want = torch.where(torch.isfinite(u), u, zero)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_sums_of_squares_is_each_leaf_sum_to_rounding():
    """``sums_of_squares`` (one ``_foreach_powsum`` eagerly on torch) gives each array's ``Σ x²``
    in its own summation order: within ``n·eps`` relative of the exact sum of ``n`` squares (each
    partial sum of non-negative terms rounds by at most ``eps`` relative, Higham's γ_n); NaN and
    Inf propagate, so a threshold test on it refuses them."""
    xp = array_namespace(torch.zeros(1))
    generator = torch.Generator().manual_seed(0)
    arrays = [torch.randn(shape, generator=generator, dtype=torch.float32) * 10 for shape in [(7,), (33, 5), (4, 3, 9)]]
    arrays.append(torch.tensor([1.0, float("nan")], dtype=torch.float32))
    arrays.append(torch.tensor([1e20, 1.0], dtype=torch.float32))  # its square overflows float32
    assert _dispatched(lambda: sums_of_squares(xp, arrays)) == ["_foreach_powsum"]
    sums = sums_of_squares(xp, arrays)
    eps = float(np.finfo(np.float32).eps)
    for a, s in zip(arrays[:3], sums):
        exact = float(np.sum(a.numpy().astype(np.float64) ** 2))
        assert abs(float(s) - exact) <= a.numel() * eps * exact
    assert bool(torch.isnan(sums[3])) and not bool(sums[4] < float(np.finfo(np.float32).max))


def test_on_stacks_splits_a_stack_in_one_operation_per_result():
    """``on_stacks`` on torch equals one call per member (its plain formula), and hands a stack's
    results back with one ``split`` per result array, not one slice per member."""
    xp = array_namespace(torch.zeros(1))
    generator = torch.Generator().manual_seed(0)
    members = [(torch.randn(k, 3, 3, generator=generator, dtype=torch.float64),) for k in (1, 2, 3, 1)]

    def fn(a):
        return (xp.matmul(a, xp.matrix_transpose(a)), xp.sum(a, axis=(-2, -1)))

    names = _dispatched(lambda: on_stacks(xp, fn, members))
    assert names.count("split_with_sizes") + names.count("split") == 2 and "slice" not in names
    eps = float(np.finfo(np.float64).eps)
    for got, (a,) in zip(on_stacks(xp, fn, members), members):
        gram, total = fn(a)
        # a batched product may sum in another order: each entry within 3 eps of Σ|a_ik a_jk|
        # (3 terms), the sum within 9 eps of Σ|a| (9 terms)
        bound = 3 * eps * xp.matmul(xp.abs(a), xp.matrix_transpose(xp.abs(a)))
        assert bool(torch.all(torch.abs(got[0] - gram) <= bound))
        assert bool(torch.all(torch.abs(got[1] - total) <= 9 * eps * xp.sum(xp.abs(a), axis=(-2, -1))))


def test_a_non_finite_update_is_still_zeroed_when_read_on_the_host():
    """The updates' guard read on the host (``host_all_finite``) falls back to the per-leaf guard
    when any update holds a NaN or ±Inf: those entries become zero, the others (of every leaf) are
    kept, and the step is not skipped (its gradient was finite)."""
    big = float(np.finfo(np.float32).max)

    def init_group(leaves, paths, xp):
        return {}

    def update_group(grads, state, params, ctx):
        return (grads[0] / (grads[0] - 1.0),), {}  # 1/0 = Inf where g == 1

    transform = build_transform(name="divide", init_group=init_group, update_group=update_group)
    params = {"a": torch.zeros(3), "b": torch.zeros(2)}
    grads = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 2.0])}
    xp = array_namespace(torch.zeros(1))
    from precond_ref._backend import host_all_finite

    assert host_all_finite(xp, [torch.ones(2), torch.tensor([0.0, float("nan")])]) is False
    assert host_all_finite(xp, [torch.ones(2), torch.tensor([0.0, -float("inf")])]) is False
    assert host_all_finite(xp, [torch.ones(2), torch.zeros(0), torch.full((2,), 1e15)]) is True
    # Finite entries whose 2-norm overflows read as "maybe not finite": the element-wise guard then
    # keeps them all (updates 1e30 * g of a finite gradient: finite, their squares are not).
    assert host_all_finite(xp, [torch.ones(2), torch.full((2,), big)]) is False
    scale = build_transform(
        name="scale", init_group=init_group, update_group=lambda g, s, p, ctx: ((g[0] * 1e30,), {})
    )
    kept, _ = scale.update(grads, scale.init(params), params)
    assert torch.equal(kept["a"], grads["a"] * 1e30) and torch.equal(kept["b"], grads["b"] * 1e30)
    updates, state = transform.update(grads, transform.init(params), params)
    want_a = torch.tensor([0.0, 2.0, 1.5])
    assert torch.equal(updates["a"], want_a) and torch.equal(updates["b"], torch.tensor([-1.0, 2.0]))
    assert int(state.count) == 1 and int(state.nonfinite_count) == 0


@pytest.mark.parametrize("name", ["mbf", "if_shampoo"])
def test_a_skipped_step_selects_joined_state_not_each_leaf(name):
    """A skipped step (a NaN gradient; where the skip predicate cannot be read, every step) keeps
    every state entry at its old value. MBF's heavy ball and IF-Shampoo's momentum are computed on
    the leaves joined end to end (``leafwise``), and make the selection there
    (``StepContext.unless_skipped``, each leaf's part marked by ``settle_pieces``); IF-Shampoo's
    failure counts add the flags of a step that is not skipped (the selection made once per batch
    of tiles). So the number of ``where`` operations does not grow with the number of equal
    matrices, and the state after the step is the state before it, bit for bit."""
    import precond_ref as pr

    def wheres(n: int) -> int:
        shapes = [(6, 4)] * n
        opt = getattr(pr, name)(learning_rate=0.01)
        params = _leaves(shapes)
        state = opt.init(params)
        for seed in range(3):  # then a step of neither MBF's statistics nor its inverses
            _, state = opt.update(_leaves(shapes, seed=seed + 2), state, params, batch_size=8)
        grads = _leaves(shapes, seed=9)
        grads["w0"][0, 0] = float("nan")
        with Dispatched() as counter:
            updates, after = opt.update(grads, state, params, batch_size=8)
        assert int(after.nonfinite_count) == 1 and all(bool((u == 0).all()) for u in updates.values())
        for key, entries in state.groups.items():
            for entry, old in entries.items():
                torch.testing.assert_close(after.groups[key][entry], old, rtol=0, atol=0)
        return counter.names.count("where")

    few = wheres(2)
    assert few > 0 and wheres(5) == few
