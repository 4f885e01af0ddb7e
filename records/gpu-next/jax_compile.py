"""Compile time of each method's optax update alone under jax.jit, on the GPT's parameter shapes
(float32; the default JAX platform, CPU here): `python jax_compile.py SIZE method[,method...]` prints method, lower s, compile s,
and the number of fusions / ops in the optimized HLO."""
import os, sys, time, re

import jax, jax.numpy as jnp, numpy as np, torch, optax
import precond_ref as pr
from precond_ref.benchmarks.models import SIZES, build_torch, nest

size = SIZES["gpt"][sys.argv[1]]
m = build_torch("gpt", size, torch.float32, "cpu")
named = {n: jnp.asarray(p.detach().numpy()) for n, p in m.named_parameters()}
params = nest(named)
kw = {"rf_rmsprop": {"batch_size": 512}, "rf_adamw": {"batch_size": 512}, "if_shampoo": {"batch_size": 512}}
for method in sys.argv[2].split(","):
    if method == "adamw":
        opt = optax.adamw(1e-3)
    else:
        opt = getattr(pr, method)(learning_rate=1e-3, **kw.get(method, {}))
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
    f = jax.jit(opt.update)
    t0 = time.perf_counter(); lowered = f.lower(grads, state, params); t1 = time.perf_counter()
    compiled = lowered.compile(); t2 = time.perf_counter()
    hlo = compiled.as_text()
    fusions = len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", hlo, re.M))
    ops = len(re.findall(r"^\s*(?:ROOT )?\S+ = ", hlo, re.M))
    print(f"{method} leaves {len(named)} lower {t1-t0:.1f} s compile {t2-t1:.1f} s fusions {fusions} hlo_lines {ops}", flush=True)
    if os.environ.get("HIST"):
        import collections
        pre = lowered.as_text()  # StableHLO before optimisation
        kinds = collections.Counter(re.findall(r"= (?:\"?)(stablehlo\.[a-z_]+|func\.call|call)", pre))
        print("  pre-opt:", sum(kinds.values()), kinds.most_common(25))
