"""Trace and compile time of each method's jitted optax update at the bench's settings, alone, on
the GPT's parameter shapes (x64 off: float32, JAX's default; the default JAX platform, CPU here).

    JAX_PLATFORMS=cpu python compile_step.py [SIZE] [method,...]      # default: reference, adamw + all nine
    AS_GPU=1 JAX_PLATFORMS=cpu python compile_step.py ...               # the program a GPU would trace, compiled for the CPU
    DUE=0,0,0 JAX_PLATFORMS=cpu python compile_step.py SIZE METHOD     # experiment: update(..., due=(False,)*3)
    JAX_PLATFORMS=cpu python compile_step.py SIZE METHODS --dump DIR  # also: the jitted update's outputs of STEPS
                                                                      # steps per method, to DIR/<method>.npz
    python compile_step.py --compare DIR_A DIR_B                      # bitwise comparison of two dumps

Per method: the optimizer as the bench builds it (`benchmarks.common.jax_optimizer` and
`update_extra`, B = the reference GPT's tokens), `jax.jit(update).lower(...)` (trace, in s wall and
process CPU), `.compile()` (XLA), the lowered module's StableHLO op count (`ops_pre`), and the
optimized HLO's instruction and fusion counts.  Program sizes are exact and backend independent
up to XLA's backend passes; the seconds move with the machine's load.
"""
import os
import re
import sys
import time

import numpy as np


def _ops(text: str) -> int:
    return len(re.findall(r"^\s*(?:ROOT )?%?\S+ = ", text, re.M))


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--compare":
        return compare(args[1], args[2])
    dump = None
    if "--dump" in args:
        i = args.index("--dump")
        dump = args[i + 1]
        del args[i : i + 2]
    size_name = args[0] if args else "reference"
    names = (args[1] if len(args) > 1 else "adamw,agd,asgo,dasgo,sketchy,s_adagrad,rf_rmsprop,rf_adamw,if_shampoo,mbf").split(",")

    import jax
    import jax.numpy as jnp
    import optax
    import torch

    cpu_backend = jax.default_backend
    if os.environ.get("AS_GPU"):
        # The library's device-dependent choices (a traced array has no device: JAX's default backend
        # decides) made as on a GPU, so that the traced program is the one a GPU would compile
        # (Polar-Express roots, accelerator stack bounds and padding, bf16 products where chosen);
        # XLA still compiles it for the CPU. JAX's own lowering does not read this attribute.
        jax.default_backend = lambda: "gpu"

    from precond_ref.benchmarks.common import contenders, jax_optimizer, update_extra
    from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, nest

    size = SIZES["gpt"][size_name]
    model = build_torch("gpt", size, torch.float32, "cpu")
    named = {n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()}
    params = nest(named)
    batch = batch_size_of("gpt", size)
    print(f"# jax {jax.__version__} {cpu_backend()} as_gpu={bool(os.environ.get('AS_GPU'))} x64={jax.config.jax_enable_x64} gpt {size_name} "
          f"leaves {len(named)} B={batch} load {os.getloadavg()[0]:.2f}", flush=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for name in names:
        if name == "adamw":
            opt, extra = optax.adamw(1e-3), {}
        else:
            (c,), _ = contenders(name, False)
            opt, extra = jax_optimizer(c), update_extra(c, batch)
            if os.environ.get("DUE"):  # host decisions instead of the state's counters (an experiment: no lax.cond)
                extra["due"] = tuple(bool(int(x)) for x in os.environ["DUE"].split(","))
        state = opt.init(params)
        grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
        f = jax.jit(lambda g, s, p: opt.update(g, s, p, **extra))
        c0, t0 = time.process_time(), time.perf_counter()
        lowered = f.lower(grads, state, params)
        c1, t1 = time.process_time(), time.perf_counter()
        compiled = lowered.compile()
        c2, t2 = time.process_time(), time.perf_counter()
        pre = lowered.as_text()
        post = compiled.as_text()
        fusions = len(re.findall(r"^\s*(?:ROOT )?%?\S+ = \S+ fusion\(", post, re.M))
        print(f"{name:11s} lower {t1-t0:6.1f} s ({c1-c0:6.1f} cpu)  compile {t2-t1:6.1f} s ({c2-c1:6.1f} cpu)  "
              f"ops_pre {_ops(pre):6d} lines_pre {pre.count(chr(10)):6d}  hlo_post {_ops(post):6d} fusions {fusions:5d}  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        if os.environ.get("HIST"):
            import collections
            kinds = collections.Counter(re.findall(r"= (?:\"?)(stablehlo\.[a-z_]+|func\.call|call|chlo\.[a-z_]+)", pre))
            targets = collections.Counter(re.findall(r"call_target_name = \"([^\"]+)\"", pre))
            print("  pre-opt kinds:", kinds.most_common(30))
            print("  custom calls:", targets.most_common())
            print("  funcs:", pre.count("func.func"), " cases:", pre.count("stablehlo.case"), " ifs:", pre.count("stablehlo.if"),
                  " whiles:", pre.count("stablehlo.while"))
        if dump:
            os.makedirs(dump, exist_ok=True)
            out = {}
            p = params
            for step in range(int(os.environ.get("STEPS", "4"))):
                k = jax.random.fold_in(keys[0], step)
                gl = [jax.random.normal(jax.random.fold_in(k, i), x.shape, x.dtype) * 1e-2 for i, x in enumerate(leaves)]
                g = jax.tree_util.tree_unflatten(treedef, gl)
                updates, state = compiled(g, state, p)
                p = optax.apply_updates(p, updates)
                for i, u in enumerate(jax.tree_util.tree_leaves(updates)):
                    out[f"s{step}_u{i}"] = np.asarray(u)
            for i, s in enumerate(jax.tree_util.tree_leaves(state)):
                out[f"state{i}"] = np.asarray(s)
            np.savez(os.path.join(dump, f"{name}.npz"), **out)


def compare(a: str, b: str) -> None:
    for fn in sorted(os.listdir(a)):
        x, y = np.load(os.path.join(a, fn)), np.load(os.path.join(b, fn))
        differ = [k for k in x.files if x[k].shape != y[k].shape or x[k].tobytes() != y[k].tobytes()]
        same = set(x.files) == set(y.files)
        print(f"{fn}: {len(x.files)} arrays, {'same names' if same else 'NAMES DIFFER'}, {len(differ)} not bitwise equal {differ[:5]}")


if __name__ == "__main__":
    main()
