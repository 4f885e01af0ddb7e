"""What every ``bench`` measurement shares: the contenders, the clock, the baselines, the machine.

A *contender* is one row of a table: a method entry of :mod:`precond_ref.compare.methods` at its
bench settings, or one of its variants (:data:`VARIANTS`: another mode, root, interval or factor
dtype of the same method). A measurement runs ``step(i)`` through :func:`time_steps`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from ..cli import UserError
from ..compare.methods import BENCH_ONLY, METHODS, MethodEntry

__all__ = [
    "Contender", "VARIANTS", "contenders", "refresh_period", "time_steps", "state_bytes", "core_kwargs_for",
    "torch_optimizer", "jax_optimizer", "update_extra", "stepping", "machine", "jsonable", "BUDGET_S",
]

# Seconds of timed steps one measurement may take: the window of steps stops there (and says so).
BUDGET_S = 10.0
#: A window of ``repeats`` sub-millisecond steps is a sample of a few milliseconds, which a burst of
#: load elsewhere on the machine decides (docs/performance-archive.md): short steps are timed for
#: at least this long, up to ``MAX_WINDOW_STEPS`` steps.
MIN_WINDOW_S = 1.0
MAX_WINDOW_STEPS = 1000

def authors_asgo_split(path: tuple, leaf: Any) -> bool:
    """The authors' ASGO trainer's split: all but matrices, and embeddings, go to the fallback Adam
    (their optimizer accepts only matrices)."""
    return leaf.ndim != 2 or any("emb" in str(key) for key in path)


# Other settings of the same method, timed with ``--variants`` (the former benchmarks/bench_*.py
# scripts' rows). Values are core keyword arguments; a dtype is named by a string and resolved in
# each framework's namespace. Faithful modes have no blocking (the authors' code has none).
VARIANTS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "asgo": (
        ("polar-express root", {"root_method": "polar_express"}),
        ("root every 10", {"precondition_every": 10}),
        ("faithful", {"mode": "faithful", "fallback_mask": authors_asgo_split}),
    ),
    "sketchy": (
        ("gram", {"decomposition": "gram"}),
        ("incremental gram", {"decomposition": "incremental_gram"}),
        ("subspace", {"decomposition": "subspace"}),
        ("every 10", {"precondition_every": 10}),
        ("faithful", {"mode": "faithful", "block_size": None}),
    ),
    "s_adagrad": (
        ("secular", {"decomposition": "incremental_secular"}),
        ("every 3", {"precondition_every": 3}),
        ("faithful", {"mode": "faithful", "block_size": None}),
    ),
    "if_shampoo": (
        ("every 10", {"precondition_every": 10}),
        ("bf16 factors", {"factor_dtype": "bfloat16"}),
        ("diagonal", {"structures": "diagonal"}),
        ("faithful", {"mode": "faithful"}),
    ),
}
_DTYPE_ARGUMENTS = ("factor_dtype", "state_dtype")


@dataclasses.dataclass(frozen=True)
class Contender:
    """One timed optimizer: ``entry`` at ``entry.bench_kwargs()``, which include the variant's settings."""

    entry: MethodEntry
    variant: Optional[str] = None

    @property
    def label(self) -> str:
        return self.entry.label if self.variant is None else f"{self.entry.label} ({self.variant})"

    @property
    def key(self) -> str:
        return self.entry.name if self.variant is None else f"{self.entry.name}[{self.variant}]"


def contenders(spec: str, with_variants: bool) -> tuple[list[Contender], list[dict]]:
    """The contenders named by ``--methods`` (every method, RF-AdamW included, by default), and skip notes."""
    from ..compare import resolve_methods

    methods = [e for e in METHODS + BENCH_ONLY if not e.is_baseline]
    baselines = {alias.lower() for e in METHODS + BENCH_ONLY if e.is_baseline for alias in (e.name, e.label)}
    given = [name.strip() for name in spec.split(",") if name.strip().lower() in baselines]
    if given:
        raise UserError(
            f"--methods {', '.join(given)}: a baseline, not a method to time (bench measures its baselines, "
            f"AdamW and Adam, in every run); --methods takes: {', '.join(e.name for e in methods)}"
        )
    entries, skipped = resolve_methods(spec, table=methods)
    out = []
    for entry in entries:
        out.append(Contender(entry))
        if with_variants:
            for suffix, overrides in VARIANTS.get(entry.name, ()):
                changed = dataclasses.replace(entry, bench_hyperparameters={**entry.bench_hyperparameters, **overrides})
                out.append(Contender(changed, suffix))
    return out, skipped


