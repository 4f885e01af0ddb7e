"""Host work of one eager torch step on a CPU, as a GPU would do it (docs/performance.md, fifth GPU run).

The bench's reference GPT (6 layers, width 512, vocabulary 8192) with its widths, vocabulary and each
method's block sizes (and Sketchy's, S-AdaGrad's ranks) divided by 8: the same leaves, tiles, stacks
and phases, so the same operations, on arrays 64 times smaller; a GPU's grouping (the CPU's rule that
keeps large leaves out of joins is switched off); one thread. What is left of the step's time is
host work: the Python and the dispatch of each operation. As on a GPU, no device value is read on
the host (precond_ref._backend's host_bool and host_all_finite answer None, as they do for a CUDA
tensor), so the skip rule selects instead of reading. Usage: python host_proxy.py METHOD."""
import sys, time, os, cProfile, pstats, torch
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
from precond_ref import blocking
blocking.CPU_BATCHED_ENOUGH = 2**62
import precond_ref, precond_ref.adapters.torch  # noqa: F401  (imports every module that uses them)
from precond_ref import _backend
_originals = {_backend.host_bool: lambda xp, x: None, _backend.host_all_finite: lambda xp, arrays: None}
for _name, _module in list(sys.modules.items()):
    if _name.startswith(("precond_ref", "adapters")):
        for _attr, _value in list(vars(_module).items()):
            if callable(_value) and _value in _originals:
                setattr(_module, _attr, _originals[_value])
torch.set_num_threads(1)
method = sys.argv[1]
size = dict(SIZES["gpt"]["reference"]); size.update(width=64, vocab=1024, heads=2, batch=2, seq=16)
torch.manual_seed(0)
module = build_torch("gpt", size, torch.float32, "cpu")
named = list(module.named_parameters())
(c,), _ = contenders(method, False)
import dataclasses, json
SCALED = {  # the reference's settings / 8: IF-Shampoo's block 64, ASGO's 1024, MBF's 128, the bench's Sketchy and S-AdaGrad
    "if_shampoo": {"block_size": 8}, "asgo": {"block_size": 128}, "mbf": {"block_size": 16},
    "sketchy": {"block_size": 128, "rank": 32}, "s_adagrad": {"block_size": 512, "rank": 2},
}
ov = {**SCALED.get(method, {}), **json.loads(os.environ.get("OV", "{}"))}
c = dataclasses.replace(c, entry=dataclasses.replace(c.entry, bench_hyperparameters={**c.entry.bench_hyperparameters, **ov}))
opt, _ = torch_optimizer(c, named, "off")
extra = update_extra(c, size["batch"] * size["seq"])
batches = random_batches("gpt", size, "cpu", torch.float32)
loss_fn = torch_loss("gpt")
gs = []
for i in range(4):
    for _, p in named: p.grad = None
    loss_fn(module, *batches[i % len(batches)]).backward()
    gs.append([p.grad.clone() for _, p in named])
def step(i):
    for (_, p), g in zip(named, gs[i % 4]): p.grad = g
    opt.step(**extra)
for i in range(20): step(i)
ts = []
for i in range(40):
    t = time.perf_counter(); step(i); ts.append(time.perf_counter() - t)
ts.sort()
print(f"{method} {os.environ.get('TAG','')}: step median {ts[len(ts)//2]*1e3:.2f} ms, min {ts[0]*1e3:.2f} ms")
from torch.utils._python_dispatch import TorchDispatchMode
import collections
VIEWS = {"view", "_unsafe_view", "as_strided", "transpose", "t", "expand", "permute", "unsqueeze", "squeeze", "select",
         "slice", "alias", "detach", "unbind", "split", "split_with_sizes", "reshape", "diagonal", "narrow", "lift_fresh"}
counts = collections.Counter()
class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
for i in range(2):
    with Count():
        step(i)
calls = {k: v / 2 for k, v in counts.items()}
top = sorted(((k, v) for k, v in calls.items() if k not in VIEWS), key=lambda kv: -kv[1])[:8]
print(f"{method}: operations a step {sum(v for k, v in calls.items() if k not in VIEWS):.0f} "
      f"(and {sum(v for k, v in calls.items() if k in VIEWS):.0f} views): " + ", ".join(f"{k} {v:.0f}" for k, v in top))
if os.environ.get("PROF"):
    pr = cProfile.Profile(); pr.enable()
    for i in range(20): step(i)
    pr.disable()
    st = pstats.Stats(pr); st.sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("N", 30)))
