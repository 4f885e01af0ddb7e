"""GPU session 5: host synchronisations in eager steps 12-17 of the bench's reference GPT (torch sync debug mode "warn")."""
import sys, warnings, traceback, torch
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
for method in sys.argv[1:]:
    torch.manual_seed(0)
    size = SIZES["gpt"]["reference"]
    module = build_torch("gpt", size, torch.float32, "cuda")
    named = list(module.named_parameters())
    (c,), _ = contenders(method, False)
    opt, _ = torch_optimizer(c, named, "off")
    extra = update_extra(c, size["batch"] * size["seq"])
    batches = random_batches("gpt", size, "cuda", torch.float32)
    loss_fn = torch_loss("gpt")
    def grads(i):
        for _, p in named: p.grad = None
        loss_fn(module, *batches[i % len(batches)]).backward()
    for i in range(12):
        grads(i); opt.step(**extra)
    torch.cuda.synchronize()
    stacks = []
    def hook(message, category, filename, lineno, file=None, line=None):
        stacks.append("".join(traceback.format_stack(limit=14)[:-2]))
    old = warnings.showwarning; warnings.showwarning = hook
    warnings.simplefilter("always")
    for i in range(12, 18):
        grads(i)
        torch.cuda.set_sync_debug_mode("warn")
        opt.step(**extra)
        torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old
    print(f"{method}: {len(stacks)} host synchronisations in 6 steps")
    seen = set()
    for s in stacks:
        key = s.strip().splitlines()[-2:]
        if str(key) in seen: continue
        seen.add(str(key)); print(s[-1500:]); print("-----")
