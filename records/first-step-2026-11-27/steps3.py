"""The first three steps of one torch optimizer at GPT-2-small's shapes (as precond_ref.benchmarks.scale
makes them: 148 float32 tensors, random gradients, lr=1e-3, defaults otherwise), to tell a first
step's one-time work from the method's steady step.

    python steps3.py CLASS [STEPS]
"""
import sys, time, torch
import precond_ref.adapters.torch as pt
from precond_ref.benchmarks.scale import gpt2_small_shapes, _ROOT_FREE

method, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.manual_seed(0)
named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32) * 0.02)) for n, s in gpt2_small_shapes()]
opt = getattr(pt, method)(named, lr=1e-3, **({"batch_size": 8} if method in _ROOT_FREE else {}))
times = []
for _ in range(steps):
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    start = time.perf_counter()
    opt.step()
    times.append(round(time.perf_counter() - start, 1))
print(method, "steps s:", times, "threads", torch.get_num_threads(), flush=True)
