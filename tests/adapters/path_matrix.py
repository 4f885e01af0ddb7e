"""The path-equivalence matrix: every public path of every method against the NumPy core.

A *cell* is one method in one mode on one model; a *path* is one way a user runs it (torch eager,
torch compiled, a torch ``state_dict`` restored mid-run, optax under ``jax.jit``, every step under
``jax.lax.scan``, an ensemble under ``jax.vmap``, ...). Each path's trajectory (the parameters
after every step) is compared with the trajectory of the core on NumPy float64 given the same
gradients.

The gradients are a deterministic function of the parameters: a least-squares loss on a fixed
batch (one of three, by step), written once in torch float64 and differentiated by autograd on
NumPy copies of the parameters. Every path hands its current parameters to the same function (the
steps under ``jax.lax.scan`` through ``jax.pure_callback``), so two paths that agree on the
parameters get bit-identical gradients, and any difference between trajectories comes from the
optimizer paths alone.

Run ``python tests/adapters/path_matrix.py`` (from the repository root) to print the table of
``docs/adapters/paths.md``: the largest relative difference per path over all cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pickle
from typing import Any, Callable, Optional

import numpy as np
import torch

import precond_ref as pr

STEPS = 10  # refreshes (interval 3) at calls 0, 3, 6 and 9
INTERVAL = 3
BATCH = 6
MODES = ("principled", "faithful")
METHODS = ("agd", "asgo", "dasgo", "sketchy", "s_adagrad", "rf_rmsprop", "rf_adamw", "if_shampoo", "mbf")


# --------------------------------------------------------------------------------------------
# Models: parameter shapes (torch layout, weights out-first) and a loss written once in torch.


def _mlp_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
    return 0.5 * ((h @ p["fc2.weight"].T + p["fc2.bias"] - y) ** 2).mean()


def _linear_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x @ p["fc.weight"].T + p["fc.bias"] - y) ** 2).mean()


def _conv_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(torch.nn.functional.conv2d(x, p["conv.weight"], p["conv.bias"]))
    return 0.5 * ((h.flatten(1) @ p["fc.weight"].T + p["fc.bias"] - y) ** 2).mean()


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    shapes: dict  # dotted name -> shape, in the order the optimizers see the parameters
    input_shape: tuple
    outputs: int
    loss: Callable

    def init(self, member: int = 0) -> dict:
        """The initial parameters; ``member`` > 0: those of another member of an ensemble (other
        draws of the same distribution)."""
        rng = np.random.default_rng(0 if member == 0 else (0, member))
        return {n: rng.normal(0.0, 0.5, s) for n, s in self.shapes.items()}

    @functools.cached_property
    def batches(self) -> list:
        rng = np.random.default_rng(1)
        return [
            (torch.from_numpy(rng.normal(size=(BATCH, *self.input_shape))),
             torch.from_numpy(rng.normal(size=(BATCH, self.outputs))))
            for _ in range(3)
        ]

    def grads(self, params: dict, t: int) -> dict:
        """The loss gradient at ``params`` (dotted name -> float64 array) on step ``t``'s batch."""
        return self.grads_on(params, *self.batches[t % 3])

    def grads_on(self, params: dict, x: Any, y: Any) -> dict:
        """The loss gradient at ``params`` on the batch ``(x, y)`` (arrays or tensors of float64)."""
        leaves = {n: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True) for n, v in params.items()}
        self.loss(leaves, torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))).backward()
        return {n: leaf.grad.numpy() for n, leaf in leaves.items()}


MODELS = {
    "mlp": Model("mlp", {"fc1.weight": (5, 3), "fc1.bias": (5,), "fc2.weight": (2, 5), "fc2.bias": (2,)}, (3,), 2, _mlp_loss),
    "conv": Model(
        "conv",
        {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "fc.weight": (2, 16), "fc.bias": (2,)},
        (2, 4, 4), 2, _conv_loss,
    ),
}
#: A model outside the matrix's cells (not in ``MODELS``), for faithful S-AdaGrad's rows of a sketch
#: that truncates: a 6-5-3 MLP, whose weights' axes (5, 6 and 3, 5) are longer than ``TRUNCATING_RANK``.
TRUNCATING_MODEL = "mlp-6-5-3"
TRUNCATING_RANK = 4
#: A model outside the matrix's cells, for a compiled row whose trace grows with every leaf and
#: needs one leaf of each kind: one Linear layer 3 -> 5 (a matrix and a vector).
ONE_LAYER_MODEL = "linear-3-5"
#: A model outside the matrix's cells, for principled S-AdaGrad's rows of a sketch that truncates:
#: one Linear layer 3 -> 3, whose leaves (9 and 3 entries) a sketch of the cell's rank 2 truncates,
#: the weight's by the incremental FD step and the bias's by the whole factor's decomposition.
TRUNCATING_LAYER = "linear-3-3"
ALL_MODELS = {
    **MODELS,
    TRUNCATING_MODEL: Model(
        TRUNCATING_MODEL, {"fc1.weight": (5, 6), "fc1.bias": (5,), "fc2.weight": (3, 5), "fc2.bias": (3,)}, (6,), 3, _mlp_loss,
    ),
    ONE_LAYER_MODEL: Model(ONE_LAYER_MODEL, {"fc.weight": (5, 3), "fc.bias": (5,)}, (3,), 5, _linear_loss),
    TRUNCATING_LAYER: Model(TRUNCATING_LAYER, {"fc.weight": (3, 3), "fc.bias": (3,)}, (3,), 3, _linear_loss),
}
#: The cells of a truncating sketch: S-AdaGrad in both modes (Sketchy runs the same Frequent
#: Directions step per axis; its compiled graph on the 6-5-3 MLP leaves no overlap to reuse, and
#: each row costs a compilation of minutes). Faithful on ``TRUNCATING_MODEL``, the model on which its
#: graph gives Inductor's buffer reuse the overlap the rows guard against; principled on
#: ``TRUNCATING_LAYER``: each further leaf adds its own kernels to the refresh graph's compilation.
TRUNCATING_CELLS = [("s_adagrad", "principled", TRUNCATING_LAYER), ("s_adagrad", "faithful", TRUNCATING_MODEL)]


