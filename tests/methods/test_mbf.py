"""MBF core (``precond_ref.mbf``): both modes against a loop-level oracle, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.testing.loops import LoopMBF
from precond_ref.transform import weight_bias_groups


def _model(rng, dtype="float64"):
    """A small network: FC with bias, FC without bias, conv 3x3 with bias, conv1d, norm, scalar."""
    p = {
        "fc": {"weight": rng.standard_normal((4, 6)), "bias": rng.standard_normal(4)},
        "head": {"weight": rng.standard_normal((3, 4))},
        "conv": {"weight": rng.standard_normal((3, 2, 3, 3)), "bias": rng.standard_normal(3)},
        "conv1d": {"weight": rng.standard_normal((2, 3, 2))},
        "norm": {"scale": rng.standard_normal(5), "shift": rng.standard_normal(5)},
        "temp": {"value": np.asarray(rng.standard_normal())},
    }
    # Sorted keys: jax.jit returns dicts in sorted key order, and the core compares tree order.
    return {k: {n: np.asarray(p[k][n], dtype=dtype) for n in sorted(p[k])} for k in sorted(p)}


def _grads(rng, params, scale=1.0):
    return {k: {n: scale * rng.standard_normal(v.shape).astype(v.dtype) for n, v in d.items()} for k, d in params.items()}


def _update_fn(backend, opt):
    """JAX runs the update under jit: eager lax.cond compiles every branch on every new shape."""
    if backend.name == "jax":
        import jax

        jitted = jax.jit(opt.update)

        def update(*args):
            out = jitted(*args)
            _COMPILATIONS.append(jitted._cache_size())
            return out

        return update
    return opt.update


_COMPILATIONS: list[int] = []


def _run_core(backend, params, grad_seq, **kw):
    # The loop reference and closed forms are the unclipped update (KL clipping, B7, is tested alone),
    # with every inverse refreshed at once unless a test asks for spread refreshes.
    opt = pr.mbf(**{"kl_clip": 0.0, "refresh_phases": 1, **kw})
    update = _update_fn(backend, opt)
    p = backend.tree(params)
    if backend.name == "jax":
        import jax

        p = jax.device_put(p, jax.devices()[0])  # committed like apply_updates results: one compilation
    state = opt.init(p)
    for g in grad_seq:
        updates, state = update(backend.tree(g), state, p)
        p = pr.apply_updates(p, updates)
    return backend.numpy_tree(p), state


def _close(a, b, rtol, atol=0.0):
    for k in a:
        for n in a[k]:
            np.testing.assert_allclose(a[k][n], b[k][n], rtol=rtol, atol=atol, err_msg=f"{k}/{n}")


CASES = {
    "principled": dict(),
    "faithful": dict(mode="faithful"),
    "principled_chunks": dict(fc_blocks="official_chunks"),
    "gradient_second_moment": dict(diagonal_second_moment="gradient"),
}


def _run_loop(params, grad_seq, **kw):
    """The loop oracle (:class:`precond_ref.testing.loops.LoopMBF`) with the settings of :func:`_run_core`."""
    ref = LoopMBF(params, **{"kl_clip": 0.0, "refresh_phases": 1, **kw})
    p = params
    for g in grad_seq:
        p = pr.apply_updates(p, ref.step(g, p))
    return p


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_matches_loop_reference(case):
    rng = np.random.default_rng(0)
    params = _model(rng)
    grads = [_grads(rng, params) for _ in range(7)]
    hyper = dict(learning_rate=3e-3, damping=0.05, momentum=0.8, b2=0.7, weight_decay=0.1,
                 statistics_every=2, precondition_every=3, diagonal_b2=0.99, diagonal_eps=1e-6)
    ours, _ = _run_core(_backend("numpy"), params, grads, **hyper, **CASES[case])
    _close(ours, _run_loop(params, grads, **hyper, **CASES[case]), rtol=1e-11, atol=1e-13)


def test_max_block_dim_uses_block_size_one_limit():
    rng = np.random.default_rng(1)
    params = {"fc": {"weight": rng.standard_normal((5, 3)), "bias": rng.standard_normal(5)},
              "small": {"weight": rng.standard_normal((2, 3))}}
    grads = [_grads(rng, params) for _ in range(4)]
    ours, state = _run_core(_backend("numpy"), params, grads, learning_rate=1e-2, damping=0.1,
                            statistics_every=1, precondition_every=2, max_block_dim=4)
    assert state.groups["fc/weight"]["statistic"].shape == (5, 4)  # [W | b], element-wise
    assert state.groups["small/weight"]["statistic"].shape == (2, 2)
    p = _run_loop(params, grads, learning_rate=1e-2, damping=0.1, statistics_every=1, precondition_every=2,
                  max_block_dim=4)
    _close(ours, p, rtol=1e-12, atol=1e-14)


def test_equal_size_blocks_of_different_layers_share_one_inverse_call(monkeypatch):
    """Batched blocks: on an inverse step, the blocks of every layer with the same
    block size go through one batched call (FC layers with the same output size, convs with the same
    kernel size), and each layer gets what it gets alone; a precision event (a layer whose damping
    had to be raised) is not a failure: its result is used, no layer counts one."""
    import importlib

    mbf_module = importlib.import_module("precond_ref.methods.mbf")
    calls = []
    original = mbf_module.damped_inverse_stable

    def spy(matrices, *args, **kwargs):
        calls.append(tuple(matrices.shape))
        return original(matrices, *args, **kwargs)

    monkeypatch.setattr(mbf_module, "damped_inverse_stable", spy)
    rng = np.random.default_rng(13)
    params = {"a": {"weight": rng.standard_normal((4, 6)), "bias": rng.standard_normal(4)},
              "b": {"weight": rng.standard_normal((4, 3))},
              "c": {"weight": rng.standard_normal((3, 2, 3, 3))},
              "d": {"weight": rng.standard_normal((2, 2, 3, 3))}}
    grads = [_grads(rng, params) for _ in range(3)]
    grads[-1]["d"]["weight"] *= 1e9  # ‖F‖/λ beyond 1/ε64 for layer d only
    hyper = dict(learning_rate=1e-2, damping=1e-3, statistics_every=1, precondition_every=1)
    together, state = _run_core(_backend("numpy"), params, grads, **hyper)
    assert sorted(calls) == [(2, 4, 4)] * 3 + [(10, 9, 9)] * 3  # two FC layers; 3·2 + 2·2 conv blocks
    for name in params:
        alone, alone_state = _run_core(_backend("numpy"), {name: params[name]}, [{name: g[name]} for g in grads], **hyper)
        _close({name: together[name]}, alone, rtol=1e-12, atol=1e-14)
        assert int(state.groups[f"{name}/weight"]["failures"]) == int(alone_state.groups[f"{name}/weight"]["failures"])
    assert [int(state.groups[f"{n}/weight"]["failures"]) for n in "abcd"] == [0, 0, 0, 0]


def _backend(name):
    from backends import BACKENDS

    return next(b for b in BACKENDS if b.name == name)


@pytest.mark.parametrize("mode, dtype", [("principled", "float64"), ("faithful", "float64"), ("principled", "float32")])
def test_backends_agree_with_numpy_and_keep_dtype(backend, dtype, mode):
    rng = np.random.default_rng(2)
    params = _model(rng, dtype)
    grads = [_grads(rng, params) for _ in range(4)]
    hyper = dict(learning_rate=1e-2, damping=0.1, statistics_every=1, precondition_every=2,
                 weight_decay=0.01, mode=mode)
    ours, state = _run_core(backend, params, grads, **hyper)
    expected, _ = _run_core(_backend("numpy"), params, grads, **hyper)
    if backend.name == "jax":
        assert _COMPILATIONS[-1] == 1  # jit compiled the update once for all steps
    rtol = 1e-10 if dtype == "float64" else 2e-4
    for k in ours:
        for n in ours[k]:
            assert ours[k][n].dtype == np.dtype(dtype), (k, n)
    _close(ours, expected, rtol=rtol, atol=rtol)
    for key, entries in state.groups.items():
        for name, value in entries.items():
            expected_dtype = "int32" if name == "failures" else dtype
            assert backend.to_numpy(value).dtype == np.dtype(expected_dtype), (key, name)


def test_bf16_params_keep_float32_state():
    torch = pytest.importorskip("torch")
    params = {"fc": {"weight": torch.randn(3, 4, dtype=torch.bfloat16), "bias": torch.zeros(3, dtype=torch.bfloat16)},
              "conv": {"weight": torch.randn(2, 2, 3, 3, dtype=torch.bfloat16)},
              "norm": {"scale": torch.ones(3, dtype=torch.bfloat16)}}
    opt = pr.mbf(learning_rate=1e-2)
    state = opt.init(params)
    grads = {k: {n: torch.randn_like(v) for n, v in d.items()} for k, d in params.items()}
    updates, state = opt.update(grads, state, params)
    for entries in state.groups.values():
        for name, value in entries.items():
            assert value.dtype == (torch.int32 if name == "failures" else torch.float32)
    for d in updates.values():
        for u in d.values():
            assert u.dtype == torch.bfloat16 and bool(torch.isfinite(u).all())


# ---------------------------------------------------------------------------------------------
# Pairing, layouts and shapes


def test_weight_bias_pairing_rules():
    w, b, k = np.zeros((3, 4)), np.zeros(3), np.zeros((4, 3))
    paths = [("a", "bias"), ("a", "weight"), ("b", "kernel"), ("b", "bias"), ("c", "weight"), ("c", "bias"),
             ("d", "weight"), ("d", "bias")]
    leaves = [b, w, k, b, np.zeros((2, 3, 3, 3)), np.zeros(2), w, np.zeros(4)]
    groups = weight_bias_groups(paths, leaves)
    as_sets = {g.key: g.indices for g in groups}
    # bias listed before its weight still pairs; kernel (in, out) pairs by its last axis.
    assert as_sets["a/weight"] == (1, 0)
    assert as_sets["b/kernel"] == (2, 3)
    # conv biases and mismatched lengths stay alone.
    assert as_sets["c/weight"] == (4,) and as_sets["c/bias"] == (5,)
    assert as_sets["d/weight"] == (6,) and as_sets["d/bias"] == (7,)
    assert [g.key for g in groups] == ["a/weight", "b/kernel", "c/weight", "c/bias", "d/weight", "d/bias"]


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_out_last_kernels_equal_transposed_out_first(backend, mode):
    """Flax layouts (kernel (I, O), conv (kh, kw, I, O)) give the transposed torch-layout result."""
    if backend.name == "jax" and mode == "principled":
        pytest.skip("one JAX compilation suffices (faithful covers the chunked FC layout)")
    rng = np.random.default_rng(3)
    first = {"conv": {"weight": rng.standard_normal((3, 2, 3, 2))},
             "fc": {"bias": rng.standard_normal(4), "weight": rng.standard_normal((4, 5))}}
    to_last = {"fc": lambda w: w.T, "conv": lambda w: np.transpose(w, (2, 3, 1, 0))}
    last = {"conv": {"kernel": to_last["conv"](first["conv"]["weight"])},
            "fc": {"bias": first["fc"]["bias"], "kernel": first["fc"]["weight"].T}}
    grads_first = [_grads(rng, first) for _ in range(3)]
    grads_last = [{"conv": {"kernel": to_last["conv"](g["conv"]["weight"])},
                   "fc": {"bias": g["fc"]["bias"], "kernel": g["fc"]["weight"].T}} for g in grads_first]
    hyper = dict(learning_rate=1e-2, damping=0.1, statistics_every=1, precondition_every=1, mode=mode)
    a, _ = _run_core(backend, first, grads_first, **hyper)
    b, state = _run_core(backend, last, grads_last, **hyper)
    assert set(state.groups) == {"fc/kernel", "conv/kernel"}
    np.testing.assert_allclose(b["fc"]["kernel"], a["fc"]["weight"].T, rtol=1e-12)
    np.testing.assert_allclose(b["fc"]["bias"], a["fc"]["bias"], rtol=1e-12)
    np.testing.assert_allclose(b["conv"]["kernel"], to_last["conv"](a["conv"]["weight"]), rtol=1e-12)


def test_state_shapes_per_kind():
    params = {"fc": {"weight": np.zeros((4, 6)), "bias": np.zeros(4)}, "conv": {"weight": np.zeros((3, 2, 3, 3))},
              "c3d": {"weight": np.zeros((2, 2, 2, 2, 2))}, "pw": {"weight": np.zeros((5, 4, 1, 1))},
              "norm": {"scale": np.zeros(5)}, "empty": {"weight": np.zeros((0, 3))}}
    state = pr.mbf(learning_rate=0.1).init(params)
    g = state.groups
    assert g["fc/weight"]["momentum"].shape == (4, 7) and g["fc/weight"]["inverse"].shape == (4, 4)
    assert g["conv/weight"]["statistic"].shape == (3, 2, 9, 9)
    np.testing.assert_array_equal(g["pw/weight"]["inverse"], np.full((5, 4, 1), 1e3))
    assert g["c3d/weight"]["statistic"].shape == (2, 2, 8, 8)
    assert g["pw/weight"]["statistic"].shape == (5, 4, 1)  # q = 1: element-wise
    assert set(g["norm/scale"]) == {"ema", "second_moment"}
    assert g["empty/weight"] == {}
    np.testing.assert_array_equal(g["conv/weight"]["inverse"][1, 0], np.eye(9) / 1e-3)


# ---------------------------------------------------------------------------------------------
# Schedule (M-I10), validation, bad input


def test_inverse_schedule_matches_mbngd_if_inverse():
    """M-I10: statistics at multiples of T1; inverses at {0, T1, 2T1, ... <= T2} U multiples of T2."""
    rng = np.random.default_rng(5)
    params = {"fc": {"weight": rng.standard_normal((3, 3))}}
    t1, t2 = 3, 7
    opt = pr.mbf(learning_rate=1e-3, statistics_every=t1, precondition_every=t2, refresh_phases=1)
    state = opt.init(params)
    stat_steps, inv_steps = [], []
    for i in range(30):
        # Mark the stored inverse with zeros (finite: a non-finite state would skip the step); a
        # step that reuses it keeps the mark, a refresh never returns the zero matrix.
        entries = dict(state.groups["fc/weight"], inverse=np.zeros((3, 3)))
        state = state._replace(groups={"fc/weight": entries})
        _, state = opt.update(_grads(rng, params), state, params)
        new = state.groups["fc/weight"]
        if not np.array_equal(entries["statistic"], new["statistic"]):
            stat_steps.append(i)
        if np.any(new["inverse"] != 0.0):
            inv_steps.append(i)
    assert stat_steps == [i for i in range(30) if i % t1 == 0]
    assert inv_steps == [i for i in range(30) if (i <= t2 and i % t1 == 0) or i % t2 == 0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=1.0, damping=0.0), "damping"),
        (dict(learning_rate=1.0, damping=-1.0), "damping"),
        (dict(learning_rate=1.0, momentum=1.0), "momentum"),
        (dict(learning_rate=1.0, b2=-0.1), "b2"),
        (dict(learning_rate=1.0, weight_decay=-1.0), "weight_decay"),
        (dict(learning_rate=1.0, statistics_every=0), "statistics_every"),
        (dict(learning_rate=1.0, precondition_every=2.5), "precondition_every"),
        (dict(learning_rate=1.0, fc_blocks="rows"), "fc_blocks"),
        (dict(learning_rate=1.0, diagonal_b2=1.0), "diagonal_b2"),
        (dict(learning_rate=1.0, diagonal_eps=0.0), "diagonal_eps"),
        (dict(learning_rate=1.0, diagonal_second_moment="both"), "diagonal_second_moment"),
        (dict(learning_rate=1.0, max_block_dim=0), "max_block_dim"),
        (dict(learning_rate=1.0, mode="exact"), "mode"),
        (dict(learning_rate=1.0, on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        pr.mbf(**kwargs)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_nonfinite_gradient_is_skipped_without_touching_state(backend, bad):
    if backend.name == "jax":
        pytest.skip("JAX: covered under jit by the adapter contract suite (test_nonfinite_gradient_is_skipped_under_jit)")
    rng = np.random.default_rng(6)
    params = backend.tree(_model(rng))
    opt = pr.mbf(learning_rate=1e-2, statistics_every=1, precondition_every=1)
    update = _update_fn(backend, opt)
    state = opt.init(params)
    _, state = update(backend.tree(_grads(rng, _model(rng))), state, params)
    g = _grads(rng, _model(rng))
    g["conv"]["weight"][0, 0, 1, 1] = bad
    updates, new_state = update(backend.tree(g), state, params)
    for d in backend.numpy_tree(updates).values():
        for u in d.values():
            assert np.all(u == 0)
    assert int(backend.to_numpy(new_state.count)) == 1 and int(backend.to_numpy(new_state.nonfinite_count)) == 1
    for key, entries in new_state.groups.items():
        for name, value in entries.items():
            np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(state.groups[key][name]))


def test_nonfinite_gradient_raise_names_leaf():
    rng = np.random.default_rng(7)
    params = _model(rng)
    opt = pr.mbf(learning_rate=1e-2, on_nonfinite="raise")
    state = opt.init(params)
    g = _grads(rng, params)
    g["fc"]["bias"][1] = np.nan
    with pytest.raises(FloatingPointError, match="fc/bias"):
        opt.update(g, state, params)


def test_overflowing_statistic_is_rejected_and_counted():
    """A finite float32 gradient whose square overflows must not put Inf into F, F_inv or the
    parameters: the block rejects the statistic (S6) and, since the step itself (F_inv g with
    g ~ 3e38) overflows, build_transform skips the whole step and counts it (rule 6)."""
    params = {"fc": {"weight": np.zeros((2, 2), dtype=np.float32)}, "conv": {"weight": np.zeros((1, 1, 2, 2), dtype=np.float32)}}
    opt = pr.mbf(learning_rate=1e-3, statistics_every=1, precondition_every=1)
    state = opt.init(params)
    big = {"fc": {"weight": np.full((2, 2), 3e38, dtype=np.float32)}, "conv": {"weight": np.full((1, 1, 2, 2), 3e38, dtype=np.float32)}}
    with np.errstate(over="ignore", invalid="ignore"):
        updates, new_state = opt.update(big, state, params)
    assert int(new_state.nonfinite_count) == 1 and int(new_state.count) == 0
    for key in ("fc/weight", "conv/weight"):
        entries = new_state.groups[key]
        assert np.all(np.isfinite(entries["statistic"])) and np.all(np.isfinite(entries["inverse"]))
        np.testing.assert_array_equal(entries["statistic"], state.groups[key]["statistic"])
    assert all(np.all(u == 0) for leaf in updates.values() for u in leaf.values())


@pytest.mark.parametrize("spike", [1e1, 1e4, 1e8])
def test_large_conv_statistic_against_float64(backend, spike):
    """B6: a conv gradient spike makes (1-ρ)‖g_b‖²/λ ≈ 0.1·9·spike²/1e-3 exceed
    1/ε32 (spike 1e4, 1e8) or even 1/ε64 (spike 1e8). Before the fix float32 LU gave steps 365-514x
    the float64 ones with no failure counted, JAX non-finite ones, and float64 raised LinAlgError.

    Invariants [derived; linalg.damped_inverse_stable]: the step is finite and never longer than the
    float64 one (beyond rounding: where the damping is below the float32 precision floor of the
    statistic it is raised to 100·ε‖F‖_F, which only shortens the step); while the statistic is
    resolved (spike 1e1: κ(F + λI) ≈ 1e4, floor ≈ 1e-4 < λ) it matches float64 to 1e-2 (about κ·ε32);
    a raised damping is not counted in ``failures`` (its result is used)."""
    rng = np.random.default_rng(5)
    shape = (4, 3, 3, 3)
    grads = [rng.standard_normal(shape) for _ in range(3)] + [spike * rng.standard_normal(shape)]
    out = {}
    for dtype in ("float32", "float64"):
        params = {"conv": {"weight": np.zeros(shape, dtype=dtype)}}
        opt = pr.mbf(learning_rate=1e-3, damping=1e-3, statistics_every=1, precondition_every=1)
        update = _update_fn(backend, opt)
        p = backend.tree(params)
        state = opt.init(p)
        for g in grads:
            updates, state = update(backend.tree({"conv": {"weight": g.astype(dtype)}}), state, p)
        out[dtype] = backend.to_numpy(updates["conv"]["weight"]).astype(np.float64)
        out[dtype + "_failures"] = int(backend.to_numpy(state.groups["conv/weight"]["failures"]))
    u32, u64 = out["float32"], out["float64"]
    assert np.all(np.isfinite(u32)) and np.all(np.isfinite(u64))
    assert np.linalg.norm(u32) <= 1.01 * np.linalg.norm(u64)
    if spike == 1e1:
        assert np.linalg.norm(u32 - u64) / np.linalg.norm(u64) < 1e-2
    assert out["float32_failures"] == out["float64_failures"] == 0


def test_zero_gradients_give_finite_state_and_decay_only_updates(backend):
    if backend.name == "jax":
        pytest.skip("JAX: same arithmetic as the other backends; its compilation is covered above")
    rng = np.random.default_rng(8)
    params = _model(rng)
    zeros = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    opt = pr.mbf(learning_rate=0.1, weight_decay=0.5, statistics_every=1, precondition_every=1)
    update = _update_fn(backend, opt)
    p = backend.tree(params)
    state = opt.init(p)
    for _ in range(3):
        updates, state = update(backend.tree(zeros), state, p)
    upd = backend.numpy_tree(updates)
    for k in params:
        for n in params[k]:
            np.testing.assert_allclose(upd[k][n], -0.1 * 0.5 * params[k][n], rtol=1e-12)
    for entries in state.groups.values():
        for value in entries.values():
            assert np.all(np.isfinite(backend.to_numpy(value)))


def test_update_requires_params_with_weight_decay():
    params = {"w": np.ones((2, 2))}
    opt = pr.mbf(learning_rate=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params))


def test_schedule_learning_rate():
    rng = np.random.default_rng(9)
    params = _model(rng)
    grads = [_grads(rng, params) for _ in range(3)]
    lrs = [0.1, 0.05, 0.02]
    a, _ = _run_core(_backend("numpy"), params, grads, learning_rate=lambda c: np.asarray(lrs)[c],
                     statistics_every=1, precondition_every=1)
    p = _run_loop(params, grads, learning_rate=lambda c: lrs[c], statistics_every=1, precondition_every=1)
    _close(a, p, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Warm start (M-I12)


@pytest.mark.parametrize("mode", ["principled", "faithful"])
def test_warm_start_is_the_mean_of_block_statistics(backend, mode):
    """M-I12: after warm_start with J trees, F is the mean of their statistics (spec 2.5)."""
    if backend.name == "jax":
        pytest.skip("JAX: tests/adapters/test_mbf_adapters.py::test_jax_warm_start_helper")
    rng = np.random.default_rng(10)
    params = _model(rng)
    batches = [_grads(rng, params) for _ in range(4)]
    opt = pr.mbf(learning_rate=1e-2, mode=mode)
    state = opt.init(backend.tree(params))
    warm = opt.warm_start(state, [backend.tree(g) for g in batches])
    # Oracle: a reference with b2 = 0 holds exactly stat(g) after one statistics step.
    means = {}
    for g in batches:
        ref = LoopMBF(params, b2=0.0, statistics_every=1, precondition_every=1, mode=mode)
        ref.step(g, params)
        for key, st in ref.state.items():  # keyed by the group's key, the path of its weight
            if st["kind"] in ("fc", "conv"):  # an unblocked FC layer is one block of the oracle's list
                means.setdefault(key, []).append(st["F"][0] if st["kind"] == "fc" else st["F"])
    for key, stats in means.items():
        np.testing.assert_allclose(backend.to_numpy(warm.groups[key]["statistic"]), np.mean(stats, axis=0),
                                   rtol=1e-12, atol=1e-14)
        # inverse and momentum untouched
        np.testing.assert_array_equal(backend.to_numpy(warm.groups[key]["inverse"]),
                                      backend.to_numpy(state.groups[key]["inverse"]))
    # order independence (up to rounding)
    rev = opt.warm_start(state, [backend.tree(g) for g in batches[::-1]])
    for key in warm.groups:
        if "statistic" in warm.groups[key]:
            np.testing.assert_allclose(backend.to_numpy(rev.groups[key]["statistic"]),
                                       backend.to_numpy(warm.groups[key]["statistic"]), rtol=1e-12, atol=1e-14)
    for key in ("norm/scale", "temp/value"):
        for name, value in warm.groups[key].items():
            np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(state.groups[key][name]))


def test_warm_start_skips_nonfinite_batches_and_rejects_empty():
    rng = np.random.default_rng(11)
    params = {"fc": {"weight": rng.standard_normal((3, 2)), "bias": rng.standard_normal(3)}}
    opt = pr.mbf(learning_rate=1e-2)
    state = opt.init(params)
    good = _grads(rng, params)
    bad = _grads(rng, params)
    bad["fc"]["bias"][0] = np.inf
    only_good = opt.warm_start(state, [good])
    mixed = opt.warm_start(state, [bad, good, bad])
    np.testing.assert_array_equal(mixed.groups["fc/weight"]["statistic"], only_good.groups["fc/weight"]["statistic"])
    all_bad = opt.warm_start(state, [bad])
    np.testing.assert_array_equal(all_bad.groups["fc/weight"]["statistic"], state.groups["fc/weight"]["statistic"])
    with pytest.raises(ValueError, match="empty"):
        opt.warm_start(state, [])
    with pytest.raises(ValueError, match=r"the gradient of 'other/weight' \(2, 2\) is not a block of the optimizer state"):
        opt.warm_start(state, [{"other": {"weight": np.ones((2, 2))}}])


def test_warm_start_feeds_the_first_step():
    """The first update's EMA starts from the warm-started F: F_0 = rho*F_warm + (1-rho)*stat(g_0)."""
    rng = np.random.default_rng(12)
    params = {"fc": {"weight": rng.standard_normal((3, 2)), "bias": rng.standard_normal(3)}}
    opt = pr.mbf(learning_rate=1e-2, b2=0.6)
    warm_g, g0 = _grads(rng, params), _grads(rng, params)
    state = opt.warm_start(opt.init(params), [warm_g])
    _, state = opt.update(g0, state, params)
    h = lambda g: np.concatenate([g["fc"]["weight"], g["fc"]["bias"][:, None]], 1)
    stat = lambda g: h(g) @ h(g).T / 3
    np.testing.assert_allclose(state.groups["fc/weight"]["statistic"], 0.6 * stat(warm_g) + 0.4 * stat(g0), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# Faithful mode against the authors' code (M-I13), through golden numbers their code produced.


def test_faithful_matches_authors_golden_trajectory(backend):
    """M-I13 [checked]: faithful mode reproduces the authors' ``mbngd_update`` + ``update_parameter``
    (achrafba96/mbf b0ace6e) in float64: directions and parameters of tests/data/mbf_faithful_golden.json.

    Rounding model: perturbing every gradient entry by one float64 ulp per step moves these
    parameters by 7e-16 relative (measured); another CPU's summation order is a few such ulps per
    reduction, far inside 1e-13 (params) and 1e-12 of the largest direction entry."""
    import json
    import pathlib

    if backend.name == "jax":
        pytest.skip("the JAX path is covered against NumPy above; this test is about the arithmetic")
    golden = json.loads((pathlib.Path(__file__).parent.parent / "data" / "mbf_faithful_golden.json").read_text())
    as_np = lambda tree: {k: {n: np.asarray(v, dtype=np.float64) for n, v in d.items()} for k, d in tree.items()}  # noqa: E731
    h = golden["hyperparameters"]
    opt = pr.mbf(mode="faithful", **h)
    direction_opt = pr.mbf(mode="faithful", **dict(h, learning_rate=1.0, weight_decay=0.0))
    p = backend.tree(as_np(golden["init"]))
    state, dir_state = opt.init(p), direction_opt.init(p)
    for i, g in enumerate(golden["grads"]):
        g = backend.tree(as_np(g))
        updates, state = opt.update(g, state, p)
        neg_direction, dir_state = direction_opt.update(g, dir_state, p)
        p = pr.apply_updates(p, updates)
        ours_p, ours_d = backend.numpy_tree(p), backend.numpy_tree(neg_direction)
        theirs_p, theirs_d = as_np(golden["params"][i]), as_np(golden["directions"][i])
        for k in theirs_p:
            for n in theirs_p[k]:
                scale = np.abs(theirs_d[k][n]).max()
                np.testing.assert_allclose(ours_d[k][n], theirs_d[k][n], rtol=0, atol=1e-12 * scale, err_msg=f"step {i} {k}/{n}")
                np.testing.assert_allclose(ours_p[k][n], theirs_p[k][n], rtol=1e-13, atol=1e-14, err_msg=f"step {i} {k}/{n}")


def test_torch_partner_without_gradient_is_unchanged_and_rejoins_the_pair_count():
    """What the MBF adapter's docstring says. A bias without a gradient takes
    part in its weight's block step with a zero gradient, is left unchanged and its "step" is not
    advanced; at the next step where both have gradients it takes the pair's count again."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters.torch import MBF

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = MBF(layer.named_parameters(), lr=1e-2)
    steps = []
    for t in range(3):
        opt.zero_grad(set_to_none=True)
        layer(torch.randn(5, 3)).pow(2).sum().backward()
        if t == 1:
            layer.bias.grad = None
        before = layer.bias.detach().clone()
        opt.step()
        assert torch.equal(before, layer.bias) == (t == 1)
        steps.append((int(opt.state[layer.weight]["step"]), int(opt.state[layer.bias]["step"])))
    assert steps == [(1, 1), (2, 1), (3, 3)]


@pytest.mark.parametrize("factory, extra", [(pr.mbf, {}), (pr.if_shampoo, {"batch_size": 8})], ids=["mbf", "if_shampoo"])
@pytest.mark.parametrize("kl_clip", [0.0, 1e-3])
def test_a_kl_clip_given_as_an_array_is_the_number(factory, extra, kl_clip):
    """``kl_clip`` as a 0-D array (what ``optax.inject_hyperparams`` passes) gives the steps of the
    same number: 0 is no clip (the factories' docstrings: "0 turns it off"), not a clip to zero.
    The array may be 0 only at run time, so the clip is applied where it is positive; it used to
    make every step zero, with no error."""
    rng = np.random.default_rng(0)
    params = _model(rng)
    grads = [_grads(rng, params) for _ in range(3)]
    runs = []
    for value in (kl_clip, np.asarray(kl_clip)):
        opt = factory(learning_rate=0.1, kl_clip=value, **({"refresh_phases": 1} if factory is pr.mbf else {}))
        state, steps = opt.init(params), []
        for g in grads:
            u, state = opt.update(g, state, params, **extra)
            steps.append(u)
        runs.append(steps)
    for plain, array in zip(*runs):
        for a, b in zip(pr.tree.tree_leaves(plain), pr.tree.tree_leaves(array)):
            np.testing.assert_array_equal(a, b)
    assert any(np.abs(leaf).max() > 0 for leaf in pr.tree.tree_leaves(runs[1][-1]))
