import sys, time, numpy as np, torch, warnings
import precond_ref as pr
from precond_ref.adapters.torch import SAdaGrad
torch.manual_seed(0)
mode = sys.argv[1] if len(sys.argv) > 1 else "faithful"
rank = int(sys.argv[2]) if len(sys.argv) > 2 else 4
comp = sys.argv[3] if len(sys.argv) > 3 else "inductor"
steps = 3
rng = np.random.default_rng(0)
shapes = {"fc1.weight": (5, 6), "fc1.bias": (5,), "fc2.weight": (3, 5), "fc2.bias": (3,)}
init = {n: rng.normal(0, .5, s) for n, s in shapes.items()}
X = torch.from_numpy(rng.normal(size=(8, 6))); Y = torch.from_numpy(rng.normal(size=(8, 3)))
def grads(params):
    p = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    h = torch.tanh(X @ p["fc1.weight"].T + p["fc1.bias"])
    (0.5 * ((h @ p["fc2.weight"].T + p["fc2.bias"] - Y) ** 2).mean()).backward()
    return {n: t.grad.numpy().copy() for n, t in p.items()}
kw = dict(lr=1e-1, rank=rank, delta=1e-3, mode=mode)
def run(compile):
    named = [(n, torch.tensor(v, requires_grad=True)) for n, v in init.items()]
    opt = SAdaGrad(named, compile=compile, **kw)
    hist = []
    for t in range(steps):
        g = grads({n: p.detach().numpy() for n, p in named})
        for n, p in named: p.grad = torch.from_numpy(g[n])
        opt.step()
        hist.append({n: p.detach().numpy().copy() for n, p in named})
    return hist
def core():
    tr = pr.s_adagrad(learning_rate=1e-1, rank=rank, delta=1e-3, mode=mode)
    params = {n: v.copy() for n, v in init.items()}
    nest = lambda d: {a: {b: d[f"{a}.{b}"] for b in ("weight", "bias")} for a in ("fc1", "fc2")}
    st = tr.init(nest(params)); hist = []
    for t in range(steps):
        u, st = tr.update(nest(grads(params)), st, nest(params))
        params = {n: v + u[n.split(".")[0]][n.split(".")[1]] for n, v in params.items()}
        hist.append({n: v.copy() for n, v in params.items()})
    return hist
def diff(a, b):
    return [max(float(np.max(np.abs(x[n]-y[n]))) for n in x) for x, y in zip(a, b)]
c = core(); e = run(False)
t0 = time.time()
k = run(True if comp == "inductor" else {"backend": comp})
print(mode, rank, comp, "eager-core", diff(e, c), "compiled-eager", diff(k, e), f"{time.time()-t0:.0f}s")
