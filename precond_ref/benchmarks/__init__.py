"""``python -m precond_ref bench``: the one place speed is measured.

Two kinds of measurement, every ratio taken against baselines measured in the same run on the same
device:

- ``--model gpt`` / ``--model resnet`` times the whole training step (forward, backward, optimizer
  step) of a small GPT-style transformer on random tokens or a small ResNet-style CNN on random
  images (:mod:`precond_ref.benchmarks.models`), through the torch adapters against
  ``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)``, and through the optax adapters in
  a jitted plain-JAX training step against ``optax.adamw``. Sizes: ``--size small`` (a 2-core CPU,
  the default there), ``reference`` (sized for one GPU, the default when torch sees a GPU) or, for
  the GPT, ``gpt2`` (GPT-2-small's shapes, for one large GPU).
- without ``--model``, one optimizer step on the parameters of one layer case
  (:mod:`precond_ref.benchmarks.layers`: ``1024x1024``, ``4096x1024``, a 3x3 convolution, a stack
  of transformer blocks as one param group), through the torch adapters against
  ``torch.optim.Adam`` (foreach and fused), under ``jax.jit`` against ``optax.adam``, and optionally
  the core on NumPy / CuPy arrays; plus one float32 ``eigh`` of a 1024x1024 matrix as a yardstick.

Every method of the method table runs (RF-AdamW included) at its bench settings, the papers'
refresh intervals; ``--variants`` adds other modes, roots, intervals and factor dtypes. Each
measurement reports the first step apart (compilation, tracing, state allocation), then the median
and the mean of a window of steps as long as the method's longest refresh interval, so the mean
includes the refresh steps as training does. Every torch row then counts the operations (kernel
launches) of the refresh period after its window as a GPU would get them, outside the timed
steps (:mod:`precond_ref.benchmarks.operations`: the ``ops / step`` column). The authors'
implementations run beside ours where they can be imported (:mod:`precond_ref.benchmarks.authors`). Output: a table per case or model,
``bench.json`` in ``--out`` (with every step's time and the machine; written with ``"complete":
false`` once the machine's rates are measured and again after each row, so that a run stopped
early keeps every row it measured, and with ``"complete": true`` at the end), and with
``--readme`` the README's performance block and ``records/bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np  # noqa: F401  (bench needs NumPy: without it the command line names the extra to install)

from ..cli import UserError, pip_install, positive_int, rewrite_sections
from ..compare.methods import BENCH_ONLY, METHODS
from .common import BUDGET_S, MIN_WINDOW_S, jsonable
from .models import SIZES
from .report import KINDS

__all__ = ["add_arguments", "run"]

SIZE_NAMES = ("auto", *dict.fromkeys(name for sizes in SIZES.values() for name in sizes))
README_DATA = os.path.join("records", "bench.json")
PERFORMANCE_PAGE = os.path.join("docs", "performance.md")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .layers import CASES

    names = ", ".join(e.name for e in METHODS + BENCH_ONLY if not e.is_baseline)
    add = parser.add_argument
    add("--model", choices=KINDS, default="layers",
        help="gpt or resnet: time whole training steps of that model; layers (default): one optimizer step per layer case")
    add("--methods", default="all", help=f"comma-separated subset of: {names} (default all; the baselines always run)")
    add("--variants", action="store_true",
        help="also time other settings of ASGO, Sketchy, S-AdaGrad and IF-Shampoo (faithful mode, roots, intervals, bf16 factors)")
    add("--cases", default=None, help=f"layer cases, comma-separated (default {','.join(CASES)}; also OUTxIN, OUTxINxKHxKW, tfLxW)")
    add("--size", choices=SIZE_NAMES, default=None,
        help="model size for --model: small (sized for a 2-core CPU), reference (sized for one GPU: a 6-layer GPT of 27M "
        "parameters, a ResNet of widths 64-512), gpt2 (GPT only: GPT-2-small's shapes, 163M parameters with the untied "
        "head, batch 8x1024 tokens; one large GPU), tiny (tests); default auto: reference when torch sees a GPU, else small")
    add("--frameworks", default=None,
        help="comma-separated subset of torch,jax,numpy,cupy (numpy and cupy: layer cases only; default torch,jax, "
        "and cupy for layer cases when a GPU is present)")
    add("--warmup", type=positive_int, default=2, help="steps before the timed window, the first one timed apart (default 2)")
    add("--repeats", type=positive_int, default=10,
        help=f"timed steps at least (default 10), and at least {MIN_WINDOW_S:g} s of them (up to 1000 steps; not with "
             "--quick); a method's window is as long as its longest refresh interval")
    add("--budget", type=_positive_float, default=BUDGET_S,
        help=f"seconds of timed steps per measurement before the window stops early (default {BUDGET_S:g})")
    add("--rounds", type=positive_int, default=1,
        help="measure every row this many times in turn and keep each row's lowest median (default 1; "
        "3 resists bursts of load from elsewhere on the machine)")
    add("--quick", action="store_true", help="tiny cases and models, few steps, no refresh windows (for tests)")
    add(
        "--device", default=None,
        help="torch device of the torch rows (default: cuda when torch sees a GPU, else cpu; e.g. cpu, cuda, cuda:1); "
        "a device that is not there is an error. JAX uses its default device (JAX_PLATFORMS=cpu|cuda)",
    )
    add("--dtype", choices=("float32", "float64"), default="float32", help="parameter and gradient dtype (default float32)")
    add("--torch-compile", choices=("default", "on", "off"), default="default",
        help="pass compile=True (on) or compile=False (off) to our torch optimizers; default: pass nothing")
    add("--authors-path", action="append", default=[], metavar="DIR",
        help="a directory to import the authors' code from (a checkout of infinity-stars/ASGO); repeatable")
    add("--threads", type=positive_int, default=None,
        help="limit BLAS and torch CPU threads (default: the libraries' own; 1 gives steadier numbers on a busy machine)")
    add("--malloc", choices=("keep", "system"), default="keep",
        help="keep (default): glibc's malloc keeps freed blocks below 1 GiB in the process, as a caching allocator "
        "does (a CPU step's fresh arrays then cost no page faults; precond_ref.benchmarks.allocator); system: the "
        "C library's defaults")
    add("--out", default="results", help="output directory for bench.json (default results)")
    add("--readme", action="store_true",
        help=f"also store this run in {README_DATA} and rewrite the README's performance block (run from the repository root)")
    add("--readme-from", metavar="JSON",
        help=f"measure nothing: store the report an earlier complete run wrote (its bench.json, e.g. from a GPU machine) "
        f"in {README_DATA} and rewrite the README's performance block (run from the repository root)")
    add("--peers", nargs="?", const="all", default=None, metavar="KEYS",
        help="also time other libraries' optimizers beside ours (HeavyBall's AdamW, Muon, SOAP, PSGDKron, KLShampoo; "
        "pytorch_optimizer's Shampoo and SOAP where it imports): all, or some of hb-adamw, hb-muon, hb-soap, "
        "hb-psgdkron, hb-klshampoo, po-shampoo, po-soap; the optional extra, " + pip_install("peers"))
    add("--peer-compile", choices=("library", "off"), default="library",
        help="library (default): HeavyBall compiles as it does by default; off: its steps run eagerly")
    add("--no-progress", action="store_true", help="no progress bar")


#: What a ``--quick`` run prints first and again under its tables: its timed steps are too few to
#: include a method's refresh steps in their share, so a row can differ by orders of magnitude
#: between two runs, as one refresh falls inside its window or not.
QUICK_NOTE = (
    "bench --quick is a smoke test: 1-3 timed steps and no refresh windows, so its timings are not "
    "comparable between rows or runs (a refresh inside the window or not changes a row by orders of "
    "magnitude); run without --quick to compare"
)


def _default_frameworks(kind: str) -> list[str]:
    frameworks = ["torch", "jax"]
    if kind == "layers":
        try:
            import cupy

            if cupy.is_available():
                frameworks.append("cupy")
        except ImportError:
            pass
    return frameworks


def _check_frameworks(text: Optional[str], kind: str) -> list[str]:
    from .layers import FRAMEWORKS

    if text is None:
        frameworks = _default_frameworks(kind)
    else:
        frameworks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        unknown = [f for f in frameworks if f not in FRAMEWORKS]
        if unknown or not frameworks:
            raise UserError(f"unknown framework(s) {', '.join(map(repr, unknown)) or '(none given)'}; available: {', '.join(FRAMEWORKS)}")
        core_only = [f for f in frameworks if f in ("numpy", "cupy")]
        if core_only and kind != "layers":
            raise UserError(f"--frameworks {','.join(core_only)} times the core on layer cases only; --model {kind} runs torch and jax")
    for framework in frameworks:
        module, extra = {"torch": ("torch", "torch"), "jax": ("optax", "jax"), "numpy": ("numpy", "numpy"), "cupy": ("cupy", "cupy")}[framework]
        try:
            __import__(module)
        except ImportError as err:
            chosen = f"--frameworks {framework}" if text is not None else f"bench (by default it times {' and '.join(frameworks)})"
            other = "" if text is not None else "; or time only what is installed with --frameworks"
            raise UserError(f"{chosen} needs {module} ({err}): {pip_install(extra)}{other}") from None
    if "cupy" in frameworks:
        import cupy

        if not cupy.is_available():
            raise UserError("--frameworks cupy needs a CUDA device, and cupy.is_available() is False on this machine")
    return frameworks


def _size(args: argparse.Namespace, torch_device: str) -> str:
    if args.model == "layers":
        if args.size is not None:
            raise UserError("--size chooses the model of --model gpt|resnet; layer cases are chosen with --cases")
        return ""
    if args.cases is not None:
        raise UserError(f"--cases chooses layer cases; --model {args.model} is sized with --size")
    if args.size not in (None, "auto", *SIZES[args.model]):
        raise UserError(f"--size {args.size}: --model {args.model} has the sizes auto, {', '.join(SIZES[args.model])}")
    if args.quick:
        return "tiny"
    if args.size in (None, "auto"):
        return "reference" if torch_device.startswith("cuda") else "small"
    return args.size


def run(args: argparse.Namespace) -> int:
    from . import cost as cost_module
    from . import allocator, layers, models
    from . import report as report_module
    from ..compare import _prepare_out_dir, _thread_limit
    from .common import contenders as resolve_contenders
    from .common import machine

    if args.readme_from:
        if not os.path.exists("README.md"):
            raise UserError("--readme-from rewrites ./README.md: run it from the repository root")
        _write_readme(_stored_report(args.readme_from), report_module)
        return 0
    chosen, skipped = resolve_contenders(args.methods, args.variants)
    if not chosen:
        raise UserError("no method to benchmark (the baselines are always measured)")
    if args.quick:
        print(QUICK_NOTE, flush=True)
    frameworks = _check_frameworks(args.frameworks, args.model)
    peers: Any = None
    if getattr(args, "peers", None):
        from . import peers as peers_module

        if "torch" not in frameworks:
            raise UserError("--peers times torch optimizers: include torch in --frameworks")
        peers = peers_module.select(args.peers)
        peers_module.check_available(peers)
        peers_module.set_compile(args.peer_compile)
    if args.model == "layers":
        cases = layers.parse_cases(args.cases) if args.cases else dict(layers.QUICK_CASES if args.quick else layers.CASES)
    if args.readme and not os.path.exists("README.md"):
        raise UserError("--readme rewrites ./README.md: run it from the repository root")
    if args.readme and args.quick:
        raise UserError(f"--readme stores the run in {README_DATA} and the README, and a --quick run's timings are a "
                        "smoke test's: run without --quick")
    out_dir = _prepare_out_dir(args.out)
    for path in args.authors_path:
        if not os.path.isdir(path):
            raise UserError(f"--authors-path {path!r} is not a directory")
        sys.path.insert(0, os.path.abspath(path))
    warmup, repeats = (min(args.warmup, 1), min(args.repeats, 3)) if args.quick else (args.warmup, args.repeats)
    budget = min(args.budget, 2.0) if args.quick else args.budget

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with JAX in this process
    import torch

    if "jax" in frameworks and args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    if args.device is not None:
        from ..compare.training import resolve_device

        torch_device = resolve_device("torch", args.device)  # the same check as compare --device
    else:
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    size_name = _size(args, torch_device)
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}", file=sys.stderr)

    sections = list(cases) if args.model == "layers" else [args.model]
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sections) * len(frameworks) * len(chosen), unit="method", file=sys.stderr, leave=False)

    def progress(text: str) -> None:
        if bar is not None:
            bar.set_description(text)
            bar.update(1)

    common = dict(
        dtype=args.dtype, warmup=warmup, repeats=repeats, budget_s=budget, refresh_windows=not args.quick,
        min_window_s=0.0 if args.quick else MIN_WINDOW_S,
        torch_device=torch_device, torch_compile=args.torch_compile, progress=progress, rounds=args.rounds,
    )
    results: dict[str, list[dict]] = {}
    authors_skipped: list[str] = []
    reference: Optional[dict] = None
    settings: dict[str, Any] = {}
    run_settings = dict(
        kind=args.model, frameworks=frameworks, dtype=args.dtype, warmup=warmup, repeats=repeats, budget_s=budget,
        rounds=args.rounds, threads=args.threads, torch_compile=args.torch_compile, variants=args.variants, malloc=args.malloc,
        quick=args.quick,
        peers=None if peers is None else {"peers": [p.key for p in peers], "compile": args.peer_compile},
        hyperparameters={c.key: c.entry.bench_kwargs() for c in chosen},
    )
    json_path = os.path.join(out_dir, "bench.json")

    def report_so_far(total_s: float, complete: bool) -> dict:
        """bench.json's content: the sections measured so far; ``complete`` once all of them are."""
        return {
            "command": "bench",
            "argv": list(getattr(args, "argv", [])),
            "settings": {**settings, **run_settings},
            "machine": machine_info,
            "total_s": total_s,
            "complete": complete,
            "skipped": skipped + [{"method": "authors", "reason": n} for n in authors_skipped],
            "reference": reference,
            "rates": rates,
            "results": results,
        }

    def save_partial() -> None:
        """bench.json as it stands, so that a run stopped later (a timeout) leaves what it measured."""
        _write(json_path, report_so_far(time.perf_counter() - started, complete=False))

    def saving_rows_of(section: str) -> Callable[[dict], None]:
        """``on_row`` for ``section``: each row saved as it is measured (without the ratios and
        cost columns its section adds at its end), so that a timeout inside one section keeps it."""

        def on_row(row: dict) -> None:
            results.setdefault(section, []).append(row)
            save_partial()

        return on_row

    malloc = allocator.keep_freed_memory() if args.malloc == "keep" else None  # before anything is timed
    started = time.perf_counter()
    limit = contextlib.nullcontext() if args.threads is None else _thread_limit(args.threads, "torch")
    try:
        with limit:
            machine_info = machine(torch_device, frameworks)  # inside the limit: it records the thread counts
            machine_info["malloc"] = malloc
            rates = cost_module.machine_rates(torch_device, args.dtype, quick=args.quick)
            costed: list[tuple[str, list, Any]] = []  # (section, its parameters' shapes, its forward and backward's cost)
            itemsize = 8 if args.dtype == "float64" else 4
            save_partial()  # no section yet: replaces an earlier run's bench.json
            if args.model == "layers":
                settings["cases"] = {k: list(v) for k, v in cases.items()}
                settings["batch_size_for_root_free"] = layers.BATCH_SIZE
                if "torch" in frameworks:
                    n = 64 if args.quick else layers.EIGH_SIZE
                    reference = layers.eigh_reference(torch_device, warmup, repeats, budget, n)
                for case, spec in cases.items():
                    if bar is not None:
                        bar.set_postfix(case=case)
                    results[case], skipped_here = layers.bench_case(
                        chosen, spec, frameworks, reference=reference, peers=peers,
                        on_row=saving_rows_of(case), **common,
                    )
                    shapes = [(n, tuple(p.shape)) for n, p in layers.case_module(spec, torch.float32, "cpu").named_parameters()]
                    costed.append((case, shapes, None))
                    cost_module.add_costs(results[case], shapes, itemsize, rates, torch_device)
                    authors_skipped = list(dict.fromkeys(authors_skipped + skipped_here))
                    _print_table(report_module, case, results[case], bar)
                    save_partial()
            else:
                size = models.SIZES[args.model][size_name]
                module = models.build_torch(args.model, size, getattr(torch, args.dtype), "cpu")
                settings.update(size=size_name, model=size, model_description=models.describe(args.model, size, module))
                settings["batch_size_for_root_free"] = models.batch_size_of(args.model, size)
                results[args.model], authors_skipped = models.bench_model(
                    args.model, size, chosen, frameworks, peers=peers, on_row=saving_rows_of(args.model), **common
                )
                shapes = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
                costed.append((args.model, shapes, cost_module.forward_backward(args.model, size, itemsize)))
                cost_module.add_costs(results[args.model], shapes, itemsize, rates, torch_device, costed[-1][2])
                _print_table(report_module, args.model, results[args.model], bar)
            # The rates again, the higher of each kept, and the cost columns from those (the tables above used the first).
            rates = cost_module.faster_rates(rates, cost_module.machine_rates(torch_device, args.dtype, quick=args.quick))
            for section, shapes, model_cost in costed:
                cost_module.add_costs(results[section], shapes, itemsize, rates, torch_device, model_cost)
    finally:
        if bar is not None:
            bar.close()
    report = report_so_far(time.perf_counter() - started, complete=True)
    if reference is not None:
        print(f"yardstick: {reference['label']}: median {reference['median_ms']:.3g} ms, mean {reference['mean_ms']:.3g} ms "
              "(the 'mean x eigh' column)")
    print(report_module.summary_line(report))
    print(report_module.rates_line(rates))
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}")
    for note in authors_skipped:
        print(f"skipped: {note}")
    for section, rows in results.items():
        for row in rows:
            where = f"{section} {row['framework']} {row['label']}"
            for note in row.get("notes", []):
                print(f"{where}: note: {note}")
            if "error" in row:
                print(f"{where}: FAILED: {row['error']}")
            if "skipped" in row:
                print(f"{where}: skipped: {row['skipped']}")
            if "crashed" in row:
                print(f"{where}: crashes: {row['crashed']}: {row.get('crash_message', '')}")
    _write(json_path, report)
    if args.quick:
        print(QUICK_NOTE)
    print(f"numbers: {json_path}")
    if args.readme:
        _write_readme(report, report_module)
    return 1 if any("error" in row for rows in results.values() for row in rows) else 0