#: The compiled rows' refresh schedule (torch.compile compiles one graph per pattern of due
#: refreshes): every block refreshes on the same steps, so that a method with periodic work compiles
#: its two branches, a refresh step and a step that reuses the preconditioner. Spread over phases
#: (the default), each phase's refresh is one more graph of the same kind of work.
UNSPREAD = {
    "asgo": dict(spread_refresh=False), "sketchy": dict(spread_refresh=False), "s_adagrad": dict(spread_refresh=False),
    "if_shampoo": dict(spread_refresh=False), "mbf": dict(refresh_phases=1),
}


def truncating_settings(cell: tuple) -> dict:
    """A truncating cell's sketch rank and refresh schedule (keyword arguments of the core and the
    optimizer). Faithful: rank ``TRUNCATING_RANK``, a refresh every step (the sketch truncates from
    the fifth). Principled: the cell's rank 2, refreshes unspread (:data:`UNSPREAD`: a refresh graph
    and a reuse graph under TorchInductor) at calls 0, 3, 6 and 9, the last two of which truncate
    (a rank-4 sketch never fills with four refreshes)."""
    return UNSPREAD[cell[0]] if cell[1] == "principled" else {"rank": TRUNCATING_RANK}


def nested(flat: dict) -> dict:
    """``{"fc1.weight": a}`` -> ``{"fc1": {"weight": a}}`` (the paths torch's names give the core)."""
    tree: dict = {}
    for name, value in flat.items():
        layer, leaf = name.split(".")
        tree.setdefault(layer, {})[leaf] = value
    return tree


def flat(tree: dict, names) -> dict:
    return {n: tree[n.split(".")[0]][n.split(".")[1]] for n in names}


# --------------------------------------------------------------------------------------------
# Configurations: the core's keyword arguments per method and mode; the torch classes take the
# same values (only ``learning_rate`` is renamed ``lr``; every other name used here is shared).


def core_kwargs(method: str, mode: str) -> dict:
    every = dict(precondition_every=INTERVAL)
    kwargs = {
        "agd": dict(learning_rate=1e-2, weight_decay=1e-2),
        "asgo": dict(learning_rate=1e-2, **every),
        "dasgo": dict(learning_rate=1e-2),
        "sketchy": dict(learning_rate=1e-2, rank=2, **every),
        "s_adagrad": dict(learning_rate=1e-1, rank=2, momentum=0.5, delta=1e-3, **every),
        "rf_rmsprop": dict(learning_rate=1e-2, damping=1e-2, momentum=0.9, weight_decay=1e-3, batch_size=BATCH),
        "rf_adamw": dict(learning_rate=1e-2, damping=1e-2, weight_decay=1e-3, batch_size=BATCH),
        "if_shampoo": dict(learning_rate=1e-2, preconditioner_lr=0.2, damping=1e-2, batch_size=BATCH, **every),
        "mbf": dict(learning_rate=1e-2, damping=0.1, statistics_every=1, **every),
    }[method]
    if mode == "faithful" and method == "asgo":
        del kwargs["precondition_every"]  # the authors' root runs every step (faithful refuses an interval)
    if mode == "faithful" and method == "s_adagrad":
        del kwargs["momentum"]  # the authors' S-AdaGrad has none
        del kwargs["precondition_every"]  # nor an interval (faithful refuses one)
    if mode == "faithful" and method == "sketchy":
        # Faithful Sketchy has no cutoff of the sketch's tail (K3): with the default relative eps
        # (1e-7 of the top eigenvalue) the rounding-level tail eigenvalues of these rank-deficient
        # sketches are weighted (1e-7 lambda_max)^(-1/4), and two LAPACKs' ulp-level differences
        # there reach 6e-12 (mlp) and 1.1e-11 (conv) of the parameters after one step, the same
        # between NumPy and JAX's core as between NumPy and torch: the method's conditioning, not a
        # path's. An absolute eps of 1e-2 bounds that weight (2.7e-15 and 2.6e-14 measured).
        kwargs.update(eps=1e-2, relative_eps=False)
    return {**kwargs, "mode": mode}


def torch_kwargs(method: str, mode: str) -> dict:
    kwargs = core_kwargs(method, mode)
    return {"lr": kwargs.pop("learning_rate"), **kwargs}


def torch_class(method: str) -> type:
    import precond_ref.adapters.torch as pt

    return {
        "agd": pt.AGD, "asgo": pt.ASGO, "dasgo": pt.DASGO, "sketchy": pt.Sketchy, "s_adagrad": pt.SAdaGrad,
        "rf_rmsprop": pt.RFRMSProp, "rf_adamw": pt.RFAdamW, "if_shampoo": pt.IFShampoo, "mbf": pt.MBF,
    }[method]


def accepts(method: str, mode: str, model: str) -> bool:
    """Whether the mode takes the model (faithful ASGO and DASGO refuse a 4-D conv weight)."""
    try:
        transform = getattr(pr, method)(**core_kwargs(method, mode))
        transform.init(nested(MODELS[model].init()))
    except ValueError:
        return False
    return True


