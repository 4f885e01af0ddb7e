"""The documentation site builds without warnings, and every code example in it runs.

``test_site_builds_strictly`` runs ``mkdocs build --strict`` (skipped when mkdocs-material or
mkdocstrings are not installed: the ``docs`` extra) and checks that the site is self-contained: the
math is rendered to MathML at build time and no page loads a script or stylesheet from the network.
The other tests extract the fenced code blocks of every page under ``docs/``: each ``python`` block
runs on its own (a fresh namespace, as a reader who copies just that block), in a temporary
directory, unless the text since the previous block or the block's first line says it continues
(the phrase :data:`CONTINUES`), in which case it runs after that block in the same namespace; shell blocks run
their ``python -m precond_ref ...`` lines through the command-line entry point. A block preceded
by ``<!-- docs-test: requires NAME -->`` is skipped while ``precond_ref.NAME`` does not exist
(method pages written before the method landed); one preceded by ``<!-- docs-test: imports
MODULE ... -->`` is skipped while one of those modules is not installed (the framework pages);
one preceded by ``<!-- docs-test: known-failure ERROR: reason -->`` must raise ``ERROR`` (a
strict expected failure: the test fails once the block runs, so that the marker is removed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import io
import os
import math
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from loading import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
_BLOCK = re.compile(r"((?:<!-- docs-test: [^\n]*? -->\n)*)```(\w+)\n(.*?)```", re.S)
_MARK = re.compile(r"<!-- docs-test: ([\w-]+) (.*?) -->")
# What a page says, in the prose before a block, when the block needs the one before it.
CONTINUES = "continues the example above"


def _blocks(page: pathlib.Path) -> list[tuple[str, str, str | None, bool, dict]]:
    """``(language, code, required name, continues, other markers)`` for every fenced block."""
    text = page.read_text()
    blocks, previous_end = [], 0
    for match in _BLOCK.finditer(text):
        marks, lang, code = match.groups()
        marks = dict(_MARK.findall(marks))
        req = marks.pop("requires", None)
        # Said in the prose since the previous block, or in the block's first line (a comment).
        said = " ".join((text[previous_end : match.start()] + " " + code.split("\n", 1)[0]).split()).lower()
        continues = CONTINUES in said
        blocks.append((lang, code, req or None, continues, marks))
        previous_end = match.end()
    return blocks


def test_every_page_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, f"{page} is not in mkdocs.yml's nav"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """``mkdocs build --strict`` of the documentation: ``(return code, its output, the site folder)``.
    Skipped when the docs extra (mkdocs-material, mkdocstrings[python]) is not installed."""
    if not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")):
        pytest.skip("the docs extra (mkdocs-material, mkdocstrings[python]) is not installed")
    site = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr, site


def test_site_builds_strictly(built_site):
    returncode, output, site = built_site
    assert returncode == 0, output
    assert "WARNING" not in output, output
    # Reported at INFO level, so --strict lets them pass: links to files that are no page of the
    # site (records/ folders) and anchors that do not exist.
    assert "unrecognized relative link" not in output and "does not contain an anchor" not in output, output
    assert (site / "validating" / "index.html").exists()
    # Self-contained: the equations are MathML in the HTML (no MathJax/KaTeX from a CDN), none is
    # left as TeX source, and nothing is loaded from the network.
    remote = re.compile(r"<(?:script|link)[^>]*(?:src|href)=\"(?:https?:)?//[^\"]*\"[^>]*>")
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert not remote.findall(text) or all("rel=\"canonical\"" in tag for tag in remote.findall(text)), (html, remote.findall(text))
        assert "\\(" not in text and "\\[" not in text, f"{html}: TeX left unrendered"
    agd = (site / "methods" / "agd" / "index.html").read_text()
    assert agd.count("<math") >= 10 and 'class="arithmatex"' in agd
    # Inside an aligned system, '&' is alignment, never text, and '\\' starts a row.
    aligned = 0
    for html in site.rglob("*.html"):
        for math_ml in re.findall(r"<math.*?</math>", html.read_text(), re.S):
            assert not _BARE_AMPERSAND.search(math_ml), f"{html}: a literal '&' in rendered math: {math_ml[:300]}"
            aligned += "<mtable" in math_ml
    assert aligned >= 5  # the method pages' aligned systems, as tables
    # Every module an API marker names is in this version: mkdocstrings renders it (its heading's
    # id; the adapters are documented from adapters/), never the hook's "Not in this version" note.
    pages = "".join(html.read_text() for html in site.rglob("*.html"))
    assert "Not in this version" not in pages
    for page in PAGES:
        for name in re.findall(r"^<!-- api: (precond_ref[\w.]*) -->$", page.read_text(), re.M):
            assert f'id="{name.replace("precond_ref.adapters", "adapters", 1)}"' in pages, (page, name)


# Words of the project's working history, which the documentation of the product does not use: the
# sessions and runs that measured something, issue and pull-request numbers, commit ids, dated run
# folders. Run records live in records/ (outside the site) and the history in CHANGELOG.md.
NOTEBOOK_WORDS = {
    "a session": re.compile(r"\bsessions?\b", re.I),
    "an issue": re.compile(r"\bissue\s*#?\d+|\bissues\s+#\d+|\b(?:PR|pull request)\s*#?\d+|\bthe (?:\w+ )?issue(?:'s)?\b", re.I),
    "a #number": re.compile(r"(?<![&\w])#\d+\b"),
    "a commit id": re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b|\b(?:commit|main)\s+[0-9a-f]{7,40}\b"),
    "a date": re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    "a numbered run": re.compile(
        r"\b(?:second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\w+teenth|next)"
        r"\s+(?:(?:GPU|CPU|H100|H200)\s+)?(?:runs?|sessions?)\b", re.I),
}
#: The authors' code that faithful modes reproduce, pinned by commit (a method page names its
#: reference code this way): the one kind of commit id the product's documentation states.
UPSTREAM_COMMITS = {
    "intelligent-machine-learning/atorch": "7fb7da86be5794c57440db5b96f3278c158f0c7a",
    "intelligent-machine-learning/dlrover": "b5406a7",
    "infinity-stars/ASGO": "d3ef14beb8b3e5489e1ed9eb0a2a59565ac362ca",
    "google-research/precondition": "239a8cda03e243b8119a8e672893b7e6acc18c37",
    "yorkerlin/remove-the-square-root": "e26d7c917c2cd9e89214fbc018aa67404997cd32",
    "yorkerlin/remove-the-square-root, RF-AdamW": "c8d43f2",
    "f-dangel/sirfshampoo": "7bc5eaf4bca5b908dc36c4f83da73784a4f2b41d",
    "f-dangel/singd": "1ac69a3",
    "achrafba96/mbf": "b0ace6e18e6e861af97fcc6ff9720c42b6f4d092",
}


def notebook_words(text: str) -> list[tuple[str, str]]:
    """``(kind, the text around it)`` for each of :data:`NOTEBOOK_WORDS` in a page's visible text
    (an id of :data:`UPSTREAM_COMMITS` is not one)."""
    import html

    text = re.sub(r"<(script|style|math)\b.*?</\1>", " ", text, flags=re.S | re.I)
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    upstream = lambda word: any(pin.startswith(word) for pin in UPSTREAM_COMMITS.values())  # noqa: E731
    return [(kind, text[max(m.start() - 40, 0): m.end() + 40]) for kind, pattern in NOTEBOOK_WORDS.items()
            for m in pattern.finditer(text) if not (kind == "a commit id" and upstream(m.group(0).split()[-1]))]


def test_the_built_site_documents_the_product_not_its_history(built_site):
    """The site documents the product as it is: every built page's visible text (markup and math
    left out) has none of :data:`NOTEBOOK_WORDS`; the measurements such words named are linked in
    records/."""
    returncode, output, site = built_site
    assert returncode == 0, output
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    found = {str(page.relative_to(site)): hits for page in pages if (hits := notebook_words(page.read_text()))}
    assert not found, "\n".join(f"{page}: {kind}: ...{around}..." for page, hits in found.items() for kind, around in hits)


def test_notebook_words_are_found_where_they_are():
    """The detector finds each kind of word in a page's text and passes the product's own words."""
    history = ("<p>the fifteenth session</p> <p>issue 53's aim, the GPU issue's target</p> <p>see #35</p> <p>at main 1782535</p>"
               "<p>commit 8ceb254a</p> <p>records/gpu-h100-2026-11-28-10</p> <p>the tenth GPU run</p>")
    assert {kind for kind, _ in notebook_words(history)} == set(NOTEBOOK_WORDS)
    product = ('<p>Adam&#39;s step, 1024x1024 layers, a 3e-4 rate, 12345678 parameters, a step issues 195 operations, '
               'atorch at 7fb7da8, <a href="https://x/records/gpu-h100-2026-11-28-10">the run record</a>, '
               '<math>deadbeef1</math></p>')
    assert notebook_words(product) == []


#: The kinds of :data:`NOTEBOOK_WORDS` the code itself must not state either (its comments,
#: docstrings and messages say what the code does and why; the history is the git log's, the
#: measurements records/'s). A session (a training session), a hexadecimal word and a #number (a
#: colour) are code's own.
CODE_HISTORY_WORDS = ("an issue", "a date", "a numbered run")


def test_the_code_states_no_history():
    """The package, the adapters, the examples and the tests name no issue, pull request, date or numbered
    run (:data:`CODE_HISTORY_WORDS`) in their source (each kind found by the same pattern as on the
    site, :func:`test_notebook_words_are_found_where_they_are`)."""
    found = []
    for folder in ("precond_ref", "adapters", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == pathlib.Path(__file__).resolve():  # this file's examples of the words
                continue
            text = path.read_text(encoding="utf-8")
            for kind in CODE_HISTORY_WORDS:
                for m in NOTEBOOK_WORDS[kind].finditer(text):
                    line = text.count("\n", 0, m.start()) + 1
                    found.append(f"{path.relative_to(ROOT)}:{line}: {kind}: {text[max(m.start() - 30, 0): m.end() + 30]!r}")
    assert not found, "\n".join(found)


# An '&' in MathML that is not an entity (&#x0003D;, &amp;): a TeX alignment mark printed as text.
_BARE_AMPERSAND = re.compile(r"&(?![#\w]+;)")


def _hooks():
    return load_file("docs_hooks", DOCS / "hooks.py")


def test_aligned_math_renders_as_a_table_without_literal_ampersands():
    """Latex2mathml has no ``aligned`` environment; it printed each alignment '&'
    as a literal and dropped the ``\\`` row breaks, so every method page's system of equations
    came out on one line. The hook renders it as an <mtable>: one <mtr> per row, the cells split at
    '&' and aligned right, left, right, ... like TeX's aligned."""
    pytest.importorskip("latex2mathml")
    mathml = _hooks().render_math(r"\begin{aligned} m_t &= a, \qquad b = c, \\ \theta &= d - e \end{aligned}", display=True)
    assert not _BARE_AMPERSAND.search(mathml) and "linebreak" not in mathml
    rows = re.findall(r"<mtr>(.*?)</mtr>", mathml, re.S)
    assert len(rows) == 2
    for row in rows:
        assert re.findall(r'<mtd columnalign="(\w+)"', row) == ["right", "left"]
        # as CSS too: Chromium ignores columnalign and centred the cells ('=' drifting row by row)
        assert re.findall(r'<mtd columnalign="\w+" style="text-align: (\w+)"', row) == ["right", "left"]
    # Every aligned system the docs contain renders the same way.
    for page in PAGES:
        for latex in re.findall(r"\$\$(.*?)\$\$", page.read_text(), re.S):
            rendered = _hooks().render_math(latex.strip(), display=True)
            assert not _BARE_AMPERSAND.search(rendered), (page, latex)


