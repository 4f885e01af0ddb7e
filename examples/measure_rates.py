"""How the examples' per-optimizer default learning rates were chosen: a short measurement.

For every optimizer of an example, train the example's default model (seed 0) for ``--steps``
steps at each rate of a half-decade grid (``--rates``) and print, per optimizer, the mean training
loss of the last fifth of the steps at each rate, marking the lowest with ``*``. A rate whose
loss stops being finite counts as failed. Run from the repository root::

    python examples/measure_rates.py --example torch --steps 100
    python examples/measure_rates.py --example jax --steps 100

When the lowest loss sits at an end of the grid, measure further rates past that end
(``--optimizers NAME --rates ...``) until it is inside, or the next rate fails: a rate at the edge
cannot be told from a better one further out. Each optimizer's line starts with the keyword
defaults it ran with, since the methods' principled defaults may change. The chosen rates are
written into the example's ``OPTIMIZERS`` table by hand (the script only measures). It runs in one
process with one torch thread, the progress and plots switched off.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import math
import pathlib
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
RATES = (1e-3, 3e-3, 1e-2, 3e-2)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defaults(factory) -> str:
    """The keyword defaults an example's optimizer runs with (the example passes only the rate and
    the parameters), so that a measurement says which principled defaults it saw."""
    if factory is None:
        return "torch.optim.AdamW defaults"
    parameters = inspect.signature(factory).parameters.values()
    skip = {"self", "params", "lr", "learning_rate", "model", "compile", "capturable"}
    return ", ".join(f"{p.name}={p.default!r}" for p in parameters if p.default is not p.empty and p.name not in skip)


def measure(example: str, optimizers: list[str], rates: list[float], steps: int) -> dict:
    """``{optimizer: {rate: tail loss or inf}}``."""
    module = _load(f"char_lm_{example}")
    if example == "torch":
        import torch

        torch.set_num_threads(1)
    results: dict = {}
    with tempfile.TemporaryDirectory() as out:
        for name in optimizers:
            print(f"{name:>11}  defaults: {defaults(module.OPTIMIZERS[name][0])}", flush=True)
            results[name] = {}
            for rate in rates:
                argv = ["--optimizer", name, "--lr", str(rate), "--steps", str(steps), "--sample", "0", "--out", out]
                with contextlib.redirect_stdout(io.StringIO()):
                    losses = module.main(argv)["losses"]
                tail = losses[-max(1, steps // 5):]
                ok = len(losses) == steps and all(math.isfinite(v) for v in tail)
                results[name][rate] = sum(tail) / len(tail) if ok else math.inf
            best = min(results[name], key=results[name].get)
            print(f"{name:>11}  " + "  ".join(f"{'*' if r == best else ' '}{r:g}:{v:.3f}" for r, v in results[name].items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", choices=("torch", "jax"), default="torch")
    parser.add_argument("--optimizers", default="all", help="comma-separated (default: every optimizer of the example)")
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    names = list(_load(f"char_lm_{args.example}").OPTIMIZERS) if args.optimizers == "all" else args.optimizers.split(",")
    measure(args.example, names, [float(r) for r in args.rates.split(",")], args.steps)


if __name__ == "__main__":
    main()
