"""IF-Shampoo's ``factor_rounding``: bf16 factors computed in float32 and stored by stochastic
rounding (precond_ref.engine.rounding), so that factor steps below bf16's spacing are kept on average."""

import numpy as np
import pytest

import precond_ref as pr

torch = pytest.importorskip("torch")


def _factor_after_one_refresh(rounding: str, factor_dtype, n: int = 4096):
    """The diagonal factor of an ``n``-vector after one refresh from K = 1 (float32 gradient), as
    float64, and its stored dtype."""
    rng = np.random.default_rng(0)
    g = torch.from_numpy((rng.uniform(0.1, 0.5, size=n) * rng.choice([-1, 1], size=n)).astype(np.float32))
    opt = pr.if_shampoo(batch_size=1, structures="diagonal", preconditioner_lr=0.1, factor_dtype=factor_dtype,
                        factor_rounding=rounding)
    state = opt.init({"v": torch.zeros(n, dtype=torch.float32)})
    _, state = opt.update({"v": g}, state)
    K = state.groups["v"]["stacks/0/factor/0"][0]
    return K.double().numpy(), K.dtype


def test_stochastic_rounding_keeps_a_factor_step_below_bf16_spacing_on_average():
    """round_stochastic's E[stored] = computed (engine/rounding.py) through the factor step (spec
    root_free.md §2.3): one refresh moves each entry of a diagonal factor up from 1 by about 1.6e-3,
    below half of bf16's spacing 2^-7 over 1. Stored by stochastic rounding the mean over 4096
    entries of (bf16 - float32) is within 5 standard deviations (each entry's rounding error at
    most one spacing, sd <= spacing/2) of zero; rounded to nearest every such step is lost (the
    check fails)."""
    want, dtype = _factor_after_one_refresh("nearest", torch.float32)
    assert dtype == torch.float32 and np.all(want > 1) and np.all(want - 1 < 2.0**-8)  # below half a spacing
    got, dtype = _factor_after_one_refresh("stochastic", torch.bfloat16)
    assert dtype == torch.bfloat16
    bound = 5 * 2.0**-7 / 2 / np.sqrt(want.size)
    assert abs(np.mean(got - want)) <= bound
    assert np.all(np.abs(got - want) <= 2.0**-7)  # one of the two neighbours
    lost, _ = _factor_after_one_refresh("nearest", torch.bfloat16)
    assert abs(np.mean(lost - want)) > bound


def test_stochastic_rounding_without_a_narrower_factor_dtype_changes_nothing():
    """With float32 factors of float32 parameters nothing is narrower than the compute dtype: the
    option reads and stores nothing differently, and the steps are bitwise those of ``"nearest"``."""
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(9, 70)).astype(np.float32), "b": rng.normal(size=9).astype(np.float32)}
    runs = []
    for rounding in ("nearest", "stochastic"):
        opt = pr.if_shampoo(batch_size=4, factor_rounding=rounding, precondition_every=1, factor_dtype=torch.float32)
        p = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
        state = opt.init(p)
        for step in range(3):
            grads = {k: torch.from_numpy(np.random.default_rng(step).normal(size=v.shape).astype(np.float32))
                     for k, v in params.items()}
            updates, state = opt.update(grads, state)
            p = pr.apply_updates(p, updates)
        runs.append(p)
    for k in params:
        assert torch.equal(runs[0][k], runs[1][k])


def test_bf16_stochastic_steps_are_reproducible_and_keep_their_dtypes():
    """The rounding bits are a hash of (step, element, array): two runs from one state give bitwise
    the same factors and parameters; the factors and momenta stay bf16, the momentum float32; under
    ``jax.jit`` (optax adapter) the step runs with a traced count and keeps the state's dtypes."""
    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(70, 9)).astype(np.float32), "b": rng.normal(size=70).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    kw = dict(batch_size=4, factor_dtype=torch.bfloat16, factor_rounding="stochastic", precondition_every=1)
    runs = []
    for _ in range(2):
        opt = pr.if_shampoo(**kw)
        p = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
        state = opt.init(p)
        for g in grads:
            updates, state = opt.update({k: torch.from_numpy(v) for k, v in g.items()}, state)
            p = pr.apply_updates(p, updates)
        runs.append((p, state))
    for k in params:
        assert torch.equal(runs[0][0][k], runs[1][0][k])
    for (k, a), b in zip(runs[0][1].groups["w"].items(), runs[1][1].groups["w"].values()):
        assert a.dtype == (torch.bfloat16 if "factor" in k else a.dtype) and torch.equal(a, b)
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from precond_ref.adapters import jax as pjax

    opt = pjax.if_shampoo(**{**kw, "factor_dtype": jnp.bfloat16})
    state = opt.init({k: jnp.asarray(v) for k, v in params.items()})
    step = jax.jit(opt.update)
    dtypes = jax.tree_util.tree_map(lambda a: a.dtype, state)
    for g in grads:
        _, state = step({k: jnp.asarray(v) for k, v in g.items()}, state)
    assert jax.tree_util.tree_map(lambda a: a.dtype, state) == dtypes
    assert all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in jax.tree_util.tree_leaves(state))


