"""The torch classes inside the workflows torch users already have: the edge cases of param
groups and parameters (empty, 0-D), mixed precision with ``torch.amp.GradScaler``, schedulers and
checkpoints, each checked against the same steps taken plainly or against ``torch.optim``'s
own behaviour.

One configuration per class (the first of each in ``cases.TORCH_CASES``) keeps the file cheap.
"""

from __future__ import annotations

import pytest
import torch

from cases import TORCH_CASES

CLASS_CASES = list({c.cls: c for c in reversed(TORCH_CASES)}.values())[::-1]

pytestmark = pytest.mark.parametrize("case", CLASS_CASES, ids=lambda c: c.cls.__name__)


def test_a_skipped_step_skips_a_group_holding_an_empty_parameter(case):
    """The non-finite rule decides for the whole step (docs/adapters/torch.md: "a non-finite
    gradient in any param group skips every group's update (counted in each parameter's
    nonfinite_count)"). A param group that also holds an empty parameter (numel 0, e.g. a
    zero-width layer of a configurable model) is skipped like any other: the decision reaches
    each update through a NaN written into one of its gradients, which an empty gradient cannot
    hold, so its weight used to take the step the other group skipped."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    empty = torch.nn.Parameter(torch.zeros(0, 4, dtype=torch.float64))
    opt = case.make([{"params": [("a", a)]}, {"params": [("b", b), ("empty", empty)]}])
    b_before = b.detach().clone()
    a.grad = torch.full_like(a, float("inf"))
    b.grad = torch.randn_like(b)
    empty.grad = torch.zeros_like(empty)
    opt.step(**case.step_kwargs)
    assert torch.equal(b.detach(), b_before)
    assert int(opt.state[b]["nonfinite_count"]) == 1 and int(opt.state[b]["step"]) == 0
