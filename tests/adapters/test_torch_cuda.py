"""The torch optimizers on a CUDA GPU (issue 12, items 1 and 2): skipped where torch sees none.

No host synchronisation in a step (torch's sync debug mode), and ``capturable=True`` steps that
replay from a CUDA graph. The CPU counterparts: ``tests/test_sync_free.py`` (an array namespace
that refuses host transfers), ``test_torch_host_reads.py`` (the torch operations that read a
status on the host, found on the CPU) and ``test_capturable_steps_write_every_state_tensor_in_place``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from cases import CAPTURABLE_CASES, TORCH_CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 6
WARM_STEPS = 12  # compiled, no case makes a new graph after step 10 (MBF's spread refreshes; counted on a CPU)
# Known host reads, by case (docs/backends.md, "no host synchronisation"). ASGO: the checked
# iterative root reads its convergence flag on refresh steps (linalg.inverse_root); ASGO's
# root_method="auto" takes it for float32 on a GPU; compiled too, as Inductor's torch.cond reads
# its predicate with ``.item()`` in the wrapper code (seen in the CPU's generated code, 2026-11-26).
# Sketchy and S-AdaGrad: torch's CUDA eigh and svd read their LAPACK status on the host (no
# ``_ex`` variant exists), and the Frequent Directions update calls one of them on every sketch
# update: S-AdaGrad's every step, Sketchy's refresh steps (some block refreshes on every step with
# the spread default, every second step in the interval case).
# tests/adapters/test_torch_host_reads.py checks on the CPU that no case outside this table reads
# a device value or calls eigh/svd, and that no case calls a torch function that checks its status
# on the host.
_FD_DECOMPOSITION = "torch's CUDA eigh/svd (the Frequent Directions update) read their status on the host"
KNOWN_SYNCS = {
    **dict.fromkeys(
        ("asgo", "asgo-pe-interval"), "ASGO's checked root reads its convergence flag on the host on refresh steps"
    ),
    **dict.fromkeys(("sketchy", "sketchy-faithful-interval", "s_adagrad", "s_adagrad-faithful"), _FD_DECOMPOSITION),
}


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
        pytest.param(c, marks=pytest.mark.xfail(raises=RuntimeError, reason=KNOWN_SYNCS[c.id], strict=True))
        if c.id in KNOWN_SYNCS
        else c
        for c in TORCH_CASES
    ],
    ids=lambda c: c.id,
)
def test_steps_never_synchronise(case, compile):
    """Steps 12-17 (refresh and reuse steps alike) run under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on any operation that makes the host
    wait for the GPU: no step reads a device value (issue 12, item 1). The first 12 steps make the
    state and, compiled, a graph for every pattern of refresh decisions (torch._dynamo's
    ``unique_graphs`` counted on a CPU: the last new one at step 10, MBF's spread refreshes):
    compiling reads values on the host (Inductor folds a uniform constant with ``.item()``), which
    is not a step's read. With only 2 unguarded steps, as before, ASGO's and
    faithful MBF's later patterns compiled under the guard and failed on the H100 (2026-11-26)."""
    model = _model()
    opt = case.make(model.named_parameters(), compile=compile)
    grads = _gradients(model)
    if compile:  # a compiled row that fell back to eager would not test the compiled step
        warnings.filterwarnings("error", message=".*torch.compile failed", category=RuntimeWarning)

    def step(i: int) -> None:
        for p, g in zip(model.parameters(), grads[i % STEPS]):
            p.grad = g
        opt.step(**case.step_kwargs)

    for i in range(WARM_STEPS):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(WARM_STEPS, WARM_STEPS + STEPS):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# A step that reads the host cannot be captured (an attempt invalidates the capture, and later
# cuSOLVER calls of the process fail): Sketchy and S-AdaGrad refuse it by name (the last test).
GRAPH_CASES = [
    pytest.param(c, o, marks=pytest.mark.skip(reason=f"not capturable: {KNOWN_SYNCS[c.id]}"), id=c.id)
    if c.id in KNOWN_SYNCS
    else pytest.param(c, o, id=c.id)
    for c, o in CAPTURABLE_CASES
]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case, overrides", GRAPH_CASES)
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


@pytest.mark.parametrize(
    "case, overrides", [pytest.param(c, o, id=c.id) for c, o in CAPTURABLE_CASES if c.id in ("sketchy", "s_adagrad")]
)
def test_capture_of_a_decomposing_step_is_refused_by_name_and_leaves_cusolver_working(case, overrides):
    """Sketchy and S-AdaGrad (every step decomposes with torch's eigh/svd, which read their status
    on the host): a step inside ``torch.cuda.graph`` raises the optimizer's error, naming the class
    and the reason, before it launches anything, so the capture ends cleanly; then an ``eigh``
    still runs (an invalidated capture made later cuSOLVER calls of the process fail)."""
    model = _model()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = case.make(model.named_parameters(), capturable=True, **overrides)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g in _gradients(model)[:3]:
            for p, gi in zip(model.parameters(), g):
                p.grad.copy_(gi)
            opt.step(**case.step_kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    refusal = f"{type(opt).__name__}: a step cannot be captured in a CUDA graph: .*eigh or svd"
    with pytest.raises(RuntimeError, match=refusal):
        with torch.cuda.graph(graph):
            opt.step(**case.step_kwargs)
    a = torch.eye(3, device="cuda") + 0.1
    torch.testing.assert_close(torch.linalg.eigh(a).eigenvalues, torch.tensor([1.0, 1.0, 1.3], device="cuda"))
