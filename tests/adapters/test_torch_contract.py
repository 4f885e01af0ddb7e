"""Contract of every ``torch.optim.Optimizer`` adapter, in the spirit of torch's OptimizerInfo tests.

Each test runs on every entry of ``cases.TORCH_CASES``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import precond_ref as pr
from cases import TORCH_CASES

pytestmark = pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    return model.to(dtype)


def _data(dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ w) * 0.5
    return x.to(dtype), y.to(dtype)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _train(model, opt, case, steps, x, y, closure=False):
    losses = []
    for _ in range(steps):
        if closure:

            def fn():
                opt.zero_grad()
                loss = _loss(model, x, y)
                loss.backward()
                return loss

            losses.append(float(opt.step(fn, **case.step_kwargs).detach()))
        else:
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            opt.step(**case.step_kwargs)
            losses.append(float(loss.detach()))
    return losses


def _flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def test_converges_on_regression(case):
    """The loss of a small tanh-regression falls by a factor of 3 within 100 steps, and finite data
    never makes a non-finite update (no step is skipped). The slowest case, rf_adamw, is there at
    step 64; most are by step 25."""
    model = _model()
    x, y = _data()
    opt = case.make(model.named_parameters())
    losses = _train(model, opt, case, 100, x, y)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 3, losses[:: len(losses) // 5]
    assert all(int(entries["nonfinite_count"]) == 0 for entries in opt.state.values())


def test_state_dict_round_trip_continues_bit_exactly(case):
    """Save after 7 steps, load into a fresh optimizer and model, continue: identical to not stopping."""
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 7, x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, case, 5, x, y)

    resumed = _model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = case.make(resumed.named_parameters())
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, case, 5, x, y)
    assert torch.equal(_flat(model), _flat(resumed))


def test_param_groups_equal_separate_optimizers(case):
    """Two param groups with different learning rates = two optimizers, one per group."""
    x, y = _data()
    model = _model()
    first, second = list(model.named_parameters())[:2], list(model.named_parameters())[2:]
    opt = case.cls(
        [{"params": first, "lr": case.lr}, {"params": second, "lr": case.lr / 3}],
        **case.kwargs,
    )
    _train(model, opt, case, 6, x, y)

    model2 = _model()
    named = list(model2.named_parameters())
    opt_a = case.make(named[:2])
    opt_b = case.make(named[2:], lr=case.lr / 3)
    for _ in range(6):
        opt_a.zero_grad()
        opt_b.zero_grad()
        _loss(model2, x, y).backward()
        opt_a.step(**case.step_kwargs)
        opt_b.step(**case.step_kwargs)
    assert torch.equal(_flat(model), _flat(model2))


def test_lr_scheduler_takes_effect(case):
    """A LambdaLR halving the rate gives the trajectory of an optimizer built with half the rate."""
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    for _ in range(6):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step(**case.step_kwargs)
        sched.step()
    model2 = _model()
    _train(model2, case.make(model2.named_parameters(), lr=case.lr * 0.5), case, 6, x, y)
    assert torch.equal(_flat(model), _flat(model2))
    assert opt.param_groups[0]["lr"] == case.lr * 0.5


def test_hyperparameter_written_between_steps_takes_effect(case):
    """``weight_decay`` written into the param group after three steps: the next three continue as
    an optimizer loaded from the first one's checkpoint with the new value would (the adapter
    reuses a group's core transform only while the group holds the same hyperparameters)."""
    if "-" in case.id:
        pytest.skip("the group's transform cache is the class's: checked on its plain configuration")
    x, y = _data()
    model, twin = _model(), _model()
    opt = case.make(model.named_parameters(), weight_decay=0.0)
    _train(model, opt, case, 3, x, y)
    checkpoint = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["weight_decay"] = 0.1
    _train(model, opt, case, 3, x, y)
    _train(twin, case.make(twin.named_parameters(), weight_decay=0.0), case, 3, x, y)
    rebuilt = case.make(twin.named_parameters(), weight_decay=0.0)
    checkpoint["param_groups"][0]["weight_decay"] = 0.1
    rebuilt.load_state_dict(checkpoint)
    _train(twin, rebuilt, case, 3, x, y)
    assert torch.equal(_flat(model), _flat(twin))
    undecayed = _model()
    _train(undecayed, case.make(undecayed.named_parameters(), weight_decay=0.0), case, 6, x, y)
    assert not torch.equal(_flat(model), _flat(undecayed))


