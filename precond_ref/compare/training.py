"""Training runs of ``compare``: one model, one optimizer, one seed, on any backend.

:func:`train_one` is the unit the command is built from (the learning-rate sweep and the final
runs are calls of it). By default it runs on NumPy through the core (forward and backward written
by hand in :mod:`precond_ref.compare.digits`); ``backend="torch"`` / ``"jax"`` runs the same
through the torch and optax adapters, ``"cupy"`` the core on CuPy arrays.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import numpy as np

from . import digits
from ..cli import UserError
from .methods import MethodEntry

__all__ = ["train_one", "core_baseline", "make_torch_optimizer", "resolve_device"]


# ---------------------------------------------------------------------------------------------
# Baselines as core transforms (NumPy / CuPy backends)


def core_baseline(name: str, **hyperparameters: Any) -> Any:
    """SGD with heavy-ball momentum or Adam as a core :class:`~precond_ref.Transform`.

    They run through the same :func:`~precond_ref.engine.build_transform` machinery as the
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
            c1 = 1.0 - xp.pow(xp.full((), b1, dtype=g.dtype, device=dev), t)  # a fill kernel, not a host copy
            c2 = 1.0 - xp.pow(xp.full((), b2, dtype=g.dtype, device=dev), t)
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

    def __init__(
        self, xp: Any, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int, sync: Callable,
        kwargs: dict, device: Any = None,
    ):
        import precond_ref
        from ..tree import tree_flatten

        self.xp, self.model, self.sync, self.device = xp, model, sync, device
        self.dtype = getattr(xp, dtype)
        with self._on_device():
            self.params = {k: {kk: xp.asarray(v, dtype=self.dtype) for kk, v in layer.items()} for k, layer in params.items()}
        if entry.is_baseline:
            self.transform = core_baseline(entry.name, **kwargs)
        else:
            self.transform = getattr(precond_ref, entry.factory)(**kwargs)
        if device is not None:  # CuPy: each pattern's step captured once as a CUDA graph and replayed
            from ..adapters.cupy import captured

            self.transform = captured(self.transform)
        self.extra = _extra_kwargs(entry, batch_size)
        with self._on_device():
            self.state = self.transform.init(self.params)
        self._flatten = tree_flatten
        self.notes: list[str] = []

    def _on_device(self) -> Any:
        # CuPy places new arrays on the current device; NumPy has one device.
        import contextlib

        return self.xp.cuda.Device(self.device) if self.device is not None else contextlib.nullcontext()

    def data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        with self._on_device():
            return self.xp.asarray(x, dtype=self.dtype), self.xp.asarray(y)

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        import precond_ref

        with self._on_device():
            start = time.perf_counter()
            loss, grads = digits.loss_and_grads(self.xp, self.model, self.params, x, y)
            self.sync()
            middle = time.perf_counter()
            updates, self.state = self.transform.update(grads, self.state, self.params, **self.extra)
            self.params = precond_ref.apply_updates(self.params, updates)
            self.sync()
            end = time.perf_counter()
        return float(loss), middle - start, end - middle

    def evaluate(self, x: Any, y: Any) -> tuple[float, Optional[float]]:
        with self._on_device():
            return digits.evaluate(self.xp, self.model, self.params, x, y)

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


def make_torch_optimizer(
    entry: MethodEntry, named: list, kwargs: dict, options: Optional[dict] = None
) -> tuple[Any, list[str]]:
    """The torch optimizer for ``entry`` over ``named`` ``(name, tensor)`` pairs, and notes.

    Methods use their class in :mod:`precond_ref.adapters.torch` when it exists and maps the
    torch-style arguments back to exactly ``kwargs`` (checked through its ``core_kwargs``);
    otherwise the core factory is wrapped in a generic :class:`CoreOptimizer`, with a note.
    ``options`` are adapter arguments that are not core arguments (``bench`` passes ``compile=``);
    a ``TypeError`` naming one of them propagates instead of falling back.
    """
    import torch

    options = options or {}
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
    from precond_ref.adapters._torch_methods import _batch_size_at_each_step

    cls = getattr(torch_adapters, entry.torch_class or "", None)
    reason = f"precond_ref.adapters.torch has no {entry.torch_class}"
    if cls is not None:
        try:
            # The callers give the entry's update_kwargs (batch_size included) at every step.
            with _batch_size_at_each_step():
                optimizer = cls(named, **_torch_kwargs(kwargs, _TORCH_RENAMES.get(entry.name, {})), **options)
            mapped = optimizer.core_kwargs(optimizer.param_groups[0])
            differ = [k for k, v in kwargs.items() if k not in mapped or mapped[k] != v]
            if not differ:
                return optimizer, []
            reason = f"{entry.torch_class} did not map back to the core arguments {differ}"
        except TypeError as err:
            if any(repr(name) in str(err) or f"{name}=" in str(err) for name in options):
                raise
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
    optimizer = generic(named, {"lr": kwargs.get("learning_rate", 1e-3), "core": rest}, **options)
    return optimizer, [f"{reason}; ran precond_ref.{entry.factory} through the generic CoreOptimizer"]


