"""Root-free adapters beyond the shared contract: batch-size counting from the model's forward
passes (torch), weight+bias grouping through parameter names, bf16 factors through both adapters,
and the authors' SIRFShampoo package when it is installed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import precond_ref as pr
import precond_ref.adapters.jax as pj
import precond_ref.adapters.torch as pt


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)


def _data(n, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return x.to(dtype), torch.sin(x[:, :2]).to(dtype)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("cls, kwargs", [(pt.RFRMSProp, dict(lr=0.05)), (pt.IFShampoo, dict(lr=0.05)),
                                          (pt.RFAdamW, dict(lr=0.05))])
def test_batch_size_counted_from_training_forwards(cls, kwargs):
    """model= without batch_size counts inputs[0].shape[0] of every training forward since the last
    step (two accumulated forwards of 8 and 4 examples -> B = 12); eval forwards do not count."""
    x, y = _data(12)
    counted, explicit = _model(), _model()
    opt_c = cls(None, model=counted, **kwargs)
    opt_e = cls(explicit.named_parameters(), batch_size=12, **kwargs)
    for _ in range(3):
        for model, opt in ((counted, opt_c), (explicit, opt_e)):
            opt.zero_grad()
            for part in (slice(0, 8), slice(8, 12)):  # gradient accumulation of a mean over 12
                loss = ((model(x[part]) - y[part]) ** 2).sum() / 12
                loss.backward()
        counted.eval()
        counted(x)  # evaluation forwards are not counted
        counted.train()
        opt_c.step()
        opt_e.step()
        assert torch.equal(_flat(counted), _flat(explicit))
    with pytest.raises(ValueError, match="averages"):
        opt_c.zero_grad()
        ((counted(x) - y) ** 2).mean().backward()
        counted.eval()
        opt_c.step()  # counted 12 ... then reset: next step without forwards has no B
        opt_c.step()


def test_step_batch_size_overrides_and_closure_counts():
    x, y = _data(6)
    a, b = _model(), _model()
    opt_a = pt.RFRMSProp(None, lr=0.1, model=a)
    opt_b = pt.RFRMSProp(b.named_parameters(), lr=0.1, batch_size=1)  # overridden by step's

    def closure():
        opt_a.zero_grad()
        loss = ((a(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt_a.step(closure)  # the closure's forward is counted: B = 6
    opt_b.zero_grad()
    ((b(x) - y) ** 2).mean().backward()
    opt_b.step(batch_size=6)
    assert torch.equal(_flat(a), _flat(b))


def test_if_shampoo_weight_bias_grouping_through_names_matches_core():
    x, y = _data(16)
    model = _model()
    opt = pt.IFShampoo(model.named_parameters(), lr=0.05, batch_size=16, grouping="weight_bias",
                       preconditioner_lr=0.2)
    core = pr.if_shampoo(learning_rate=0.05, batch_size=16, grouping="weight_bias", preconditioner_lr=0.2)
    names = [n for n, _ in model.named_parameters()]

    def tree(tensors):
        out: dict = {}
        for n, t in zip(names, tensors):
            parent, leaf = n.split(".")
            out.setdefault(parent, {})[leaf] = t
        return out

    params = tree([p.detach().clone() for p in model.parameters()])
    state = core.init(params)
    assert set(state.groups) == {"0/weight", "2/weight"}  # each weight grouped with its bias
    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grads = tree([p.grad.clone() for p in model.parameters()])
        opt.step()
        updates, state = core.update(grads, state, params)
        params = pr.apply_updates(params, updates)
    for n, p in model.named_parameters():
        parent, leaf = n.split(".")
        torch.testing.assert_close(p.detach(), params[parent][leaf], rtol=0, atol=0)
    assert opt.state[model[0].weight]["stacks/0/factor/1"].shape == (1, 6, 6)  # 5 inputs + the bias column


def test_if_shampoo_bf16_model_with_bf16_factors_torch():
    """bf16 parameters and bf16 Kronecker factors (the paper's half-precision mode): finite, factors
    stay bf16, the loss falls."""
    x, y = _data(64, torch.bfloat16)
    model = _model(torch.bfloat16)
    opt = pt.IFShampoo(None, model=model, lr=0.05, preconditioner_lr=0.2, damping=1e-2,
                       factor_dtype=torch.bfloat16)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = ((model(x).float() - y.float()) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] / 3, losses[::10]
    state = opt.state[model[0].weight]
    assert state["stacks/0/factor/0"].dtype == torch.bfloat16 and model[0].weight.dtype == torch.bfloat16
    assert all(torch.isfinite(v.float()).all() for v in state.values() if isinstance(v, torch.Tensor))


def test_if_shampoo_bf16_params_and_factors_optax_jit():
    import jax
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    y = jnp.sin(a[:, :2])
    params = {"layer": {"kernel": jnp.zeros((5, 2), jnp.bfloat16), "bias": jnp.zeros((2,), jnp.bfloat16)}}

    def loss(p):
        out = a @ p["layer"]["kernel"].astype(jnp.float32) + p["layer"]["bias"].astype(jnp.float32)
        return jnp.mean((out - y) ** 2)

    opt = pj.if_shampoo(learning_rate=0.05, preconditioner_lr=0.2, damping=1e-2, factor_dtype=jnp.bfloat16,
                        grouping="weight_bias")
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p, batch_size=64)
        return optax.apply_updates(p, u), s

    first = float(loss(params))
    for _ in range(80):
        params, state = step(params, state)
    final = float(loss(params))
    assert np.isfinite(final) and final < first / 3, (first, final)
    assert params["layer"]["kernel"].dtype == jnp.bfloat16
    factors = [v for k, v in state.groups["layer/kernel"].items() if k.startswith("stacks/0/factor/")]
    assert [f.shape for f in factors] == [(1, 6, 6), (1, 2, 2)]  # the bias is an extra row of the kernel
    assert all(f.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(f))) for f in factors)


def test_if_shampoo_faithful_matches_installed_sirfshampoo():
    """Live comparison with the authors' package when installed (dense, per parameter, B counted by
    both optimizers' forward hooks): float64 parameters agree to 1e-10 after 10 steps."""
    sirfshampoo = pytest.importorskip("sirfshampoo")
    x, y = _data(16)
    ours_model, ref_model = _model(), _model()
    kw = dict(lr=0.05, alpha1=0.9, alpha2=0.5, beta2=0.2, lam=1e-3, kappa=1e-3)
    ref = sirfshampoo.SIRFShampoo(ref_model, **kw)
    ours = pt.IFShampoo(None, model=ours_model, lr=0.05, momentum=0.9, preconditioner_momentum=0.5,
                        preconditioner_lr=0.2, damping=1e-3, weight_decay=1e-3, mode="faithful")
    for _ in range(10):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    torch.testing.assert_close(_flat(ours_model), _flat(ref_model), rtol=1e-10, atol=1e-12)


def test_state_dict_of_counted_optimizer_round_trips():
    x, y = _data(8)
    model = _model()
    opt = pt.IFShampoo(None, model=model, lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    clone = copy.deepcopy(model)
    opt2 = pt.IFShampoo(None, model=clone, lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    assert torch.equal(_flat(model), _flat(clone))


def test_if_shampoo_weight_bias_partner_without_gradient():
    """Item 4 of the rootfree brief (shared rule with MBF, transform.missing_members): with
    grouping="weight_bias", a bias without a gradient takes part in its weight's step with a zero
    gradient, is left unchanged and its "step" is not advanced; the weight gets the core's update for
    a zero bias gradient; at the next step with both gradients the pair's count is shared again."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2).double()
    opt = pt.IFShampoo(layer.named_parameters(), lr=0.1, batch_size=4, grouping="weight_bias", compile=False)
    core = pr.if_shampoo(learning_rate=0.1, batch_size=4, grouping="weight_bias")
    params = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
    state = core.init(params)
    steps = []
    for t in range(3):
        opt.zero_grad(set_to_none=True)
        layer(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum().backward()
        if t == 1:
            layer.bias.grad = None
        grads = {"weight": layer.weight.grad.clone(),
                 "bias": torch.zeros_like(layer.bias) if t == 1 else layer.bias.grad.clone()}
        updates, state = core.update(grads, state, params)
        before = layer.bias.detach().clone()
        opt.step()
        assert torch.equal(before, layer.bias) == (t == 1)
        params = {"weight": params["weight"] + updates["weight"],
                  "bias": params["bias"] + (0.0 if t == 1 else updates["bias"])}
        torch.testing.assert_close(layer.weight.detach(), params["weight"], rtol=1e-12, atol=1e-14)
        steps.append((int(opt.state[layer.weight]["step"]), int(opt.state[layer.bias]["step"])))
    assert steps == [(1, 1), (2, 1), (3, 3)]


class _KeywordModel(torch.nn.Module):
    """A model called as the transformers ``Trainer`` calls them: ``model(input_ids=..., labels=...)``."""

    def __init__(self):
        super().__init__()
        self.body = _model()

    def forward(self, input_ids=None, labels=None, scale=1.0):
        out = self.body(input_ids) * scale
        return ((out - labels) ** 2).sum() if labels is not None else out


@pytest.mark.parametrize("cls", [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo], ids=lambda c: c.__name__)
def test_batch_size_counted_from_keyword_only_forwards(cls):
    """model= counts the leading size of the first tensor argument, positional or keyword:
    ``model(input_ids=x[:8], labels=...)`` then ``model(x[8:], labels=...)`` counts 8 + 4
    examples, a leading non-tensor argument is passed over, and the steps equal those given
    ``batch_size=12`` exactly (same arithmetic)."""
    x, y = _data(12)
    counted, explicit = _KeywordModel(), _KeywordModel()
    opt_c = cls(None, model=counted, lr=0.05)
    opt_e = cls(explicit.named_parameters(), batch_size=12, lr=0.05)
    for _ in range(2):
        for model, opt in ((counted, opt_c), (explicit, opt_e)):
            opt.zero_grad()
            (model(input_ids=x[:8], labels=y[:8]) / 12).backward()
            (model(x[8:], labels=y[8:]) / 12).backward()
        assert opt_c._batch_counter.count == 12
        opt_c.step()
        opt_e.step()
        assert torch.equal(_flat(counted), _flat(explicit))
    opt_c._batch_counter._hook(counted, (None, 3), {"input_ids": x[:5], "labels": y})  # first *tensor*
    assert opt_c._batch_counter.count == 5


class _WithIdleParameters(torch.nn.Module):
    """``_model()`` beside a parameter that never gets a gradient and a frozen one."""

    def __init__(self):
        super().__init__()
        self.body = _model()
        self.unused = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return self.body(x) * self.frozen[0]


@pytest.mark.parametrize("cls", [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo], ids=lambda c: c.__name__)
def test_count_drops_the_forwards_of_discarded_gradients(cls):
    """B is the number of examples of the loss whose gradients the step uses (spec root_free.md §2),
    so a forward whose gradients were discarded (a step ``torch.amp.GradScaler`` skips on an
    overflow, which does not call ``step``) must not add to the next step's B. With model=, a
    training forward that finds every gradient of the model set to None (``zero_grad()``'s
    default) starts the count again; one that finds gradients adds (accumulation, and the loop that
    calls the forward before ``zero_grad``), and a parameter that never gets a gradient does not
    make every forward a new start. Each step equals the step given its B explicitly."""
    x, y = _data(12)
    counted, explicit = _WithIdleParameters(), _WithIdleParameters()
    every = {"precondition_every": 1} if cls is pt.IFShampoo else {}  # B enters each of its steps
    opt_c = cls(None, model=counted, lr=0.05, **every)
    opt_e = cls(explicit.named_parameters(), batch_size=8, lr=0.05, **every)
    scalers = {opt_c: torch.amp.GradScaler("cpu", init_scale=1024.0),
               opt_e: torch.amp.GradScaler("cpu", init_scale=1024.0)}

    def zero_grad_first(model, opt, parts, overflow=False):
        opt.zero_grad()
        for part in parts:  # gradient accumulation of a mean over 12 when there are two parts
            total = sum(p.stop - p.start for p in parts)
            scalers[opt].scale(((model(x[part]) - y[part]) ** 2).sum() / total).backward()
        if overflow:
            model.body[0].weight.grad[0, 0] = float("inf")

    def forward_first(model, opt, parts, overflow=False):
        out = model(x[parts[0]])
        opt.zero_grad()
        scalers[opt].scale(((out - y[parts[0]]) ** 2).mean()).backward()

    schedule = [(zero_grad_first, [slice(0, 8)], False, 8), (zero_grad_first, [slice(0, 8)], True, None),
                (zero_grad_first, [slice(0, 8), slice(8, 12)], False, 12), (forward_first, [slice(4, 12)], False, 8),
                (zero_grad_first, [slice(0, 8)], True, None), (zero_grad_first, [slice(4, 12)], False, 8)]
    for loop, parts, overflow, batch_size in schedule:
        for model, opt in ((counted, opt_c), (explicit, opt_e)):
            loop(model, opt, parts, overflow)
            scalers[opt].step(opt, **({"batch_size": batch_size} if opt is opt_e and batch_size else {}))
            scalers[opt].update()
        assert torch.equal(_flat(counted), _flat(explicit)), (loop.__name__, parts, overflow)
    assert scalers[opt_c].get_scale() == scalers[opt_e].get_scale() < 1024.0  # two steps were skipped


@pytest.mark.parametrize("cls", [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo], ids=lambda c: c.__name__)
def test_a_groups_own_batch_size_comes_before_the_count(cls):
    """B comes from step(batch_size=), then the constructor's or the param group's batch_size, then
    model='s count (the class docstring's order): with model=, a group that gives its own
    batch_size steps with it and only the groups without one take the counted B; step's overrides
    both. A model whose every group has its own batch_size needs no count, so token-id inputs,
    which the count refuses to read, do not stop its step."""
    x, y = _data(8)

    def groups(model):
        return [{"params": list(model[0].parameters()), "batch_size": 64}, {"params": list(model[2].parameters())}]

    counted, explicit = _model(), _model()
    opt_c = cls(groups(counted), model=counted, lr=0.05)
    opt_e = cls(groups(explicit), batch_size=8, lr=0.05)  # group 0 keeps 64, group 1 takes 8
    for step in range(3):
        for model, opt in ((counted, opt_c), (explicit, opt_e)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step(**({"batch_size": 5} if step == 2 else {}))
        assert torch.equal(_flat(counted), _flat(explicit)), step

    torch.manual_seed(0)
    lm = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))
    tokens = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(1))
    opt = cls([{"params": list(lm.parameters()), "batch_size": 24}], model=lm, lr=0.05)
    torch.nn.functional.cross_entropy(lm(tokens).reshape(-1, 5), tokens.reshape(-1)).backward()
    opt.step()


def test_model_holds_no_hook_of_a_collected_optimizer(own_objects_collected):
    """An optimizer built with model= must not outlive its use through the model: the forward
    pre-hook holds its counter weakly and is removed when the counter is collected, so building
    optimizers on one model does not pile up hooks that every forward runs. The copy semantics of
    ``_BatchCounter``'s docstring hold: a deepcopy of the optimizer alone hooks the same model, and
    a copy made with the model hooks the model's copy, each hook gone with its optimizer; a model
    pickled without its optimizer drops the hook that counts nothing at its first forward."""
    import gc
    import pickle

    x, _ = _data(8)
    model = _model()
    opts = [pt.RFAdamW(model.parameters(), lr=0.05, model=model) for _ in range(20)]
    assert len(model._forward_pre_hooks) == 20
    kept = opts[0]
    del opts
    gc.collect()
    assert len(model._forward_pre_hooks) == 1
    twin = copy.deepcopy(kept)
    assert len(model._forward_pre_hooks) == 2
    model(x)
    assert kept._batch_counter.count == twin._batch_counter.count == 8
    del twin
    gc.collect()
    assert len(model._forward_pre_hooks) == 1
    kept.step()  # no gradients: nothing moves, the count starts again
    pair = copy.deepcopy({"model": model, "opt": kept})
    assert len(model._forward_pre_hooks) == len(pair["model"]._forward_pre_hooks) == 1
    pair["model"](x[:3])
    assert (kept._batch_counter.count, pair["opt"]._batch_counter.count) == (0, 3)
    del pair["opt"]
    gc.collect()
    assert not pair["model"]._forward_pre_hooks and not pair["model"]._forward_pre_hooks_with_kwargs
    alone = pickle.loads(pickle.dumps(model))
    alone(x)
    assert not alone._forward_pre_hooks
    del kept
    gc.collect()
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs


class _DictInputModel(torch.nn.Module):
    """``_model()`` whose forward takes a dict of tensors (or a tensor) as its one argument."""

    def __init__(self):
        super().__init__()
        self.body = _model()

    def forward(self, batch):
        return self.body(batch["x"] if isinstance(batch, dict) else batch)


@pytest.mark.parametrize("cls", [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo], ids=lambda c: c.__name__)
def test_forward_without_a_tensor_argument_is_named_in_the_error(cls):
    """model= counts the leading size of the first tensor argument of each training forward. A
    forward whose arguments hold no tensor (a dict of tensors) has no size to count, so a step
    with nothing counted says that the forward got no tensor to count and asks for batch_size=,
    rather than saying that no training forward ran; the step then given batch_size= goes on, and
    the next forward with a tensor counts as before."""
    x, y = _data(8)
    model = _DictInputModel()
    opt = cls(None, model=model, lr=0.05)
    opt.zero_grad()
    ((model({"x": x}) - y) ** 2).mean().backward()
    with pytest.raises(ValueError, match=r"got no tensor to count \(its first argument is a dict") as info:
        opt.step()
    assert "batch_size=" in str(info.value) and "no training-mode forward" not in str(info.value)
    opt.step(batch_size=8)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    assert opt._batch_counter.count == 8 and opt._batch_counter.uncounted is None
    opt.step()


@pytest.mark.parametrize("cls, kwargs", [
    (pt.RFRMSProp, dict(momentum=0.9, weight_decay=1e-2)), (pt.RFRMSProp, dict(mode="faithful")),
    (pt.RFAdamW, dict(weight_decay=1e-2)), (pt.RFAdamW, dict(mode="faithful")),
    (pt.IFShampoo, dict(precondition_every=1, grouping="weight_bias", weight_decay=1e-2)),
    (pt.IFShampoo, dict(precondition_every=1, mode="faithful")),
], ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(f"{k}={v[k]}" for k in v))
def test_zero_gradient_step_without_a_count_is_the_step_of_every_batch_size(cls, kwargs):
    """B multiplies only gradient terms (s <- b2 s + (1 - b2) B g*g; IF-Shampoo's factor step from
    sqrt(B) G), so a step whose every gradient is exactly zero is the same for every B. With
    model= and nothing counted (no forward since the last step: torch DCP's state-making step),
    such a step takes B = 1 and equals, state and parameters bit for bit, the steps given
    batch_size=1 and batch_size=64; a nonzero gradient without a count still raises."""
    x, y = _data(8)
    runs = []
    for batch_size in (None, 1, 64):
        model = _model()
        opt = cls(None, model=model, lr=0.05, **kwargs)
        for _ in range(2):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()  # counted: B = 8
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step(**({} if batch_size is None else {"batch_size": batch_size}))
        runs.append((model, opt))
    (counted, opt), *others = runs
    for model, other in others:
        assert torch.equal(_flat(counted), _flat(model))
        for p, q in zip(counted.parameters(), model.parameters()):
            assert opt.state[p].keys() == other.state[q].keys()
            for key, value in opt.state[p].items():
                assert torch.equal(value, other.state[q][key]) if isinstance(value, torch.Tensor) else value == other.state[q][key], key
    next(counted.parameters()).grad[0, 0] = 1.0
    with pytest.raises(ValueError, match="counted no training-mode forward"):
        opt.step()


@pytest.mark.parametrize("cls", [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo])
def test_count_of_a_model_that_may_be_one_rank_of_many_warns_once(monkeypatch, cls):
    """With torch.distributed running several processes, a plain class given a model that is not a
    DistributedDataParallel cannot tell whether the ranks train one model (whose B is the global
    batch): its count is this process's, and one RuntimeWarning, pointing at the caller's step,
    names the remedies. ``batch_size=`` asks nothing and warns nothing. (The sum over a DDP
    module's ranks: tests/distributed/test_torch_batch_count.py.)"""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    x, y = _data(4)
    net, given = _model(), _model()
    counted, explicit = cls(None, model=net, lr=0.05), cls(None, model=given, lr=0.05, batch_size=4)
    with pytest.warns(RuntimeWarning, match="DistributedDataParallel module as model=") as caught:
        for _ in range(2):
            for model, opt in ((net, counted), (given, explicit)):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
    assert [w.filename for w in caught] == [__file__]
    assert torch.equal(_flat(net), _flat(given))
