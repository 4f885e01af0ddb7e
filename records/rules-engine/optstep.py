"""The optimizer step alone of a torch class on the small GPT's parameters (random gradients), eager or
compiled: ``python optstep.py CLASS on|off`` prints the min and median ms a step over 5 x 40 steps."""
import sys, time, torch
from precond_ref.benchmarks.models import SIZES, build_torch
import precond_ref.adapters.torch as T
torch.manual_seed(0); torch.set_num_threads(2)
m = build_torch("gpt", SIZES["gpt"]["small"], torch.float32, "cpu")
named = list(m.named_parameters())
compile_ = sys.argv[2] == "on"
cls = getattr(T, sys.argv[1])
opt = cls(named, lr=1e-3, compile=compile_, **({"batch_size": 512} if sys.argv[1] in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}))
gs = [[torch.randn_like(p) * 1e-2 for _, p in named] for _ in range(4)]
def step(i):
    for (_, p), g in zip(named, gs[i % 4]): p.grad = g
    opt.step()
for i in range(5): step(i)
ts = []
for r in range(5):
    t = time.perf_counter()
    for i in range(40): step(i)
    ts.append((time.perf_counter() - t) / 40 * 1e3)
print(sys.argv[1], sys.argv[2], "ms/step min %.2f median %.2f" % (min(ts), sorted(ts)[2]))
