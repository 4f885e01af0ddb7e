"""The torch optimizers' host reads that a CPU can see: the CPU half of ``test_torch_cuda.py``.

On CUDA the host waits for the device (and a CUDA-graph capture is invalidated) whenever it reads
a device value: ``bool``/``int``/``item`` (ATen's ``_local_scalar_dense``), torch's check of the
LAPACK/cuSOLVER status after ``inv``/``solve``/``cholesky`` (``_linalg_check_errors``; their
``_ex`` variants leave the status on the device), and ``eigh``/``svd``, which check inside their
CUDA kernel (no ``_ex`` variant). All are dispatched on a CPU too, so a recorder of the dispatched
operations finds them without a GPU once ``host_bool`` (which reads a CPU tensor for free) answers
as for a GPU tensor (the first GPU run found MBF's ``inv`` there: a synchronisation per inverse
step, and no capture), and ASGO's ``root_method="auto"`` chooses its root as for a GPU tensor (the
checked iteration for float32; ``eigh`` on a CPU). With them: what MBF does now that a singular
block no longer raises, and the named refusal of a captured step of the methods that must read
the host.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import precond_ref as pr
from precond_ref import _backend
import precond_ref.adapters.torch as pt

from cases import TORCH_CASES
from dispatched import Dispatched
from test_torch_cuda import KNOWN_SYNCS

STEPS = 6
# Operations that read a device value on the host: a read itself, and LAPACK status checks.
_READ = "_local_scalar_dense"  # bool(x), int(x), x.item()
_CHECK_AFTER = "_linalg_check_errors"  # dispatched by inv, solve, cholesky, ... (not their _ex variants)
_CHECK_INSIDE = ("_linalg_eigh", "_linalg_svd")  # eigh, eigvalsh, svd, svdvals
_FD_CLASSES = (pt.Sketchy, pt.SAdaGrad)


def _model() -> torch.nn.Module:
    """``test_torch_cuda._model`` on the CPU: two matrices of different shapes and a bias."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 4), "out": torch.nn.Linear(4, 3, bias=False)})


def _gradients(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(STEPS)]


def _set(model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g


def _core_choices_as_on_a_gpu(monkeypatch) -> None:
    """The core's ``"auto"`` choices as for a GPU tensor: ASGO's ``root_method`` (``eigh`` for
    float64 only, else the checked Polar-Express iteration: ``linalg.auto_root_method`` asks
    ``on_cpu``) and S-AdaGrad's ``decomposition`` (the secular core: ``sketch.secular_by_default``)."""
    for name in ("precond_ref.linalg", "precond_ref.sketch"):
        monkeypatch.setattr(importlib.import_module(name), "on_cpu", lambda xp, x: False)


def _host_bool_as_on_a_gpu(monkeypatch) -> None:
    """``_backend.host_bool`` reads a CPU tensor for free and answers None for a GPU one (the
    caller then selects on the device): its GPU answer in every module that imported it."""
    real = _backend.host_bool
    for name, module in list(sys.modules.items()):
        if name.startswith("precond_ref") and getattr(module, "host_bool", None) is real:
            monkeypatch.setattr(module, "host_bool", lambda xp, x: None)


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)
def test_steps_read_the_host_only_where_documented(monkeypatch, case):
    """The steps of ``test_steps_never_synchronise`` (2-5, eager, on the CPU, ``host_bool`` and
    the core's device choices giving their GPU answers) under a recorder of the dispatched ATen operations. Every host read of a
    device value is an operation there: ``_local_scalar_dense`` (``bool``, ``int``, ``item``), and
    ``_linalg_check_errors`` (after ``inv``/``solve``/``cholesky``: an ``_ex`` function or
    ``linalg.inverse`` must stand for each); ``eigh``/``svd`` check inside their CUDA kernel. The
    first two appear in no case, the last two only in the cases ``test_torch_cuda.KNOWN_SYNCS``
    lists (principled ASGO's checked iterative root in none, principled S-AdaGrad's secular core,
    its default on a GPU, in none).
    Sketchy and S-AdaGrad must otherwise decompose, so that their entries there stay true."""
    _host_bool_as_on_a_gpu(monkeypatch)
    _core_choices_as_on_a_gpu(monkeypatch)
    model = _model()
    opt = case.make(model.named_parameters(), compile=False)
    grads = _gradients(model)
    for i in range(2):
        _set(model, grads[i])
        opt.step(**case.step_kwargs)
    with Dispatched() as recorded:
        for i in range(2, STEPS):
            _set(model, grads[i])
            opt.step(**case.step_kwargs)
    assert _CHECK_AFTER not in recorded.names, f"{case.id}: a linalg call whose status torch reads on the host"
    if recorded.names.count(_READ):
        assert case.id in KNOWN_SYNCS, f"{case.id} reads a device value on the host {recorded.names.count(_READ)} times"
    decomposed = sorted(set(recorded.names) & set(_CHECK_INSIDE))
    if decomposed:
        assert case.id in KNOWN_SYNCS, f"{case.id} calls {decomposed}, which on CUDA read their status on the host"
    if isinstance(opt, _FD_CLASSES) and case.id in KNOWN_SYNCS:
        assert decomposed, f"{case.id} no longer decomposes: its KNOWN_SYNCS entry is stale"


