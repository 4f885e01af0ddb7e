"""The nine torch classes at their defaults against torch.optim.AdamW() on the bench's GPT.

Trains ``precond_ref.benchmarks.models``' GPT (``--size small`` or ``reference``; ``--batch`` and
``--seq`` replace the size's batch shape) on the word tokens of examples/gpt_word_study.py (the
README and docs), torch on a CPU (each class's own compile default), one thread, float32. Each class
gets only what it requires beside its defaults: ``batch_size`` (tokens per batch) for the
root-free methods, ``model=`` for MBF; ``--lr`` overrides the rate, ``--settings`` adds keyword
arguments. Per run one line: the first loss, the mean of the last 10 losses, the largest loss, the
validation loss (4 batches of 32 held-out windows), whether it diverged (a non-finite loss, or a
last-10 mean above the first loss), the seconds per step, and the whole loss curve in ``--out``
(JSON lines, appended).

Sketchy variants (``--variant``), none of them in the library:
  bias_corrected  the RMSProp graft's moment divided by 1 - graft_beta2**t (Adam's correction),
                  by replacing precond_ref.methods.sketchy._graft while the optimizer is built and run;
  warmup:N        the rate rises linearly over the first N steps (LambdaLR on the param groups).
ASGO and DASGO variant (a class argument that --settings cannot spell):
  fallback:A+B    fallback_filter routes the parameters whose names contain A or B (e.g. emb+head)
                  to the AdamW fallback (the ASGO authors' trainer routes "emb" there); the
                  optimizer gets model.named_parameters().
(``momentum_ema=True`` is a class argument: pass it in ``--settings``.)

Run from the repository root, e.g.::

    python records/gpt-defaults-2026-11-29/gpt_defaults.py --size reference --batch 4 --seq 128 \\
        --methods Sketchy,AdamW --steps 40 --seeds 0
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from _common import batches, parse_setting  # noqa: E402
from gpt_word_study import word_corpus  # noqa: E402

from precond_ref.adapters import torch as pt  # noqa: E402
from precond_ref.benchmarks import models  # noqa: E402
sketchy_module = importlib.import_module("precond_ref.methods.sketchy")

METHODS = ("AGD", "ASGO", "DASGO", "Sketchy", "SAdaGrad", "RFRMSProp", "RFAdamW", "IFShampoo", "MBF")


class BiasCorrectedGraft:
    """Sketchy's graft with Adam's bias correction: D_g = G / sqrt(v_t / (1 - b^t) + eps).

    ``t`` is the step count, advanced before each step of the optimizer given to :meth:`attach`
    (eager torch: the graft runs once per leaf layout per step and reads ``t`` when it runs). In
    place of ``precond_ref.methods.sketchy._graft`` from before the optimizer is built to the
    run's end."""

    def __init__(self) -> None:
        self.t = 0
        self.calls = 0
        self.original = sketchy_module._graft

    def attach(self, optimizer):
        def advance(*_):
            self.t += 1

        optimizer.register_step_pre_hook(advance)
        return optimizer

    def __call__(self, xp, c, g, v):
        self.calls += 1
        v = sketchy_module._second_moment(xp, v, g, c.graft_b2)
        correction = 1.0 - float(c.graft_b2) ** self.t
        return v, g / xp.sqrt(v / correction + c.graft_eps)


class NameFilter:
    """``fallback_filter``: the parameters whose dotted names contain one of ``parts``."""

    def __init__(self, parts) -> None:
        self.parts = tuple(parts)

    def __call__(self, name, tensor) -> bool:
        return any(part in name for part in self.parts)

    def __repr__(self) -> str:
        return f"NameFilter({self.parts!r})"


def make_optimizer(method: str, model, size: dict, lr, setting: dict):
    if method == "AdamW":
        cls, extra = torch.optim.AdamW, {}
    else:
        cls = getattr(pt, method)
        extra = {"model": model} if method == "MBF" else {}
        if method in ("IFShampoo", "RFRMSProp", "RFAdamW"):
            extra["batch_size"] = models.batch_size_of("gpt", size)
    if lr is not None:
        extra["lr"] = lr
    # fallback_filter reads the parameters' names: named parameters (plain ones are named paramN)
    params = model.named_parameters() if "fallback_filter" in setting else model.parameters()
    return cls(params, **extra, **setting)


