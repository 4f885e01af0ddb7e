"""A griffe extension: render the reST bits of numpydoc docstrings as Markdown for mkdocstrings.

The library's docstrings follow NumPy/SciPy conventions (``:math:`...```, ``.. math::`` blocks,
``:func:`...``` roles), which mkdocstrings would show verbatim. This rewrites them to the
arithmatex math syntax and inline code before the docstring is parsed.
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE_REF = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):`~?([^`]+)`")


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            indent = line[: len(line) - len(line.lstrip())]
            body = [stripped[len(".. math::") :].strip()] if stripped[len(".. math::") :].strip() else []
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                block.append(lines[i])
                i += 1
            body += [b for b in textwrap.dedent("\n".join(block)).strip("\n").split("\n")]
            formula = "\n".join(body).strip()
            if "&" in formula or "\\\\" in formula:
                formula = "\\begin{aligned}\n" + formula + "\n\\end{aligned}"
            out += [indent + "$$", *[indent + f for f in formula.split("\n")], indent + "$$", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """Convert the reST constructs used in this library's docstrings to Markdown."""
    text = _math_blocks(text)
    text = _ROLE_MATH.sub(lambda m: "$" + m.group(1) + "$", text)
    text = _ROLE_REF.sub(lambda m: "`" + m.group(1) + "`", text)
    return text


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring as it is loaded."""

    def _convert(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # griffe >= 1
        self._convert(obj)