def test_bad_factor_rounding_is_refused_and_float16_factors_round_to_nearest():
    """An unknown rounding is refused when the transform is made (core and torch class, naming the
    option); float16 factors, which are no truncation of float32's bits, keep the rounding to
    nearest under ``"stochastic"``: bitwise the steps of ``"nearest"``."""
    with pytest.raises(ValueError, match="factor_rounding"):
        pr.if_shampoo(batch_size=1, factor_rounding="up")
    from precond_ref.adapters.torch import IFShampoo

    with pytest.raises(ValueError, match="factor_rounding"):
        IFShampoo([torch.nn.Parameter(torch.zeros(3))], batch_size=1, factor_rounding="sometimes")
    g = {"layer": {"w": torch.linspace(-1, 1, 6).reshape(3, 2)}}
    states = []
    for rounding in ("nearest", "stochastic"):
        opt = pr.if_shampoo(batch_size=1, factor_dtype=torch.float16, factor_rounding=rounding)
        _, state = opt.update(g, opt.init({"layer": {"w": torch.zeros(3, 2)}}))
        states.append(state.groups["layer/w"])
    assert states[0]["stacks/0/factor/0"].dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))


def test_torch_checkpoint_with_float32_factors_loads_into_bf16_factors():
    """A torch checkpoint of the former CPU defaults (float32 factors; saved before
    ``factor_rounding`` existed, so its groups lack it) loads into today's ``IFShampoo``: by torch's
    ``load_state_dict`` rule each state tensor takes the dtype the optimizer's state has, here the
    factors bf16 (each the float32 value rounded to nearest bf16); the saved ``structures="dense"``
    is the group's hyperparameter, so the bias keeps its dense factor; the next step is finite."""
    from precond_ref.adapters.torch import IFShampoo

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def step(opt):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    old = IFShampoo(model.parameters(), lr=0.1, batch_size=8, structures="dense", factor_rounding="nearest",
                    precondition_every=1)
    for _ in range(3):
        step(old)
    saved = old.state_dict()
    assert saved["state"][0]["stacks/0/factor/0"].dtype == torch.float32
    for group in saved["param_groups"]:
        del group["factor_rounding"]
    new = IFShampoo(model.parameters(), lr=0.1, batch_size=8, precondition_every=1)
    new.load_state_dict(saved)
    for i, p in enumerate(model.parameters()):
        for key, value in new.state[p].items():
            if "/factor/" in key:
                assert value.dtype == torch.bfloat16, key
                assert torch.equal(value, saved["state"][i][key].to(torch.bfloat16)), key
    assert new.state[model.bias]["stacks/0/factor/0"].shape == (1, 3, 3)
    step(new)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert new.state[model.weight]["stacks/0/factor/0"].dtype == torch.bfloat16


def test_decay_reads_the_parameters_in_the_preconditioned_directions_dtype():
    """``U = D + κW`` is computed in D's dtype (float32 factors, rounded to nearest, of float64
    parameters): parameters that differ only below float32's resolution (a relative 2^-40 of values
    that float32 holds exactly) give the same update, bit for bit; W read in float64 would not."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 5)).astype(np.float32).astype(np.float64)
    G = rng.standard_normal((6, 5))
    updates = []
    for params in (W, W * (1 + 2.0**-40)):
        opt = pr.if_shampoo(batch_size=2, factor_dtype=np.float32, factor_rounding="nearest", weight_decay=0.1)
        state = opt.init({"w": params})
        update, _ = opt.update({"w": G}, state, {"w": params})
        updates.append(np.asarray(update["w"]))
    assert not np.array_equal(W, W * (1 + 2.0**-40))
    np.testing.assert_array_equal(updates[0], updates[1])
