"""ASGO and DASGO (spec ``asgo.md``): backends, dtypes, bad input, agreement with the authors' code,
and the property tests of spec §6."""

from __future__ import annotations

import functools
import importlib
import json
import math
import pathlib

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import precond_ref as pr
from backends import BACKENDS
from precond_ref.transform import PrecondState

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "asgo_authors_trajectories.json"


# ------------------------------------------------------------------------------------------------
# helpers


def run(backend, opt, params, grads, with_params=True):
    """Apply ``opt`` to numpy ``params`` along numpy gradient trees ``grads`` (a list, or a callable
    ``params -> grads`` with ``steps``); returns (numpy params after each step, numpy updates, state)."""
    p = backend.tree(_sorted(params))
    state = opt.init(p)
    update = updater(backend, opt)
    history, updates = [], []
    for g in grads:
        g = _sorted(g(backend.numpy_tree(p)) if callable(g) else g)
        u, state = update(backend.tree(g), state, p if with_params else None)
        p = pr.apply_updates(p, u)
        history.append(backend.numpy_tree(p))
        updates.append(backend.numpy_tree(u))
    return history, updates, state


def updater(backend, opt):
    """``opt.update``; on JAX jitted: one compilation of the whole step at the suite's XLA level 0
    takes less time than dispatching its hundreds of small operations (root iterations) one by one
    (the JAX tests of this file: 31 s op by op, 17 s jitted), and it is how JAX users run it.
    The arguments are committed to the device: the first step's would otherwise be uncommitted
    (``jnp.asarray``) and the later ones committed (results of the earlier steps), which compiles
    the step twice."""
    if backend.name == "jax":
        import jax

        step, device = jax.jit(opt.update), jax.devices()[0]
        return lambda *args: step(*jax.device_put(args, device))
    return opt.update


@pytest.fixture(params=[b for b in BACKENDS if b.name != "jax"], ids=lambda b: b.name)
def eager_backend(request):
    """Backends for behaviour tests of backend-independent logic (JAX compiles are slow; JAX is
    covered by the agreement, dtype, golden, zero- and non-finite-gradient tests)."""
    return request.param


def _sorted(tree):
    """Dict trees with sorted keys (what ``jax.jit`` returns), so every backend sees one order."""
    if isinstance(tree, dict):
        return {k: _sorted(tree[k]) for k in sorted(tree)}
    return tree


def random_tree(rng, shapes, dtype=np.float64):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


SHAPES = {"wide": (3, 5), "tall": (6, 4), "square": (4, 4), "bias": (5,), "conv": (3, 2, 2, 2)}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-300))