def float32_state(method: str, mode: str, model: str) -> bool:
    """Whether the cell keeps float32 state for float64 parameters (the authors' float32 state,
    documented as a faithful-mode difference: ASGO/DASGO's statistic, the root-free methods' state)."""
    state = getattr(pr, method)(**core_kwargs(method, mode)).init(nested(MODELS[model].init()))
    return any(v.dtype == np.float32 for entries in state.groups.values() for v in entries.values())


def torch_float32_sqrt_misrounds(steps: int = STEPS) -> bool:
    """Whether torch's eager CPU float32 ``sqrt`` misrounds one of faithful AGD's bias corrections
    ``1 - 0.999**t`` (t = 1..steps) on this CPU (it does on some CPUs only)."""
    for t in range(1, steps + 1):
        x = np.float32(np.float32(1) - np.float32(0.999) ** np.float32(t))
        want = np.float32(np.sqrt(np.float64(x)))
        if np.float32(torch.sqrt(torch.tensor(x, dtype=torch.float32)).item()) != want:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Trajectories: a list of ``STEPS + 1`` dicts (dotted name -> float64 NumPy array).


def _copy(params: dict) -> dict:
    return {n: np.array(v, dtype=np.float64, copy=True) for n, v in params.items()}


def core_trajectory(
    method: str, mode: str, model: str, *, xp: Any = np, jit: bool = False, missing: Optional[dict] = None,
    warm: Optional[list] = None, steps: int = STEPS, guarded: bool = False, cupy_captured: bool = False,
    plain: bool = False, nonfinite: Optional[dict] = None, member: int = 0, **overrides: Any,
) -> list:
    """The core's trajectory on ``xp`` (``numpy`` by default; ``torch`` or ``jax.numpy`` for a
    float32 path, compared on its own backend), eagerly.

    ``guarded``: on NumPy arrays that stand for a GPU's (``tests/sync_guard.py``: the core reads
    nothing on the host, as on CuPy); ``cupy_captured`` (with ``guarded``): through CuPy's captured
    step (``precond_ref.adapters.cupy.captured``), CuPy's stream capture replaced by its CPU double
    (``fake_cupy_graphs``), whose captures and replays refuse host reads.

    ``missing`` (``{step: [names]}``): those leaves have no gradient on that step, which the core
    expresses as the adapter rule does (:func:`precond_ref.transform.missing_members`): a zero
    gradient in the block's update, and that leaf's update dropped. ``nonfinite`` (``{step:
    name}``): that leaf's gradient holds a NaN on that step (:func:`poisoned`), so the step is
    skipped (zero updates, state kept, counted). ``warm``: gradient batches
    (flat dicts) given to ``warm_start`` before the first step (MBF). ``jit`` (JAX): each update
    under ``jax.jit``. ``plain``: each update within ``precond_ref.plain_forms()``. ``member``: from
    that ensemble member's initial parameters (:meth:`Model.init`).
    """
    spec = ALL_MODELS[model]
    transform = getattr(pr, method)(**{**core_kwargs(method, mode), **overrides})
    if xp is torch:
        to = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731
    elif guarded:
        import sync_guard
        from fake_cupy_graphs import FakeCupyGraphs
        from precond_ref.adapters.cupy import CapturedTransform

        if cupy_captured:
            transform = CapturedTransform(transform, enabled=True, graphs=FakeCupyGraphs())
        to = lambda a: sync_guard.wrap(np.asarray(a, dtype=np.float64))  # noqa: E731
    elif xp is np:
        to = np.asarray
    else:  # jax.numpy
        to = lambda a: xp.asarray(np.asarray(a), dtype=xp.float64)  # noqa: E731
    params = {n: to(v) for n, v in spec.init(member).items()}
    state = transform.init(nested(params))
    if warm is not None:
        state = transform.warm_start(state, [nested({n: to(g) for n, g in b.items()}) for b in warm])
    update = transform.update
    if jit:
        import jax

        update = jax.jit(transform.update)
    history = [_copy({n: np.asarray(v) for n, v in params.items()})]
    for t in range(steps):
        grads = {n: to(g) for n, g in poisoned(spec.grads(history[-1], t), nonfinite, t).items()}
        gone = (missing or {}).get(t, ())
        for n in gone:
            grads[n] = grads[n] * 0
        with pr.plain_forms(plain):
            updates, state = update(nested(grads), state, nested(params))
        updates = flat(updates, params)
        params = {n: (v if n in gone else v + updates[n]) for n, v in params.items()}
        history.append(_copy({n: np.asarray(v) for n, v in params.items()}))
    return history


def poisoned(grads: dict, nonfinite: Optional[dict], t: int) -> dict:
    """``grads`` with a NaN in the first entry of leaf ``nonfinite[t]`` (if step ``t`` has one)."""
    if t not in (nonfinite or {}):
        return grads
    bad = grads[nonfinite[t]].copy()
    bad.flat[0] = np.nan
    return {**grads, nonfinite[t]: bad}


#: The empty parameter of the rows with one: its name and shape (a zero-width layer's weight, numel 0).
EMPTY = ("gap.weight", (0, 3))


def _fresh_torch(values: dict) -> list:
    return [(n, torch.tensor(v, dtype=torch.float64, requires_grad=True)) for n, v in values.items()]


#: Methods whose state entries an earlier version named otherwise (``build_transform``'s
#: ``legacy_names`` renames them on load).
LEGACY_NAMED = ("sketchy", "s_adagrad", "if_shampoo")


