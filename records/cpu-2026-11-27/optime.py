"""Where an eager torch optimizer step's time goes, operation by operation, on this machine
(docs/performance.md, "The matrix methods against issue 35's CPU targets", eighteenth session).

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 \
        python optime.py METHOD CASE [ROWS]

CASE: ``gpt`` (the bench's small GPT) or a layer case of ``bench --cases`` (``tf2x512``, ...). The
optimizer is the bench's (``bench_hyperparameters``), its gradients fixed random tensors (no
forward or backward). Prints the steps' times, then four steps again under a dispatch mode that
times each operation from Python (its dispatch and its kernel): the sum of those times against the
step's, and the costliest (operation, calling line) pairs, the products and decompositions by shape.
The mode's own bookkeeping slows the step; the sum of the operations' times does not include it."""
import collections, sys, time, traceback
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
from precond_ref.benchmarks.layers import BATCH_SIZE, CASES, _gradients, case_module

method, case = sys.argv[1], sys.argv[2]
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 25
if case == "gpt":
    from precond_ref.benchmarks.models import SIZES, build_torch
    module = build_torch("gpt", SIZES["gpt"]["small"], torch.float32, "cpu")
else:
    module = case_module(CASES[case], torch.float32, "cpu")
named = list(module.named_parameters())
(contender,), _ = contenders(method, False)
opt, _ = torch_optimizer(contender, named, "off")
extra = update_extra(contender, 512 if case == "gpt" else BATCH_SIZE)
gradients = [{n: torch.as_tensor(g, dtype=torch.float32) for n, g in d.items()} for d in _gradients(dict(named))]


def step(i):
    for n, p in named:
        p.grad = gradients[i % len(gradients)][n]
    opt.step(**extra)


for i in range(4):
    step(i)
times = []
for i in range(10):
    t = time.perf_counter(); step(i); times.append((time.perf_counter() - t) * 1e3)
print(method, case, "step ms:", " ".join(f"{t:.0f}" for t in times))
SHAPED = {"bmm", "mm", "_linalg_eigh", "_linalg_svd", "linalg_qr"}
spent = collections.defaultdict(lambda: [0, 0.0])


class Timed(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - t
        name = func.overloadpacket.__name__
        frames = [f for f in traceback.extract_stack() if "/precond_ref/" in f.filename or "/adapters/" in f.filename]
        line = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else "?"
        shapes = str(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))) if name in SHAPED else ""
        entry = spent[(name, line, shapes)]
        entry[0] += 1
        entry[1] += elapsed
        return out


N = 4
start = time.perf_counter()
with Timed():
    for i in range(N):
        step(i)
print(f"under the mode: {(time.perf_counter() - start) * 1e3 / N:.1f} ms a step, its operations' times summed "
      f"{sum(v[1] for v in spent.values()) * 1e3 / N:.1f} ms")
for (name, line, shapes), (count, total) in sorted(spent.items(), key=lambda kv: -kv[1][1])[:rows]:
    print(f"  {name[:18]:18} {line:22} {shapes[:46]:46} {count / N:6.1f} a step {total * 1e3 / N:7.2f} ms")
