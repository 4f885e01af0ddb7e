"""Whole training step of the bench's GPT with one method compiled as asked, against AdamW(fused),
synchronised, in one process (docs/performance.md, "On a GPU: the sixth run": what to measure next).

    [OV='{"root_tolerance": Infinity}'] python overhead.py METHOD SIZE DEVICE MODE [static]

MODE: "eager" (compile=False), "default" (compile=True), "combo" (compile=True with Inductor's
``combo_kernels``: independent small kernels launched as one, for Triton) or "reduce-overhead" (CUDA
graphs through Inductor's cudagraph trees). With "static", the parameters and the optimizer's state tensors are
marked as static addresses (torch._dynamo.mark_static_address) after the first step, which made
the state: Inductor skips CUDA graphs for a graph that writes its inputs in place unless their
addresses are static; its reasons are logged under TORCH_LOGS=perf_hints. Prints the warm-up (until
every pattern of the method's refresh decisions has compiled), then the median and mean of the
timed steps and their ratios to AdamW(fused). OV: a JSON object of the method's keyword arguments
over the bench's (ASGO's ``root_tolerance`` Infinity drops the checked root's ``torch.cond``, with
which Inductor does not capture CUDA graphs)."""
import json, os, sys, time, statistics, dataclasses, torch
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import contenders, update_extra, steps_until_every_pattern, core_kwargs_for
from precond_ref.compare.training import make_torch_optimizer

method, size_name, dev, mode = sys.argv[1:5]
static = "static" in sys.argv[5:]
size = SIZES["gpt"][size_name]
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)


def run(make, warmup, timed=30):
    torch.manual_seed(0)
    module = build_torch("gpt", size, torch.float32, dev)
    named = list(module.named_parameters())
    opt = make(named)
    batches = random_batches("gpt", size, dev, torch.float32)
    loss_fn, times = torch_loss("gpt"), []
    extra = update_extra(c, size["batch"] * size["seq"]) if make is ours else {}
    start = time.perf_counter()
    for i in range(warmup + timed):
        if i == warmup:
            sync(); warm = time.perf_counter() - start
        sync(); t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss_fn(module, *batches[i % len(batches)]).backward()
        opt.step(**extra)
        sync(); times.append((time.perf_counter() - t) * 1e3)
        if i < warmup:
            print(f"  step {i}: {times[-1]:.0f} ms ({time.perf_counter() - start:.0f} s in)", file=sys.stderr, flush=True)
        if i == 0 and static and make is ours:
            for _, p in named:
                torch._dynamo.mark_static_address(p)
                for value in opt.state[p].values():
                    if isinstance(value, torch.Tensor):
                        torch._dynamo.mark_static_address(value)
    timed_ms = times[warmup:]
    return warm, statistics.median(timed_ms), statistics.fmean(timed_ms)


(c,), _ = contenders(method, False)
overrides = json.loads(os.environ.get("OV", "{}"))
c = dataclasses.replace(c, entry=dataclasses.replace(
    c.entry, bench_hyperparameters={**c.entry.bench_hyperparameters, **overrides}))
options = {"eager": {"compile": False}, "default": {"compile": True},
           "combo": {"compile": {"options": {"combo_kernels": True}}}}.get(mode, {"compile": {"mode": mode}})


def ours(named):
    return make_torch_optimizer(c.entry, named, core_kwargs_for(c.entry, torch, "torch"), options)[0]


def adamw(named):
    return torch.optim.AdamW([p for _, p in named], lr=1e-3, fused=True)


_, base_median, base_mean = run(adamw, 3)
warm, median, mean = run(ours, max(3, steps_until_every_pattern(c.entry)) + 1)
print(f"{method} {overrides or ''} {mode}{' static' if static else ''} on {torch.cuda.get_device_name() if dev.startswith('cuda') else dev}: "
      f"warm-up {warm:.1f} s; median {median:.1f} ms ({median / base_median:.2f}x AdamW(fused) {base_median:.1f} ms), "
      f"mean {mean:.1f} ms ({mean / base_mean:.2f}x)", flush=True)
