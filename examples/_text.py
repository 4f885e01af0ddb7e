"""The corpus of the example language models: this project's own documentation (no download).

Shared by ``char_lm_torch.py`` and ``char_lm_jax.py``: the README and every page under ``docs/``,
concatenated in a fixed order, encoded as integer character ids.
"""

from __future__ import annotations

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
