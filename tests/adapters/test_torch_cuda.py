"""The torch optimizers on a CUDA GPU (issue 12, items 1 and 2): skipped where torch sees none.

No host synchronisation in a step (torch's sync debug mode), and ``capturable=True`` steps that
replay from a CUDA graph. The CPU counterparts: ``tests/test_sync_free.py`` (an array namespace
that refuses host transfers) and ``test_capturable_steps_write_every_state_tensor_in_place``.
"""

from __future__ import annotations

import pytest
import torch

from cases import CAPTURABLE_CASES, TORCH_CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 6
# Known host reads, by case: the checked iterative root reads its convergence flag on refresh
# steps (linalg.inverse_root); ASGO's root_method="auto" takes it for float32 on a GPU.
_KNOWN_SYNCS = dict.fromkeys(
    ("asgo", "asgo-pe-interval"), "ASGO's checked root reads its convergence flag on the host on refresh steps"
)


def _model() -> torch.nn.Module:
    """Two matrices of different shapes and a bias, which every configuration accepts (faithful
    modes take matrices only); the model is never run: the gradients are set."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 4), "out": torch.nn.Linear(4, 3, bias=False)}).cuda()


def _gradients(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [[torch.randn(p.shape, generator=gen, device="cuda") for p in model.parameters()] for _ in range(STEPS)]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(raises=RuntimeError, reason=_KNOWN_SYNCS[c.id], strict=True))
        if c.id in _KNOWN_SYNCS
        else c
        for c in TORCH_CASES
    ],
    ids=lambda c: c.id,
)
def test_steps_never_synchronise(case, compile):
    """Steps 2-5 (refresh and reuse steps alike; the first two make the state and compile) run
    under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any operation that makes
    the host wait for the GPU: no step reads a device value (issue 12, item 1)."""
    model = _model()
    opt = case.make(model.named_parameters(), compile=compile)
    grads = _gradients(model)

    def step(i: int) -> None:
        for p, g in zip(model.parameters(), grads[i]):
            p.grad = g
        opt.step(**case.step_kwargs)

    step(0)
    step(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, STEPS):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# A step that reads the host cannot be captured.
GRAPH_CASES = [(c, o) for c, o in CAPTURABLE_CASES if c.id not in _KNOWN_SYNCS]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case, overrides", GRAPH_CASES, ids=[c.id for c, _ in GRAPH_CASES])
def test_captured_step_replays_like_the_same_steps_taken_eagerly(case, overrides, compile):
    """``capturable=True``: a step captured in a CUDA graph after torch's recipe (warm-up steps on
    a side stream), replayed with each new gradient copied into the same ``.grad`` tensors, gives
    the parameters of the same steps taken without capture. Same kernels, replayed: the bound is
    float32 rounding of a few steps (``assert_close``'s float32 default)."""
    lr = torch.tensor(case.lr, device="cuda")

    def make(capturable: bool) -> tuple:
        model = _model()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model, case.make(model.named_parameters(), lr=lr, compile=compile, capturable=capturable, **overrides)

    def load(model: torch.nn.Module, i: int) -> None:
        for p, g in zip(model.parameters(), grads[i]):
            p.grad.copy_(g)

    reference_model, reference = make(False)
    grads = _gradients(reference_model)
    for i in range(STEPS):
        load(reference_model, i)
        reference.step(**case.step_kwargs)

    model, opt = make(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            load(model, i)
            opt.step(**case.step_kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(**case.step_kwargs)  # recorded, not run
    for i in range(3, STEPS):
        load(model, i)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)
