"""The ``trace`` command: ``python -m precond_ref trace METHOD --problem P --steps N [--out FILE]``.

Exports a reference trajectory (initial parameters, data, every step's parameters, gradients and
loss, the exact configuration and the library version) as a ``.npz`` trace file; the format is
documented in ``docs/trace-format.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

__all__ = ["add_arguments", "run", "parse_config"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``trace`` command's arguments."""
    parser.add_argument("method", nargs="?", help="method name (see --list)")
    parser.add_argument("--problem", default="quadratic", help="standard problem (default: quadratic; see --list)")
    parser.add_argument("--steps", type=_positive_int, default=10, help="number of updates, at least 1 (default: 10)")
    parser.add_argument("--out", help="output file (.npz; default: METHOD-PROBLEM.npz in the current directory)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE|JSON",
        help="a factory argument as key=value (value parsed as JSON, else taken as a string), or a JSON "
        "object of them; repeatable",
    )
    parser.add_argument(
        "--dtype", default="float64", choices=("float32", "float64"),
        help="default: float64 (on JAX, the run enables JAX's 64-bit mode for it)",
    )
    parser.add_argument(
        "--backend",
        default="numpy",
        choices=("numpy", "torch", "jax", "cupy", "array_api_strict"),
        help="array backend of the run (default: numpy)",
    )
    parser.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the problem's data and initial parameters")
    parser.add_argument("--list", action="store_true", help="list the methods and problems, then exit")


def _name(text: str) -> str:
    """A method or problem name as the registries spell it: lower case, ``_`` for ``-``."""
    return text.strip().lower().replace("-", "_")


def _positive_int(text: str) -> int:
    from ..cli import positive_int

    return positive_int(text)


def _nonnegative_int(text: str) -> int:
    from ..cli import nonnegative_int

    return nonnegative_int(text)


def _enable_jax_x64() -> None:
    """JAX's 64-bit mode, without which it makes float32 arrays where float64 ones are asked for
    (the ``compare`` command does the same for ``--dtype float64``)."""
    try:
        import jax
    except ImportError:
        return  # the backend's own check names what is missing
    jax.config.update("jax_enable_x64", True)


def parse_config(items: list[str]) -> dict[str, Any]:
    """``["b1=0.5", "mode=faithful", '{"clip": 5}']`` -> ``{"b1": 0.5, "mode": "faithful", "clip": 5}``."""
    from ..cli import UserError

    config: dict[str, Any] = {}
    for item in items:
        text = item.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(f"--config {item!r} is not valid JSON: {err}") from None
            if not isinstance(value, dict):
                raise UserError(f"--config {item!r} must be a JSON object")
            config.update(value)
            continue
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--config {item!r} must be KEY=VALUE or a JSON object")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as mode=faithful
        config[key.strip()] = value
    return config


def run(args: argparse.Namespace) -> int:
    """Run the ``trace`` command; returns the exit status."""
    from ..cli import UserError
    from .problems import available_problems, get_problem
    from .trajectory import available_methods, reference_trajectory, save_trajectory

    if args.list:
        print("methods: " + ", ".join(available_methods()))
        print("problems: " + ", ".join(available_problems()))
        return 0
    if not args.method:
        raise UserError("a METHOD is required; available methods: " + ", ".join(available_methods()))
    # Names in any case, with - for _, as compare, bench and reproduce take them: AGD, RF-RMSProp, least-squares.
    method, problem_name = _name(args.method), _name(args.problem)
    if method not in available_methods():
        raise UserError(f"unknown method {args.method!r}; available methods: {', '.join(available_methods())}")
    if problem_name not in available_problems():
        raise UserError(f"unknown problem {args.problem!r}; available problems: {', '.join(available_problems())}")
    out = args.out or f"{method}-{problem_name}.npz"
    try:
        import numpy  # noqa: F401  (the .npz trace file)
    except ImportError:
        from ..cli import install_hint

        raise UserError(f"trace writes .npz files with NumPy: {install_hint('trace')}") from None
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        # The first existing path above the file says why: a file in its place, or nothing there.
        above = out_dir
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if os.path.isdir(above):
            raise UserError(f"cannot write {out}: directory {out_dir} does not exist")
        raise UserError(f"cannot write {out}: {above} is a file, not a directory")
    config = parse_config(args.config)
    if args.backend == "jax" and args.dtype == "float64":
        _enable_jax_x64()
    try:
        problem = get_problem(problem_name, seed=args.seed)
        trajectory = reference_trajectory(
            method, problem, args.steps, config, xp=args.backend, dtype=args.dtype
        )
    except (ValueError, TypeError, ImportError) as err:
        raise UserError(str(err)) from None
    try:
        save_trajectory(trajectory, out, problem)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err}") from None
    print(
        f"wrote {out}: {method} on {problem.name}, {args.steps} steps, {args.dtype} ({args.backend}); "
        f"loss {trajectory.losses[0]:.6g} -> {trajectory.losses[-1]:.6g}"
    )
    return 0
