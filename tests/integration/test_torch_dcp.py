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
