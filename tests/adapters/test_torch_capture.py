"""The torch optimizers' captured step (``capture=``, ``adapters/_torch_capture.py``) on a CPU.

CUDA graphs are replaced by the double of ``fake_graphs`` (a capture writes nothing; a replay runs
the captured update again with the objects it was captured with), so every test here is about the
bookkeeping: which steps replay, what they are fed, what makes a graph stale, what falls back. The
reference is the same run without capture: same arithmetic on the same values, so trajectories are
compared bit for bit. The real capture is tested in ``test_torch_cuda.py``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import path_matrix as pm
from fake_graphs import fake_graphs
from precond_ref.adapters import _torch_capture, _torch_compile

STEPS = 9


def _run(method, *, capture, mode="principled", steps=STEPS, events=None, step_kwargs=None, **overrides):
    """The MLP cell's trajectory (``path_matrix``'s gradients, new ``.grad`` tensors every step,
    none for a parameter that does not require one),
    with ``events[t](opt, named)`` called before step ``t``; returns ``(history, opt)``."""
    spec = pm.MODELS["mlp"]
    named = pm._fresh_torch(spec.init())
    opt = pm.torch_class(method)(named, **{**pm.torch_kwargs(method, mode), "compile": False, **overrides}, capture=capture)
    history = [pm._copy({n: p.detach().numpy() for n, p in named})]
    for t in range(steps):
        if events and t in events:
            opt = events[t](opt, named) or opt
        grads = spec.grads(history[-1], t)
        for n, p in named:
            p.grad = torch.from_numpy(grads[n].copy()) if p.requires_grad else None
        opt.step(**(step_kwargs(t) if step_kwargs else {}))
        history.append(pm._copy({n: p.detach().numpy() for n, p in named}))
    return history, opt


def _identical(got, want):
    diff, first = pm.difference(got, want)
    assert diff == 0.0, f"not bit-identical: {diff:.2e}, first after {first} steps"


def _captured_and_eager(method, **kwargs):
    """The captured run (no warning allowed) and the uncaptured one, and the double's replay count."""
    with fake_graphs() as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, opt = _run(method, capture=True, **kwargs)
    want, _ = _run(method, capture=False, **kwargs)
    return got, want, graphs, opt


# --------------------------------------------------------------------------------------------
# The setting


def test_capture_setting(monkeypatch):
    """``capture=None`` follows ``PRECOND_REF_CAPTURE`` (0/1), then ``BY_DEFAULT``; an explicit
    value wins over both; ``capturable=True`` (the user captures) turns it off and refuses
    ``capture=True``; anything but None/True/False is refused naming the argument."""
    setting = _torch_capture.capture_setting
    monkeypatch.delenv(_torch_capture.ENVIRONMENT_VARIABLE, raising=False)
    assert setting(None, False, "AGD") is (None if _torch_capture.BY_DEFAULT else False)
    monkeypatch.setenv(_torch_capture.ENVIRONMENT_VARIABLE, "0")
    assert setting(None, False, "AGD") is False and setting(True, False, "AGD") is True
    monkeypatch.setenv(_torch_capture.ENVIRONMENT_VARIABLE, "1")
    monkeypatch.setattr(_torch_capture, "BY_DEFAULT", False)
    assert setting(None, False, "AGD") is None and setting(False, False, "AGD") is False
    assert setting(None, True, "AGD") is False
    with pytest.raises(ValueError, match="AGD: capture=True and capturable=True exclude each other"):
        setting(True, True, "AGD")
    with pytest.raises(TypeError, match="AGD: capture must be None, True or False, got 'yes'"):
        pm.torch_class("agd")([torch.zeros(2, dtype=torch.float64)], capture="yes")


