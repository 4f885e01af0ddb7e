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
    assert "precond_ref/py.typed" in names  # PEP 561: type checkers read our annotations
    assert "precond_ref/compare/reproduce/corpus.txt.gz" in names  # reproduce's char-LM text (package data)


def test_core_imports_no_array_library_by_name():
    """shared/DESIGN.md, Layers: the core takes its namespace from its inputs."""
    pattern = re.compile(r"^\s*(import|from)\s+(numpy|torch|jax|jaxlib|cupy|scipy)\b", re.M)
    # The command-line tools and the user-facing toolkits are not core (the shared hook's rule).
    allowed = {"cli.py", "__main__.py"}
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "precond_ref").rglob("*.py")
        if path.name not in allowed
        and not {"testing", "compare", "benchmarks"} & set(path.relative_to(ROOT).parts)
        and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_testing_toolkit_imports_array_libraries_only_lazily():
    """precond_ref.testing's problems run on every backend; NumPy is needed only by the helpers
    that compare or save trajectories, and is imported inside them, and by the loop oracles
    (``testing/loops``, NumPy statements of the methods), which ``precond_ref.testing`` imports on
    first use."""
    top_level = re.compile(r"^(import|from)\s+(numpy|torch|jax|jaxlib|cupy|scipy)\b", re.M)
    loops = ROOT / "precond_ref" / "testing" / "loops"
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "precond_ref" / "testing").rglob("*.py")
        if loops not in path.parents and top_level.search(path.read_text())
    ]
    assert offenders == []


def test_license_changelog_and_extras_a_new_user_needs():
    """The license pyproject names ships as a file; a changelog exists; the torch extra
    (what docs/validating.md installs) brings NumPy, which the validation toolkit needs."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / "precond_ref" / "py.typed").exists()
    extras = project["optional-dependencies"]
    assert any(req.startswith("numpy") for req in extras["torch"])
    assert 'pip install -e ".[torch]"' in (ROOT / "docs" / "validating.md").read_text()
    assert any(req.startswith("latex2mathml") for req in extras["docs"])


def test_every_command_option_has_help_text():
    """`--help` of every command explains every option (bench's --dtype had none)."""
    import argparse
    import importlib

    from precond_ref.cli import COMMANDS

    for name, (module_name, _, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=name)
        importlib.import_module(module_name).add_arguments(parser)
        missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert missing == [], (name, missing)
