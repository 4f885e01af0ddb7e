"""JAX's SVD and eigh routes on this device, alone and inside Sketchy's jitted optax update (the reference
GPT's shapes): `python jax_svd_routes.py [SIZE] [VARIANTS]`. JAX without x64 has no float64, so the
incremental FD path's core SVD (order k + m: 640 and 384 at rank 256 on the reference GPT) is a float32
`svd`, whose default GPU route was the suspect of the tenth run's 1.18 s JAX Sketchy step.
Prints one line per measurement: what, shape, ms (mean of 5 after a warm call), or the error."""
import os, sys, time
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp
from jax import lax

size = sys.argv[1] if len(sys.argv) > 1 else "reference"
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["default", "polar", "jacobi", "qr"]
small = size != "reference"
print(jax.__version__, jax.devices(), flush=True)

def timed(f, *args, reps=5):
    f = jax.jit(f)
    t0 = time.perf_counter(); jax.block_until_ready(f(*args)); first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return first, 1e3 * (time.perf_counter() - t0) / reps

ALG = {"default": None, "qr": lax.linalg.SvdAlgorithm.QR, "jacobi": lax.linalg.SvdAlgorithm.JACOBI,
       "polar": lax.linalg.SvdAlgorithm.POLAR, "dc": lax.linalg.SvdAlgorithm.DIVIDE_AND_CONQUER}
EIG = {"default": None, **{e.name.lower(): e for e in lax.linalg.EighImplementation}}
key = jax.random.PRNGKey(0)
shapes = [(64, 64), (2, 48, 48)] if small else [(640, 640), (3, 640, 640)]
for shape in shapes:
    a = jax.random.normal(key, shape, jnp.float32)
    for name, alg in ALG.items():
        try:
            first, ms = timed(lambda x, alg=alg: lax.linalg.svd(x, full_matrices=False, algorithm=alg), a)
            print(f"svd {name:8s} {shape} {ms:9.2f} ms (first {first:.1f} s)", flush=True)
        except Exception as err:
            print(f"svd {name:8s} {shape} error {type(err).__name__}: {str(err)[:100]}", flush=True)
    g = a @ jnp.swapaxes(a, -1, -2)
    for name, impl in EIG.items():
        try:
            first, ms = timed(lambda x, impl=impl: lax.linalg.eigh(x, implementation=impl), g)
            print(f"eigh {name:7s} {shape} {ms:9.2f} ms (first {first:.1f} s)", flush=True)
        except Exception as err:
            print(f"eigh {name:7s} {shape} error {type(err).__name__}: {str(err)[:100]}", flush=True)

# The incremental FD path's other per-block decomposition: the QR of the residual (d x m), batched as the
# reference GPT's stacks are (22 and 18 blocks of 1024 x 512 refresh on one step).
for shape in ([(2, 96, 48)] if small else [(22, 1024, 512), (22, 640, 640)]):
    a = jax.random.normal(key, shape, jnp.float32)
    for what, fn in (("qr", lambda x: jnp.linalg.qr(x)), ("eigh-gram", lambda x: jnp.linalg.eigh(x @ jnp.swapaxes(x, -1, -2))),
                     ("svd-polar", lambda x: lax.linalg.svd(x, full_matrices=False, algorithm=lax.linalg.SvdAlgorithm.POLAR))):
        try:
            first, ms = timed(fn, a, reps=2)
            print(f"{what:9s} {shape} {ms:9.2f} ms (first {first:.1f} s)", flush=True)
        except Exception as err:
            print(f"{what:9s} {shape} error {type(err).__name__}: {str(err)[:100]}", flush=True)

import torch
import precond_ref as pr
from precond_ref import linalg, sketch
from precond_ref.benchmarks.models import SIZES, build_torch, nest
m = build_torch("gpt", SIZES["gpt"][size], torch.float32, "cpu")
params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in m.named_parameters()})
grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
original = linalg._reduced_svd
for variant in variants:
    decomposition = variant.split(":")[1] if variant.startswith("dec:") else None  # a Sketchy decomposition instead
    alg = None if decomposition else ALG[variant]
    chosen = original if alg is None else (lambda xp, alg=alg: lambda x: lax.linalg.svd(x, full_matrices=False, algorithm=alg))
    linalg._reduced_svd = sketch._reduced_svd = chosen
    opt = pr.sketchy(learning_rate=1e-3, **({"decomposition": decomposition} if decomposition else {}))
    state = opt.init(params)
    f = jax.jit(opt.update)
    times = []
    try:
        for i in range(7):
            t0 = time.perf_counter(); u, state = f(grads, state, params); jax.block_until_ready(u); times.append(time.perf_counter() - t0)
    except Exception as err:
        print(f"sketchy update, core svd {variant:8s}: error {type(err).__name__}: {str(err)[:100]}", flush=True)
        continue
    print(f"sketchy update, core svd {variant:8s}: first {times[0]:.1f} s, steps ms {[round(1e3 * t, 1) for t in times[1:]]}, "
          f"mean of last 6 {1e3 * sum(times[1:]) / 6:.1f} ms", flush=True)
linalg._reduced_svd = sketch._reduced_svd = original
