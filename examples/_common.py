"""What both example language models share: the corpus (this project's own docs, no download), the loop.

Used by ``char_lm_torch.py`` and ``char_lm_jax.py``. The corpus is the README and every page under ``docs/``,
concatenated in a fixed order, encoded as integer character ids.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_corpus(validation_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(train_ids, validation_ids, vocabulary)``; the last ``validation_fraction`` of the text is held out."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in files if path.exists())
    if len(text) < 10_000:
        raise FileNotFoundError(f"expected the project's README.md and docs/ next to {ROOT / 'examples'}")
    vocabulary = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocabulary)}
    ids = np.fromiter((lookup[ch] for ch in text), dtype=np.int64, count=len(text))
    split = int(len(ids) * (1.0 - validation_fraction))
    return ids[:split], ids[split:], vocabulary


def parse_setting(text: str) -> dict:
    """A study's setting ``"name=value,name=value"`` as keyword arguments (values as Python literals)."""
    out = {}
    for pair in filter(None, text.split(",")):
        name, value = pair.split("=")
        out[name.strip()] = ast.literal_eval(value.strip())
    return out


def print_summary(label: str, runs: list[tuple]) -> None:
    """One line per setting of a study: mean [min, max] over the seeds of each run's
    ``(train loss, validation loss, ...)``."""
    import statistics

    train, validation = [r[0] for r in runs], [r[1] for r in runs]
    print(
        f"== {label}: train {statistics.fmean(train):.4f} [{min(train):.4f}, {max(train):.4f}]"
        f"  validation {statistics.fmean(validation):.4f} [{min(validation):.4f}, {max(validation):.4f}]",
        flush=True,
    )


def batches(ids: np.ndarray, batch_size: int, context: int, seed: int):
    """Endless random windows ``(inputs, targets)`` of shape ``(batch_size, context)``; targets are shifted by one."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - context - 1, size=batch_size)
        window = np.stack([ids[s : s + context + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def progress(total: int, description: str):
    """A tqdm bar on a terminal; ``None`` otherwise (logs get a line every few steps instead)."""
    import sys

    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="step", file=sys.stderr)


def plot_losses(steps: list[int], losses: list[float], title: str, path: pathlib.Path) -> bool:
    """Write the training-loss curve as a PNG; ``False`` (and nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, linewidth=1.2)
    ax.set(xlabel="step", ylabel="cross-entropy (nats / character)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_arguments(description: str, optimizers: dict, argv, extra=None):
    """The command line shared by both examples; ``extra(parser)`` adds a framework's own flags."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--optimizer", choices=sorted(optimizers), default="agd", help="the optimizer to train with (default %(default)s)")
    rates = ", ".join(f"{name} {entry[1]:g}" for name, entry in sorted(optimizers.items()))
    add("--lr", type=float, default=None, help=f"learning rate (default: the optimizer's measured rate: {rates})")
    add("--steps", type=int, default=300, help="training steps (default %(default)s)")
    add("--batch-size", type=int, default=32, help="sequences per batch (default %(default)s)")
    add("--context", type=int, default=64, help="characters per sequence (default %(default)s)")
    add("--width", type=int, default=64, help="model width (default %(default)s)")
    add("--layers", type=int, default=2, help="transformer blocks (default %(default)s)")
    add("--heads", type=int, default=4, help="attention heads (default %(default)s)")
    add("--seed", type=int, default=0, help="seed of the initialisation and the batches (default %(default)s)")
    add("--out", default="results", help="directory of the loss plot (default %(default)s)")
    add("--sample", type=int, default=200, help="characters to generate at the end (0: none; default %(default)s)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def train_loop(step_fn, data, steps: int, name: str) -> tuple[list[int], list[float], float]:
    """Run ``step_fn(inputs, targets) -> loss`` for ``steps`` batches of ``data``; a bar or a line every 10%.

    Returns the step numbers, the losses and the seconds taken; stops early on a non-finite loss.
    """
    import math
    import time

    bar = progress(steps, name)
    done, losses = [], []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        losses.append(float(step_fn(*next(data))))
        done.append(step)
        if not math.isfinite(losses[-1]):
            print(f"step {step}: the loss is {losses[-1]}; try a smaller --lr")
            break
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elif step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:5d}  loss {losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return done, losses, time.perf_counter() - started


def report(steps: list[int], losses: list[float], elapsed: float, validation_loss: float, out: str, name: str, title: str) -> None:
    """Print the final losses and write the loss plot ``out/name.png``."""
    print(
        f"done in {elapsed:.1f} s: training loss {np.mean(losses[-10:]):.4f} (last 10 steps), "
        f"validation loss {validation_loss:.4f}"
    )
    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    if plot_losses(steps, losses, title, directory / f"{name}.png"):
        print(f"loss plot: {directory / f'{name}.png'}")
