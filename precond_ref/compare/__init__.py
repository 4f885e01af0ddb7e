"""``python -m precond_ref compare``: train small models on real data with every optimizer.

The main job of the library: an MLP and a small CNN on scikit-learn's 8x8 handwritten digits
(shipped inside scikit-learn, so it runs offline), trained from the same initial weights and the
same mini-batch order with every method of :data:`precond_ref.method_table.METHODS` (each with its
paper's recommended hyperparameters) and the SGD-momentum and Adam baselines.

By default everything runs on NumPy through the core (forward and backward written by hand in
:mod:`precond_ref.compare.digits`); ``--backend torch`` / ``jax`` runs the same through the torch and optax
adapters, ``--backend cupy`` the core on CuPy arrays. Output: a table (final train loss, test
accuracy, time per step, optimizer state size), ``loss_curves.png`` and ``compare.json`` with every
number, in ``--out``. Fixed seeds give identical numbers on a re-run (the times aside).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np

from . import digits
from ..cli import UserError, nonnegative_int, positive_int
from ..method_table import METHODS, MethodEntry

__all__ = ["add_arguments", "run", "train_one", "resolve_methods", "core_baseline"]

BACKENDS = ("numpy", "torch", "jax", "cupy")
DTYPES = ("float32", "float64")
DEFAULT_EPOCHS = 40
DEFAULT_BATCH_SIZE = 64
DEFAULT_OUT = "results"


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(entry.name for entry in METHODS)
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated subset of: {names} (default: all)",
    )
    parser.add_argument(
        "--models", default=",".join(digits.MODELS), help=f"comma-separated subset of: {', '.join(digits.MODELS)}"
    )
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help=f"mini-batch size (default {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the initial weights and batch order")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy", help="array backend (default numpy, via the core)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default float32)")
    parser.add_argument(
        "--threads", type=positive_int, default=1,
        help="BLAS / torch threads (default 1: the models are tiny, more threads only add contention)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--list", action="store_true", help="list the methods with their hyperparameters and exit")


def resolve_methods(spec: str) -> tuple[list[MethodEntry], list[dict]]:
    """The entries named by ``--methods`` that can run, and notes for those that cannot.

    Unknown names are a :class:`UserError`; known entries whose factory is not in this version of
    :mod:`precond_ref` are skipped with a note.
    """
    import precond_ref

    known = {entry.name: entry for entry in METHODS}
    if spec.strip().lower() == "all":
        wanted = list(known)
    else:
        wanted = [name.strip() for name in spec.split(",") if name.strip()]
        if not wanted:
            raise UserError("--methods is empty; give a comma-separated list or 'all'")
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(known)}")
        wanted = list(dict.fromkeys(wanted))
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
    unknown = [name for name in wanted if name not in digits.MODELS]
    if unknown or not wanted:
        raise UserError(f"unknown model(s) {', '.join(map(repr, unknown)) or '(none given)'}; available: {', '.join(digits.MODELS)}")
    return list(dict.fromkeys(wanted))


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


# ---------------------------------------------------------------------------------------------
# Baselines as core transforms (NumPy / CuPy backends)


def core_baseline(name: str, **hyperparameters: Any) -> Any:
    """SGD with heavy-ball momentum or Adam as a core :class:`~precond_ref.Transform`.

    They run through the same :func:`~precond_ref.transform.build_transform` machinery as the
    methods, so their time per step carries the same per-step overhead.
    """
    from array_api_compat import device as array_device

    from ..transform import build_transform

    if name == "sgd_momentum":
        learning_rate, momentum = hyperparameters["learning_rate"], hyperparameters["momentum"]

        def init_group(leaves: tuple, paths: tuple, xp: Any) -> dict:
            return {"trace": xp.zeros(leaves[0].shape, dtype=leaves[0].dtype, device=array_device(leaves[0]))}

        def update_group(grads: tuple, state: dict, params: Any, ctx: Any) -> tuple:
            trace = momentum * state["trace"] + grads[0]
            return (-learning_rate * trace,), {"trace": trace}

    elif name == "adam":
        learning_rate = hyperparameters["learning_rate"]
        b1, b2, eps = hyperparameters["b1"], hyperparameters["b2"], hyperparameters["eps"]

        def init_group(leaves: tuple, paths: tuple, xp: Any) -> dict:
            zeros = xp.zeros(leaves[0].shape, dtype=leaves[0].dtype, device=array_device(leaves[0]))
            return {"mu": zeros, "nu": zeros}

        def update_group(grads: tuple, state: dict, params: Any, ctx: Any) -> tuple:
            xp, g = ctx.xp, grads[0]
            mu = b1 * state["mu"] + (1.0 - b1) * g
            nu = b2 * state["nu"] + (1.0 - b2) * g * g
            t = xp.astype(ctx.count + 1, g.dtype)
            dev = array_device(g)
            c1 = 1.0 - xp.pow(xp.asarray(b1, dtype=g.dtype, device=dev), t)
            c2 = 1.0 - xp.pow(xp.asarray(b2, dtype=g.dtype, device=dev), t)
            return (-learning_rate * (mu / c1) / (xp.sqrt(nu / c2) + eps),), {"mu": mu, "nu": nu}

    else:
        raise ValueError(f"unknown baseline {name!r}")
    return build_transform(name=name, init_group=init_group, update_group=update_group)


# ---------------------------------------------------------------------------------------------
# One training session per backend: step(x, y) -> (loss, grad seconds, optimizer seconds)


def _extra_kwargs(entry: MethodEntry, batch_size: int) -> dict:
    values = {"batch_size": batch_size}
    return {name: values[name] for name in entry.update_kwargs}


def _nbytes(x: Any) -> int:
    return int(getattr(x, "nbytes", 0))


class _CoreSession:
    """NumPy or CuPy arrays, the core transform called directly."""

    def __init__(self, xp: Any, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int, sync: Callable):
        import precond_ref
        from ..tree import tree_flatten

        self.xp, self.model, self.sync = xp, model, sync
        self.dtype = getattr(xp, dtype)
        self.params = {k: {kk: xp.asarray(v, dtype=self.dtype) for kk, v in layer.items()} for k, layer in params.items()}
        kwargs = entry.kwargs_for(model)
        if entry.is_baseline:
            self.transform = core_baseline(entry.name, **kwargs)
        else:
            self.transform = getattr(precond_ref, entry.factory)(**kwargs)
        self.extra = _extra_kwargs(entry, batch_size)
        self.state = self.transform.init(self.params)
        self._flatten = tree_flatten
        self.notes: list[str] = []

    def data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return self.xp.asarray(x, dtype=self.dtype), self.xp.asarray(y)

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        import precond_ref

        start = time.perf_counter()
        loss, grads = digits.loss_and_grads(self.xp, self.model, self.params, x, y)
        self.sync()
        middle = time.perf_counter()
        updates, self.state = self.transform.update(grads, self.state, self.params, **self.extra)
        self.params = precond_ref.apply_updates(self.params, updates)
        self.sync()
        end = time.perf_counter()
        return float(loss), middle - start, end - middle

    def evaluate(self, x: Any, y: Any) -> tuple[float, float]:
        logits = digits.predict(self.xp, self.model, self.params, x)
        loss, _ = digits._cross_entropy(self.xp, logits, y)
        return float(loss), float((logits.argmax(axis=1) == y).mean())

    def state_bytes(self) -> int:
        return sum(_nbytes(leaf) for leaf in self._flatten(self.state)[0])


def _torch_kwargs(core: dict, renames: dict) -> dict:
    """Core argument names -> the torch adapters' (specs README §3): lr, betas, beta2."""
    out = dict(core)
    for core_name, torch_name in renames.items():
        if core_name in out:
            out[torch_name] = out.pop(core_name)
    if "learning_rate" in out:
        out["lr"] = out.pop("learning_rate")
    for prefix in ("", "fallback_", "graft_", "diagonal_"):
        b1, b2 = prefix + "b1", prefix + "b2"
        if b1 in out and b2 in out:
            out[prefix + "betas"] = (out.pop(b1), out.pop(b2))
        elif b2 in out:
            out[prefix + "beta2"] = out.pop(b2)
    return out


