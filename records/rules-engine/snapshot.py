"""Trajectories of every method x mode x option set on NumPy, torch and JAX, float64 and float32,
to compare the code before and after a refactor: ``python snapshot.py OUT.npz [--methods a,b]`` records them,
``python snapshot.py --compare A.npz B.npz`` reports, per case, whether they are bitwise equal and
the largest relative difference (B may hold a subset of A's methods). The gradients are a fixed function of the parameters and the step
(so a difference anywhere propagates); step 7 is given a NaN (the skip rule); steps pass ``step=``
on even cases and read the counters otherwise (host and device decisions)."""
import itertools
import math
import sys

import numpy as np

CASES = {
    "rf_rmsprop": [dict(batch_size=8), dict(batch_size=8, momentum=0.9, weight_decay=0.1), dict(batch_size=8, mode="faithful", damping=0.0)],
    "rf_adamw": [dict(batch_size=8), dict(batch_size=8, weight_decay=0.1, bias_correction=True), dict(batch_size=8, mode="faithful")],
    "agd": [dict(), dict(weight_decay=0.1, amsgrad=True, clip=1.0), dict(win=True, weight_decay=0.01), dict(mode="faithful", weight_decay=0.1),
            dict(weight_decay=0.1, weight_decay_mode="l2"), dict(weight_decay=0.1, weight_decay_mode="fixed")],
    "dasgo": [dict(), dict(side="auto"), dict(mode="faithful", fallback_mask=lambda p, x: x.ndim != 2)],
    "asgo": [dict(), dict(block_size=4, precondition_every=3), dict(root_method="polar_express", block_size=4),
             dict(accumulator="sum", rms_target=None, b1=0.0), dict(mode="faithful", fallback_mask=lambda p, x: x.ndim != 2),
             dict(mode="faithful", precondition_every=2, fallback_mask=lambda p, x: x.ndim != 2)],
    "sketchy": [dict(), dict(block_size=4, precondition_every=2, rank=2), dict(rank=3, momentum=0.9, weight_decay=0.1),
                dict(mode="faithful", rank=3)],
    "s_adagrad": [dict(), dict(rank=3, block_size=16), dict(mode="faithful", rank=3)],
    "if_shampoo": [dict(batch_size=8), dict(batch_size=8, block_size=4, precondition_every=3, weight_decay=0.1),
                   dict(batch_size=8, grouping="weight_bias", structures="diagonal"), dict(batch_size=8, mode="faithful"),
                   dict(batch_size=8, mode="faithful", grouping="weight_bias", kl_clip=0.1)],
    "mbf": [dict(), dict(block_size=4, precondition_every=4, statistics_every=2), dict(weight_decay=0.1, max_block_dim=5),
            dict(mode="faithful")],
}
SHAPES = {"fc": {"weight": (6, 10), "bias": (6,)}, "conv": {"weight": (4, 3, 2, 2), "bias": (4,)}, "long": (5, 11), "vec": (7,), "tall": (9, 3)}
STEPS = 12


def params_for(dtype):
    rng = np.random.default_rng(0)
    out = {}
    for k, v in SHAPES.items():
        if isinstance(v, dict):
            out[k] = {kk: rng.standard_normal(s).astype(dtype) for kk, s in v.items()}
        else:
            out[k] = rng.standard_normal(v).astype(dtype)
    return out


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from flat(tree[k], prefix + "/" + k)
    else:
        yield prefix, tree


def run(backend, dtype_name, method, options, host_steps):
    import precond_ref as pr
    from precond_ref.tree import tree_map
    np_params = params_for(np.float64 if dtype_name == "float64" else np.float32)
    if backend == "numpy":
        conv = lambda a: np.asarray(a)
        back = lambda a: np.asarray(a, dtype=np.float64)
    elif backend == "torch":
        import torch
        conv = lambda a: torch.from_numpy(np.array(a))
        back = lambda a: a.detach().numpy().astype(np.float64)
    else:
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        conv = lambda a: jnp.asarray(a)
        back = lambda a: np.asarray(a, dtype=np.float64)
    params = tree_map(conv, np_params)
    opt = getattr(pr, method)(learning_rate=1e-2, **options)
    state = opt.init(params)
    out = []
    for t in range(STEPS):
        grads = tree_map(lambda p: p * 0.3 + 0.1 * math.sin(t + 1.0) + p * p * 0.05, params)
        if t == 7:
            def poison(g, first=[True]):
                if first[0]:
                    first[0] = False
                    a = np.array(back(g))
                    a.reshape(-1)[0] = np.nan
                    return conv(a.astype(np.float64 if dtype_name == "float64" else np.float32))
                return g
            grads = tree_map(poison, grads)
        kwargs = {"step": t} if host_steps else {}
        updates, state = opt.update(grads, state, params, **kwargs)
        params = pr.apply_updates(params, updates)
        out.append(np.concatenate([back(v).reshape(-1) for _, v in flat(params)]))
    return np.stack(out)


def record(path, methods=None):
    results = {}
    for method, option_sets in CASES.items():
        if methods and method not in methods:
            continue
        for i, options in enumerate(option_sets):
            for backend, dtype_name in itertools.product(("numpy", "torch", "jax"), ("float64", "float32")):
                key = f"{method}|{i}|{backend}|{dtype_name}"
                try:
                    results[key] = run(backend, dtype_name, method, options, host_steps=i % 2 == 0)
                except Exception as err:  # recorded: a case that fails before must fail after
                    results[key] = np.array([repr(err)[:200]])
                    print("ERROR", key, repr(err)[:200])
    np.savez(path, **results)
    print(f"{len(results)} trajectories -> {path}")


def compare(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    worst, unequal = 0.0, 0
    for key in sorted(set(b.files) if set(b.files) < set(a.files) else set(a.files) | set(b.files)):
        if key not in a.files or key not in b.files:
            print("MISSING", key)
            unequal += 1
            continue
        x, y = a[key], b[key]
        if x.dtype.kind == "U" or y.dtype.kind == "U":
            same = x.dtype == y.dtype and np.array_equal(x, y)
            print(("same error " if same else "ERROR CHANGED ") + key)
            unequal += not same
            continue
        if np.array_equal(x, y, equal_nan=True):
            continue
        scale = np.maximum(np.abs(x), 1e-300)
        rel = float(np.nanmax(np.abs(x - y) / scale))
        worst = max(worst, rel) if key.endswith("float64") else worst
        unequal += 1
        print(f"differs {key}: max relative {rel:.3e}")
    print(f"{len(a.files)} trajectories; {unequal} not bitwise equal; largest float64 relative difference {worst:.3e}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        record(sys.argv[1], sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[2] == "--methods" else None)