def test_the_sites_readme_page_is_the_readme_with_working_links():
    """The docs' README page was a stub; it now renders the repository's README,
    every relative link rewritten to where it leads from docs/readme.md (docs/X -> X, any other
    file of the repository -> GitHub), and each rewritten site link names a file of docs/."""
    hooks = _hooks()
    page = hooks.on_page_markdown((DOCS / "readme.md").read_text(), None, {"docs_dir": str(DOCS)}, None)
    readme = (ROOT / "README.md").read_text()
    for heading in re.findall(r"^## .*$", readme, re.M):
        assert heading in page
    for target in re.findall(r"\]\(([^)\s]+)\)", page):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (DOCS / target.split("#")[0]).exists(), target


def _run_shell_block(code: str) -> None:
    from precond_ref.cli import main

    for line in code.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("python -m precond_ref "):
            argv = shlex.split(line)[3:]
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) == 0, line


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_code_examples_run(page, tmp_path, monkeypatch):
    import precond_ref

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    everything: dict = {}  # every name any block defined, for the page-specific checks below
    ran = skipped = 0
    for lang, code, required, continues, marks in _blocks(page):
        if required is not None and not hasattr(precond_ref, required):
            skipped += 1
            continue
        if any(importlib.util.find_spec(m) is None for m in marks.get("imports", "").split()):
            skipped += 1
            continue
        if lang == "python" and not continues:
            namespace = {"__name__": "__docs__"}  # a reader may copy this block alone
        if lang == "python" and "known-failure" in marks:
            error, reason = marks["known-failure"].split(":", 1)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(code, str(page), "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - the type is checked next
                assert type(exc).__name__ == error, f"{page}: expected {error} ({reason.strip()}), got {exc!r}"
            else:
                pytest.fail(f"{page}: a block marked known-failure ({reason.strip()}) now runs: remove the marker")
            ran += 1
        elif lang == "python":
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, str(page), "exec"), namespace)
            everything.update(namespace)
            ran += 1
        elif lang == "bash":
            _run_shell_block(code)
    if page.name == "validating.md":
        _check_documented_report(page, everything)
    if ran == 0 and skipped:
        pytest.skip(f"{skipped} example(s) need methods not in this version or frameworks not installed")


