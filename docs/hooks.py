"""MkDocs hook: API sections that follow what the installed library actually contains.

``<!-- api: precond_ref.methods.asgo -->`` becomes the mkdocstrings directive ``::: ...`` when the
module can be imported, and a note otherwise, so the method pages can be written before every
method module exists and the site still builds without warnings. ``<!-- api: methods -->``
expands to one section per module of :mod:`precond_ref.methods`.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

_MARKER = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _method_modules() -> list[str]:
    import precond_ref.methods as methods

    return [f"precond_ref.methods.{m.name}" for m in pkgutil.iter_modules(methods.__path__) if not m.name.startswith("_")]


def _expand(match: re.Match) -> str:
    name = match.group(1)
    if name == "methods":
        return "\n\n".join(f"::: {module}" for module in _method_modules())
    if _importable(name):
        if name.startswith("precond_ref.adapters"):
            # The adapters' sources live in the top-level folder adapters/ and are installed under
            # another name, which griffe's static loader cannot follow: document them from there.
            source = name.replace("precond_ref.adapters", "adapters", 1)
            return f"::: {source}\n    options:\n      heading: {name}"
        return f"::: {name}"
    return (
        f'!!! note "Not in this version"\n    `{name}` is not part of the installed version of '
        "precond_ref yet; this page describes the method as specified."
    )


def on_page_markdown(markdown: str, page, config, files) -> str:
    return _MARKER.sub(_expand, markdown)