class _TorchSession:
    def __init__(self, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int, device: str, kwargs: dict):
        import torch

        self.torch, self.model, self.device = torch, model, device
        self.dtype = getattr(torch, dtype)
        self.params = {
            f"{k}.{kk}": torch.tensor(v, dtype=self.dtype, device=device, requires_grad=True)
            for k, layer in params.items()
            for kk, v in layer.items()
        }
        self.optimizer, self.notes = make_torch_optimizer(entry, list(self.params.items()), kwargs)
        self.extra = _extra_kwargs(entry, batch_size)

    def _sync(self) -> None:
        if self.torch.device(self.device).type == "cuda":
            self.torch.cuda.synchronize(self.device)

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

    def evaluate(self, x: Any, y: Any) -> tuple[float, Optional[float]]:
        with self.torch.no_grad():
            loss = digits.torch_loss(self.model, self.params, x, y).item()
            if self.model not in digits.CLASSIFIERS:
                return loss, None
            logits = digits.torch_logits(self.model, self.params, x)
            return loss, (logits.argmax(dim=1) == y).double().mean().item()

    def state_bytes(self) -> int:
        total = 0
        for entries in self.optimizer.state.values():
            for value in entries.values():
                if isinstance(value, self.torch.Tensor):
                    total += value.numel() * value.element_size()
        return total


class _JaxSession:
    def __init__(self, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int, kwargs: dict):
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.jnp, self.model = jax, jnp, model
        self.dtype = getattr(jnp, dtype)
        self.params = {k: {kk: jnp.asarray(v, dtype=self.dtype) for kk, v in layer.items()} for k, layer in params.items()}
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
        self._loss = jax.jit(loss_fn)

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

    def evaluate(self, x: Any, y: Any) -> tuple[float, Optional[float]]:
        loss = float(self._loss(self.params, x, y))
        if self.model not in digits.CLASSIFIERS:
            return loss, None
        return loss, float(self.jnp.mean(self._logits(self.params, x).argmax(axis=1) == y))

    def state_bytes(self) -> int:
        return sum(_nbytes(leaf) for leaf in self.jax.tree_util.tree_leaves(self.state))


def resolve_device(backend: str, device: Optional[str]) -> Any:
    """The device a backend runs on, from ``--device``; never picked silently.

    NumPy and JAX take no ``--device`` (JAX uses its default device: set ``JAX_PLATFORMS``).
    torch takes any ``torch.device`` string (``cpu`` by default, ``cuda``, ``cuda:1``, ``mps``);
    CuPy a CUDA device index (``0`` by default, or ``cuda:1``). Returns what the session needs:
    the torch device string, or the CuPy device index.
    """
    if backend in ("numpy", "jax"):
        if device not in (None, "cpu" if backend == "numpy" else None):
            hint = "" if backend == "numpy" else " (JAX uses its default device; choose it with JAX_PLATFORMS=cpu|cuda)"
            raise UserError(f"--device is not supported with --backend {backend}{hint}")
        return None
    if backend == "torch":
        import torch

        text = device or "cpu"
        try:
            dev = torch.device(text)
        except RuntimeError as err:
            raise UserError(f"--device {text!r} is not a torch device ({err})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {text} needs CUDA, and torch.cuda.is_available() is False on this machine")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {text}: torch.backends.mps.is_available() is False on this machine")
        return str(dev)
    import cupy

    text = (device or "0").removeprefix("cuda:")
    if not text.isdigit():
        raise UserError(f"--device {device!r}: --backend cupy takes a CUDA device index (0, 1, ... or cuda:N)")
    if int(text) >= cupy.cuda.runtime.getDeviceCount():
        raise UserError(f"--device {device}: this machine has {cupy.cuda.runtime.getDeviceCount()} CUDA device(s)")
    return int(text)


