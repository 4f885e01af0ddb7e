"""One-thread CPU ms a torch eager step of the bench's small GPT (the optimizer step alone, on two fixed
gradients, `precond_ref.benchmarks.common.stepping`). Usage: ``python steptime.py METHOD STEPS``."""
import sys, time, torch
torch.set_num_threads(1)
from precond_ref.benchmarks.common import stepping
from precond_ref.benchmarks.models import SIZES, batch_gradients, build_torch, random_batches
method = sys.argv[1]; steps = int(sys.argv[2])
shape = SIZES["gpt"]["small"]
module = build_torch("gpt", shape, torch.float32, "cpu")
named = list(module.named_parameters())
grads = batch_gradients("gpt", module, named, random_batches("gpt", shape, "cpu", torch.float32), 2)
step = stepping(method, named, grads, shape["batch"] * shape["seq"], "off")
for i in range(10): step(i)
t = time.process_time()
for i in range(10, 10 + steps): step(i)
print(f"{method} {(time.process_time() - t) / steps * 1e3:.2f}")
