"""How far Sketchy's ``decomposition="subspace"`` is from the exact Frequent Directions step on the
reference GPT (6 layers, width 512, vocabulary 8192), torch eager, float32, one thread.

The bench's Sketchy settings (``contenders("sketchy")``: rank 256, block 1024, the FD step every
3 steps spread over the blocks), once with the default ``decomposition`` (``"auto"``: the exact
incremental and Gram paths on this model's blocks) and once with ``"subspace"`` forced; only the
learning rate differs from the bench's (``--lr``, see README.txt). Data: word tokens of the
README and docs (``examples/gpt_word_study.py``'s corpus), random windows of ``--batch`` x
``--seq`` tokens, the same stream for both optimizers of a seed.

1. Same gradients, two sketches (the first seed): the exact optimizer trains the model; the
   gradient of every step is also handed to a subspace optimizer that owns its own parameters and
   never feeds them back (its statistics depend only on the gradients, and with weight decay 0 its
   update reads no parameter). Both optimizers hold displacements from the initial weights, zeros
   at the start, and the model's weights are the initial ones plus the exact optimizer's
   displacement, so an update is read as a difference of small numbers (little rounding). Every
   ``--every`` steps, for every sketch block: the distance of the bases (projectors onto the
   retained directions, ``||P_e - P_s||_F / sqrt(r_e + r_s)``, and the sine of the largest
   principal angle between the top-32 directions), the relative error of the top singular value
   and the largest over the top 32, the relative difference of the sketched statistics
   ``U diag(sigma^2) U^T`` (Frobenius) and of the escaped mass; per parameter the relative
   difference of the applied updates ``||u_s - u_e|| / ||u_e||`` (momentum included), and overall.
2. Training: per seed, a model trained by each optimizer on the same batches; the training loss
   of every step and a validation loss at the end.

Run from the repository root::

    python records/sketchy-subspace-2026-11-29/distance.py --steps 45 --seeds 0,1,2 \\
        --out records/sketchy-subspace-2026-11-29/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from _common import batches  # noqa: E402
from gpt_word_study import word_corpus  # noqa: E402

from precond_ref.benchmarks.common import contenders, torch_optimizer  # noqa: E402
from precond_ref.benchmarks.models import SIZES, build_torch, torch_loss  # noqa: E402

TOP = 32  # the leading directions whose principal angles and singular values are compared


def optimizer(params: list, lr: float, decomposition: str):
    """The bench's Sketchy on ``params`` ((name, parameter) pairs) at learning rate ``lr``."""
    (contender,), _ = contenders("sketchy", False)
    settings = {**contender.entry.bench_hyperparameters, "learning_rate": lr}
    if decomposition != "auto":
        settings["decomposition"] = decomposition
    contender = dataclasses.replace(contender, entry=dataclasses.replace(contender.entry, bench_hyperparameters=settings))
    return torch_optimizer(contender, params, "off")[0]


def displacements(named: list) -> list:
    return [(name, torch.nn.Parameter(torch.zeros_like(p))) for name, p in named]


def sketch_blocks(state: dict) -> dict:
    """``{(axis, run, block): (basis, sigma, escaped mass)}`` in float64, the stacks split."""
    out = {}
    for key in state:
        if not (key.startswith("sketches/") and key.endswith("/basis")):
            continue
        prefix = key[: -len("basis")]
        basis = state[key].double()
        sigma = state[prefix + "singular_values"].double()
        rho = state[prefix + "escaped_root"].double() ** 2
        if basis.ndim == 2:
            basis, sigma, rho = basis[None], sigma[None], rho[None]
        axis, run = key.split("/")[1:3]
        for b in range(basis.shape[0]):
            out[(int(axis), int(run), b)] = (basis[b], sigma[b], float(rho.reshape(-1)[b]))
    return out