#: The failure counter's name in the states the older entry names come from.
OLD_FAILURES = {"if_shampoo": "factor_failures", "sketchy": "sketch_failures", "s_adagrad": "sketch_failures"}


def old_entry_names(method: str, entries: dict) -> dict:
    """A group's current entries under the older entry names (the inverse of the
    method's ``legacy_names``): IF-Shampoo ``stacks/0/X/n`` -> ``X_n`` (the models' groups are
    unblocked: one stack of one tile, whose tile is the old unblocked factor), ``momentum/i`` ->
    ``momentum_i``; Sketchy and S-AdaGrad ``sketches/n/j/name`` -> ``axis{n}_{name}`` (one run) or
    ``axis{n}_run{j}_{name}``; the failure counter under its name of then (:data:`OLD_FAILURES`)."""
    keys = [k.split("/") for k in entries]
    out = {}
    for key, value in entries.items():
        part = key.split("/")
        if method == "if_shampoo" and part[0] == "stacks":
            assert {k[1] for k in keys if k[0] == "stacks"} == {"0"} and value.shape[0] == 1, "one tile"
            out[f"{part[2]}_{part[3]}"] = value[0]
        elif method == "if_shampoo" and part[0] == "momentum":
            out[f"momentum_{part[1]}"] = value
        elif key == "failures" and method in OLD_FAILURES:
            out[OLD_FAILURES[method]] = value
        elif part[0] == "sketches":
            runs = {k[2] for k in keys if k[0] == "sketches" and k[1] == part[1]}
            out[f"axis{part[1]}_{part[3]}" if len(runs) == 1 else f"axis{part[1]}_run{part[2]}_{part[3]}"] = value
        else:
            out[key] = value
    return out


def torch_trajectory(
    method: str, mode: str, model: str, *, compile: Any = False, restore_at: Optional[int] = None,
    groups: Optional[list] = None, missing: Optional[dict] = None, warm: Optional[list] = None,
    steps: int = STEPS, keep: Optional[list] = None, old_names: bool = False,
    lr_factor: Optional[Callable[[int], float]] = None, plain: bool = False, empty: Optional[str] = None,
    nonfinite: Optional[dict] = None, autocast: bool = False, maximize: bool = False, **overrides: Any,
) -> list:
    """A torch optimizer's trajectory (``keep``, a list, receives the optimizer and its parameters).

    ``restore_at=k``: after ``k`` steps the optimizer's ``state_dict`` goes through
    ``torch.save``/``torch.load`` into a fresh optimizer on fresh parameter tensors (the saved
    values); ``old_names``: with its entries under the names an earlier version wrote
    (:func:`old_entry_names`). ``groups``: lists of names, one param group each (same hyperparameters).
    ``lr_factor``: a ``LambdaLR`` scheduler of that factor steps after every step (not with ``restore_at``).
    ``plain``: each ``step`` within ``precond_ref.plain_forms()``. ``empty`` (a name): an empty
    parameter (:data:`EMPTY`, an empty gradient every step; not in the trajectory) follows that
    parameter in its param group. ``nonfinite``: as :func:`core_trajectory`'s. ``autocast``: each
    ``step`` called inside ``torch.autocast("cpu", dtype=torch.bfloat16)``. ``maximize``: the
    optimizer made with ``maximize=True`` and given the negated gradients.
    """
    spec = ALL_MODELS[model]
    cls = torch_class(method)
    kwargs = {**torch_kwargs(method, mode), **overrides, "compile": compile, "maximize": maximize}

    def make(named: list) -> Any:
        if groups is None:
            return cls(named, **kwargs)
        by_name = dict(named)
        return cls([{"params": [(n, by_name[n]) for n in names]} for names in groups], **kwargs)

    if empty is not None:
        assert restore_at is None, "the restored optimizer's parameters have no empty one"
        if groups is not None:
            groups = [names[: names.index(empty) + 1] + [EMPTY[0]] + names[names.index(empty) + 1:] if empty in names else names
                      for names in groups]
    named = _fresh_torch(spec.init())
    if empty is not None:
        gap = torch.zeros(EMPTY[1], dtype=torch.float64, requires_grad=True)
        named.insert([n for n, _ in named].index(empty) + 1, (EMPTY[0], gap))
    opt = make(named)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) if lr_factor is not None else None
    if warm is not None:
        opt.warm_start([{n: torch.from_numpy(g) for n, g in b.items()} for b in warm])
    history = [_copy({n: p.detach().numpy() for n, p in named if n != EMPTY[0]})]
    for t in range(steps):
        if t == restore_at:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            saved = torch.load(buffer)  # weights_only: plain data
            if old_names:
                saved["state"] = {i: old_entry_names(method, e) for i, e in saved["state"].items()}
            named = _fresh_torch(history[-1])
            opt = make(named)
            opt.load_state_dict(saved)
        grads = poisoned(spec.grads(history[-1], t), nonfinite, t)
        gone = (missing or {}).get(t, ())
        for n, p in named:
            p.grad = (None if n in gone else torch.zeros_like(p) if n == EMPTY[0]
                      else torch.from_numpy(-grads[n] if maximize else grads[n].copy()))
        region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with pr.plain_forms(plain), region:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        history.append(_copy({n: p.detach().numpy() for n, p in named if n != EMPTY[0]}))
    if keep is not None:
        keep.extend([opt, named])
    return history


