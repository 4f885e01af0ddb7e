import torch, warnings, time, gc, sys, precond_ref.adapters.torch as pt
warnings.simplefilter("ignore")
name = sys.argv[1]
m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(400)])
kw = {"batch_size": 4} if name == "IFShampoo" else {}
opt = getattr(pt, name)(m.named_parameters(), compile=False, **kw)
for p in m.parameters():
    p.grad = torch.randn_like(p) * 1e-2
opt.step(); opt.step()
stats = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}; t0 = [0]
def cb(phase, info):
    if phase == "start": t0[0] = time.perf_counter()
    else: s = stats[info["generation"]]; s[0] += 1; s[1] += time.perf_counter() - t0[0]
gc.callbacks.append(cb)
t = time.perf_counter()
for _ in range(10): opt.step()
print(name, f"{(time.perf_counter()-t)/10*1e3:.1f} ms/step", {g: (n, round(s*1e3/10, 2)) for g, (n, s) in stats.items()}, "objects", len(gc.get_objects()))
