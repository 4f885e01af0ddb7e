"""CPU ms of one batched FD step (S-AdaGrad's: sketch.fd_update_apply, one new column) on stacks of
n sketches of 4096 x 16 (float32, 1 thread): the cost per sketch as the stack grows."""
import statistics
import time

import array_api_compat.torch as xp
import torch

from precond_ref.sketch import fd_init, fd_update_apply

torch.set_num_threads(1)
options = dict(decay=1.0, tail_decay=1.0, eps=1e-7, relative_eps=True, delta=0.0, cutoff=True, decomposition="auto")
for n in (1, 2, 4, 8, 16, 32, 64, 98, 226):
    sketch = fd_init(xp, 4096, 16, dtype=torch.float32, device="cpu", batch=(n,))
    times = []
    for i in range(3 + max(3, 64 // n)):
        x = torch.randn(n, 4096, 1)
        t = time.process_time()
        sketch, _, _ = fd_update_apply(xp, sketch, x, exponent=-0.5, **options)
        if i >= 3:
            times.append(time.process_time() - t)
    ms = statistics.median(times) * 1e3
    print(f"{n} ms/stack {ms:.2f} ms/sketch {ms / n:.3f}", flush=True)