def inductor_trajectory(method: str, mode: str, model: str, *, captured: bool = False, **overrides: Any) -> list:
    """``method`` on ``model`` as a torch optimizer under ``compile=True`` (TorchInductor).
    ``captured``: its captured step (``capture=True``) with CUDA graphs replaced by the CPU double
    of ``fake_graphs`` and the class's refusal lifted, so that the replays run the compiled update
    again (checked to replay). ``overrides``: further keyword arguments of the optimizer (a
    truncating cell's :func:`truncating_settings`)."""
    cell = (method, mode, model)
    if not captured:
        return torch_trajectory(*cell, compile=True, **overrides)
    from fake_graphs import fake_graphs

    cls = torch_class(method)
    refusal = cls.__dict__["not_capturable_because"]
    cls.not_capturable_because = None
    try:
        with fake_graphs() as graphs:
            history = torch_trajectory(*cell, compile=True, capture=True, **overrides)
    finally:
        cls.not_capturable_because = refusal
    assert graphs.replays() > 0, "the captured step never replayed"
    return history


#: The factories' arguments that ``optax.inject_hyperparams`` must leave as given: the sketch's
#: rank and the batch size shape the state, the intervals schedule the refreshes on the host.
STATIC_HYPERPARAMETERS = ("rank", "batch_size", "precondition_every", "statistics_every")


def injected_values(method: str, mode: str, dtype: Any) -> dict:
    """Each float hyperparameter of the cell's factory call as the value a 0-D array of ``dtype``
    holds (rounded to it), as keyword arguments of the core: what the core given Python numbers
    must be given to take the step of ``optax.inject_hyperparams(..., hyperparam_dtype=dtype)``.
    Defaults too: the wrapper injects every numeric argument of the factory's signature."""
    import inspect

    import precond_ref.adapters.jax as pj

    bound = inspect.signature(getattr(pj, method)).bind(**core_kwargs(method, mode))
    bound.apply_defaults()
    return {
        name: float(np.asarray(value, dtype=dtype)) for name, value in bound.arguments.items()
        if isinstance(value, float) and name not in STATIC_HYPERPARAMETERS
    }


@functools.lru_cache(maxsize=None)
def _jitted(method: str, mode: str, model: str, plain: bool = False, injected: Any = None):
    """One optax optimizer and one jitted step per cell (the plain and the pickled run share it), and
    one more for a run within ``precond_ref.plain_forms()`` (``plain``: read while the step is traced).
    ``injected`` (a dtype name): the factory wrapped by ``optax.inject_hyperparams`` with its float
    hyperparameters 0-D arrays of that dtype in the state, traced by the step."""
    import jax
    import optax

    import precond_ref.adapters.jax as pj

    if injected is None:
        opt = getattr(pj, method)(**core_kwargs(method, mode))
    else:
        kwargs = core_kwargs(method, mode)
        opt = optax.inject_hyperparams(
            getattr(pj, method), static_args=[k for k in STATIC_HYPERPARAMETERS if k in kwargs],
            hyperparam_dtype=np.dtype(injected),
        )(**kwargs)

    @jax.jit
    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt, step


def optax_trajectory(
    method: str, mode: str, model: str, *, pickle_at: Optional[int] = None, orbax_at: Optional[int] = None,
    warm: Optional[list] = None, steps: int = STEPS, plain: bool = False, injected: Optional[str] = None,
    member: int = 0, final_state: Optional[list] = None,
) -> list:
    """optax under ``jax.jit``; ``pickle_at=k``: the state goes through ``pickle`` after ``k`` steps;
    ``orbax_at=k``: through an orbax checkpoint (:func:`orbax_restored`) after ``k`` steps;
    ``plain``: the step traced and run within ``precond_ref.plain_forms()``; ``injected`` (a dtype
    name): through ``optax.inject_hyperparams`` with hyperparameters of that dtype (:func:`_jitted`);
    ``member``: from that ensemble member's initial parameters (the same jitted step);
    ``final_state``: a list the state after the last step is appended to."""
    import jax.numpy as jnp

    import precond_ref.adapters.jax as pj

    spec = MODELS[model]
    # the cache's key is the arguments as given: the plain rows' callers give four
    opt, step = _jitted(method, mode, model, plain) if injected is None else _jitted(method, mode, model, plain, injected)
    params = {n: jnp.asarray(v, dtype=jnp.float64) for n, v in spec.init(member).items()}
    state = opt.init(nested(params))
    if warm is not None:
        state = pj.mbf_warm_start(
            state, [nested({n: jnp.asarray(g) for n, g in b.items()}) for b in warm], **core_kwargs(method, mode)
        )
    history = [_copy({n: np.asarray(v) for n, v in params.items()})]
    tree = nested(params)
    for t in range(steps):
        if t == pickle_at:
            state = pickle.loads(pickle.dumps(state))
        if t == orbax_at:
            state = orbax_restored(state, opt.init(nested(params)))
        grads = {n: jnp.asarray(g) for n, g in spec.grads(history[-1], t).items()}
        with pr.plain_forms(plain):
            tree, state = step(nested(grads), state, tree)
        history.append(_copy({n: np.asarray(v) for n, v in flat(tree, spec.shapes).items()}))
    if final_state is not None:
        final_state.append(state)
    return history


def orbax_restored(state: Any, like: Any) -> Any:
    """``state`` saved by orbax's ``StandardCheckpointer`` (the checkpointer of Flax training
    scripts) and restored into the structure, shapes and dtypes of ``like`` (a state ``init``
    made, as a script restores into the optimizer state it built). The restored arrays are
    committed to the device, where the run's arrays are not; they are handed back uncommitted
    (through the host, bit for bit), so that the run's jitted step serves them without compiling
    again for another placement (which changes no number)."""
    import os
    import tempfile

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    with tempfile.TemporaryDirectory() as directory, ocp.StandardCheckpointer() as checkpointer:
        path = os.path.join(directory, "state")
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), restored)


