"""Checkpoints, copies and schedules of every torch adapter.

Each test runs on every entry of ``cases.TORCH_CASES`` unless it is about one class.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle

import pytest
import torch

import precond_ref as pr
import precond_ref.adapters.torch as pt
from cases import TORCH_CASES
from test_torch_contract import _data, _flat, _loss, _model, _train

each_case = pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)


def _trained(case, steps=3):
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, steps, x, y)
    return model, opt, (x, y)


def _snapshot(opt):
    """Everything ``load_state_dict`` may change, as plain values."""
    groups = [{k: (list(map(id, v)) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in e.items()} for p, e in opt.state.items()}
    return groups, state


def _same(a, b):
    (ga, sa), (gb, sb) = a, b
    assert ga == gb
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name, value in sa[key].items():
            other = sb[key][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), name
            else:
                assert value == other, name


# --------------------------------------------------------------------------------------------
# item 7: a learning rate reaching 0


@each_case
def test_lr_schedulers_reaching_zero(case):
    """torch accepts lr = 0: CosineAnnealingLR to eta_min=0 keeps stepping, and
    with LambdaLR returning 0 from the start the parameters do not move (the step is lr times a
    finite direction, and every case's weight decay is scaled by lr)."""
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=0.0)
    for _ in range(4):  # lr: lr, lr/2, 0, lr/2
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step(**case.step_kwargs)
        sched.step()
    assert torch.isfinite(_flat(model)).all()

    model = _model()
    before = _flat(model)
    opt = case.make(model.named_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step(**case.step_kwargs)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    assert torch.equal(_flat(model), before)


# --------------------------------------------------------------------------------------------
# item 8: deepcopy and pickle


@each_case
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_continues_like_the_original(case, how):
    """A copy of (model, optimizer) taken after 3 steps takes the same next 3 steps as the original
    (the copy used to crash on its first step)."""
    model, opt, (x, y) = _trained(case)
    pair = {"model": model, "opt": opt}
    if how == "deepcopy":
        clone = copy.deepcopy(pair)
    else:
        buffer = io.BytesIO()
        torch.save(pair, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
        assert pickle.loads(pickle.dumps(opt)).state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    _train(model, opt, case, 3, x, y)
    _train(clone["model"], clone["opt"], case, 3, x, y)
    assert torch.equal(_flat(model), _flat(clone["model"]))


@each_case
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_a_scheduled_optimizer_steps_its_own_parameters(case, how):
    """An ``lr_scheduler`` wraps the optimizer's ``step`` in an instance attribute holding a weak
    reference to that optimizer. A copy of (model, optimizer) takes its next 3 steps as the
    original does and leaves the original's parameters alone, also once the original is gone (as
    torch's optimizers, whose copies do not take the wrapper): the copied wrapper stepped the
    original, and pickling refused it."""
    model, opt, (x, y) = _trained(case)
    torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    pair = {"model": model, "opt": opt}
    clone = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    before = _flat(model).clone()
    _train(clone["model"], clone["opt"], case, 3, x, y)
    assert torch.equal(_flat(model), before)
    _train(model, opt, case, 3, x, y)
    assert torch.equal(_flat(model), _flat(clone["model"]))
    del pair, model, opt
    _train(clone["model"], clone["opt"], case, 1, x, y)


def test_copy_of_a_model_counted_root_free_optimizer_counts_the_copy():
    """``model=`` without ``batch_size``: copied or pickled together with the model, the copy's
    batch counter sees the copied model's forward passes (and only those)."""
    x, y = _data()
    model = _model()
    opt = pt.RFRMSProp(None, lr=5e-2, damping=1e-2, model=model)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    copies = [copy.deepcopy({"model": model, "opt": opt}), pickle.loads(pickle.dumps({"model": model, "opt": opt}))]
    for m, o in [(model, opt)] + [(c["model"], c["opt"]) for c in copies]:
        o.zero_grad()
        _loss(m, x, y).backward()
        o.step()
    for c in copies:
        assert torch.equal(_flat(model), _flat(c["model"]))


# --------------------------------------------------------------------------------------------
# item 6: load_state_dict validates and fails atomically


def _first_state_tensor(saved, square_ok):
    for index, entries in sorted(saved["state"].items()):
        for name, value in entries.items():
            if name in ("step", "nonfinite_count") or not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() and value.ndim == 2 and (square_ok or value.shape[0] != value.shape[1]):
                return index, name
    for index, entries in sorted(saved["state"].items()):
        for name, value in entries.items():
            if name not in ("step", "nonfinite_count") and isinstance(value, torch.Tensor) and value.is_floating_point():
                return index, name
    raise AssertionError("no floating state tensor")


def _corrupt(saved, kind):
    saved = copy.deepcopy(saved)
    index, name = _first_state_tensor(saved, square_ok=kind != "transposed")
    value = saved["state"][index][name]
    if kind in ("nan", "inf"):  # (indexing, not reshape: state tensors may be non-contiguous views)
        value[(0,) * value.ndim] = float(kind)
    elif kind == "transposed":
        if value.ndim != 2 or value.shape[0] == value.shape[1]:
            pytest.skip("no non-square 2-D state tensor")
        saved["state"][index][name] = value.T.contiguous()
    elif kind == "wrong_shape":
        saved["state"][index][name] = torch.cat([value.reshape(-1), value.reshape(-1)[:1]])
    elif kind == "missing":
        del saved["state"][index][name]
    return saved, index


@each_case
@pytest.mark.parametrize("kind", ["nan", "inf", "transposed", "wrong_shape", "missing"])
def test_load_state_dict_rejects_corrupt_state_atomically(case, kind):
    """NaN/Inf, a transposed or wrong-shape tensor or a missing entry raise
    ``ValueError`` naming the parameter, and the optimizer is left exactly as it was (it then
    takes the same step as an untouched copy)."""
    model, opt, (x, y) = _trained(case)
    saved, index = _corrupt(opt.state_dict(), kind)
    name = opt.state_dict()["param_groups"][0]["param_names"][index]
    before = _snapshot(opt)
    witness = copy.deepcopy({"model": model, "opt": opt})
    with pytest.raises(ValueError, match=f"parameter '{name}'"):
        opt.load_state_dict(saved)
    _same(before, _snapshot(opt))
    _train(model, opt, case, 2, x, y)
    _train(witness["model"], witness["opt"], case, 2, x, y)
    assert torch.equal(_flat(model), _flat(witness["model"]))


_OTHER = {pt.AGD: pt.ASGO, pt.ASGO: pt.DASGO, pt.DASGO: pt.ASGO, pt.MBF: pt.AGD, pt.RFRMSProp: pt.RFAdamW,
          pt.RFAdamW: pt.RFRMSProp, pt.IFShampoo: pt.RFRMSProp, pt.Sketchy: pt.SAdaGrad, pt.SAdaGrad: pt.Sketchy}


@each_case
def test_load_state_dict_rejects_another_class(case):
    """Another optimizer's state_dict (ours or torch's Adam) raises a
    ``ValueError`` and changes nothing."""
    model, opt, (x, y) = _trained(case)
    other_case = next(c for c in TORCH_CASES if c.cls is _OTHER[case.cls])
    other_model = _model()
    other = other_case.make(other_model.named_parameters())
    _train(other_model, other, other_case, 2, x, y)
    adam = torch.optim.Adam(model.parameters())
    before = _snapshot(opt)
    for foreign in (other.state_dict(), adam.state_dict()):
        with pytest.raises(ValueError, match="another optimizer|parameter"):
            opt.load_state_dict(foreign)
        _same(before, _snapshot(opt))


def test_load_state_dict_names_the_class_that_saved_another_classs_checkpoint():
    """Every class given the stepped checkpoint of each other class of the adapter (72 pairs,
    DASGO's into ASGO among them, whose hyperparameters are a part of ASGO's) refuses it, says
    which class saved it, and changes nothing.

    Invariant: a checkpoint of another optimizer class is refused as that class's, before any
    check of the state's layout, whose hints (a ``side=``, ``block_size=`` or ``rank=`` to build
    with) are for a checkpoint of the loading class saved with other settings."""
    x, y = _data()
    first = {}
    for case in TORCH_CASES:
        first.setdefault(case.cls, case)
    saved = {}
    for cls, case in first.items():
        model = _model()
        opt = case.make(model.named_parameters())
        _train(model, opt, case, 2, x, y)
        saved[cls] = opt.state_dict()
    wrong = []
    for cls, case in first.items():
        opt = case.make(_model().named_parameters())
        before = _snapshot(opt)
        for other, checkpoint in saved.items():
            if other is cls:
                continue
            with pytest.raises(ValueError) as refused:
                opt.load_state_dict(checkpoint)
            said = f"{cls.__name__}.load_state_dict: the state_dict was saved by {other.__name__}, not {cls.__name__}"
            if not str(refused.value).startswith(said):
                wrong.append(f"{cls.__name__} <- {other.__name__}: {refused.value}")
            _same(before, _snapshot(opt))
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------
# item 9: param_names, hooks, older checkpoints


def test_param_names_are_kept_and_mixed_names_raise_like_torch():
    """``state_dict()`` has torch's ``param_names`` (as Adam's); mixing named and unnamed
    parameters raises the ``ValueError`` torch raises."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    for cls in (pt.AGD, pt.ASGO, pt.Sketchy):
        ours = cls(model.named_parameters(), lr=1e-2).state_dict()["param_groups"][0]["param_names"]
        assert ours == torch.optim.Adam(model.named_parameters()).state_dict()["param_groups"][0]["param_names"] == names
        mixed = [("0.weight", model[0].weight), model[0].bias]
        with pytest.raises(ValueError, match="with/without names"):
            torch.optim.Adam(mixed)
        with pytest.raises(ValueError, match="with/without names"):
            cls(mixed, lr=1e-2)
        with pytest.raises(ValueError, match="with/without names"):
            opt = cls(model[0].named_parameters(), lr=1e-2)
            opt.add_param_group({"params": list(model[2].parameters())})


@each_case
def test_load_hooks_see_the_real_state(case):
    """A pre-hook may rewrite the incoming dict; a post-hook sees the loaded state."""
    model, opt, _ = _trained(case)
    saved = opt.state_dict()
    fresh = case.make(_model().named_parameters())
    seen = []

    def pre(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.125
        return state_dict

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append({k: dict(v) for k, v in o.state.items()}))
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.125
    assert len(seen) == 1 and len(seen[0]) == len(list(model.parameters()))
    assert all(int(e["step"]) == 3 for e in seen[0].values())


@each_case
def test_step_saved_as_a_python_number_loads_and_steps(case):
    """Older checkpoints (and torch's non-tensor ``step``): an int ``step`` loads, continues
    exactly as the tensor one, and comes back as a tensor."""
    model, opt, (x, y) = _trained(case)
    saved = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)
    for entries in old["state"].values():
        entries["step"] = int(entries["step"])
        entries.pop("nonfinite_count")
        entries.pop("calls")
    runs = []
    for checkpoint in (saved, old):
        m = _model(seed=7)
        m.load_state_dict(model.state_dict())
        o = case.make(m.named_parameters())
        o.load_state_dict(checkpoint)
        assert all(isinstance(e["step"], torch.Tensor) for e in o.state.values())
        _train(m, o, case, 2, x, y)
        runs.append(_flat(m))
    assert torch.equal(runs[0], runs[1])


# --------------------------------------------------------------------------------------------
# item 10: callables are configuration


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: pt.ASGO(ps, lr=3e-2, fallback_filter=lambda name, p: name.startswith("2.")),
        lambda ps: pt.DASGO(ps, lr=3e-2, fallback_filter=lambda name, p: name.startswith("2.")),
        lambda ps: pt.IFShampoo(ps, lr=5e-2, batch_size=32, precondition_every=pr.prototype_schedule(2)),
    ],
    ids=["asgo-fallback_filter", "dasgo-fallback_filter", "if_shampoo-prototype_schedule"],
)
def test_checkpoints_with_callable_hyperparameters_save_and_resume(make):
    """The docs' callables stay out of ``state_dict`` (it pickles), and loading
    keeps the loading optimizer's callable; the resumed run equals the uninterrupted one."""
    x, y = _data()
    model = _model()
    opt = make(model.named_parameters())
    case = TORCH_CASES[0]  # no step kwargs
    _train(model, opt, case, 3, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only: plain data
    callable_keys = [k for k, v in opt.param_groups[0].items() if callable(v)]
    assert callable_keys and not any(k in checkpoint["opt"]["param_groups"][0] for k in callable_keys)
    resumed = _model(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(resumed.named_parameters())
    opt2.load_state_dict(checkpoint["opt"])
    assert all(opt2.param_groups[0][k] is not None for k in callable_keys)
    _train(model, opt, case, 3, x, y)
    _train(resumed, opt2, case, 3, x, y)
    assert torch.equal(_flat(model), _flat(resumed))


# --------------------------------------------------------------------------------------------
# item 14: RFAdamW's core arguments


def test_rf_adamw_takes_the_core_factorys_state_arguments():
    """``initial_scale``, ``scale_by_batch_size`` and ``state_dtype`` reach :func:`precond_ref.rf_adamw`."""
    x, y = _data()
    kwargs = dict(initial_scale=2.0, scale_by_batch_size=False, state_dtype=torch.float32)
    model = _model()
    opt = pt.RFAdamW(model.named_parameters(), lr=5e-2, damping=1e-2, batch_size=32, **kwargs)
    _train(model, opt, TORCH_CASES[0], 2, x, y)
    assert all(v.dtype in (torch.float32, torch.int32) for e in opt.state.values() for v in e.values() if isinstance(v, torch.Tensor))
    core = pr.rf_adamw(learning_rate=5e-2, damping=1e-2, batch_size=32, **kwargs)
    model2 = _model()
    params = {n: p.detach() for n, p in model2.named_parameters()}
    nested = {}
    for n, p in params.items():
        a, b = n.split(".")
        nested.setdefault(a, {})[b] = p
    state = core.init(nested)
    for _ in range(2):
        model2.zero_grad()
        _loss(model2, x, y).backward()
        grads = {}
        for n, p in model2.named_parameters():
            a, b = n.split(".")
            grads.setdefault(a, {})[b] = p.grad
        updates, state = core.update(grads, state, nested)
        with torch.no_grad():
            for n, p in model2.named_parameters():
                a, b = n.split(".")
                p.add_(updates[a][b])
    torch.testing.assert_close(_flat(model), _flat(model2), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Resuming with a learning-rate scheduler

_ONE_CASE_PER_CLASS = list({c.cls: c for c in reversed(TORCH_CASES)}.values())[::-1]

_SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * opt.defaults["lr"], total_steps=8),
}


@pytest.mark.parametrize("schedule", sorted(_SCHEDULERS))
@pytest.mark.parametrize("case", _ONE_CASE_PER_CLASS, ids=lambda c: c.id)
def test_resume_with_a_scheduler_is_bit_exact(case, schedule):
    """Saving optimizer and scheduler after 3 steps, building both anew, loading and taking 3 more
    steps gives the parameters of 6 uninterrupted steps bit for bit.

    Invariant (torch's Optimizer.load_state_dict keeps param-group keys the class does not take): schedulers keep their own entries in the param groups (``initial_lr``;
    OneCycleLR's ``max_lr``, ``min_lr``, ``max_momentum``, ``base_momentum``), which a resume must
    carry over. Same operations on the same float64 numbers, so equal exactly.
    """
    x, y = _data()
    make_schedule = _SCHEDULERS[schedule]

    def run(model, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step(**case.step_kwargs)
            sched.step()

    model = _model()
    opt = case.make(model.named_parameters())
    sched = make_schedule(opt)
    run(model, opt, sched, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    if schedule == "OneCycleLR":
        assert {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"} <= set(saved["opt"]["param_groups"][0])
    run(model, opt, sched, 3)

    resumed = _model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = case.make(resumed.named_parameters())
    sched2 = make_schedule(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    run(resumed, opt2, sched2, 3)
    assert torch.equal(_flat(resumed), _flat(model))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c.cls is pt.MBF or c.kwargs.get("grouping") == "weight_bias"]
                         + [dataclasses.replace(c, id=f"{c.id}-weight_bias", kwargs={**c.kwargs, "grouping": "weight_bias"})
                            for c in TORCH_CASES if c.id == "if_shampoo"], ids=lambda c: c.id)
def test_block_with_a_frozen_member_resumes_from_either_checkpoint_layout(case, frozen):
    """A block (a weight with its bias) with a member that does not require grad: its state is
    held by its first member, the weight, which may be the frozen one. ``state_dict()`` puts it on
    a member that requires grad (torch DCP leaves out the state of the others), and both that
    checkpoint and one of the earlier layout, where the frozen weight holds it, load and continue
    bit for bit as the uninterrupted run, with the same state; the state of an optimizer that saves
    is not changed by saving."""
    x, y = _data()

    def fresh():
        model = _model()
        getattr(model[0], frozen).requires_grad_(False)
        return model, case.make(model.named_parameters())

    model, opt = fresh()
    _train(model, opt, case, 3, x, y)
    before = _snapshot(opt)
    saved = opt.state_dict()
    _same(before, _snapshot(opt))
    weight, bias = saved["state"][0], saved["state"][1]
    holder, other = (bias, weight) if frozen == "weight" else (weight, bias)
    assert holder.get("core_group") and not other.get("core_group")
    earlier = torch.optim.Optimizer.state_dict(opt)  # the layout of the optimizer's own state
    assert earlier["state"][0].get("core_group")
    resumed = []
    for checkpoint in (saved, earlier):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        twin, twin_opt = fresh()
        twin.load_state_dict(model.state_dict())
        twin_opt.load_state_dict(torch.load(buffer, weights_only=False))
        resumed.append((twin, twin_opt))
    _train(model, opt, case, 3, x, y)
    for twin, twin_opt in resumed:
        _train(twin, twin_opt, case, 3, x, y)
        assert torch.equal(_flat(model), _flat(twin))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert list(opt.state[p]) == list(twin_opt.state[q])
            for name, value in opt.state[p].items():
                other = twin_opt.state[q][name]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
