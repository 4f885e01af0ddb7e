"""MBF-specific adapter behaviour: weight/bias pairing from names, conv detection, warm start."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import precond_ref as pr
import precond_ref.adapters.jax as pj
import precond_ref.adapters.torch as pt


def _cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 5),
    ).double()


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 5, (8,), generator=gen)


def _backward(model, x, y):
    torch.nn.functional.cross_entropy(model(x), y).backward()


def test_torch_pairs_linear_and_finds_convs():
    model = _cnn()
    opt = pt.MBF(model.named_parameters(), lr=1e-3, statistics_every=1, precondition_every=1)
    _backward(model, *_batch())
    opt.step()
    conv_w, conv_b, bn_w, bn_b, fc_w, fc_b = model.parameters()
    assert opt.state[fc_w]["momentum"].shape == (5, 49)  # [W | b]: bias as homogeneous column
    assert opt.state[fc_w]["statistic"].shape == (5, 5)
    assert "momentum" not in opt.state[fc_b]  # the weight holds the pair's state
    assert opt.state[conv_w]["statistic"].shape == (3, 2, 9, 9)
    for p in (conv_b, bn_w, bn_b):
        assert set(opt.state[p]) >= {"ema", "second_moment"}


def test_torch_model_argument_names_plain_parameters_and_unnamed_warns():
    model = _cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = pt.MBF(model.parameters(), lr=1e-3, model=model)
    _backward(model, *_batch())
    opt.step()
    assert opt.state[model[3].weight]["momentum"].shape == (5, 49)
    with pytest.warns(UserWarning, match="no names"):
        unnamed = pt.MBF(_cnn().parameters(), lr=1e-3)
    assert unnamed.defaults["lr"] == 1e-3


def test_torch_lr_defaults_to_the_cores():
    """Every torch.optim class has a default lr; MBF's is the core factory's of the group's mode."""
    from precond_ref.methods.mbf import MBF_LEARNING_RATE

    assert pr.mbf.__defaults__[0] is None
    with pytest.warns(UserWarning, match="no names"):
        opt = pt.MBF([{"params": list(_cnn().parameters())}])
    with pytest.warns(UserWarning, match="no names"):
        faithful = pt.MBF([{"params": list(_cnn().parameters())}], mode="faithful")
    assert opt.param_groups[0]["lr"] == 1e-3 == MBF_LEARNING_RATE["principled"]
    assert faithful.param_groups[0]["lr"] == 1e-5 == MBF_LEARNING_RATE["faithful"]


def test_torch_matches_core_on_the_same_tree():
    model = _cnn()
    opt = pt.MBF(model.named_parameters(), lr=1e-2, weight_decay=1e-2, statistics_every=2, precondition_every=3)
    core = pr.mbf(learning_rate=1e-2, weight_decay=1e-2, statistics_every=2, precondition_every=3)
    tree = {}
    for name, p in model.named_parameters():
        layer, leaf = name.split(".")
        tree.setdefault(layer, {})[leaf] = p.detach().clone()
    state = core.init(tree)
    for seed in range(4):
        opt.zero_grad()
        _backward(model, *_batch(seed))
        grads = {layer: {leaf: getattr(model[int(layer)], leaf).grad.clone() for leaf in d} for layer, d in tree.items()}
        opt.step()
        updates, state = core.update(grads, state, tree)
        tree = pr.apply_updates(tree, updates)
    for name, p in model.named_parameters():
        layer, leaf = name.split(".")
        torch.testing.assert_close(p.detach(), tree[layer][leaf], rtol=1e-13, atol=1e-15)