@functools.lru_cache(maxsize=None)
def _scanned(method: str, mode: str, model: str):
    """One optax optimizer and one jitted program per cell that runs every step under
    ``jax.lax.scan``: the carry the parameters and the optimizer state, the scanned inputs the
    batches, the parameters after each step stacked as the output. Each step's gradient is the
    matrix's torch gradient at the carried parameters (:meth:`Model.grads_on`, called through
    ``jax.pure_callback``), so the gradients are those of every other path given the same
    parameters, bit for bit. The program returns the state after the last step too."""
    import jax
    import jax.numpy as jnp
    import optax

    import precond_ref.adapters.jax as pj

    spec = MODELS[model]
    opt = getattr(pj, method)(**core_kwargs(method, mode))
    shapes = nested({n: jax.ShapeDtypeStruct(s, jnp.float64) for n, s in spec.shapes.items()})

    def host_grads(tree: dict, x: np.ndarray, y: np.ndarray) -> dict:
        return nested(spec.grads_on(flat(tree, spec.shapes), x, y))

    def body(carry: tuple, batch: tuple) -> tuple:
        tree, state = carry
        grads = jax.pure_callback(host_grads, shapes, tree, *batch)
        updates, state = opt.update(grads, state, tree)
        tree = optax.apply_updates(tree, updates)
        return (tree, state), tree

    @jax.jit
    def run(tree: dict, state: Any, xs: tuple) -> tuple:
        (_, state), history = jax.lax.scan(body, (tree, state), xs)
        return state, history

    return opt, run


def scan_trajectory(method: str, mode: str, model: str, *, steps: int = STEPS, final_state: Optional[list] = None) -> list:
    """optax under ``jax.lax.scan``: all ``steps`` steps one jitted program (:func:`_scanned`),
    step ``t`` given step ``t``'s batch (as every path's gradient function takes it);
    ``final_state``: a list the state after the last step is appended to."""
    import jax.numpy as jnp

    spec = MODELS[model]
    opt, run = _scanned(method, mode, model)
    params = {n: jnp.asarray(v, dtype=jnp.float64) for n, v in spec.init().items()}
    xs = tuple(jnp.asarray(np.stack([spec.batches[t % 3][i].numpy() for t in range(steps)])) for i in (0, 1))
    state, history = run(nested(params), opt.init(nested(params)), xs)
    if final_state is not None:
        final_state.append(state)
    return [_copy(params)] + [
        _copy({n: np.asarray(v[t]) for n, v in flat(history, spec.shapes).items()}) for t in range(steps)
    ]


#: The ensemble's size in the ``jax.vmap`` rows: members 0, 1 and 2 (:meth:`Model.init`).
MEMBERS = 3


@functools.lru_cache(maxsize=None)
def _vmapped(method: str, mode: str, model: str):
    """One optax optimizer and one jitted step per cell, mapped by ``jax.vmap`` over a leading
    ensemble axis of the gradients, the state and the parameters."""
    import jax
    import optax

    import precond_ref.adapters.jax as pj

    opt = getattr(pj, method)(**core_kwargs(method, mode))

    def step(grads: dict, state: Any, params: dict) -> tuple:
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt, jax.jit(jax.vmap(step))


def vmap_trajectories(method: str, mode: str, model: str, *, members: int = MEMBERS, steps: int = STEPS) -> list:
    """An ensemble of ``members`` models (:meth:`Model.init`'s members) trained at once: the
    parameter trees stacked on a leading axis, the state made by ``jax.vmap(opt.init)``, each step
    ``jax.jit(jax.vmap(update))`` (:func:`_vmapped`), each member's gradient the matrix's gradient
    at that member's parameters. One trajectory per member."""
    import jax
    import jax.numpy as jnp

    spec = MODELS[model]
    opt, step = _vmapped(method, mode, model)
    starts = [spec.init(k) for k in range(members)]
    tree = nested({n: jnp.asarray(np.stack([p[n] for p in starts])) for n in spec.shapes})
    state = jax.vmap(opt.init)(tree)
    histories = [[_copy(p)] for p in starts]
    for t in range(steps):
        grads = [spec.grads(h[-1], t) for h in histories]
        tree, state = step(nested({n: jnp.asarray(np.stack([g[n] for g in grads])) for n in spec.shapes}), state, tree)
        for k, h in enumerate(histories):
            h.append(_copy({n: np.asarray(v[k]) for n, v in flat(tree, spec.shapes).items()}))
    return histories


def warm_batches(model: str, n: int = 3) -> list:
    """Gradient batches for MBF's warm start: the loss gradient at the initial parameters with the
    targets redrawn (as the authors sample labels from the model's predictive distribution)."""
    spec = MODELS[model]
    rng = np.random.default_rng(7)
    params = {n: torch.tensor(v, requires_grad=True) for n, v in spec.init().items()}
    out = []
    for _ in range(n):
        x, _ = spec.batches[0]
        y = torch.from_numpy(rng.normal(size=(BATCH, spec.outputs)))
        for p in params.values():
            p.grad = None
        spec.loss(params, x, y).backward()
        out.append({k: p.grad.numpy().copy() for k, p in params.items()})
    return out


# --------------------------------------------------------------------------------------------
# Agreement


