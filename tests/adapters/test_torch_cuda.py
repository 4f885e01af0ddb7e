"""The torch optimizers on a CUDA GPU: skipped where
torch sees none.

No host synchronisation in a step (torch's sync debug mode), ``capturable=True`` steps that
replay from a CUDA graph, and the optimizers' own captured steps (``capture=``; their bookkeeping
on a CPU: ``test_torch_capture.py``). The CPU counterparts: ``tests/test_sync_free.py`` (an array namespace
that refuses host transfers), ``test_torch_host_reads.py`` (the torch operations that read a
status on the host, found on the CPU) and ``test_capturable_steps_write_every_state_tensor_in_place``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import precond_ref.adapters.torch as pt
from cases import CAPTURABLE_CASES, TORCH_CASES, TorchCase

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 6
WARM_STEPS = 12  # compiled, no case makes a new graph after step 10 (MBF's spread refreshes; counted on a CPU)
# Known host reads, by case (docs/backends.md, "no host synchronisation"). Sketchy and S-AdaGrad:
# torch's CUDA eigh and svd read their LAPACK status on the host (no ``_ex`` variant exists), and
# the Frequent Directions update calls one of them on every sketch update: S-AdaGrad's every step,
# Sketchy's refresh steps (some block refreshes on every step with the spread default, every
# second step in the interval case). Not ASGO: its checked iterative root (root_method="auto" for
# float32 on a GPU) keeps a failed block's previous root by an element-wise selection, no branch
# (docs/methods/asgo.md, D13).
# tests/adapters/test_torch_host_reads.py checks on the CPU that no case outside this table reads
# a device value or calls eigh/svd, and that no case calls a torch function that checks its status
# on the host.
_FD_DECOMPOSITION = "torch's CUDA eigh/svd (the Frequent Directions update) read their status on the host"
KNOWN_SYNCS = {
    **dict.fromkeys(("sketchy", "sketchy-faithful-interval", "s_adagrad-faithful"), _FD_DECOMPOSITION),
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
    """Without capture (``capture=False``; the captured steps: ``test_captured_steps_*`` below),
    steps 12-17 (refresh and reuse steps alike) run under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on any operation that makes the host
    wait for the GPU: no step reads a device value. The first 12 steps make the
    state and, compiled, a graph for every pattern of refresh decisions (torch._dynamo's
    ``unique_graphs`` counted on a CPU: the last new one at step 10, MBF's spread refreshes):
    compiling reads values on the host (Inductor folds a uniform constant with ``.item()``), which
    is not a step's read. With only 2 unguarded steps, as before, ASGO's and
    faithful MBF's later patterns compiled under the guard and failed on a GPU."""
    model = _model()
    opt = case.make(model.named_parameters(), compile=compile, capture=False)
    grads = _gradients(model)
    if compile:  # a compiled row that fell back to eager would not test the compiled step
        warnings.filterwarnings("error", message=".*torch.compile failed", category=RuntimeWarning)

    def step(i: int) -> None:
        for p, g in zip(model.parameters(), grads[i % STEPS]):
            p.grad = g
        opt.step(**case.step_kwargs)

    _unsynchronised_after(step, WARM_STEPS, STEPS)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _unsynchronised_after(step, warm: int, steps: int, guard: bool = True) -> None:
    """``step(i)`` for ``warm`` steps, then ``steps`` more under
    ``torch.cuda.set_sync_debug_mode("error")`` (with ``guard``), which raises on any host wait."""
    for i in range(warm):
        step(i)
    torch.cuda.synchronize()
    if guard:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(warm, warm + steps):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)


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


# --------------------------------------------------------------------------------------------
# The captured step (capture=None, the default on CUDA): every case, its periodic work included


REFUSED = set(KNOWN_SYNCS)  # the classes whose step reads the host refuse capture (not_capturable_because)
TIMED = 6


def _warm_steps(opt) -> int:
    """Steps until every recurring pattern of interval decisions has been warmed up and captured:
    its first occurrence after the first step (which makes the state and is never captured)."""
    from precond_ref.adapters._torch_compile import transient_patterns

    transform = opt._transform(opt.param_groups[0])
    transient, first = transient_patterns(transform), {}
    for call in range(1, 1024):
        first.setdefault(tuple(transform.due(call)), call)
    return max(call for pattern, call in first.items() if pattern not in transient) + 1


def _captured_run(case, compile, capture, guard: bool, model_fn=_model) -> tuple:
    """The parameters of ``model_fn()`` after warm-up and ``TIMED`` further steps, new ``.grad``
    tensors every step (``set_to_none``), ``lr`` x 0.9 a step by a ``LambdaLR`` scheduler; the last
    ``TIMED`` steps under ``torch.cuda.set_sync_debug_mode("error")`` with ``guard``."""
    model = model_fn()
    opt = case.make(model.named_parameters(), compile=compile, capture=capture)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)
    warm = _warm_steps(opt)
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen, device="cuda") for p in model.parameters()] for _ in range(warm + TIMED)]

    def step(i: int) -> None:
        for p, g in zip(model.parameters(), grads[i]):
            p.grad = g.clone()
        opt.step(**case.step_kwargs)
        scheduler.step()

    _unsynchronised_after(step, warm, TIMED, guard)
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize(
    "case, compile",
    [pytest.param(c, False, id=c.id) for c in TORCH_CASES]
    + [pytest.param(c, True, id=f"{c.id}-compiled") for c in TORCH_CASES if c.id == "agd"],
)
def test_captured_steps_replay_like_uncaptured_ones_without_a_host_sync(case, compile):
    """The default (``capture=None``) captures each recurring pattern of a case's interval
    decisions once and replays it: after the warm-up, steps under a ``LambdaLR`` scheduler with new
    ``.grad`` tensors every step replay without any host synchronisation (sync debug mode "error")
    and give the parameters of the same steps without capture (the same kernels, replayed: float32
    rounding, ``assert_close``'s float32 default). A class that refuses capture
    (``not_capturable_because``) steps as without it, quietly, and keeps no graph."""
    with warnings.catch_warnings():
        for fallback in (".*not captured in a CUDA graph", ".*torch.compile failed"):  # neither may fall back
            warnings.filterwarnings("error", message=fallback, category=RuntimeWarning)
        got, opt = _captured_run(case, compile, None, guard=case.id not in REFUSED)
    want, _ = _captured_run(case, compile, False, guard=False)
    graphs = opt._captures.graphs()
    assert (graphs == 0) if case.id in REFUSED else (graphs > 0)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)


