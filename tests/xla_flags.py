"""XLA_FLAGS for the suite's compile time; imported by ``conftest.py`` before jax is.

Compile time is most of the suite's JAX time: every small jitted program, and every operation of
an eager step, compiles once (about 35-45 ms each on a CPU with XLA's defaults). Two XLA CPU
options halve that and keep the arithmetic (no fast-math either way; the suite's tolerances come
from the rounding model anyway):

- LLVM passes at level 0 (tests/adapters/test_jax_contract.py: 173 -> 130 s serial);
- the older, non-MLIR fusion emitters (a small operation's compile 45 -> 25 ms; the whole suite
  10m50 -> 7m35 on 2 cores). XLA's CPU runtime flushes subnormals in most operations under both
  (a sum, a division, a comparison); the one place the emitters differ for the core, an exact
  maximum of copies of a subnormal (``computed_once``), is tested with the default emitters
  (:data:`DEFAULT_EMITTERS`, per compilation).

A jaxlib that no longer knows an option (an unknown one in XLA_FLAGS aborts the process) runs the
suite without it: a probe in a fresh interpreter, about a second. The first interpreter decides;
pytest-xdist's workers and the suite's subprocesses inherit the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

FAST_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flag: str) -> bool:
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
    if _xla_knows(FAST_EMITTERS):
        _flags += " " + FAST_EMITTERS
    os.environ["XLA_FLAGS"] = _flags.strip()

#: ``compiler_options`` that compile one program with XLA's default emitters.
DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True} if FAST_EMITTERS in _flags else {}
