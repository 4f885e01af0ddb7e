"""Step and compile time of a method's jitted optax update, with and without one JAX fast form
(the GPT's parameter shapes, float32, the default JAX platform): `python tricks.py SIZE TRICK
method[,method...] [PAIRS] [STEPS]`. TRICK: `sums` (engine.skip's stacked sums of small leaves),
`slices` (_backend.remembered_slices: remembered slices and gathered rows), `bits` (_backend's
16-bit joins as uint16 bits). "off" replaces the fast form by its plain form in this process.
Runs at 7be8e1f: `sums` and `bits` were deleted after this run.

Per method: PAIRS alternating compilations on/off of a fresh jax.jit (seconds of lower and of
compile, wall and process CPU), the optimized HLO's fusions, then PAIRS alternating runs of
STEPS steps of each compiled update (process CPU seconds per step, wall per step)."""
import contextlib, re, sys, time

import jax, jax.numpy as jnp, numpy as np, torch, optax
import precond_ref as pr
import precond_ref._backend as backend
import precond_ref.engine.run as run
import precond_ref.engine.skip as skip
from precond_ref.benchmarks.models import SIZES, build_torch, nest

size, trick, methods = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
pairs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 20

ORIGINAL = {"sums": (skip, "_stacked_sums"), "slices": (run, "remembered_slices"), "bits": (backend, "_concatenated")}[trick]
PLAIN = {"sums": lambda xp, arrays: None,
         "slices": lambda xp: contextlib.nullcontext(),
         "bits": lambda xp, arrays: xp.concat(arrays, axis=0)}[trick]
fast = getattr(*ORIGINAL)


def use(on):
    setattr(ORIGINAL[0], ORIGINAL[1], fast if on else PLAIN)


m = build_torch("gpt", SIZES["gpt"][size], torch.float32, "cpu")
named = {n: jnp.asarray(p.detach().numpy()) for n, p in m.named_parameters()}
params = nest(named)
grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
kw = {"rf_rmsprop": {"batch_size": 512}, "rf_adamw": {"batch_size": 512}, "if_shampoo": {"batch_size": 512}}
print(f"jax {jax.__version__} {jax.devices()[0].platform}; gpt {size}: {len(named)} leaves; trick {trick}", flush=True)


def compiled(opt, on):
    use(on)
    state = opt.init(params)
    f = jax.jit(lambda g, s, p: opt.update(g, s, p))
    w0, c0 = time.perf_counter(), time.process_time()
    lowered = f.lower(grads, state, params)
    w1, c1 = time.perf_counter(), time.process_time()
    exe = lowered.compile()
    w2, c2 = time.perf_counter(), time.process_time()
    use(True)
    fusions = len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", exe.as_text(), re.M))
    return exe, state, (w1 - w0, c1 - c0, w2 - w1, c2 - c1, fusions)


def run_steps(exe, state):
    out = exe(grads, state, params)
    jax.block_until_ready(out)  # warm
    state = out[1]
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = exe(grads, state, params)
        state = out[1]
    jax.block_until_ready(out)
    return state, (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps


for method in methods:
    opt = getattr(pr, method)(learning_rate=1e-3, **kw.get(method, {}))
    exes = {}
    for p in range(pairs):
        for on in ((True, False) if p % 2 == 0 else (False, True)):
            exe, state, (lw, lc, cw, cc, fus) = compiled(opt, on)
            exes[on] = (exe, state)
            print(f"{method} {'on ' if on else 'off'} lower {lw:6.2f} s wall {lc:6.2f} s cpu  compile {cw:6.2f} s wall "
                  f"{cc:6.2f} s cpu  fusions {fus}", flush=True)
    # the outputs of both are equal (bitwise, the plain form being the same numbers)
    a = exes[True][0](grads, exes[True][1], params)[0]
    b = exes[False][0](grads, exes[False][1], params)[0]
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    print(f"{method} updates on == off bitwise: {same}", flush=True)
    states = {on: exes[on][1] for on in exes}
    for p in range(pairs):
        for on in ((True, False) if p % 2 == 0 else (False, True)):
            states[on], wall, cpu = run_steps(exes[on][0], states[on])
            print(f"{method} {'on ' if on else 'off'} step {1e3 * wall:8.2f} ms wall {1e3 * cpu:8.2f} ms cpu", flush=True)
