"""Non-view operations one eager torch step issues, per method, on the small GPT's parameter shapes
(the bench's ``--model gpt``), on this CPU and with a GPU's grouping (the CPU's rule that keeps large
leaves out of joins switched off, and no device value read on the host, as for a CUDA tensor).
Usage: ``python ops.py [cpu|gpu] [method,...]``; prints ``method count`` lines."""
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import precond_ref  # noqa: F401
import precond_ref.adapters.torch  # noqa: F401
from precond_ref import _backend, blocking
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss

grouping = sys.argv[1] if len(sys.argv) > 1 else "cpu"
if grouping == "gpu":
    blocking.CPU_BATCHED_ENOUGH = 2**62
    fakes = {_backend.host_bool: lambda xp, x: None, _backend.host_all_finite: lambda xp, arrays: None}
    for name, module in list(sys.modules.items()):
        if name.startswith(("precond_ref", "adapters")):
            for attr, value in list(vars(module).items()):
                if callable(value) and value in fakes:
                    setattr(module, attr, fakes[value])
METHODS = ["agd", "rf_rmsprop", "rf_adamw", "dasgo", "asgo", "if_shampoo", "mbf", "sketchy", "s_adagrad"]
methods = sys.argv[2].split(",") if len(sys.argv) > 2 else METHODS
VIEWS = {"view", "_unsafe_view", "as_strided", "transpose", "t", "expand", "permute", "unsqueeze", "squeeze", "select",
         "slice", "alias", "detach", "unbind", "split", "split_with_sizes", "reshape", "diagonal", "narrow", "lift_fresh"}
torch.set_num_threads(1)
size = SIZES["gpt"]["small"]
for method in methods:
    torch.manual_seed(0)
    module = build_torch("gpt", size, torch.float32, "cpu")
    named = list(module.named_parameters())
    (c,), _ = contenders(method, False)
    opt, _ = torch_optimizer(c, named, "off")
    extra = update_extra(c, size["batch"] * size["seq"])
    batches = random_batches("gpt", size, "cpu", torch.float32)
    grads = []
    for i in range(2):
        for _, p in named:
            p.grad = None
        torch_loss("gpt")(module, *batches[i % len(batches)]).backward()
        grads.append([p.grad.clone() for _, p in named])

    def step(i):
        for (_, p), g in zip(named, grads[i % 2]):
            p.grad = g
        opt.step(**extra)

    for i in range(12):
        step(i)
    counts = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    rounds = 6  # a whole refresh cycle of the default intervals, averaged
    for i in range(rounds):
        with Count():
            step(12 + i)
    total = sum(v for k, v in counts.items() if k not in VIEWS) / rounds
    print(f"{method} {total:.1f}", flush=True)
    if "-v" in sys.argv:
        print(sorted((k, v / rounds) for k, v in counts.items() if k not in VIEWS))
