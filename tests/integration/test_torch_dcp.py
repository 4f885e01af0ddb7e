"""torch Distributed Checkpoint (DCP): ``get_state_dict`` / ``dcp.save`` / ``dcp.load`` /
``set_state_dict`` in one process.

Invariant: a run interrupted after 4 steps, saved with DCP and loaded into a fresh model and
optimizer continues exactly as the uninterrupted run (same losses, same parameters bit for bit).
DCP's state-dict helpers rekey the optimizer state by parameter name (FQN) and, for a fresh
optimizer that has no state yet, take one step at lr=0 with zero gradients to create it before
loading (``_init_optim_state``); the loaded state must replace all of that.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from framework_cases import (
    TORCH_OPTIMIZERS,
    assert_same_parameters,
    batches,
    make_mlp,
    make_optimizer,
    parameters,
)

STEPS, SPLIT = 8, 4


def _fresh(name, scheduler):
    model = make_mlp()
    opt = make_optimizer(name, model.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    return model, opt, sched


def _train(model, opt, sched, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _check(name, scheduler, tmp_path):
    data = batches(STEPS)
    model, opt, sched = _fresh(name, scheduler)
    full = _train(model, opt, sched, data)

    model1, opt1, sched1 = _fresh(name, scheduler)
    _train(model1, opt1, sched1, data[:SPLIT])
    model_sd, optim_sd = get_state_dict(model1, opt1)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "ckpt")
    sched_sd = sched1.state_dict() if scheduler else None

    model2, opt2, sched2 = _fresh(name, scheduler)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=tmp_path / "ckpt")
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    if scheduler:
        sched2.load_state_dict(sched_sd)
    resumed = _train(model2, opt2, sched2, data[SPLIT:])

    assert resumed == full[SPLIT:]
    assert_same_parameters(parameters(model), parameters(model2))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
def test_dcp_resume_continues_exactly(name, tmp_path):
    _check(name, scheduler=False, tmp_path=tmp_path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", ["agd", "mbf"])
def test_dcp_resume_with_scheduler_continues_exactly(name, tmp_path):
    _check(name, scheduler=True, tmp_path=tmp_path)


def _counting(name):
    """A fresh model and root-free optimizer that counts B from the model's forwards (``model=``,
    no ``batch_size``); the batches hold as many examples as ``TORCH_OPTIMIZERS``' batch_size."""
    cls, kwargs = TORCH_OPTIMIZERS[name]
    model = make_mlp()
    return model, cls(model.named_parameters(), model=model, **{k: v for k, v in kwargs.items() if k != "batch_size"})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("split", [0, SPLIT], ids=["before-the-first-step", "after-4-steps"])
@pytest.mark.parametrize("name", ["rf_rmsprop", "rf_adamw", "if_shampoo"])
def test_dcp_resume_of_a_counting_root_free_optimizer_continues_exactly(name, split, tmp_path):
    """The root-free classes built with ``model=`` (B counted from the forwards) save and load
    through DCP, before their first step and after some, and the loaded run continues exactly as
    the saved one. DCP's state-dict helpers step an optimizer without state once, with zero
    gradients at lr=0 and no forward, so nothing is counted: B multiplies only gradient terms, so
    that step is the same for every B, and the optimizer takes it with B = 1 rather than raising."""
    data = batches(STEPS)
    model1, opt1 = _counting(name)
    _train(model1, opt1, None, data[:split])
    model_sd, optim_sd = get_state_dict(model1, opt1)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "ckpt")

    model2, opt2 = _counting(name)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=tmp_path / "ckpt")
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])

    assert _train(model2, opt2, None, data[split:]) == _train(model1, opt1, None, data[split:])
    assert_same_parameters(parameters(model1), parameters(model2))


def _state(opt, model):
    """The optimizer's state by parameter name, each tensor copied."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
            for p, entries in opt.state.items()}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("name", ["mbf", "if_shampoo"])
def test_dcp_resume_with_a_frozen_block_member_continues_exactly(name, frozen, tmp_path):
    """A block (a Linear's weight with its bias: MBF, IF-Shampoo's ``grouping="weight_bias"``) one
    of whose members does not require grad (a frozen bias; a frozen weight with a trained bias, as
    BitFit trains) resumes through DCP exactly as the uninterrupted run: same losses, same
    parameters and the same optimizer state bit for bit. ``set_state_dict`` hands
    ``load_state_dict`` no state for a parameter that does not require grad, while the frozen member
    took part in its block's steps with a zero gradient and, as the block's first member, holds its
    state: ``state_dict()`` puts that state on the trained member, and ``load_state_dict`` gives the
    frozen one its partners' call count and puts the state back."""
    cls, kwargs = TORCH_OPTIMIZERS[name]
    kwargs = {**kwargs, "grouping": "weight_bias"} if name == "if_shampoo" else kwargs

    def fresh():
        model = make_mlp()
        getattr(model[0], frozen).requires_grad_(False)
        return model, cls(model.named_parameters(), **kwargs)

    data = batches(STEPS)
    model, opt = fresh()
    full = _train(model, opt, None, data)

    model1, opt1 = fresh()
    _train(model1, opt1, None, data[:SPLIT])
    model_sd, optim_sd = get_state_dict(model1, opt1)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "ckpt")

    model2, opt2 = fresh()
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=tmp_path / "ckpt")
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])

    assert _train(model2, opt2, None, data[SPLIT:]) == full[SPLIT:]
    assert_same_parameters(parameters(model), parameters(model2))
    expected, resumed = _state(opt, model), _state(opt2, model2)
    assert expected.keys() == resumed.keys()
    for key, entries in expected.items():
        assert list(entries) == list(resumed[key]), key
        for entry, value in entries.items():
            same = torch.equal(value, resumed[key][entry]) if isinstance(value, torch.Tensor) else value == resumed[key][entry]
            assert same, (key, entry)
