"""Persistent stacks in the torch optimizers: each state entry handed back as a view of its stack
and joined again as that stack (``_backend.joined``, docs/engine.md "Persistent stacks"); the same
numbers as joins that copy, state_dict / torch.save / deepcopy / load unchanged by it, the
captured step's in-place writes one copy per run of a stack."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

import precond_ref._backend as backend
import precond_ref.adapters.torch as pt
from precond_ref.adapters import _torch_core
from fake_graphs import fake_graphs
from precond_ref.benchmarks.counting import count_step, gpu_grouping

STACKING = {
    "ASGO": lambda m: pt.ASGO(m.parameters(), lr=1e-2),
    "DASGO": lambda m: pt.DASGO(m.parameters(), lr=1e-2),
    "IFShampoo": lambda m: pt.IFShampoo(m.parameters(), lr=1e-2, batch_size=4, precondition_every=2),
    "Sketchy": lambda m: pt.Sketchy(m.parameters(), lr=1e-2, rank=2, precondition_every=2),
    "SAdaGrad": lambda m: pt.SAdaGrad(m.parameters(), lr=1e-2, rank=2),
    "MBF": lambda m: pt.MBF(m.named_parameters(), lr=1e-2),
}


def _layers(seed=0):
    """Four equal 6x6 layers with biases (the equal blocks of all leaves stack), in float64."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(torch.nn.Linear(6, 6, dtype=torch.float64) for _ in range(4)))


def _grads(model, step):
    """Random gradients, a NaN in one on step 3 (a skipped step: the non-finite rule's selection)."""
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    if step == 3:
        p.grad[0] = float("nan")


def _run(make, steps, model=None, opt=None, first=0):
    model = model or _layers()
    opt = opt or make(model)
    for t in range(first, first + steps):
        _grads(model, t)
        opt.step()
    return model, opt


def _copies_only(monkeypatch):
    """Every join a copy and every in-place write one ``copy_`` per leaf and entry."""
    for module in (backend, _torch_core):
        monkeypatch.setattr(module, "consecutive_view", lambda arrays, new_axis: None)


@pytest.mark.parametrize("grouping", ["cpu", "gpu"])
@pytest.mark.parametrize("name", list(STACKING))
def test_persistent_stacks_change_no_number_and_save_operations(name, grouping, monkeypatch):
    """The trajectory with joins and selections as views is bitwise the one with every join a
    copy and every selection per leaf (the plain formulas ``concat`` and ``where``), a skipped step
    included, on this CPU's grouping and a GPU's (which selects element-wise, no host read); a warm
    step issues no more operations, and strictly fewer for ASGO, DASGO and IF-Shampoo (their stacked
    state entries are not copied) and, with a GPU's grouping, Sketchy (its grafting entries are
    selected once per stack, not per leaf)."""
    fewer = ("ASGO", "DASGO", "IFShampoo") + (("Sketchy",) if grouping == "gpu" else ())
    with gpu_grouping() if grouping == "gpu" else contextlib.nullcontext():
        model, opt = _run(STACKING[name], 6)
        _grads(model, 6)
        views = count_step(opt.step)["operations"]
        with monkeypatch.context() as m:
            _copies_only(m)
            plain, plain_opt = _run(STACKING[name], 6)
            _grads(plain, 6)
            copies = count_step(plain_opt.step)["operations"]
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), plain.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, plain_opt.state[q][key]) if isinstance(value, torch.Tensor) else value == plain_opt.state[q][key]
    assert views < copies if name in fewer else views <= copies


@pytest.mark.parametrize("name", ["ASGO", "IFShampoo"])
def test_state_saved_loaded_and_copied_as_per_parameter_tensors(name):
    """With the state in views of shared stacks: ``torch.save`` of ``state_dict()`` writes each
    storage once (the file is about the state's bytes, not a stack per entry), and a run resumed
    from the saved state, or from a deepcopy, continues bitwise as the uninterrupted run."""
    model, opt = _run(STACKING[name], 4)
    state = opt.state_dict()
    tensors = [v for entries in state["state"].values() for v in entries.values() if isinstance(v, torch.Tensor)]
    assert any(v._base is not None for v in tensors)  # the state is in stacks
    nbytes = sum(v.numel() * v.element_size() for v in tensors)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert nbytes <= len(buffer.getvalue()) <= 1.05 * nbytes + 64 * 1024
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = STACKING[name](resumed_model)
    resumed.load_state_dict(loaded)
    twin_model, twin = copy.deepcopy((model, opt))
    _run(None, 3, model, opt, first=4)
    _run(None, 3, resumed_model, resumed, first=4)
    _run(None, 3, twin_model, twin, first=4)
    for p, q, r in zip(model.parameters(), resumed_model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def _tensors(opt):
    return [v for entries in opt.state.values() for v in entries.values() if isinstance(v, torch.Tensor)]


def test_captured_state_is_written_by_runs_and_restacked_after_a_load(monkeypatch):
    """A captured step (CUDA graphs' CPU double) keeps its state tensors and writes each step's
    state into them: bitwise the uncaptured trajectory, with one ``copy_`` per run of consecutive
    pieces of a stack, fewer than one per leaf and entry (what every-pair copies issue). After
    ``load_state_dict`` the next step keeps the state it hands back (views of its stacks, not the
    loaded separate tensors), and the steps after it write in place again."""
    def make(m):
        return pt.DASGO(m.parameters(), lr=1e-2, capture=True, compile=False)

    def replayed_copies(model, opt, t):
        _grads(model, t)
        return count_step(opt.step)["by_name"].get("copy_", 0)

    with fake_graphs() as graphs:
        model, opt = _run(make, 3)
        kept = [id(v) for v in _tensors(opt)]
        copies = replayed_copies(model, opt, 3)
        assert graphs.replays() > 0 and [id(v) for v in _tensors(opt)] == kept
        with monkeypatch.context() as m:
            _copies_only(m)
            twin, twin_opt = _run(make, 3)
            pairwise = replayed_copies(twin, twin_opt, 3)
        assert 0 < copies < pairwise
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        assert all(v._base is None for v in _tensors(opt))
        _run(None, 1, model, opt, first=4)
        restacked = [id(v) for v in _tensors(opt)]
        assert any(v._base is not None for v in _tensors(opt))
        _run(None, 2, model, opt, first=5)
        assert [id(v) for v in _tensors(opt)] == restacked
    plain, _ = _run(STACKING["DASGO"], 7)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
