"""``python -m precond_ref bench``: step time and optimizer-state memory of every method.

For each layer case (a weight with its bias: ``1024x1024``, ``4096x1024``, a 64->64 3x3
convolution, ...) and each method of :data:`precond_ref.method_table.METHODS`, one optimizer step
is timed through

- the torch adapter, as a ratio to ``torch.optim.Adam(foreach=True)`` on the same device, and
- the JAX adapter under ``jax.jit``, as a ratio to ``optax.adam`` under ``jax.jit``,
- optionally the core on NumPy / CuPy arrays (``--frameworks numpy,cupy``), as a ratio to torch
  Adam on the same device,

with the baselines measured in the same run. Each measurement is ``--warmup`` untimed steps
followed by ``--repeats`` timed steps (device synchronised around each); the median is reported,
the mean (which includes periodic refresh steps such as MBF's inversions) is in the JSON.
Gradients cycle through a few fixed random tensors so that sketches and factors see new data.
State memory is the bytes of the optimizer state after the steps, also as a ratio to Adam's.

Where the authors' packages are importable (``sirfshampoo``), they are timed side by side at the
same settings; what is not installed is listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from .cli import UserError, positive_int
from .method_table import MethodEntry

__all__ = ["add_arguments", "run", "CASES", "QUICK_CASES", "bench_case"]

# name -> (weight shape, out-first); each case is a layer {"weight": W, "bias": b}.
CASES = {
    "1024x1024": (1024, 1024),
    "4096x1024": (4096, 1024),
    "conv64-64-3x3": (64, 64, 3, 3),
}
QUICK_CASES = {"64x32": (64, 32), "conv8-8-3x3": (8, 8, 3, 3)}
FRAMEWORKS = ("torch", "jax", "numpy", "cupy")
_BATCH_SIZE = 128  # what methods that need B (root-free) are told
_GRADIENTS = 3


def _case_list(text: str) -> dict:
    known = {**CASES, **QUICK_CASES}
    out = {}
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name in known:
            out[name] = known[name]
            continue
        try:
            shape = tuple(int(d) for d in name.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) not in (2, 4) or min(shape) < 1:
            raise UserError(f"unknown layer case {name!r}: use one of {', '.join(known)} or a shape like 512x256 or 32x16x3x3")
        out[name] = shape
    if not out:
        raise UserError("--cases is empty")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .method_table import METHODS

    parser.add_argument("--methods", default="all", help=f"comma-separated subset of: {', '.join(e.name for e in METHODS)}")
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated layer cases (default {','.join(CASES)}; any OUTxIN or OUTxINxKHxKW)"
    )
    parser.add_argument(
        "--frameworks", default=None, help="comma-separated subset of torch,jax,numpy,cupy (default torch,jax and cupy if a GPU is present)"
    )
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed steps (default 7; the median is reported)")
    parser.add_argument("--quick", action="store_true", help="small cases and few repeats (for tests)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter and gradient dtype (default float32)")
    parser.add_argument("--out", default="results", help="output directory for bench.json (default results)")
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="limit BLAS and torch CPU threads (default: the libraries' own; 1 gives steadier numbers on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _extra(entry: MethodEntry) -> dict:
    return {"batch_size": _BATCH_SIZE} if "batch_size" in entry.update_kwargs else {}


# A measurement whose first step is slow gets fewer steps, so that one method on one layer takes
# about this long at most (the number of steps actually timed is in the JSON).
_BUDGET_S = 20.0


def _timed(step: Callable[[int], None], sync: Callable[[], None], warmup: int, repeats: int) -> dict:
    start = time.perf_counter()
    step(0)
    sync()
    first = time.perf_counter() - start
    affordable = int(_BUDGET_S / max(first, 1e-9))
    if affordable < warmup + repeats:
        warmup, repeats = min(warmup, 1), max(1, min(repeats, affordable - 1))
    for i in range(1, warmup):
        step(i)
    sync()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        step(warmup + i)
        sync()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * float(np.median(times)),
        "mean_ms": 1e3 * float(np.mean(times)),
        "first_step_ms": 1e3 * first,
        "repeats": repeats,
        "times_ms": [1e3 * t for t in times],
    }


def _gradients(shape: tuple, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"weight": rng.standard_normal(shape), "bias": rng.standard_normal(shape[:1])} for _ in range(_GRADIENTS)
    ]


def _params(shape: tuple) -> dict:
    rng = np.random.default_rng(1234)
    fan_in = int(np.prod(shape[1:]))
    bound = 1.0 / math.sqrt(fan_in)
    return {"weight": rng.uniform(-bound, bound, shape), "bias": rng.uniform(-bound, bound, shape[:1])}


# ---------------------------------------------------------------------------------------------
# One measurement per framework: returns {"median_ms", "mean_ms", "state_bytes", ...}


def _torch_measure(entry: Optional[MethodEntry], shape: tuple, dtype: str, warmup: int, repeats: int, device: str) -> dict:
    import torch

    from .compare import make_torch_optimizer

    tdtype = getattr(torch, dtype)
    params = {k: torch.tensor(v, dtype=tdtype, device=device) for k, v in _params(shape).items()}
    grads = [{k: torch.tensor(v, dtype=tdtype, device=device) for k, v in g.items()} for g in _gradients(shape, 0)]
    named = [(f"layer.{k}", p) for k, p in params.items()]
    notes: list[str] = []
    if entry is None:
        optimizer = torch.optim.Adam([p for _, p in named], lr=1e-3, foreach=True)
        extra: dict = {}
    else:
        optimizer, notes = make_torch_optimizer(entry, named, entry.bench_kwargs())
        extra = _extra(entry)

    def step(i: int) -> None:
        for k, p in params.items():
            p.grad = grads[i % len(grads)][k]
        optimizer.step(**extra)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    result = _timed(step, sync, warmup, repeats)
    result["state_bytes"] = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    result["notes"] = notes
    return result


def _jax_measure(entry: Optional[MethodEntry], shape: tuple, dtype: str, warmup: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    jdtype = getattr(jnp, dtype)
    params = {"layer": {k: jnp.asarray(v, dtype=jdtype) for k, v in _params(shape).items()}}
    grads = [{"layer": {k: jnp.asarray(v, dtype=jdtype) for k, v in g.items()}} for g in _gradients(shape, 0)]
    notes: list[str] = []
    extra: dict = {}
    if entry is None:
        optimizer = optax.adam(1e-3)
    else:
        import precond_ref
        from precond_ref.adapters import jax as jax_adapters

        kwargs = entry.bench_kwargs()
        extra = _extra(entry)
        factory = getattr(jax_adapters, entry.factory, None)
        if factory is None:
            notes.append(f"precond_ref.adapters.jax has no {entry.factory}; wrapped the core with to_optax")
            optimizer = jax_adapters.to_optax(getattr(precond_ref, entry.factory)(**kwargs))
        else:
            optimizer = factory(**kwargs)

    @jax.jit
    def update(g: Any, state: Any, p: Any) -> tuple[Any, Any]:
        updates, state = optimizer.update(g, state, p, **extra)
        return optax.apply_updates(p, updates), state

    holder = {"params": params, "state": optimizer.init(params)}
    compile_start = time.perf_counter()
    jax.block_until_ready(update(grads[0], holder["state"], holder["params"]))
    compile_s = time.perf_counter() - compile_start

    def step(i: int) -> None:
        holder["params"], holder["state"] = update(grads[i % len(grads)], holder["state"], holder["params"])

    result = _timed(step, lambda: jax.block_until_ready(holder["params"]), warmup, repeats)
    result["state_bytes"] = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(holder["state"]))
    result["first_call_s"] = compile_s
    result["notes"] = notes
    return result


def _core_measure(entry: MethodEntry, shape: tuple, dtype: str, warmup: int, repeats: int, xp: Any, sync: Callable) -> dict:
    import precond_ref
    from precond_ref.tree import tree_flatten

    from .compare import core_baseline

    xdtype = getattr(xp, dtype)
    params = {"layer": {k: xp.asarray(v, dtype=xdtype) for k, v in _params(shape).items()}}
    grads = [{"layer": {k: xp.asarray(v, dtype=xdtype) for k, v in g.items()}} for g in _gradients(shape, 0)]
    if entry.is_baseline:
        transform = core_baseline(entry.name, **entry.bench_kwargs())
    else:
        transform = getattr(precond_ref, entry.factory)(**entry.bench_kwargs())
    extra = _extra(entry)
    holder = {"params": params, "state": transform.init(params)}

    def step(i: int) -> None:
        updates, holder["state"] = transform.update(grads[i % len(grads)], holder["state"], holder["params"], **extra)
        holder["params"] = precond_ref.apply_updates(holder["params"], updates)

    result = _timed(step, sync, warmup, repeats)
    result["state_bytes"] = sum(int(getattr(x, "nbytes", 0)) for x in tree_flatten(holder["state"])[0])
    result["notes"] = []
    return result


def bench_case(
    entries: list[MethodEntry],
    shape: tuple,
    frameworks: list[str],
    *,
    dtype: str = "float32",
    warmup: int = 2,
    repeats: int = 7,
    torch_device: str = "cpu",
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict]:
    """Rows of one layer case: per framework, the baseline first, then every entry with its ratios."""
    rows = []
    for framework in frameworks:
        if framework in ("torch", "numpy", "cupy"):
            baseline_name = "torch.optim.Adam(foreach=True)"
            device = torch_device if framework == "torch" else ("cuda" if framework == "cupy" else "cpu")
            baseline = _torch_measure(None, shape, dtype, warmup, repeats, device)
        else:
            baseline_name = "optax.adam (jit)"
            baseline = _jax_measure(None, shape, dtype, warmup, repeats)
        rows.append({"framework": framework, "method": "baseline", "label": baseline_name, **baseline})
        for entry in entries:
            if progress is not None:
                progress(f"{framework} {entry.label}")
            size = math.prod(shape) + shape[0]
            if entry.bench_max_size is not None and size > entry.bench_max_size:
                rows.append({
                    "framework": framework, "method": entry.name, "label": entry.label,
                    "skipped": f"{size} parameters > the entry's bench_max_size {entry.bench_max_size}",
                })
                continue
            try:
                if framework == "torch":
                    result = _torch_measure(entry, shape, dtype, warmup, repeats, torch_device)
                elif framework == "jax":
                    result = _jax_measure(entry, shape, dtype, warmup, repeats)
                elif framework == "numpy":
                    result = _core_measure(entry, shape, dtype, warmup, repeats, np, lambda: None)
                else:
                    import cupy

                    result = _core_measure(entry, shape, dtype, warmup, repeats, cupy, cupy.cuda.Device().synchronize)
            except Exception as err:  # one failing method must not hide the others' numbers
                rows.append({"framework": framework, "method": entry.name, "label": entry.label, "error": f"{type(err).__name__}: {err}"})
                continue
            result["time_ratio"] = result["median_ms"] / baseline["median_ms"]
            result["mean_time_ratio"] = result["mean_ms"] / baseline["mean_ms"]
            result["state_ratio"] = result["state_bytes"] / baseline["state_bytes"] if baseline["state_bytes"] else None
            rows.append({"framework": framework, "method": entry.name, "label": entry.label, "baseline": baseline_name, **result})
    return rows


# ---------------------------------------------------------------------------------------------
# Authors' packages, side by side where installed


def _authors_rows(shape: tuple, dtype: str, warmup: int, repeats: int, torch_device: str) -> tuple[list[dict], list[str]]:
    """SIRFShampoo (the authors' IF-Shampoo) at the settings of our ``if_shampoo`` entry."""
    rows, skipped = [], []
    try:
        import torch
        from sirfshampoo import SIRFShampoo
    except ImportError:
        skipped.append("sirfshampoo (authors' IF-Shampoo) is not installed: pip install sirfshampoo")
        return rows, skipped
    from .method_table import entry_by_name

    kwargs = entry_by_name("if_shampoo").bench_kwargs()
    tdtype = getattr(torch, dtype)
    layer = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=1)
    layer = layer.to(device=torch_device, dtype=tdtype)
    grads = [{k: torch.tensor(v, dtype=tdtype, device=torch_device) for k, v in g.items()} for g in _gradients(shape, 0)]
    try:
        optimizer = SIRFShampoo(
            layer,
            lr=kwargs["learning_rate"],
            alpha1=kwargs["momentum"],
            beta2=kwargs["preconditioner_lr"],
            alpha2=kwargs["preconditioner_momentum"],
            lam=kwargs["damping"],
            T=kwargs["precondition_every"],
            batch_size=_BATCH_SIZE,
        )
    except TypeError as err:
        skipped.append(f"sirfshampoo: unexpected constructor ({err})")
        return rows, skipped

    def step(i: int) -> None:
        layer.weight.grad = grads[i % len(grads)]["weight"]
        layer.bias.grad = grads[i % len(grads)]["bias"]
        optimizer.step()

    sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)
    result = _timed(step, sync, warmup, repeats)
    result["state_bytes"] = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    rows.append({"framework": "torch", "method": "sirfshampoo", "label": "SIRFShampoo (authors)", **result, "notes": []})
    return rows, skipped


