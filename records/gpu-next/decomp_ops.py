"""One eager torch step of a method on the bench's GPT parameter shapes as a GPU would issue it, counted
on a CPU: the non-view operations, and each decomposition call (eigh, svd, qr) with its operands'
shapes and dtypes (on CUDA each eigh/svd call is also a host synchronisation: torch reads its status).
CUDA's branches are taken as in ``bench``'s operation count (``precond_ref.benchmarks.operations.
gpu_grouping``: no CPU-only unbatching, no host reads, engine/axes' device branch). Random gradients.

Usage: ``python decomp_ops.py [method] [small|reference] [steps]`` (default s_adagrad reference 1).
docs/methods/sketchy.md, "On a GPU", has the counts of this code, and of 9905ce3 and 486b05e,
which have no ``benchmarks.operations``: those were counted by this script's first version
(git history) with ``PYTHONPATH`` naming their checkouts."""
import collections
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import precond_ref
import precond_ref.adapters.torch  # noqa: F401
from precond_ref.benchmarks.common import contenders, torch_optimizer
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.operations import VIEWS, gpu_grouping

print("code at", precond_ref.__file__)
DECOMPOSITIONS = ("eigh", "svd", "linalg_qr", "geqrf")
method = sys.argv[1] if len(sys.argv) > 1 else "s_adagrad"
size = SIZES["gpt"][sys.argv[2] if len(sys.argv) > 2 else "reference"]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 1
torch.set_num_threads(1)
torch.manual_seed(0)
named = list(build_torch("gpt", size, torch.float32, "cpu").named_parameters())
print(len(named), "tensors,", sum(p.numel() for _, p in named), "parameters")
(c,), _ = contenders(method, False)
opt, _ = torch_optimizer(c, named, "off")
grads = [[torch.randn_like(p) * 1e-3 for _, p in named] for _ in range(2)]


def step(i):
    for (_, p), g in zip(named, grads[i % 2]):
        p.grad = g
    opt.step()


with gpu_grouping():
    for i in range(3):
        t = time.process_time()
        step(i)
        print("step", i, f"{time.process_time() - t:.2f} s CPU")
counts, calls = collections.Counter(), collections.Counter()


class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        counts[name] += 1
        if any(k in name for k in DECOMPOSITIONS):
            operands = tuple((tuple(a.shape), str(a.dtype).replace("torch.", "")) for a in args if isinstance(a, torch.Tensor))
            calls[(name, operands)] += 1
        return func(*args, **(kwargs or {}))


with gpu_grouping():
    for i in range(rounds):
        with Count():
            step(3 + i)
print(method, "non-view operations a step", sum(v for k, v in counts.items() if k not in VIEWS) / rounds)
for k, v in sorted(calls.items(), key=str):
    print(f"  {v / rounds:6.2f} x {k}")
print("most frequent:", sorted(((v / rounds, k) for k, v in counts.items() if k not in VIEWS), reverse=True)[:12])