def refresh_period(entry: MethodEntry) -> int:
    """The longest interval (``*_every``) of the entry's settings, its factory's defaults included.

    A window of this many consecutive steps holds each kind of step (plain, statistics, refresh)
    as often as training does, so its mean is the amortised step time.
    """
    import precond_ref

    factory = getattr(precond_ref, entry.factory)
    defaults = {
        name: p.default for name, p in inspect.signature(factory).parameters.items() if p.default is not inspect.Parameter.empty
    }
    settings = {**defaults, **entry.bench_kwargs()}
    module = sys.modules[factory.__module__]  # a None default: the module's PRINCIPLED_<NAME> (ASGO)
    settings = {k: getattr(module, f"PRINCIPLED_{k.upper()}", None) if v is None else v for k, v in settings.items()}
    periods = [v for k, v in settings.items() if k.endswith("_every") and isinstance(v, int) and not isinstance(v, bool)]
    return max([1, *periods])


def steps_until_every_pattern(entry: MethodEntry, horizon: int = 1024) -> int:
    """How many first steps hold every pattern of the entry's interval decisions
    (``Transform.due``) that its first ``horizon`` steps hold: a compiled step compiles one graph
    per recurring pattern (a pattern made once runs eagerly), so these steps hold every
    compilation. ASGO (T = 2, spread): 3; MBF at the
    bench's settings: 201 (its spread inverse phases first fall due one by one after the warm-up
    of T2 = 100 calls, the last on call 200)."""
    import precond_ref
    import torch

    from precond_ref.adapters._torch_compile import due_pattern_steps

    transform = getattr(precond_ref, entry.factory)(**core_kwargs_for(entry, torch, "torch"))
    return max(due_pattern_steps(transform, horizon).values()) + 1


def core_kwargs_for(entry: MethodEntry, namespace: Any, framework: str) -> dict:
    """``entry.bench_kwargs()`` with dtype names resolved in ``namespace`` (``ValueError`` if it has none)."""
    kwargs = entry.bench_kwargs()
    for name in _DTYPE_ARGUMENTS:
        value = kwargs.get(name)
        if isinstance(value, str):
            if not hasattr(namespace, value):
                raise ValueError(f"{framework} has no {value} dtype (needed by {name}={value!r})")
            kwargs[name] = getattr(namespace, value)
    return kwargs


def update_extra(contender: Contender, batch_size: int) -> dict:
    """The per-call arguments of ``update`` / ``step``: ``batch_size`` for the methods that need B."""
    return {"batch_size": batch_size} if "batch_size" in contender.entry.update_kwargs else {}


def stepping(method: str, named: list, grads: list, batch_size: int, torch_compile: str = "default") -> Callable[[int], None]:
    """``step(i)``: each parameter's ``.grad`` set to ``grads[i % len(grads)]`` (lists in ``named``'s
    order), then one ``step`` of the bench's torch optimizer of ``method`` (its hyperparameters,
    ``torch_compile`` as bench's flag, ``batch_size`` for the methods that need B): the optimizer
    step alone, on fixed gradients."""
    (contender,), _ = contenders(method, False)
    optimizer, _ = torch_optimizer(contender, named, torch_compile)
    extra = update_extra(contender, batch_size)

    def step(i: int) -> None:
        for (_, p), g in zip(named, grads[i % len(grads)]):
            p.grad = g
        optimizer.step(**extra)

    return step


def jax_optimizer(contender: Contender) -> Any:
    """Our optax transformation for ``contender``."""
    import jax.numpy as jnp

    from precond_ref.adapters import jax as jax_adapters

    return getattr(jax_adapters, contender.entry.factory)(**core_kwargs_for(contender.entry, jnp, "jax"))


