"""The jitted optax update the scripts of this folder lower, profile or compile, built as compile_step.py
builds it: `case(size_name, method)` -> (the update under jax.jit, its arguments). AS_GPU=1 makes the
library's device-dependent choices as on a GPU (jax.default_backend reads "gpu"); DUE=1,0,0 gives the
update the refresh decisions on the host (no lax.cond), where a script takes it (`due=True`)."""
import os

import jax

if os.environ.get("AS_GPU"):
    jax.default_backend = lambda: "gpu"
import jax.numpy as jnp
import torch

from precond_ref.benchmarks.common import contenders, jax_optimizer, update_extra
from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, nest


def case(size_name: str, method: str, due: bool = True):
    size = SIZES["gpt"][size_name]
    model = build_torch("gpt", size, torch.float32, "cpu")
    params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()})
    (c,), _ = contenders(method, False)
    opt, extra = jax_optimizer(c), update_extra(c, batch_size_of("gpt", size))
    if due and os.environ.get("DUE"):
        extra["due"] = tuple(bool(int(x)) for x in os.environ["DUE"].split(","))
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
    return jax.jit(lambda g, s, p: opt.update(g, s, p, **extra)), (grads, state, params)
