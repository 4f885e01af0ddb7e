import sys, time, torch, numpy as np
from precond_ref import sketch as sk
torch.manual_seed(0)
d, k = int(sys.argv[1]) if len(sys.argv) > 1 else 30, 4
opts = dict(exponent=-0.5, decay=1.0, tail_decay=1.0, eps=0.0, relative_eps=True, delta=1e-3, cutoff=False, decomposition="svd")
xp = torch
import array_api_compat.torch as xpc
xp = xpc
st = sk.fd_init(xp, d, k, dtype=torch.float64, device="cpu", batch=(1,))
xs = [torch.randn(1, d, 1, dtype=torch.float64) for _ in range(4)]
def f(st, x):
    new, ok, out = sk.fd_update_apply(xp, st, x, **opts)
    return new, ok, out
cf = torch.compile(f, fullgraph=True)
se, sc = st, st
for t, x in enumerate(xs):
    ne, oke, oute = f(se, x)
    t0 = time.time()
    nc, okc, outc = cf(se, x)  # same input state
    print(t, f"{time.time()-t0:.0f}s", "out diff", (oute - outc).abs().max().item(),
          {kk: (ne[kk] - nc[kk]).abs().max().item() for kk in ne})
    se = ne
