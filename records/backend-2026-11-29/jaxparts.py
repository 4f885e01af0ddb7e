"""IF-Shampoo's jitted optax update on the reference GPT's shapes (float32, JAX CPU), compiled with all
of _backend's remembered-slice forms and with one part put back to its plain form: the optimized HLO's
fusions, a hash of its text, lower/compile CPU seconds. `python jaxparts.py VARIANT[,VARIANT...] [method]`."""
import hashlib, re, sys, time
import jax, jax.numpy as jnp, torch
import precond_ref as pr
import precond_ref._backend as backend
import precond_ref.engine.skip as skip
from precond_ref.benchmarks.models import SIZES, build_torch, nest

variants = sys.argv[1].split(",")
method = sys.argv[2] if len(sys.argv) > 2 else "if_shampoo"
m = build_torch("gpt", SIZES["gpt"]["reference"], torch.float32, "cpu")
params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in m.named_parameters()})
grads = jax.tree_util.tree_map(lambda p: p * 1e-2, params)
kw = {"rf_rmsprop": {"batch_size": 512}, "rf_adamw": {"batch_size": 512}, "if_shampoo": {"batch_size": 512}}
orig = {"rows": (backend, "_gathered_rows"), "runs": (backend, "_slice_runs"), "select": (skip, "selected_by_runs")}
plain = {"rows": lambda xp, arrays: None, "runs": lambda arrays: None,
         "select": lambda xp, pred, news, olds: [backend.select(xp, pred, n, o) for n, o in zip(news, olds)]}
saved = {k: getattr(*v) for k, v in orig.items()}
results = {}
for variant in variants:
    for k, (mod, name) in orig.items():
        setattr(mod, name, saved[k])
    for part in variant.split("+"):
        if part != "on":
            setattr(*orig[part], plain[part])
    opt = getattr(pr, method)(learning_rate=1e-3, **kw.get(method, {}))
    state = opt.init(params)
    f = jax.jit(lambda g, s, p: opt.update(g, s, p))
    c0 = time.process_time()
    lowered = f.lower(grads, state, params)
    c1 = time.process_time()
    exe = lowered.compile()
    c2 = time.process_time()
    text = re.sub(r", metadata=\{[^}]*\}", "", exe.as_text())
    fusions = len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", text, re.M))
    out = exe(grads, state, params)
    results[variant] = jax.tree_util.tree_leaves(out)
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(results[variants[0]], results[variant]))
    print(f"{method} {variant:12s} lower {c1 - c0:6.2f} s cpu compile {c2 - c1:6.2f} s cpu fusions {fusions} "
          f"hlo {hashlib.sha1(text.encode()).hexdigest()[:10]} same-as-{variants[0]} {same}", flush=True)
