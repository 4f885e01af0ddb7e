"""The first steps of one torch optimizer at GPT-2-small's shapes, CPU and wall seconds per step with one
thread by default (the machine may be shared: CPU time is the figure to compare, old and new in turn).

    python cpu3.py CLASS [STEPS] [THREADS]
"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
import precond_ref.adapters.torch as pt
from precond_ref.benchmarks.scale import gpt2_small_shapes, _ROOT_FREE
method, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.manual_seed(0)
named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32) * 0.02)) for n, s in gpt2_small_shapes()]
opt = getattr(pt, method)(named, lr=1e-3, **({"batch_size": 8} if method in _ROOT_FREE else {}))
cpu, wall = [], []
for _ in range(steps):
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    c, w = time.process_time(), time.perf_counter()
    opt.step()
    cpu.append(round(time.process_time() - c, 1)); wall.append(round(time.perf_counter() - w, 1))
print(method, "cpu s:", cpu, "wall s:", wall, "threads", torch.get_num_threads(), flush=True)