def test_cpu_parameters_are_not_captured():
    """Without the double (torch's CUDA graphs): CPU parameters step as without capture, quietly
    under the default, with one warning naming the device under ``capture=True``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default, opt = _run("agd", capture=None)
    assert opt._captures.graphs() == 0
    with pytest.warns(RuntimeWarning, match=r"AGD: the step is not captured in a CUDA graph \(a parameter on cpu") as told:
        asked, _ = _run("agd", capture=True)
    assert len(told) == 1
    _identical(asked, default)


# --------------------------------------------------------------------------------------------
# Replays


@pytest.mark.parametrize("method, graphs, start", [("agd", 1, 1), ("if_shampoo", 3, 1), ("mbf", 3, 4)])
def test_one_warm_up_then_replays_per_pattern(method, graphs, start):
    """The schedule's start (``start`` steps: the first, which makes the state, and any pattern
    of interval decisions that never recurs) runs eagerly; each recurring pattern
    (``Transform.due``; interval 3 spread over 3 phases: 3 patterns, AGD one) is warmed up once
    and captured, and every later step of it replays, giving the uncaptured trajectory."""
    got, want, double, opt = _captured_and_eager(method, steps=12)
    assert len(double.graphs) == graphs == opt._captures.graphs()
    assert double.replays() == 12 - start - graphs
    _identical(got, want)


def test_steps_of_other_keyword_arguments_are_other_patterns():
    """``step(batch_size=)`` is baked into a graph: each value its own pattern, each replayed."""
    got, want, double, _ = _captured_and_eager("rf_adamw", steps=12, step_kwargs=lambda t: {"batch_size": 6 if t % 2 else 3})
    assert len(double.graphs) == 2 and double.replays() == 12 - 1 - 2
    _identical(got, want)


def test_graphs_are_bounded(monkeypatch):
    """Past ``MAX_GRAPHS`` graphs a further pattern steps eagerly (with its state still written
    in place, which the graphs read)."""
    monkeypatch.setattr(_torch_capture, "MAX_GRAPHS", 1)
    got, want, double, _ = _captured_and_eager("if_shampoo", steps=12)
    assert len(double.graphs) == 1 and double.replays() > 0
    _identical(got, want)


# --------------------------------------------------------------------------------------------
# What makes a graph stale


def _set_weight_decay(opt, named):
    opt.param_groups[0]["weight_decay"] = 0.1  # a hyperparameter the graph bakes in: a new transform


def _scale_lr(opt, named):
    opt.param_groups[0]["lr"] *= 3  # fed: written into the lr tensor the graph reads


def _replace_storage(opt, named):
    named[0][1].data = named[0][1].data.clone()  # as a dtype or device move does: a new address


def _replace_state(opt, named):
    head = next(entries for entries in opt.state.values() if entries.get("core_group"))
    for key, value in head.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            head[key] = value.clone()


def _drop_a_gradient(opt, named):
    named[1][1].requires_grad_(False)  # fc1.bias: no gradient from this step on (_run)


_SAVED = {}


def _save(opt, named):
    _SAVED["state_dict"] = copy.deepcopy(opt.state_dict())
    _SAVED["params"] = [p.detach().clone() for _, p in named]


def _rewind(opt, named):
    """Back to the saved step, in the same optimizer (its graphs alive until the load)."""
    for (_, p), value in zip(named, _SAVED["params"]):
        p.data.copy_(value)
    opt.load_state_dict(_SAVED["state_dict"])


def _deep_copy(opt, named):
    other = copy.deepcopy(opt)  # the copy steps copies of the parameters: swap them in
    for (_, p), q in zip(named, other.param_groups[0]["params"]):
        q.data = p.data
    return other


EVENTS = {
    "weight_decay changed": {5: _set_weight_decay},
    "lr changed": {5: _scale_lr},
    "parameter storage replaced": {5: _replace_storage},
    "state tensors replaced": {5: _replace_state},
    "a gradient missing": {5: _drop_a_gradient},
    "state_dict loaded with graphs alive": {3: _save, 6: _rewind},
    "deep copy": {5: _deep_copy},
}


@pytest.mark.parametrize("method", ["agd", "if_shampoo"])
@pytest.mark.parametrize("event", list(EVENTS))
def test_what_a_graph_baked_in_changes(event, method):
    """A change to what a graph was captured with (a hyperparameter other than the fed ``lr``, a
    parameter's storage, the state's tensors, the set of parameters with gradients, a checkpoint
    loaded into the optimizer, a copy of it) is followed by the uncaptured trajectory, bit for bit,
    and the run replays after the change too. Without its invalidation, the double's stale replay
    writes the old tensors or uses the old transform, and the trajectories part."""
    replays_after = {}

    def counting(f):
        def call(opt, named):
            replays_after["at"] = double.replays()
            return f(opt, named)
        return call

    events = EVENTS[event]
    last = max(events)
    with fake_graphs() as double, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, _ = _run(method, capture=True, steps=14, events={**events, last: counting(events[last])})
    want, _ = _run(method, capture=False, steps=14, events=events)
    _identical(got, want)
    assert double.replays() > replays_after["at"] > 0


def test_a_checkpoint_taken_while_graphs_replay_holds_the_state_of_its_step():
    """``state_dict()`` of a captured optimizer (its tensors are the ones the graphs write) after
    some replayed steps equals the uncaptured optimizer's, entry by entry, bit for bit."""
    _, _, _, captured = _captured_and_eager("if_shampoo", steps=8)
    _, eager = _run("if_shampoo", capture=False, steps=8)
    got, want = captured.state_dict()["state"], eager.state_dict()["state"]
    assert got.keys() == want.keys()
    for index in want:
        assert got[index].keys() == want[index].keys()
        for key, value in want[index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[index][key], value), (index, key)
            else:
                assert got[index][key] == value, (index, key)


# --------------------------------------------------------------------------------------------
# Fallbacks


def test_a_failed_capture_warns_once_and_leaves_the_step_as_without_capture():
    """A capture that raises (its kernels recorded, none run) refuses its pattern with one
    warning naming the error; the step it failed on was taken by the warm-up, and a run whose
    every capture fails is the uncaptured one."""
    with fake_graphs(fail=True) as double, pytest.warns(RuntimeWarning, match="capturing raised RuntimeError") as told:
        got, opt = _run("if_shampoo", capture=None)
    assert len(told) == 1 and double.replays() == 0 and opt._captures.graphs() == 0
    assert opt._captures.failed > 0 and opt._captures.off is None
    want, _ = _run("if_shampoo", capture=False)
    _identical(got, want)


