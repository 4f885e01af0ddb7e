"""The code lines a reader follows from a method's factory to its equations on the default path:
every code line of the core (precond_ref without adapters/, compare/, benchmarks/, testing/) that
runs while the factory is called with its defaults and the transform steps a small model three
times on NumPy (init, three updates: the first step, a refresh and a plain one where the method
refreshes periodically). Counted as distinct (file, line) pairs, docstrings, comments and blank
lines aside (lines that run are code). Usage: ``python reader_lines.py [method ...]``."""
import collections
import inspect
import os
import sys

import numpy as np

import precond_ref as pr

CORE = os.path.dirname(pr.__file__)
OUTSIDE = tuple(os.path.join(CORE, d) + os.sep for d in ("adapters", "compare", "benchmarks", "testing"))

METHODS = ("agd", "asgo", "dasgo", "sketchy", "s_adagrad", "rf_rmsprop", "rf_adamw", "if_shampoo", "mbf")


def factory(method):
    """The method's factory at its defaults, with a batch size where it asks for one."""
    make = getattr(pr, method)
    return make(batch_size=8) if "batch_size" in inspect.signature(make).parameters else make()


def model(rng):
    return {"l1": {"weight": rng.standard_normal((16, 8)), "bias": rng.standard_normal(16)},
            "l2": {"weight": rng.standard_normal((4, 16)), "bias": rng.standard_normal(4)}}


def traced(method):
    lines = set()

    def tracer(frame, event, arg):
        path = frame.f_code.co_filename
        if not path.startswith(CORE) or path.startswith(OUTSIDE):
            return None
        if event == "line" or event == "call":
            lines.add((path, frame.f_lineno))
        return tracer

    rng = np.random.default_rng(0)
    params = model(rng)
    sys.settrace(tracer)
    try:
        transform = factory(method)
        state = transform.init(params)
        for _ in range(3):
            grads = {k: {n: rng.standard_normal(v.shape) for n, v in layer.items()} for k, layer in params.items()}
            updates, state = transform.update(grads, state, params)
    finally:
        sys.settrace(None)
    return lines


def part(path):
    rel = os.path.relpath(path, CORE)
    if rel.startswith("methods"):
        return "rule"
    if rel.startswith("engine"):
        return "engine"
    if rel in ("linalg.py", "sketch.py"):
        return "numerics"
    return "other"


def main(methods):
    print(f"{'method':12s} {'total':>6s} {'rule':>6s} {'engine':>6s} {'numerics':>8s} {'other':>6s}  rule share")
    for method in methods:
        counts = collections.Counter(part(path) for path, _ in traced(method))
        total = sum(counts.values())
        print(f"{method:12s} {total:6d} {counts['rule']:6d} {counts['engine']:6d} {counts['numerics']:8d} "
              f"{counts['other']:6d}  {counts['rule'] / total:.0%}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(METHODS))