def compare_block(exact: tuple, approx: tuple) -> dict:
    (ue, se, rho_e), (us, ss, rho_s) = exact, approx
    me, ms = se > 0, ss > 0
    ue, us = ue * me, us * ms  # retained directions only (a zero sigma belongs to the complement)
    re, rs = int(me.sum()), int(ms.sum())
    cross = ue.mT @ us
    projector = math.sqrt(max(re + rs - 2.0 * float((cross**2).sum()), 0.0) / max(re + rs, 1))
    top = min(TOP, re, rs)
    cosines = torch.linalg.svdvals(ue[:, :top].mT @ us[:, :top]) if top else torch.ones(1, dtype=ue.dtype)
    sine = math.sqrt(max(1.0 - float(cosines.min()) ** 2, 0.0))
    # The statistics G = U diag(sigma^2) U^T compared in the frame [U_e, Q] (Q: an orthonormal basis
    # of U_s's part outside range(U_e)), where U_s = [U_e, Q] [cross; T]: a 2k-square difference
    # formed directly, not through the cancelling ||G_e||^2 + ||G_s||^2 - 2 tr(G_e G_s).
    q, t = torch.linalg.qr(us - ue @ cross)
    coords = torch.cat([cross, t]) * ss
    diff = -(coords @ coords.mT)
    diff[: ue.shape[1], : ue.shape[1]] += torch.diag(se**2)
    norm_e = float(torch.linalg.vector_norm(se**2))
    statistic = float(torch.linalg.vector_norm(diff)) / norm_e if norm_e else 0.0
    rel = (ss[:top] - se[:top]).abs() / se[:top] if top else torch.zeros(1, dtype=se.dtype)
    return {
        "d": ue.shape[0], "rank_exact": re, "rank_subspace": rs,
        "projector": projector, "sine_top": sine,
        "sigma0": float(rel[0]), "sigma_top_max": float(rel.max()),
        "statistic": statistic,
        "escaped": abs(rho_s - rho_e) / rho_e if rho_e else float(rho_s != 0.0),
    }


def step_with(opt, params: list, grads: list) -> list:
    """One step of ``opt`` on ``params`` with ``grads``; the updates (the parameters' change)."""
    before = [p.detach().clone() for _, p in params]
    for (_, p), g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [(p.detach() - b).double() for (_, p), b in zip(params, before)]


def load(model, base: list, disp: list) -> None:
    with torch.no_grad():
        for (_, p), b, (_, d) in zip(model.named_parameters(), base, disp):
            p.copy_(b + d)


def forward_backward(model, loss_of, x, y) -> tuple[float, list]:
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, x, y)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in model.parameters()]


def validation(model, loss_of, ids, size) -> float:
    held = batches(ids, 8, size["seq"], 12345)
    with torch.no_grad():
        return statistics.fmean(float(loss_of(model, *map(torch.from_numpy, next(held)))) for _ in range(4))