def test_torch_missing_weight_gradient_keeps_weight_and_its_counter():
    model = _cnn()
    opt = pt.MBF(model.named_parameters(), lr=1e-2)
    x, y = _batch()
    for _ in range(2):
        opt.zero_grad()
        _backward(model, x, y)
        opt.step()
    fc_w, fc_b = model[3].weight, model[3].bias
    before_w, before_b = fc_w.detach().clone(), fc_b.detach().clone()
    opt.zero_grad()
    _backward(model, x, y)
    fc_w.grad = None
    opt.step()
    assert torch.equal(fc_w.detach(), before_w) and fc_w.grad is None
    assert not torch.equal(fc_b.detach(), before_b)
    assert int(opt.state[fc_w]["step"]) == 2 and int(opt.state[fc_b]["step"]) == 3
    opt.zero_grad()
    _backward(model, x, y)
    opt.step()  # the pair steps together again
    assert int(opt.state[fc_b]["step"]) == 4


def _sampled_label_closure(model, batches):
    it = iter(batches)

    def closure():
        x, _ = next(it)
        logits = model(x)
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(0))[:, 0]
        torch.nn.functional.cross_entropy(logits, labels).backward()

    return closure


def _grads_by_name(model, closure, calls):
    """The gradients of ``calls`` runs of ``closure``, one dict (parameter name -> gradient) each;
    the model's gradients are left unset afterwards."""
    grad_dicts = []
    for _ in range(calls):
        model.zero_grad()
        closure()
        grad_dicts.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return grad_dicts


def test_torch_warm_start_from_dicts_and_from_a_closure_agree_with_core():
    model = _cnn()
    batches = [_batch(s) for s in range(3)]
    # Gradients with sampled labels, collected by hand (names as keys) ...
    closure = _sampled_label_closure(model, batches)
    grad_dicts = _grads_by_name(model, closure, len(batches))
    opt_dicts = pt.MBF(model.named_parameters(), lr=1e-3)
    opt_dicts.warm_start(grad_dicts)
    # ... and by the closure form.
    opt_closure = pt.MBF(model.named_parameters(), lr=1e-3)
    opt_closure.warm_start(_sampled_label_closure(model, batches), num_batches=3)
    assert all(p.grad is None for p in model.parameters())
    core = pr.mbf(learning_rate=1e-3)
    trees = []
    for d in grad_dicts:
        tree = {}
        for name, g in d.items():
            layer, leaf = name.split(".")
            tree.setdefault(layer, {})[leaf] = g
        trees.append(tree)
    state = core.warm_start(core.init(trees[0]), trees)
    fc_w, conv_w = model[3].weight, model[0].weight
    for opt in (opt_dicts, opt_closure):
        torch.testing.assert_close(opt.state[fc_w]["statistic"], state.groups["3/weight"]["statistic"], rtol=1e-14, atol=0)
        torch.testing.assert_close(opt.state[conv_w]["statistic"], state.groups["0/weight"]["statistic"], rtol=1e-14, atol=0)
    # Training continues from the warm-started state.
    opt_dicts.zero_grad()
    _backward(model, *_batch())
    opt_dicts.step()
    assert int(opt_dicts.state[fc_w]["step"]) == 1
    expected = 0.9 * state.groups["3/weight"]["statistic"]
    assert not torch.allclose(opt_dicts.state[fc_w]["statistic"], expected)  # plus (1 - rho) stat(g)
    with pytest.raises(RuntimeError, match="before the first step"):
        opt_dicts.warm_start(grad_dicts)


def test_torch_warm_start_inside_an_autocast_region_is_the_warm_start_outside_it():
    """``MBF.warm_start`` called inside a ``torch.autocast`` region computes its statistics as it
    does outside it, bit for bit, from the same gradients (the same float32 operations on the same
    inputs, as ``step`` does: docs/adapters/torch.md); a callable source, the user's forward and
    backward, still runs under the caller's autocast (its logits are bfloat16). Autocast used to
    run the statistics' products in bfloat16, relative differences of bfloat16's rounding."""
    model = _cnn().float()
    batches = [tuple(t.float() if t.is_floating_point() else t for t in _batch(s)) for s in range(2)]
    seen, grads = [], []
    it = iter(batches)

    def source():
        x, y = next(it)
        logits = model(x)
        seen.append(logits.dtype)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})

    closure, dicts, outside = (pt.MBF(model.named_parameters(), lr=1e-3) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        closure.warm_start(source, num_batches=2)
        dicts.warm_start(grads)
    outside.warm_start(grads)
    assert seen == [torch.bfloat16] * 2 and torch.is_autocast_enabled("cpu") is False
    for p in model.parameters():
        want = outside.state[p]
        for opt in (closure, dicts):
            got = opt.state[p]
            assert got.keys() == want.keys()
            for k, v in want.items():
                assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(v)), k


