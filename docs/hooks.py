"""MkDocs hook: API sections that follow what the installed library actually contains.

``<!-- api: precond_ref.methods.asgo -->`` becomes the mkdocstrings directive ``::: ...`` when the
installed library has the module, and a note otherwise, so the method pages can be written before
every method module exists and the site still builds without warnings. ``<!-- api: methods -->``
expands to a list of links to the method pages, one per module of :mod:`precond_ref.methods`.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import re

_MARKER = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)


def _in_library(name: str) -> bool:
    """Whether the installed library has the module ``name``: found, not imported. griffe reads the
    sources, so the build need not import the frameworks the adapters import (torch, jax)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def _method_modules() -> list[str]:
    import precond_ref.methods as methods

    return [f"precond_ref.methods.{m.name}" for m in pkgutil.iter_modules(methods.__path__) if not m.name.startswith("_")]


def _expand(match: re.Match) -> str:
    name = match.group(1)
    if name == "methods":
        # Each method module is rendered once, on its own method page (rendering it here too
        # would give its objects two primary URLs, which autorefs refuses in strict mode).
        return "\n".join(
            f"- [`{module}`](../methods/{module.rsplit('.', 1)[1]}.md)" for module in _method_modules()
        )
    if _in_library(name):
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


# ``<!-- readme -->`` (docs/readme.md) becomes the repository's README.md, its links rewritten for
# the site: docs/X -> X, any other file of the repository -> its page on GitHub.
_README_MARKER = re.compile(r"^<!-- readme -->$", re.MULTILINE)
REPOSITORY = "https://github.com/precond-ref/precond_ref/blob/main/"
_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)\s]+)\)")


def readme_for_site(text: str) -> str:
    """The README with its links pointing where they lead from docs/readme.md."""

    def link(match: re.Match) -> str:
        target = match.group(1)
        return f"]({target[len('docs/'):]})" if target.startswith("docs/") else f"]({REPOSITORY}{target})"

    return _LINK.sub(link, text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if _README_MARKER.search(markdown):
        import pathlib

        readme = (pathlib.Path(config["docs_dir"]).parent / "README.md").read_text(encoding="utf-8")
        markdown = _README_MARKER.sub(lambda _: readme_for_site(readme), markdown)
    return _MARKER.sub(_expand, markdown)


# ---------------------------------------------------------------------------------------------
# Math rendered at build time: pymdownx.arithmatex (generic mode) leaves \( ... \) and \[ ... \]
# in spans and divs of class "arithmatex"; they become MathML here, which browsers render
# natively, so the site needs no JavaScript and no network access for its equations.

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<display>.*?)\\\])\s*</(?P=tag)>',
    re.S,
)


# latex2mathml has no `aligned` (nor `align`, `split`) environment: it used to print each `&` as a
# literal "&" and turn `\\` into a MathML line break that browsers ignore, so a system of
# equations came out on one line. Such an environment becomes an `array` with the same alignment
# (columns right, left, right, left, ...), which latex2mathml renders as an <mtable>.
_ALIGNED = re.compile(r"\\begin\{(aligned|align\*?|split)\}(.*?)\\end\{\1\}", re.S)


def _aligned_as_array(match: re.Match) -> str:
    body = match.group(2)
    columns = max(row.count("&") for row in re.split(r"\\\\", body)) + 1
    spec = "".join("rl"[k % 2] for k in range(columns))
    return f"\\begin{{array}}{{{spec}}}{body}\\end{{array}}"


def render_math(latex: str, display: bool) -> str:
    """The MathML of one formula (aligned environments as tables; see above).

    A table cell's alignment is also given as CSS: Chromium's MathML Core ignores ``columnalign``
    and centres every cell, so the left cells that start with "=" drifted row by row."""
    from latex2mathml.converter import convert

    mathml = convert(_ALIGNED.sub(_aligned_as_array, latex), display="block" if display else "inline")
    return re.sub(r'<mtd columnalign="(left|right|center)"', r'<mtd columnalign="\1" style="text-align: \1"', mathml)


def _to_mathml(match: re.Match, where: str) -> str:
    import html

    display = match.group("display") is not None
    latex = html.unescape(match.group("display") if display else match.group("inline")).strip()
    try:
        mathml = render_math(latex, display)
    except Exception as err:  # noqa: BLE001 - any converter failure is a build error naming the formula
        raise ValueError(f"{where}: cannot render the math {latex!r} to MathML ({type(err).__name__}: {err})") from err
    if re.search(r"&(?![#\w]+;)", mathml) or "linebreak" in mathml:
        raise ValueError(f"{where}: the math {latex!r} renders with a literal '&' or a dropped line break")
    tag = "div" if display else "span"
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'


def on_page_content(html_text: str, page, config, files) -> str:
    return _MATH.sub(lambda m: _to_mathml(m, page.file.src_path), html_text)
