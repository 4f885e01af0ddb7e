"""The state-size check at construction (``adapters/_torch_memory.py``)."""

from __future__ import annotations

import pytest
import torch

from cases import TORCH_CASES
from precond_ref.adapters import _torch_memory
from test_torch_contract import _data, _model, _train

import precond_ref.adapters.torch as pt

_COUNTERS = ("step", "nonfinite_count")


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)
def test_estimate_is_the_state_the_first_step_makes(case):
    """The meta-device ``init`` estimate equals the bytes of every state tensor (the counters
    aside) after the first step, for every method and setting (float64 and bf16 parameters)."""
    for dtype in (torch.float64, torch.bfloat16):
        model = _model(dtype)
        opt = case.make(model.named_parameters())
        (group,) = opt.param_groups
        (paths,) = opt._group_paths()
        estimate = _torch_memory.state_bytes(opt._transform(group), opt._tree(paths, [p.detach() for p in group["params"]]))
        _train(model, opt, case, 1, *_data(dtype))
        actual = sum(v.numel() * v.element_size() for entries in opt.state.values() for k, v in entries.items()
                     if isinstance(v, torch.Tensor) and k not in _COUNTERS)
        assert estimate == actual, (dtype, estimate, actual)


def test_state_that_cannot_fit_is_refused_at_construction(monkeypatch):
    """With less memory free than the state needs, construction raises ``MemoryError`` naming the
    class, the estimate and what lowers it; with enough, it constructs. (The size threshold is
    lowered so that a small model is checked.)"""
    monkeypatch.setattr(_torch_memory, "CHECK_FROM_ELEMENTS", 0)
    model = torch.nn.Linear(256, 256)
    params = 256 * 257
    needed = 32 * params * 4  # S-AdaGrad's rank-32 basis of the flattened weight and of the bias, float32
    monkeypatch.setattr(_torch_memory, "available_bytes", lambda device: needed // 2)
    with pytest.raises(MemoryError, match=r"SAdaGrad: the state for these parameters needs about 0\.0 GiB \(32\.\d\dx .* lower rank"):
        pt.SAdaGrad(model.named_parameters(), rank=32)
    monkeypatch.setattr(_torch_memory, "available_bytes", lambda device: 2 * needed)
    pt.SAdaGrad(model.named_parameters(), rank=32)
    pt.AGD(model.named_parameters())


def test_meta_parameters_are_not_checked(monkeypatch):
    """The meta device has no memory to compare with: nothing is refused there."""
    monkeypatch.setattr(_torch_memory, "CHECK_FROM_ELEMENTS", 0)
    with torch.device("meta"):
        model = torch.nn.Linear(4096, 4096)
    pt.SAdaGrad(model.named_parameters(), rank=4096)