def test_singular_inverse_keeps_the_previous_one_and_counts_a_failure():
    """Faithful MBF (no damping floor) on torch, float64: a gradient of 3e8 in every entry makes
    the layer's statistic about 1.7e16·11ᵀ, and F + 1e-3·I rounds to an exactly singular matrix.
    torch's ``inv`` raised there (whichever block of the stack was singular, all of them failed);
    ``linalg.inverse`` gives that block NaN instead, on the device. The documented behaviour holds
    for that block alone: it keeps its previous inverse (I/λ, never refreshed), its layer counts a
    failure per inverse step, the parameters stay finite; the other layer, in the same batched
    call, is refreshed and counts none."""
    damping = 1e-3
    opt = pr.mbf(learning_rate=1e-3, damping=damping, statistics_every=1, precondition_every=1, mode="faithful")
    gen = torch.Generator().manual_seed(2)
    params = {name: {"weight": torch.zeros(2, 3, dtype=torch.float64)} for name in ("bad", "good")}
    state = opt.init(params)
    for i in range(2):
        grads = {"bad": {"weight": torch.full((2, 3), 3e8, dtype=torch.float64)},
                 "good": {"weight": torch.randn(2, 3, generator=gen, dtype=torch.float64)}}
        updates, state = opt.update(grads, state, params, step=i)
        params = pr.apply_updates(params, updates)
    bad, good = state.groups["bad/weight"], state.groups["good/weight"]
    initial = torch.eye(2, dtype=torch.float64) / damping
    torch.testing.assert_close(bad["inverse"], initial, rtol=0, atol=0)
    assert int(bad["failures"]) == 2 and int(good["failures"]) == 0
    assert bool(torch.isfinite(good["inverse"]).all()) and not torch.equal(good["inverse"], initial)
    assert all(bool(torch.isfinite(p["weight"]).all()) for p in params.values())


@pytest.mark.parametrize(
    "case", [c for c in TORCH_CASES if c.id in ("sketchy", "s_adagrad", "agd")], ids=lambda c: c.id
)
def test_a_step_during_cuda_graph_capture_names_why_it_cannot_be_captured(monkeypatch, case):
    """Sketchy and S-AdaGrad decompose with torch's eigh/svd on every step ``capturable=True``
    allows, which on CUDA read their status on the host: captured, that invalidates the capture
    and leaves later cuSOLVER calls of the process failing. A step taken while the current CUDA
    stream captures must raise, naming the class and the reason, before it changes anything. A
    CPU has no capture: torch's two questions are answered "yes" here. AGD, which reads nothing,
    steps as usual under the same answers."""
    model = _model()
    opt = case.make(model.named_parameters(), compile=False)
    grads = _gradients(model)
    _set(model, grads[0])
    opt.step(**case.step_kwargs)
    _set(model, grads[1])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = [p.detach().clone() for p in model.parameters()]
    if not isinstance(opt, _FD_CLASSES):
        opt.step(**case.step_kwargs)
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return
    name = type(opt).__name__
    refusal = f"^{name}: a step cannot be captured in a CUDA graph: .*eigh or svd.*on the host"
    with pytest.raises(RuntimeError, match=refusal):
        opt.step(**case.step_kwargs)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(int(entries["step"]) == 1 for entries in opt.state.values())


@pytest.mark.parametrize(
    "kwargs, refusal",
    [
        ({"root_method": "polar_express"}, None),
        ({}, r"root_method 'auto' calls torch's eigh, which on CUDA reads its status on the host"),
        ({"root_method": "eigh"}, r"root_method 'eigh' calls torch's eigh, which on CUDA reads its status on the host"),
        ({"mode": "faithful"}, None),
    ],
    ids=["principled-polar-express", "principled-auto-cpu", "principled-eigh", "faithful"],
)
def test_asgo_capture_refusal_follows_its_root(monkeypatch, kwargs, refusal):
    """Principled ASGO's ``eigh`` root reads the host on CUDA (torch's eigh, which "auto" takes
    on these CPU tensors and for float64, reads its status), so a step taken during CUDA graph
    capture raises naming the root, before it changes anything; the checked iterative root, which
    "auto" takes for float32 on a GPU, keeps a failed block's previous root on the device (D13)
    and steps, as does faithful mode's unchecked root (tests/adapters/test_torch_cuda.py captures
    both)."""
    model = _model()
    opt = pt.ASGO(model.named_parameters(), lr=1e-2, precondition_every=1, **kwargs)
    grads = _gradients(model)
    _set(model, grads[0])
    opt.step()
    _set(model, grads[1])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = [p.detach().clone() for p in model.parameters()]
    if refusal is None:
        opt.step()
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return
    with pytest.raises(RuntimeError, match=f"^ASGO: a step cannot be captured in a CUDA graph: .*{refusal}"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo], ids=lambda c: c.__name__)
def test_a_step_of_counted_batch_size_reads_no_device_value(monkeypatch, cls):
    """The root-free classes with ``model=``: a step whose B was counted from the forwards reads
    nothing on the host. Only a step without a batch size (which otherwise raises) asks whether
    every gradient is zero, reading them (:meth:`_RootFreeOptimizer._only_zero_gradients`)."""
    _host_bool_as_on_a_gpu(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    opt = cls(model.named_parameters(), model=model, compile=False)
    x = torch.randn(STEPS, 5, 8, generator=torch.Generator().manual_seed(1))

    def step(i):
        opt.zero_grad()
        model(x[i]).square().mean().backward()
        opt.step()

    for i in range(2):
        step(i)
    with Dispatched() as recorded:
        for i in range(2, STEPS):
            step(i)
    assert recorded.names.count(_READ) == 0, f"{cls.__name__} reads a device value on the host"
