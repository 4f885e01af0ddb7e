"""ASGO's refresh interval, block size and refresh spreading against quality.

Trains the char-LM example's transformer (``char_lm_torch.CharTransformer``, this project's docs as
text) with principled ASGO through the torch adapter, one setting per line of ``--settings``, for
``--seeds`` seeds, and prints the mean training loss of the last 20 steps and the validation loss
per run and per setting (mean, min-max). Eager torch, one thread, float32. Run from the repository root::

    python examples/asgo_study.py --settings "precondition_every=1;precondition_every=10" --seeds 0,1,2

A setting is ``name=value`` pairs joined by ``,`` (values parsed as Python literals), passed to
``precond_ref.adapters.torch.ASGO``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import batches, load_corpus, parse_setting, print_summary  # noqa: E402
from char_lm_torch import CharTransformer  # noqa: E402

import precond_ref as pr  # noqa: E402
from precond_ref.adapters import torch as pt  # noqa: E402


def run(setting: dict, seed: int, steps: int, width: int, lr: float) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    train_ids, validation_ids, vocabulary = load_corpus()
    context, batch = 64, 32
    model = CharTransformer(len(vocabulary), context, width, 2, 4)
    setting = dict(setting)
    cls = pt.ASGO
    if "spread_refresh" in setting:  # a core argument the torch class does not take (yet)
        cls = type("ASGO", (pt.ASGO,), {"core_factory": staticmethod(functools.partial(pr.asgo, spread_refresh=setting.pop("spread_refresh")))})
    optimizer = cls(model.named_parameters(), lr=lr, **setting)
    data = batches(train_ids, batch, context, seed)
    losses = []
    started = time.perf_counter()
    for _ in range(steps):
        x, y = (torch.as_tensor(a) for a in next(data))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    elapsed = time.perf_counter() - started
    with torch.no_grad():
        vdata = batches(validation_ids, 64, context, 12345)
        vloss = statistics.fmean(
            float(F.cross_entropy(model(torch.as_tensor(x)).flatten(0, 1), torch.as_tensor(y).flatten()))
            for x, y in (next(vdata) for _ in range(8))
        )
    return statistics.fmean(losses[-20:]), vloss, elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", required=True, help="settings separated by ';'")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    for text in args.settings.split(";"):
        rows = [run(parse_setting(text), seed, args.steps, args.width, args.lr) for seed in seeds]
        for seed, (train, valid, per_step) in zip(seeds, rows):
            print(f"{text or 'defaults'}\tseed {seed}\ttrain {train:.4f}\tvalid {valid:.4f}\t{1e3 * per_step:.1f} ms/step", flush=True)
        print_summary(text or "defaults", rows)


if __name__ == "__main__":
    main()
