"""Where XLA's compilation of one method's jitted update goes: `python compile_profile.py SIZE METHOD`
compiles it (lowered as compile_step.py does; AS_GPU=1, DUE as there) under jax.profiler.trace and
prints the profiler's XLA events (passes, code generation) with the most total time."""
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

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
if os.environ.get("DUE"):
    extra["due"] = tuple(bool(int(x)) for x in os.environ["DUE"].split(","))
state = opt.init(params)
grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
lowered = jax.jit(lambda g, s, p: opt.update(g, s, p, **extra)).lower(grads, state, params)
out = tempfile.mkdtemp()
t0 = time.process_time()
with jax.profiler.trace(out, create_perfetto_trace=True):
    lowered.compile()
print(f"compile {time.process_time() - t0:.1f} cpu s (profiled)")
path = glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True)[0]
events = json.load(gzip.open(path))
events = events["traceEvents"] if isinstance(events, dict) else events
total, count = collections.Counter(), collections.Counter()
for e in events:
    if e.get("ph") == "X":
        total[e["name"]] += e.get("dur", 0) / 1e6
        count[e["name"]] += 1
for name, secs in total.most_common(int(os.environ.get("TOP", "45"))):
    print(f"{secs:8.2f} s {count[name]:6d}x  {name[:150]}")
