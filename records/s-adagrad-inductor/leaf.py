# adapter, chosen leaves, one step compiled (Inductor) vs eager, from the same start
import sys, time, torch, numpy as np
from precond_ref.adapters.torch import SAdaGrad
mode = sys.argv[1]; rank = int(sys.argv[2]); sel = sys.argv[3].split(","); steps = int(sys.argv[4])
extra = eval(sys.argv[5]) if len(sys.argv) > 5 else {}
shapes = {"w1": (5, 6), "b1": (5,), "w2": (3, 5), "b2": (3,)}
rng = np.random.default_rng(0)
init = {n: rng.normal(0, .5, shapes[n]) for n in sel}
gs = [{n: rng.normal(size=shapes[n]) for n in sel} for _ in range(steps)]
def run(compile):
    named = [(n, torch.tensor(v, requires_grad=True)) for n, v in init.items()]
    opt = SAdaGrad(named, compile=compile, lr=1e-1, rank=rank, delta=1e-3, mode=mode)
    out = []
    for g in gs:
        for n, p in named: p.grad = torch.from_numpy(g[n])
        opt.step()
        out.append(({n: p.detach().clone() for n, p in named}, {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for n, p in named}))
    return out
e = run(False); t0 = time.time(); c = run(extra or True)
print(sys.argv[1:], f"{time.time()-t0:.0f}s")
for t, ((pe, se), (pc, sc)) in enumerate(zip(e, c)):
    print(t, {n: f"{(pe[n]-pc[n]).abs().max().item():.1e}" for n in sel})
    for n in sel:
        for k in se[n]:
            d = (se[n][k].double() - sc[n][k].double()).abs().max().item()
            if d > 1e-12: print("   ", n, k, f"{d:.2e}", se[n][k].flatten()[:6].tolist(), sc[n][k].flatten()[:6].tolist())
