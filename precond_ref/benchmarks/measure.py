"""One measurement per framework, for the layer cases and the models alike.

Each function times ``step(i)`` = (gradients of batch ``i``, then one optimizer step) through
:func:`~precond_ref.benchmarks.common.time_steps` and returns its timing dictionary with the
optimizer state's bytes and any notes. The gradients come from a callable (torch), or from a
jitted ``jax.value_and_grad`` of ``loss_fn`` (JAX; ``loss_fn=None`` feeds the batch itself in as
the gradients), so that for the models the whole training step is timed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Optional

from .common import Contender, refresh_period, state_bytes, steps_until_every_pattern, time_steps

__all__ = ["torch_measure", "jax_measure", "core_measure", "run_row", "section_rows", "add_ratios", "torch_sync", "timing_for"]


def torch_sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


class _PeakMemory:
    """Memory the optimizer and its steps added at their peak: on CUDA torch's peak allocation
    (``reset_peak_memory_stats``), on a Linux CPU the process's peak resident set (``VmHWM``, reset
    through ``/proc/self/clear_refs``), over what was in use when it was made; else None."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return
        self.start = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            self.start = None

    def since_start(self) -> Optional[int]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.start)
        peak = _status_bytes("VmHWM")
        return None if self.start is None or peak is None else max(0, peak - self.start)


