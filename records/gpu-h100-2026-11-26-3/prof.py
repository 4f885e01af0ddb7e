"""On the GPU: where the eager matrix methods' optimizer step spends its time on the reference GPT.
Per method: wall ms per step (synchronised) over a refresh window, then torch.profiler's top ops by
CUDA time and by CPU self time over the same window. Argument: comma-separated bench method keys,
optionally with [variant]."""
import os, sys, time, torch
from torch.profiler import profile, ProfilerActivity
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra, refresh_period
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss, batch_size_of

pos = [a for a in sys.argv[1:] if not a.startswith("--")]
spec = pos[0]
with_variants = "--variants" in sys.argv
size = SIZES["gpt"][os.environ.get("SIZE", "reference")]
dev = os.environ.get("DEV", "cuda")
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
torch.backends.cuda.matmul.allow_tf32 = False
cs, _ = contenders(spec, with_variants)
want = pos[1].split(",") if len(pos) > 1 else None
for c in cs:
    if want and c.key not in want:
        continue
    module = build_torch("gpt", size, torch.float32, dev)
    named = list(module.named_parameters())
    (x, y), = random_batches("gpt", size, dev, torch.float32)[:1]
    loss = torch_loss("gpt")(module, x, y); loss.backward()
    opt, _ = torch_optimizer(c, named, "default")
    extra = update_extra(c, batch_size_of("gpt", size))
    T = max(1, refresh_period(c.entry))
    n = max(T, 3)
    for _ in range(max(2 * T, 4)):
        opt.step(**extra)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        opt.step(**extra)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / n
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])) as prof:
        for _ in range(n):
            opt.step(**extra)
        sync()
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e3 / n
    print(f"\n===== {c.key}: {ms:.2f} ms/step wall over {n} steps (T={T}); CUDA busy {cuda_total:.2f} ms/step; "
          f"{sum(e.count for e in ka if e.key.startswith('aten::')) / n:.0f} aten calls/step", flush=True)
    print(ka.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    del opt, module
    torch.cuda.empty_cache() if dev == "cuda" else None
