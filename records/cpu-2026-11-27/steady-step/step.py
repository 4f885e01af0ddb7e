"""Optimizer step alone, torch class on small GPT shapes, 1 thread: CPU ms per step, from blocks of
`period` steps (median and min over blocks), and the first step's CPU ms."""
import sys, time, statistics, torch
from precond_ref.benchmarks.models import SIZES, build_torch
import precond_ref.adapters.torch as T
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
m = build_torch("gpt", SIZES["gpt"]["small"], torch.float32, "cpu")
named = list(m.named_parameters())
cls = getattr(T, sys.argv[1]); blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 30
period = int(sys.argv[3]) if len(sys.argv) > 3 else 3
kw = {"batch_size": 512} if sys.argv[1] in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
opt = cls(named, lr=1e-3, **kw)
gs = [[torch.randn_like(p) * 1e-2 for _, p in named] for _ in range(4)]
def step(i):
    for (_, p), g in zip(named, gs[i % 4]): p.grad = g
    opt.step()
t0 = time.process_time(); step(0); first = (time.process_time() - t0) * 1e3
for i in range(1, 12): step(i)
ts = []
for b in range(blocks):
    t = time.process_time()
    for i in range(period): step(i)
    ts.append((time.process_time() - t) * 1e3 / period)
print(sys.argv[1], "first %.1f block-median %.2f min %.2f" % (first, statistics.median(ts), min(ts)), flush=True)