# Torch-side names that differ from the generic rule above.
_TORCH_RENAMES = {"rf_rmsprop": {"b2": "alpha"}}


def make_torch_optimizer(entry: MethodEntry, named: list, kwargs: dict) -> tuple[Any, list[str]]:
    """The torch optimizer for ``entry`` over ``named`` ``(name, tensor)`` pairs, and notes.

    Methods use their class in :mod:`precond_ref.adapters.torch` when it exists and maps the
    torch-style arguments back to exactly ``kwargs`` (checked through its ``core_kwargs``);
    otherwise the core factory is wrapped in a generic :class:`CoreOptimizer`, with a note.
    """
    import torch

    if entry.name == "sgd_momentum":
        return torch.optim.SGD([p for _, p in named], lr=kwargs["learning_rate"], momentum=kwargs["momentum"]), []
    if entry.name == "adam":
        return (
            torch.optim.Adam(
                [p for _, p in named], lr=kwargs["learning_rate"], betas=(kwargs["b1"], kwargs["b2"]), eps=kwargs["eps"], foreach=True
            ),
            [],
        )
    import precond_ref
    from precond_ref.adapters import torch as torch_adapters

    cls = getattr(torch_adapters, entry.torch_class or "", None)
    reason = f"precond_ref.adapters.torch has no {entry.torch_class}"
    if cls is not None:
        try:
            optimizer = cls(named, **_torch_kwargs(kwargs, _TORCH_RENAMES.get(entry.name, {})))
            mapped = optimizer.core_kwargs(optimizer.param_groups[0])
            differ = [k for k, v in kwargs.items() if k not in mapped or mapped[k] != v]
            if not differ:
                return optimizer, []
            reason = f"{entry.torch_class} did not map back to the core arguments {differ}"
        except TypeError as err:
            reason = f"{entry.torch_class} rejected the arguments ({err})"
    factory = getattr(precond_ref, entry.factory)
    generic = type(
        f"Core_{entry.name}",
        (torch_adapters.CoreOptimizer,),
        {
            "core_factory": staticmethod(factory),
            "core_kwargs": lambda self, group: {**group["core"], "learning_rate": group["lr"]},
        },
    )
    rest = {k: v for k, v in kwargs.items() if k != "learning_rate"}
    optimizer = generic(named, {"lr": kwargs.get("learning_rate", 1e-3), "core": rest})
    return optimizer, [f"{reason}; ran precond_ref.{entry.factory} through the generic CoreOptimizer"]


