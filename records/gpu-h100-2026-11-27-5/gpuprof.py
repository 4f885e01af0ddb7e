"""GPU session 5: per-step times and a profile of one eager optimizer step (reference GPT)."""
import sys, time, collections, os, torch
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
torch.manual_seed(0)
method, size_name, dev = sys.argv[1], sys.argv[2], sys.argv[3]
size = SIZES["gpt"][size_name]
module = build_torch("gpt", size, torch.float32, dev)
named = list(module.named_parameters())
(c,), _ = contenders(method, False)
opt, _ = torch_optimizer(c, named, "off")
extra = update_extra(c, size["batch"] * size["seq"])
batches = random_batches("gpt", size, dev, torch.float32)
loss_fn = torch_loss("gpt")
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def grads(i):
    for _, p in named: p.grad = None
    loss_fn(module, *batches[i % len(batches)]).backward()
ts = []
for i in range(int(sys.argv[4]) if len(sys.argv) > 4 else 24):
    grads(i); sync(); t = time.perf_counter(); opt.step(**extra); sync(); ts.append((time.perf_counter() - t) * 1e3)
print(method, "step ms:", " ".join("%.1f" % t for t in ts))
plain = sorted(ts[12:])[len(ts[12:]) // 2]
print(method, "median of the last steps %.1f ms" % plain)
from torch.profiler import profile, ProfilerActivity
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
for i in range(2):
    grads(i); sync()
    with profile(activities=acts) as p:
        opt.step(**extra); sync()
    ka = p.key_averages()
    cpu = sum(e.self_cpu_time_total for e in ka) / 1e3
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3
    kern = sum(e.count for e in ka if getattr(e, "self_device_time_total", 0) > 0 and e.key.startswith(("void", "ampere", "sm", "cutlass", "triton")) )
    print(f"{method} profiled step {i}: self cpu {cpu:.1f} ms, device {gpu:.1f} ms, aten ops {sum(e.count for e in ka if e.key.startswith('aten::'))}")
    key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    rows = sorted(ka, key=lambda e: -getattr(e, key))[:18]
    for e in rows:
        print("   %-60s n=%5d cpu=%8.2f dev=%8.2f" % (e.key[:60], e.count, e.self_cpu_time_total / 1e3, getattr(e, "self_device_time_total", 0) / 1e3))
