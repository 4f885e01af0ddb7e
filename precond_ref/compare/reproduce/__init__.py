"""``python -m precond_ref reproduce``: does each paper's headline claim hold at this scale?

For each of the five papers (``--paper asgo|sketchy|root_free|mbf|agd|all``), its headline claims
are stated with where the paper makes them, checked by an experiment run with this library's own
optimizers over several seeds, each learning rate tuned on a validation split
(:mod:`precond_ref.compare.reproduce.papers`), and given a verdict by a rule fixed in code before the
run on paired per-seed differences and their 95% t-interval
(:mod:`precond_ref.compare.reproduce.verdicts`): holds, does not hold, inconclusive at this scale, or
not testable on this hardware (a claim about GPU time on a run that is not on a GPU: ``--device
cuda`` tests those). Output in ``--out``: ``reproduce.md`` (a summary table, then a section per
paper), ``reproduce.json`` (every number, per seed, and every tuning score) and
``reproduce_<paper>.png``; ``--docs`` also writes ``docs/reproduce.md``,
``records/reproduce.json`` and ``docs/images/reproduce_<paper>.png``.

Sizes (:mod:`precond_ref.compare.reproduce.config`): the default is the report's run (its wall
time, measured by the run, is written into the report); ``--quick`` seconds (a smoke test: its
verdicts mean nothing, and its output says so first); ``--size large`` is a configuration for one
GPU (``--device cuda``). ``--claims`` runs only the named claims (and what they need); ``--merge``
makes one report of runs of disjoint claim groups of one size run side by side.

Needs the ``compare`` and ``torch`` extras: ``pip install -e ".[compare,torch]"``. This
module imports neither NumPy nor torch, so ``reproduce --help`` works without them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any

from ...cli import UserError, nonnegative_int, pip_install
from .. import _importable, _prepare_out_dir as _prepare
from .config import PAPERS, SIZES

__all__ = ["add_arguments", "run", "merge_shards", "PAPER_NAMES", "INSTALL", "SMOKE_LINE"]

PAPER_NAMES = tuple(PAPERS)
INSTALL = pip_install("compare,torch")
#: The first line a ``--quick`` run prints (and its report's first line after the title).
SMOKE_LINE = "SMOKE TEST (--quick): a seconds-long run of tiny sizes; its verdicts below mean nothing."
_REQUIRED = ("numpy", "sklearn", "tqdm", "threadpoolctl", "torch")
DEFAULT_OUT = "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check each paper's headline claims with this library's optimizers: the claim and its source, the paper's "
        "figure, ours (several seeds) and a verdict by a rule fixed before the run. Needs the 'compare' and 'torch' "
        f"extras: {INSTALL}."
    )
    add = parser.add_argument
    add("--paper", default="all", help=f"one of {', '.join(PAPER_NAMES)}, a comma-separated list, or all (default)")
    add("--claims", default=None,
        help="only these claims, comma-separated ids (e.g. ASGO-4,RootFree-4); their papers are run (default: every claim)")
    add("--quick", action="store_true", help="a smoke run of seconds (for the tests; its verdicts mean nothing)")
    add("--size", choices=("default", "large"), default="default",
        help="default (minutes on a CPU) or large (a configuration for one GPU; use with --device cuda)")
    add("--device", default=None, help="torch device (default: cpu; --size large defaults to cuda)")
    add("--seed", type=nonnegative_int, default=0, help="first seed (default 0)")
    add("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    add("--docs", action="store_true",
        help="also write docs/reproduce.md, records/reproduce.json and docs/images/reproduce_*.png (repository root)")
    add("--no-progress", action="store_true", help="no progress bar (plain lines are printed when stderr is not a terminal)")
    add("--no-plot", action="store_true", help="do not write the PNG plots")
    add("--merge", default=None,
        help="run nothing: merge the reproduce.json of these output directories (comma-separated), each a run of some "
             "--claims of the same size, into one report (a default run split into processes run side by side)")


def resolve_papers(spec: str) -> list[str]:
    """The papers named by ``--paper`` (in the canonical order); unknown names are a :class:`UserError`."""
    if spec.strip().lower() == "all":
        return list(PAPER_NAMES)
    # In any case, as compare's and bench's --methods: ASGO, asgo, root-free, root_free.
    given = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in given if name.lower().replace("-", "_") not in PAPERS]
    wanted = [name.lower().replace("-", "_") for name in given]
    if unknown or not wanted:
        raise UserError(f"unknown paper(s) {', '.join(map(repr, unknown)) or '(none given)'}; available: "
                        f"{', '.join(PAPER_NAMES)}, all")
    return [name for name in PAPER_NAMES if name in wanted]


def resolve_claims(spec: Any) -> Any:
    """``(papers, claim ids)`` named by ``--claims`` (ids as ``ASGO-4``, any case), or ``None``."""
    if spec is None:
        return None
    prefixes = {"asgo": "asgo", "sketchy": "sketchy", "rootfree": "root_free", "mbf": "mbf", "agd": "agd"}
    ids, papers = [], []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        head, _, number = item.rpartition("-")
        paper = prefixes.get(head.lower().replace("_", "").replace("-", ""))
        if paper is None or not number.isdigit():
            raise UserError(f"--claims: {item!r} is not a claim id (e.g. ASGO-4, RootFree-4, MBF-2)")
        canonical = {"asgo": "ASGO", "sketchy": "Sketchy", "root_free": "RootFree", "mbf": "MBF", "agd": "AGD"}[paper]
        ids.append(f"{canonical}-{int(number)}")
        if paper not in papers:
            papers.append(paper)
    if not ids:
        raise UserError("--claims: no claim named")
    return [p for p in PAPER_NAMES if p in papers], ids


def check_dependencies(plot: bool) -> None:
    missing = [m for m in _REQUIRED + (("matplotlib",) if plot else ()) if not _importable(m)]
    if missing:
        raise UserError(f"reproduce needs {', '.join(missing)}: {INSTALL}")


class _Progress:
    """A tqdm bar over the papers on a terminal (its postfix names the last finished run); plain
    lines on stderr otherwise; nothing with ``--no-progress``."""

    def __init__(self, papers: int, enabled: bool):
        self.enabled, self.bar, self.paper, self.started = enabled, None, "", time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=papers, unit="paper", file=sys.stderr, dynamic_ncols=True)

    def start(self, paper: str) -> None:
        self.paper = paper
        if self.bar is not None:
            self.bar.set_description(paper)
        elif self.enabled:
            print(f"[reproduce] {paper}: started", file=sys.stderr, flush=True)

    def run_done(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])
        elif self.enabled:
            print(f"[reproduce] {self.paper}: {text} ({time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)

    def paper_done(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"[reproduce] {self.paper}: done, {summary}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def merge_shards(parts: list) -> dict:
    """One run's JSON from the JSONs of runs of disjoint ``--claims`` groups of one size, run side by
    side: claims in their papers' order, every tuning record, panel (the fullest of a title) and
    fingerprint once; a paper's time the sum of its shards', the run's wall time the longest shard's
    and its CPU time their sum; ``shards`` keeps each shard's command line and times."""
    sizes = {p["settings"]["size"] for p in parts}
    if len(sizes) != 1:
        raise UserError(f"--merge: the runs have different sizes ({', '.join(sorted(sizes))})")
    first = parts[0]
    papers = [name for name in PAPER_NAMES if any(name in p["papers"] for p in parts)]
    data: dict = {
        "command_line": shlex.join(["python", "-m", "precond_ref", "reproduce", "--docs"]),
        "settings": {**first["settings"], "papers": papers, "claims": None},
        "versions": first["versions"], "papers": {}, "machine": first["machine"],
        "wall_s": max(p["wall_s"] for p in parts), "cpu_s": sum(p["cpu_s"] for p in parts),
        "corpus_characters": next((p["corpus_characters"] for p in parts if p.get("corpus_characters")), None),
        "shards": [{"command_line": p["command_line"], "wall_s": p["wall_s"], "cpu_s": p["cpu_s"]} for p in parts],
    }

    def fullness(panel: dict) -> int:
        return sum(v is not None for series in panel["series"].values() for v in series.get("mean", []))

    for name in papers:
        pieces = [p["papers"][name] for p in parts if name in p["papers"]]
        claims = sorted((c for piece in pieces for c in piece["claims"]), key=lambda c: int(c["id"].rsplit("-", 1)[1]))
        ids = [c["id"] for c in claims]
        if len(set(ids)) != len(ids):
            raise UserError(f"--merge: claims of {name} appear in more than one run: {', '.join(ids)}")
        panels: dict = {}
        for piece in pieces:
            for panel in piece["panels"]:
                if panel["title"] not in panels or fullness(panel) > fullness(panels[panel["title"]]):
                    panels[panel["title"]] = panel
        data["papers"][name] = {
            "claims": claims, "panels": list(panels.values()),
            "hyperparameters": list(dict.fromkeys(h for piece in pieces for h in piece["hyperparameters"])),
            "tuning": [t for i, t in enumerate(r for piece in pieces for r in piece["tuning"])
                       if t not in [r for piece in pieces for r in piece["tuning"]][:i]],
            "wall_s": sum(piece["wall_s"] for piece in pieces), "cpu_s": sum(piece["cpu_s"] for piece in pieces),
        }
    fingerprints: dict = {}
    for record in (r for p in parts for r in p.get("fingerprints", [])):
        key = json.dumps({k: v for k, v in record.items() if k != "papers"}, sort_keys=True)
        kept = fingerprints.setdefault(key, {**record, "papers": []})
        kept["papers"] += [name for name in record["papers"] if name not in kept["papers"]]
    data["fingerprints"] = list(fingerprints.values())
    return data