def _number(word: str):
    try:
        return float(word.strip(",();"))
    except ValueError:
        return None


def _check_documented_report(page: pathlib.Path, namespace: dict) -> None:
    """The done-criterion: the broken plain-PyTorch AGD is caught at the documented step and
    parameter, and the report printed on the page is the one the code produces."""
    report = namespace["report"]
    first = report.first_divergence
    assert (first.step, first.path, first.index) == (2, "fc1/bias", (0,))
    shown = re.search(r"```text\n(.*?)```", page.read_text(), re.S).group(1).strip().splitlines()
    actual = str(report).splitlines()
    assert len(shown) == len(actual)
    # Rows before the divergence hold rounding noise (float64, a few ulps of values ~1e-1): their
    # digits depend on the CPU's BLAS kernels, so they are checked against the report's tolerance,
    # not digit for digit. From the divergence on, the printed 4 significant digits must match.
    noise = 1e3 * 2.0**-52
    for row, (want, got) in enumerate(zip(shown, actual)):
        want_words, got_words = want.split(), got.split()
        assert len(want_words) == len(got_words), (want, got)
        before_divergence = 2 <= row < 2 + first.step
        for w, g in zip(want_words, got_words):
            w_num, g_num = _number(w), _number(g)
            if w_num is None or g_num is None:
                assert w == g, (want, got)
            elif before_divergence and w_num < 1e-10:
                assert g_num <= noise, (want, got)
            else:
                assert math.isclose(w_num, g_num, rel_tol=1e-3, abs_tol=noise), (want, got)
    assert namespace["prt"].compare_trajectories(namespace["reference"], namespace["fixed"]).ok