def test_torch_warm_start_bad_input():
    model = _cnn()
    opt = pt.MBF(model.named_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="num_batches"):
        opt.warm_start(lambda: None)
    with pytest.raises(ValueError, match="num_batches"):
        opt.warm_start([], num_batches=2)
    with pytest.raises(KeyError, match="nope"):
        opt.warm_start([{"nope": torch.zeros(1)}])


@pytest.mark.parametrize("refusal", ["gradient", "hyperparameter"])
def test_torch_warm_start_refused_in_a_later_param_group_changes_nothing(refusal):
    """``MBF.warm_start`` makes every param group's state before it writes any: a refusal in the
    *second* group (a transposed gradient of one of its weights; a hyperparameter it refuses, and
    then a callable source is not even run) leaves no state at all and every parameter as it was,
    so the corrected call is still the first one and gives the state of a warm start done right at
    once, bit for bit (not "must be called before the first step", with the first group warm-started)."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
        named = list(model.named_parameters())
        return model, pt.MBF([{"params": named[:2]}, {"params": named[2:]}], lr=1e-2)

    model, opt = build()
    gen = torch.Generator().manual_seed(1)
    grad_dicts = [{n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
                  for _ in range(3)]
    params = [p.detach().clone() for p in model.parameters()]
    if refusal == "gradient":
        bad = [dict(d) for d in grad_dicts]
        bad[1]["2.weight"] = bad[1]["2.weight"].T.clone()
        with pytest.raises(ValueError, match=r"the gradient of '2.weight' \(3, 2\)"):
            opt.warm_start(bad)
    else:
        calls = []
        damping, opt.param_groups[1]["damping"] = opt.param_groups[1]["damping"], -1.0
        with pytest.raises(ValueError, match="damping"):
            opt.warm_start(lambda: calls.append(1), num_batches=2)
        assert not calls
        opt.param_groups[1]["damping"] = damping
    assert not any(opt.state.get(p) for p in model.parameters())
    assert all(torch.equal(p, was) for p, was in zip(model.parameters(), params))
    opt.warm_start(grad_dicts)
    reference_model, reference = build()
    reference.warm_start(grad_dicts)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert opt.state[p].keys() == reference.state[q].keys()
        for k, v in reference.state[q].items():
            assert torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v, k
    for m, o in ((model, opt), (reference_model, reference)):
        for p, g in zip(m.parameters(), grad_dicts[0].values()):
            p.grad = g.clone()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))


def test_jax_pairs_flax_kernel_and_bias_like_torch_layout():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    conv = rng.standard_normal((2, 3, 3, 3))
    flax_params = {"Conv_0": {"kernel": jnp.asarray(np.transpose(conv, (2, 3, 1, 0)))},
                   "Dense_0": {"bias": jnp.asarray(b), "kernel": jnp.asarray(w.T)}}
    torch_tree = {"Conv_0": {"weight": conv}, "Dense_0": {"bias": b, "weight": w}}
    opt = pj.mbf(learning_rate=1e-2, statistics_every=1, precondition_every=1)
    core = pr.mbf(learning_rate=1e-2, statistics_every=1, precondition_every=1)
    state, core_state = opt.init(flax_params), core.init(torch_tree)
    assert state.groups["Dense_0/kernel"]["momentum"].shape == (3, 5)
    step = jax.jit(opt.update)
    for _ in range(3):
        gw, gb, gc = rng.standard_normal((3, 4)), rng.standard_normal(3), rng.standard_normal((2, 3, 3, 3))
        grads = {"Conv_0": {"kernel": jnp.asarray(np.transpose(gc, (2, 3, 1, 0)))},
                 "Dense_0": {"bias": jnp.asarray(gb), "kernel": jnp.asarray(gw.T)}}
        updates, state = step(grads, state, flax_params)
        core_updates, core_state = core.update({"Conv_0": {"weight": gc}, "Dense_0": {"bias": gb, "weight": gw}},
                                               core_state, torch_tree)
        np.testing.assert_allclose(np.asarray(updates["Dense_0"]["kernel"]), core_updates["Dense_0"]["weight"].T, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(np.asarray(updates["Dense_0"]["bias"]), core_updates["Dense_0"]["bias"], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(np.asarray(updates["Conv_0"]["kernel"]),
                                   np.transpose(core_updates["Conv_0"]["weight"], (2, 3, 1, 0)), rtol=1e-9, atol=1e-13)


def test_jax_warm_start_helper():
    rng = np.random.default_rng(1)
    params = {"Dense_0": {"bias": jnp.zeros(3), "kernel": jnp.zeros((4, 3))}}
    kwargs = dict(learning_rate=1e-2)
    opt = pj.mbf(**kwargs)
    grads = [{"Dense_0": {"bias": jnp.asarray(rng.standard_normal(3)), "kernel": jnp.asarray(rng.standard_normal((4, 3)))}}
             for _ in range(3)]
    state = pj.mbf_warm_start(opt.init(params), grads, **kwargs)
    h = [np.concatenate([np.asarray(g["Dense_0"]["kernel"]).T, np.asarray(g["Dense_0"]["bias"])[:, None]], 1) for g in grads]
    expected = np.mean([x @ x.T / 5 for x in h], axis=0)
    np.testing.assert_allclose(np.asarray(state.groups["Dense_0/kernel"]["statistic"]), expected, rtol=1e-12)
    updates, _ = opt.update(grads[0], state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))


def _core_tree(named):
    """``{"3": {"weight": t}}`` from ``[("3.weight", t)]``: the tree the torch adapter builds from names."""
    tree = {}
    for name, t in named:
        layer, leaf = name.split(".")
        tree.setdefault(layer, {})[leaf] = t
    return tree


@pytest.mark.parametrize("resume", [False, True], ids=["direct", "state_dict-before-first-step"])
def test_torch_warm_start_follows_the_core_schedule(resume):
    """After ``MBF.warm_start`` the torch steps are the core's ``warm_start`` + ``update`` calls 0, 1, 2, ...

    Invariant (spec mbf.md 2.5): the warm start makes state and takes no call, so
    the first step is the core's call 0 (statistic and inverse both due) and every interval decision
    after it is the core's; also across a ``state_dict`` round trip taken right after the warm start.
    Both run the same core on the same float64 torch tensors, so they agree exactly.
    """
    model = _cnn()
    kwargs = dict(damping=0.1, weight_decay=1e-2, statistics_every=2, precondition_every=3)
    batches = [_batch(s) for s in range(3)]
    closure = _sampled_label_closure(model, batches)
    grad_dicts = _grads_by_name(model, closure, len(batches))
    opt = pt.MBF(model.named_parameters(), lr=1e-2, **kwargs)
    opt.warm_start(grad_dicts)
    if resume:
        saved = opt.state_dict()
        opt = pt.MBF(model.named_parameters(), lr=1e-2, **kwargs)
        opt.load_state_dict(saved)
    core = pr.mbf(learning_rate=1e-2, **kwargs)
    tree = _core_tree((n, p.detach().clone()) for n, p in model.named_parameters())
    state = core.warm_start(core.init(tree), [_core_tree(d.items()) for d in grad_dicts])
    for seed in range(7):  # inverses at calls 0, 3, 6; statistics at 0, 2, 4, 6
        opt.zero_grad()
        _backward(model, *_batch(10 + seed))
        grads = _core_tree((n, p.grad.clone()) for n, p in model.named_parameters())
        opt.step()
        updates, state = core.update(grads, state, tree)
        tree = pr.apply_updates(tree, updates)
        for name, p in model.named_parameters():
            layer, leaf = name.split(".")
            assert torch.equal(p.detach(), tree[layer][leaf]), (seed, name)
    assert opt.state[model[3].weight]["calls"] == 7


def test_torch_warm_started_checkpoint_is_validated():
    """A checkpoint saved between ``warm_start`` and the first step holds state that the first step
    reads, so ``load_state_dict`` checks it like a stepped one's (a transposed statistic is refused)."""
    model = _cnn()
    opt = pt.MBF(model.named_parameters(), lr=1e-2)
    opt.warm_start([{n: torch.ones_like(p) for n, p in model.named_parameters()}])
    saved = opt.state_dict()
    index = [n for n, _ in model.named_parameters()].index("3.weight")
    saved["state"][index]["statistic"] = torch.ones(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'statistic' of parameter '3.weight'.*shape \(4, 4\), expected \(5, 5\)"):
        pt.MBF(model.named_parameters(), lr=1e-2).load_state_dict(saved)


@pytest.mark.parametrize(
    "cls, kwargs, step_kwargs",
    [
        (pt.MBF, dict(lr=1e-2, statistics_every=1, precondition_every=2), {}),
        (pt.IFShampoo, dict(lr=1e-2, grouping="weight_bias", preconditioner_lr=0.1, damping=1e-2, batch_size=1), dict(batch_size=8)),
    ],
    ids=["mbf", "if_shampoo-weight_bias"],
)
@pytest.mark.parametrize("resume", [False, True], ids=["direct", "state_dict-after-the-partial-step"])
def test_torch_paired_weight_first_in_group_without_gradient_keeps_the_group_count(cls, kwargs, step_kwargs, resume):
    """A step where a paired weight that comes first in its param group has no gradient leaves the
    group's count (``"step"``, which MBF's diagonal bias correction reads) at the number of steps taken.

    Invariant (transform.missing_members): the weight takes part with a zero
    gradient and keeps its value and own counter; every other member advances. The reference is the
    core on the same float64 tensors (zero gradient for the weight at that step, its update
    discarded), so the two agree exactly, conv bias included; also when the optimizer is rebuilt
    from its ``state_dict`` right after that step (the checkpoint holds the lagging counter).
    """
    model = _cnn()
    named = list(model.named_parameters())
    named = named[4:] + named[:4]  # the Linear's weight and bias first in the group
    opt = cls(named, **kwargs)
    core = type(opt).core_factory(**opt.core_kwargs({**opt.defaults}))
    tree = _core_tree((n, p.detach().clone()) for n, p in named)
    state = core.init(tree)
    fc_w = model[3].weight
    for k in range(7):
        opt.zero_grad()
        _backward(model, *_batch(20 + k))
        grads = _core_tree((n, p.grad.clone()) for n, p in named)
        if k == 2:
            fc_w.grad = None
            grads["3"]["weight"] = torch.zeros_like(fc_w)
        opt.step(**step_kwargs)
        if resume and k == 2:
            saved = opt.state_dict()
            opt = cls(named, **kwargs)
            opt.load_state_dict(saved)
        updates, state = core.update(grads, state, tree, **step_kwargs)
        if k == 2:
            updates["3"]["weight"] = torch.zeros_like(fc_w)
        tree = pr.apply_updates(tree, updates)
        for name, p in named:
            layer, leaf = name.split(".")
            assert torch.equal(p.detach(), tree[layer][leaf]), (k, name)
        expected = {p: k + 1 for _, p in named}
        if k == 2:
            expected[fc_w] = 2  # its own count stays; the pair's next step sets it again
        assert {n: int(opt.state[p]["step"]) for n, p in named} == {n: expected[p] for n, p in named}, k


class Conv1D(torch.nn.Module):
    """Stand-in for transformers' GPT-2 ``Conv1D``: weight stored inputs x outputs, ``x @ W + b``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(nf, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def _conv1d_pair(conv1d_cls=Conv1D):
    """A model of inputs-first layers (one non-square, one square) and its nn.Linear twin."""
    torch.manual_seed(3)
    a = torch.nn.Sequential(conv1d_cls(6, 4), torch.nn.Tanh(), conv1d_cls(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    a = a.double()
    b = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                            torch.nn.Linear(6, 2)).double()
    with torch.no_grad():
        for i in (0, 2):
            b[i].weight.copy_(a[i].weight.T)
            b[i].bias.copy_(a[i].bias)
        b[4].load_state_dict(a[4].state_dict())
    return a, b


def _train_both(a, b, opt_a, opt_b, steps=5):
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()


@pytest.mark.parametrize("how", ["model=", "named_parameters"])
def test_torch_inputs_first_weights_pair_like_their_linear_twins(how):
    """A weight stored inputs x outputs (GPT-2's ``Conv1D``) is paired with its bias as the
    ``nn.Linear`` of the transposed weight is: MBF on the Conv1D model takes the
    steps of MBF on its Linear twin, transposed. By the module with ``model=``; by the axis that
    matches the bias's length from names alone, where the square layer cannot be told apart and a
    warning names it (it is then paired as outputs-first, so only the non-square layer's first step,
    which reads only its own gradient, matches).
    Same arithmetic on transposed layouts: agreement to a few float64 roundings per step."""
    a, b = _conv1d_pair()
    kwargs = dict(lr=1e-2, damping=0.1, statistics_every=1, precondition_every=2)
    if how == "model=":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt_a = pt.MBF(a.parameters(), model=a, **kwargs)
    else:
        with pytest.warns(UserWarning, match=r"cannot tell .*\['2.weight'\].*pass model="):
            opt_a = pt.MBF(a.named_parameters(), **kwargs)
    opt_b = pt.MBF(b.named_parameters(), **kwargs)
    _train_both(a, b, opt_a, opt_b, steps=5 if how == "model=" else 1)
    assert opt_a.state[a[0].weight]["momentum"].shape == (6, 5)  # [W^T | b]: the bias is the 6 outputs' column
    layers = (0, 2) if how == "model=" else (0,)
    for i in layers:
        torch.testing.assert_close(a[i].weight.detach().T, b[i].weight.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a[i].bias.detach(), b[i].bias.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[4].weight.detach(), b[4].weight.detach(), rtol=1e-12, atol=1e-14) if how == "model=" else None
    # a checkpoint of the Conv1D model loads into a new optimizer of it (same paths) and continues
    saved = opt_a.state_dict()
    again = pt.MBF(a.parameters(), model=a, **kwargs) if how == "model=" else None
    if again is not None:
        again.load_state_dict(saved)
        assert again.state[a[0].weight]["momentum"].shape == (6, 5)


def test_torch_transformers_conv1d_pairs_like_linear():
    """transformers' own ``Conv1D`` (skipped where transformers is not installed), as above."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    a, b = _conv1d_pair(pytorch_utils.Conv1D)
    kwargs = dict(lr=1e-2, damping=0.1, statistics_every=1, precondition_every=2)
    opt_a, opt_b = pt.MBF(a.parameters(), model=a, **kwargs), pt.MBF(b.named_parameters(), **kwargs)
    _train_both(a, b, opt_a, opt_b)
    for i in (0, 2):
        torch.testing.assert_close(a[i].weight.detach().T, b[i].weight.detach(), rtol=1e-12, atol=1e-14)