def difference(got: list, want: list, above: float = 0.0) -> tuple[float, int]:
    """The largest relative difference between two trajectories, and the first step (number of
    updates) where a difference larger than ``above`` appears (-1: none): max over steps and
    leaves of ``max|got - want| / max|want|``."""
    worst, first = 0.0, -1
    for t, (a, b) in enumerate(zip(got, want)):
        for n in b:
            scale = float(np.max(np.abs(b[n]))) or 1.0
            d = float(np.max(np.abs(a[n] - b[n]))) / scale
            if d > above and first < 0:
                first = t
            worst = max(worst, d)
    assert len(got) == len(want)
    return worst, first


# --------------------------------------------------------------------------------------------
# The table of docs/adapters/paths.md


def _table(compile_backend: Any = None) -> list[tuple[str, str, float, str]]:
    """Rows ``(path, compared with, largest relative difference, where)`` over every cell."""
    import jax.numpy as jnp

    cells = [(m, mode, model) for model in MODELS for m in METHODS for mode in MODES if accepts(m, mode, model)]
    f32 = {c for c in cells if float32_state(*c)}
    known = {("agd", "faithful"): "item 3", ("rf_adamw", "faithful"): "lr tensor"}
    rows: dict[tuple[str, str], tuple[float, str]] = {}

    def note(path: str, against: str, got: list, want: list, cell: tuple) -> None:
        d = difference(got, want)[0]
        key = (path, against)
        if key not in rows or d > rows[key][0]:
            rows[key] = (d, "/".join(cell))

    for cell in cells:
        core = core_trajectory(*cell)
        eager, jitted = torch_trajectory(*cell), optax_trajectory(*cell)
        names = list(MODELS[cell[2]].shapes)
        if cell in f32:
            tag = " (float32 state)"
            torch_core = core_trajectory(*cell, xp=torch)
            jax_core = core_trajectory(*cell, xp=jnp, jit=True)
            note("torch eager" + tag + (f" [{known[cell[:2]]}]" if cell[:2] in known else ""), "core on torch", eager, torch_core, cell)
            note("optax jax.jit" + tag, "core under jax.jit", jitted, jax_core, cell)
            note("torch eager" + tag, "NumPy core (float32 rounding, not asserted)", eager, core, cell)
            note("optax jax.jit" + tag, "NumPy core (float32 rounding, not asserted)", jitted, core, cell)
        else:
            label = "torch eager" + (f" [{known[cell[:2]]}]" if cell[:2] in known else "")
            note(label, "NumPy core", eager, core, cell)
            note("optax jax.jit", "NumPy core", jitted, core, cell)
        loop_rows(cell, f32=cell in f32, core=core, jitted=jitted, note=note)
        for at, what in ((4, "mid-interval"), (6, "at a refresh")):
            note(f"torch state_dict restored {what}", "uninterrupted torch eager", torch_trajectory(*cell, restore_at=at), eager, cell)
        if cell[0] in LEGACY_NAMED:
            note("torch state_dict under an earlier version's entry names, restored mid-interval", "uninterrupted torch eager",
                 torch_trajectory(*cell, restore_at=4, old_names=True), eager, cell)
        note("torch, two param groups", "one group", torch_trajectory(*cell, groups=[names[:2], names[2:]]), eager, cell)
        note("torch, maximize=True given the negated gradients", "uninterrupted torch eager",
             torch_trajectory(*cell, maximize=True), eager, cell)
        note("optax state pickled mid-run", "uninterrupted optax jax.jit", optax_trajectory(*cell, pickle_at=4), jitted, cell)
        note("optax state through an orbax checkpoint mid-run", "uninterrupted optax jax.jit",
             optax_trajectory(*cell, orbax_at=4), jitted, cell)
        captured = core_trajectory(*cell, guarded=True, cupy_captured=True)
        note("CuPy captured step (stream capture's CPU double)", "the eager core on the same arrays",
             captured, core_trajectory(*cell, guarded=True), cell)
        note("CuPy captured step (stream capture's CPU double)", "NumPy core", captured, core, cell)
        if cell[2] == "mlp":
            mlp_rows(cell, f32=cell in f32, eager=eager, note=note)
        if cell[1] == "principled" and cell[2] == "mlp" and compile_backend is not None:
            layer, unspread = (cell[0], "principled", ONE_LAYER_MODEL), UNSPREAD.get(cell[0], {})
            note(f"torch compiled ({compile_backend['backend']})", "NumPy core",
                 torch_trajectory(*layer, compile=compile_backend, **unspread), core_trajectory(*layer, **unspread), layer)
    for method, extra in [("mbf", {}), ("if_shampoo", {"grouping": "weight_bias"})]:
        for mode in MODES:
            for model in MODELS:
                layer = "fc1" if model == "mlp" else "fc"
                order = None if model == "mlp" else [["fc.weight", "fc.bias", "conv.weight", "conv.bias"]]
                for leaf, tag in (("bias", ""), ("weight", " [item 2]")):
                    missing = {2: [f"{layer}.{leaf}"], 5: [f"{layer}.{leaf}"]}
                    got = torch_trajectory(method, mode, model, missing=missing, groups=order, **extra)
                    want = core_trajectory(method, mode, model, missing=missing, **extra)
                    note(f"torch, paired {leaf} without a gradient{tag}", "core given a zero gradient", got, want, (method, mode, model))
    for mode in MODES:
        for model in MODELS:
            warm = warm_batches(model)
            want = core_trajectory("mbf", mode, model, warm=warm)
            note("MBF warm start, optax mbf_warm_start", "core warm_start", optax_trajectory("mbf", mode, model, warm=warm), want, ("mbf", mode, model))
            note("MBF warm start, torch MBF.warm_start [item 1]", "core warm_start", torch_trajectory("mbf", mode, model, warm=warm), want, ("mbf", mode, model))
    for path, against, d in row_block_rows():
        rows[(path, against)] = (d, "s_adagrad/principled/mlp")
    for cell in TRUNCATING_CELLS:
        settings = truncating_settings(cell)
        core = core_trajectory(*cell, **settings)
        note("torch compiled (TorchInductor), a truncating sketch", "NumPy core", inductor_trajectory(*cell, **settings), core, cell)
        note("torch compiled (TorchInductor) and captured (CPU double), a truncating sketch", "NumPy core",
             inductor_trajectory(*cell, captured=True, **settings), core, cell)
    return [(path, against, d, where) for (path, against), (d, where) in rows.items()]


