"""pytorch_optimizer's generic optimizer tests (kozistr/pytorch_optimizer ``tests/``), transcribed
for our torch classes on the method table of ``tests/adapters/cases.py``.

Transcribed: ``test_f32_optimizers`` and ``test_bf16_optimizers`` (``tests/test_optimizers.py``:
the 2-2-1 ReLU logistic regression of ``tests/utils.py`` on the 100 separable points of
``tests/conftest.py``, trained until the loss falls below 1/1.5 of its first value; bf16 parameters
stepped under CPU autocast), ``test_closure`` (a parameter without a gradient stepped with a
closure returning a Python float), ``test_no_gradients`` (``tests/test_gradients.py``: groups that
mix parameters without ``requires_grad`` with ones whose gradients carry a graph),
``test_sparse_not_supported`` and ``test_complex_not_supported`` (refused at ``step``), and the
invalid-hyperparameter tests of ``tests/test_general_optimizer_parameters.py`` (negative ``lr``,
``eps``, ``weight_decay``, ``momentum``, ``betas``, with ``params=None``: refused before the
parameters are looked at, as torch.optim does).

Not transcribed, one line each: ``foreach`` variants (one implementation per method);
``test_complex_optimizers`` (no method supports complex parameters; their refusal is tested);
``test_sparse``/``test_sparse_supported`` (no method supports sparse gradients);
``test_init_group`` (pytorch_optimizer's own ``init_group`` API); the per-optimizer tests
(SAM, Lookahead, Ranger21, ...: other optimizers).
"""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "adapters"))
from cases import TORCH_CASES  # noqa: E402

import precond_ref.adapters.torch as pt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MBF. .* parameter")  # pytorch_optimizer passes unnamed params

CLASSES = (pt.AGD, pt.ASGO, pt.DASGO, pt.MBF, pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo, pt.Sketchy, pt.SAdaGrad)
each_class = pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
each_case = pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)

# The toy problem's settings (pytorch_optimizer's table gives each optimizer its own lr and
# iteration count): 20 iterations, ten times the case's learning rate (the cases' rates suit a
# smaller-gradient regression), the loss's 100 examples for the root-free methods. MBF: a KL bound
# of 1e-2 (the default bound, for lr <~ 1e-3, throttles these larger steps); Sketchy with
# ``precondition_1d``: the case's own rate (three times it overshoots on this 2-feature problem).
ITERATIONS = 20
_OVERRIDES = {"mbf": dict(kl_clip=1e-2), "sketchy": dict(lr_scale=1.0)}


def _make(case, params):
    overrides = dict(_OVERRIDES.get(case.id, {}))
    kwargs = {**case.kwargs, "lr": case.lr * overrides.pop("lr_scale", 10.0), **overrides}
    if "batch_size" in kwargs:
        kwargs["batch_size"] = 100
    step_kwargs = {**case.step_kwargs, **({"batch_size": 100} if "batch_size" in case.step_kwargs else {})}
    return case.cls(params, **kwargs), step_kwargs


def _environment():
    """pytorch_optimizer's ``environment`` fixture: two Gaussian clouds of 50 points at -2 and +2."""
    torch.manual_seed(42)
    rng = np.random.RandomState(42)
    x = rng.randn(100, 2) * 2
    x[:50, :] = x[:50, :] - 2 * np.ones((50, 2))
    x[50:, :] = x[50:, :] + 2 * np.ones((50, 2))
    y = np.array([0] * 50 + [1] * 50).reshape(100, 1)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