def _make_session(
    backend: str, entry: MethodEntry, model: str, params: dict, dtype: str, batch_size: int, kwargs: dict, device: Any
) -> Any:
    if backend == "numpy":
        return _CoreSession(np, entry, model, params, dtype, batch_size, sync=lambda: None, kwargs=kwargs)
    if backend == "cupy":
        import cupy

        return _CoreSession(
            cupy, entry, model, params, dtype, batch_size, sync=cupy.cuda.Device(device).synchronize, kwargs=kwargs,
            device=device,
        )
    if backend == "torch":
        return _TorchSession(entry, model, params, dtype, batch_size, device or "cpu", kwargs)
    return _JaxSession(entry, model, params, dtype, batch_size, kwargs)


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
    device: Any = None,
    learning_rate: Optional[float] = None,
    curves: bool = True,
    on_steps: Optional[Callable[[int], None]] = None,
) -> dict:
    """Train ``model`` with ``entry`` and return every number of the run (JSON-ready).

    ``data`` is ``(x_train, y_train, x_eval, y_eval)``: the evaluation set is the validation
    split during the learning-rate sweep and the test set in the final runs. ``learning_rate``
    replaces the table's value (the other hyperparameters stay as published). ``curves`` records
    the evaluation loss and accuracy after every epoch (the sweep needs only the last).
    ``on_steps(n)`` is called after every epoch with its number of steps (progress bars).

    The initial weights depend on ``seed`` only (not on the method) and the mini-batch order on
    ``seed`` and the epoch, so every method sees the same data in the same order. The last
    incomplete batch of an epoch is dropped (fixed shapes: no recompilation under ``jax.jit``).
    A run whose training loss stops being finite ends there (``"diverged": true``); the rest of
    its progress is reported as done.
    """
    x_train, y_train, x_eval, y_eval = data
    steps_per_epoch = len(x_train) // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {batch_size} is larger than the training set ({len(x_train)} examples)")
    kwargs = entry.kwargs_for(model)
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    initial = digits.init_params(model, seed)
    session = _make_session(backend, entry, model, initial, dtype, batch_size, kwargs, device)
    train_all, eval_all = session.data(x_train, y_train), session.data(x_eval, y_eval)
    # The loss of the initial weights on the whole training set: a run that ends at or above it
    # learned nothing (report.failure).
    initial_train_loss, _ = session.evaluate(*train_all)
    step_losses: list[Optional[float]] = []
    epoch_losses: list[Optional[float]] = []
    epoch_eval_losses: list[Optional[float]] = []
    epoch_accuracies: list[Optional[float]] = []
    grad_times: list[float] = []
    opt_times: list[float] = []
    diverged = False
    started = time.perf_counter()
    # Overflow is how a too-large learning rate shows: it is detected and reported as "diverged",
    # so NumPy's warnings about it would only be noise.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
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
                if not math.isfinite(loss):
                    diverged = True
                    break
            epoch_losses.append(_finite(float(np.mean(losses))))
            if curves:
                eval_loss, eval_accuracy = session.evaluate(*eval_all)
                epoch_eval_losses.append(_finite(eval_loss))
                epoch_accuracies.append(eval_accuracy)
            if on_steps is not None:
                on_steps(steps_per_epoch * (epochs - epoch) if diverged else steps_per_epoch)
            if diverged:
                break
        wall = time.perf_counter() - started
        train_loss, train_accuracy = session.evaluate(*train_all)
        eval_loss, eval_accuracy = session.evaluate(*eval_all)
    # The first step compiles (JAX) or allocates (everyone): the median of the others is reported.
    timed = slice(1, None) if len(opt_times) > 1 else slice(None)
    opt_ms = 1e3 * float(np.median(opt_times[timed]))
    step_ms = 1e3 * float(np.median(np.add(grad_times, opt_times)[timed]))
    return {
        "method": entry.name,
        "label": entry.label,
        "model": model,
        "seed": seed,
        "hyperparameters": kwargs,
        "update_kwargs": _extra_kwargs(entry, batch_size),
        "diverged": diverged or not math.isfinite(train_loss),
        "initial_train_loss": _finite(initial_train_loss),
        "final_train_loss": _finite(train_loss),
        "final_train_accuracy": train_accuracy,
        "test_loss": _finite(eval_loss),
        "test_accuracy": eval_accuracy if eval_accuracy is None or math.isfinite(eval_loss) else None,
        "eval_examples": int(len(y_eval)),
        "step_ms": step_ms,
        "optimizer_ms": opt_ms,
        "state_bytes": session.state_bytes(),
        "param_count": int(sum(v.size for layer in initial.values() for v in layer.values())),
        "steps": len(step_losses),
        "wall_s": wall,
        "epoch_train_loss": epoch_losses,
        "epoch_test_loss": epoch_eval_losses,
        "epoch_test_accuracy": epoch_accuracies,
        "step_loss": step_losses,
        "notes": session.notes,
    }
