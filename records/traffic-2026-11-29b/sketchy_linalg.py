"""The linear-algebra calls (and host reads) of Sketchy's torch step at the bench settings (rank 256, blocks of
1024) on the reference GPT's shapes, under the GPU's grouping, over one refresh period (3 steps): op, shapes, dtype."""
import sys, collections, torch
from torch.utils._python_dispatch import TorchDispatchMode
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.counting import gpu_grouping, VIEWS, NOT_LAUNCHED
import precond_ref.adapters.torch as T
torch.set_num_threads(2)
LINALG = ("linalg", "_linalg", "geqrf", "orgqr", "householder", "cholesky", "triangular", "qr", "svd", "eigh", "_local_scalar_dense", "bmm", "mm")
torch.manual_seed(0)
m = build_torch("gpt", SIZES["gpt"][sys.argv[1] if len(sys.argv) > 1 else "reference"], torch.float32, "cpu")
named = list(m.named_parameters())
opt = T.Sketchy(named, lr=1e-3, rank=256, block_size=1024)
def step():
    for _, p in named: p.grad = torch.randn_like(p) * 1e-2
    opt.step()
calls, ops = collections.Counter(), collections.Counter()
with gpu_grouping():
    for i in range(4): step()
    class M(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.__name__.split(".")[0]
            if op not in VIEWS and op not in NOT_LAUNCHED:
                ops[op] += 1
            if any(op.startswith(k) for k in LINALG):
                shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
                dt = next((str(a.dtype) for a in args if isinstance(a, torch.Tensor)), "")
                calls[(op, shapes, dt)] += 1
            return out
    with M():
        for i in range(3): step()
print(f"Sketchy (rank 256, block 1024), 3 steps: {sum(ops.values()) / 3:.0f} launched ops a step")
for (op, shapes, dt), n in sorted(calls.items(), key=lambda kv: (kv[0][0], -kv[1])):
    print(f"  {n / 3:5.2f}/step  {op:28s} {dt:14s} {shapes}")
