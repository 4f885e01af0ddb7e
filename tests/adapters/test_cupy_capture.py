"""The captured step on CuPy (``precond_ref.adapters.cupy.captured``) gives ``transform.update``'s
trajectory: on a CPU through a double of CuPy's stream capture (``fake_cupy_graphs.py``: recorded
callables replayed, host reads refused), on a GPU through CuPy itself (skipped without one).

The invariant (DESIGN.md, "A captured step on GPUs"): a replayed step is the step, so every
update and every state entry equals the eager core's, bit for bit, on every call, whatever the
pattern of periodic work, a skipped step, a restored state or a refused capture in between.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.adapters import cupy as captured_cupy
from precond_ref.tree import tree_flatten, tree_map

import sync_guard
from fake_cupy_graphs import FakeCupyGraphs
from test_sync_free import _params  # fc2 and conv2 share block shapes with fc and conv: stacked paths

# Every method, with short intervals so that every pattern recurs within STEPS.
CONFIGS = {
    "agd": lambda: pr.agd(learning_rate=1e-2, weight_decay=1e-2),
    "asgo": lambda: pr.asgo(precondition_every=2, root_method="polar_express"),
    "asgo-blocked": lambda: pr.asgo(root_method="newton_schulz", block_size=3, precondition_every=3, root_tolerance=math.inf),
    "dasgo": lambda: pr.dasgo(),
    "sketchy": lambda: pr.sketchy(learning_rate=1e-2, rank=2, precondition_every=2),
    "s_adagrad": lambda: pr.s_adagrad(learning_rate=1e-2, rank=2),
    "rf_rmsprop": lambda: pr.rf_rmsprop(learning_rate=1e-2, batch_size=8),
    "rf_adamw": lambda: pr.rf_adamw(learning_rate=1e-2, batch_size=8),
    "if_shampoo": lambda: pr.if_shampoo(learning_rate=1e-2, batch_size=8, precondition_every=2),
    "mbf": lambda: pr.mbf(learning_rate=1e-3, statistics_every=2, precondition_every=4),
}
STEPS = 10
NAN_STEP = 5


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = _params(rng)
    grads = [tree_map(lambda p: rng.standard_normal(p.shape), params) for _ in range(STEPS)]
    grads[NAN_STEP] = tree_map(lambda g: g * np.nan, grads[NAN_STEP])
    return params, grads


def _eager(opt, params, grads):
    """``transform.update`` on the guarded arrays, step= given: the reference trajectory."""
    params = sync_guard.wrap(params)
    state = opt.init(params)
    out = []
    for i, g in enumerate(grads):
        updates, state = opt.update(sync_guard.wrap(g), state, params, step=i)
        params = pr.apply_updates(params, updates)
        out.append((sync_guard.unwrap(updates), sync_guard.unwrap(tree_flatten(state)[0])))
    return out


def _captured(opt, params, grads, fake, restore_at=None, steps=None):
    wrapper = captured_cupy.CapturedTransform(opt, enabled=True, graphs=fake)
    params = sync_guard.wrap(params)
    state = wrapper.init(params)
    out = []
    for i, g in enumerate(grads):
        if i == restore_at:  # a state the wrapper did not return: a restored copy (a checkpoint)
            state = tree_map(lambda x: sync_guard.GuardedArray(np.array(x._array)), state)
        kwargs = {} if steps is None else {"step": i}
        updates, state = wrapper.update(sync_guard.wrap(g), state, params, **kwargs)
        # copies: the wrapper's returned arrays are its buffers, overwritten by the next call
        out.append((tree_map(lambda x: np.array(x._array), updates), [np.array(x._array) for x in tree_flatten(state)[0]]))
        params = pr.apply_updates(params, updates)
    return wrapper, out


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, ((ua, sa), (ub, sb)) in enumerate(zip(a, b)):
        tree_map(lambda x, y: np.testing.assert_array_equal(x, y, err_msg=f"updates of call {i}"), ua, ub)
        assert len(sa) == len(sb)
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(x, y, err_msg=f"state of call {i}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_captured_step_equals_the_core(name):
    """Replays of every pattern give the eager core's updates and state, bitwise (a skipped step
    at call 5 included), with no host read in a warm-up, capture or replay (the double arms the
    guard); each pattern is captured once and replayed afterwards."""
    params, grads = _problem()
    fake = FakeCupyGraphs()
    wrapper, got = _captured(CONFIGS[name](), params, grads, fake)
    _assert_same(got, _eager(CONFIGS[name](), params, grads))
    opt = CONFIGS[name]()
    patterns = {tuple(opt.due(i)) for i in range(STEPS)}
    assert wrapper.graph_count == len(patterns) == len(fake.graphs)
    assert sum(g.replays for g in fake.graphs) == STEPS - len(patterns)
    assert wrapper.failed_captures == 0


@pytest.mark.parametrize("name", ["asgo", "if_shampoo", "sketchy"])
def test_restored_state_and_step_argument(name):
    """A state the wrapper did not return (here a copy, as from a checkpoint) is copied into its
    buffers and its call count read once; with step= nothing is read on the host at all."""
    params, grads = _problem(1)
    reference = _eager(CONFIGS[name](), params, grads)
    _, got = _captured(CONFIGS[name](), params, grads, FakeCupyGraphs(), restore_at=4)
    _assert_same(got, reference)
    _, got = _captured(CONFIGS[name](), params, grads, FakeCupyGraphs(), restore_at=4, steps=True)
    _assert_same(got, reference)


def test_count_read_only_for_a_foreign_state():
    """The call count of a state the wrapper returned is the host's own: updating under the armed
    guard raises nowhere; a fresh state without step= needs one read (refused while armed)."""
    params, grads = _problem()
    wrapper = captured_cupy.CapturedTransform(CONFIGS["asgo"](), enabled=True, graphs=FakeCupyGraphs())
    params = sync_guard.wrap(params)
    state = wrapper.init(params)
    with sync_guard.armed(), pytest.raises(sync_guard.HostTransfer):
        wrapper.update(sync_guard.wrap(grads[0]), state, params)
    updates, state = wrapper.update(sync_guard.wrap(grads[0]), state, params)
    for g in grads[1:4]:
        with sync_guard.armed():
            updates, state = wrapper.update(sync_guard.wrap(g), state, params)


def test_a_refused_capture_steps_eagerly_with_one_warning():
    """A capture that fails refuses its pattern (warned once); that pattern then steps eagerly on
    the buffers and the numbers stay the core's; the other patterns are captured."""
    params, grads = _problem()
    fake = FakeCupyGraphs(fail_first=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper, got = _captured(CONFIGS["asgo"](), params, grads, fake)
    messages = [w for w in caught if issubclass(w.category, captured_cupy.CaptureWarning)]
    assert len(messages) == 1 and "could not be captured" in str(messages[0].message)
    _assert_same(got, _eager(CONFIGS["asgo"](), params, grads))
    patterns = {tuple(CONFIGS["asgo"]().due(i)) for i in range(STEPS)}
    assert wrapper.failed_captures == 1 and wrapper.graph_count == len(patterns) - 1


def test_repeated_failures_turn_capturing_off(monkeypatch):
    params, grads = _problem()
    monkeypatch.setattr(captured_cupy, "MAX_FAILED_CAPTURES", 2)
    fake = FakeCupyGraphs(fail_first=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper, got = _captured(CONFIGS["mbf"](), params, grads, fake)
    assert not wrapper.capturing and wrapper.failed_captures == 2 and wrapper.graph_count == 0
    assert any("capturing is off" in str(w.message) for w in caught)
    _assert_same(got, _eager(CONFIGS["mbf"](), params, grads))


def test_other_arrays_and_switches_pass_through(monkeypatch):
    """NumPy arrays (not the graphs' arrays), enabled=False and PRECOND_REF_CAPTURE=0 call
    transform.update itself; due= is the wrapper's to decide."""
    params, grads = _problem()
    opt = CONFIGS["dasgo"]()
    fake = FakeCupyGraphs()
    wrapper = captured_cupy.CapturedTransform(opt, enabled=True, graphs=fake)
    state = wrapper.init(params)
    updates, new = wrapper.update(grads[0], state, params)
    expected, _ = opt.update(grads[0], opt.init(params), params)
    tree_map(np.testing.assert_array_equal, updates, expected)
    assert fake.runs == 0 and not fake.buffers
    monkeypatch.setenv("PRECOND_REF_CAPTURE", "0")
    assert not captured_cupy.captured(opt).enabled
    assert captured_cupy.captured(opt, enabled=True).enabled
    with pytest.raises(TypeError, match="due="):
        wrapper.update(grads[0], state, params, due=())
    with pytest.raises(TypeError, match="enabled must be"):
        captured_cupy.captured(opt, enabled=1)
    with pytest.raises(TypeError, match="Transform"):
        captured_cupy.captured(lambda g: g)


def test_the_double_detects_a_stale_value():
    """The double must be able to fail: a wrapper that stopped feeding the gradients (its copy
    into the buffers dropped) replays stale gradients, and the trajectories part."""
    params, grads = _problem()

    class NoGradCopy(FakeCupyGraphs):
        def copy(self, dst, src):
            if src._array.shape == dst._array.shape and any(src is x for x in self.fed):
                return
            super().copy(dst, src)

    fake = NoGradCopy()
    fake.fed = []
    wrapper = captured_cupy.CapturedTransform(CONFIGS["asgo"](), enabled=True, graphs=fake)
    p = sync_guard.wrap(params)
    state = wrapper.init(p)
    got = []
    for i, g in enumerate(grads[:4]):
        g = sync_guard.wrap(g)
        if i >= 1:
            fake.fed = tree_flatten(g)[0]
        updates, state = wrapper.update(g, state, p)
        got.append((tree_map(lambda x: np.array(x._array), updates), [np.array(x._array) for x in tree_flatten(state)[0]]))
        p = pr.apply_updates(p, updates)
    with pytest.raises(AssertionError):
        _assert_same(got, _eager(CONFIGS["asgo"](), params, grads[:4]))


def _cupy_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.is_available())


@pytest.mark.skipif(not _cupy_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cupy_captured_step_equals_eager(name):
    """On a GPU: replayed CUDA graphs give eager CuPy's trajectory (float64; the same kernels, so
    equal to a few ulps at most: rtol 1e-12 over 10 steps), every pattern either captured and
    replayed or refused with a warning."""
    import cupy

    params, grads = _problem()
    to_gpu = lambda t: tree_map(lambda x: cupy.asarray(x, dtype=cupy.float64), t)  # noqa: E731
    opt = CONFIGS[name]()
    p, state = to_gpu(params), None
    state = opt.init(p)
    eager = []
    for i, g in enumerate(grads):
        updates, state = opt.update(to_gpu(g), state, p, step=i)
        p = pr.apply_updates(p, updates)
        eager.append(tree_map(cupy.asnumpy, updates))
    wrapper = captured_cupy.captured(CONFIGS[name](), enabled=True)
    p = to_gpu(params)
    state = wrapper.init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", captured_cupy.CaptureWarning)
        for i, g in enumerate(grads):
            updates, state = wrapper.update(to_gpu(g), state, p)
            p = pr.apply_updates(p, updates)
            tree_map(lambda a, b: np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=1e-12, atol=0), updates, eager[i])
    patterns = {tuple(opt.due(i)) for i in range(STEPS)}
    assert wrapper.graph_count + len(set().union(*(s.refused for s in wrapper._sets.values()))) == len(patterns)


def test_entries_that_trade_buffers():
    """An update function whose new state hands one entry's old array to another entry
    (``b <- a``, written after ``a``) and whose update is an old entry itself keeps its numbers: the wrapper writes the
    updates first and copies such an entry aside before overwriting its buffer (an in-order copy
    would not). The engine's selections make new arrays, so the case is built by hand here."""
    from precond_ref.transform import PrecondState, Transform

    def init(params):
        w = params["w"]
        xp = w.__array_namespace__()
        return PrecondState(xp.zeros((), dtype=xp.int32), xp.zeros((), dtype=xp.int32), {"w": {"a": w * 0.0, "b": w * 0.0 + 1.0}})

    def update(grads, state, params=None, step=None, due=None):
        a, b = state.groups["w"]["a"], state.groups["w"]["b"]
        return {"w": b}, PrecondState(state.count + 1, state.nonfinite_count, {"w": {"a": b + grads["w"], "b": a}})

    opt = Transform(init, update)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2))}
    grads = [{"w": rng.standard_normal((3, 2))} for _ in range(5)]
    _assert_same(_captured(opt, params, grads, FakeCupyGraphs())[1], _eager(opt, params, grads))
