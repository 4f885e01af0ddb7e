"""Packaging: the top-level adapters/ folder installs as precond_ref.adapters; the core is pure."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_installed_adapters_import():
    import precond_ref.adapters.jax as pj
    import precond_ref.adapters.torch as pt

    assert pt.AGD and pj.agd


def test_wheel_contains_adapters_as_subpackage(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "precond_ref/adapters/torch.py" in names and "precond_ref/adapters/jax.py" in names
    assert not any(n.startswith("adapters/") for n in names)


def test_core_imports_no_array_library_by_name():
    """shared/DESIGN.md, Layers: the core takes its namespace from its inputs."""
    pattern = re.compile(r"^\s*(import|from)\s+(numpy|torch|jax|jaxlib|cupy|scipy)\b", re.M)
    # The command-line tools and the user-facing toolkits are not core (the shared hook's rule).
    allowed = {"cli.py", "__main__.py", "benchmarks.py", "benchmarks_distributed.py"}
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "precond_ref").rglob("*.py")
        if path.name not in allowed
        and not {"testing", "compare"} & set(path.relative_to(ROOT).parts)
        and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_testing_toolkit_imports_array_libraries_only_lazily():
    """precond_ref.testing's problems run on every backend; NumPy is needed only by the helpers
    that compare or save trajectories, and is imported inside them."""
    top_level = re.compile(r"^(import|from)\s+(numpy|torch|jax|jaxlib|cupy|scipy)\b", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "precond_ref" / "testing").rglob("*.py")
        if top_level.search(path.read_text())
    ]
    assert offenders == []
