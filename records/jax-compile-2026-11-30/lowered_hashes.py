"""The lowered StableHLO of each method's jitted optax update (as compile_step.py makes it) written to
DIR/<method>.mlir, with its sha256: `python lowered_hashes.py SIZE METHODS DIR` (AS_GPU=1 as there).
Two trees that lower every method to the same text compile the same program: the same trajectories."""
import hashlib
import os
import sys
import time

import jax

if os.environ.get("AS_GPU"):
    jax.default_backend = lambda: "gpu"
import jax.numpy as jnp
import optax
import torch

import precond_ref
from precond_ref.benchmarks.common import contenders, jax_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, nest

size = SIZES["gpt"][sys.argv[1]]
model = build_torch("gpt", size, torch.float32, "cpu")
params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()})
os.makedirs(sys.argv[3], exist_ok=True)
print("#", precond_ref.__file__)
for name in sys.argv[2].split(","):
    if name == "adamw":
        opt, extra = optax.adamw(1e-3), {}
    else:
        (c,), _ = contenders(name, False)
        opt, extra = jax_optimizer(c), update_extra(c, batch_size_of("gpt", size))
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
    t0 = time.process_time()
    text = jax.jit(lambda g, s, p: opt.update(g, s, p, **extra)).lower(grads, state, params).as_text()
    t1 = time.process_time()
    open(os.path.join(sys.argv[3], f"{name}.mlir"), "w").write(text)
    print(f"{name:11s} lower {t1 - t0:6.1f} cpu s  sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}", flush=True)
