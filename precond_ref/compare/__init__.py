"""``python -m precond_ref compare``: a tuned comparison of every optimizer on small real models.

The main job of the library: an MLP, a small CNN and a deep autoencoder on scikit-learn's 8x8
handwritten digits (shipped inside scikit-learn, so it runs offline), trained from the same initial
weights and the same mini-batch order with every method of
:data:`precond_ref.compare.methods.METHODS` and the SGD-momentum and Adam baselines.

By default every method gets the same tuning budget (the protocol of optimizer benchmarks such as
AlgoPerf and Schmidt et al., "Descending through a crowded valley", ICML 2021): for each method and
model, its learning rate is swept over a log grid centred on its paper's value, training on 80% of
the training set with two seeds and scoring the loss on the other 20% (the validation split). The
rate with the lowest median loss over the seeds wins; a winner at an end of the grid sends the sweep
one sqrt(10) step further that way (at most ``--max-extra-rates`` times), until the winner is inside
the grid or the next rate fails. The best rate is then trained on the whole training set with
several seeds, and the test metrics are reported as mean ± standard deviation over the seeds; a
failed run (diverged, ended at or above its initial loss, or at chance accuracy) is counted and
shown apart, never averaged in. ``--no-tune`` runs the papers' values instead.

The runs are independent, so they are spread over ``--jobs`` worker processes (one BLAS thread
each); the numbers do not depend on ``--jobs``. Output in ``--out``: ``compare.json`` (every number),
``loss_curves.png`` and the printed tables. ``--readme`` also regenerates the README's results
section, ``records/compare.json`` and ``docs/images/compare_loss_curves.png``.

This module imports no NumPy at import time, so that ``compare --help`` works, and ``compare``
says which extra to install, in an environment without the ``compare`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from ..cli import UserError, install_hint, nonnegative_int, pip_install, positive_int, rewrite_sections
from .methods import METHODS, MODELS, MethodEntry

__all__ = ["add_arguments", "run", "resolve_methods", "grid_factors", "train_one", "core_baseline", "make_torch_optimizer"]

_TRAINING_NAMES = ("train_one", "core_baseline", "make_torch_optimizer")


#: The page whose results block ``--readme`` also rewrites (the whole table), when it exists.
COMPARE_PAGE = os.path.join("docs", "compare.md")

def __getattr__(name: str) -> Any:
    # The training helpers need NumPy: imported on first use, so that this module imports without it.
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    if name == "_machine":  # used by bench
        from .report import machine

        return machine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


BACKENDS = ("numpy", "torch", "jax", "cupy")
DTYPES = ("float32", "float64")
DEFAULT_EPOCHS = 12
# The sweep trains as long as the final runs: a rate picked on a shorter horizon can be one that
# drifts away later (IF-Shampoo at 0.1 was best after 8 epochs and degrading from epoch 10 on).
DEFAULT_TUNE_EPOCHS = DEFAULT_EPOCHS
DEFAULT_SEEDS = 3
DEFAULT_GRID = 5
DEFAULT_TUNE_SEEDS = 2
DEFAULT_MAX_EXTRA_RATES = 3
DEFAULT_BATCH_SIZE = 64
DEFAULT_DTYPE = "float64"
DEFAULT_OUT = "results"
VALIDATION_FRACTION = 0.2
_REQUIRED = ("numpy", "sklearn", "tqdm", "threadpoolctl")


# ---------------------------------------------------------------------------------------------
# Command line


class _SweepOption(argparse.Action):
    """Stores an option of the learning-rate sweep and records that it was given, so that
    ``--no-tune`` beside one is refused instead of silently ignoring it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = getattr(namespace, "sweep_options_given", ())
        namespace.sweep_options_given = tuple(dict.fromkeys((*given, self.option_strings[0])))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(entry.name for entry in METHODS)
    parser.description = (
        "Train an MLP, a CNN and a deep autoencoder on scikit-learn's 8x8 digits with every optimizer. By default "
        "each method's learning rate is tuned on a validation split (a log grid around its paper's value), then "
        "the best is trained with several seeds: mean ± std of the test metrics. Needs the 'compare' extra: "
        f"{install_hint('compare')}."
    )
    add = parser.add_argument
    add("--methods", default="all", help=f"comma-separated subset of: {names} (default: all)")
    add("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    add("--no-tune", action="store_true", help="no learning-rate sweep: every method at its paper's hyperparameters")
    add("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help=f"epochs of the final runs (default {DEFAULT_EPOCHS})")
    add(
        "--tune-epochs", type=positive_int, action=_SweepOption, default=DEFAULT_TUNE_EPOCHS,
        help=f"epochs of each run of the learning-rate sweep (default {DEFAULT_TUNE_EPOCHS})",
    )
    add(
        "--grid", type=positive_int, action=_SweepOption, default=DEFAULT_GRID,
        help=f"learning rates in the sweep, spaced by sqrt(10) and centred on the paper's value (default {DEFAULT_GRID})",
    )
    add(
        "--tune-seeds", type=positive_int, action=_SweepOption, default=DEFAULT_TUNE_SEEDS,
        help=f"seeds of each sweep point; the rate with the lowest median validation loss wins (default {DEFAULT_TUNE_SEEDS})",
    )
    add(
        "--max-extra-rates", type=nonnegative_int, action=_SweepOption, default=DEFAULT_MAX_EXTRA_RATES,
        help="when the best rate is at an end of the grid, try up to this many more rates past that end, one "
        f"sqrt(10) step at a time, until the best is inside the grid or the next rate diverges (default {DEFAULT_MAX_EXTRA_RATES})",
    )
    add("--seeds", type=positive_int, default=DEFAULT_SEEDS, help=f"seeds of the final runs (default {DEFAULT_SEEDS})")
    add("--seed", type=nonnegative_int, default=0, help="first seed (initial weights and batch order); the sweep uses it too")
    add(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help=f"mini-batch size (default {DEFAULT_BATCH_SIZE})"
    )
    add("--backend", choices=BACKENDS, default="numpy", help="array backend (default numpy, through the core)")
    add(
        "--device", default=None,
        help="torch: a torch device (default cpu; e.g. cuda, cuda:1); cupy: a CUDA device index (default 0). "
        "Nothing is moved to a GPU unless asked",
    )
    add(
        "--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
        help=f"parameter dtype (default {DEFAULT_DTYPE}: smaller rounding differences between CPU kinds; the README says how large)",
    )
    add(
        "--threads", type=positive_int, default=1,
        help="BLAS / torch threads per worker (default 1: the models are tiny, and a fixed count keeps the "
        "summation order, hence the numbers, fixed)",
    )
    add(
        "--jobs", type=positive_int, default=None,
        help="worker processes (default: min(2, usable CPUs) for numpy, 1 for the other backends); "
        "the numbers do not depend on it",
    )
    add("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    add("--no-progress", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")
    add("--no-plot", action="store_true", help="do not write the PNG plot")
    add(
        "--readme", action="store_true",
        help="also rewrite the results section of ./README.md, records/compare.json and "
        "docs/images/compare_loss_curves.png (run from the repository root)",
    )
    add("--list", action="store_true", help="list the methods (those of --methods) with their hyperparameters and sources, and exit")


def resolve_methods(spec: str, table: Optional[Sequence[MethodEntry]] = None) -> tuple[list[MethodEntry], list[dict]]:
    """The entries of ``table`` (default :data:`METHODS`) named by ``--methods`` that can run, and
    notes for those that cannot.

    Unknown names are a :class:`UserError`; known entries whose factory is not in this version of
    :mod:`precond_ref` are skipped with a note.
    """
    import precond_ref

    known = {entry.name: entry for entry in (METHODS if table is None else table)}
    # A method is named by its name or its table label, in any case: agd, AGD, rf-rmsprop, RF-RMSProp.
    aliases = {}
    for entry in known.values():
        for alias in (entry.name, entry.label):
            aliases[alias.lower()] = entry.name
    if spec.strip().lower() == "all":
        wanted = list(known)
    else:
        given = [name.strip() for name in spec.split(",") if name.strip()]
        if not given:
            raise UserError("--methods is empty; give a comma-separated list or 'all'")
        unknown = [name for name in given if name.lower() not in aliases]
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(known)}")
        wanted = list(dict.fromkeys(aliases[name.lower()] for name in given))
    entries, skipped = [], []
    for name in wanted:
        entry = known[name]
        if entry.factory is not None and not hasattr(precond_ref, entry.factory):
            skipped.append({"method": name, "reason": f"precond_ref.{entry.factory} is not in this version"})
            continue
        entries.append(entry)
    return entries, skipped


def _resolve_models(spec: str) -> list[str]:
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    if not wanted:
        raise UserError(f"--models is empty; give a comma-separated list of: {', '.join(MODELS)}")
    unknown = [name for name in wanted if name not in MODELS]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(map(repr, unknown))}; available: {', '.join(MODELS)}")
    return list(dict.fromkeys(wanted))