# ---------------------------------------------------------------------------------------------


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(results: dict) -> str:
    lines = [
        "| case | framework | method | ms / step (median) | time / Adam | state | state / Adam |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for case, rows in results.items():
        for row in rows:
            if "error" in row or "skipped" in row:
                what = "error" if "error" in row else "skipped"
                lines.append(f"| {case} | {row['framework']} | {row['label']} | {what} | | | |")
                continue
            mib = row["state_bytes"] / 1024**2
            lines.append(
                f"| {case} | {row['framework']} | {row['label']} | {row['median_ms']:.3f} | "
                f"{_fmt_ratio(row.get('time_ratio', 1.0 if row['method'] == 'baseline' else None))} | {mib:.2f} MiB | "
                f"{_fmt_ratio(row.get('state_ratio', 1.0 if row['method'] == 'baseline' else None))} |"
            )
    return "\n".join(lines)


def _default_frameworks() -> list[str]:
    frameworks = ["torch", "jax"]
    try:
        import cupy

        if cupy.is_available():
            frameworks.append("cupy")
    except ImportError:
        pass
    return frameworks


def _check_frameworks(text: Optional[str]) -> list[str]:
    if text is None:
        frameworks = _default_frameworks()
    else:
        frameworks = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [f for f in frameworks if f not in FRAMEWORKS]
        if unknown or not frameworks:
            raise UserError(f"unknown framework(s) {', '.join(map(repr, unknown)) or '(none given)'}; available: {', '.join(FRAMEWORKS)}")
    for framework in frameworks:
        module = {"torch": "torch", "jax": "optax", "numpy": "numpy", "cupy": "cupy"}[framework]
        try:
            __import__(module)
        except ImportError as err:
            raise UserError(f"--frameworks {framework} needs {module}: {err}") from None
    if "cupy" in frameworks:
        import cupy

        if not cupy.is_available():
            raise UserError("--frameworks cupy needs a CUDA device, and cupy.is_available() is False on this machine")
    if any(f in frameworks for f in ("numpy", "cupy", "torch")):
        try:
            import torch  # noqa: F401  (the baseline of numpy/cupy rows is torch Adam)
        except ImportError as err:
            raise UserError(f"the baseline torch.optim.Adam needs torch: {err}") from None
    return list(dict.fromkeys(frameworks))


def run(args: argparse.Namespace) -> int:
    from .compare import _machine, _prepare_out_dir, _thread_limit, resolve_methods

    entries, skipped = resolve_methods(args.methods)
    entries = [e for e in entries if not e.is_baseline]
    if args.quick:
        cases = _case_list(args.cases) if args.cases else dict(QUICK_CASES)
        warmup, repeats = min(args.warmup, 1), min(args.repeats, 3)
    else:
        cases = _case_list(args.cases) if args.cases else dict(CASES)
        warmup, repeats = args.warmup, args.repeats
    frameworks = _check_frameworks(args.frameworks)
    out_dir = _prepare_out_dir(args.out)
    if not entries:
        raise UserError("no method to benchmark (the baselines are always measured)")
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}", file=sys.stderr)

    import torch

    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases) * len(frameworks) * len(entries), unit="method", file=sys.stderr, leave=False)

    def progress(text: str) -> None:
        if bar is not None:
            bar.set_description(text)
            bar.update(1)

    results: dict = {}
    authors_skipped: list[str] = []
    started = time.perf_counter()
    limit = contextlib.nullcontext() if args.threads is None else _thread_limit(args.threads, "torch")
    try:
        with limit:
            for case, shape in cases.items():
                if bar is not None:
                    bar.set_postfix(case=case)
                rows = bench_case(
                    entries, shape, frameworks, dtype=args.dtype, warmup=warmup, repeats=repeats, torch_device=torch_device, progress=progress
                )
                if "torch" in frameworks and any(e.name == "if_shampoo" for e in entries):
                    authors, authors_skipped = _authors_rows(shape, args.dtype, warmup, repeats, torch_device)
                    baseline = next(r for r in rows if r["framework"] == "torch" and r["method"] == "baseline")
                    for row in authors:
                        row["time_ratio"] = row["median_ms"] / baseline["median_ms"]
                        row["state_ratio"] = row["state_bytes"] / baseline["state_bytes"]
                    rows.extend(authors)
                results[case] = rows
    finally:
        if bar is not None:
            bar.close()
    total = time.perf_counter() - started

    machine = _machine()
    machine["torch_device"] = torch_device
    try:
        import jax

        machine["jax_devices"] = [str(d) for d in jax.devices()]
    except ImportError:  # pragma: no cover
        pass
    print(format_table(results))
    print(
        f"\n{args.dtype}, warm-up {warmup}, {repeats} timed steps (median); ratios are to Adam measured in the same run "
        f"on the same device; {total:.1f} s on {machine['processor']} ({machine.get('usable_cpus', machine['cpu_count'])} CPUs, torch device {torch_device})"
    )
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}")
    for note in authors_skipped:
        print(f"skipped: {note}")
    for case, rows in results.items():
        for row in rows:
            for note in row.get("notes", []):
                print(f"{case} {row['framework']} {row['label']}: note: {note}")
            if "error" in row:
                print(f"{case} {row['framework']} {row['label']}: FAILED: {row['error']}")
            if "skipped" in row:
                print(f"{case} {row['framework']} {row['label']}: skipped: {row['skipped']}")
    report = {
        "command": "bench",
        "settings": {
            "cases": {k: list(v) for k, v in cases.items()}, "frameworks": frameworks, "dtype": args.dtype,
            "warmup": warmup, "repeats": repeats, "threads": args.threads, "batch_size_for_root_free": _BATCH_SIZE,
            "hyperparameters": {e.name: e.bench_kwargs() for e in entries},
        },
        "machine": machine,
        "total_s": total,
        "skipped": skipped + [{"method": "authors", "reason": n} for n in authors_skipped],
        "results": results,
    }
    path = os.path.join(out_dir, "bench.json")
    try:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)
    except OSError as err:
        raise UserError(f"cannot write {path!r}: {err.strerror or err}") from None
    print(f"numbers: {path}")
    return 1 if any("error" in row for rows in results.values() for row in rows) else 0
