import sys, cProfile, pstats, torch, time
torch.set_num_threads(1)
from precond_ref.benchmarks.common import contenders, torch_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, batch_gradients, build_torch, random_batches
method = sys.argv[1]
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
pr = cProfile.Profile(); pr.enable()
for i in range(10, 30): step(i)
pr.disable()
st = pstats.Stats(pr); print(method, "calls/step", st.total_calls // 20)
st.sort_stats("tottime").print_stats(12) if len(sys.argv) > 2 else None