def grid_factors(points: int) -> list[float]:
    """Multipliers of the paper's learning rate: ``points`` powers of sqrt(10) centred on 1.

    An even count puts one more point above the paper's value than below it.
    """
    low = -((points - 1) // 2)
    return [10.0 ** (k / 2) for k in range(low, low + points)]


def _prepare_out_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".precond_ref_write_test")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write to output directory {path!r}: {err.strerror or err}") from None
    return path


def _describe(entries: list[MethodEntry], models: list[str]) -> str:
    lines = []
    for entry in entries:
        per_model = "; ".join(
            f"{model}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.kwargs_for(model).items())
            for model in models
        )
        extra = f" (update gets {', '.join(entry.update_kwargs)})" if entry.update_kwargs else ""
        lines.append(f"- {entry.label}{extra}: {per_model}\n    source: {entry.reference}")
    return "\n".join(lines)


def _check_dependencies(backend: str, dtype: str, plot: bool) -> None:
    missing = [m for m in _REQUIRED + (("matplotlib",) if plot else ()) if not _importable(m)]
    if missing:
        raise UserError(f"compare needs {', '.join(missing)}: {install_hint('compare')}")
    if backend == "torch":
        try:
            import torch  # noqa: F401

            from ..adapters import torch as _  # noqa: F401
        except ImportError as err:
            raise UserError(f"--backend torch needs PyTorch ({pip_install('torch')}): {err}") from None
    elif backend == "jax":
        try:
            import jax
            import optax  # noqa: F401

            from ..adapters import jax as _  # noqa: F401,F811
        except ImportError as err:
            raise UserError(f"--backend jax needs JAX and optax ({pip_install('jax')}): {err}") from None
        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
    elif backend == "cupy":
        try:
            import cupy
        except ImportError as err:
            raise UserError(f"--backend cupy needs CuPy ({pip_install('cupy')}): {err}") from None
        if not cupy.is_available():
            raise UserError("--backend cupy needs a CUDA device, and cupy.is_available() is False on this machine")


