"""Step time of RF-RMSProp / IF-Shampoo (torch adapter) relative to torch.optim.Adam, in one run.

    python benchmarks/bench_root_free.py [--device cuda] [--dtype bfloat16] [--repeats 20] [--threads 1]

For each layer shape (1024×1024 and 4096×1024) every optimizer gets the same parameter and a fixed
random gradient; after warm-up the median wall time of ``repeats`` steps is reported, with the
ratio to Adam measured in the same run. The authors' ``sirfshampoo`` package (PyPI), when
installed, is timed too (``SIRFShampoo`` needs a model: the parameter is wrapped in one; nothing of
it is shipped here).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from precond_ref.adapters.torch import IFShampoo, RFRMSProp

SHAPES = [(1024, 1024), (4096, 1024)]
BATCH = 128


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Holder(torch.nn.Module):
    def __init__(self, p: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = p


def _time_steps(make: Callable, shape, device: str, dtype, warmup: int, repeats: int) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype).to(device))
    grad = (torch.randn(shape, generator=gen, dtype=dtype) * 1e-2).to(device)
    opt = make(p)
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


def bench_cases(dtype: torch.dtype = torch.float32) -> dict[str, Callable]:
    cases = {
        "torch Adam": lambda p: torch.optim.Adam([p], lr=1e-3),
        "RF-RMSProp principled": lambda p: RFRMSProp([p], lr=1e-2, momentum=0.9, batch_size=BATCH),
        "IF-Shampoo principled (dense)": lambda p: IFShampoo([p], batch_size=BATCH),
        "IF-Shampoo principled (dense, T=10)": lambda p: IFShampoo([p], batch_size=BATCH, precondition_every=10),
        "IF-Shampoo principled (bf16 factors)": lambda p: IFShampoo([p], batch_size=BATCH, factor_dtype=torch.bfloat16),
        "IF-Shampoo principled (diagonal)": lambda p: IFShampoo([p], batch_size=BATCH, structures="diagonal"),
        "IF-Shampoo faithful (dense)": lambda p: IFShampoo([p], batch_size=BATCH, mode="faithful"),
    }
    try:
        from sirfshampoo import SIRFShampoo  # type: ignore

        cases["authors' SIRFShampoo (dense)"] = lambda p: SIRFShampoo(_Holder(p), batch_size=BATCH)
        cases["authors' SIRFShampoo (dense, T=10)"] = lambda p: SIRFShampoo(_Holder(p), batch_size=BATCH, T=10)
        if dtype != torch.bfloat16:
            cases["authors' SIRFShampoo (bf16 factors)"] = lambda p: SIRFShampoo(
                _Holder(p), batch_size=BATCH, preconditioner_dtypes=torch.bfloat16
            )
    except ImportError:
        print("sirfshampoo not installed: the authors' implementation is not timed (pip install sirfshampoo)")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives stable CPU ratios)")
    parser.add_argument("--shapes", default="1024x1024,4096x1024")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    dtype = getattr(torch, args.dtype)
    cases = bench_cases(dtype)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), dtype {args.dtype}, median of {args.repeats} steps after {args.warmup} warm-up")
    for shape in shapes:
        base = _time_steps(cases["torch Adam"], shape, args.device, dtype, args.warmup, args.repeats)
        print(f"\nlayer {shape[0]}x{shape[1]}: torch Adam {base * 1e3:.3f} ms/step")
        for label, make in cases.items():
            if label == "torch Adam":
                continue
            t = _time_steps(make, shape, args.device, dtype, args.warmup, args.repeats)
            print(f"  {label:40s} {t * 1e3:9.3f} ms/step   {t / base:8.1f} x Adam")


if __name__ == "__main__":
    main()