class LogisticRegression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        self.fc2 = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _run(case, bf16):
    """pytorch_optimizer's ``Trainer.run`` / ``run_bf16``: the loss must fall by a factor 1.5."""
    x, y = _environment()
    torch.manual_seed(42)
    model = LogisticRegression()
    if bf16:
        model = model.bfloat16()
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer, step_kwargs = _make(case, model.named_parameters())
    init_loss = loss = None
    for _ in range(ITERATIONS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        init_loss = loss if init_loss is None else init_loss
        loss.backward()
        optimizer.step(**step_kwargs)
    assert init_loss.item() > 1.5 * loss.item(), (init_loss.item(), loss.item())
    assert all(p.dtype == (torch.bfloat16 if bf16 else torch.float32) for p in model.parameters())


@each_case
def test_f32_optimizers(case):
    _run(case, bf16=False)


@each_case
def test_bf16_optimizers(case):
    _run(case, bf16=True)


def _simple_parameter(requires_grad=True):
    """pytorch_optimizer's ``simple_parameter``: a 1x1 zero with a zero gradient (even when it does
    not require one)."""
    param = torch.zeros(1, 1).requires_grad_(requires_grad)
    param.grad = torch.zeros(1, 1)
    return param


def _batch(cls):
    return {"batch_size": 1} if issubclass(cls, (pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo)) else {}


@each_class
def test_closure(cls):
    """A parameter whose gradient is None, stepped with a closure returning ``1.0``: the step
    returns the closure's value and leaves the parameter (and the state) alone."""
    param = _simple_parameter()
    param.grad = None
    optimizer = cls([param], **_batch(cls))
    optimizer.zero_grad()
    assert optimizer.step(closure=lambda: 1.0) == 1.0
    assert torch.equal(param.detach(), torch.zeros(1, 1)) and not optimizer.state[param]


@each_class
def test_no_gradients(cls):
    """Groups mixing parameters that do not require gradients (p2, p4: they hold a stale zero
    gradient) with ones whose gradients were made with ``create_graph=True`` (p1, p3): the step
    runs, with the closure's value returned, and moves p1 and p3 only."""
    p1, p2, p3, p4 = (_simple_parameter(requires_grad=r) for r in (True, False, True, False))
    optimizer = cls([{"params": [p1, p2]}, {"params": [p3]}, {"params": [p4]}], **_batch(cls))
    optimizer.zero_grad()
    with torch.no_grad():
        p1.fill_(1.0)
    loss = (p1 + p3).pow(2).sum()
    p1.grad, p3.grad = torch.autograd.grad(loss, [p1, p3], create_graph=True)
    assert optimizer.step(lambda: 0.1) == 0.1
    optimizer.zero_grad(set_to_none=True)
    assert p1.item() != 1.0 and p3.item() != 0.0
    assert p2.item() == 0.0 and p4.item() == 0.0


@each_class
def test_sparse_not_supported(cls):
    """A sparse gradient is refused at ``step`` with torch's error type, naming sparse gradients."""
    weight = torch.randn(5, 1).requires_grad_(True)
    weight.grad = torch.rand_like(weight)
    weight.grad[0] = 0.0
    sparse = weight.detach().requires_grad_(True)
    sparse.grad = weight.grad.to_sparse()
    optimizer = cls([sparse], **_batch(cls))
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step(lambda: 0.1)


@each_class
def test_complex_not_supported(cls):
    """A complex parameter is refused at ``step``, the message naming the leaf and its dtype."""
    param = torch.zeros(1, 1, dtype=torch.complex64).requires_grad_(True)
    param.grad = torch.randn(1, 1, dtype=torch.complex64)
    optimizer = cls([param], **_batch(cls))
    with pytest.raises(TypeError, match=r"'param0' has dtype torch\.complex64"):
        optimizer.step(lambda: 0.1)


def _invalid_hyperparameters(cls):
    """The negative values of pytorch_optimizer's validation tests that ``cls`` has arguments for."""
    names = inspect.signature(cls).parameters
    candidates = [("lr", -1e-2), ("eps", -1e-6), ("weight_decay", -1e-3), ("momentum", -1e-3),
                  ("betas", (-0.1, 0.1)), ("betas", (0.1, -0.1))]
    return [(name, value) for name, value in candidates if name in names]


@each_class
def test_invalid_hyperparameters_refused_before_params(cls):
    """``cls(None, name=value)`` raises ``ValueError`` naming the argument (pytorch_optimizer passes
    ``params=None``: the hyperparameters are checked first, as torch.optim's are)."""
    cases = _invalid_hyperparameters(cls)
    assert {"lr", "weight_decay"} <= {name for name, _ in cases}
    for name, value in cases:
        with pytest.raises(ValueError, match=rf"^{name}(\[\d\])? must be"):
            cls(None, **{name: value})