def run_seed(seed: int, args, size, train_ids, validation_ids, measure: bool) -> dict:
    loss_of = torch_loss("gpt")
    models, bases, disps, opts = {}, {}, {}, {}
    for kind in ("exact", "subspace"):
        models[kind] = build_torch("gpt", size, torch.float32, "cpu", seed=seed)
        named = list(models[kind].named_parameters())
        bases[kind] = [p.detach().clone() for _, p in named]
        disps[kind] = displacements(named)
        opts[kind] = optimizer(disps[kind], args.lr, "auto" if kind == "exact" else "subspace")
    names = [name for name, _ in models["exact"].named_parameters()]
    if measure:  # the subspace sketch of the exact run's gradients
        shadow = displacements(list(models["exact"].named_parameters()))
        shadow_opt = optimizer(shadow, args.lr, "subspace")
    data = batches(train_ids, args.batch, size["seq"], seed)
    losses = {"exact": [], "subspace": []}
    measurements = []
    cpu = {"exact": 0.0, "subspace": 0.0, "shadow": 0.0}
    for t in range(args.steps):
        x, y = map(torch.from_numpy, next(data))
        updates = {}
        for kind in ("exact", "subspace"):
            load(models[kind], bases[kind], disps[kind])
            loss, grads = forward_backward(models[kind], loss_of, x, y)
            losses[kind].append(loss)
            start = time.process_time()
            updates[kind] = step_with(opts[kind], disps[kind], grads)
            cpu[kind] += time.process_time() - start
            if kind == "exact" and measure:
                start = time.process_time()
                updates["shadow"] = step_with(shadow_opt, shadow, grads)
                cpu["shadow"] += time.process_time() - start
        if measure and ((t + 1) % args.every == 0 or t + 1 == args.steps):
            measurements.append(measure_step(t + 1, names, disps["exact"], opts["exact"], shadow, shadow_opt,
                                             updates["exact"], updates["shadow"], args.lr))
            print(summary_line(measurements[-1]), flush=True)
        print(f"seed {seed} step {t + 1}: loss exact {losses['exact'][-1]:.4f} subspace {losses['subspace'][-1]:.4f}", flush=True)
    out = {"seed": seed, "losses": losses, "optimizer_cpu_s": cpu}
    for kind in ("exact", "subspace"):
        load(models[kind], bases[kind], disps[kind])
        out[f"validation_{kind}"] = validation(models[kind], loss_of, validation_ids, size)
    if measure:
        out["measurements"] = measurements
    return out


def measure_step(step, names, exact_params, exact_opt, shadow, shadow_opt, u_exact, u_shadow, lr) -> dict:
    blocks = []
    for name, (_, pe), (_, ps) in zip(names, exact_params, shadow):
        if pe.ndim < 2:
            continue
        exact, approx = sketch_blocks(exact_opt.state[pe]), sketch_blocks(shadow_opt.state[ps])
        for key in sorted(exact):
            blocks.append({"parameter": name, "block": list(key), **compare_block(exact[key], approx[key])})
    params, num, den = [], 0.0, 0.0
    for name, ue, us in zip(names, u_exact, u_shadow):
        diff, norm = float(torch.linalg.vector_norm(us - ue)), float(torch.linalg.vector_norm(ue))
        params.append({"parameter": name, "ndim": ue.ndim, "update": diff / norm if norm else 0.0, "norm": norm / lr})
        num, den = num + diff**2, den + norm**2
    return {"step": step, "blocks": blocks, "parameters": params, "update_overall": math.sqrt(num / den)}


def summary_line(m: dict) -> str:
    parts = [f"step {m['step']}:"]
    for metric in ("projector", "sine_top", "sigma0", "sigma_top_max", "statistic", "escaped"):
        values = [b[metric] for b in m["blocks"]]
        parts.append(f"{metric} med {statistics.median(values):.2e} max {max(values):.2e}")
    ups = [p["update"] for p in m["parameters"] if p["ndim"] == 2]
    parts.append(f"update med {statistics.median(ups):.2e} max {max(ups):.2e} overall {m['update_overall']:.2e}")
    return "  ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--seeds", default="0,1,2", help="the first one also measures the two sketches of one gradient stream")
    parser.add_argument("--every", type=int, default=3, help="measure the sketches every this many steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--summary", default=None, help="print the tables of a results file and stop")
    args = parser.parse_args(argv)
    if args.summary:
        return summarize(args.summary)
    torch.set_num_threads(1)
    size = dict(SIZES["gpt"]["reference"], batch=args.batch, seq=args.seq)
    train_ids, validation_ids = word_corpus(size["vocab"])
    results = {"settings": vars(args), "size": size, "torch": torch.__version__, "numpy": np.__version__, "runs": []}
    start = time.process_time()
    for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
        results["runs"].append(run_seed(seed, args, size, train_ids, validation_ids, measure=i == 0))
        results["cpu_s"] = time.process_time() - start
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(results, separators=(",", ":")))
    print(f"CPU {results['cpu_s']:.0f} s")


