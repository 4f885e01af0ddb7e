"""Step time of ASGO / DASGO (torch adapter) relative to torch.optim.Adam, in one run.

    python benchmarks/bench_asgo.py [--device cuda] [--repeats 20] [--authors-path DIR]

For each layer shape (1024×1024 and 4096×1024) every optimizer gets the same parameter and a fixed
random gradient; after warm-up the median wall time of ``repeats`` steps is reported, with the
ratio to Adam measured in the same run. ``--authors-path`` may point to a checkout of
infinity-stars/ASGO (not installable from a registry; nothing of it is shipped here): its ``asgo``
class is then timed too, if its imports resolve.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from precond_ref.adapters.torch import ASGO, DASGO

SHAPES = [(1024, 1024), (4096, 1024)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(make: Callable, shape, device: str, dtype, warmup: int, repeats: int) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype).to(device))
    grad = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    opt = make([p])
    times = []
    for i in range(warmup + repeats):
        p.grad = grad
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_cases(authors_path: str | None = None) -> dict[str, Callable]:
    cases = {
        "torch Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "ASGO principled (eigh)": lambda ps: ASGO(ps),
        "ASGO principled (polar_express)": lambda ps: ASGO(ps, root_method="polar_express"),
        "ASGO principled (eigh, every 10)": lambda ps: ASGO(ps, precondition_every=10),
        "ASGO faithful (polar_express)": lambda ps: ASGO(ps, mode="faithful"),
        "DASGO principled": lambda ps: DASGO(ps),
    }
    if authors_path:
        sys.path.insert(0, authors_path)
        try:
            from optimizers.asgo import asgo as authors_asgo  # type: ignore

            cases["authors' asgo (infinity-stars/ASGO)"] = lambda ps: authors_asgo(ps)
        except Exception as err:  # their module imports their trainer's packages
            print(f"authors' implementation not importable from {authors_path}: {err}")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--authors-path", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    cases = bench_cases(args.authors_path)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), dtype {args.dtype}, median of {args.repeats} steps after {args.warmup} warm-up")
    for shape in SHAPES:
        base = _time_steps(cases["torch Adam"], shape, args.device, dtype, args.warmup, args.repeats)
        print(f"\nlayer {shape[0]}x{shape[1]}: torch Adam {base * 1e3:.3f} ms/step")
        for label, make in cases.items():
            if label == "torch Adam":
                continue
            t = _time_steps(make, shape, args.device, dtype, args.warmup, args.repeats)
            print(f"  {label:38s} {t * 1e3:9.3f} ms/step   {t / base:8.1f} x Adam")


if __name__ == "__main__":
    main()
