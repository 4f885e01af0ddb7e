import time, torch, warnings, sys, precond_ref.adapters.torch as pt
warnings.simplefilter("ignore")
name = sys.argv[1]
for n in (100, 400, 1600):
    m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(n)])
    kw = {"batch_size": 4} if name == "IFShampoo" else {}
    opt = getattr(pt, name)(m.named_parameters(), compile=False, **kw)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step(); opt.step()
    best = 1e9
    for _ in range(3):
        t = time.perf_counter(); opt.step(); best = min(best, time.perf_counter() - t)
    print(name, n * 2, f"{best/(2*n)*1e6:7.1f} us/param  {best*1e3:8.1f} ms/step")
