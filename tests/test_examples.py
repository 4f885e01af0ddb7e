"""The example scripts in examples/ train for a few steps (tiny settings: seconds, not minutes).

The character-level language models read the project's own docs; each test checks that the script
runs end to end with one of our optimizers, that the loss is finite, and that it writes its plot.
"""

from __future__ import annotations

import collections
import math
import pathlib

import pytest
from loading import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--batch-size", "4", "--context", "16", "--width", "16", "--layers", "1", "--heads", "2", "--sample", "5"]


def _load(name: str):
    return load_file(name, ROOT / "examples" / f"{name}.py")


@pytest.mark.parametrize(
    "script, optimizer, needs",
    [("char_lm_torch", "mbf", "torch"), ("char_lm_jax", "if_shampoo", "jax")],
)
def test_char_lm_example_trains(script, optimizer, needs, tmp_path, capsys):
    pytest.importorskip(needs)
    pytest.importorskip("matplotlib")
    module = _load(script)
    result = module.main(["--optimizer", optimizer, "--out", str(tmp_path), *TINY])
    assert len(result["losses"]) == 3 and all(math.isfinite(v) for v in result["losses"])
    assert math.isfinite(result["validation_loss"])
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "sample:" in printed
    assert (tmp_path / f"{script}_{optimizer}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(module.OPTIMIZERS) >= {"agd", "asgo", "dasgo", "sketchy", "s_adagrad", "rf_rmsprop", "rf_adamw", "if_shampoo", "mbf"}


def test_gpt_word_study_tokens_and_training():
    """``examples/gpt_word_study.py``: the corpus has ids below the vocabulary (0 the bucket of the
    rare words, 1 the most frequent word) and covers most tokens at the bench's vocabulary; a study
    run trains (the tiny GPT's mean loss over its steps falls below the uniform guess ln V)."""
    pytest.importorskip("torch")
    study = _load("gpt_word_study")
    train, validation = study.word_corpus(2048)
    ids = list(train) + list(validation)
    assert 0 <= min(ids) and max(ids) == 2047
    assert sum(i == 0 for i in ids) < 0.1 * len(ids)
    counts = collections.Counter(ids)
    del counts[0]
    assert counts.most_common(1)[0][0] == 1
    size = dict(study.models.SIZES["gpt"]["tiny"])
    loss, held, _ = study.run("AdamW", {}, 0, 30, size, 1e-2)
    assert math.isfinite(held) and loss < math.log(size["vocab"])



def test_gpt_word_study_passes_its_learning_rate_or_the_class_default(monkeypatch):
    """``--lr`` reaches the optimizer as ``lr``; without it the class is built without ``lr``, so at
    its own default (docs/defaults.md's "On a GPT" runs rely on that)."""
    torch = pytest.importorskip("torch")
    study = _load("gpt_word_study")
    seen = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.append(kwargs.get("lr", "default"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(study.torch.optim, "AdamW", Recorded)
    size = dict(study.models.SIZES["gpt"]["tiny"])
    study.run("AdamW", {}, 0, 1, size, 3e-3)
    study.run("AdamW", {}, 0, 1, size, None)
    assert seen == [3e-3, "default"]

def test_measure_decompositions_records_and_times_the_steps_decompositions(monkeypatch):
    """``examples/measure_decompositions.py``: one refresh window of Sketchy on the tiny GPT records
    its decompositions (the FD cores' SVD, a Gram path's eigh; counted per step over the window), and
    each is timed as recorded and by the alternatives (on a CPU: the Gram's eigh in two dtypes for
    an SVD, float64 for an eigh). The cores' SVD route is forced (``linalg.left_singular`` takes
    the float64 Gram's eigh wherever float64 exists, which the default run records as an eigh)."""
    pytest.importorskip("torch")
    from precond_ref import linalg

    monkeypatch.setattr(linalg, "_svd_by_float64_gram", lambda xp, a: False)
    rows = _load("measure_decompositions").main(["--method", "sketchy", "--size", "tiny", "--repeats", "1", "--device", "cpu"])
    ways = collections.defaultdict(set)
    for row in rows:
        assert row["ms_per_call"] > 0 and row["calls_per_step"] > 0
        assert math.isclose(row["ms_per_step"], row["ms_per_call"] * row["calls_per_step"])
        ways[row["op"]].add(row["way"])
    assert ways["svd"] == {"svd (as recorded)", "Gram eigh float32", "Gram eigh float64"}
    assert ways["eigh"] == {"eigh (as recorded)", "eigh float64"}


@pytest.mark.parametrize("script, needs", [("char_lm_torch", "torch"), ("char_lm_jax", "jax")])
def test_char_lm_help_shows_every_default(script, needs, capsys):
    """``--help`` states the value of every option the user may leave out (the learning rate:
    each optimizer's own)."""
    pytest.importorskip(needs)
    module = _load(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("optimizer", "steps", "batch-size", "context", "width", "layers", "heads", "seed", "out", "sample"):
        assert f"--{option}" in text
        assert text.split(f"--{option} ")[-1].split(" --")[0].count("default") == 1, option
    assert "agd 0.003" in text


def test_char_lm_torch_builds_every_optimizer():
    """The torch example builds each of its optimizers (the root-free ones with the batch size,
    which they need when built)."""
    torch = pytest.importorskip("torch")
    module = _load("char_lm_torch")
    model = torch.nn.Linear(3, 2)
    for name in module.OPTIMIZERS:
        assert isinstance(module.make_optimizer(name, model, 1e-3, 4), torch.optim.Optimizer)
