"""Where one method's optimizer step spends GPU and host time on the reference GPT (the bench's optimizer,
hyperparameters and default path: captured where it captures), for the methods far from their targets:

  python profile_step.py METHOD[,METHOD...] [size] [steps]

Prints, per method: the step's wall ms (synchronised), then torch.profiler's top operations and kernels by
self device time and by self host time over `steps` steps after 8. Runs on a CPU too (device time then 0)."""
import sys, time

import torch

from precond_ref.benchmarks.common import stepping
from precond_ref.benchmarks.models import SIZES, batch_gradients, build_torch, random_batches

methods = sys.argv[1].split(",")
size = sys.argv[2] if len(sys.argv) > 2 else "reference"
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
device = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
shape = SIZES["gpt"][size]
module = build_torch("gpt", shape, torch.float32, device)
named = list(module.named_parameters())
batches = random_batches("gpt", shape, device, torch.float32)
grads = batch_gradients("gpt", module, named, batches, 2)
activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
for method in methods:
    step = stepping(method, named, grads, shape["batch"] * shape["seq"])
    for i in range(8):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    print(f"== {method} on {device}: {(time.perf_counter() - t0) / steps * 1e3:.2f} ms a step (mean of {steps}, synchronised)", flush=True)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        sync()
    averages = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(averages.table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)
    if device == "cuda":
        print(averages.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60), flush=True)
    del step
