"""MBF's block size, refresh spreading and intervals against quality and cost.

A GPT of the bench's family (``precond_ref.benchmarks.models``) with a long vocabulary axis, trained
on this project's own text cut into two-character tokens (the ``vocab - 1`` most frequent pairs,
the rest one unknown token), so the embedding and the read-out have a real ``vocab x width``
statistic to block. Prints one line per (setting, seed): the mean training loss of the last 20
steps, the validation loss at the end, and the median and largest step time.

    python examples/measure_mbf_blocks.py --settings block_size=64,block_size=256 --seeds 0,1,2

A setting is a comma-free ``key=value[;key=value]`` list of ``MBF`` arguments (``none`` for None).
"""

from __future__ import annotations

import argparse
import collections
import functools
import pathlib
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import precond_ref as pr
from precond_ref.adapters import torch as pt
from precond_ref.benchmarks.models import _torch_classes

CORE_ONLY = ("block_size", "refresh_phases")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def corpus(root: pathlib.Path, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in files if p.exists())
    pairs = [text[i : i + 2] for i in range(0, len(text) - 1, 2)]
    common = [p for p, _ in collections.Counter(pairs).most_common(vocab - 1)]
    lookup = {p: i + 1 for i, p in enumerate(common)}
    ids = np.fromiter((lookup.get(p, 0) for p in pairs), dtype=np.int64, count=len(pairs))
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:]


def parse(setting: str) -> dict:
    out = {}
    for item in filter(None, setting.split(";")):
        key, value = item.split("=")
        out[key] = None if value == "none" else (float(value) if "." in value or "e" in value else int(value))
    return out


def run(setting: dict, seed: int, args, train, valid) -> tuple[float, float, float, float]:
    torch.manual_seed(seed)
    gpt = _torch_classes()["gpt"]
    model = gpt(layers=args.layers, width=args.width, heads=4, vocab=args.vocab, seq=args.context)
    core_only = {k: setting.pop(k) for k in CORE_ONLY if k in setting}

    class MBF(pt.MBF):  # the torch class does not take the core's new arguments yet
        core_factory = staticmethod(functools.partial(pr.mbf, **core_only))

    opt = MBF(model.named_parameters(), **{"lr": args.lr, "damping": args.damping, **setting})
    rng = np.random.default_rng(seed)
    losses, times = [], []
    for _ in range(args.steps):
        starts = rng.integers(0, len(train) - args.context - 1, size=args.batch)
        window = torch.from_numpy(np.stack([train[s : s + args.context + 1] for s in starts]))
        x, y = window[:, :-1], window[:, 1:]
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).reshape(-1, args.vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    with torch.no_grad():
        n = (len(valid) - 1) // args.context
        v = torch.from_numpy(valid[: n * args.context + 1])
        x, y = v[:-1].reshape(n, args.context), v[1:].reshape(n, args.context)
        val = float(F.cross_entropy(model(x).reshape(-1, args.vocab), y.reshape(-1)))
    return float(np.mean(losses[-20:])), val, statistics.median(times), max(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="comma-separated settings (see the module docstring)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--damping", type=float, default=1e-1)
    parser.add_argument("--root", default=str(ROOT), help="the text's repository root (fix it to compare runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, valid = corpus(pathlib.Path(args.root), args.vocab)
    for setting in args.settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            final, val, median, worst = run(parse(setting), seed, args, train, valid)
            print(f"{setting or 'defaults'}\tseed {seed}\ttrain {final:.4f}\tvalid {val:.4f}\t"
                  f"median {1e3 * median:.1f} ms\tmax {1e3 * worst:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
