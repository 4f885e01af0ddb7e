"""The captured step on CuPy (``precond_ref.adapters.cupy.captured``) gives ``transform.update``'s
trajectory: on a CPU through a double of CuPy's stream capture (``fake_cupy_graphs.py``: recorded
callables replayed, host reads refused), on a GPU through CuPy itself (skipped without one).

The invariant (DESIGN.md, "A captured step on GPUs"): a replayed step is the step, so every
update and every state entry equals the eager core's, bit for bit, on every call, whatever the
pattern of periodic work, a skipped step, a restored state or a refused capture in between.

The methods whose step multiplies matrices, which CuPy's capture refuses (``MATRIX_PRODUCTS``),
step eagerly without trying; the bookkeeping tests make the wrapper try them all the same
(``refusal = None``: the double, unlike CuPy, captures products unless told to refuse them), and
the table is checked against what a capture refuses: on the double that refuses products as
CuPy does, and on a GPU against CuPy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.adapters import cupy as captured_cupy
from precond_ref.tree import tree_flatten, tree_map

import fake_cupy_graphs
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


def _wrapper(opt, fake, tried=True):
    """The wrapper of ``opt`` on the double; ``tried``: its refusal set aside (every method captured)."""
    wrapper = captured_cupy.CapturedTransform(opt, enabled=True, graphs=fake)
    if tried:
        wrapper.refusal = None
    return wrapper


def _patterns(opt):
    return {tuple(opt.due(i)) for i in range(STEPS)}


def _captured(opt, params, grads, fake, restore_at=None, steps=None, tried=True):
    wrapper = _wrapper(opt, fake, tried)
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
    wrapper = _wrapper(CONFIGS["asgo"](), FakeCupyGraphs())
    params = sync_guard.wrap(params)
    state = wrapper.init(params)
    with sync_guard.armed(), pytest.raises(sync_guard.HostTransfer):
        wrapper.update(sync_guard.wrap(grads[0]), state, params)
    updates, state = wrapper.update(sync_guard.wrap(grads[0]), state, params)
    for g in grads[1:4]:
        with sync_guard.armed():
            updates, state = wrapper.update(sync_guard.wrap(g), state, params)


@pytest.mark.parametrize("name", ["asgo", "dasgo"])
def test_a_refused_capture_steps_eagerly_with_one_warning(name):
    """A capture that fails unexpectedly (DASGO, which the table lets try; ASGO made to try)
    refuses its pattern (warned once); that pattern then steps eagerly on the buffers and the
    numbers stay the core's; the other patterns are captured."""
    params, grads = _problem()
    fake = FakeCupyGraphs(fail_first=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper, got = _captured(CONFIGS[name](), params, grads, fake, tried=name == "asgo")
    messages = [w for w in caught if issubclass(w.category, captured_cupy.CaptureWarning)]
    assert len(messages) == 1 and "could not be captured" in str(messages[0].message)
    _assert_same(got, _eager(CONFIGS[name](), params, grads))
    assert wrapper.failed_captures == 1 and wrapper.graph_count == len(_patterns(CONFIGS[name]())) - 1


REFUSED = sorted(name for name in CONFIGS if captured_cupy.refusal_of(CONFIGS[name]()) is not None)


def test_the_table_names_the_matrix_methods():
    """The refused methods are those that multiply matrices, found by the names their factories
    give (a renamed method would leave the table silently)."""
    assert REFUSED == ["asgo", "asgo-blocked", "if_shampoo", "mbf", "s_adagrad", "sketchy"]
    names = {CONFIGS[name]().update.method for name in REFUSED} | {pr.scale_by_sketchy().update.method}
    assert names == set(captured_cupy.MATRIX_PRODUCTS)
    assert "cuBLAS" in captured_cupy.refusal_of(CONFIGS["mbf"]())


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_method_steps_eagerly_without_trying(name):
    """A method of the table never reaches the graphs: no buffers, no run, no capture, no warning
    (the suite makes ours errors; here they are counted), the eager core's numbers bit for bit."""
    params, grads = _problem()
    fake = FakeCupyGraphs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper, got = _captured(CONFIGS[name](), params, grads, fake, tried=False)
    assert not [w for w in caught if issubclass(w.category, captured_cupy.CaptureWarning)]
    assert "multiplies matrices" in wrapper.refusal
    assert fake.runs == 0 and not fake.buffers and not fake.graphs and fake.copies == 0
    assert wrapper.graph_count == 0 and wrapper.failed_captures == 0
    _assert_same(got, _eager(CONFIGS[name](), params, grads))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_table_is_what_a_capture_refuses(name):
    """On the double that refuses matrix products as CuPy's capture does, each method made to try
    captures every pattern where the table lets it try, and none where the table refuses it (each
    pattern warned once); the numbers are the core's either way."""
    params, grads = _problem()
    fake = FakeCupyGraphs(refuses_products=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper, got = _captured(CONFIGS[name](), params, grads, fake)
    _assert_same(got, _eager(CONFIGS[name](), params, grads))
    patterns = len(_patterns(CONFIGS[name]()))
    warned = [str(w.message) for w in caught if issubclass(w.category, captured_cupy.CaptureWarning)]
    if name in REFUSED:
        assert wrapper.graph_count == 0 and wrapper.failed_captures == patterns == len(warned)
        assert all(fake_cupy_graphs.CUBLAS_REFUSED in message for message in warned)
    else:
        assert wrapper.graph_count == patterns and wrapper.failed_captures == 0 and not warned


def test_if_shampoo_without_dense_factors_would_capture():
    """What the table gives up: IF-Shampoo whose factors are all diagonal multiplies no matrices
    (it is refused with its method; made to try, it captures on the products-refusing double)."""
    params, grads = _problem()
    make = lambda: pr.if_shampoo(learning_rate=1e-2, batch_size=8, precondition_every=2, structures="diagonal")  # noqa: E731
    assert captured_cupy.refusal_of(make()) is not None
    wrapper, got = _captured(make(), params, grads, FakeCupyGraphs(refuses_products=True))
    assert wrapper.graph_count == len(_patterns(make())) and wrapper.failed_captures == 0
    _assert_same(got, _eager(make(), params, grads))


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
    wrapper = _wrapper(CONFIGS["asgo"](), fake)
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


def _on_gpu(name, tried):
    """The eager CuPy trajectory of ``CONFIGS[name]`` (float64) and the captured wrapper's (its
    refusal set aside where ``tried``), each update checked against it as it comes; the
    wrapper and the CaptureWarnings it gave."""
    import cupy

    params, grads = _problem()
    to_gpu = lambda t: tree_map(lambda x: cupy.asarray(x, dtype=cupy.float64), t)  # noqa: E731
    opt = CONFIGS[name]()
    p = to_gpu(params)
    state = opt.init(p)
    eager = []
    for i, g in enumerate(grads):
        updates, state = opt.update(to_gpu(g), state, p, step=i)
        p = pr.apply_updates(p, updates)
        eager.append(tree_map(cupy.asnumpy, updates))
    wrapper = captured_cupy.captured(CONFIGS[name](), enabled=True)
    if tried:
        wrapper.refusal = None
    p = to_gpu(params)
    state = wrapper.init(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", captured_cupy.CaptureWarning)
        for i, g in enumerate(grads):
            updates, state = wrapper.update(to_gpu(g), state, p)
            p = pr.apply_updates(p, updates)
            tree_map(lambda a, b: np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=1e-12, atol=0), updates, eager[i])
    return wrapper, [str(w.message) for w in caught if issubclass(w.category, captured_cupy.CaptureWarning)]


@pytest.mark.skipif(not _cupy_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cupy_captured_step_equals_eager(name):
    """On a GPU: replayed CUDA graphs give eager CuPy's trajectory (float64; the same kernels, so
    equal to a few ulps at most: rtol 1e-12 over 10 steps); a method the table lets try captures
    every pattern and replays it, a refused one steps eagerly, neither with a warning."""
    wrapper, warned = _on_gpu(name, tried=False)
    assert not warned
    assert wrapper.graph_count == (0 if name in REFUSED else len(_patterns(CONFIGS[name]())))


@pytest.mark.skipif(not _cupy_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("name", REFUSED)
def test_cupy_refuses_the_tables_methods(name):
    """On a GPU, what keeps the table true: a refused method made to try captures no pattern, each
    refused for cuBLAS (warned once), and its numbers stay the eager ones. A CuPy that captured
    cuBLAS calls would fail here, as a method the table lets try that fails to capture fails
    ``test_cupy_captured_step_equals_eager``."""
    wrapper, warned = _on_gpu(name, tried=True)
    patterns = len(_patterns(CONFIGS[name]()))
    assert wrapper.graph_count == 0 and wrapper.failed_captures == patterns == len(warned)
    assert all("cuBLAS" in message for message in warned), warned


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
