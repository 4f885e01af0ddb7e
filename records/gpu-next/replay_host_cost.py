"""The host's time of a replayed step, on a CPU: the captured step's bookkeeping (the adapter's
step, the gradient copy into the static buffers, the graph's launch) against the uncaptured
eager step, on the bench's GPT parameter shapes, one thread.

    python records/gpu-next/replay_host_cost.py [SIZE [METHOD,...]]   (defaults: small; five methods)

CUDA graphs are replaced by the test double of tests/adapters/fake_graphs.py with a replay that
does nothing, so a replayed step's time here is its host work alone (and the gradient copy, a
kernel launch on a GPU, is done by the CPU); the eager step's time is its host work plus the CPU's
arithmetic, an upper bound of its host work on a GPU."""
import os, statistics, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "adapters"))
import fake_graphs
from precond_ref.benchmarks.models import SIZES, build_torch
from precond_ref.benchmarks.common import contenders, update_extra, core_kwargs_for
from precond_ref.compare.training import make_torch_optimizer

torch.set_num_threads(1)
size_name = sys.argv[1] if len(sys.argv) > 1 else "small"
methods = sys.argv[2] if len(sys.argv) > 2 else "agd,rf_adamw,dasgo,mbf,if_shampoo"
size, WARM, TIMED = SIZES["gpt"][size_name], 12, 40
fake_graphs.FakeGraph.replay = lambda self: None  # the launch: its host cost is not the CPU's arithmetic


def run(method, capture):
    (c,), _ = contenders(method, False)
    torch.manual_seed(0)
    named = list(build_torch("gpt", size, torch.float32, "cpu").named_parameters())
    grads = [torch.randn_like(p) for _, p in named]
    opt = make_torch_optimizer(c.entry, named, core_kwargs_for(c.entry, torch, "torch"), {"compile": False, "capture": capture})[0]
    extra, times = update_extra(c, size["batch"] * size["seq"]), []
    for i in range(WARM + TIMED):
        for (_, p), g in zip(named, grads):
            p.grad = g.clone()  # new .grad tensors, as after zero_grad(set_to_none=True)
        t = time.perf_counter()
        opt.step(**extra)
        times.append((time.perf_counter() - t) * 1e6)
    captures = getattr(opt, "_captures", None)
    return statistics.median(times[WARM:]), (captures.graphs() if hasattr(captures, "graphs") else 0), len(named)


with fake_graphs.fake_graphs():
    for method in methods.split(","):
        eager, _, n = run(method, False)
        replayed, graphs, _ = run(method, True)
        print(f"{method:10s} GPT {size_name} ({n} tensors): eager step {eager:8.0f} us, replayed step {replayed:6.0f} us "
              f"({graphs} graphs)", flush=True)
