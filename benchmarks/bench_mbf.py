"""MBF cost against torch Adam on a small CNN (conv 64->64 3x3 + linear 512->512).

The paper's claim: MBF's per-iteration cost is only slightly above first-order methods. This
prints, measured in one run on one device:

* optimizer-step time of ``precond_ref.adapters.torch.MBF`` / ``torch.optim.Adam``, averaged over
  a whole T2 window (so the amortised statistics and inverse work is included), at the paper's CNN
  intervals T1 = 10, T2 = 100; and separately the cost of a plain step, a statistics step and an
  inverse step;
* full-iteration time (forward + backward + step, batch 128) of MBF / Adam;
* optimizer state memory against the weights' size, for MBF and Adam.

Usage: ``python benchmarks/bench_mbf.py [--device cuda] [--repeats 5]``. ``bench_cases()`` gives
the same measurements as a list of dicts for a driver.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import precond_ref.adapters.torch as pt

T1, T2 = 10, 100  # the authors' CNN settings


def make_model(device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d((2, 4)),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 512),
    ).to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for entries in opt.state.values()
        for v in entries.values()
        if isinstance(v, torch.Tensor)
    )


def _optimizers(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "adam": torch.optim.Adam(model.parameters(), lr=1e-3),
        "mbf": pt.MBF(model.named_parameters(), lr=3e-5, damping=3e-3, statistics_every=T1, precondition_every=T2),
    }


def _time_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_cases(device: str = "cpu", repeats: int = 5) -> list[dict]:
    """Median over ``repeats`` of each measurement; ratios are against Adam in the same run."""
    torch.manual_seed(0)
    results = []
    model = make_model(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opts = _optimizers(model)
    for opt in opts.values():  # warm-up: state allocation, first inverse, lazy init
        for _ in range(3):
            opt.step()

    window = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            window[name].append(_time_steps(opt, T2, device))
    adam = statistics.median(window["adam"])
    mbf = statistics.median(window["mbf"])
    results.append(dict(name=f"step, mean over a T2={T2} window", adam_s=adam, mbf_s=mbf, ratio=mbf / adam))

    # Per-kind step costs: pick the counter so the next step is plain / statistics / inverse.
    mbf_opt = opts["mbf"]
    kinds = {"plain step": 2 * T2 + 1, "statistics step (i % T1 == 0)": 2 * T2 + T1, "inverse step (i % T2 == 0)": 3 * T2}
    for label, count in kinds.items():
        times = []
        for _ in range(repeats):
            for entries in mbf_opt.state.values():
                entries["step"] = torch.tensor(count, dtype=torch.int32, device=device)
            times.append(_time_steps(mbf_opt, 1, device))
        t = statistics.median(times)
        results.append(dict(name=f"MBF {label}", adam_s=adam, mbf_s=t, ratio=t / adam))

    # Full iteration: forward + backward + step, batch 128 of 64x16x16 inputs.
    x = torch.randn(128, 64, 16, 16, device=device)
    y = torch.randn(128, 512, device=device)
    iteration = {}
    for name in opts:
        m = make_model(device)
        opt = _optimizers(m)[name]

        def one_step(m=m, opt=opt):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

        for _ in range(3):
            one_step()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            for _ in range(T2 // 4):
                one_step()
            _sync(device)
            times.append((time.perf_counter() - start) / (T2 // 4))
        iteration[name] = statistics.median(times)
    results.append(
        dict(name="iteration (fwd+bwd+step, batch 128)", adam_s=iteration["adam"], mbf_s=iteration["mbf"],
             ratio=iteration["mbf"] / iteration["adam"])
    )
    results.append(
        dict(name="state memory / weights", adam_s=_state_bytes(opts["adam"]) / weight_bytes,
             mbf_s=_state_bytes(opts["mbf"]) / weight_bytes, ratio=_state_bytes(opts["mbf"]) / _state_bytes(opts["adam"]),
             weight_bytes=weight_bytes)
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"MBF vs torch Adam on conv 64->64 3x3 + linear 512->512, float32, T1={T1}, T2={T2}, {device_name}")
    for r in bench_cases(args.device, args.repeats):
        if r["name"].startswith("state memory"):
            print(f"  {r['name']:44s} Adam {r['adam_s']:.2f}x   MBF {r['mbf_s']:.2f}x   "
                  f"(MBF/Adam {r['ratio']:.2f}; weights {r['weight_bytes'] / 2**20:.2f} MiB)")
        else:
            print(f"  {r['name']:44s} Adam {r['adam_s'] * 1e3:8.3f} ms   MBF {r['mbf_s'] * 1e3:8.3f} ms   "
                  f"MBF/Adam {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
