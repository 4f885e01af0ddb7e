"""Bytes each eager torch step reads and writes (the sum over the operations that launch a kernel of their tensor
inputs' and outputs' bytes), on the reference GPT's shapes, over the parameters' bytes: a proxy for an
element-wise step's GPU time inside a captured graph (`python traffic.py METHOD,...`)."""
import sys, torch, collections
from torch.utils._python_dispatch import TorchDispatchMode
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.counting import gpu_grouping, VIEWS, NOT_LAUNCHED
import precond_ref.adapters.torch as T
torch.set_num_threads(1)
def nbytes(x):
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
def flat(v):
    if isinstance(v, (list, tuple)):
        for a in v: yield from flat(a)
    else: yield v
for name in sys.argv[1].split(","):
    torch.manual_seed(0)
    m = build_torch("gpt", SIZES["gpt"][sys.argv[2] if len(sys.argv) > 2 else "reference"], torch.float32, "cpu")
    named = list(m.named_parameters()); pbytes = sum(nbytes(p) for _, p in named)
    if name.startswith("AdamW"):
        opt = torch.optim.AdamW([p for _, p in named], lr=1e-3, **({"fused": True} if name == "AdamWfused" else {"foreach": True}))
    else:
        kw = {"batch_size": 512} if name in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
        opt = getattr(T, name)(named, lr=1e-3, compile=False, **kw) if name in ("AGD", "RFRMSProp", "RFAdamW", "DASGO") else getattr(T, name)(named, lr=1e-3, **kw)
    def step():
        for _, p in named: p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    with gpu_grouping():
        for i in range(12): step()
        total = collections.Counter(); n = 0
        class M(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                op = func.__name__.split(".")[0]
                if op not in VIEWS and op not in NOT_LAUNCHED:
                    b = sum(nbytes(a) for a in flat(list(args) + list((kwargs or {}).values()))) + sum(nbytes(o) for o in flat(out))
                    total[op] += b
                return out
        steps = 6
        with M():
            for i in range(steps): step()
    t = sum(total.values()) / steps
    print(f"{name:12s} traffic {t / pbytes:6.1f}x params  top: " + ", ".join(f"{k} {v / steps / pbytes:.1f}" for k, v in total.most_common(6)), flush=True)