def _status_bytes(field: str) -> Optional[int]:
    """A ``/proc/self/status`` size in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def torch_measure(
    make_optimizer: Callable[[], tuple[Any, list[str]]],
    set_grads: Callable[[int], Any],
    extra: dict,
    device: str,
    timing: dict,
) -> dict:
    """``set_grads(i)`` fills ``.grad`` (and returns the loss or ``None``), then ``optimizer.step(**extra)``."""
    peak = _PeakMemory(device)
    optimizer, notes = make_optimizer()
    last: dict = {}

    def step(i: int) -> None:
        last["loss"] = set_grads(i)
        optimizer.step(**extra)

    result = time_steps(step, torch_sync(device), **timing)
    result["state_bytes"] = state_bytes(dict(optimizer.state))
    result["peak_bytes"] = peak.since_start()
    if last.get("loss") is not None:
        result["last_loss"] = float(last["loss"])
    failed: list[str] = []
    if _COUNT_OPERATIONS[-1]:
        result["operations"], failed = _operations_after(optimizer, set_grads, extra, device, result, timing.get("budget_s", math.inf))
    result["notes"] = notes + failed
    return result


#: Whether :func:`torch_measure` counts the operations after its window (the innermost
#: :func:`_operations_counted` decides; a row's later rounds do not count them again).
_COUNT_OPERATIONS = [True]


@contextlib.contextmanager
def _operations_counted(enabled: bool) -> Iterator[None]:
    _COUNT_OPERATIONS.append(enabled)
    try:
        yield
    finally:
        _COUNT_OPERATIONS.pop()


def _operations_after(
    optimizer: Any, set_grads: Callable[[int], Any], extra: dict, device: str, timed: dict, budget_s: float
) -> tuple:
    """The operations of the refresh period that follows the timed window, counted as a GPU would
    issue them (:func:`~.operations.count_after`, within the measurement's budget of seconds), and
    a note if they could not be counted."""
    from .counting import count_after

    first = timed["warmup_steps"] + timed["steps"]
    try:
        return count_after(optimizer, set_grads, extra, device, first, timed["period"], budget_s), []
    except Exception as err:  # a count that fails leaves the timings it follows intact
        return None, [f"operations not counted: {type(err).__name__}: {err}"]


def jax_measure(
    optimizer: Any, params: Any, batches: list, loss_fn: Optional[Callable[..., Any]], extra: dict, timing: dict
) -> dict:
    """A jitted step ``(params, state, batch) -> (params, state, loss)`` with donated buffers.

    With ``loss_fn`` the step differentiates ``loss_fn(params, *batch)``; without it the batch is
    the gradient tree itself (the layer cases).
    """
    import jax
    import jax.numpy as jnp
    import optax

    def train_step(p: Any, state: Any, batch: Any) -> tuple[Any, Any, Any]:
        if loss_fn is None:
            loss, grads = jnp.zeros(()), batch
        else:
            loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
        updates, state = optimizer.update(grads, state, p, **extra)
        return optax.apply_updates(p, updates), state, loss

    compiled = jax.jit(train_step, donate_argnums=(0, 1))
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates its input buffers
    holder = {"params": params, "state": optimizer.init(params), "loss": None}

    def step(i: int) -> None:
        holder["params"], holder["state"], holder["loss"] = compiled(holder["params"], holder["state"], batches[i % len(batches)])

    with warnings.catch_warnings():
        # Backends that cannot reuse a donated buffer say so once per compilation; timing is unaffected.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        result = time_steps(step, lambda: jax.block_until_ready((holder["params"], holder["state"])), **timing)
    result["state_bytes"] = state_bytes(jax.tree_util.tree_leaves(holder["state"]))
    if loss_fn is not None:
        result["last_loss"] = float(holder["loss"])
    result["notes"] = []
    return result


def core_measure(transform: Any, params: Any, grads: list, extra: dict, sync: Callable[[], None], timing: dict) -> dict:
    """The core ``update`` called directly on NumPy / CuPy arrays."""
    import precond_ref

    holder = {"params": params, "state": transform.init(params)}

    def step(i: int) -> None:
        updates, holder["state"] = transform.update(grads[i % len(grads)], holder["state"], holder["params"], **extra)
        holder["params"] = precond_ref.apply_updates(holder["params"], updates)

    result = time_steps(step, sync, **timing)
    result["state_bytes"] = state_bytes(holder["state"])
    result["notes"] = []
    return result


def timing_for(
    warmup: int, repeats: int, budget_s: float, refresh_windows: bool, min_window_s: float = 0.0,
    compiled: bool = False,
) -> Callable[[Optional[Contender]], dict]:
    """``time_steps`` settings per contender (``None``: a baseline): its refresh period sets the window.

    ``compiled`` (torch rows with ``--torch-compile on``, or captured: :func:`~.common.warms_every_pattern`): a contender's warm-up runs at least
    until every pattern of its interval decisions has occurred once
    (:func:`~.common.steps_until_every_pattern`), since a compiled step compiles one graph per
    pattern (a refresh spread over T phases: the first call's, then one per phase); the window
    then times the compiled steps, not the compilations."""

    def timing(contender: Optional[Contender]) -> dict:
        period = refresh_period(contender.entry) if contender is not None and refresh_windows else 1
        steps = max(warmup, steps_until_every_pattern(contender.entry)) if compiled and contender is not None else warmup
        return {"warmup": steps, "repeats": repeats, "period": period, "budget_s": budget_s, "min_window_s": min_window_s}

    return timing


def run_row(framework: str, method: str, label: str, measure: Callable[[], dict], variant: Optional[str] = None) -> dict:
    """A table row; an exception becomes the row's ``error`` (one failing method must not hide the others)."""
    from ..cli import UserError

    row: dict[str, Any] = {"framework": framework, "method": method, "variant": variant, "label": label}
    try:
        row.update(measure())
    except UserError:
        raise
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
    if "last_loss" in row and not math.isfinite(row["last_loss"]):
        row["notes"] = row.get("notes", []) + ["the loss is not finite after the timed steps (diverged at these settings)"]
    return row


def section_rows(
    framework: str,
    baselines: list[tuple[str, Callable[[], dict]]],
    contenders: list[Contender],
    measure: Callable[[Contender], dict],
    progress: Optional[Callable[[str], None]] = None,
    skip: Callable[[Contender], Optional[str]] = lambda contender: None,
    rounds: int = 1,
    on_row: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """One framework's rows: its baselines, then every contender (or why it was skipped).
    ``on_row`` gets each row as its first round finishes (the bench saves it at once).

    With ``rounds > 1`` the whole section is measured that many times in turn and each row keeps
    the round of its lowest median (its first step and warm-up from the first round, the one that
    compiled, and the operations counted after that round's window: later rounds count none):
    a burst of load from elsewhere slows one row of one round, not a row of every round.
    """
    heads: list[dict] = []
    jobs: list[Optional[Callable[[], dict]]] = []
    for label, fn in baselines:
        heads.append({"framework": framework, "method": "baseline", "variant": None, "label": label})
        jobs.append(fn)
    for contender in contenders:
        head = {"framework": framework, "method": contender.entry.name, "variant": contender.variant, "label": contender.label}
        reason = skip(contender)
        heads.append({**head, "skipped": reason} if reason else head)
        jobs.append(None if reason else (lambda c=contender: measure(c)))
    rows: list[dict] = [dict(h) for h in heads]
    for round_ in range(rounds):
        for i, (head, job) in enumerate(zip(heads, jobs)):
            if progress is not None and round_ == 0 and head["method"] != "baseline":
                progress(f"{framework} {head['label']}")
            if job is None:
                continue
            with _operations_counted(round_ == 0):
                row = run_row(framework, head["method"], head["label"], job, head["variant"])
            if round_ == 0:
                rows[i] = row
                if on_row is not None:
                    on_row(row)
            elif "median_ms" in row and row["median_ms"] < rows[i].get("median_ms", float("inf")):
                first = {key: rows[i][key] for key in ("first_step_ms", "warmup_ms", "operations") if key in rows[i]}
                rows[i] = {**row, **first}
    if rounds > 1:
        for row in rows:
            row["rounds"] = rounds
    return rows


def add_ratios(rows: list[dict], reference: Optional[dict] = None) -> None:
    """Ratios of every measured row to the baselines (the rows with method ``"baseline"``) in ``rows``.

    ``ratios`` / ``mean_ratios``: median / median and mean / mean per baseline label;
    ``state_ratio``: state bytes over the first baseline's. With ``reference`` (a measured row),
    ``reference_ratio`` is the row's mean over the reference's mean.
    """
    from .common import ratio

    baselines = [r for r in rows if r["method"] == "baseline" and "error" not in r]
    for row in rows:
        if "median_ms" not in row:
            continue
        row["ratios"] = {b["label"]: ratio(row["median_ms"], b["median_ms"]) for b in baselines}
        row["mean_ratios"] = {b["label"]: ratio(row["mean_ms"], b["mean_ms"]) for b in baselines}
        row["state_ratio"] = ratio(row["state_bytes"], baselines[0]["state_bytes"]) if baselines else None
        if reference is not None and "mean_ms" in reference:
            row["reference_ratio"] = ratio(row["mean_ms"], reference["mean_ms"])