def _print_table(report_module: Any, section: str, rows: list[dict], bar: Any) -> None:
    """A section's table as soon as it is measured (a default run takes minutes per section)."""
    text = report_module.format_table(section, rows) + "\n"
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _write(path: str, data: Any) -> None:
    """``data`` as JSON at ``path``, written to ``path + ".part"`` and renamed over ``path``: a run
    killed while writing leaves the previous file whole, never a truncated one."""
    part = path + ".part"
    try:
        with open(part, "w") as handle:
            json.dump(data, handle, indent=1, default=jsonable)
            handle.write("\n")
        os.replace(part, path)
    except OSError as err:
        raise UserError(f"cannot write {path!r}: {err.strerror or err}") from None


def _stored_report(path: str) -> dict:
    """The report of a complete earlier run, read from its ``bench.json``."""
    try:
        with open(path) as handle:
            report = json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"--readme-from {path!r}: cannot read a JSON report: {err}") from None
    if not isinstance(report, dict) or not {"settings", "machine", "results"} <= set(report) or "kind" not in report["settings"]:
        raise UserError(f"--readme-from {path!r}: not a report written by bench (settings, machine and results expected)")
    if not report.get("complete"):
        raise UserError(f"--readme-from {path!r}: the run that wrote it did not finish (complete is false)")
    if report["settings"].get("quick") or "--quick" in report.get("argv", ()):
        raise UserError(f"--readme-from {path!r}: a bench --quick run, whose timings are a smoke test's: store a run "
                        "without --quick")
    return report


def _write_readme(report: dict, report_module: Any) -> None:
    stored = None
    if os.path.exists(README_DATA):
        with open(README_DATA) as handle:
            stored = json.load(handle)
    reports = report_module.merged(stored, report)
    _write(README_DATA, reports)
    pages = [("README.md", report_module.readme_section(reports))]
    if os.path.exists(PERFORMANCE_PAGE):
        pages.append((PERFORMANCE_PAGE, report_module.detail_section(reports)))
    rewrite_sections(pages, report_module.replace_readme_section)
    print(f"{', '.join(path for path, _ in pages)} and {README_DATA} updated ({report_module.readme_key(report)})")