# MBF's principled inverse of a stack of blocks larger than 16 x 16, more than 16 of them: torch's
# CUDA LU of such a stack is MAGMA's batched getrf, which a CUDA graph cannot capture; the SPD
# route (Cholesky, linalg.spd_inverse) can.
_STACK_BLOCKS, _STACK_ORDER = 17, 32
MBF_STACK = TorchCase(
    "mbf-stack",
    pt.MBF,
    lr=3e-3,
    kwargs=dict(damping=0.1, statistics_every=1, precondition_every=5, block_size=_STACK_ORDER, refresh_phases=1),
)


def _stack_model() -> torch.nn.Module:
    """One linear layer of 17 x 32 outputs: with ``block_size=32`` MBF inverts 17 blocks of order
    32 in one batched call on every inverse step (``refresh_phases=1``)."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"fc": torch.nn.Linear(8, _STACK_BLOCKS * _STACK_ORDER)}).cuda()


def test_mbf_spd_inverse_of_a_large_stack_is_captured_in_a_cuda_graph():
    """``linalg.inverse(..., symmetric_positive_definite=True)`` of 17 SPD blocks of order 32 on
    CUDA (the Cholesky route, ``linalg.spd_inverse``) records in a CUDA graph; replayed on new
    matrices copied into the captured input, it gives the inverse taken without capture (the same
    kernels: float32 rounding, ``assert_close``'s default), and NaN for a block that is not positive
    definite."""
    import array_api_compat.torch as xp

    from precond_ref import linalg

    gen = torch.Generator(device="cuda").manual_seed(2)

    def spd_stack() -> torch.Tensor:
        b = torch.randn(_STACK_BLOCKS, _STACK_ORDER, 2 * _STACK_ORDER, generator=gen, device="cuda")
        return b @ b.mT / (2 * _STACK_ORDER) + 0.1 * torch.eye(_STACK_ORDER, device="cuda")

    def invert(a: torch.Tensor) -> torch.Tensor:
        return linalg.inverse(xp, a, symmetric_positive_definite=True)

    static = spd_stack()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        invert(static)  # torch's recipe: warm up (workspaces, handles) on a side stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = invert(static)
    new = spd_stack()
    new[3] = -new[3]
    static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    want = invert(new)
    assert torch.isnan(out[3]).all() and torch.isnan(want[3]).all()
    keep = [i for i in range(_STACK_BLOCKS) if i != 3]
    torch.testing.assert_close(out[keep], want[keep])
    eye = torch.eye(_STACK_ORDER, device="cuda").expand(len(keep), -1, -1)
    torch.testing.assert_close(want[keep] @ new[keep], eye, atol=1e-4, rtol=0)


def test_mbf_refresh_of_a_large_block_stack_is_captured():
    """MBF (principled) on a layer of 17 blocks of order 32 inverted together: the captured steps,
    inverse phases included, replay without a host synchronisation and without falling back to the
    uncaptured step, and give the parameters of the same steps without capture (float32 rounding,
    ``assert_close``'s default)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not captured in a CUDA graph", category=RuntimeWarning)
        got, opt = _captured_run(MBF_STACK, False, None, guard=True, model_fn=_stack_model)
    want, _ = _captured_run(MBF_STACK, False, False, guard=False, model_fn=_stack_model)
    assert opt._captures.graphs() > 0
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)


def test_a_capture_that_fails_on_the_device_warns_once_and_changes_nothing(monkeypatch):
    """A capture that a host read invalidates (``.item()`` inside the captured update, as a
    method's unguarded status check would) ends cleanly: one warning naming the failure, the
    parameters those of the steps without capture, and the process's CUDA work (a matmul, a
    cuSOLVER ``eigh``) still runs."""
    from precond_ref.adapters import _torch_core

    run_update = _torch_core.CoreOptimizer._run_update

    def reads_the_host(self, *args):
        if torch.cuda.is_current_stream_capturing():
            torch.ones((), device="cuda").item()
        return run_update(self, *args)

    case = next(c for c in TORCH_CASES if c.id == "if_shampoo")
    want, _ = _captured_run(case, False, False, guard=False)
    monkeypatch.setattr(_torch_core.CoreOptimizer, "_run_update", reads_the_host)
    with pytest.warns(RuntimeWarning, match="capturing raised") as told:
        got, opt = _captured_run(case, False, True, guard=False)
    assert len([w for w in told if "not captured in a CUDA graph" in str(w.message)]) == 1
    assert opt._captures.failed > 0 and opt._captures.graphs() == 0
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)
    a = torch.eye(3, device="cuda") + 0.1
    torch.testing.assert_close(a @ torch.eye(3, device="cuda"), a)
    torch.testing.assert_close(torch.linalg.eigh(a).eigenvalues, torch.tensor([1.0, 1.0, 1.3], device="cuda"))
