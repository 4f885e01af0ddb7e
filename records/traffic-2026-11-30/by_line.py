"""IF-Shampoo's eager step bytes by (operation, dtypes, calling line in precond_ref), reference GPT, GPU grouping."""
import sys, torch, collections, traceback
from torch.utils._python_dispatch import TorchDispatchMode
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.counting import gpu_grouping, VIEWS, NOT_LAUNCHED
import precond_ref.adapters.torch as T
torch.set_num_threads(1)
def nbytes(x): return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
def flat(v):
    if isinstance(v, (list, tuple)):
        for a in v: yield from flat(a)
    else: yield v
name = sys.argv[1]; size = sys.argv[2] if len(sys.argv) > 2 else "reference"
torch.manual_seed(0)
m = build_torch("gpt", SIZES["gpt"][size], torch.float32, "cpu")
named = list(m.named_parameters()); pbytes = sum(nbytes(p) for _, p in named)
kw = {"batch_size": 512} if name in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
opt = getattr(T, name)(named, lr=1e-3, **kw)
def step():
    for _, p in named: p.grad = torch.randn_like(p) * 1e-2
    opt.step()
def where():
    for fr in reversed(traceback.extract_stack()[:-3]):
        if "precond_ref" in fr.filename and "_python_dispatch" not in fr.filename:
            return f"{fr.filename.split('precond_ref/')[-1]}:{fr.lineno} {fr.name}"
    return "?"
with gpu_grouping():
    for i in range(12): step()
    total = collections.Counter(); ops = collections.Counter()
    class M(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.__name__.split(".")[0]
            if op not in VIEWS and op not in NOT_LAUNCHED:
                b = sum(nbytes(a) for a in flat(list(args) + list((kwargs or {}).values()))) + sum(nbytes(o) for o in flat(out))
                key = (op, where()); total[key] += b; ops[op] += b
            return out
    steps = 6
    with M():
        for i in range(steps):
            for _, p in named: p.grad = torch.randn_like(p) * 1e-2
    grads_bytes = sum(total.values()); total.clear(); ops.clear()
    with M():
        for i in range(steps):
            step()
    print(f"{name} {size}: {sum(total.values())/steps/pbytes:.1f}x params a step (gradient making {grads_bytes/steps/pbytes:.1f}x included)")
    print("by op:", ", ".join(f"{k} {v/steps/pbytes:.1f}" for k, v in ops.most_common(12)))
    for (op, loc), v in total.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 30):
        print(f"{v/steps/pbytes:7.2f}x  {op:22s} {loc}")
