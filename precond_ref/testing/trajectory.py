"""Trajectories: run an optimizer on a standard problem and record every step.

A :class:`Trajectory` holds the parameters before the first update and after each update, the
loss at each of them, and the gradients the optimizer was given. It is produced for any method of
this library by :func:`reference_trajectory` (methods are looked up by name on ``precond_ref``, so
a new method needs no change here), for any ``init``/``update`` pair (a core ``Transform`` or an
optax ``GradientTransformation``) by :func:`transform_trajectory`, and for any
``torch.optim.Optimizer`` by :func:`torch_trajectory`. :func:`save_trajectory` writes the trace
file format documented in ``docs/trace-format.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
from typing import Any, Callable, Optional, Sequence

from ..engine.options import dtype_name
from ..tree import path_str, tree_flatten, tree_unflatten
from .backends import _NAMESPACES, resolve_dtype, resolve_namespace
from .problems import Problem, get_problem

__all__ = [
    "Trajectory",
    "available_methods",
    "make_method",
    "reference_trajectory",
    "transform_trajectory",
    "torch_trajectory",
    "save_trajectory",
    "load_trajectory",
    "resolve_namespace",
    "resolve_dtype",
    "to_numpy",
    "TRACE_FORMAT",
    "TRACE_FORMAT_VERSION",
]

TRACE_FORMAT = "precond_ref-trace"
TRACE_FORMAT_VERSION = 1

def to_numpy(x: Any) -> Any:
    """A NumPy copy of an array of any backend (host transfer for GPU arrays). Needs NumPy."""
    import numpy as np

    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch
        return x.detach().cpu().numpy().copy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    try:
        return np.array(x, copy=True)
    except (TypeError, ValueError):
        return np.from_dlpack(x).copy()


# ---------------------------------------------------------------------------------------------
# Method registry: every public factory of precond_ref with a learning_rate argument.


def _factories() -> dict[str, Callable]:
    import precond_ref

    found = {}
    for name in getattr(precond_ref, "__all__", ()):
        obj = getattr(precond_ref, name, None)
        if not inspect.isfunction(obj):
            continue
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError):  # pragma: no cover
            continue
        if "learning_rate" in parameters:
            found[name] = obj
    return dict(sorted(found.items()))


def available_methods() -> list[str]:
    """Names of the methods :func:`reference_trajectory` and ``trace`` accept.

    These are the factories exported by ``precond_ref`` (every public function with a
    ``learning_rate`` argument), so a newly added method appears here without changes.
    """
    return list(_factories())


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def make_method(method: str, config: Optional[dict] = None, problem: Optional[Problem] = None) -> tuple[Any, dict]:
    """Build the transform of method ``method`` with ``config``; return it and its exact configuration.

    The exact configuration lists every argument of the factory with the value used (defaults
    included). Filled in from ``problem`` when not given: ``learning_rate`` (the problem's
    ``default_learning_rate``, chosen for the problem, rather than the factory's default) and
    ``batch_size`` for methods that take one (the problem's ``batch_size``). An unknown method or configuration key raises ``ValueError``
    listing the valid ones; an invalid value raises the factory's ``ValueError``.
    """
    factories = _factories()
    if method not in factories:
        raise ValueError(f"unknown method {method!r}; available methods: {', '.join(factories) or '(none)'}")
    factory = factories[method]
    config = dict(config or {})
    signature = inspect.signature(factory)
    valid = [
        name
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown configuration key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for method {method!r}; valid keys: {', '.join(valid)}"
        )
    parameters = signature.parameters
    if problem is not None:
        lr = parameters.get("learning_rate")
        if lr is not None and "learning_rate" not in config:
            config["learning_rate"] = problem.default_learning_rate
        if "batch_size" in parameters and config.get("batch_size") is None:
            config["batch_size"] = problem.batch_size
    missing = [n for n in valid if parameters[n].default is inspect.Parameter.empty and n not in config]
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(missing)}")
    bound = signature.bind(**config)
    bound.apply_defaults()
    return factory(**config), dict(bound.arguments)


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trajectory:
    """A recorded optimization run.

    Attributes
    ----------
    method:
        The method's name (or a description of the user's optimizer).
    problem:
        The problem's name.
    config:
        The exact configuration (every factory argument, defaults included) or ``{}``.
    params:
        ``steps + 1`` parameter trees: ``params[0]`` initial, ``params[t]`` after ``t`` updates.
    losses:
        ``steps + 1`` floats: the loss at ``params[t]`` on step ``t``'s data.
    grads:
        ``steps`` gradient trees: ``grads[t]`` was given to update ``t`` (evaluated at ``params[t]``).
    dtype, backend:
        The dtype and array backend the run used.
    problem_options:
        The problem's constructor arguments (its seed, ...).
    version:
        ``precond_ref.__version__`` of the library that produced it.
    """

    method: str
    problem: str
    config: dict
    params: list
    losses: list
    grads: list
    dtype: str
    backend: str
    problem_options: dict = dataclasses.field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        # The dtype is kept as its name ("float64"): the comparison picks its tolerances from it
        # and the trace file stores it as text, neither of which can read a backend's dtype object.
        if not isinstance(self.dtype, str):
            self.dtype = dtype_name(self.dtype)

    @property
    def steps(self) -> int:
        """Number of updates recorded."""
        return len(self.params) - 1

    @property
    def paths(self) -> list[str]:
        """Leaf paths of the parameters (``"fc1/weight"``), in tree order."""
        return [path_str(p) for p in tree_flatten(self.params[0])[1].paths]

    def leaf(self, path: str) -> Any:
        """One parameter across the run, as a NumPy array of shape ``(steps + 1, *shape)``."""
        import numpy as np

        paths = self.paths
        if path not in paths:
            raise ValueError(f"no parameter {path!r} in this trajectory; its parameters: {', '.join(paths)}")
        index = paths.index(path)
        return np.stack([to_numpy(tree_flatten(p)[0][index]) for p in self.params])

    def __repr__(self) -> str:
        return (
            f"Trajectory(method={self.method!r}, problem={self.problem!r}, steps={self.steps}, "
            f"dtype={self.dtype!r}, backend={self.backend!r}, final loss={self.losses[-1]:.6g})"
        )


def _backend_name(xp: Any) -> str:
    name = getattr(xp, "__name__", str(xp))
    for short, module in _NAMESPACES.items():
        if name == module or name == short:
            return short
    return name


def transform_trajectory(
    transform: Any,
    problem: "str | Problem",
    steps: int,
    *,
    xp: Any = None,
    dtype: Any = "float64",
    device: Any = None,
    update_kwargs: Optional[dict] = None,
    name: str = "custom",
    config: Optional[dict] = None,
    jit: Optional[bool] = None,
) -> Trajectory:
    """Run any ``init``/``update`` pair on ``problem`` for ``steps`` updates.

    ``transform`` is a :class:`precond_ref.Transform` or an optax ``GradientTransformation``
    (for JAX pass ``xp="jax"``): ``state = transform.init(params)``, then per step
    ``updates, state = transform.update(grads, state, params, **update_kwargs)`` and
    ``params = params + updates``. ``jit`` (default: on JAX) runs ``update`` under ``jax.jit``.
    ``name`` and ``config`` are recorded in the trajectory.
    """
    from ..transform import apply_updates

    problem = get_problem(problem)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    xp = resolve_namespace(xp)
    dtype = resolve_dtype(xp, dtype)
    params = problem.init_params(xp, dtype, device)
    state = transform.init(params)
    kwargs = dict(update_kwargs or {})
    update = transform.update
    if jit is None:
        jit = _backend_name(xp) == "jax" and (config or {}).get("on_nonfinite") != "raise"
    if jit:
        jax = importlib.import_module("jax")
        update = jax.jit(lambda g, s, p: transform.update(g, s, p, **kwargs))
        kwargs = {}
    history, losses, grads_seen = [params], [], []
    for t in range(steps):
        loss, grads = problem.value_and_grad(params, t)
        losses.append(float(loss))
        updates, state = update(grads, state, params, **kwargs)
        params = apply_updates(params, _like(updates, params))
        history.append(params)
        grads_seen.append(grads)
    losses.append(float(problem.loss(params, steps)))
    return Trajectory(
        method=name,
        problem=problem.name,
        config=dict(config or {}),
        params=history,
        losses=losses,
        grads=grads_seen,
        dtype=dtype_name(dtype),
        backend=_backend_name(xp),
        problem_options=problem.options(),
        version=_version(),
    )


def reference_trajectory(
    method: str,
    problem: "str | Problem",
    steps: int,
    config: Optional[dict] = None,
    *,
    xp: Any = None,
    dtype: Any = "float64",
    device: Any = None,
) -> Trajectory:
    """The trajectory of ``precond_ref``'s method ``method`` on ``problem``.

    Parameters
    ----------
    method:
        A method name, one of :func:`available_methods` (e.g. ``"agd"``).
    problem:
        A problem name, one of :func:`precond_ref.testing.available_problems`, or a
        :class:`~precond_ref.testing.Problem`.
    steps:
        Number of updates.
    config:
        Keyword arguments of the method's factory (``{"learning_rate": 1e-2, "mode": "faithful"}``).
        The learning rate defaults to the problem's; ``batch_size`` to the problem's.
    xp, dtype, device:
        Backend (name or namespace; NumPy by default), dtype (name or dtype; float64 by default) and
        device of the run.

    Returns
    -------
    Trajectory
        With ``config`` holding the exact configuration used (defaults included).
    """
    problem = get_problem(problem)
    transform, exact = make_method(method, config, problem)
    return transform_trajectory(transform, problem, steps, xp=xp, dtype=dtype, device=device, name=method, config=exact)


def torch_trajectory(
    make_optimizer: Callable[[list], Any],
    problem: "str | Problem",
    steps: int,
    *,
    dtype: Any = "float64",
    device: Any = "cpu",
    named: bool = False,
    step_kwargs: Optional[dict] = None,
    name: str = "torch optimizer",
) -> Trajectory:
    """Run a ``torch.optim.Optimizer`` on ``problem`` and record its trajectory.

    ``make_optimizer(params)`` builds the optimizer from a list of leaf tensors (in the problem's
    tree order, ``requires_grad=True``), or of ``(name, tensor)`` pairs with dotted names
    (``"fc1.weight"``) when ``named`` is true. Each step sets every ``.grad`` to the problem's
    gradient and calls ``optimizer.step(**step_kwargs)``. ``dtype`` is a name (``"float64"``) or a
    torch dtype; the trajectory records its name.
    """
    problem = get_problem(problem)
    xp = resolve_namespace("torch")
    torch_dtype = resolve_dtype(xp, dtype)
    leaves, treedef = tree_flatten(problem.init_params(xp, torch_dtype, device))
    leaves = [leaf.requires_grad_(True) for leaf in leaves]
    names = [".".join(str(k) for k in path) for path in treedef.paths]
    optimizer = make_optimizer(list(zip(names, leaves)) if named else list(leaves))

    def snapshot() -> Any:
        return tree_unflatten(treedef, [leaf.detach().clone() for leaf in leaves])

    history, losses, grads_seen = [snapshot()], [], []
    for t in range(steps):
        loss, grads = problem.value_and_grad(history[-1], t)
        losses.append(float(loss))
        for leaf, grad in zip(leaves, tree_flatten(grads)[0]):
            leaf.grad = grad.clone()
        optimizer.step(**(step_kwargs or {}))
        history.append(snapshot())
        grads_seen.append(grads)
    losses.append(float(problem.loss(history[-1], steps)))
    return Trajectory(
        method=name,
        problem=problem.name,
        config={},
        params=history,
        losses=losses,
        grads=grads_seen,
        dtype=dtype_name(torch_dtype),
        backend="torch",
        problem_options=problem.options(),
        version=_version(),
    )


def _like(tree: Any, reference: Any) -> Any:
    """``tree`` rebuilt with ``reference``'s leaf order (JAX returns dicts with sorted keys)."""
    leaves, treedef = tree_flatten(tree)
    ref_def = tree_flatten(reference)[1]
    if treedef.paths == ref_def.paths:
        return tree
    by_path = dict(zip(treedef.paths, leaves))
    return tree_unflatten(ref_def, [by_path[p] for p in ref_def.paths])


def _version() -> str:
    import precond_ref

    return getattr(precond_ref, "__version__", "")


# ---------------------------------------------------------------------------------------------
# Trace files (.npz): see docs/trace-format.md.


def save_trajectory(trajectory: Trajectory, path: str, problem: Optional[Problem] = None) -> None:
    """Write ``trajectory`` to ``path`` in the trace format (a NumPy ``.npz``; needs NumPy).

    ``problem`` (default: rebuilt from the trajectory's name and options) supplies the ``data/``
    arrays, in the trajectory's dtype.
    """
    import numpy as np

    if problem is None:
        problem = get_problem(trajectory.problem, **trajectory.problem_options)
    paths = trajectory.paths
    arrays: dict[str, Any] = {}
    per_step = [[to_numpy(x) for x in tree_flatten(p)[0]] for p in trajectory.params]
    for i, leaf_path in enumerate(paths):
        arrays[f"params/{leaf_path}"] = np.stack([step[i] for step in per_step])
        arrays[f"init/{leaf_path}"] = per_step[0][i]
        grads = [to_numpy(tree_flatten(g)[0][i]) for g in trajectory.grads]
        shape = per_step[0][i].shape
        arrays[f"grads/{leaf_path}"] = (
            np.stack(grads) if grads else np.zeros((0, *shape), dtype=per_step[0][i].dtype)
        )
    for key, value in problem.data("numpy", trajectory.dtype).items():
        arrays[f"data/{key}"] = np.asarray(value)
    arrays["loss"] = np.asarray(trajectory.losses, dtype=np.float64)
    meta = {
        "format": TRACE_FORMAT,
        "format_version": TRACE_FORMAT_VERSION,
        "library": "precond_ref",
        "version": trajectory.version,
        "method": trajectory.method,
        "config": _jsonable(trajectory.config),
        "problem": trajectory.problem,
        "problem_options": _jsonable(trajectory.problem_options),
        "steps": trajectory.steps,
        "dtype": trajectory.dtype,
        "backend": trajectory.backend,
        "param_paths": paths,
        "param_shapes": {p: list(per_step[0][i].shape) for i, p in enumerate(paths)},
        "data_keys": sorted(problem.data("numpy", trajectory.dtype)),
        "batch_size": problem.batch_size,
    }
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_trajectory(path: str) -> Trajectory:
    """Read a trace file written by :func:`save_trajectory` (or ``trace``); leaves are NumPy arrays."""
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        if "meta" not in archive.files:
            raise ValueError(f"{path}: not a precond_ref trace file (no 'meta' entry)")
        meta = json.loads(str(archive["meta"]))
        if meta.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: not a precond_ref trace file (format {meta.get('format')!r})")
        paths = meta["param_paths"]
        stacked = {p: archive[f"params/{p}"] for p in paths}
        grads = {p: archive[f"grads/{p}"] for p in paths}
        losses = [float(v) for v in archive["loss"]]

    def tree_at(source: dict, t: int) -> dict:
        tree: dict = {}
        for p in paths:
            node = tree
            keys = p.split("/")
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = source[p][t]
        return tree

    steps = meta["steps"]
    return Trajectory(
        method=meta["method"],
        problem=meta["problem"],
        config=meta["config"],
        params=[tree_at(stacked, t) for t in range(steps + 1)],
        losses=losses,
        grads=[tree_at(grads, t) for t in range(steps)],
        dtype=meta["dtype"],
        backend=meta["backend"],
        problem_options=meta["problem_options"],
        version=meta["version"],
    )
