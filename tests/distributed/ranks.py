"""Spawning the ranks of a distributed torch test job: ``WORLD`` processes of one worker script,
each given ``rank world init_dir out_dir``, waited for with a timeout so that a hung collective
fails the test instead of the suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_ranks(script, world: int, out, *, timeout: int, what: str, env: dict | None = None) -> None:
    """Run ``script`` as ``world`` ranks (one intra-op thread each; ``env`` added to the
    environment); fail naming ``what`` if they outlive ``timeout`` seconds (all killed), or with a
    rank's log if it exits non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(out / "init"), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{what} hung (killed after {timeout} s)")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-6000:]}"
