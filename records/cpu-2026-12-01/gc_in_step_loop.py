import gc, sys, time, warnings
import torch
import precond_ref.adapters.torch as pt
from precond_ref.adapters import _torch_core
warnings.simplefilter("ignore")
name, mode = sys.argv[1], sys.argv[2]
orig = _torch_core.CoreOptimizer.step
if mode == "off":
    def step(self, *a, **k):
        was = gc.isenabled(); gc.disable()
        try:
            return orig(self, *a, **k)
        finally:
            if was: gc.enable()
    _torch_core.CoreOptimizer.step = step
torch.manual_seed(0)
layers = []
for _ in range(24):
    layers += [torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 1))
kw = {"batch_size": 32} if name in ("IFShampoo", "RFAdamW") else {}
opt = getattr(pt, name)(model.named_parameters(), compile=False, **kw)
ballast = [{"k": i, "v": [i, str(i)]} for i in range(300000)]  # a program's own heap
x, y = torch.randn(32, 64), torch.randn(32, 1)
def run(n):
    for _ in range(n):
        opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
run(3)
t = time.perf_counter(); run(30); dt = (time.perf_counter() - t) / 30 * 1e3
print(name, mode, f"{dt:.1f} ms per training step ({sum(1 for _ in model.parameters())} tensors)")