def test_closure_returns_loss_and_matches_plain_step(case):
    x, y = _data()
    model, model2 = _model(), _model()
    with_closure = _train(model, case.make(model.named_parameters()), case, 4, x, y, closure=True)
    plain = _train(model2, case.make(model2.named_parameters()), case, 4, x, y)
    assert with_closure == plain
    assert torch.equal(_flat(model), _flat(model2))


def test_zero_grad_none_leaves_parameters_alone(case):
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 2, x, y)
    before = _flat(model).clone()
    opt.zero_grad(set_to_none=True)
    opt.step(**case.step_kwargs)
    assert torch.equal(before, _flat(model))


def test_missing_gradient_keeps_that_parameters_own_counter(case):
    """A parameter without a gradient is not stepped and its counter does not advance."""
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 2, x, y)
    last_bias = list(model.parameters())[-1]
    before = last_bias.detach().clone()
    opt.zero_grad()
    _loss(model, x, y).backward()
    last_bias.grad = None
    opt.step(**case.step_kwargs)
    assert torch.equal(before, last_bias.detach())
    assert int(opt.state[last_bias]["step"]) == 2
    assert int(opt.state[list(model.parameters())[0]]["step"]) == 3


def test_nonfinite_gradient_skips_step_without_poisoning_state(case):
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 3, x, y)
    params_before = _flat(model).clone()
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    _loss(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step(**case.step_kwargs)
    assert torch.equal(params_before, _flat(model))
    for pid, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            if key == "nonfinite_count":
                assert int(value) == int(state_before[pid][key]) + 1
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, state_before[pid][key]), key


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite_gradient_in_one_param_group_stops_the_whole_step(case, mode):
    """The non-finite rule decides for the step, not per param group (docs/engine.md: one test of
    the whole gradient tree, as the optax adapter's one tree and torch's GradScaler, which skips
    the step): a NaN in the second group's gradient leaves every parameter where it was, counted
    as a skipped step by every parameter (``"skip"``), or raises naming the parameter in torch's
    words before any parameter moves (``"raise"``). Each group used to decide alone: the first
    group stepped on the bad batch, and a raise came after it had moved."""
    x, y = _data()
    model = _model()
    named = list(model.named_parameters())
    opt = case.make([{"params": named[:2]}, {"params": named[2:]}], on_nonfinite=mode)
    _train(model, opt, case, 2, x, y)
    params_before = _flat(model).clone()
    counts = [int(opt.state[p]["nonfinite_count"]) for _, p in named]
    opt.zero_grad()
    _loss(model, x, y).backward()
    named[2][1].grad[0, 0] = float("nan")
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=rf"^{case.cls.__name__}: non-finite gradient in parameter '2.weight'$"):
            opt.step(**case.step_kwargs)
    else:
        opt.step(**case.step_kwargs)
    assert torch.equal(params_before, _flat(model))
    assert [int(opt.state[p]["nonfinite_count"]) for _, p in named] == [c + (mode == "skip") for c in counts]
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step(**case.step_kwargs)  # the next finite step moves every group
    assert all(not torch.equal(a, b) for a, b in zip(params_before.split([p.numel() for _, p in named]), [p.detach().reshape(-1) for _, p in named]))