class _TorchSession:
    def __init__(self, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int, device: str):
        import torch

        self.torch, self.model, self.device = torch, model, device
        self.dtype = getattr(torch, dtype)
        self.params = {
            f"{k}.{kk}": torch.tensor(v, dtype=self.dtype, device=device, requires_grad=True)
            for k, layer in params.items()
            for kk, v in layer.items()
        }
        self.optimizer, self.notes = make_torch_optimizer(entry, list(self.params.items()), entry.kwargs_for(model))
        self.extra = _extra_kwargs(entry, batch_size)

    def _sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return (
            self.torch.tensor(x, dtype=self.dtype, device=self.device),
            self.torch.tensor(y, dtype=self.torch.int64, device=self.device),
        )

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = digits.torch_loss(self.model, self.params, x, y)
        loss.backward()
        self._sync()
        middle = time.perf_counter()
        self.optimizer.step(**self.extra)
        self._sync()
        end = time.perf_counter()
        return loss.item(), middle - start, end - middle

    def evaluate(self, x: Any, y: Any) -> tuple[float, float]:
        with self.torch.no_grad():
            logits = digits.torch_logits(self.model, self.params, x)
            loss = self.torch.nn.functional.cross_entropy(logits, y)
            return loss.item(), (logits.argmax(dim=1) == y).double().mean().item()

    def state_bytes(self) -> int:
        total = 0
        for entries in self.optimizer.state.values():
            for value in entries.values():
                if isinstance(value, self.torch.Tensor):
                    total += value.numel() * value.element_size()
        return total


