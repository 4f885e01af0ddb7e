"""XLA_FLAGS for the suite's compile time; imported by ``conftest.py`` before jax is.

Compile time is most of the suite's JAX time: every small jitted program, and every operation of
an eager step, compiles once. Three XLA CPU options shorten it and keep the arithmetic (no
fast-math either way; the suite's tolerances come from the rounding model anyway):

- LLVM passes at level 0;
- the older, non-MLIR fusion emitters. XLA's CPU runtime flushes subnormals in most operations
  under both (a sum, a division, a comparison); the one place the emitters differ for the core,
  an exact maximum of copies of a subnormal (``computed_once``), is tested with the default
  emitters (:data:`DEFAULT_EMITTERS`, per compilation);
- one LLVM module per program (``ONE_MODULE``) rather than XLA's split into several compiled on
  parallel threads: the same code, compiled in one piece; for the suite's small programs, on
  workers that already fill the cores, the split's set-up costs more than its parallelism saves.

What each saves is measured in ``records/`` (suite-2026-12-01b for the third). A jaxlib that no
longer knows an option (an unknown one in XLA_FLAGS aborts the process) runs the suite without it:
a probe in a fresh interpreter, about a second. The first interpreter decides; pytest-xdist's
workers and the suite's subprocesses inherit the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

FAST_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
ONE_MODULE = "--xla_cpu_parallel_codegen_split_count=1"


def _xla_knows(flag: str) -> bool:
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
    _optional = [FAST_EMITTERS, ONE_MODULE]
    _known = _optional if _xla_knows(" ".join(_optional)) else [f for f in _optional if _xla_knows(f)]
    _flags += "".join(" " + f for f in _known)
    os.environ["XLA_FLAGS"] = _flags.strip()

#: ``compiler_options`` that compile one program with XLA's default emitters.
DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True} if FAST_EMITTERS in _flags else {}
