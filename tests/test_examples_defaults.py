"""Issue 33, item 6: the examples' command lines end cleanly on a machine without the device asked
for, and their per-optimizer default learning rates are the measured ones."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device, message", [("cuda", "needs CUDA"), ("cuda:7", None), ("nonsense", "not a torch device")])
def test_char_lm_torch_refuses_a_missing_device_in_one_line(device, message, capsys):
    """``--device cuda`` without CUDA used to end in a raw torch traceback from the first
    ``.to(device)``; like ``compare --device`` it is now a one-line error with status 2, before any
    data is read."""
    torch = pytest.importorskip("torch")
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    module = _load("char_lm_torch")
    with pytest.raises(SystemExit) as info:
        module.main(["--device", device, "--steps", "1"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"char_lm_torch.py: --device {device}: ")
    if message is not None and not (device == "cuda" and torch.cuda.is_available()):
        assert message in captured.err