def test_tables_have_whole_rows():
    """A Markdown table row is one line with as many cells as its header: a control character
    written by an unescaped backslash (``\\rho`` in a Python string became a carriage return and
    "ho") split mbf.md's row in two. Pipes inside code spans and math are not cell separators."""
    for page in PAGES:
        lines = page.read_text().split("\n")
        assert not any(c in page.read_text() for c in "\r\t\f\v\b"), f"{page}: a control character"
        for k, line in enumerate(lines[1:], 1):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
                continue  # k is a table's delimiter row: its header is above, its body below
            width = _cells(lines[k - 1])
            for row in itertools.takewhile(lambda text: text.startswith("|"), lines[k + 1:]):
                assert _cells(row) == width, f"{page}: {row!r} has {_cells(row)} cells, the header {width}"


def test_method_pages_allow_the_learning_rates_the_factories_take():
    """Where a method page's hyperparameter table has an "allowed" column, ``learning_rate`` is
    "≥ 0 or schedule", as every factory takes: 0 (where a scheduler ends) builds, a negative rate
    does not."""
    import precond_ref as pr

    rows = []
    for page in sorted((DOCS / "methods").glob("*.md")):
        lines = page.read_text().split("\n")
        for k, line in enumerate(lines):
            if line.startswith("| argument | default | allowed |"):
                body = itertools.takewhile(lambda text: text.startswith("|"), lines[k + 2:])
                rows += [(page.name, row) for row in body if row.startswith("| `learning_rate` |")]
    assert {name for name, _ in rows} == {"agd.md", "asgo.md"}, rows
    for name, row in rows:
        assert row.split("|")[3].strip() == "≥ 0 or schedule", (name, row)
    for factory in (pr.agd, pr.asgo, pr.dasgo, pr.sketchy, pr.s_adagrad, pr.mbf):
        factory(learning_rate=0.0)
        with pytest.raises(ValueError, match="learning_rate"):
            factory(learning_rate=-1e-3)
    for factory in (pr.rf_rmsprop, pr.rf_adamw, pr.if_shampoo):
        factory(learning_rate=0.0, batch_size=4)
        with pytest.raises(ValueError, match="learning_rate"):
            factory(learning_rate=-1e-3, batch_size=4)


def _cells(row: str) -> int:
    row = re.sub(r"`[^`]*`|\$[^$]*\$|\\\|", "", row.strip())
    return row.strip("|").count("|") + 1


def test_one_version_everywhere():
    """The version in pyproject.toml is the package's ``__version__`` and the changelog's newest
    release, and no torch argument is marked as added in a later release than it, but the next
    minor release while the changelog has unreleased changes (an argument added since)."""
    import precond_ref

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    newest = re.search(r"^## \[(\d[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert declared == precond_ref.__version__ == newest
    version = tuple(map(int, declared.split(".")))
    since = set(re.findall(r'since="([\d.]+)"', (ROOT / "adapters" / "torch.py").read_text()))
    assert since  # the table marks the arguments added after the first release
    unreleased = re.search(r"^## \[Unreleased\]", (ROOT / "CHANGELOG.md").read_text(), re.M) is not None
    latest = (version[0], version[1] + 1, 0) if unreleased else version
    assert all(tuple(map(int, s.split("."))) <= latest for s in since), since
