"""The bench's GPT training step (forward, backward, optimizer step) with each method uncaptured and
captured (``capture=False`` / ``True``, ``compile=False`` both: the captured step needs no
Inductor; AGD also compiled and captured), against AdamW(fused), synchronised, in one process; gradients set to None between
steps (so each captured step copies them into its static buffers).

    python captured.py [SIZE [METHOD,...]]     (defaults: reference; every method that captures)

Prints one line per method and mode: the warm-up (until every recurring pattern of its interval
decisions has been captured), the median and mean of the timed steps and their ratios to
AdamW(fused)'s, the graphs kept and the peak memory of the run."""
import os, statistics, sys, time, torch
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import contenders, update_extra, core_kwargs_for
from precond_ref.compare.training import make_torch_optimizer
from precond_ref.adapters._torch_compile import transient_patterns

size_name = sys.argv[1] if len(sys.argv) > 1 else "reference"
methods = sys.argv[2] if len(sys.argv) > 2 else "agd,rf_rmsprop,rf_adamw,dasgo,mbf,if_shampoo"
COMPILED = ("agd",)  # also timed compiled and captured (compile=True: the per-leaf kernels' first compilation)
size, dev, TIMED = SIZES["gpt"][size_name], os.environ.get("DEV", "cuda"), 30  # DEV=cpu: a dry run
cuda = dev.startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)


def warm_steps(opt):
    """Steps until each recurring pattern has had its first step after the first (captured there)."""
    transform = opt._transform(opt.param_groups[0])
    transient, first = transient_patterns(transform), {}
    for call in range(1, 1024):
        first.setdefault(tuple(transform.due(call)), call)
    return max(call for pattern, call in first.items() if pattern not in transient) + 1


def run(make, extra):
    torch.manual_seed(0)
    module = build_torch("gpt", size, torch.float32, dev)
    named = list(module.named_parameters())
    opt = make(named)
    warmup = warm_steps(opt) if hasattr(opt, "_transform") else 3
    batches = random_batches("gpt", size, dev, torch.float32)
    loss_fn, times = torch_loss("gpt"), []
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(warmup + TIMED):
        sync(); t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(module, *batches[i % len(batches)]).backward()
        opt.step(**extra)
        sync(); times.append((time.perf_counter() - t) * 1e3)
        if i == warmup - 1:
            warm = time.perf_counter() - start
    timed = times[warmup:]
    captures = getattr(opt, "_captures", None)
    graphs = captures.graphs() if hasattr(captures, "graphs") else 0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    del opt, module
    return warm, warmup, statistics.median(timed), statistics.fmean(timed), graphs, peak


_, _, base_median, base_mean, _, base_peak = run(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3, fused=True), {})
print(f"GPT {size_name} on {torch.cuda.get_device_name() if cuda else dev}, torch {torch.__version__}: AdamW(fused) median {base_median:.1f} ms, "
      f"mean {base_mean:.1f} ms, peak {base_peak:.0f} MiB", flush=True)
for method in methods.split(","):
    (c,), _ = contenders(method, False)
    extra = update_extra(c, size["batch"] * size["seq"])
    modes = [(False, False), (False, True)] + ([(True, True)] if method in COMPILED else [])
    for compile, capture in modes:
        def make(named):
            return make_torch_optimizer(c.entry, named, core_kwargs_for(c.entry, torch, "torch"),
                                        {"compile": compile, "capture": capture})[0]
        try:
            warm, steps, median, mean, graphs, peak = run(make, extra)
        except Exception as error:  # one method's failure does not end the run
            print(f"{method} compile={compile} capture={capture}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        label = ("compiled+" if compile else "") + ("captured" if capture else "eager")
        print(f"{method:10s} {label:17s}: warm-up {warm:5.1f} s ({steps} steps); "
              f"median {median:6.1f} ms ({median / base_median:.2f}x), mean {mean:6.1f} ms ({mean / base_mean:.2f}x); "
              f"{graphs} graphs; peak {peak:.0f} MiB", flush=True)
