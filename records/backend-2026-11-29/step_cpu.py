"""CPU seconds a step of the core transform, eager torch, on the small GPT's parameters (float32):
`python step_cpu.py method[,method...] [steps]`; prints `method ms-cpu/step` (process CPU, after 5 warm steps)."""
import sys, time, torch
import precond_ref as pr
from precond_ref.benchmarks.models import SIZES, build_torch, nest
torch.manual_seed(0); torch.set_num_threads(1)
m = build_torch("gpt", SIZES["gpt"]["small"], torch.float32, "cpu")
params = nest({n: p.detach().clone() for n, p in m.named_parameters()})
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
kw = {"rf_rmsprop": {"batch_size": 512}, "rf_adamw": {"batch_size": 512}, "if_shampoo": {"batch_size": 512}}
import jax
gs = [jax.tree_util.tree_map(lambda p: torch.randn_like(p) * 1e-2, params) for _ in range(4)]
for method in sys.argv[1].split(","):
    opt = getattr(pr, method)(learning_rate=1e-3, **kw.get(method, {}))
    state = opt.init(params)
    for i in range(5):
        _, state = opt.update(gs[i % 4], state, params)
    c = time.process_time()
    for i in range(steps):
        _, state = opt.update(gs[i % 4], state, params)
    print(method, "%.2f" % ((time.process_time() - c) / steps * 1e3), pr.__file__, flush=True)
