"""A module loaded from a file that is not on the import path (an example script, the docs' hooks,
a fixture maker in tests/data)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType


def load_file(name: str, path: pathlib.Path) -> ModuleType:
    """The module ``name`` executed from ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