def loop_rows(cell: tuple, *, f32: bool, core: list, jitted: list, note: Callable) -> None:
    """The table's rows of optax in JAX's training loops (``LOOP_PATHS`` of the test module):
    every step under ``jax.lax.scan``, and an ensemble of ``MEMBERS`` under ``jax.vmap``, each
    member against itself alone; a float32 cell against optax under ``jax.jit`` step by step."""
    tag = " (float32 state)" if f32 else ""
    against = "optax under jax.jit step by step" if f32 else "NumPy core"
    note("optax under jax.lax.scan" + tag, against, scan_trajectory(*cell), jitted if f32 else core, cell)
    for k, got in enumerate(vmap_trajectories(*cell)):
        alone = (jitted if f32 else core) if k == 0 else optax_trajectory(*cell, member=k) if f32 else core_trajectory(*cell, member=k)
        note(f"optax, jax.vmap over an ensemble of {MEMBERS}" + tag, f"each member alone, {against}", got, alone, cell)


def mlp_rows(cell: tuple, *, f32: bool, eager: list, note: Callable) -> None:
    """The table's rows of the paths run on the MLP's cells alone (``MLP_TORCH_PATHS`` and
    ``MLP_OPTAX_PATHS`` of the test module): ``note(path, compared with, got, want, cell)``."""
    import jax.numpy as jnp

    names = list(MODELS[cell[2]].shapes)
    torch_core = (lambda **k: core_trajectory(*cell, xp=torch, **k)) if f32 else (lambda **k: core_trajectory(*cell, **k))
    against = "the core on torch" if f32 else "NumPy core"
    tag = " (float32 state)" if f32 else ""
    note("torch, step inside torch.autocast (CPU, bfloat16)" + tag, "torch eager", torch_trajectory(*cell, autocast=True), eager, cell)
    nonfinite = {INTERVAL: names[0]}
    note("torch, an empty parameter in a param group, a skipped step" + tag, f"{against}, the same step skipped",
         torch_trajectory(*cell, groups=[names[:2], names[2:]], empty=names[2], nonfinite=nonfinite),
         torch_core(nonfinite=nonfinite), cell)
    lr = torch.tensor(core_kwargs(*cell[:2])["learning_rate"])
    note("torch, lr a float32 tensor" + tag, f"{against}, the value it holds", torch_trajectory(*cell, lr=lr),
         torch_core(learning_rate=float(lr)), cell)
    dtype = "float64" if f32 else "float32"
    values = injected_values(*cell[:2], np.dtype(dtype))
    want = core_trajectory(*cell, xp=jnp, jit=True, **values) if f32 else core_trajectory(*cell, **values)
    note(f"optax.inject_hyperparams, {dtype} hyperparameters" + tag,
         ("core under jax.jit" if f32 else "NumPy core") + ", the values they hold",
         optax_trajectory(*cell, injected=dtype), want, cell)


def row_block_rows() -> list[tuple[str, str, float]]:
    """The table's rows of S-AdaGrad's FD step by blocks of rows (``precond_ref.sketch.FD_ROWS_BYTES``
    lowered to 1 byte, so that each sketch of the MLP takes it): ``(path, compared with, difference)``."""
    from precond_ref import sketch

    cell = ("s_adagrad", "principled", "mlp")
    whole, bound = core_trajectory(*cell), sketch.FD_ROWS_BYTES
    sketch.FD_ROWS_BYTES = 1
    try:
        core = core_trajectory(*cell)
        eager, captured = core_trajectory(*cell, guarded=True), core_trajectory(*cell, guarded=True, cupy_captured=True)
        torch_rows = torch_trajectory(*cell)
    finally:
        sketch.FD_ROWS_BYTES = bound
    label = "S-AdaGrad's sketches stepped by blocks of rows"
    return [
        (f"{label}, NumPy core (new arrays)", "NumPy core, whole products", difference(core, whole)[0]),
        (f"{label}, torch eager (written in place)", "NumPy core by blocks of rows", difference(torch_rows, core)[0]),
        (f"{label}, CuPy captured step (CPU double, in place)", "the eager core on the same arrays", difference(captured, eager)[0]),
    ]


def main() -> None:
    import os
    import sys

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xla_flags  # noqa: F401 - the suite's XLA options

    import jax

    jax.config.update("jax_enable_x64", True)
    print("| path | compared with | largest relative difference | in cell |")
    print("|---|---|---|---|")
    for path, against, d, where in _table({"backend": "aot_eager"}):
        print(f"| {path} | {against} | {d:.1e} | {where} |" if d else f"| {path} | {against} | 0 (bit-identical) | all |")


if __name__ == "__main__":
    main()
