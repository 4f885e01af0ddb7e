"""Evidence for the default learning rates: each method's rate swept on three small problems.

For each of the nine torch classes of ``precond_ref.adapters.torch`` (the core factories run
underneath them) and each learning rate of a half-decade log grid, trains three small standard
problems for 150 steps from 3 seeds, every other argument at its default (plus ``batch_size``
where the method needs B), and reports the **share of Adam's progress**:
``(L0 - L) / (L0 - L_adam)``, where ``L0`` is the initial loss, ``L`` the method's final loss and
``L_adam`` that of ``torch.optim.Adam`` at its defaults (lr 1e-3) from the same start; 1 is Adam's
progress, 0 none, negative worse than the start (a non-finite loss counts as -1). The grid of each
method is extended past either edge until the share there is below the best, so that every best
rate is interior.

Problems (float32, CPU):

- ``teacher``: a teacher-student MLP 32-64-10 (tanh), full batch of 512 Gaussian inputs,
  cross-entropy to the labels (arg max) of a fixed random teacher of the same shape.
- ``digits_mlp``: the README's ``compare`` MLP (64-64 tanh-10) on scikit-learn's 8x8 digits,
  cross-entropy, mini-batches of 64 in a fixed order; ``L`` is the loss on the whole training split.
- ``digits_cnn``: ``compare``'s CNN (two 3x3 convolutions with ReLU and 2x2 average pooling, then a
  linear layer), the same data and loss.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python records/defaults/sweep.py records/defaults/sweep.json

and ``--table records/defaults/sweep.json`` prints the Markdown table of ``docs/defaults.md``.
``--methods`` restricts the sweep, ``--rates`` gives one method's starting grid.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch

STEPS = 150
SEEDS = (0, 1, 2)
PROBLEMS = ("teacher", "digits_mlp", "digits_cnn")
METHODS = ("AGD", "ASGO", "DASGO", "Sketchy", "SAdaGrad", "RFRMSProp", "RFAdamW", "IFShampoo", "MBF")
#: The methods whose factory needs B, the number of examples the loss averages over.
NEEDS_BATCH_SIZE = ("RFRMSProp", "RFAdamW", "IFShampoo")
#: Each method's starting grid: half-decade points around its former default and the rates
#: ``compare`` tunes it to (README); the sweep extends it past an edge that is a problem's best.
START = {
    "AGD": [3.16e-4, 1e-3, 3.16e-3],
    "ASGO": [3.16e-3, 0.01, 0.0316],
    "DASGO": [0.01, 0.0316, 0.1],
    "Sketchy": [3.16e-4, 1e-3, 3.16e-3],
    "SAdaGrad": [0.1, 0.316, 1.0],
    "RFRMSProp": [0.316, 1.0, 3.16],
    "RFAdamW": [0.316, 1.0, 3.16],
    "IFShampoo": [0.0316, 0.1, 0.316],
    "MBF": [1e-5, 3.16e-5, 1e-4],
}
#: The authors' learning rates (code defaults or experiment values), kept where near the best.
AUTHORS = {"AGD": 1e-3, "ASGO": 1e-2, "DASGO": 1e-2, "IFShampoo": 1e-3, "MBF": 1e-5}
#: The least ratio to each problem's best share at which the authors' rate counts as near the best.
NEAR = 0.8
#: A share difference within which two rates tie (the teacher's shares saturate as its loss nears 0).
TIE = 0.01
#: The share of Adam's progress a default's next larger rate must still make on every problem.
SAFE = 0.5
#: How many grid points the sweep adds past each edge of the starting grid at most.
MAX_EXTENSIONS = 3
#: Half-decade points: the grid every sweep is drawn from.
HALF_DECADE = math.sqrt(10.0)


# ---------------------------------------------------------------------------------------------
# Problems: a model maker and a data stream, both determined by the seed


class Problem:
    """One training problem: ``model()`` a fresh model, ``batches`` the mini-batches in order,
    ``loss(model)`` the loss the share is computed from, ``batch_size`` B."""

    def __init__(self, name: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.name = name
        if name == "teacher":
            teacher = _mlp(32, 64, 10)
            x = torch.randn(512, 32)
            with torch.no_grad():
                y = teacher(x).argmax(dim=1)
            self.x, self.y, self.batch_size = x, y, 512
            self._loss = torch.nn.functional.cross_entropy
            self._make = lambda: _mlp(32, 64, 10)
        else:
            x, y = _digits()
            self.x, self.y, self.batch_size = x, y, 64
            self._loss = torch.nn.functional.cross_entropy
            self._make = (lambda: _mlp(64, 64, 10)) if name == "digits_mlp" else _cnn
        self._state = self._make().state_dict()  # one initialisation per seed, shared by every method
        order = torch.randperm(len(self.x))
        self._order = order

    def model(self) -> torch.nn.Module:
        model = self._make()
        model.load_state_dict(self._state)
        return model

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mini-batch of ``step`` (the whole set for ``teacher``)."""
        if self.batch_size == len(self.x):
            return self.x, self.y
        per_epoch = len(self.x) // self.batch_size
        start = (step % per_epoch) * self.batch_size
        index = self._order[start:start + self.batch_size]
        return self.x[index], self.y[index]

    def loss(self, model: torch.nn.Module, x: Any = None, y: Any = None) -> torch.Tensor:
        return self._loss(model(self.x if x is None else x), self.y if y is None else y)


