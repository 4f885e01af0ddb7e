import sys, time, torch
torch.set_num_threads(1)
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, batch_gradients, build_torch, random_batches
method = sys.argv[1]; steps = int(sys.argv[2])
shape = SIZES["gpt"]["small"]
module = build_torch("gpt", shape, torch.float32, "cpu")
named = list(module.named_parameters())
(contender,), _ = contenders(method, False)
opt, _ = torch_optimizer(contender, named, "off")
extra = update_extra(contender, shape["batch"] * shape["seq"])
grads = batch_gradients("gpt", module, named, random_batches("gpt", shape, "cpu", torch.float32), 2)
def step(i):
    for (_, p), g in zip(named, grads[i % 2]): p.grad = g
    opt.step(**extra)
for i in range(10): step(i)
t = time.process_time()
for i in range(10, 10 + steps): step(i)
print(f"{method} {(time.process_time() - t) / steps * 1e3:.2f}")