def test_bf16_parameters_keep_dtype_and_make_progress(case):
    """bf16 parameters stay bf16 and finite, the loss falls within 30 steps, and principled state is
    float32 (but IF-Shampoo's factors and factor momenta: bf16, S1)."""
    x, y = _data(torch.bfloat16)
    model = _model(torch.bfloat16)
    opt = case.make(model.named_parameters())
    losses = _train(model, opt, case, 30, x, y)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert np.isfinite(losses).all()
    assert min(losses[-5:]) < losses[0]
    if case.state_float32_for_bf16 and case.kwargs.get("mode", "principled") == "principled":
        for entries in opt.state.values():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    factor = case.cls.__name__ == "IFShampoo" and "/factor" in key
                    assert value.dtype == (torch.bfloat16 if factor else torch.float32), key


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_bf16_param_group_beside_a_float32_one_steps_as_each_alone(case, mode):
    """Param groups of different dtypes (a bf16 layer beside a float32 one, as in a model kept
    partly in bf16) step together: the step's one non-finite decision over every group's
    gradients (several groups) tests each gradient in its compute dtype, as one group's update
    does, so finite gradients give every group the parameters it gets stepped alone, bit for bit;
    a NaN in the bf16 group's gradient skips the whole step (``"skip"``) or raises naming the
    parameter in torch's words (``"raise"``) before any parameter moves."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16)]
    alone = [copy.deepcopy(layer) for layer in layers]
    opt = case.make([{"params": list(layer.named_parameters(prefix=str(i)))} for i, layer in enumerate(layers)],
                    on_nonfinite=mode)
    solo = [case.make(list(layer.named_parameters(prefix=str(i))), on_nonfinite=mode) for i, layer in enumerate(alone)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for layer, copied in zip(layers, alone):
            for p, q in zip(layer.parameters(), copied.parameters()):
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                q.grad = p.grad.clone()
        opt.step(**case.step_kwargs)
        for single in solo:
            single.step(**case.step_kwargs)
    for layer, copied in zip(layers, alone):
        for p, q in zip(layer.parameters(), copied.parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q)
    before = [p.detach().clone() for layer in layers for p in layer.parameters()]
    layers[1].weight.grad[0, 0] = float("nan")
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=rf"^{case.cls.__name__}: non-finite gradient in parameter '1.weight'$"):
            opt.step(**case.step_kwargs)
    else:
        opt.step(**case.step_kwargs)
    assert all(torch.equal(p, b) for p, b in zip([p for layer in layers for p in layer.parameters()], before))


def test_adapter_matches_core(case):
    """The adapter is a thin front-end: its float64 steps equal the core's on the same tensors.

    (Across backends faithful modes differ at the ulp level: float32 powers are not correctly
    rounded everywhere; the core's backend tests bound that separately.)
    """
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    core = type(opt).core_factory(**opt.core_kwargs(opt.param_groups[0]))
    params = {n.replace(".", "/"): p.detach().clone() for n, p in model.named_parameters()}
    tree = _nest(params)
    state = core.init(tree)
    for _ in range(4):
        opt.zero_grad()
        _loss(model, x, y).backward()
        grads = _nest({n.replace(".", "/"): p.grad.clone() for n, p in model.named_parameters()})
        opt.step(**case.step_kwargs)
        updates, state = core.update(grads, state, tree, **case.step_kwargs)
        tree = pr.apply_updates(tree, updates)
    for name, p in model.named_parameters():
        a, b = name.split(".")
        torch.testing.assert_close(p.detach(), tree[a][b], rtol=1e-13, atol=1e-15)


def _nest(flat):
    out = {}
    for key, value in flat.items():
        parent, leaf = key.split("/")
        out.setdefault(parent, {})[leaf] = value
    return out


def test_invalid_hyperparameter_raises_at_construction(case):
    """The error names the torch argument (``lr``), not the core's."""
    model = _model()
    with pytest.raises(ValueError, match=r"^lr must be") as info:
        case.make(model.named_parameters(), lr=-1.0)
    assert "learning_rate" not in str(info.value)


def test_refused_param_group_leaves_the_optimizer_as_it_was(case):
    """``add_param_group`` with a hyperparameter the class refuses raises ``ValueError`` naming the
    class and the torch argument, and leaves the optimizer as it was: the same param groups and
    state, steps on the trajectory of an optimizer never given the group, and the same parameters
    can then be added with valid values (stepping as in that optimizer given them)."""
    x, y = _data()
    model, twin = _model(), _model()
    named, twin_named = list(model.named_parameters()), list(twin.named_parameters())
    opt, reference = case.make(named[:2]), case.make(twin_named[:2])
    _train(model, opt, case, 2, x, y)
    _train(twin, reference, case, 2, x, y)
    state_before = {p: dict(entries) for p, entries in opt.state.items()}
    with pytest.raises(ValueError, match=rf"^{type(opt).__name__}: lr must be"):
        opt.add_param_group({"params": named[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p for _, p in named[:2]]
    assert {p: dict(entries) for p, entries in opt.state.items()} == state_before
    _train(model, opt, case, 2, x, y)
    _train(twin, reference, case, 2, x, y)
    assert torch.equal(_flat(model), _flat(twin))
    opt.add_param_group({"params": named[2:]})
    reference.add_param_group({"params": twin_named[2:]})
    _train(model, opt, case, 2, x, y)
    _train(twin, reference, case, 2, x, y)
    assert torch.equal(_flat(model), _flat(twin))