def _mlp(n_in: int, hidden: int, n_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out))


def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64, 10),
    )


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from precond_ref.compare.digits import load_digits_split

    x_train, y_train, _, _ = load_digits_split()
    return torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Runs


def optimizer_of(method: str, model: torch.nn.Module, batch_size: int, **kwargs: Any) -> torch.optim.Optimizer:
    """The torch class ``method`` on ``model``'s named parameters at its defaults, overridden by
    ``kwargs``; ``batch_size`` where the method needs B; eager (``compile=False``), as the
    trajectories are the same and compiling a 150-step run would cost more than the run."""
    import precond_ref.adapters.torch as pt

    if method == "Adam":
        return torch.optim.Adam(model.parameters(), **kwargs)
    if method in NEEDS_BATCH_SIZE:
        kwargs.setdefault("batch_size", batch_size)
    return getattr(pt, method)(model.named_parameters(), compile=False, **kwargs)


def final_loss(problem: Problem, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> float:
    """The problem's loss after ``STEPS`` steps of the optimizer ``make_optimizer(model)`` makes."""
    model = problem.model()
    optimizer = make_optimizer(model)
    for step in range(STEPS):
        x, y = problem.batch(step)
        optimizer.zero_grad()
        problem.loss(model, x, y).backward()
        optimizer.step()
    with torch.no_grad():
        return float(problem.loss(model))


@functools.lru_cache(maxsize=None)
def start_and_adam(problem_name: str, seed: int) -> tuple[float, float]:
    """The initial loss and Adam's final loss on ``problem_name`` from ``seed``."""
    problem = Problem(problem_name, seed)
    with torch.no_grad():
        start = float(problem.loss(problem.model()))
    return start, final_loss(problem, lambda m: optimizer_of("Adam", m, problem.batch_size))


def shares(problem_name: str, method: str, seeds: tuple = SEEDS, **kwargs: Any) -> list[float]:
    """Per seed, ``method``'s share of Adam's progress on ``problem_name`` (-1 for a non-finite loss)."""
    out = []
    for seed in seeds:
        problem = Problem(problem_name, seed)
        start, adam = start_and_adam(problem_name, seed)
        loss = final_loss(problem, lambda m: optimizer_of(method, m, problem.batch_size, **kwargs))
        out.append((start - loss) / (start - adam) if math.isfinite(loss) else -1.0)
    return out


# ---------------------------------------------------------------------------------------------
# The sweep


def _grid_point(rate: float) -> float:
    """``rate`` rounded to the half-decade grid (three significant digits)."""
    return float(f"{10.0 ** (round(2 * math.log10(rate)) / 2):.3g}")


def sweep_method(method: str, rates: list[float], save: Callable[[dict], None], extend: bool = True,
                 done: Optional[dict] = None) -> dict:
    """``{rate: {problem: [share per seed]}}``, the grid extended past an edge while that edge is a
    problem's best rate by more than ``TIE`` (so that each problem's best rate is interior, or the
    edge failed), at most ``MAX_EXTENSIONS`` times per edge. ``done``: results already measured (a
    former output); ``save`` receives the results after every rate."""
    results: dict[str, dict] = dict(done or {})
    extensions = {0: 0, -1: 0}

    def run(rate: float) -> None:
        key = f"{rate:g}"
        results[key] = {p: results.get(key, {}).get(p) or shares(p, method, lr=rate) for p in PROBLEMS}
        print(f"{method} lr {key}: " + ", ".join(f"{p} {np.mean(s):.3f}" for p, s in results[key].items()),
              file=sys.stderr, flush=True)
        save(results)

    def edge_is_best(edge: str, problem: str) -> bool:
        others = [np.mean(results[r][problem]) for r in results if r != edge]
        return np.mean(results[edge][problem]) > max(others) + TIE

    for rate in rates:
        run(rate)
    while extend:
        grid = sorted(results, key=float)
        edges = [side for side in (0, -1)
                 if extensions[side] < MAX_EXTENSIONS and any(edge_is_best(grid[side], p) for p in PROBLEMS)]
        if not edges:
            break
        for side in edges:
            extensions[side] += 1
            run(_grid_point(float(grid[side]) / HALF_DECADE if side == 0 else float(grid[side]) * HALF_DECADE))
    return results


def _means(rows: dict) -> dict:
    return {float(r): {p: float(np.mean(s)) for p, s in row.items()} for r, row in rows.items()}


def least_ratio(rows: dict) -> dict:
    """Per rate, the least over problems of its mean share over the problem's best mean share."""
    means = _means(rows)
    best = {p: max(m[p] for m in means.values()) for p in PROBLEMS}
    return {r: min(m[p] / best[p] for p in PROBLEMS) for r, m in means.items()}


def chosen_rate(method: str, rows: dict) -> float:
    """The default the evidence supports among the rates of ``rows`` (``{rate: {problem: shares}}``):
    the authors' rate (``AUTHORS``) where it makes at least ``NEAR`` of the best share on every
    problem; otherwise, of the rates whose next larger rate on the grid still makes at least
    ``SAFE`` of Adam's progress on every problem (a half-decade margin below a rate that fails), the
    one whose least ratio to each problem's best is highest: near the best on every problem, not the
    best on one."""
    means, ratio = _means(rows), least_ratio(rows)
    if ratio.get(AUTHORS.get(method), 0.0) >= NEAR:
        return AUTHORS[method]
    grid = sorted(means)
    safe = [r for r, above in zip(grid, grid[1:]) if min(means[above].values()) >= SAFE]
    return max(safe, key=ratio.get)


def table(data: dict) -> str:
    """The Markdown table: per method and rate the mean share of Adam's progress on each problem and
    the least ratio to a problem's best, the rate :func:`chosen_rate` picks in bold."""
    lines = ["| method | lr | " + " | ".join(PROBLEMS) + " | least of best |", "|---|---:|" + "---:|" * (len(PROBLEMS) + 1)]
    for method, rows in data["methods"].items():
        chosen, ratio = chosen_rate(method, rows), least_ratio(rows)
        for rate in sorted(rows, key=float):
            mark = "**" if float(rate) == chosen else ""
            cells = " | ".join(f"{np.mean(rows[rate][p]):.2f}" for p in PROBLEMS)
            lines.append(f"| {method} | {mark}{rate}{mark} | {cells} | {ratio[float(rate)]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write (or to read with --table)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated torch class names")
    parser.add_argument("--rates", help="one starting grid for every method (default: each method's START)")
    parser.add_argument("--no-extend", action="store_true", help="run the starting grid only")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of OUT and exit")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return
    torch.set_num_threads(1)
    try:
        with open(args.out) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {"steps": STEPS, "seeds": list(SEEDS), "problems": list(PROBLEMS), "reference": "torch.optim.Adam, lr 1e-3",
                "torch": torch.__version__, "methods": {}}
    def save(method: str, results: dict) -> None:
        data["methods"][method] = dict(sorted(results.items(), key=lambda item: float(item[0])))
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)

    for method in args.methods.split(","):
        rates = [float(r) for r in args.rates.split(",")] if args.rates else START[method]
        sweep_method(method, rates, functools.partial(save, method), extend=not args.no_extend,
                     done=data["methods"].get(method))
    print(table(data))


if __name__ == "__main__":
    main()