def summarize(path: str) -> None:
    """The tables of README.txt from a results file: per measure, over the measured steps, the
    median (range) of the blocks' median, and the largest block value; the updates by kind of
    parameter; the losses per seed."""
    results = json.loads(pathlib.Path(path).read_text())
    first = results["runs"][0]
    ms = first["measurements"]
    print(f"{len(ms)} measurements, steps {ms[0]['step']}..{ms[-1]['step']}; blocks per measurement {len(ms[0]['blocks'])}")

    def row(label, per_step):  # per_step: a list of value lists, one per measured step
        medians = [statistics.median(v) for v in per_step]
        print(f"  {label:<44} median {statistics.median(medians):.2e} [{min(medians):.2e}, {max(medians):.2e}]"
              f"  max {max(max(v) for v in per_step):.2e}  last step median {medians[-1]:.2e} max {max(per_step[-1]):.2e}")

    for d in (None, 512, 1024):
        print(f"sketch blocks{'' if d is None else f' with d = {d}'} (ranks > 0):")
        chosen = [[b for b in m["blocks"] if b["rank_exact"] and (d is None or b["d"] == d)] for m in ms]
        for metric in ("projector", "sine_top", "sigma0", "sigma_top_max", "statistic", "escaped"):
            row(metric, [[b[metric] for b in blocks] for blocks in chosen])
        flips = [sum((b["escaped"] == 1.0) for b in blocks) for blocks in chosen]
        print(f"  blocks with escaped mass in one sketch only: {min(flips)}-{max(flips)} of {len(chosen[0])}")
    print("updates ||u_s - u_e|| / ||u_e|| (momentum included):")
    kinds = ("tok_emb", "pos_emb", "qkv", "proj", "fc", "out", "head")
    for kind in kinds:
        row(kind, [[p["update"] for p in m["parameters"] if p["ndim"] == 2 and p["parameter"].split(".")[-2] == kind] for m in ms])
    row("every matrix", [[p["update"] for p in m["parameters"] if p["ndim"] == 2] for m in ms])
    row("1-D parameters (graft only)", [[p["update"] for p in m["parameters"] if p["ndim"] == 1] for m in ms])
    overall = [m["update_overall"] for m in ms]
    print(f"  {'overall':<44} median {statistics.median(overall):.2e} [{min(overall):.2e}, {max(overall):.2e}]")
    no_head = []
    for m in ms:
        num = sum((p["update"] * p["norm"]) ** 2 for p in m["parameters"] if p["parameter"] != "head.weight")
        den = sum(p["norm"] ** 2 for p in m["parameters"] if p["parameter"] != "head.weight")
        no_head.append(math.sqrt(num / den))
    print(f"  {'overall without the head':<44} median {statistics.median(no_head):.2e} [{min(no_head):.2e}, {max(no_head):.2e}]")
    print("training loss (mean of the last 10 steps) and validation loss:")
    diffs = []
    for run in results["runs"]:
        train = {k: statistics.fmean(v[-10:]) for k, v in run["losses"].items()}
        diffs.append(train["subspace"] - train["exact"])
        print(f"  seed {run['seed']}: exact {train['exact']:.4f} / {run['validation_exact']:.4f}, subspace"
              f" {train['subspace']:.4f} / {run['validation_subspace']:.4f}, subspace - exact {diffs[-1]:+.4f}"
              f" / {run['validation_subspace'] - run['validation_exact']:+.4f}; optimizer CPU s {run['optimizer_cpu_s']}")
    exact = [statistics.fmean(run["losses"]["exact"][-10:]) for run in results["runs"]]
    print(f"  exact over the seeds: {min(exact):.4f}-{max(exact):.4f} (spread {max(exact) - min(exact):.4f})")


if __name__ == "__main__":
    main()