class _JaxSession:
    def __init__(self, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int):
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.jnp, self.model = jax, jnp, model
        self.dtype = getattr(jnp, dtype)
        self.params = {k: {kk: jnp.asarray(v, dtype=self.dtype) for kk, v in layer.items()} for k, layer in params.items()}
        kwargs = entry.kwargs_for(model)
        self.notes: list[str] = []
        if entry.name == "sgd_momentum":
            optimizer = optax.sgd(kwargs["learning_rate"], momentum=kwargs["momentum"])
        elif entry.name == "adam":
            optimizer = optax.adam(kwargs["learning_rate"], b1=kwargs["b1"], b2=kwargs["b2"], eps=kwargs["eps"])
        else:
            import precond_ref
            from precond_ref.adapters import jax as jax_adapters

            factory = getattr(jax_adapters, entry.factory, None)
            if factory is None:
                self.notes.append(f"precond_ref.adapters.jax has no {entry.factory}; wrapped the core with to_optax")
                optimizer = jax_adapters.to_optax(getattr(precond_ref, entry.factory)(**kwargs))
            else:
                optimizer = factory(**kwargs)
        extra = _extra_kwargs(entry, batch_size)
        self.state = optimizer.init(self.params)

        def loss_fn(p: Any, x: Any, y: Any) -> Any:
            return digits.jax_loss(model, p, x, y)

        def update(grads: Any, state: Any, p: Any) -> tuple[Any, Any]:
            updates, state = optimizer.update(grads, state, p, **extra)
            return optax.apply_updates(p, updates), state

        self._grad = jax.jit(jax.value_and_grad(loss_fn))
        self._update = jax.jit(update)
        self._logits = jax.jit(lambda p, x: digits.jax_logits(model, p, x))

    def data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return self.jnp.asarray(x, dtype=self.dtype), self.jnp.asarray(y)

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        start = time.perf_counter()
        loss, grads = self._grad(self.params, x, y)
        self.jax.block_until_ready(grads)
        middle = time.perf_counter()
        self.params, self.state = self._update(grads, self.state, self.params)
        self.jax.block_until_ready(self.params)
        end = time.perf_counter()
        return float(loss), middle - start, end - middle

    def evaluate(self, x: Any, y: Any) -> tuple[float, float]:
        logits = self._logits(self.params, x)
        log_probs = self.jax.nn.log_softmax(logits, axis=1)
        loss = -self.jnp.mean(self.jnp.take_along_axis(log_probs, y[:, None], axis=1))
        return float(loss), float(self.jnp.mean(logits.argmax(axis=1) == y))

    def state_bytes(self) -> int:
        return sum(_nbytes(leaf) for leaf in self.jax.tree_util.tree_leaves(self.state))


