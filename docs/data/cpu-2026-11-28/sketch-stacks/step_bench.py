"""The optimizer step alone (CPU ms, 1 thread) of a method with the bench's hyperparameters
(`compare.methods`: Sketchy rank 256, block 1024; S-AdaGrad rank 16, block 4096) on the small GPT:
`python step_bench.py METHOD BLOCKS PERIOD` (steady-step/step.py with those hyperparameters)."""
import sys, time, statistics, torch
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.common import contenders, torch_optimizer
torch.manual_seed(0); torch.set_num_threads(1)
m = build_torch("gpt", SIZES["gpt"]["small"], torch.float32, "cpu")
named = list(m.named_parameters())
(contender,), _ = contenders(sys.argv[1], False)
opt, _ = torch_optimizer(contender, named, "off")
blocks = int(sys.argv[2]); period = int(sys.argv[3])
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