def run(method: str, size: dict, seed: int, steps: int, lr, setting: dict, variant: str) -> dict:
    train_ids, validation_ids = word_corpus(size["vocab"])
    model = models.build_torch("gpt", size, torch.float32, "cpu", seed=seed)
    loss_of = models.torch_loss("gpt")
    graft = None
    if variant == "bias_corrected":
        graft = BiasCorrectedGraft()
        sketchy_module._graft = graft
    if variant.startswith("fallback:"):
        setting = dict(setting, fallback_filter=NameFilter(variant.split(":")[1].split("+")))
    try:
        opt = make_optimizer(method, model, size, lr, setting)
        if graft is not None:
            graft.attach(opt)
        scheduler = None
        if variant.startswith("warmup:"):
            warm = int(variant.split(":")[1])
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
        data = batches(train_ids, size["batch"], size["seq"], seed)
        losses = []
        start = time.process_time()
        for _ in range(steps):
            x, y = next(data)
            loss = loss_of(model, torch.from_numpy(x), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
    finally:
        if graft is not None:
            sketchy_module._graft = graft.original
        if graft is not None and graft.calls == 0:
            raise RuntimeError("the bias-corrected graft was never called")
    seconds = time.process_time() - start
    validation = float("nan")
    if math.isfinite(losses[-1]):
        with torch.no_grad():
            held = batches(validation_ids, 32, size["seq"], 12345)
            validation = statistics.fmean(float(loss_of(model, *map(torch.from_numpy, next(held)))) for _ in range(4))
    last = statistics.fmean(losses[-10:])
    diverged = not all(map(math.isfinite, losses)) or last > losses[0]
    setting = {k: repr(v) if callable(v) else v for k, v in setting.items()}
    return dict(method=method, lr=lr if lr is not None else opt.param_groups[0]["lr"], setting=setting, variant=variant,
                seed=seed, corpus_tokens=len(train_ids) + len(validation_ids), steps=len(losses), first=losses[0], last10=last, max=max(losses), validation=validation,
                diverged=diverged, cpu_s_per_step=seconds / len(losses), losses=losses)


def table(paths) -> None:
    """The runs of JSON lines files, one line per (size, batch, method, lr, setting, variant): the
    mean [min, max] over its seeds of the first loss, the largest loss, the last-10 mean and the
    validation loss, and how many of its seeds diverged."""
    groups: dict = {}
    for path in paths:
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            key = (r["size"], f"{r['batch']}x{r['seq']}", r["method"], f"{r['lr']:g}",
                   ",".join(f"{k}={v}" for k, v in r["setting"].items()) or "-", r["variant"])
            groups.setdefault(key, []).append(r)

    def spread(values) -> str:
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return "nan"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    print("| size | batch | method | lr | settings | variant | seeds | steps | first loss | largest loss | last-10 mean | validation | diverged |")
    print("|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, runs in groups.items():
        size, shape, method, lr, setting, variant = key
        print(f"| {size} | {shape} | {method} | {lr} | {setting} | {variant} | {len(runs)} | {max(r['steps'] for r in runs)} | "
              f"{spread([r['first'] for r in runs])} | {spread([r['max'] for r in runs])} | {spread([r['last10'] for r in runs])} | "
              f"{spread([r['validation'] for r in runs])} | {sum(r['diverged'] for r in runs)}/{len(runs)} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(models.SIZES["gpt"]))
    parser.add_argument("--batch", type=int, help="sequences per batch (default: the size's)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the size's)")
    parser.add_argument("--methods", default=",".join(METHODS + ("AdamW",)))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, help="default: the class's default")
    parser.add_argument("--settings", default="")
    parser.add_argument("--variant", default="none", help="none, bias_corrected, warmup:N (Sketchy) or fallback:A+B (ASGO, DASGO)")
    parser.add_argument("--out", help="JSON lines file the runs are appended to")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="print the table of these files' runs, train nothing")
    args = parser.parse_args(argv)
    if args.table:
        return table(args.table)
    torch.set_num_threads(1)
    size = dict(models.SIZES["gpt"][args.size])
    size.update({k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None})
    setting = parse_setting(args.settings)
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            r = run(method, size, seed, args.steps, args.lr, setting, args.variant)
            label = f"{method} lr {r['lr']:g} {args.settings or '-'} {args.variant}"
            print(f"{label} seed {seed}: first {r['first']:.3f} last10 {r['last10']:.3f} max {r['max']:.3f} "
                  f"validation {r['validation']:.3f} diverged {r['diverged']} steps {r['steps']} "
                  f"({r['cpu_s_per_step']:.2f} cpu s/step)", flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(dict(r, size=args.size, batch=size["batch"], seq=size["seq"])) + "\n")


if __name__ == "__main__":
    main()
