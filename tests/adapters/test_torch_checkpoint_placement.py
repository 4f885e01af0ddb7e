"""Where a loaded checkpoint's state lands: torch's rule, for every method.

``torch.optim.Optimizer.load_state_dict`` casts each floating state tensor to its parameter's
dtype and device and leaves ``step`` alone; Distributed Shampoo once kept the checkpoint's
placement instead, so a float64 checkpoint loaded into float32 parameters went on in float64.
Here every state tensor takes the dtype and device the loading optimizer's own first step gives
it for *its* parameters (the parameter's dtype, or the method's documented state dtype: float32
statistics of bf16 parameters, bf16 IF-Shampoo factors when asked), with the saved values
(rounded once); the counters stay int32 with their values. Checked for a float64 checkpoint into
float32 parameters, float32 into bf16 (where most methods keep float32 statistics), a checkpoint
read with ``torch.load(map_location=...)``, and parameters on the meta device (deferred
initialisation), the only other device the CPU offers.
"""

from __future__ import annotations

import io

import pytest
import torch

from cases import TORCH_CASES
from test_torch_contract import _data, _model, _train

each_case = pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)
_COUNTERS = ("step", "nonfinite_count")


def _saved(case, dtype):
    """A state_dict after 3 steps (periodic work included) of the suite's model in ``dtype``."""
    model = _model(dtype)
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 3, *_data(dtype))
    return model, opt.state_dict()


def _fresh_layout(case, dtype):
    """{(param index, key): dtype} of the state a new optimizer's first step makes for ``dtype`` params."""
    model = _model(dtype, seed=5)
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 1, *_data(dtype))
    return {(i, k): v.dtype for i, e in opt.state_dict()["state"].items() for k, v in e.items() if isinstance(v, torch.Tensor)}


def _assert_placed(case, saved, opt, params, dtype):
    """Every loaded tensor: on its parameter's device, in the dtype the optimizer's own step gives
    it, holding the saved value cast once; counters int32 and unchanged; nothing else in state."""
    layout = _fresh_layout(case, dtype)
    loaded = opt.state_dict()["state"]
    assert loaded.keys() == saved["state"].keys()
    for index, entries in saved["state"].items():
        p = params[index]
        for key, value in entries.items():
            got = loaded[index][key]
            if not isinstance(value, torch.Tensor):
                assert got == value, (index, key)
                continue
            assert got.device == p.device, (index, key, got.device)
            expected_dtype = torch.int32 if key in _COUNTERS else layout[(index, key)]
            assert got.dtype == expected_dtype, (index, key, got.dtype, expected_dtype)
            if p.device.type != "meta":  # (the meta device holds no values)
                assert torch.equal(got, value.to(got.dtype)), (index, key)


@each_case
@pytest.mark.parametrize("saved_dtype, loaded_dtype", [
    (torch.float64, torch.float32), (torch.float32, torch.bfloat16),
], ids=["f64->f32", "f32->bf16"])
def test_loaded_state_follows_the_parameters_dtype(case, saved_dtype, loaded_dtype):
    """A checkpoint of ``saved_dtype`` parameters loaded into ``loaded_dtype`` ones is placed as the
    new parameters' own state would be; the next steps keep parameters and state in those dtypes
    (no promotion back to the checkpoint's dtype)."""
    _, saved = _saved(case, saved_dtype)
    model = _model(loaded_dtype, seed=7)
    opt = case.make(model.named_parameters())
    opt.load_state_dict(saved)
    params = list(model.parameters())
    _assert_placed(case, saved, opt, params, loaded_dtype)
    before = {(i, k): v.dtype for i, e in opt.state_dict()["state"].items() for k, v in e.items() if isinstance(v, torch.Tensor)}
    _train(model, opt, case, 2, *_data(loaded_dtype))
    assert all(p.dtype == loaded_dtype for p in params)
    after = {(i, k): v.dtype for i, e in opt.state_dict()["state"].items() for k, v in e.items() if isinstance(v, torch.Tensor)}
    assert after == before


@each_case
def test_map_location_checkpoint_loads_onto_the_parameters(case):
    """``torch.load(..., map_location="cpu", weights_only=True)`` of a float64 checkpoint, loaded
    into float32 parameters: placed as the parameters' own state, and the run continues exactly as
    one loaded from the in-memory dict."""
    _, saved = _saved(case, torch.float64)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    mapped = torch.load(buffer, map_location="cpu", weights_only=True)
    runs = []
    for state_dict in (saved, mapped):
        model = _model(torch.float32, seed=7)
        opt = case.make(model.named_parameters())
        opt.load_state_dict(state_dict)
        _assert_placed(case, saved, opt, list(model.parameters()), torch.float32)
        _train(model, opt, case, 2, *_data(torch.float32))
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


@each_case
def test_checkpoint_loads_onto_meta_parameters(case):
    """Parameters on the meta device (a model built for deferred initialisation): a CPU checkpoint
    loads, every state tensor on the meta device in the parameters' state dtype, counters too."""
    _, saved = _saved(case, torch.float32)
    with torch.device("meta"):
        model = _model(torch.float32, seed=7)
    opt = case.make(model.named_parameters())
    opt.load_state_dict(saved)
    _assert_placed(case, saved, opt, list(model.parameters()), torch.float32)
