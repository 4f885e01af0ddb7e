"""accelerate: ``Accelerator().prepare(model, optimizer[, scheduler])``, ``save_state`` / ``load_state``.

Invariant: the prepared optimizer (accelerate wraps it and round-trips its ``state_dict`` inside
``prepare``) steps as the bare one would, and a run saved with ``save_state`` after 4 steps and
loaded with ``load_state`` into freshly prepared objects continues as the uninterrupted run:
the same losses and the same final parameters, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from framework_cases import (  # noqa: E402
    REPRESENTATIVE,
    assert_same_parameters,
    batches,
    make_mlp,
    make_optimizer,
    parameters,
)

STEPS, SPLIT = 8, 4


def _prepared(name, scheduler):
    model = make_mlp()
    opt = make_optimizer(name, model.named_parameters())
    accelerator = accelerate.Accelerator(cpu=True)
    if scheduler:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return (accelerator, *accelerator.prepare(model, opt, sched))
    return (accelerator, *accelerator.prepare(model, opt), None)


def _train(accelerator, model, opt, sched, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _check(name, scheduler, tmp_path):
    data = batches(STEPS)
    run = _prepared(name, scheduler)
    full = _train(*run, data)

    # The bare optimizer, without accelerate, for the same steps.
    model = make_mlp()
    bare = make_optimizer(name, model.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(bare, step_size=3, gamma=0.5) if scheduler else None
    assert _train(accelerate.Accelerator(cpu=True), model, bare, sched, data) == full

    first = _prepared(name, scheduler)
    _train(*first, data[:SPLIT])
    first[0].save_state(str(tmp_path / "state"))
    second = _prepared(name, scheduler)
    second[0].load_state(str(tmp_path / "state"))
    resumed = _train(*second, data[SPLIT:])

    assert resumed == full[SPLIT:]
    assert_same_parameters(parameters(run[1]), parameters(second[1]))


@pytest.mark.parametrize("scheduler", [False, True], ids=["no-scheduler", "scheduler"])
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_prepare_save_load_state_continues_exactly(name, scheduler, tmp_path):
    _check(name, scheduler=scheduler, tmp_path=tmp_path)