#: Why ``--docs`` refuses a ``--quick`` run: the committed report would hold a smoke run's verdicts.
QUICK_DOCS = ("--docs rewrites docs/reproduce.md and records/reproduce.json, and a --quick run's verdicts mean nothing: "
              "run without --quick")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "merge", None):
        return _run_merge(args)
    papers = resolve_papers(args.paper)
    claims = resolve_claims(getattr(args, "claims", None))
    if claims is not None:
        papers, claims = [p for p in papers if p in claims[0]], claims[1]
        if not papers:
            raise UserError("--claims names no claim of the papers --paper selects")
    if args.quick and args.size != "default":
        raise UserError("--quick and --size large are exclusive")
    if args.quick and args.docs:
        raise UserError(QUICK_DOCS)
    if args.quick:
        print(SMOKE_LINE, flush=True)
    size_name = "quick" if args.quick else args.size
    check_dependencies(plot=not args.no_plot)
    if args.quick:
        from .report import QUICK_NOTE

        print(QUICK_NOTE, flush=True)
    out = _prepare(args.out)
    if args.docs:
        if not os.path.isdir("docs"):
            raise UserError("--docs writes into ./docs: run from the repository root")
        for sub in ("records", "docs/images"):
            _prepare(sub)

    import numpy as np
    import sklearn
    import torch
    from threadpoolctl import threadpool_limits

    from . import harness, report
    from .papers import Context, run_paper

    size = dict(SIZES[size_name])
    device = args.device or size["device"]
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} needs CUDA, and torch.cuda.is_available() is False here"
                        + (" (--size large defaults to cuda; pass --device cpu to run it on the CPU)" if args.size == "large" else ""))
    harness.DEVICE = str(dev)
    torch.set_num_threads(1)
    progress = _Progress(len(papers), enabled=not args.no_progress)
    runner = harness.Runner(on_run=progress.run_done)
    argv = list(getattr(args, "argv", []) or [])
    data: dict[str, Any] = {
        "command_line": shlex.join(["python", "-m", "precond_ref", "reproduce", *argv]),
        "settings": {"size": size_name, "papers": papers, "claims": claims,
                     "seeds": list(range(args.seed, args.seed + size["seeds"])),
                     "lm_seeds": list(range(args.seed, args.seed + size["lm_seeds"])),
                     "config": size, "device": str(dev), "threads": 1},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__},
        "papers": {},
    }
    from ...benchmarks.common import machine

    data["machine"] = machine(str(dev), ["torch"])
    started, cpu = time.perf_counter(), time.process_time()
    try:
        with threadpool_limits(limits=1):
            for name in papers:
                progress.start(name)
                runner.paper = name
                ctx = Context(runner, size, seed=args.seed, device=str(dev), claims=claims)
                result = run_paper(name, ctx)
                data["papers"][name] = result
                progress.paper_done(", ".join(f"{c['id']} {c['verdict']}" for c in result["claims"]))
    finally:
        progress.close()
    data["wall_s"] = time.perf_counter() - started
    data["cpu_s"] = time.process_time() - cpu
    data["corpus_characters"] = harness._CORPUS.get("characters")
    data["fingerprints"] = list(runner.fingerprints.values())
    _write(data, out, "", plot=not args.no_plot)
    if args.docs:
        _write(data, "docs", "images/", plot=not args.no_plot, docs=True)
    if args.quick:
        print(SMOKE_LINE)
    print("\n".join(report.summary_lines(data)))
    print(f"report: {os.path.join(out, 'reproduce.md')} ({data['wall_s']:.0f} s)")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    paths = [os.path.join(d.strip(), "reproduce.json") for d in args.merge.split(",") if d.strip()]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise UserError(f"--merge: no reproduce.json in {', '.join(missing) or '(no directory given)'}")
    check_dependencies(plot=not args.no_plot)
    parts = []
    for path in paths:
        with open(path) as handle:
            parts.append(json.load(handle))
    data = merge_shards(parts)
    if args.docs and data["settings"]["size"] == "quick":
        raise UserError(QUICK_DOCS)
    out = _prepare(args.out)
    _write(data, out, "", plot=not args.no_plot)
    if args.docs:
        if not os.path.isdir("docs"):
            raise UserError("--docs writes into ./docs: run from the repository root")
        _write(data, "docs", "images/", plot=not args.no_plot, docs=True)
    from . import report

    print("\n".join(report.summary_lines(data)))
    print(f"report: {os.path.join(out, 'reproduce.md')} (merged from {len(parts)} runs)")
    return 0


def _write(data: dict, directory: str, image_dir: str, plot: bool, docs: bool = False) -> None:
    from . import report

    json_path = os.path.join("records", "reproduce.json") if docs else os.path.join(directory, "reproduce.json")
    with open(json_path, "w") as handle:
        json.dump(_finite_or_none(data), handle, indent=1, allow_nan=False, default=_jsonable)
        handle.write("\n")
    # The page is rendered from the JSON as written (what the test re-renders).
    with open(json_path) as handle:
        written = json.load(handle)
    with open(os.path.join(directory, "reproduce.md"), "w") as handle:
        handle.write(report.render(written, image_dir, json_path))
    if plot:
        images = os.path.join(directory, "images") if docs else directory
        for name, paper in written["papers"].items():
            report.plot(name, paper, os.path.join(images, f"reproduce_{name}.png"))


def _finite_or_none(value: Any) -> Any:
    """The data with non-finite floats (a diverged run's loss) as ``null``."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
