"""The README's commands and examples are the ones CI and users run."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = [block.strip() for block in _bash_blocks()]
    assert len(commands) == 2, commands
    main_job, test_command = commands
    assert "python -m precond_ref compare" in main_job
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines


def test_readme_python_examples_run(capsys):
    """Every python block of the README runs as written, on its own, and prints what it did
    (a reader must see that it worked)."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
        printed = capsys.readouterr().out
        assert printed.strip(), f"this README example prints nothing:\n{block}"


def test_readme_results_are_generated_from_the_committed_json():
    """The results block is exactly what ``compare --readme`` renders from records/compare.json."""
    import json

    report = pytest.importorskip("precond_ref.compare.report")
    data = json.loads((ROOT / "records" / "compare.json").read_text())
    start, end = README.index(report.README_BEGIN), README.index(report.README_END) + len(report.README_END)
    assert README[start:end] == report.readme_section(data)
    assert data["settings"]["tune"] and len(data["settings"]["seeds"]) == 3  # the default run
    assert (ROOT / "docs" / "images" / "compare_loss_curves.png").exists()


def test_readme_performance_is_generated_from_the_committed_json():
    """The performance block is exactly what ``bench --readme`` renders from records/bench.json."""
    import json

    report = pytest.importorskip("precond_ref.benchmarks.report")
    data = json.loads((ROOT / "records" / "bench.json").read_text())
    assert data and set(data) <= set(report.README_KEYS)
    start, end = README.index(report.README_BEGIN), README.index(report.README_END) + len(report.README_END)
    assert README[start:end] == report.readme_section(data)


def test_readme_method_table_lists_every_method():
    """Every method factory of the library (RF-AdamW was missing) appears in the README's table."""
    from precond_ref.testing import available_methods

    table = README.split("## Set-up")[0]
    missing = [name for name in available_methods() if f"`pr.{name}`" not in table]
    assert missing == []


def test_readme_results_are_the_default_run_and_fit_in_five_minutes_on_two_cores():
    """The README shows the main job's own output (the default command,
    at most ``--readme`` and ``--out`` added), and that run needs less than 5 minutes of two
    otherwise idle cores (its CPU seconds, which do not depend on the machine's load: the main
    process's plus the workers' shared out over the two worker processes)."""
    import argparse
    import json
    import shlex

    compare = pytest.importorskip("precond_ref.compare")
    data = json.loads((ROOT / "records" / "compare.json").read_text())
    argv = shlex.split(data["command_line"])
    assert argv[:4] == ["python", "-m", "precond_ref", "compare"]
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(argv[4:])
    assert args.readme and {k: v for k, v in vars(args).items() if k not in ("readme", "out")} == {
        k: v for k, v in vars(parser.parse_args([])).items() if k not in ("readme", "out")
    }
    settings = data["settings"]
    assert settings["tune"] and len(settings["seeds"]) == 3 and settings["jobs"] == 2
    assert settings["methods"] == [entry.name for entry in compare.METHODS]
    assert data["cpu_s"]["quiet_wall_estimate"] < 300


def test_readme_is_one_screen_per_section_and_states_the_product():
    """The README: at most 220 lines (200, and then the state-dtype table and the links to
    each method's math), no part between headings longer than a screen (60 lines), and none of the contradictions a first reader met: the count of methods in words
    against the table's rows, a set-up "below" that is above, the plain PyPI torch called the CPU
    build, and internal words (issue numbers, temporary folders)."""
    lines = README.splitlines()
    assert len(lines) <= 220, len(lines)
    starts = [i for i, line in enumerate(lines) if line.startswith("#")] + [len(lines)]
    longest = max((b - a, lines[a]) for a, b in zip(starts, starts[1:]))
    assert longest[0] <= 60, longest
    intro = README.split("## Set-up")[0]
    rows = [line for line in intro.splitlines() if line.startswith("| ") and "`pr." in line]
    factories = sum(line.split("|")[3].count("`pr.") for line in rows)
    words = {9: "nine"}
    assert factories == 9 and f"of {words[factories]} structured" in intro
    assert "five ... optimizers" not in README and not re.search(r"\bfive\b[^.|]*optimizers", intro)
    use = README.split("## Use")[1]
    assert "set-up below" not in use and "test set-up above" in use
    assert "CPU build of torch" not in README and "the CUDA build" in README
    assert not re.search(r"\bissue \d+|/tmp/", README, flags=re.I)


def test_detail_pages_are_generated_from_the_committed_json():
    """docs/compare.md's and docs/performance.md's full tables are what ``compare --readme`` and
    ``bench --readme`` render from the same JSON as the README's short ones."""
    import json

    pages = [("precond_ref.compare.report", "compare.json", "compare.md"),
             ("precond_ref.benchmarks.report", "bench.json", "performance.md")]
    for module, data_name, page_name in pages:
        report = pytest.importorskip(module)
        data = json.loads((ROOT / "records" / data_name).read_text())
        page = (ROOT / "docs" / page_name).read_text()
        start, end = page.index(report.DETAIL_BEGIN), page.index(report.DETAIL_END) + len(report.DETAIL_END)
        assert page[start:end] == report.detail_section(data), page_name
