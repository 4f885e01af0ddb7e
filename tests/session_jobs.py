"""Helper (not collected): a job run in its own interpreter runs once per test session.

The tests of one module judge the saved results of one job (a multi-process run of
tests/distributed, the no-leaks sweeps); with ``pytest -n 2`` they are spread over both xdist
workers, each with its own module fixtures. ``run_once`` makes the first worker run
the job in the session's shared temporary root (under a file lock; ``filelock`` comes with torch)
and the others read what it saved.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

from filelock import FileLock


def run_once(tmp_path_factory, name: str, produce: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``produce(folder)`` once per session (across xdist workers); returns the folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one session
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            produce(folder)
            (folder / "done").touch()
    return folder


def json_lines_of(tmp_path_factory, name: str, script: str, what: str, env=None, timeout: int = 300) -> dict:
    """Runs ``python script`` once per session (``run_once``; ``env`` its environment, the suite's
    by default, killed after ``timeout`` seconds) and returns its JSON output lines by their
    ``"method"``: what the tests of ``name`` judge. ``what`` names the job in a failure."""
    import json
    import subprocess
    import sys

    import pytest

    def produce(out: pathlib.Path) -> None:
        try:
            run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} hung (killed after {timeout} s)")
        assert run.returncode == 0, run.stderr[-6000:]
        (out / "results.jsonl").write_text(run.stdout)

    out = run_once(tmp_path_factory, name, produce)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.startswith("{")]
    return {line["method"]: line for line in lines}
