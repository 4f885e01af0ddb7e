"""The state-size check at construction (``adapters/_torch_memory.py``)."""

from __future__ import annotations

import pytest
import torch

from cases import TORCH_CASES
from precond_ref import sketch
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
    monkeypatch.setattr(_torch_memory, "available_bytes", lambda device: 5 * needed)
    pt.SAdaGrad(model.named_parameters(), rank=32)
    pt.AGD(model.named_parameters())


def test_step_beside_the_state_is_counted(monkeypatch):
    """The estimate is the state plus what the step holds beside it (``step_bytes``): with memory
    for the state alone S-AdaGrad is refused, the message giving both parts and the largest leaf.
    Its sketches within ``FD_ROWS_BYTES`` make new arrays (the new state of each, plus its stacked
    input and frame: more than twice the state in all); over the bound (lowered here), a sketch is
    stepped by row blocks in place, so the step holds two blocks and a few d-vectors beside it."""
    monkeypatch.setattr(_torch_memory, "CHECK_FROM_ELEMENTS", 0)
    model = torch.nn.Linear(256, 256)
    opt = pt.SAdaGrad(model.named_parameters(), rank=32)
    (group,), (paths,) = opt.param_groups, opt._group_paths()
    arrays = _torch_memory.state_arrays(opt._transform(group), opt._tree(paths, [p.detach() for p in group["params"]]))
    state = sum(nbytes for entries in arrays.values() for _, nbytes in entries.values())
    basis = 256 * 256 * 32 * 4
    step = _torch_memory.step_bytes("SAdaGrad", arrays, torch.device("cpu"))
    assert step >= state + 2 * basis  # the new state, the frame and the stacked input of the weight's sketch
    monkeypatch.setattr(_torch_memory, "available_bytes", lambda device: state + step // 2)
    with pytest.raises(MemoryError, match=r"the most, 0\.01 GiB, for parameter 'weight'\) and a step about 0\.0 GiB more beside it"):
        pt.SAdaGrad(model.named_parameters(), rank=32)
    monkeypatch.setattr(sketch, "FD_ROWS_BYTES", 2**16)  # the weight's basis (8 MiB) is now stepped in place
    in_rows = _torch_memory.step_bytes("SAdaGrad", arrays, torch.device("cpu"))
    assert in_rows == state - basis + 2 * 2**16 + 8 * 256 * 256 * 4
    assert _torch_memory.step_bytes("AGD", {"w": {"a": ((3, 4), 48), "b": ((5,), 20)}}, torch.device("cpu")) == 48


def test_meta_parameters_are_not_checked(monkeypatch):
    """The meta device has no memory to compare with: nothing is refused there."""
    monkeypatch.setattr(_torch_memory, "CHECK_FROM_ELEMENTS", 0)
    with torch.device("meta"):
        model = torch.nn.Linear(4096, 4096)
    pt.SAdaGrad(model.named_parameters(), rank=4096)
