import torch, warnings, time, gc, sys, precond_ref.adapters.torch as pt
warnings.simplefilter("ignore")
name = sys.argv[1]
m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(400)])
kw = {"batch_size": 4} if name == "IFShampoo" else {}
opt = getattr(pt, name)(m.named_parameters(), compile=False, **kw)
for p in m.parameters():
    p.grad = torch.randn_like(p) * 1e-2
opt.step(); opt.step()
for dis in (False, True, False, True):
    gc.collect()
    if dis: gc.disable()
    t = time.perf_counter()
    for _ in range(10): opt.step()
    dt = (time.perf_counter() - t) / 10 * 1e3
    gc.enable()
    print(name, "gc off" if dis else "gc on ", f"{dt:.1f} ms/step", gc.get_count())
