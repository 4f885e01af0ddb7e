"""The root-free classes' counted batch size (``model=``) under data parallelism (2 gloo ranks on CPU).

DDP averages the ranks' mean-loss gradients, so the gradient every rank steps with stands for the
global batch, and B (the number of examples the loss averages over) must be the sum of the ranks'
counts, the same on every rank. One 2-process job (this file run as a script: ``python
test_torch_batch_count.py RANK WORLD INIT_FILE OUT_DIR``) trains RF-RMSProp, RF-AdamW and
IF-Shampoo three steps with ``model=`` and no ``batch_size``; rank 0 also trains one process with
``batch_size=`` the global batch on the mean of the ranks' gradients (what 2-rank DDP computes bit
for bit). The job runs with a timeout, so a hang (ranks that disagree on a collective) fails the
tests instead of stalling the suite.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from ranks import run_ranks

WORLD, STEPS = 2, 3
CLASSES = {
    "RFRMSProp": dict(lr=5e-2, damping=1e-2, momentum=0.9),
    "RFAdamW": dict(lr=5e-2, damping=1e-2),
    "IFShampoo": dict(lr=5e-2, preconditioner_lr=0.2, damping=1e-2),
}
EVEN, UNEVEN = (4, 4), (5, 3)  # the ranks' local batches; the global batch is 8 in both


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _batches(split: tuple) -> list:
    gen = torch.Generator().manual_seed(1)
    n = sum(split)
    return [(torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randn(n, 3, generator=gen, dtype=torch.float64))
            for _ in range(STEPS)]


def _part(split: tuple, rank: int) -> slice:
    return slice(sum(split[:rank]), sum(split[: rank + 1]))


def _one_process(cls: str, split: tuple, batch_size: int) -> list:
    """One process with ``batch_size=``, stepping on the mean of the ranks' mean-loss gradients:
    what DDP hands every rank's optimizer."""
    import precond_ref.adapters.torch as pt

    net = _model()
    opt = getattr(pt, cls)(net.named_parameters(), batch_size=batch_size, **CLASSES[cls])
    for x, y in _batches(split):
        parts = []
        for rank in range(len(split)):
            net.zero_grad()
            torch.nn.functional.mse_loss(net(x[_part(split, rank)]), y[_part(split, rank)]).backward()
            parts.append([p.grad.clone() for p in net.parameters()])
        for p, *grads in zip(net.parameters(), *parts):
            p.grad = sum(grads) / len(grads)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _data_parallel(module, cls: str, split: tuple, rank: int, counted: str) -> tuple[list, list]:
    """Three DDP steps with ``model=`` (``counted``: the DDP module, or the module it wraps);
    returns the parameters and the messages of the count's warnings the steps gave."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    net = _model()
    ddp = DistributedDataParallel(net)
    opt = getattr(module, cls)(net.named_parameters(), model=ddp if counted == "ddp" else net, **CLASSES[cls])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in _batches(split):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x[_part(split, rank)]), y[_part(split, rank)]).backward()
            opt.step()
    ours = [str(w.message) for w in caught if "model= counts" in str(w.message)]
    return [p.detach().clone() for p in net.parameters()], ours


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    import precond_ref.adapters.torch as pt
    import precond_ref.adapters.torch_distributed as ptd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for cls in CLASSES:
            for name, module in (("pt", pt), ("ptd", ptd)):
                for split, tag in ((EVEN, "even"), (UNEVEN, "uneven")):
                    results[(cls, name, tag, "ddp")] = _data_parallel(module, cls, split, rank, "ddp")
                # The wrapped module: the distributed classes sum over their process group; the
                # plain ones count this rank's examples and warn.
                results[(cls, name, "even", "module")] = _data_parallel(module, cls, EVEN, rank, "module")
        if rank == 0:
            for cls in CLASSES:
                results[(cls, "one_process", "even")] = _one_process(cls, EVEN, sum(EVEN))
                results[(cls, "one_process", "uneven")] = _one_process(cls, UNEVEN, sum(UNEVEN))
                results[(cls, "local_batch", "even")] = _one_process(cls, EVEN, EVEN[0])
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The tests


def _run_job(out) -> None:
    run_ranks(__file__, WORLD, out, timeout=180, what="the batch-count job")


if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from session_jobs import run_once  # tests/ is on the suite's path, not on the worker's

    out = run_once(tmp_path_factory, "torch_batch_count", _run_job)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("split", ["even", "uneven"])
@pytest.mark.parametrize("module", ["pt", "ptd"])
@pytest.mark.parametrize("cls", list(CLASSES))
def test_counted_batch_is_the_global_batch(job, cls, module, split):
    """With the DDP module as ``model=`` (plain and distributed classes), every rank steps with
    B = the sum of the ranks' counts: its parameters equal, bit for bit, one process's with
    ``batch_size=`` the global batch on the averaged gradient, on both ranks, also when the
    ranks' local batches differ (5 and 3), where a rank's own count would make them drift
    apart. No warning: the count's process group is known."""
    reference = job[0][(cls, "one_process", split)]
    for rank in range(WORLD):
        params, caught = job[rank][(cls, module, split, "ddp")]
        assert _equal(params, reference), f"rank {rank}: B is not the global batch"
        assert caught == []


@pytest.mark.parametrize("cls", list(CLASSES))
def test_distributed_classes_sum_over_their_process_group(job, cls):
    """torch_distributed's classes given the module DDP wraps count over their process group."""
    reference = job[0][(cls, "one_process", "even")]
    for rank in range(WORLD):
        params, caught = job[rank][(cls, "ptd", "even", "module")]
        assert _equal(params, reference)
        assert caught == []


@pytest.mark.parametrize("cls", list(CLASSES))
def test_plain_classes_warn_once_on_a_module_that_may_be_one_rank_of_many(job, cls):
    """A plain class given the unwrapped module while torch.distributed runs 2 processes cannot
    tell whether the ranks train one model: B is this rank's count (one process with B = 4),
    and one RuntimeWarning over the three steps names the remedies."""
    for rank in range(WORLD):
        params, caught = job[rank][(cls, "pt", "even", "module")]
        assert _equal(params, job[0][(cls, "local_batch", "even")])
        assert len(caught) == 1
        assert "DistributedDataParallel module as model=" in caught[0] and "batch_size=" in caught[0]
        assert "torch_distributed" in caught[0]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