def _make_session(backend: str, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int) -> Any:
    if backend == "numpy":
        return _CoreSession(np, entry, model, params, dtype, batch_size, sync=lambda: None)
    if backend == "cupy":
        import cupy

        return _CoreSession(cupy, entry, model, params, dtype, batch_size, sync=cupy.cuda.Device().synchronize)
    if backend == "torch":
        import torch

        return _TorchSession(entry, model, params, dtype, batch_size, "cuda" if torch.cuda.is_available() else "cpu")
    return _JaxSession(entry, model, params, dtype, batch_size)


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def train_one(
    entry: MethodEntry,
    model: str,
    data: tuple[np.ndarray, ...],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    backend: str = "numpy",
    dtype: str = "float32",
    progress: bool = False,
) -> dict:
    """Train ``model`` with ``entry`` and return every number of the run (JSON-ready).

    The initial weights depend on ``seed`` only (not on the method) and the mini-batch order on
    ``seed`` and the epoch, so every method sees the same data in the same order. The last
    incomplete batch of an epoch is dropped (fixed shapes: no recompilation under ``jax.jit``).
    """
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = len(x_train) // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {batch_size} is larger than the training set ({len(x_train)} examples)")
    session = _make_session(backend, entry, model, digits.init_params(model, seed), dtype, batch_size)
    train_all, test_all = session.data(x_train, y_train), session.data(x_test, y_test)
    step_losses: list[Optional[float]] = []
    epoch_losses: list[Optional[float]] = []
    epoch_accuracies: list[float] = []
    grad_times: list[float] = []
    opt_times: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{model:>3} {entry.label:<12}", leave=False, unit="step", file=sys.stderr)
    started = time.perf_counter()
    try:
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch]).permutation(len(x_train))
            losses = []
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                xb, yb = session.data(x_train[index], y_train[index])
                loss, grad_s, opt_s = session.step(xb, yb)
                losses.append(loss)
                step_losses.append(_finite(loss))
                grad_times.append(grad_s)
                opt_times.append(opt_s)
                if bar is not None:
                    bar.update(1)
            epoch_losses.append(_finite(float(np.mean(losses))))
            epoch_accuracies.append(session.evaluate(*test_all)[1])
            if bar is not None:
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", acc=f"{epoch_accuracies[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - started
    train_loss, train_accuracy = session.evaluate(*train_all)
    test_loss, test_accuracy = session.evaluate(*test_all)
    # The first step compiles (JAX) or allocates (everyone): the median of the others is reported.
    timed = slice(1, None) if len(opt_times) > 1 else slice(None)
    opt_ms = 1e3 * float(np.median(opt_times[timed]))
    step_ms = 1e3 * float(np.median(np.add(grad_times, opt_times)[timed]))
    return {
        "method": entry.name,
        "label": entry.label,
        "model": model,
        "hyperparameters": entry.kwargs_for(model),
        "update_kwargs": _extra_kwargs(entry, batch_size),
        "final_train_loss": _finite(train_loss),
        "final_train_accuracy": train_accuracy,
        "test_loss": _finite(test_loss),
        "test_accuracy": test_accuracy,
        "step_ms": step_ms,
        "optimizer_ms": opt_ms,
        "state_bytes": session.state_bytes(),
        "param_count": int(sum(v.size for layer in digits.init_params(model, seed).values() for v in layer.values())),
        "steps": len(step_losses),
        "wall_s": wall,
        "epoch_train_loss": epoch_losses,
        "epoch_test_accuracy": epoch_accuracies,
        "step_loss": step_losses,
        "notes": session.notes,
    }


# ---------------------------------------------------------------------------------------------
# Output


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        pass
    return info


def _format_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _fmt(value: Optional[float], spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def format_table(runs: list[dict]) -> str:
    """The results as a Markdown table (one row per method and model)."""
    header = "| model | method | final train loss | test accuracy | ms / step | optimizer ms / step | optimizer state |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['label']} | error | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['label']} | {_fmt(r['final_train_loss'], '.4f')} | {100 * r['test_accuracy']:.1f}% "
            f"| {r['step_ms']:.2f} | {r['optimizer_ms']:.2f} | {_format_bytes(r['state_bytes'])} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in runs if "error" not in r))
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        for r in (r for r in runs if r["model"] == model and "error" not in r):
            epochs = np.arange(1, len(r["epoch_train_loss"]) + 1)
            losses = [np.nan if v is None else v for v in r["epoch_train_loss"]]
            style = "--" if r["method"] in ("sgd_momentum", "adam") else "-"
            axes[0, column].plot(epochs, losses, style, label=r["label"])
            axes[1, column].plot(epochs, 100 * np.asarray(r["epoch_test_accuracy"]), style, label=r["label"])
        axes[0, column].set(title=f"{model}: training loss (epoch mean)", xlabel="epoch", ylabel="cross-entropy", yscale="log")
        axes[1, column].set(title=f"{model}: test accuracy", xlabel="epoch", ylabel="%")
        axes[0, column].legend(fontsize=8)
        axes[0, column].grid(alpha=0.3)
        axes[1, column].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _check_backend(backend: str, dtype: str) -> None:
    if backend == "torch":
        try:
            import torch  # noqa: F401
            from precond_ref.adapters import torch as _  # noqa: F401
        except ImportError as err:
            raise UserError(f"--backend torch needs PyTorch (pip install 'precond-ref[torch]'): {err}") from None
    elif backend == "jax":
        try:
            import jax
            import optax  # noqa: F401
            from precond_ref.adapters import jax as _  # noqa: F401,F811
        except ImportError as err:
            raise UserError(f"--backend jax needs JAX and optax (pip install 'precond-ref[jax]'): {err}") from None
        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
    elif backend == "cupy":
        try:
            import cupy
        except ImportError as err:
            raise UserError(f"--backend cupy needs CuPy (pip install 'precond-ref[cupy]'): {err}") from None
        if not cupy.is_available():
            raise UserError("--backend cupy needs a CUDA device, and cupy.is_available() is False on this machine")


@contextlib.contextmanager
def _thread_limit(threads: int, backend: str) -> Iterator[None]:
    """Limit BLAS (threadpoolctl) and torch intra-op threads for the duration of the runs."""
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


def _train_all(runs: list, entries: list, models: list, data: tuple, args: argparse.Namespace, progress: bool) -> None:
    for model in models:
        for entry in entries:
            try:
                result = train_one(
                    entry, model, data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                    backend=args.backend, dtype=args.dtype, progress=progress,
                )
            except UserError:
                raise
            except Exception as err:  # one failing method must not hide the others' results
                result = {"method": entry.name, "label": entry.label, "model": model, "error": f"{type(err).__name__}: {err}"}
                print(f"{model} {entry.label}: FAILED: {result['error']}", file=sys.stderr)
            else:
                if progress:
                    print(
                        f"{model:>3} {entry.label:<12} loss {_fmt(result['final_train_loss'], '.4f')}  "
                        f"test acc {100 * result['test_accuracy']:.1f}%  {result['wall_s']:.1f} s",
                        file=sys.stderr,
                    )
                for note in result["notes"]:
                    print(f"{model} {entry.label}: note: {note}", file=sys.stderr)
            runs.append(result)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(_describe(list(METHODS), list(digits.MODELS)))
        return 0
    entries, skipped = resolve_methods(args.methods)
    models = _resolve_models(args.models)
    _check_backend(args.backend, args.dtype)
    for module in ("sklearn", "tqdm", "threadpoolctl") + (() if args.no_plot else ("matplotlib",)):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"compare needs {module}: pip install 'precond-ref[compare]'") from None
    out_dir = _prepare_out_dir(args.out)
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}", file=sys.stderr)
    if not entries:
        raise UserError("none of the requested methods is available in this version")

    data = digits.load_digits_split()
    progress = not args.no_progress
    print(
        f"digits 8x8: {len(data[0])} training / {len(data[2])} test images; models {', '.join(models)}; "
        f"{args.epochs} epochs of {len(data[0]) // args.batch_size} steps (batch {args.batch_size}); "
        f"backend {args.backend}, {args.dtype}, seed {args.seed}",
        file=sys.stderr,
    )
    runs: list[dict] = []
    started = time.perf_counter()
    with _thread_limit(args.threads, args.backend):
        _train_all(runs, entries, models, data, args, progress)
    total = time.perf_counter() - started

    machine = _machine()
    table = format_table(runs)
    print(table)
    print(f"\n{len(runs)} runs in {total:.1f} s on {machine['processor']} ({machine.get('usable_cpus', machine['cpu_count'])} CPUs), backend {args.backend}")
    for note in skipped:
        print(f"skipped {note['method']}: {note['reason']}")
    print("\nHyperparameters (core argument names) and their sources:")
    print(_describe(entries, models))

    report = {
        "command": "compare",
        "settings": {
            "methods": [e.name for e in entries], "models": models, "epochs": args.epochs, "batch_size": args.batch_size,
            "seed": args.seed, "backend": args.backend, "dtype": args.dtype, "threads": args.threads,
        },
        "data": {"name": "sklearn digits 8x8", "train": len(data[0]), "test": len(data[2]), "split_seed": 0},
        "machine": machine,
        "total_s": total,
        "skipped": skipped,
        "references": {e.name: e.reference for e in entries},
        "runs": runs,
    }
    json_path = os.path.join(out_dir, "compare.json")
    try:
        with open(json_path, "w") as handle:
            json.dump(report, handle, indent=1)
        if not args.no_plot:
            plot_path = os.path.join(out_dir, "loss_curves.png")
            plot(runs, plot_path, f"precond_ref compare: digits 8x8, backend {args.backend}, seed {args.seed}, {machine['processor']}")
            print(f"plot: {plot_path}")
    except OSError as err:
        raise UserError(f"cannot write results to {out_dir!r}: {err.strerror or err}") from None
    print(f"numbers: {json_path}")
    return 1 if any("error" in r for r in runs) else 0
