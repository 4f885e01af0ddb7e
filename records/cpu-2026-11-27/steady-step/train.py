"""Full training steps (forward, backward, optimizer step) of the bench's small GPT with the bench's
optimizer (its hyperparameters, its step arguments), batches and loss. CPU ms per step from blocks of
`period` steps (median, min over blocks), and the first step's CPU ms; TIMER=wall for wall time.
Usage: train.py METHOD BLOCKS PERIOD [THREADS]"""
import os, sys, time, statistics, torch
from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import core_kwargs_for, update_extra
from precond_ref.compare.methods import entry_by_name
from precond_ref.compare.training import make_torch_optimizer
clock = time.perf_counter if os.environ.get("TIMER") == "wall" else time.process_time
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
size = SIZES["gpt"]["small"]
m = build_torch("gpt", size, torch.float32, "cpu")
batches = random_batches("gpt", size, "cpu", torch.float32); loss_fn = torch_loss("gpt")
named = list(m.named_parameters())
entry = entry_by_name(sys.argv[1]); blocks, period = int(sys.argv[2]), int(sys.argv[3])
opt, notes = make_torch_optimizer(entry, named, core_kwargs_for(entry, torch, "torch"), {})
extra = {"batch_size": batch_size_of("gpt", size)} if "batch_size" in entry.update_kwargs else {}
def step(i):
    for _, p in named: p.grad = None
    loss_fn(m, *batches[i % len(batches)]).backward()
    opt.step(**extra)
t0 = clock(); step(0); first = (clock() - t0) * 1e3
for i in range(1, 12): step(i)
ts = []
for b in range(blocks):
    t = clock()
    for i in range(period): step(12 + b * period + i)
    ts.append((clock() - t) * 1e3 / period)
print(sys.argv[1], type(opt).__name__, "first %.1f block-median %.2f min %.2f" % (first, statistics.median(ts), min(ts)), flush=True)
