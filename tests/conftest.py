"""Test configuration: JAX in float64 mode, backend fixtures, hypothesis profiles."""

from __future__ import annotations

import os

# One intra-op thread per test process (torch's OpenMP pool, MKL, OpenBLAS; inherited by the
# suite's subprocesses). The suite's tensors are tiny and pytest-xdist runs one worker per core:
# with each worker's pool as large as the machine, a parallel region waits for threads the other
# workers have descheduled, and the torch adapter tests ran several times slower than one thread.
# Set before numpy and torch are imported (they size their pools at import); an explicit
# OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# TorchInductor's first CPU kernel of a process picks the vector instruction set from the CPU's
# flags after compiling and loading a test program for each candidate (a g++ build per
# candidate, made again for every fresh inductor cache). With this set it takes the CPU's flags as
# they stand and picks the same instruction set wherever the compiler supports what the CPU
# reports; the suite's inductor kernels are then built without the probes. Set before torch is
# imported (inductor reads it at import); an explicit value is kept.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import xla_flags  # noqa: E402,F401 - sets XLA_FLAGS (compile time) before jax is imported

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from backends import BACKENDS, PROPERTY_BACKENDS  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request):
    """Every backend the core must run on (CuPy only where a GPU is usable)."""
    return request.param


@pytest.fixture(params=PROPERTY_BACKENDS, ids=lambda b: b.name)
def property_backend(request):
    """The float64 backends property tests run on: numpy and array_api_strict."""
    return request.param


@pytest.fixture
def own_objects_collected():
    """The objects that exist before the test are frozen out of the cyclic collector's view until
    it ends, so that its ``gc.collect()`` calls walk only what the test made, which holds whatever
    they are to free (a suite worker's heap reaches millions of objects, compiled programs' caches:
    each full collection walked them, seconds each). Garbage made before the test is collected
    after it."""
    import gc

    gc.freeze()
    yield
    gc.unfreeze()


#: Files holding the suite's longest single tests (a spawned worker, a torch.compile of a whole
#: step, a long run), collected first. pytest-xdist's worksteal scheduler hands each worker a
#: contiguous share of the collection and an idle worker steals from the end of another's: with
#: these at the front, no long test is left to start when the other worker has nothing left.
LONGEST_FIRST = (
    "tests/distributed/test_jax_sharding.py",
    "tests/adapters/test_path_equivalence.py",
    "tests/adapters/test_torch_compile_recipe.py",
    "tests/adapters/test_torch_compile.py",
    "tests/test_soak.py",
    "tests/test_backend.py",
    "tests/peers/test_peer_heavyball.py",
    "tests/test_docs.py",
    "tests/distributed/test_torch_distributed.py",
    "tests/test_reproduce.py",
)


def pytest_collection_modifyitems(config, items):
    """Moves the files of :data:`LONGEST_FIRST` to the front, in that order; each file's tests stay
    together and in their order (module-scoped fixtures are set up once)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath

    def key(item):
        path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the rest keep the collection's order
