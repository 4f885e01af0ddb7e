"""cProfile of one method's lowering (trace + MLIR) as compile_step.py makes it:
`python profile_lower.py SIZE METHOD [N]` prints the N (30) functions of most cumulative time."""
import cProfile
import os
import pstats
import sys

import jax

if os.environ.get("AS_GPU"):
    jax.default_backend = lambda: "gpu"
import jax.numpy as jnp
import torch

from precond_ref.benchmarks.common import contenders, jax_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, nest

size = SIZES["gpt"][sys.argv[1]]
model = build_torch("gpt", size, torch.float32, "cpu")
params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()})
(c,), _ = contenders(sys.argv[2], False)
opt, extra = jax_optimizer(c), update_extra(c, batch_size_of("gpt", size))
state = opt.init(params)
grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
f = jax.jit(lambda g, s, p: opt.update(g, s, p, **extra))
prof = cProfile.Profile()
prof.enable()
f.lower(grads, state, params)
prof.disable()
n = int(sys.argv[3]) if len(sys.argv) > 3 else 30
pstats.Stats(prof).sort_stats("cumulative").print_stats(n)
pstats.Stats(prof).sort_stats("tottime").print_stats(n)
