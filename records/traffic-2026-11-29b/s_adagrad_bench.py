"""Bytes and launched operations of one S-AdaGrad torch step at the bench's settings (rank 16, block 4096,
delta 0, lr 0.1) on the reference GPT's shapes, under the GPU's grouping (its secular core), by operation."""
import sys, collections, torch
from torch.utils._python_dispatch import TorchDispatchMode
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.counting import gpu_grouping, VIEWS, NOT_LAUNCHED
import precond_ref.adapters.torch as T
torch.set_num_threads(2)
size = sys.argv[1] if len(sys.argv) > 1 else "reference"
kw = dict(rank=16, block_size=4096, delta=0.0)
if len(sys.argv) > 2:
    kw["decomposition"] = sys.argv[2]
nbytes = lambda x: x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
def flat(v):
    if isinstance(v, (list, tuple)):
        for a in v: yield from flat(a)
    else: yield v
torch.manual_seed(0)
m = build_torch("gpt", SIZES["gpt"][size], torch.float32, "cpu")
named = list(m.named_parameters()); pbytes = sum(nbytes(p) for _, p in named)
opt = T.SAdaGrad(named, lr=0.1, **kw)
def step():
    for _, p in named: p.grad = torch.randn_like(p) * 1e-2
    opt.step()
with gpu_grouping():
    for i in range(4): step()
    total, count = collections.Counter(), collections.Counter()
    class M(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.__name__.split(".")[0]
            if op not in VIEWS and op not in NOT_LAUNCHED:
                total[op] += sum(nbytes(a) for a in flat(list(args) + list((kwargs or {}).values()))) + sum(nbytes(o) for o in flat(out))
                count[op] += 1
            return out
    steps = 2
    with M():
        for i in range(steps): step()
print(f"S-AdaGrad {kw}: traffic {sum(total.values()) / steps / pbytes:.1f}x params, {sum(count.values()) / steps:.0f} ops/step")
for k, v in total.most_common(12):
    print(f"  {k:28s} {v / steps / pbytes:8.2f}x  {count[k] / steps:6.0f} ops")