def _cpu_seconds() -> Optional[dict]:
    """User + system CPU seconds so far of this process and of its children that have been waited
    for (the workers, once the pool is shut down); None where :mod:`resource` is missing (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    usage = {who: resource.getrusage(getattr(resource, "RUSAGE_" + who.upper())) for who in ("self", "children")}
    return {"main": usage["self"].ru_utime + usage["self"].ru_stime, "workers": usage["children"].ru_utime + usage["children"].ru_stime}


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Running the jobs: in this process, or spread over worker processes


_WORKER: dict = {}


@contextlib.contextmanager
def _thread_limit(threads: int, backend: str) -> Iterator[None]:
    """Limit BLAS (threadpoolctl) and torch intra-op threads for the duration of a block (used by bench)."""
    from threadpoolctl import threadpool_limits

    previous = None
    if backend == "torch":
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        if previous is not None:
            torch.set_num_threads(previous)


def _limit_threads(threads: int, backend: str) -> None:
    """Fix the BLAS (threadpoolctl) and torch thread counts of this process for its lifetime."""
    from threadpoolctl import threadpool_limits

    _WORKER["limits"] = threadpool_limits(limits=threads)
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)


def _worker_init(datasets: dict, threads: int, backend: str, dtype: str) -> None:
    _WORKER["datasets"] = datasets
    _limit_threads(threads, backend)
    if backend == "jax" and dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)


def _run_job(job: dict) -> dict:
    from .training import train_one

    job = {k: v for k, v in job.items() if k not in ("exponent", "extension")}  # the sweep's bookkeeping
    entry, data = job.pop("entry"), _WORKER["datasets"][job.pop("dataset")]
    try:
        return train_one(entry, data=data, **job)
    except UserError:
        raise
    except Exception as err:  # one failing method must not hide the others' results
        return {
            "method": entry.name, "label": entry.label, "model": job["model"], "seed": job["seed"],
            "error": f"{type(err).__name__}: {err}",
        }


class _Progress:
    """One bar over every step of the run on a terminal; elsewhere (a log, a pipe) a line at every
    tenth of each phase's runs, so that a long run is never silent."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        self.started = time.perf_counter()
        self.name, self.jobs, self.done = "", 0, 0
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, smoothing=0.05, dynamic_ncols=True)

    def phase(self, text: str, jobs: int = 0) -> None:
        self.name, self.jobs, self.done = text, jobs, 0
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def job_done(self) -> None:
        """Called as each run of the phase finishes: a line when the count crosses a tenth of the phase."""
        self.done += 1
        if self.lines and self.jobs and (10 * self.done) // self.jobs > (10 * (self.done - 1)) // self.jobs:
            print(
                f"{self.name}: {self.done} of {self.jobs} runs done ({time.perf_counter() - self.started:.0f} s)",
                file=sys.stderr, flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_jobs(jobs: list[dict], pool: Any, progress: _Progress, steps_of: Callable[[dict], int]) -> list[dict]:
    """Results in the order of ``jobs``; the bar advances as jobs (or, in-process, epochs) finish."""
    if pool is None:
        results = []
        for job in jobs:
            results.append(_run_job({**job, "on_steps": progress.update}))
            progress.job_done()
        return results
    import concurrent.futures as cf

    futures = {pool.submit(_run_job, job): i for i, job in enumerate(jobs)}
    results: list[Optional[dict]] = [None] * len(jobs)
    for future in cf.as_completed(futures):
        index = futures[future]
        results[index] = future.result()
        progress.update(steps_of(jobs[index]))
        progress.job_done()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    entries, skipped = resolve_methods(args.methods)
    models = _resolve_models(args.models)
    sweep_options = getattr(args, "sweep_options_given", ())
    if args.no_tune and sweep_options:
        raise UserError(
            f"--no-tune runs no learning-rate sweep, so {', '.join(sweep_options)} would have no effect; give one or the other"
        )
    if args.list:
        print(_describe(entries, models))
        return 0
    _check_dependencies(args.backend, args.dtype, plot=not args.no_plot or args.readme)
    from . import digits, report
    from .training import resolve_device

    device = resolve_device(args.backend, args.device)
    if args.readme and not os.path.exists("README.md"):
        raise UserError("--readme rewrites ./README.md: run it from the repository root")
    out_dir = _prepare_out_dir(args.out)
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}", file=sys.stderr)
    if not entries:
        raise UserError("none of the requested methods is available in this version")

    x_train, y_train, x_test, y_test = digits.load_digits_split()
    if len(x_train) // args.batch_size == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(x_train)} examples)")
    datasets = {"final": (x_train, y_train, x_test, y_test)}
    if not args.no_tune:
        datasets["tune"] = digits.validation_split(x_train, y_train, VALIDATION_FRACTION)
    jobs_count = args.jobs or (min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2) if args.backend == "numpy" else 1)
    seeds = [args.seed + k for k in range(args.seeds)]
    common = {"batch_size": args.batch_size, "backend": args.backend, "dtype": args.dtype, "device": device}
    factors = grid_factors(args.grid)
    tune_seeds = [args.seed + k for k in range(args.tune_seeds)]
    low = -((args.grid - 1) // 2)

    def sweep_job(entry: MethodEntry, model: str, exponent: int, seed: int, extension: bool) -> dict:
        paper = entry.kwargs_for(model)["learning_rate"]
        return {
            "entry": entry, "model": model, "dataset": "tune", "epochs": args.tune_epochs, "seed": seed,
            "learning_rate": paper * 10.0 ** (exponent / 2), "exponent": exponent, "extension": extension,
            "curves": False, **common,
        }

    sweep_jobs = [] if args.no_tune else [
        sweep_job(entry, model, k, seed, False)
        for model in models for entry in entries for k in range(low, low + args.grid) for seed in tune_seeds
    ]

    def steps_of(job: dict) -> int:
        return job["epochs"] * (len(datasets[job["dataset"]][0]) // args.batch_size)

    final_steps = len(models) * len(entries) * len(seeds) * args.epochs * (len(x_train) // args.batch_size)
    what = "paper hyperparameters" if args.no_tune else (
        f"learning rate tuned over {args.grid} points (+ up to {args.max_extra_rates} past an edge; "
        f"{args.tune_epochs} epochs x {args.tune_seeds} seeds each, validation split {len(datasets['tune'][2])} of {len(x_train)})"
    )
    print(
        f"digits 8x8: {len(x_train)} training / {len(x_test)} test images; models {', '.join(models)}; {len(entries)} "
        f"methods; {what}; final runs {args.epochs} epochs x {len(seeds)} seeds; backend {args.backend}, {args.dtype}, "
        f"{args.threads} thread(s) x {jobs_count} worker(s)",
        file=sys.stderr,
    )
    progress = _Progress(sum(map(steps_of, sweep_jobs)) + final_steps, enabled=not args.no_progress)
    pool = None
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    try:
        if jobs_count > 1:
            import concurrent.futures as cf
            import multiprocessing

            # spawn, not fork: a forked torch / JAX / BLAS runtime is not safe to use.
            pool = cf.ProcessPoolExecutor(
                jobs_count, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(datasets, args.threads, args.backend, args.dtype),
            )
        else:
            _worker_init(datasets, args.threads, args.backend, args.dtype)
        sweeps = []
        if sweep_jobs:
            progress.phase("sweep", len(sweep_jobs))
            sweep_results = _run_jobs(sweep_jobs, pool, progress, steps_of)
            sweeps = _choose(sweep_jobs, sweep_results, args.max_extra_rates)
            for round_ in range(1, args.max_extra_rates + 1):
                more = [
                    sweep_job(entry, model, k, seed, True)
                    for model, entry, k in _extensions(sweeps, entries, args.max_extra_rates)
                    for seed in tune_seeds
                ]
                if not more:
                    break
                if progress.bar is not None:
                    progress.bar.total += sum(map(steps_of, more))
                progress.phase(f"sweep, extra rates {round_}", len(more))
                sweep_jobs += more
                sweep_results += _run_jobs(more, pool, progress, steps_of)
                sweeps = _choose(sweep_jobs, sweep_results, args.max_extra_rates)
        chosen = {(s["model"], s["method"]): s["learning_rate"] for s in sweeps}
        final_jobs = [
            {
                "entry": entry, "model": model, "dataset": "final", "epochs": args.epochs, "seed": seed,
                "learning_rate": chosen.get((model, entry.name)), "curves": True, **common,
            }
            for model in models for entry in entries for seed in seeds
        ]
        progress.phase("final", len(final_jobs))
        runs = _run_jobs(final_jobs, pool, progress, steps_of)
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    total, cpu = time.perf_counter() - started, _cpu_seconds()
    if cpu is not None and cpu_started is not None:
        cpu = {k: cpu[k] - cpu_started[k] for k in cpu}
        # What the runs need of a quiet machine with `jobs` cores: the main process's own work plus
        # the workers' shared out. Not counted: start-up before the runs, the plot, and the idle
        # tail while the last jobs finish (seconds, against minutes).
        cpu["quiet_wall_estimate"] = cpu["main"] + cpu["workers"] / jobs_count
    for r in runs:
        if "error" in r:
            print(f"{r['model']} {r['label']} seed {r['seed']}: FAILED: {r['error']}", file=sys.stderr)
        for note in dict.fromkeys(r.get("notes", ())):
            print(f"{r['model']} {r['label']}: note: {note}", file=sys.stderr)

    settings = {
        "methods": [e.name for e in entries], "models": models, "tune": not args.no_tune, "epochs": args.epochs,
        "tune_epochs": args.tune_epochs, "grid_factors": factors if not args.no_tune else [],
        "tune_seeds": tune_seeds if not args.no_tune else [], "max_extra_rates": args.max_extra_rates,
        "seeds": seeds, "batch_size": args.batch_size, "backend": args.backend, "device": device, "dtype": args.dtype,
        "threads": args.threads, "jobs": jobs_count,
    }
    data_info = {"name": "sklearn digits 8x8", "train": len(x_train), "test": len(x_test), "split_seed": 0}
    if not args.no_tune:
        data_info.update(tune_train=len(datasets["tune"][0]), validation=len(datasets["tune"][2]), validation_seed=1)
    full = {
        "command": "compare",
        "command_line": "python -m precond_ref compare" + "".join(f" {shlex.quote(a)}" for a in getattr(args, "argv", [])),
        "settings": settings,
        "data": data_info,
        "machine": report.machine(),
        "total_s": total,
        "cpu_s": cpu,
        "job_count": len(sweep_jobs) + len(final_jobs),
        "skipped": skipped,
        "references": {e.name: e.reference for e in entries},
        "sweeps": sweeps,
        "summary": report.summarize(runs, sweeps),
        "runs": runs,
    }
    # First the README's table (one row per method), then every model's row with losses, times and state.
    print(report.format_short_table(full["summary"]))
    print()
    print(report.format_table(full["summary"]))
    print()
    print(report.format_failures(full["summary"]))
    print()
    print(report.describe_protocol(settings, data_info))
    if sweeps:
        print("\nValidation loss at each learning rate of the sweep (* = chosen):")
        print(report.format_sweeps(sweeps))
    machine = full["machine"]
    print(
        f"\n{report.timing(full)} on {machine['processor']} ({machine.get('usable_cpus', machine['cpu_count'])} CPUs), "
        f"backend {args.backend}"
    )
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}")
    print("\nPaper hyperparameters (core argument names) and their sources:")
    print(_describe(entries, models))
    _write_outputs(full, out_dir, args)
    return 1 if any("error" in r for r in runs) else 0


def _choose(jobs: list[dict], results: list[dict], max_extra_rates: int = 0) -> list[dict]:
    """Per (model, method): the rate with the lowest median validation loss over the sweep's seeds.

    A failed run (diverged, collapsed: :func:`report.failure`) or an error scores +inf, so a rate
    that fails for one seed of two loses to any that trains for both (the median of two is their
    mean). ``at_grid_edge``: the winner is at an end of the rates tried (the extra rates ran out);
    with nothing finite, the paper's rate is kept.
    """
    from .report import failure

    groups: dict[tuple, dict] = {}
    for job, result in zip(jobs, results):
        key = (job["model"], job["entry"].name)
        group = groups.setdefault(key, {"job": job, "points": {}, "errors": [], "extension": set()})
        group["points"].setdefault(job["learning_rate"], []).append((job.get("seed"), result))
        if job.get("extension"):
            group["extension"].add(job["learning_rate"])
        if "error" in result:
            group["errors"].append(result["error"])
    sweeps = []
    for (model, name), group in groups.items():
        entry = group["job"]["entry"]
        grid = sorted(group["points"])
        per_seed, medians = [], []
        for lr in grid:
            losses = [
                None if "error" in r or failure(r) else r["test_loss"]
                for _, r in sorted(group["points"][lr], key=lambda pair: (pair[0] is None, pair[0] or 0))
            ]
            per_seed.append(losses)
            medians.append(statistics.median(math.inf if v is None else v for v in losses))
        best = min(range(len(grid)), key=medians.__getitem__)
        finite = math.isfinite(medians[best])
        paper = entry.kwargs_for(model)["learning_rate"]
        sweeps.append({
            "model": model, "method": name, "label": entry.label, "paper_learning_rate": paper,
            "grid": grid, "validation_loss": [v if math.isfinite(v) else None for v in medians],
            "validation_losses": per_seed, "errors": group["errors"],
            "learning_rate": grid[best] if finite else paper,
            "none_trained": not finite,
            "at_grid_edge": finite and len(grid) > 1 and best in (0, len(grid) - 1),
            "extra_rates": len(group["extension"]), "extra_budget": max_extra_rates,
        })
    return sweeps


def _extensions(sweeps: list[dict], entries: list[MethodEntry], max_extra_rates: int) -> list[tuple]:
    """``(model, entry, exponent)`` of the next rate to try for every sweep whose winner sits at an
    end of its rates, one sqrt(10) step past that end, while its extra rates last."""
    by_name = {entry.name: entry for entry in entries}
    out = []
    for sweep in sweeps:
        if not sweep["at_grid_edge"] or sweep["extra_rates"] >= max_extra_rates:
            continue
        grid, best = sweep["grid"], sweep["grid"].index(sweep["learning_rate"])
        step = 1 if best == len(grid) - 1 else -1
        exponent = round(2 * math.log10(grid[best] / sweep["paper_learning_rate"])) + step
        out.append((sweep["model"], by_name[sweep["method"]], exponent))
    return out


def _write_outputs(full: dict, out_dir: str, args: argparse.Namespace) -> None:
    from . import report

    json_path = os.path.join(out_dir, "compare.json")
    plot_path = os.path.join(out_dir, "loss_curves.png")
    try:
        with open(json_path, "w") as handle:
            json.dump(full, handle, indent=1)
        if not args.no_plot or args.readme:
            report.plot(full, plot_path)
            print(f"plot: {plot_path}")
        print(f"numbers: {json_path}")
        if args.readme:
            os.makedirs("records", exist_ok=True)
            with open(os.path.join("records", "compare.json"), "w") as handle:
                json.dump(report.compact(full), handle, indent=1)
            shutil.copyfile(plot_path, os.path.join("docs", "images", "compare_loss_curves.png"))
            pages = [("README.md", report.readme_section(report.compact(full)))]
            if os.path.exists(COMPARE_PAGE):
                pages.append((COMPARE_PAGE, report.detail_section(report.compact(full))))
            rewrite_sections(pages, report.replace_readme_section)
            print(f"{', '.join(p for p, _ in pages)}, records/compare.json and docs/images/compare_loss_curves.png rewritten")
    except OSError as err:
        raise UserError(f"cannot write results: {err.strerror or err} ({err.filename})") from None