def test_a_pattern_whose_capture_fails_steps_uncaptured_and_the_others_replay():
    """One pattern's capture failing (as cuSOLVER's batched LU refuses stream capture in MBF's
    inverse phases on a GPU) refuses that pattern only: it is not tried again, the other
    patterns are captured and replayed, and the trajectory is the uncaptured one bitwise."""
    with fake_graphs(fail_first=1) as double, pytest.warns(RuntimeWarning, match="capturing raised") as told:
        got, opt = _run("if_shampoo", capture=None)
    assert len(told) == 1 and opt._captures.failed == 1 and opt._captures.off is None
    assert opt._captures.graphs() >= 1 and double.replays() > 0
    want, _ = _run("if_shampoo", capture=False)
    _identical(got, want)


def test_captures_failing_in_every_pattern_turn_capturing_off(monkeypatch):
    """After ``MAX_FAILED_CAPTURES`` failed captures the optimizer stops trying (a step that
    fails in every pattern costs one failed capture per pattern, not one per step)."""
    from precond_ref.adapters import _torch_capture

    monkeypatch.setattr(_torch_capture, "MAX_FAILED_CAPTURES", 1)
    with fake_graphs(fail=True), pytest.warns(RuntimeWarning, match="capturing raised"):
        _, opt = _run("if_shampoo", capture=None)
    assert opt._captures.off and opt._captures.failed == 1 and opt._captures.graphs() == 0


@pytest.mark.parametrize("method", ["sketchy", "s_adagrad"])
def test_a_refusing_method_steps_without_capture(method):
    """A class whose step reads the device on the host (``not_capturable_because``) is not
    captured: quietly under the default, with one warning giving its reason under ``capture=True``."""
    with fake_graphs() as double:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            default, _ = _run(method, capture=None)
        with pytest.warns(RuntimeWarning, match="Frequent Directions update calls torch's eigh or svd") as told:
            asked, _ = _run(method, capture=True)
    assert len(told) == 1 and not double.graphs
    want, _ = _run(method, capture=False)
    _identical(default, want)
    _identical(asked, want)


@pytest.mark.parametrize("per_leaf", [False, True], ids=["whole-graph", "per-leaf"])
def test_the_compiled_step_is_what_is_captured(per_leaf, monkeypatch):
    """With ``compile=`` the captured update is the compiled one (the whole group's graph, or the
    element-wise per-leaf kernels), compiled at the pattern's warm-up: the trajectory of the
    same compiled steps without capture, bit for bit, and no fallback to eager."""
    if per_leaf:
        monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    backend = {"backend": "aot_eager"}
    got, want, double, _ = _captured_and_eager("agd", compile=backend)
    assert double.replays() == STEPS - 2
    _identical(got, want)


def test_the_captured_trajectory_meets_the_core():
    """Anchor: the captured run (AGD, then IF-Shampoo with its refreshes) is the NumPy core's
    trajectory to the path matrix's RTOL (``test_path_equivalence``'s rounding model)."""
    for method in ("agd", "if_shampoo"):
        got, _, double, _ = _captured_and_eager(method, steps=pm.STEPS)
        assert double.replays() > 0
        diff = pm.difference(got, pm.core_trajectory(method, "principled", "mlp"))[0]
        assert diff <= 1e-12, (method, diff)
        assert np.isfinite(diff)


def test_the_class_default_compiles_a_captured_step(monkeypatch):
    """``compile=None`` on a class that compiles by default (here from its first step: the
    threshold lowered to 1 element) captures its compiled step, as ``compile=True`` does: the graph
    replays the fused kernels, which move a fraction of the eager step's bytes. The compiler is
    dynamo's eager backend here (the same operations, so the eager trajectory to the bit); the
    class default's options are what the step was made with."""
    monkeypatch.setattr(_torch_compile, "AUTO_MIN_ELEMENTS", 1)
    real, made = _torch_compile.CompiledStep, []

    def recording(transform, options, kernels=None):
        made.append(options)
        return real(transform, {"backend": "eager"}, kernels)

    monkeypatch.setattr(_torch_compile, "CompiledStep", recording)
    with fake_graphs() as double:
        got, opt = _run("agd", capture=True, compile=None)
    assert made == [{}] and double.replays() == STEPS - 2
    want, _ = _run("agd", capture=False)
    _identical(got, want)


def test_the_distributed_classes_are_not_captured(monkeypatch):
    """A class of ``torch_distributed`` (which exchanges blocks between ranks within its step,
    marked by ``_accepts_dtensor``) steps without capture, quietly under the default."""
    monkeypatch.setattr(pm.torch_class("agd"), "_accepts_dtensor", True, raising=False)
    with fake_graphs() as double, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, opt = _run("agd", capture=None)
    assert not double.graphs and opt._captures.graphs() == 0
    want, _ = _run("agd", capture=False)
    _identical(got, want)
