"""A method's hyperparameters against quality on the bench's GPT (the methods' interval and block tables).

Trains ``precond_ref.benchmarks.models``' GPT at the bench's size (``--size small``: 2 layers,
width 128, vocabulary 2048, batch 8 x 64) on word tokens of this project's README and docs (the
``vocab - 1`` most frequent words, the rest one token), so the long axes the bench times
(embedding and head, 2048 x 128) are the ones whose blocks and ranks are studied. One setting per
``;``-separated entry of ``--settings``, ``--seeds`` seeds each; prints per run and per setting the
mean training loss of the last 20 steps and the validation loss (mean, min-max over the seeds).
Each torch class with its own compile default (AGD, DASGO, RF-RMSProp and RF-AdamW compile their
update), one thread, float32. Run from the repository root::

    python examples/gpt_word_study.py --method Sketchy --lr 3e-3 \\
        --settings "rank=256,block_size=1024;rank=64,block_size=256" --seeds 0,1,2

A setting is ``name=value`` pairs joined by ``,`` (values parsed as Python literals), passed to the
torch class ``precond_ref.adapters.torch.<method>`` beside ``lr``; without ``--lr`` the class's own
default rate is used (``torch.optim.AdamW``'s for ``AdamW``). ``--size reference`` trains the GPU
model of the bench (6 layers, width 512, vocabulary 8192); ``--batch`` and ``--seq`` replace the
size's batch shape (the reference batch, 16 x 256, is slow on one CPU thread).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import statistics
import sys
import time
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import ROOT, batches, parse_setting, print_summary  # noqa: E402

from precond_ref.adapters import torch as pt  # noqa: E402
from precond_ref.benchmarks import models  # noqa: E402


def word_corpus(vocab: int, validation_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Word-token ids of the README and docs: the ``vocab - 1`` most frequent tokens, the rest id 0."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in files if path.exists())
    tokens = re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", text)
    common = [word for word, _ in collections.Counter(tokens).most_common(vocab - 1)]
    lookup = {word: i + 1 for i, word in enumerate(common)}
    ids = np.fromiter((lookup.get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))
    split = int(len(ids) * (1.0 - validation_fraction))
    return ids[:split], ids[split:]


def run(method: str, setting: dict, seed: int, steps: int, size: dict, lr: Optional[float]) -> tuple[float, float, float]:
    """``(mean training loss of the last 20 steps, validation loss, seconds)``; ``lr=None``: the class's default."""
    train_ids, validation_ids = word_corpus(size["vocab"])
    model = models.build_torch("gpt", size, torch.float32, "cpu", seed=seed)
    loss_of = models.torch_loss("gpt")
    cls = torch.optim.AdamW if method == "AdamW" else getattr(pt, method)
    extra = {"model": model} if method == "MBF" else {}
    if method in ("IFShampoo", "RFRMSProp", "RFAdamW") and "batch_size" not in setting:
        extra["batch_size"] = models.batch_size_of("gpt", size)
    if lr is not None:
        extra["lr"] = lr
    opt = cls(model.parameters(), **extra, **setting)
    data = batches(train_ids, size["batch"], size["seq"], seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(data)
        loss = loss_of(model, torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        held = batches(validation_ids, 32, size["seq"], 12345)
        validation = statistics.fmean(float(loss_of(model, *map(torch.from_numpy, next(held)))) for _ in range(4))
    return statistics.fmean(losses[-20:]), validation, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="torch class name in precond_ref.adapters.torch (or AdamW: torch's), e.g. Sketchy, SAdaGrad, IFShampoo, ASGO, MBF")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--size", default="small", choices=sorted(models.SIZES["gpt"]))
    parser.add_argument("--lr", type=float, help="learning rate (default: the class's default)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: the size's)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the size's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = dict(models.SIZES["gpt"][args.size])
    size.update({key: value for key, value in (("batch", args.batch), ("seq", args.seq)) if value is not None})
    seeds = [int(s) for s in args.seeds.split(",")]
    for text in args.settings.split(";"):
        setting = parse_setting(text)
        runs = [run(args.method, setting, seed, args.steps, size, args.lr) for seed in seeds]
        for seed, (train, validation, seconds) in zip(seeds, runs):
            print(f"{args.method} {text or 'defaults'} seed {seed}: train {train:.4f} validation {validation:.4f} ({seconds:.0f} s)", flush=True)
        print_summary(f"{args.method} {text or 'defaults'}", runs)


if __name__ == "__main__":
    main()
