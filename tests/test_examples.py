"""The example scripts in examples/ train for a few steps (tiny settings: seconds, not minutes).

The character-level language models read the project's own docs; each test checks that the script
runs end to end with one of our optimizers, that the loss is finite, and that it writes its plot.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--batch-size", "4", "--context", "16", "--width", "16", "--layers", "1", "--heads", "2", "--sample", "5"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
