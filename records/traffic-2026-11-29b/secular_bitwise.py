"""rank_one_update_eigh of the working tree against c68fecf's (/work/wt/base), bitwise, on random and degenerate cases."""
import sys, numpy as np, torch
from precond_ref import linalg as new
# the base module imports precond_ref's helpers relatively: load it as precond_ref.linalg_base
src = open("/work/wt/base/precond_ref/linalg.py").read()
mod = type(sys)("precond_ref.linalg_base"); mod.__package__ = "precond_ref"; mod.__file__ = "base"
exec(compile(src, "base_linalg", "exec"), mod.__dict__)
rng = np.random.default_rng(0)
cases = 0
for trial in range(400):
    n = int(rng.integers(1, 40)); batch = (int(rng.integers(1, 5)),)
    d = rng.standard_normal(batch + (n,)) ** 2 * 10 ** rng.uniform(-3, 3)
    z = rng.standard_normal(batch + (n,)) * 10 ** rng.uniform(-3, 3)
    kind = trial % 5
    if kind == 1: d[..., : n // 2] = 0.0  # a group of zero poles
    if kind == 2: z[..., ::3] = 0.0      # deflated pairs
    if kind == 3: d[..., 1::2] = d[..., ::2][..., : d[..., 1::2].shape[-1]]  # equal poles
    if kind == 4: z[...] = 0.0
    for dtype in (np.float64, np.float32):
        for make in (lambda a: a.astype(dtype), lambda a: torch.from_numpy(a.astype(dtype))):
            a, b = make(d), make(z)
            v1, w1 = new.rank_one_update_eigh(a, b)
            v0, w0 = mod.rank_one_update_eigh(a, b)
            v1, w1, v0, w0 = (np.asarray(x) for x in (v1, w1, v0, w0))
            assert v1.tobytes() == v0.tobytes() and w1.tobytes() == w0.tobytes(), (trial, kind, n, dtype)
            cases += 1
print(cases, "cases bitwise equal")