def time_steps(
    step: Callable[[int], Any],
    sync: Callable[[], None],
    *,
    warmup: int,
    repeats: int,
    period: int = 1,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
    min_window_s: float = 0.0,
) -> dict:
    """Time ``step(0), step(1), ...``; the device is synchronised around every timed step.

    The first step is timed on its own (it holds compilation, tracing and state allocation); the
    next ``warmup - 1`` are timed together with it (``warmup_ms``: a compiled step that compiles a
    graph per pattern of interval decisions compiles them there); then a window of
    ``max(repeats, period)`` steps is, so that its mean includes each periodic refresh as often as
    training does. The window stops early once
    its steps have taken ``budget_s`` seconds (``covers_period`` is then false when it stopped short
    of ``period`` steps: its mean misses refresh steps), and goes on by whole periods while its
    steps have taken less than ``min_window_s`` and number fewer than ``MAX_WINDOW_STEPS``.
    """
    sync()
    start = clock()
    step(0)
    sync()
    first = clock() - start
    for i in range(1, warmup):
        step(i)
    sync()
    warm = clock() - start
    window = max(repeats, period)
    times: list[float] = []
    elapsed = 0.0
    while elapsed < budget_s:
        start = clock()
        step(warmup + len(times))
        sync()
        times.append(clock() - start)
        elapsed += times[-1]
        n = len(times)
        if n >= window and n % period == 0 and (elapsed >= min_window_s or n >= max(window, MAX_WINDOW_STEPS)):
            break
    return {
        "first_step_ms": 1e3 * first,
        "warmup_ms": 1e3 * warm,
        "warmup_steps": max(warmup, 1),
        "median_ms": 1e3 * statistics.median(times),
        "mean_ms": 1e3 * statistics.fmean(times),
        "max_ms": 1e3 * max(times),
        "steps": len(times),
        "window": window,
        "period": period,
        "covers_period": len(times) >= period,
        "times_ms": [1e3 * t for t in times],
    }


def state_bytes(state: Any) -> int:
    """Bytes of every array in a nested optimizer state (torch tensors, JAX / NumPy / CuPy arrays)."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if hasattr(state, "_asdict"):  # pragma: no cover - NamedTuple states are tuples
        return state_bytes(tuple(state))
    nbytes = getattr(state, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(state, "element_size") and hasattr(state, "numel"):
        return int(state.numel() * state.element_size())
    return 0


def warms_every_pattern(torch_compile: str, torch_device: str) -> bool:
    """Whether our torch rows warm up until every pattern of their interval decisions has occurred
    once: compiled (``--torch-compile on``: a graph compiles per pattern) or captured (CUDA with
    the adapters' default ``capture``: a pattern's first step is its capture's warm-up), so that
    the window times compiled or replayed steps, not compilations or captures."""
    if torch_compile == "on":
        return True
    if not str(torch_device).startswith("cuda"):
        return False
    from ..adapters._torch_capture import capture_setting

    return capture_setting(None, False, "bench") is not False


def torch_optimizer(contender: Contender, named: list, torch_compile: str) -> tuple[Any, list[str]]:
    """Our torch optimizer for ``contender``; ``torch_compile`` is ``"default"``, ``"on"`` or ``"off"``."""
    import torch

    from ..compare.training import make_torch_optimizer

    options = {} if torch_compile == "default" else {"compile": torch_compile == "on"}
    kwargs = core_kwargs_for(contender.entry, torch, "torch")
    try:
        return make_torch_optimizer(contender.entry, named, kwargs, options)
    except TypeError as err:
        if options:
            raise UserError(
                f"--torch-compile {torch_compile}: {contender.entry.torch_class or 'the torch adapter'} does not take "
                f"compile= in this version of precond_ref.adapters.torch ({err}); use --torch-compile default"
            ) from None
        raise


def machine(torch_device: str, frameworks: list[str]) -> dict:
    """compare's machine record (CPU, BLAS) with the GPU that ran, library versions and thread counts."""
    import torch

    from ..compare.report import machine as cpu_and_blas

    info = cpu_and_blas()
    info.update(precond_ref=source_version())
    info.update(torch=torch.__version__, torch_device=torch_device, torch_threads=torch.get_num_threads())
    if torch_device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    if "jax" in frameworks:
        import jax
        import optax

        info.update(jax=jax.__version__, optax=optax.__version__, jax_devices=[str(d) for d in jax.devices()],
                    jax_x64=bool(jax.config.jax_enable_x64))
    if "cupy" in frameworks:
        import cupy

        info["cupy"] = cupy.__version__
    return info


#: Names the commit a run measured where the package is not a git checkout (a wheel on a GPU machine).
COMMIT_VARIABLE = "PRECOND_REF_COMMIT"


def source_version() -> str:
    """This package's version and the commit it was built from: ``PRECOND_REF_COMMIT`` where set,
    else the git checkout the package lies in, else the version alone."""
    from .. import __version__

    commit = os.environ.get(COMMIT_VARIABLE, "").strip()
    if not commit:
        try:
            done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                  capture_output=True, text=True, timeout=10)
            commit = done.stdout.strip() if done.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return f"{__version__} at {commit}" if commit else __version__


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or not base or not math.isfinite(base):
        return None
    return value / base


def jsonable(value: Any) -> Any:
    """``json.dump``'s fallback for settings that are not JSON (a mask function, a dtype): their name."""
    return getattr(value, "__name__", None) or repr(value)