def max_rel_tree(a, b):
    return max(rel(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------------------
# every backend agrees with numpy; dtypes


CONFIGS = {
    "asgo-principled": lambda: pr.asgo(learning_rate=0.05),
    "asgo-principled-pe-interval": lambda: pr.asgo(
        learning_rate=0.05, root_method="polar_express", precondition_every=2, accumulator="sum"
    ),
    "asgo-principled-ns-blocked": lambda: pr.asgo(
        learning_rate=0.05, root_method="newton_schulz", root_steps=20, block_size=3, side="left"
    ),
    "asgo-faithful": lambda: pr.asgo(learning_rate=0.05, mode="faithful", fallback_mask=lambda p, x: x.ndim != 2),
    "dasgo-principled": lambda: pr.dasgo(learning_rate=0.05, side="auto"),
    "dasgo-faithful": lambda: pr.dasgo(learning_rate=0.05, mode="faithful", fallback_mask=lambda p, x: x.ndim != 2),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_backends_agree_with_numpy(backend, config):
    if backend.name == "jax" and config in ("asgo-principled-ns-blocked", "dasgo-faithful"):
        pytest.skip("JAX covered by the other configurations (a compilation each)")
    rng = np.random.default_rng(0)
    params = random_tree(rng, SHAPES)
    grads = [random_tree(rng, SHAPES) for _ in range(4)]
    numpy_backend = next(b for b in BACKENDS if b.name == "numpy")
    expected, _, _ = run(numpy_backend, CONFIGS[config](), params, grads)
    got, _, state = run(backend, CONFIGS[config](), params, grads)
    # Faithful statistics and roots are float32 (the authors'), so backends differ at float32 rounding.
    tol = 1e-5 if "faithful" in config else 1e-10
    for step in range(len(grads)):
        for key in SHAPES:
            assert rel(got[step][key], expected[step][key]) < tol, (step, key)
    assert int(state.count) == 4


@pytest.mark.parametrize("factory", [pr.asgo, pr.dasgo])
@pytest.mark.parametrize("mode", ["principled", "faithful"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtypes_are_preserved(backend, factory, mode, dtype):
    xp = backend.xp
    rng = np.random.default_rng(1)
    shapes = {"w": (3, 5), "b": (5,)}
    params = backend.tree(random_tree(rng, shapes, np.dtype(dtype)))
    grads = backend.tree(random_tree(rng, shapes, np.dtype(dtype)))
    opt = factory(mode=mode)
    state = opt.init(params)
    update = updater(backend, opt)
    for _ in range(2):
        updates, state = update(grads, state, params)
    want = getattr(xp, dtype)
    assert updates["w"].dtype == want and updates["b"].dtype == want
    groups = state.groups
    assert groups["w"]["momentum"].dtype == want
    stat_dtype = xp.float32 if mode == "faithful" else want
    assert groups["w"]["statistic"].dtype == stat_dtype
    assert groups["b"]["mu"].dtype == want
    if factory is pr.asgo:
        assert groups["w"]["failures"].dtype == xp.int32
    for entries in groups.values():
        for v in entries.values():
            assert bool(xp.all(xp.isfinite(xp.astype(v, xp.float64) if v.dtype == xp.int32 else v)))


@pytest.mark.parametrize("factory", [pr.asgo, pr.dasgo])
@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_bfloat16_parameters(factory, mode):
    torch = pytest.importorskip("torch")
    w = torch.randn(3, 5, dtype=torch.bfloat16)
    opt = factory(mode=mode)
    state = opt.init({"w": w})
    u, state = opt.update({"w": torch.randn(3, 5, dtype=torch.bfloat16)}, state, {"w": w})
    assert u["w"].dtype == torch.bfloat16
    entries = state.groups["w"]
    # D7: principled keeps float32 state; faithful keeps the momentum in the gradient dtype.
    assert entries["momentum"].dtype == (torch.bfloat16 if mode == "faithful" else torch.float32)
    assert entries["statistic"].dtype == torch.float32
    assert torch.isfinite(u["w"].float()).all()


# ------------------------------------------------------------------------------------------------
# the authors' code: golden trajectories


def _golden():
    return json.loads(DATA.read_text())


@pytest.mark.parametrize("case", ["asgo_polar_express", "asgo_newton_schulz", "dasgo"])
def test_faithful_reproduces_authors_trajectories(backend, case):
    """Faithful mode vs trajectories of infinity-stars/ASGO d3ef14b (float32; see the JSON's
    description), 20 steps.

    The bound is the rounding model's, not one machine's digits: every float32 operation may round
    differently on another CPU/GPU (BLAS/LAPACK summation order), by at most about one ulp per term
    of a length-n reduction. ``_float32_rounding_sensitivity`` measures how far the trajectory
    moves when every gradient entry is perturbed by one ulp on every step; the bound allows n = 5
    (the longest axis) such ulps with a factor 4 of room. Measured here: deviation 3-4e-7 against
    a sensitivity of 0.6-1.7e-7; a wrong update rule moves it by 1e-3 or more.
    """
    if backend.name == "jax" and case != "asgo_polar_express":
        pytest.skip("JAX covered by the Polar-Express case (a compilation each)")
    data = _golden()
    spec = data["cases"][case]
    history, _, _ = run(backend, _faithful_opt(spec), _golden_params(data), [_golden_gradient(data)] * max(data["steps"]))
    worst = max(
        rel(history[step - 1][k], np.asarray(value))
        for step in data["steps"] for k, value in spec["params"][str(step)].items()
    )
    n = max(max(np.shape(leaf["w0"])) for leaf in data["problem"].values())
    bound = 4 * n * _float32_rounding_sensitivity(case)
    assert worst <= bound, (worst, bound)


def _golden_params(data):
    return {k: np.asarray(leaf["w0"]).astype(np.float32) for k, leaf in data["problem"].items()}


def _golden_gradient(data, ulps=None):
    """The golden problem's gradient ``A^T (A w - b)`` in float32; ``ulps`` (a Generator) multiplies
    every entry by 1 +- eps32 (a one-ulp rounding difference)."""
    problem = {k: {n: np.asarray(v, np.float32) for n, v in leaf.items()} for k, leaf in data["problem"].items()}

    def gradient(p):
        out = {}
        for k, leaf in problem.items():
            g = leaf["a"].T @ (leaf["a"] @ p[k].astype(np.float32) - leaf["b"])
            if ulps is not None:
                g = (g * (1 + ulps.choice([-1.0, 1.0], g.shape) * np.finfo(np.float32).eps)).astype(np.float32)
            out[k] = g
        return out

    return gradient


def _faithful_opt(spec):
    factory = pr.asgo if spec["method"] == "asgo" else pr.dasgo
    return factory(learning_rate=1e-2, mode="faithful", **spec["core_kwargs"])


@functools.lru_cache(maxsize=None)
def _float32_rounding_sensitivity(case):
    """Largest relative deviation of the faithful NumPy trajectory (at the golden steps) when every
    gradient entry is off by one ulp on every step (two random sign patterns)."""
    numpy_backend = next(b for b in BACKENDS if b.name == "numpy")
    data = _golden()
    spec = data["cases"][case]
    steps = max(data["steps"])
    runs = [
        run(numpy_backend, _faithful_opt(spec), _golden_params(data), [_golden_gradient(data, ulps)] * steps)[0]
        for ulps in (None, np.random.default_rng(1), np.random.default_rng(2))
    ]
    return max(
        rel(other[step - 1][k], runs[0][step - 1][k])
        for other in runs[1:] for step in data["steps"] for k in spec["params"][str(step)]
    )


# ------------------------------------------------------------------------------------------------
# behaviour: interval, accumulator, fallback, shapes


def test_root_runs_only_on_interval(eager_backend):
    backend = eager_backend
    xp = backend.xp
    rng = np.random.default_rng(2)
    opt = pr.asgo(precondition_every=3, spread_refresh=False, weight_decay=0.0)  # all roots on count % 3 == 0
    p = backend.tree({"w": rng.standard_normal((3, 4))})
    state = opt.init(p)
    roots = []
    for t in range(7):
        state_before = state
        u, state = opt.update(backend.tree({"w": rng.standard_normal((3, 4))}), state, p)
        roots.append(backend.to_numpy(state.groups["w"]["root"]))
        P = backend.to_numpy(state.groups["w"]["statistic"])
        if t % 3 == 0:
            w, v = np.linalg.eigh(P)
            s = 1e-4 * np.trace(P) / 3 + 1e-30
            np.testing.assert_allclose(roots[-1], (v * (np.maximum(w, 0) + s) ** -0.5) @ v.T, rtol=1e-10)
        else:
            np.testing.assert_array_equal(roots[-1], backend.to_numpy(state_before.groups["w"]["root"]))
    assert not np.allclose(roots[0], roots[3])
    assert int(state.groups["w"]["failures"]) == 0
    del xp


def test_sum_accumulator_and_symmetrised_statistic(eager_backend):
    backend = eager_backend
    rng = np.random.default_rng(3)
    grads = [{"w": rng.standard_normal((5, 3))} for _ in range(3)]
    _, _, state = run(backend, pr.asgo(accumulator="sum", weight_decay=0.0), {"w": np.zeros((5, 3))}, grads)
    P = backend.to_numpy(state.groups["w"]["statistic"])
    np.testing.assert_allclose(P, sum(g["w"].T @ g["w"] for g in grads), rtol=1e-12)  # right side (5 > 3)
    np.testing.assert_array_equal(P, P.T)
    _, _, state = run(backend, pr.asgo(b2=0.5, weight_decay=0.0), {"w": np.zeros((5, 3))}, grads)
    P = backend.to_numpy(state.groups["w"]["statistic"])
    expected = 0.0
    for g in grads:
        expected = 0.5 * expected + 0.5 * g["w"].T @ g["w"]
    np.testing.assert_allclose(P, expected, rtol=1e-12)


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_fallback_adam(eager_backend, mode):
    """1-D leaves take bias-corrected Adam (0.9, 0.95, 1e-8) with the ASGO learning-rate schedule;
    faithful weight decay is torch.optim.Adam's L2 term, principled is decoupled (D11)."""
    backend = eager_backend
    rng = np.random.default_rng(4)
    b0 = rng.standard_normal(4)
    grads = [{"b": rng.standard_normal(4)} for _ in range(3)]
    def lr(count):
        if hasattr(count, "shape"):  # the core passes the 0-D int32 step counter
            count = backend.xp.astype(count, backend.xp.float64)
        return 0.1 / (1.0 + count)

    opt = pr.asgo(learning_rate=lr, fallback_weight_decay=0.01, mode=mode)
    history, _, _ = run(backend, opt, {"b": b0}, grads)
    b, m, v = b0.copy(), np.zeros(4), np.zeros(4)
    for t, g in enumerate(grads, start=1):
        g = g["b"] + (0.01 * b if mode == "faithful" else 0.0)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        step = lr(t - 1) / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.95**t) + 1e-8)
        b = b - step - (lr(t - 1) * 0.01 * b if mode == "principled" else 0.0)
        np.testing.assert_allclose(history[t - 1]["b"], b, rtol=1e-12)


def test_fallback_mask_tree_and_callable(eager_backend):
    backend = eager_backend
    rng = np.random.default_rng(5)
    params = {"emb": rng.standard_normal((6, 3)), "w": rng.standard_normal((3, 6)), "b": rng.standard_normal(3)}
    grads = [random_tree(rng, {k: v.shape for k, v in params.items()})]
    by_tree = pr.asgo(fallback_mask={"emb": True, "w": False, "b": True})
    by_name = pr.asgo(fallback_mask=lambda path, leaf: "emb" in path[-1] or leaf.ndim < 2)
    h1, _, s1 = run(backend, by_tree, params, grads)
    h2, _, s2 = run(backend, by_name, params, grads)
    assert set(s1.groups["emb"]) == {"mu", "nu"} and "statistic" in s1.groups["w"]
    assert max_rel_tree(h1[0], h2[0]) == 0.0
    with pytest.raises(ValueError, match="no entry for parameter 'b'"):
        pr.asgo(fallback_mask={"emb": True, "w": False}).init(backend.tree(params))


@pytest.mark.parametrize("side", ["auto", "left", "right"])
@pytest.mark.parametrize("method", ["asgo", "dasgo"])
def test_out_last_kernels_take_the_step_of_their_out_first_weights(eager_backend, method, side):
    """Spec ``asgo.md`` §4 (the ≥3-D row) and specs README §5: a leaf in the out-last layout (a Flax
    ``kernel``, (I, O) or (kh, kw, I, O)) is the layer of the out-first weight (O, I) or
    (O, I, kh, kw) stored transposed, and takes that weight's step, transposed back, at every
    ``side``: its matrix view is the transpose of the weight's up to a permutation of the merged
    axis, which the rules commute with (I1, and DASGO's per-column scaling), and ``side`` names a
    side of the out-first layer (I6: the left side of Wᵀ is the right side of W), so ``"right"``
    is the input side of both (DASGO's default, the authors' columns), and ``"auto"`` breaks the tie
    of a square layer to the same side. A weight whose matrix view has the shape of a kernel's
    (``other`` beside ``dense``) keeps its own side in the same tree. The statistic is of the same
    side, of the same shape, in both layouts.

    The layouts sum in other orders; ASGO's damped root of a rank-deficient statistic (3 gradients,
    a side of 8: condition number up to about k/δ = 8e4) magnifies those roundings to about 1e-12,
    DASGO's scaling does not."""
    backend = eager_backend
    tolerance = 1e-10 if method == "asgo" else 1e-14
    rng = np.random.default_rng(6)
    to_last = {2: lambda x: x.T, 4: lambda x: np.transpose(x, (2, 3, 1, 0))}
    first = {"dense": (3, 5), "square": (4, 4), "conv": (3, 2, 2, 2), "other": (5, 3)}
    names = {"dense": "kernel", "square": "kernel", "conv": "kernel", "other": "weight"}

    def out_last(tree):
        return {k: {names[k]: to_last[v.ndim](v) if names[k] == "kernel" else v} for k, v in tree.items()}

    w = {k: rng.standard_normal(shape) for k, shape in first.items()}
    grads = [{k: rng.standard_normal(shape) for k, shape in first.items()} for _ in range(3)]
    opt = getattr(pr, method)(side=side)
    _, u1, s1 = run(backend, opt, {k: {"weight": v} for k, v in w.items()}, [{k: {"weight": v} for k, v in g.items()} for g in grads])
    _, u2, s2 = run(backend, opt, out_last(w), [out_last(g) for g in grads])
    for k in first:
        for t in range(len(grads)):
            assert rel(out_last({k: u1[t][k]["weight"]})[k][names[k]], u2[t][k][names[k]]) < tolerance, (k, t)
        statistic = [backend.to_numpy(s.groups[f"{k}/{name}"]["statistic"]).shape for s, name in ((s1, "weight"), (s2, names[k]))]
        assert statistic[0] == statistic[1], (k, statistic)
    assert backend.to_numpy(s2.groups["conv/kernel"]["momentum"]).shape == (8, 3)


@pytest.mark.parametrize("method", ["asgo", "dasgo"])
def test_state_of_a_kernel_saved_with_its_other_side_names_the_side_that_continues_it(method):
    """Version 0.2.0 named ``side`` a side of a Flax ``kernel`` as stored (its ``"right"`` the
    output side), where it now names a side of the out-first layer (the test above): such a
    checkpoint holds the statistic this version makes with the other side, here made by
    ``side="left"``. Its update raises a ValueError naming the parameter and ``side='left'``, with
    which the same state steps; a state of a square layer is of the same shape either way."""
    params = {"dense": {"kernel": np.zeros((7, 5))}}
    grads = {"dense": {"kernel": np.ones((7, 5))}}
    old_state = getattr(pr, method)(side="left").init(params)
    assert old_state.groups["dense/kernel"]["statistic"].shape[0] == 5  # the output side
    with pytest.raises(ValueError, match=r"'dense/kernel' \(7, 5\)/float64 does not fit.*other side of this 7x5 matrix.*"
                                         r"for a Flax `kernel` leaf with its side read on the kernel as stored.*build the optimizer with side='left'"):
        getattr(pr, method)(side="right").update(grads, old_state, params)
    updates, _ = getattr(pr, method)(side="left").update(grads, old_state, params)
    assert updates["dense"]["kernel"].shape == (7, 5)


def test_zero_size_and_unmasked_vector_leaves(eager_backend):
    backend = eager_backend
    rng = np.random.default_rng(7)
    params = {"empty": np.zeros((0, 4)), "v": rng.standard_normal(5), "s": np.asarray(1.5)}
    grads = [{"empty": np.zeros((0, 4)), "v": rng.standard_normal(5), "s": np.asarray(0.3)}]
    opt = pr.asgo(learning_rate=1e-2, fallback_mask=lambda path, leaf: False, weight_decay=0.0)
    history, updates, state = run(backend, opt, params, grads)
    assert state.groups["empty"] == {}
    assert backend.to_numpy(state.groups["v"]["statistic"]).shape == (1, 1)
    # I7 (practical): a 1×n row with side auto is normalised EMA-momentum SGD, ‖Δw‖ = 0.2·η·sqrt(n).
    np.testing.assert_allclose(np.linalg.norm(updates[0]["v"]), 0.2 * 1e-2 * math.sqrt(5), rtol=1e-12)
    np.testing.assert_allclose(updates[0]["s"], -0.2 * 1e-2, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("factory", [pr.asgo, pr.dasgo])
@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_zero_gradient_gives_weight_decay_only(backend, factory, mode):
    """D2 (both modes): a zero gradient on the first step gives -η λ W and a finite state."""
    xp = backend.xp
    w = np.arange(15.0).reshape(3, 5) / 10
    opt = factory(learning_rate=0.1, weight_decay=0.1, mode=mode)
    history, updates, state = run(backend, opt, {"w": w}, [{"w": np.zeros((3, 5))}] * 2)
    np.testing.assert_allclose(updates[0]["w"], -0.1 * 0.1 * w, rtol=1e-6 if mode == "faithful" else 1e-14)
    for v in state.groups["w"].values():
        if xp.isdtype(v.dtype, "real floating"):
            assert bool(xp.all(xp.isfinite(v)))
    if factory is pr.asgo:
        assert int(state.groups["w"]["failures"]) == 0


@pytest.mark.parametrize("factory", [pr.asgo, pr.dasgo])
def test_gradient_that_stops_gives_bounded_then_zero_steps(eager_backend, factory):
    """D12: float32, random gradients of scale 1e-2 and then exact zeros (an
    unused layer). The momentum decays geometrically and the statistic with it; the mathematically
    renormalised step has RMS exactly r·η while the momentum is non-zero, so every step must have
    RMS <= r·η (1 + 8·eps32: the renormalisation is a few roundings per entry), and once the
    momentum has decayed below the normal range (flushed, D12) the step must be exactly zero.
    Before the fix the Frobenius norm underflowed and steps reached RMS 2e13."""
    backend = eager_backend
    rng = np.random.default_rng(0)
    w = {"w": np.zeros((16, 8), np.float32)}
    # b1 = 0.5: 1e-2 · 0.5^t leaves the float32 normal range after ~120 steps (0.9 needs ~800).
    opt = factory(learning_rate=1e-2, b1=0.5, weight_decay=0.0)
    grads = [{"w": (1e-2 * rng.standard_normal((16, 8))).astype(np.float32)} for _ in range(10)]
    grads += [{"w": np.zeros((16, 8), np.float32)}] * 140
    _, updates, _ = run(backend, opt, w, grads, with_params=False)
    bound = 0.2 * 1e-2 * (1 + 8 * np.finfo(np.float32).eps)
    rms = [float(np.sqrt(np.mean(np.square(u["w"].astype(np.float64))))) for u in updates]
    assert max(rms) <= bound, max(rms)
    assert rms[0] > 0.99 * bound
    assert rms[-1] == 0.0


@pytest.mark.parametrize("factory", [pr.asgo, pr.dasgo])
def test_tiny_gradient_is_renormalised_like_a_normal_one(backend, factory):
    """D12: the RMS renormalisation is scale-invariant in floating point too. For
    a float32 gradient of scale 1e-30 the statistic's squares underflow, so the absolute ``eps``
    dominates the preconditioner (a multiple of I) and the step is the renormalised momentum
    M = (1-μ)G: U = -η r sqrt(mn) G/‖G‖_F, up to float32 rounding of a few operations per entry
    (DASGO before the fix: RMS 1.9e9 instead of η r = 2e-3)."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((16, 8)).astype(np.float32)
    w = {"w": np.zeros((16, 8), np.float32)}
    opt = factory(learning_rate=1e-2, weight_decay=0.0)
    _, (small,), _ = run(backend, opt, w, [{"w": np.float32(1e-30) * g}], with_params=False)
    g64 = g.astype(np.float64)
    expected = -1e-2 * 0.2 * math.sqrt(16 * 8) * g64 / np.linalg.norm(g64)
    assert rel(small["w"], expected) < 16 * np.finfo(np.float32).eps


@pytest.mark.parametrize("b1", [0.0, 0.5, 0.9])
def test_step_follows_the_momentum_not_the_gradient(property_backend, b1):
    """[derived from the update rule]: U_t = (P_t + s_t I)^{-1/2} M_t with the
    momentum M_t = μ M_{t-1} + (1-μ) G_t. With G_1 = G and G_2 = 0: M_2 = μ M_1 and P_2 = β₂ P_1,
    and with relative damping (eps = 0) s_2 = β₂ s_1, so U_2 = (μ/√β₂) U_1 exactly (rms_target=None).
    A step built from the gradient would be zero at t = 2; one that ignored μ would differ."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal((3, 5))
    b2 = 0.8
    opt = pr.asgo(learning_rate=0.1, b1=b1, b2=b2, weight_decay=0.0, rms_target=None, eps=0.0, precondition_every=1)
    _, (u1, u2), _ = run(property_backend, opt, {"w": np.zeros((3, 5))}, [{"w": g}, {"w": 0 * g}])
    np.testing.assert_allclose(u2["w"], (b1 / math.sqrt(b2)) * u1["w"], rtol=1e-12, atol=1e-300)
    assert np.linalg.norm(u1["w"]) > 0


@pytest.mark.parametrize("factory", [pr.asgo, pr.dasgo])
def test_nonfinite_gradients(backend, factory):
    rng = np.random.default_rng(8)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    opt = factory()
    p = backend.tree(params)
    state = opt.init(p)
    _, state = opt.update(backend.tree(random_tree(rng, {"w": (3, 4), "b": (4,)})), state, p)
    bad = random_tree(rng, {"w": (3, 4), "b": (4,)})
    bad["w"][1, 2] = np.nan
    updates, new_state = opt.update(backend.tree(bad), state, p)
    assert all(np.all(backend.to_numpy(u) == 0) for u in updates.values())
    assert int(new_state.count) == 1 and int(new_state.nonfinite_count) == 1
    for key in state.groups:
        for name in state.groups[key]:
            np.testing.assert_array_equal(
                backend.to_numpy(new_state.groups[key][name]), backend.to_numpy(state.groups[key][name])
            )
    bad["w"][1, 2] = np.inf
    with pytest.raises(FloatingPointError, match="'w'"):
        factory(on_nonfinite="raise").update(backend.tree(bad), state, p)


_FAITHFUL_ROOTS = {"polar_express": "inverse_sqrt_polar_express", "newton_schulz": "inverse_sqrt_newton_schulz"}


@pytest.mark.parametrize("root_method", ["eigh", "polar_express", "newton_schulz", "newton"])
def test_failed_root_keeps_previous_and_counts(eager_backend, root_method, monkeypatch):
    """Rule 5 / D6: a non-finite root (of a finite statistic) keeps the previous root and
    increments ``failures``, and the step is applied; faithful mode uses the identity instead
    (the authors' fallback)."""
    asgo_module = importlib.import_module("precond_ref.methods.asgo")  # the package re-exports the factory
    backend = eager_backend
    rng = np.random.default_rng(9)
    p = backend.tree({"w": rng.standard_normal((3, 4))})
    real = asgo_module._damped_inverse_sqrt

    def broken(*args, **kwargs):
        root, rejected = real(*args, **kwargs)
        return root * float("nan"), rejected

    opt = pr.asgo(root_method=root_method, weight_decay=0.0, precondition_every=1)
    state = opt.init(p)
    _, state = opt.update(backend.tree({"w": rng.standard_normal((3, 4))}), state, p)
    monkeypatch.setattr(asgo_module, "_damped_inverse_sqrt", broken)
    updates, new_state = opt.update(backend.tree({"w": rng.standard_normal((3, 4))}), state, p)
    np.testing.assert_array_equal(
        backend.to_numpy(new_state.groups["w"]["root"]), backend.to_numpy(state.groups["w"]["root"])
    )
    assert int(new_state.groups["w"]["failures"]) == 1
    assert int(new_state.count) == 2 and int(new_state.nonfinite_count) == 0
    assert np.all(np.isfinite(backend.to_numpy(updates["w"])))
    assert np.any(backend.to_numpy(updates["w"]) != 0)

    if root_method not in _FAITHFUL_ROOTS:
        return
    real = getattr(asgo_module, _FAITHFUL_ROOTS[root_method])
    monkeypatch.setattr(asgo_module, _FAITHFUL_ROOTS[root_method], lambda *a, **k: real(*a, **k) * float("nan"))
    faithful = pr.asgo(root_method=root_method, mode="faithful", weight_decay=0.0, rms_target=None, b1=0.0)
    state = faithful.init(p)
    g = rng.standard_normal((3, 4)).astype(np.float64)
    updates, new_state = faithful.update(backend.tree({"w": g}), state, p)
    np.testing.assert_allclose(backend.to_numpy(updates["w"]), -1e-2 * g, rtol=1e-12)  # Z = I
    assert int(new_state.groups["w"]["failures"]) == 1


def _rank_one(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    return np.outer(rng.standard_normal(m), rng.standard_normal(n))


def test_rejected_root_keeps_the_previous_one_and_counts(backend):
    """D13: a block whose checked iterative root fails its convergence check keeps its previous
    root, bitwise (an element-wise selection: no eigh, no branch), and its leaf's
    ``failures`` counts it; on the first update, with no previous root, the block takes the
    damped identity ``(τ(1+δ)+ε)^{-1/2} I``, ``τ = tr(P)/k``, the root of its statistic with the
    eigenvalues replaced by their mean. One Polar-Express step (``root_steps=1``) converges on
    none of these 2×2 blocks of rank-1 gradients (its first step is made to lift small eigenvalue
    ratios: ‖ZY - I‖_F ends at 0.2 to 2 against the tolerance 0.05, so rounding cannot decide it),
    ten steps do (spec I15; 1e-14). Blocks of 2 on ``w`` (two per leaf) and one unblocked 2×2
    side on ``v``; on JAX jitted."""
    rng = np.random.default_rng(3)
    params = backend.tree({"v": rng.standard_normal((6, 2)), "w": rng.standard_normal((4, 6))})
    options = dict(root_method="polar_express", precondition_every=1, block_size=2, weight_decay=0.0)
    checked, failing = pr.asgo(**options), pr.asgo(root_steps=1, **options)
    blocks = {"v": 1, "w": 2}

    def gradients():
        return backend.tree({"v": _rank_one(rng, 6, 2), "w": _rank_one(rng, 4, 6)})

    _, accepted = updater(backend, checked)(gradients(), checked.init(params), params)
    assert all(int(accepted.groups[k]["failures"]) == 0 for k in blocks)
    updates, kept = updater(backend, failing)(gradients(), accepted, params)
    for k, count in blocks.items():
        np.testing.assert_array_equal(backend.to_numpy(kept.groups[k]["root"]), backend.to_numpy(accepted.groups[k]["root"]))
        assert int(kept.groups[k]["failures"]) == count
        assert np.all(np.isfinite(backend.to_numpy(updates[k]))) and np.any(backend.to_numpy(updates[k]) != 0)

    _, first = updater(backend, failing)(gradients(), failing.init(params), params)
    eps64 = np.finfo(np.float64).eps
    for k, count in blocks.items():
        p = backend.to_numpy(first.groups[k]["statistic"]).reshape(-1, 2, 2)
        tau = np.trace(p, axis1=-2, axis2=-1) / 2
        damped_identity = (tau * (1 + 1e-4) + 1e-30)[:, None, None] ** -0.5 * np.eye(2)
        root = backend.to_numpy(first.groups[k]["root"]).reshape(-1, 2, 2)
        np.testing.assert_allclose(root, damped_identity, rtol=16 * eps64, atol=0)
        assert int(first.groups[k]["failures"]) == count


def test_jax_checked_iterative_root_has_no_branch_and_no_eigh():
    """D13 under ``jax.jit``: the checked Polar-Express root is matmuls and selections only: the
    step's jaxpr holds no ``eigh`` anywhere and, with every block refreshed on every step (no
    refresh interval to branch on), no ``cond`` at all (a ``lax.cond`` on a GPU copies its
    predicate to the host)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    params = {"v": jnp.ones((6, 2), dtype=jnp.float32), "w": jnp.ones((4, 6), dtype=jnp.float32)}
    for every in (1, 2):
        opt = pr.asgo(root_method="polar_express", precondition_every=every, block_size=2)
        jaxpr = jax.make_jaxpr(opt.update)(params, opt.init(params), params).jaxpr
        names = _primitives(jaxpr, skip_cond=False)
        assert not any("eigh" in name for name in names)
        assert ("cond" in names) == (every > 1)


def test_nonfinite_state_never_reaches_the_parameters(eager_backend):
    """A statistic that is not finite (reachable only through a method's own numerics: gradients
    that could overflow it are skipped by build_transform) fails the root, which keeps the previous
    one and counts the failure (D6), and build_transform's element-wise guard keeps every NaN or Inf
    out of the update: the parameters never receive one."""
    backend = eager_backend
    xp = backend.xp
    rng = np.random.default_rng(9)
    p = backend.tree({"w": rng.standard_normal((3, 4))})
    opt = pr.asgo(weight_decay=0.0, precondition_every=1)
    state = opt.init(p)
    _, state = opt.update(backend.tree({"w": rng.standard_normal((3, 4))}), state, p)
    entries = dict(state.groups["w"])
    entries["statistic"] = entries["statistic"] * xp.nan
    poisoned = PrecondState(state.count, state.nonfinite_count, {"w": entries})
    updates, new_state = opt.update(backend.tree({"w": rng.standard_normal((3, 4))}), poisoned, p)
    assert np.all(np.isfinite(backend.to_numpy(updates["w"])))
    assert int(new_state.groups["w"]["failures"]) == 1
    np.testing.assert_array_equal(
        backend.to_numpy(new_state.groups["w"]["root"]), backend.to_numpy(state.groups["w"]["root"])
    )


def test_faithful_rejects_tensors_and_unsupported_options(eager_backend):
    backend = eager_backend
    w = backend.tree({"conv": np.zeros((2, 3, 2, 2))})
    for factory in (pr.asgo, pr.dasgo):
        with pytest.raises(ValueError, match="'conv' has shape \\(2, 3, 2, 2\\).*principled"):
            factory(mode="faithful").init(w)
    with pytest.raises(ValueError, match="damping.*faithful"):
        pr.asgo(mode="faithful", damping=1e-4)
    with pytest.raises(ValueError, match="block_size.*faithful"):
        pr.asgo(mode="faithful", block_size=8)
    with pytest.raises(ValueError, match="eigh.*faithful"):
        pr.asgo(mode="faithful", root_method="eigh")
    with pytest.raises(ValueError, match="side.*faithful"):
        pr.dasgo(mode="faithful", side="left")


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (pr.asgo, dict(learning_rate=-1e-3), "learning_rate"),
        (pr.asgo, dict(b1=1.0), "b1"),
        (pr.asgo, dict(b2=-0.1), "b2"),
        (pr.asgo, dict(weight_decay=-1.0), "weight_decay"),
        (pr.asgo, dict(damping=-1e-3), "damping"),
        (pr.asgo, dict(eps=-1.0), "eps"),
        (pr.asgo, dict(root_method="svd"), "root_method"),
        (pr.asgo, dict(root_steps=0), "root_steps"),
        (pr.asgo, dict(precondition_every=0), "precondition_every"),
        (pr.asgo, dict(rms_target=0.0), "rms_target"),
        (pr.asgo, dict(accumulator="max"), "accumulator"),
        (pr.asgo, dict(side="top"), "side"),
        (pr.asgo, dict(block_size=0), "block_size"),
        (pr.asgo, dict(fallback_b2=1.0), "fallback_b2"),
        (pr.asgo, dict(fallback_eps=0.0), "fallback_eps"),
        (pr.asgo, dict(mode="exact"), "mode"),
        (pr.asgo, dict(on_nonfinite="ignore"), "on_nonfinite"),
        (pr.asgo, dict(fallback_mask={"w": 1}), "fallback_mask"),
        (pr.dasgo, dict(eps=0.0), "eps"),
        (pr.dasgo, dict(b2=1.5), "b2"),
        (pr.dasgo, dict(side="diagonal"), "side"),
        (pr.dasgo, dict(rms_target=-0.2), "rms_target"),
    ],
)
def test_invalid_hyperparameters(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_mismatched_gradient_is_named(eager_backend):
    backend = eager_backend
    opt = pr.asgo()
    p = backend.tree({"w": np.zeros((3, 4))})
    state = opt.init(p)
    with pytest.raises(ValueError, match="'w'"):
        opt.update(backend.tree({"w": np.zeros((4, 3))}), state, p)


def test_damped_low_rank_polar_express_matches_eigh():
    """I15 / D1: rank-1 statistics (b1 = b2 = 0, a rank-1 gradient) in float32, damping 1e-4: the
    10-step Polar-Express direction agrees with the damped eigh direction within 2e-3 and is finite."""
    import array_api_compat.numpy as xp  # noqa: F401

    rng = np.random.default_rng(10)
    k = 256
    u, a = rng.standard_normal((k, 1)), rng.standard_normal((1, 2 * k))
    g = {"w": (u @ a).astype(np.float32)}
    p = {"w": np.zeros((k, 2 * k), np.float32)}
    out = {}
    for method in ("eigh", "polar_express"):
        opt = pr.asgo(b1=0.0, b2=0.0, weight_decay=0.0, root_method=method)
        out[method], state = opt.update(g, opt.init(p), p)
        assert np.all(np.isfinite(out[method]["w"]))
    assert rel(out["polar_express"]["w"], out["eigh"]["w"]) < 2e-3


# ------------------------------------------------------------------------------------------------
# property tests (spec §6), float64 on numpy and array_api_strict

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 5)
decays = st.sampled_from([0.0, 0.5, 0.9])
root_methods = st.sampled_from(["eigh", "polar_express", "newton_schulz"])


def ortho(rng, k):
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    return q * np.sign(np.diag(r))


def idealised(**kwargs):
    """Algorithm 1 of the paper without projection (spec §2.2): the root every step."""
    return pr.asgo(b1=0.0, accumulator="sum", rms_target=None, weight_decay=0.0, precondition_every=1, **kwargs)


def sqrt_psd(v):
    w, q = np.linalg.eigh((v + v.T) / 2)
    return (q * np.sqrt(np.maximum(w, 0.0))) @ q.T


@given(seed=seeds, m=dims, n=dims, b1=decays, b2=decays, wd=st.sampled_from([0.0, 0.1]),
       rms=st.sampled_from([None, 0.2]), acc=st.sampled_from(["ema", "sum"]), method=root_methods)
def test_I1_orthogonal_equivariance(property_backend, seed, m, n, b1, b2, wd, rms, acc, method):
    """I1 [derived]: gradients Q G_t R from Q W_0 R give iterates Q W_t R (Q, R orthogonal), since
    P -> Q P Qᵀ (left) and every root is an orthogonal similarity-equivariant matrix function;
    relative damping (eps = 0) keeps it exact."""
    rng = np.random.default_rng(seed)
    q, r = ortho(rng, m), ortho(rng, n)
    w0 = rng.standard_normal((m, n))
    grads = [rng.standard_normal((m, n)) for _ in range(3)]
    make = lambda: pr.asgo(learning_rate=0.1, b1=b1, b2=b2, weight_decay=wd, rms_target=rms,  # noqa: E731
                           accumulator=acc, root_method=method, damping=1e-3, eps=0.0)
    h, _, _ = run(property_backend, make(), {"w": w0}, [{"w": g} for g in grads])
    h2, _, _ = run(property_backend, make(), {"w": q @ w0 @ r}, [{"w": q @ g @ r} for g in grads])
    for a, b in zip(h, h2):
        assert rel(b["w"], q @ a["w"] @ r) < 1e-9


@given(seed=seeds, m=dims, n=dims, log_c=st.floats(-3, 3), b1=decays, wd=st.sampled_from([0.0, 0.1]),
       method=root_methods)
def test_I2_gradient_scale_invariance(property_backend, seed, m, n, log_c, b1, wd, method):
    """I2 [derived]: G_t -> c G_t leaves the trajectory unchanged: M scales by c, P by c², the
    relatively damped root by 1/c, and the RMS renormalisation removes any remaining scale."""
    rng = np.random.default_rng(seed)
    c = 10.0**log_c
    w0 = rng.standard_normal((m, n))
    grads = [rng.standard_normal((m, n)) for _ in range(3)]
    make = lambda: pr.asgo(learning_rate=0.1, b1=b1, weight_decay=wd, root_method=method,  # noqa: E731
                           damping=1e-3, eps=0.0)
    h, _, _ = run(property_backend, make(), {"w": w0}, [{"w": g} for g in grads])
    h2, _, _ = run(property_backend, make(), {"w": w0}, [{"w": c * g} for g in grads])
    for a, b in zip(h, h2):
        assert rel(b["w"], a["w"]) < 1e-9


@given(seed=seeds, m=dims, n=dims, b1=decays, b2=decays, wd=st.sampled_from([0.0, 0.1]))
def test_I3_first_step_is_the_polar_factor(property_backend, seed, m, n, b1, b2, wd):
    """I3 [derived]: at the first step P = (1-β₂)GGᵀ and M = (1-μ)G, so with no damping
    P^{-1/2}M ∝ (GGᵀ)^{-1/2}G = UVᵀ (thin SVD G = UΣVᵀ): a Muon step rescaled to RMS r,
    update = -η r sqrt(mn/k) UVᵀ - ηλW."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((m, n))
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    if s[-1] < 1e-2 * s[0]:
        return  # nearly rank-deficient: the undamped statement needs rank k
    w0 = rng.standard_normal((m, n))
    opt = pr.asgo(learning_rate=0.1, b1=b1, b2=b2, weight_decay=wd, damping=0.0, eps=0.0)
    _, updates, _ = run(property_backend, opt, {"w": w0}, [{"w": g}])
    k = min(m, n)
    expected = -0.1 * 0.2 * math.sqrt(m * n / k) * (u @ vt) - 0.1 * wd * w0
    assert rel(updates[0]["w"], expected) < 1e-9


@given(seed=seeds, m=dims, n=dims, steps=st.integers(1, 8), damping=st.sampled_from([1e-12, 1e-4, 1e-1]))
def test_I4_matrix_adagrad_lemma(property_backend, seed, m, n, steps, damping):
    """I4 [proven] (one-sided matrix-AdaGrad lemma, cf. Gupta, Koren, Singer 2018):
    Σ_t tr(G_tᵀ V_t^{-1/2} G_t) ≤ 2 tr(V_T^{1/2}) with V_t = Σ_{s≤t} G_s G_sᵀ, checked on the
    optimizer's own statistic and root (accumulator="sum", left side; damping only lowers the left
    side)."""
    rng = np.random.default_rng(seed)
    opt = pr.asgo(accumulator="sum", side="left", damping=damping, weight_decay=0.0, precondition_every=1)
    backend = property_backend
    p = backend.tree({"w": np.zeros((m, n))})
    state = opt.init(p)
    lhs = 0.0
    for _ in range(steps):
        g = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-3, 3)
        _, state = opt.update(backend.tree({"w": g}), state, p)
        z = backend.to_numpy(state.groups["w"]["root"])
        lhs += np.trace(g.T @ z @ g)
    v = backend.to_numpy(state.groups["w"]["statistic"])
    assert lhs <= 2.0 * np.trace(sqrt_psd(v)) * (1 + 1e-9)


@given(seed=seeds, m=dims, n=dims, steps=st.integers(1, 10), log_lr=st.floats(-2, 1))
@example(seed=4, m=1, n=4, steps=9, log_lr=0.0)  # violates the bound when the root is refreshed every 4th step only
def test_I5_regret_bound_of_idealised_asgo(property_backend, seed, m, n, steps, log_lr):
    """I5 [derived] (telescoping in the V_t^{1/2} norm, tr(XᵀAX) ≤ ‖X‖²_op tr(A), then I4):
    idealised ASGO on online convex losses f_t(W) = ½‖A_t W - B_t‖² satisfies
    Σ_t ⟨G_t, W_t - W*⟩ ≤ (D²/(2η) + η) tr(V_T^{1/2}), D = max_t ‖W_t - W*‖_op, for every W*;
    checked for the least-squares minimiser of Σ_t f_t (the tightest of those tried), W_0 and a
    random W*."""
    rng = np.random.default_rng(seed)
    eta = 10.0**log_lr
    w0 = rng.standard_normal((m, n))
    problems = [(rng.standard_normal((m + 1, m)), rng.standard_normal((m + 1, n))) for _ in range(steps)]
    iterates, grads = [w0], []

    def gradient_at(t):
        def g(params):
            a, b = problems[t]
            grads.append(a.T @ (a @ params["w"] - b))
            return {"w": grads[-1]}

        return g

    opt = idealised(learning_rate=eta, side="left", damping=1e-14, eps=0.0)
    history, _, _ = run(property_backend, opt, {"w": w0}, [gradient_at(t) for t in range(steps)])
    iterates += [h["w"] for h in history[:-1]]
    v = sum(g @ g.T for g in grads)
    a_all = np.concatenate([a for a, _ in problems])
    b_all = np.concatenate([b for _, b in problems])
    for w_star in (np.linalg.lstsq(a_all, b_all, rcond=None)[0], w0, rng.standard_normal((m, n))):
        regret = sum(np.sum(g * (w - w_star)) for g, w in zip(grads, iterates))
        d = max(np.linalg.norm(w - w_star, ord=2) for w in iterates)
        bound = (d**2 / (2 * eta) + eta) * np.trace(sqrt_psd(v))
        assert regret <= bound * (1 + 1e-6) + 1e-12


@given(seed=seeds, m=dims, n=dims, b1=decays, b2=decays, rms=st.sampled_from([None, 0.2]),
       wd=st.sampled_from([0.0, 0.1]), method=root_methods)
def test_I6_transpose_consistency(property_backend, seed, m, n, b1, b2, rms, wd, method):
    """I6 [derived]: ASGO with side="left" on Wᵀ (gradients G_tᵀ) is the transpose of ASGO with
    side="right" on W: both keep P = EMA(GᵀG) and step along (Z Mᵀ)ᵀ = M Z."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((m, n))
    grads = [rng.standard_normal((m, n)) for _ in range(3)]
    kw = dict(learning_rate=0.1, b1=b1, b2=b2, rms_target=rms, weight_decay=wd, root_method=method)
    h, _, _ = run(property_backend, pr.asgo(side="right", **kw), {"w": w0}, [{"w": g} for g in grads])
    h2, _, _ = run(property_backend, pr.asgo(side="left", **kw), {"w": w0.T}, [{"w": g.T} for g in grads])
    for a, b in zip(h, h2):
        assert rel(b["w"].T, a["w"]) < 1e-9


@given(seed=seeds, n=st.integers(1, 6), steps=st.integers(1, 5))
def test_I7_vector_reductions(property_backend, seed, n, steps):
    """I7 [derived]: idealised ASGO on a row (m = 1, left) is AdaGrad-Norm,
    Δw_t = -η g_t / sqrt(Σ_{s≤t} ‖g_s‖²); on a column (n = 1) with side="left" it is full-matrix
    AdaGrad, Δx_t = -η (Σ_{s≤t} g_s g_sᵀ + s_t I)^{-1/2} g_t with the same relative damping s_t;
    practical ASGO on a 1×n row (side auto, λ = 0) has ‖Δw‖₂ = 0.2 η sqrt(n)."""
    rng = np.random.default_rng(seed)
    gs = [rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 2) for _ in range(steps)]
    # AdaGrad-Norm on an unmasked 1-D leaf (a 1×n row)
    opt = idealised(learning_rate=0.3, side="left", damping=1e-14, eps=0.0, fallback_mask=lambda p, x: False)
    _, updates, _ = run(property_backend, opt, {"w": np.zeros(n)}, [{"w": g} for g in gs])
    total = 0.0
    for g, u in zip(gs, updates):
        total += g @ g
        assert rel(u["w"], -0.3 * g / math.sqrt(total)) < 1e-9
    # full-matrix AdaGrad on a column
    damping = 1e-6
    opt = idealised(learning_rate=0.3, side="left", damping=damping, eps=0.0)
    _, updates, _ = run(property_backend, opt, {"x": np.zeros((n, 1))}, [{"x": g[:, None]} for g in gs])
    h = np.zeros((n, n))
    for g, u in zip(gs, updates):
        h = h + np.outer(g, g)
        w, q = np.linalg.eigh(h)
        shift = damping * np.trace(h) / n
        expected = -0.3 * (q * (np.maximum(w, 0) + shift) ** -0.5) @ q.T @ g
        assert rel(u["x"][:, 0], expected) < 1e-9
    # practical ASGO on a row
    opt = pr.asgo(learning_rate=0.3, weight_decay=0.0, b1=0.5, precondition_every=1)
    _, updates, _ = run(property_backend, opt, {"w": np.zeros((1, n))}, [{"w": g[None, :]} for g in gs])
    for u in updates:
        assert abs(np.linalg.norm(u["w"]) - 0.3 * 0.2 * math.sqrt(n)) < 1e-12


@given(seed=seeds, m=st.integers(2, 5), n=dims, steps=st.integers(1, 5))
def test_I8_shared_left_singular_vector(property_backend, seed, m, n, steps):
    """I8 [derived]: if G_t = u a_tᵀ with a fixed unit u, then V_t = (Σ‖a_s‖²) u uᵀ and idealised
    left ASGO steps by -η u a_tᵀ / sqrt(Σ_{s≤t} ‖a_s‖²)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(m)
    u /= np.linalg.norm(u)
    a_s = [rng.standard_normal(n) for _ in range(steps)]
    opt = idealised(learning_rate=0.2, side="left", damping=1e-12, eps=0.0)
    _, updates, _ = run(property_backend, opt, {"w": np.zeros((m, n))}, [{"w": np.outer(u, a)} for a in a_s])
    total = 0.0
    for a, upd in zip(a_s, updates):
        total += a @ a
        assert rel(upd["w"], -0.2 * np.outer(u, a) / math.sqrt(total)) < 1e-7


@given(seed=seeds, n=dims, steps=st.integers(1, 5), side=st.sampled_from(["left", "right"]))
def test_I9_diagonal_gradients_give_diagonal_adagrad(property_backend, seed, n, steps, side):
    """I9 [derived]: diagonal G_t make V_t diagonal, so idealised ASGO is diagonal AdaGrad on the
    diagonal entries: Δw_ii = -η g_ii / sqrt(Σ_s g_ii,s²)."""
    rng = np.random.default_rng(seed)
    ds = [rng.uniform(0.1, 2.0, n) * rng.choice([-1.0, 1.0], n) for _ in range(steps)]
    opt = idealised(learning_rate=0.2, side=side, damping=1e-14, eps=0.0)
    _, updates, _ = run(property_backend, opt, {"w": np.zeros((n, n))}, [{"w": np.diag(d)} for d in ds])
    total = np.zeros(n)
    for d, upd in zip(ds, updates):
        total += d * d
        assert rel(upd["w"], np.diag(-0.2 * d / np.sqrt(total))) < 1e-9


@given(seed=seeds, m=dims, n=dims, rms=st.floats(0.01, 2.0), wd=st.sampled_from([0.0, 0.1]),
       config=st.sampled_from(["eigh", "polar_express", "newton_schulz", "blocked", "faithful", "dasgo",
                               "dasgo-faithful"]))
def test_I10_update_rms(property_backend, seed, m, n, rms, wd, config):
    """I10 [derived]: with U ≠ 0, ‖updates + ηλW‖_F = η r sqrt(mn) (the RMS renormalisation of step 6)."""
    rng = np.random.default_rng(seed)
    eta = 0.1
    kw = dict(learning_rate=eta, rms_target=rms, weight_decay=wd)
    if config in ("eigh", "polar_express", "newton_schulz"):
        opt = pr.asgo(root_method=config, **kw)
    elif config == "blocked":
        opt = pr.asgo(block_size=2, **kw)
    elif config == "faithful":
        opt = pr.asgo(mode="faithful", **kw)
    elif config == "dasgo":
        opt = pr.dasgo(side="auto", **kw)
    else:
        opt = pr.dasgo(mode="faithful", **kw)
    w0 = rng.standard_normal((m, n))
    history, updates, _ = run(property_backend, opt, {"w": w0}, [{"w": rng.standard_normal((m, n))} for _ in range(3)])
    params = [w0] + [h["w"] for h in history]
    tol = 1e-6 if "faithful" in config else 1e-12
    for w, u in zip(params, updates):
        assert abs(np.linalg.norm(u["w"] + eta * wd * w) / (eta * rms * math.sqrt(m * n)) - 1) < tol


@given(seed=seeds, m=dims, n=dims, b1=decays, b2=decays, wd=st.sampled_from([0.0, 0.1]))
def test_I11_dasgo_column_scaling_and_left_rotation(property_backend, seed, m, n, b1, b2, wd):
    """I11 [derived]: with eps = 0 (here 1e-300), DASGO's U_ij = M_ij / sqrt(v_j) is unchanged by
    G_t -> G_t diag(d) (d > 0), and G_t -> Q G_t, W_0 -> Q W_0 (Q orthogonal) gives Q W_t:
    column sums of squares are invariant under left rotations."""
    rng = np.random.default_rng(seed)
    d = 10.0 ** rng.uniform(-2, 2, n)
    q = ortho(rng, m)
    w0 = rng.standard_normal((m, n))
    grads = [rng.standard_normal((m, n)) for _ in range(3)]
    make = lambda: pr.dasgo(learning_rate=0.1, b1=b1, b2=b2, weight_decay=wd, eps=1e-300)  # noqa: E731
    h, _, _ = run(property_backend, make(), {"w": w0}, [{"w": g} for g in grads])
    h2, _, _ = run(property_backend, make(), {"w": w0}, [{"w": g * d} for g in grads])
    h3, _, _ = run(property_backend, make(), {"w": q @ w0}, [{"w": q @ g} for g in grads])
    for a, b, c in zip(h, h2, h3):
        assert rel(b["w"], a["w"]) < 1e-9
        assert rel(c["w"], q @ a["w"]) < 1e-9


@given(seed=seeds, n=dims, extra=st.integers(0, 3), b1=decays, b2=decays, rms=st.sampled_from([None, 0.2]))
def test_I12_dasgo_is_asgo_on_orthogonal_columns(property_backend, seed, n, extra, b1, b2, rms):
    """I12 [derived]: if every G_t has mutually orthogonal columns, GᵀG and hence P are diagonal,
    so ASGO (right side, damping 0, absolute eps ε) steps by M diag(v + ε)^{-1/2}: DASGO."""
    rng = np.random.default_rng(seed)
    m = n + extra
    eps = 1e-8
    grads = [ortho(rng, m)[:, :n] * rng.uniform(0.1, 3.0, n) for _ in range(4)]
    w0 = rng.standard_normal((m, n))
    kw = dict(learning_rate=0.1, b1=b1, b2=b2, rms_target=rms, eps=eps)
    h, _, _ = run(property_backend, pr.asgo(side="right", damping=0.0, precondition_every=1, **kw), {"w": w0}, [{"w": g} for g in grads])
    h2, _, _ = run(property_backend, pr.dasgo(side="right", **kw), {"w": w0}, [{"w": g} for g in grads])
    for a, b in zip(h, h2):
        assert rel(b["w"], a["w"]) < 1e-9


@given(seed=seeds, sizes=st.lists(st.integers(1, 3), min_size=2, max_size=3), extra=st.integers(0, 2),
       b2=decays)
def test_I13_blocking_is_exact_when_it_does_nothing(property_backend, seed, sizes, extra, b2):
    """I13 [derived]: block_size ≥ k reproduces the unblocked method; with block_size = b < k and
    row chunks in mutually orthogonal subspaces (G_i G_jᵀ = 0), P is block diagonal, so the blocked
    root (damping 0, absolute eps) equals the unblocked one."""
    rng = np.random.default_rng(seed)
    b = max(sizes)
    # k rows in chunks of b (the last may be shorter); chunk c lives in its own columns of Q.
    k = b * (len(sizes) - 1) + sizes[-1]
    chunk_sizes = [b] * (len(sizes) - 1) + [sizes[-1]]
    n = k + extra
    kw = dict(learning_rate=0.1, b2=b2, damping=0.0, eps=1e-8, side="left", precondition_every=1)

    def gradient():
        q = ortho(rng, n)
        rows, start = [], 0
        for size in chunk_sizes:
            rows.append(rng.standard_normal((size, size)) @ q[:, start : start + size].T)
            start += size
        return np.concatenate(rows, axis=0)

    grads = [gradient() for _ in range(3)]
    w0 = rng.standard_normal((k, n))
    h, _, _ = run(property_backend, pr.asgo(**kw), {"w": w0}, [{"w": g} for g in grads])
    h_big, _, _ = run(property_backend, pr.asgo(block_size=k, **kw), {"w": w0}, [{"w": g} for g in grads])
    h_blocked, _, s = run(property_backend, pr.asgo(block_size=b, **kw), {"w": w0}, [{"w": g} for g in grads])
    if b < k:
        assert "statistic_tail" in s.groups["w"] or k % b == 0
    for a, c, d in zip(h, h_big, h_blocked):
        np.testing.assert_array_equal(c["w"], a["w"])
        assert rel(d["w"], a["w"]) < 1e-9


def _primitives(jaxpr, skip_cond):
    """Primitive names in ``jaxpr`` and its sub-jaxprs (jit, custom calls), optionally not
    descending into ``cond`` branches."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if skip_cond and eqn.primitive.name == "cond":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner, skip_cond)
    return names


def test_jax_root_runs_inside_cond_only():
    """Under jit the root (eigh) is traced only inside the lax.cond of the refresh interval, so
    steps between refreshes never compute it (spec §2.4 step 3, README rule 10)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    opt = pr.asgo(precondition_every=4)
    params = {"w": jnp.ones((3, 5), dtype=jnp.float32)}
    state = opt.init(params)
    jaxpr = jax.make_jaxpr(opt.update)(params, state, params).jaxpr
    outside = _primitives(jaxpr, skip_cond=True)
    everywhere = _primitives(jaxpr, skip_cond=False)
    assert "cond" in outside
    assert not any("eigh" in name for name in outside)
    assert any("eigh" in name for name in everywhere)


def _column_factored(backend, mat, scale, axis, target):
    """``linalg.column_factored_renormalise`` on ``backend``; on JAX under ``jax.jit`` (its ``lax.cond``)."""
    from precond_ref.linalg import column_factored_renormalise

    def run(m, s):
        return column_factored_renormalise(backend.xp, m, s, axis, target)

    if backend.name == "jax":
        import jax

        run = jax.jit(run)
    return backend.to_numpy(run(backend.asarray(mat), backend.asarray(scale)))


# The plain sums of squares overflow by design at M ~ 1e14, s ~ 1e4 (that is how the branch is
# chosen); NumPy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
    "log_m, log_s, plain",
    [(0, 0, True), (-10, 3, True), (10, -3, True), (-30, -10, False), (14, 4, False), (-37, 0, False), (0, -20, False)],
)
def test_column_factored_renormalise_is_the_renormalised_product(backend, axis, log_m, log_s, plain):
    """D12 without float64 [closed form]: ``linalg.column_factored_renormalise`` returns
    U · target/‖U‖_F for U = M diag(s) (axis 0) or diag(s) M (axis 1), in float32, by its plain
    column sums of squares where they are exact to rounding (``plain``: the docstring's bound on
    what underflow can lose holds and nothing overflows) and else by its column maxima, at scales
    where forming U or its squares in float32 would underflow (M ~ 1e-30, s ~ 1e-10: U ~ 1e-40) or
    overflow (M ~ 1e14, s ~ 1e4: squares ~ 1e36 each). Reference: the same formula in float64 from
    the same float32 inputs. Error model: a sum of N positive float32 terms is within (N-1)·eps of
    its value, the column sums have m or n terms and the total the other count, and each entry
    takes a handful of further roundings; (m + n + 8)·eps bounds the error of every entry relative
    to the largest (near-subnormal entries have no relative bound). A zero column stays exactly
    zero. On JAX under jit, where only the branch taken runs."""

    rng = np.random.default_rng(7)
    m, n = 24, 10
    mat = (10.0**log_m * rng.standard_normal((m, n))).astype(np.float32)
    mat[np.abs(mat) < np.finfo(np.float32).smallest_normal] = 0.0  # flushed by DASGO (D12) and by XLA
    k = n if axis == 0 else m
    scale = (10.0**log_s * rng.uniform(0.1, 10.0, k)).astype(np.float32)
    if axis == 0:
        mat[:, 3] = 0.0
    else:
        mat[5, :] = 0.0
    target = 0.2 * math.sqrt(m * n)
    result = _column_factored(backend, mat, scale, axis, target)
    u64 = mat.astype(np.float64) * np.expand_dims(scale.astype(np.float64), axis)
    info = np.finfo(np.float32)
    lost = (m * n * np.max(scale.astype(np.float64)) ** 2 + k) * info.smallest_normal * 2.0**10 / info.eps
    total = float(np.sum(u64**2))
    assert (lost <= total < float(info.max)) == plain  # the case takes the branch it names
    expected = u64 * (target / np.linalg.norm(u64))
    eps = np.finfo(np.float32).eps
    assert result.dtype == np.float32
    bound = (m + n + 8) * eps
    np.testing.assert_allclose(result, expected, rtol=bound, atol=bound * np.max(np.abs(expected)))
    zero_line = result[:, 3] if axis == 0 else result[5, :]
    assert np.all(zero_line == 0.0)


@pytest.mark.parametrize("log_g", [0, -30])
def test_dasgo_jitted_without_x64_matches_the_float64_renormalisation(log_g):
    """D12 on JAX as most users run it [derived]: without x64, the jitted step of float32
    parameters renormalises in float32 (``linalg.column_factored_renormalise``, its plain column sums
    for gradients of order 1 and its column maxima for gradients of 1e-30, whose squares underflow);
    with x64, in float64. The state updates are the same float32 operations, so the updates of
    three steps agree to the renormalisation's (m + n + 8)·eps of the largest entry (see
    test_column_factored_renormalise_is_the_renormalised_product), with 8 eps more for the
    roundings in which the two compiled programs may differ (a fused multiply-add)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    m, n = 24, 10
    param = rng.standard_normal((m, n)).astype(np.float32)
    grads = [(10.0**log_g * rng.standard_normal((m, n))).astype(np.float32) for _ in range(3)]
    opt = pr.dasgo(learning_rate=1e-2, weight_decay=0.0)

    def run(x64):
        with jax.enable_x64(x64):
            step = jax.jit(opt.update)
            p = {"w": jnp.asarray(param, jnp.float32)}
            state, updates = opt.init(p), []
            for g in grads:
                u, state = step({"w": jnp.asarray(g, jnp.float32)}, state, p)
                updates.append(np.asarray(u["w"]))
        return updates

    eps = np.finfo(np.float32).eps
    for got, expected in zip(run(False), run(True)):
        assert got.dtype == np.float32
        assert np.all(np.isfinite(expected)) and np.max(np.abs(expected)) > 0
        np.testing.assert_allclose(got, expected, rtol=0, atol=(m + n + 16) * eps * np.max(np.abs(expected)))


def test_column_factored_renormalise_keeps_zero_zero(backend):
    """D2 [closed form]: a zero momentum gives an exactly zero direction (no 0/0)."""
    mat, scale = np.zeros((6, 4), np.float32), np.ones(4, np.float32)
    result = _column_factored(backend, mat, scale, 0, 1.0)
    assert np.all(result == 0.0)



@pytest.mark.parametrize("options", [dict(), dict(side="auto", weight_decay=0.0), dict(mode="faithful", fallback_mask=lambda p, x: x.ndim != 2)],
                         ids=["principled", "auto-side", "faithful"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dasgo_stacked_matrices_step_as_each_alone(eager_backend, options, dtype, monkeypatch):
    """DASGO's equal matrices stacked (``engine.matrices.matrix_joins``, a GPU's grouping: every
    equal shape stacks) give each leaf the numbers of its step alone, bit for bit: every line of
    the rule is element-wise or a reduction within one matrix (``sum_across``, the per-matrix
    renormalisation of ``linalg``, spec asgo.md §2.7, D12), and stacking is execution only
    (docs/engine.md). Matrices of row counts above and below ``sum_across``'s two blocks, both
    sides, a NaN step (skipped), float64 (the column-factored renormalisation) and float32 (its
    float64 form). Bit for bit on a CPU backend, whose reductions run in one order whatever the
    stack; a GPU reduction kernel (CuPy) splits a sum by the whole array's shape, so there each
    value may differ by the reordering of its sums: at most the longest reduction's length (40)
    times u per step, over the 5 steps, relative to the array's largest value."""
    from precond_ref.benchmarks.counting import gpu_grouping
    from precond_ref.engine import matrices

    shapes = {"a": (40, 7), "b": (40, 7), "c": (7, 40), "d": (7, 40), "e": (6, 5), "f": (6, 5), "v": (7,)}
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) * 10.0 ** (t - 2) for k, s in shapes.items()} for t in range(5)]
    grads[3]["c"][1, 1] = np.nan

    def run():
        opt = pr.dasgo(learning_rate=1e-2, **options)
        params = eager_backend.tree(start)
        state = opt.init(params)
        for g in grads:
            updates, state = opt.update(eager_backend.tree(g), state, params)
            params = {k: params[k] + updates[k] for k in params}
        return eager_backend.numpy_tree(params), {k: eager_backend.numpy_tree(v) for k, v in state.groups.items()}

    with gpu_grouping():
        stacked = run()
    monkeypatch.setattr(matrices, "plain", lambda: True)  # each stack its own join ...
    monkeypatch.setattr(matrices.blocking, "large_on_cpu", lambda *args: True)  # ... and every leaf its own stack
    alone = run()
    def same(got, expected, what):
        if eager_backend.name != "cupy" or not np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_array_equal(got, expected, err_msg=what)
            return
        bound = len(grads) * 40 * np.finfo(expected.dtype).eps * np.max(np.abs(expected), initial=0.0)
        np.testing.assert_allclose(got, expected, rtol=0, atol=bound, err_msg=what)

    for k in shapes:
        same(stacked[0][k], alone[0][k], k)
        for entry in stacked[1][k]:
            same(stacked[1][k][entry], alone[1][k][entry], f"{k}/{entry}")
