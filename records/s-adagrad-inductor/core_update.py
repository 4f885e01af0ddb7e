# the core's update (torch tensors) compiled with Inductor vs eager, same inputs each step
import sys, time, torch, numpy as np
import precond_ref as pr
mode = sys.argv[1] if len(sys.argv) > 1 else "faithful"
shapes = dict(a=(5, 6), b=(5,), c=(3, 5), e=(3,))
sel = sys.argv[2].split(",") if len(sys.argv) > 2 else list(shapes)
rng = np.random.default_rng(0)
params = {n: torch.from_numpy(rng.normal(0, .5, shapes[n])) for n in sel}
tr = pr.s_adagrad(learning_rate=1e-1, rank=4, delta=1e-3, mode=mode)
st = tr.init(params)
f = lambda g, s, p: tr.update(g, s, p)
cf = torch.compile(f, fullgraph=True)
for t in range(3):
    g = {n: torch.from_numpy(rng.normal(size=shapes[n])) for n in sel}
    ue, se = f(g, st, params)
    t0 = time.time()
    uc, sc = cf(g, st, params)
    print(t, f"{time.time()-t0:.0f}s", {n: (ue[n]-uc[n]).abs().max().item() for n in sel})
    for key in se.groups:
        for name in se.groups[key]:
            dd = (se.groups[key][name] - sc.groups[key][name]).abs().max().item()
            if dd > 1e-12: print("   state", key, name, dd)
    st = se
