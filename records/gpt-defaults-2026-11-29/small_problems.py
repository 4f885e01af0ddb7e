"""Sketchy with the bias-corrected graft and EMA momentum on the three small problems of the defaults' sweep.

Runs records/defaults/sweep.py's problems (teacher, digits_mlp, digits_cnn; 150 steps, seeds 0, 1, 2)
with the torch class Sketchy at its defaults but ``momentum_ema=True`` and the graft of
gpt_defaults.BiasCorrectedGraft (Adam's bias correction of the RMSProp graft's moment), one rate a
row, and prints the mean share of Adam's progress per problem (the measure of docs/defaults.md)
and the rate's per-seed shares. Run from the repository root::

    python records/gpt-defaults-2026-11-29/small_problems.py --rates 1e-3,3.16e-3,1e-2
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "defaults"))
import gpt_defaults  # noqa: E402
import sweep  # noqa: E402


def shares(problem_name: str, rate: float, variant: bool) -> list[float]:
    """Per seed, the share of Adam's progress of Sketchy at ``rate`` (``variant``: the bias-corrected
    graft and ``momentum_ema=True``; otherwise the class as it is)."""
    if not variant:
        return sweep.shares(problem_name, "Sketchy", lr=rate)
    out = []
    for seed in sweep.SEEDS:
        problem = sweep.Problem(problem_name, seed)
        start, adam = sweep.start_and_adam(problem_name, seed)
        graft = gpt_defaults.BiasCorrectedGraft()
        gpt_defaults.sketchy_module._graft = graft
        try:
            loss = sweep.final_loss(problem, lambda m: graft.attach(
                sweep.optimizer_of("Sketchy", m, problem.batch_size, lr=rate, momentum_ema=True)))
        finally:
            gpt_defaults.sketchy_module._graft = graft.original
        if graft.calls == 0:
            raise RuntimeError("the bias-corrected graft was never called")
        out.append((start - loss) / (start - adam) if loss == loss else -1.0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1e-3,3.16e-3,1e-2")
    parser.add_argument("--as-is", action="store_true", help="the class as it is (no graft correction, momentum_ema False)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    label = "Sketchy as it is" if args.as_is else "Sketchy, bias-corrected graft, momentum_ema=True"
    for rate in map(float, args.rates.split(",")):
        row = {p: shares(p, rate, not args.as_is) for p in sweep.PROBLEMS}
        means = "  ".join(f"{p} {statistics.fmean(v):.2f}" for p, v in row.items())
        seeds = "  ".join(f"{p} " + ",".join(f"{x:.2f}" for x in v) for p, v in row.items())
        print(f"{label} lr {rate:g}: {means}   (per seed: {seeds})", flush=True)


if __name__ == "__main__":
    main()
