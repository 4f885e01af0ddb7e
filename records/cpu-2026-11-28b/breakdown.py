"""Where the small GPT's eager optimizer step spends its CPU time, per method, with the bench's own
optimizers (its hyperparameters, compile as its default rows) and its allocator setting (--malloc keep):

  python records/cpu-2026-11-28b/breakdown.py [method,...] [threads] [steps] [cpu|gpu]

(the last: this CPU's grouping, the default, or a GPU's, precond_ref.benchmarks.counting.gpu_grouping:
no large block kept out of a stack, no host read of the non-finite test, the device branch of
S-AdaGrad's stack bound; the optimizer is made and stepped inside it)

For each method: the optimizer step alone (ms, wall time over `steps` steps after 12, each
refresh pattern included), and torch.profiler's self CPU time of those steps by kind of operation:
products (bmm, mm, matmul, mv, dot, addmm, baddbmm), decompositions (eigh, qr, svd, cholesky, ...),
data movement (cat, stack, copy_, _to_copy, index_select, clone, where), other element-wise and
reductions, and the host (the step's time less its operations' self time: Python, the dispatcher,
allocations). The cost model's prediction (precond_ref.benchmarks.cost at this machine's measured
rates) beside it."""
import collections, contextlib, sys, time

import torch

from precond_ref.benchmarks.allocator import keep_freed_memory
from precond_ref.benchmarks.common import contenders, stepping
from precond_ref.benchmarks.cost import machine_rates, method_cost
from precond_ref.benchmarks.counting import gpu_grouping
from precond_ref.benchmarks.models import SIZES, batch_gradients, build_torch, random_batches

methods = (sys.argv[1] if len(sys.argv) > 1 else "asgo,if_shampoo,mbf,sketchy,s_adagrad").split(",")
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 12
grouping = sys.argv[4] if len(sys.argv) > 4 else "cpu"
print("malloc:", keep_freed_memory())
torch.set_num_threads(threads)
rates = machine_rates("cpu")
print(f"grouping {grouping}; threads {threads}; matmul {rates['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s")
PRODUCTS = {"aten::bmm", "aten::mm", "aten::matmul", "aten::mv", "aten::dot", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
DECOMP = ("eigh", "qr", "svd", "cholesky", "linalg_inv", "linalg_solve", "lu", "triangular")
MOVES = {"aten::cat", "aten::stack", "aten::copy_", "aten::_to_copy", "aten::index_select", "aten::clone", "aten::where", "aten::index", "aten::gather"}


def kind(name):
    if name in PRODUCTS:
        return "products"
    if any(d in name for d in DECOMP):
        return "decomp"
    if name in MOVES:
        return "moves"
    return "elementwise"


shape = SIZES["gpt"]["small"]
module = build_torch("gpt", shape, torch.float32, "cpu")
named = list(module.named_parameters())
params = [(n, tuple(p.shape)) for n, p in named]
batches = random_batches("gpt", shape, "cpu", torch.float32)
grads = batch_gradients("gpt", module, named, batches, 2)
print(f"{'method':12s} {'step ms':>8s} {'model ms':>8s} | {'products':>8s} {'decomp':>8s} {'moves':>8s} {'elemwise':>8s} {'host':>8s} (ms a step)")
for method in methods:
    with gpu_grouping() if grouping == "gpu" else contextlib.nullcontext():
        step = stepping(method, named, grads, shape["batch"] * shape["seq"])
        for i in range(12):
            step(i)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        ms = (time.perf_counter() - t0) / steps * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t1 = time.perf_counter()
            for i in range(steps):
                step(i)
            profiled = (time.perf_counter() - t1) / steps * 1e3
        parts = collections.Counter()
        for e in prof.key_averages():
            if e.key.startswith("aten::") or e.key.startswith("Torch-Compiled") or "Compiled" in e.key:
                parts[kind(e.key)] += e.self_cpu_time_total / 1e3 / steps
        host = profiled - sum(parts.values())
        cost = method_cost(contenders(method, False)[0][0].entry, params, 4)
        model = "" if cost is None else f"{(cost.flops / rates['matmul_flops_per_s'] + cost.bytes / rates['copy_bytes_per_s']) * 1e3:8.2f}"
        print(f"{method:12s} {ms:8.2f} {model:>8s} | " + " ".join(f"{parts[k]:8.2f}" for k in ("products", "decomp", "moves", "elementwise")) + f" {host:8.2f}", flush=True)
        del step
