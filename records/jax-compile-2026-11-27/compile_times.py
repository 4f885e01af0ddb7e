"""Compilation time of each method's optax update under ``jax.jit`` on a GPT's parameter shapes (the
bench's ``--model gpt``), on this machine's default JAX backend: ``python compile_times.py SIZE [method,...]``
prints, per method, the seconds of ``lower`` (tracing) and of ``compile`` (XLA) and the lowered module's
size (lines of StableHLO text). The update alone (gradients of the parameters' shapes), the bench's
hyperparameters; optax.adamw first, as the yardstick."""
import sys
import time

import jax
import jax.numpy as jnp
import optax

from precond_ref.benchmarks.common import contenders, jax_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, nest

import torch

size = sys.argv[1] if len(sys.argv) > 1 else "reference"
spec = sys.argv[2] if len(sys.argv) > 2 else "all"
module = build_torch("gpt", SIZES["gpt"][size], torch.float32, "cpu")
params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()})
grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
print(f"jax {jax.__version__} on {jax.devices()[0].platform}; gpt {size}: {len(jax.tree_util.tree_leaves(params))} tensors, "
      f"{sum(x.size for x in jax.tree_util.tree_leaves(params))} parameters", flush=True)


def measure(label, optimizer, extra):
    state = optimizer.init(params)
    step = jax.jit(lambda g, s, p: optimizer.update(g, s, p, **extra))
    t0 = time.perf_counter()
    lowered = step.lower(grads, state, params)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"{label:12s} lower {t1 - t0:6.1f} s  compile {t2 - t1:6.1f} s  hlo {len(lowered.as_text().splitlines()):7d} lines", flush=True)


measure("optax.adamw", optax.adamw(1e-3), {})
for c in contenders(spec, with_variants=False)[0]:
    measure(c.entry.name, jax_optimizer(c), update_extra(c, batch_size_of("gpt", SIZES["gpt"][size])))
