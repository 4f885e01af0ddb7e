"""S-AdaGrad's eager torch step with the secular core on the bench's small GPT (rank 16, blocks of
4096, delta 0, the bench's settings), one thread: the best of 10 steps after 3, in ms."""
import time
import warnings

import torch

import precond_ref.adapters.torch as pt
from precond_ref.benchmarks.models import SIZES, build_torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)
m = build_torch("gpt", SIZES["gpt"]["small"], torch.float32, "cpu")
opt = pt.SAdaGrad(m.parameters(), compile=False, capture=False, rank=16, block_size=4096, delta=0.0,
                  decomposition="incremental_secular")
for p in m.parameters():
    p.grad = torch.randn_like(p) * 1e-2
for _ in range(3):
    opt.step()
best = float("inf")
for _ in range(10):
    start = time.perf_counter()
    opt.step()
    best = min(best, time.perf_counter() - start)
print(f"{best * 1e3:.1f} ms a step")
