"""The path-equivalence matrix: every public path gives the NumPy core's trajectory.

For the 9 methods in both modes (where the mode takes the model) on a float64 MLP and a small conv
model, with refreshes (interval 3) inside a 10-step run, each public path's parameters after every
step are compared with the core's (``path_matrix`` builds the runs; the gradients are one function
of the parameters, so equal parameters get bit-identical gradients on every path).

Tolerances. Where a path runs the same arithmetic as its base path (a ``state_dict`` restored, two
param groups, a pickled optax state, a float32 path against the core on its own backend), the
trajectories must be bit-identical. Against the NumPy core a backend's BLAS/LAPACK sums in another
order: each update differs by at most about ``n·κ·eps`` relative to the update (``n`` <= 36 terms
per reduction here, ``κ`` the conditioning of the damped solves and roots, <= 1e2 with these
dampings, eps = 2.2e-16), 7.9e-13 of the update a step. The comparison is relative to the
parameters: with updates of 1e-2 of the parameters that is 7.9e-14 over 10 steps, and ``RTOL =
1e-12`` leaves a margin of about 13 over it (for a difference an earlier step hands to later
gradients). A cell whose updates are larger (Sketchy's and S-AdaGrad's reach the parameters' size
on some members) gets RTOL scaled by the sum of its steps' largest updates relative to their
parameters over the 0.1 RTOL assumes (:func:`_close_to_core`). Measured: see docs/adapters/paths.md.

A float32 faithful path (the authors' float32 state, documented for ASGO/DASGO's statistic and
the root-free methods) rounds differently on each backend's float32 kernels, so it is compared
with the core run on its own backend: torch eager with the core on torch, optax under ``jax.jit``
with the core under ``jax.jit``. Every divergence known before it (MBF's torch warm start, a paired
weight without a gradient first in its group, faithful AGD's float32 square root) and the two this
matrix found (faithful RF-AdamW's ``lr * weight_decay`` rounded three times when the torch adapter
passed the learning rate as a float64 tensor; faithful Sketchy's tail decay ``sqrt(b2)`` taken of an
injected float32 ``b2`` before the step cast it to float64) is fixed: no cell is marked.

optax in JAX's training loops (every step under ``jax.lax.scan``, an ensemble under ``jax.vmap``)
compiles another XLA program than the jitted step: a float64 cell meets the NumPy core to RTOL as
the jitted step does; a float32 cell is held to the same model in float32 against optax under
``jax.jit`` (:func:`_float32_program_rounding`).
"""

from __future__ import annotations

import warnings

import pytest

import path_matrix as pm

RTOL = 1e-12
TORCH_COMPILE = {"backend": "aot_eager"}

CELLS = [
    (method, mode, model)
    for model in pm.MODELS
    for method in pm.METHODS
    for mode in pm.MODES
    if pm.accepts(method, mode, model)
]
FLOAT32 = {cell for cell in CELLS if pm.float32_state(*cell)}

def _cell_id(cell) -> str:
    return "-".join(cell[::-1])


def _reference(cell, backend: str) -> list:
    """The core's trajectory the path is held to: NumPy's, or for a float32 cell the core on the
    path's own backend (torch eagerly; JAX under jit)."""
    if cell not in FLOAT32:
        return _numpy_core(cell)
    if backend == "torch":
        import torch

        return pm.core_trajectory(*cell, xp=torch)
    import jax.numpy as jnp

    return _cached(("jitted core",) + cell, lambda: pm.core_trajectory(*cell, xp=jnp, jit=True))


_CACHE: dict = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _numpy_core(cell) -> list:
    return _cached(("core",) + cell, lambda: pm.core_trajectory(*cell))


def _torch_eager(cell) -> list:
    return _cached(("eager",) + cell, lambda: pm.torch_trajectory(*cell))


def _optax_jit(cell) -> list:
    return _cached(("jit",) + cell, lambda: pm.optax_trajectory(*cell))


def _close(got, want, rtol, what):
    diff, first = pm.difference(got, want, above=rtol)
    assert diff <= rtol, f"{what}: {diff:.2e} relative to the parameters, first above {rtol:g} after {first} steps"


def _update_sizes(want) -> float:
    """The sum over the steps of a core trajectory ``want`` of each step's largest update relative
    to its parameter (``max|w_t - w_{t-1}| / max|w_t|``, as :func:`path_matrix.difference` measures)."""
    import numpy as np

    total = 0.0
    for before, after in zip(want, want[1:]):
        total += max(float(np.max(np.abs(after[n] - before[n]))) / (float(np.max(np.abs(after[n]))) or 1.0) for n in after)
    return total


def _model_scale(want) -> float:
    """How much larger the updates of ``want`` are than the rounding model's 1e-2 of the
    parameters a step over ``STEPS`` steps; 1 where they are not."""
    return max(1.0, _update_sizes(want) / (pm.STEPS * 1e-2))


def _close_to_core(got, want, what):
    """``got`` within the rounding model of the core's trajectory ``want`` (module docstring): RTOL,
    scaled by ``want``'s update sizes (:func:`_model_scale`)."""
    _close(got, want, RTOL * _model_scale(want), what)


def _identical(got, want, what):
    diff, first = pm.difference(got, want)
    assert diff == 0.0, f"{what}: not bit-identical ({diff:.2e}, first after {first} steps)"


# --------------------------------------------------------------------------------------------
# torch: eager against the core; a restored state_dict and two param groups against eager.
# One test per (cell, path), a cell's paths adjacent so that one pytest-xdist worker runs them
# (and the eager run they are compared with) together.

TORCH_PATHS = ("eager", "restored-mid-interval", "restored-at-refresh", "two-groups", "maximize")
OPTAX_PATHS = ("jit", "pickled", "orbax")
#: Paths run on the MLP's cells alone (every method in both modes; its rank-2 sketches of 5 x 3 and
#: 2 x 5 weights truncate): the conv cells run the same adapter code for these paths, and the
#: injected optax row compiles a step per cell.
MLP_TORCH_PATHS = ("autocast", "empty-parameter-skipped-step", "tensor-lr")
MLP_OPTAX_PATHS = ("injected-other-dtype",)
MLP_CELLS = [cell for cell in CELLS if cell[2] == "mlp"]
#: The step the empty-parameter row skips (a NaN in the first param group's first gradient): a
#: refresh call (interval 3).
SKIPPED = pm.INTERVAL


def _per_path(paths, marks: dict, cells=CELLS) -> list:
    return [
        pytest.param(cell, path, marks=marks.get((cell, path), ()), id=f"{_cell_id(cell)}-{path}")
        for cell in cells
        for path in paths
    ]


def _torch_core(cell, **overrides) -> list:
    """The core's trajectory a torch path is held to, given ``overrides``: on NumPy, or for a
    float32 cell on torch (eagerly)."""
    if cell not in FLOAT32:
        return pm.core_trajectory(*cell, **overrides)
    import torch

    return pm.core_trajectory(*cell, xp=torch, **overrides)


def _meets_torch_core(cell, got, want, what):
    if cell in FLOAT32:
        _identical(got, want, f"{what} vs the core on torch")
    else:
        _close_to_core(got, want, f"{what} vs the NumPy core")


@pytest.mark.parametrize("cell, path", _per_path(TORCH_PATHS, {}) + _per_path(MLP_TORCH_PATHS, {}, MLP_CELLS))
def test_torch_path(cell, path):
    """torch eager (``compile=False``) gives the core's trajectory: to RTOL against NumPy, or
    bit-identical to the core on torch for a float32 cell (same kernels, same order).

    A ``state_dict`` saved after 4 steps (between refreshes) or 6 (the next call refreshes), through
    ``torch.save``/``torch.load`` into a fresh optimizer on fresh tensors, continues bit-identically
    to the uninterrupted eager run; so does the run with the same hyperparameters split in two param
    groups (one layer each: every method's state and update are per block), and so does the run
    made with ``maximize=True`` and given the negated gradients (the step negates them back
    exactly). These therefore meet the core as the eager run does.

    On the MLP's cells: ``step`` called inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` is
    bit-identical to eager (the step turns autocast off: the optimizer's arithmetic is its own;
    autocast never casts float64, so the float32-state cells are where it would act). Two param
    groups (one layer each), the second holding an empty parameter (numel 0) after its weight, step
    3 (a refresh call) given a NaN in the first group's weight gradient: the core given the same
    NaN (the step skipped in every group: parameters and state kept, counted) to RTOL, or
    bit-identical to the core on torch for a float32 cell; every parameter, the empty one included,
    has taken 9 steps and counted 1 skip. ``lr=torch.tensor(lr)`` (float32, as ``torch.tensor``
    makes it): the core given the value that tensor holds, the same way."""
    eager = _torch_eager(cell)
    if path == "eager":
        want = _reference(cell, "torch")
        if cell in FLOAT32:
            _identical(eager, want, "torch eager vs the core on torch")
        else:
            _close_to_core(eager, want, "torch eager vs the NumPy core")
    elif path.startswith("restored"):
        at = 4 if path == "restored-mid-interval" else 2 * pm.INTERVAL
        _identical(pm.torch_trajectory(*cell, restore_at=at), eager, "restored vs uninterrupted")
    elif path == "two-groups":
        names = list(pm.MODELS[cell[2]].shapes)
        _identical(pm.torch_trajectory(*cell, groups=[names[:2], names[2:]]), eager, "two groups vs one")
    elif path == "maximize":
        _identical(pm.torch_trajectory(*cell, maximize=True), eager, "maximize=True on the negated gradients vs eager")
    elif path == "autocast":
        _identical(pm.torch_trajectory(*cell, autocast=True), eager, "step inside autocast vs eager")
    elif path == "empty-parameter-skipped-step":
        import numpy as np

        names, keep = list(pm.MODELS[cell[2]].shapes), []
        nonfinite = {SKIPPED: names[0]}
        got = pm.torch_trajectory(*cell, groups=[names[:2], names[2:]], empty=names[2], nonfinite=nonfinite, keep=keep)
        want = _torch_core(cell, nonfinite=nonfinite)
        assert all(np.array_equal(want[SKIPPED + 1][n], want[SKIPPED][n]) for n in names), "the core skips the step"
        _meets_torch_core(cell, got, want, "torch with an empty parameter and a skipped step")
        opt, named = keep
        counts = {n: (int(opt.state[p]["step"]), int(opt.state[p]["nonfinite_count"])) for n, p in named}
        assert set(counts.values()) == {(pm.STEPS - 1, 1)} and pm.EMPTY[0] in counts, counts
    else:
        import torch

        lr = torch.tensor(pm.core_kwargs(*cell[:2])["learning_rate"])
        want = _torch_core(cell, learning_rate=float(lr))
        # the float32 value is another rate (a float32 state rounds either rate to that value)
        assert cell in FLOAT32 or pm.difference(want, _numpy_core(cell))[0] > 0
        _meets_torch_core(cell, pm.torch_trajectory(*cell, lr=lr), want, "torch with a tensor lr")


CAPTURED_PATHS = ("captured-restored-mid-interval", "captured-scheduled", "captured-maximize")


@pytest.mark.parametrize(
    "cell, path",
    [p for p in _per_path(CAPTURED_PATHS, {}) if p.values[1] == "captured-restored-mid-interval" or p.values[0][2] == "mlp"],
)
def test_torch_captured_path(cell, path, monkeypatch):
    """The captured step (``capture=True``) with CUDA graphs replaced by the CPU double of
    ``fake_graphs`` (a capture writes nothing; a replay runs the captured update again with the
    objects it was captured with, so a value the bookkeeping does not feed or invalidate stays
    stale) and every class's refusal lifted (the double has no host reads to refuse), the
    gradients new tensors every step (as after ``zero_grad(set_to_none=True)``): with a
    ``state_dict`` restored after 4 steps (mid-interval) into a fresh optimizer, bit-identical to
    the uninterrupted eager run, which meets the core (``test_torch_path``); under a ``LambdaLR``
    scheduler (``lr`` x 0.8 a step, written into the tensor the graphs read), bit-identical to the
    eager run under the same scheduler (every method and mode, on the MLP); made with
    ``maximize=True`` and given the negated gradients (negated back before the captured update),
    bit-identical to the eager run (on the MLP). Same arithmetic on the same values: bit-identity.
    Each run replays graphs (one that never did would test nothing)."""
    from fake_graphs import fake_graphs

    monkeypatch.setattr(pm.torch_class(cell[0]), "not_capturable_because", None)
    with fake_graphs() as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback from capture warns
        if path == "captured-restored-mid-interval":
            got, want = pm.torch_trajectory(*cell, capture=True, restore_at=4), _torch_eager(cell)
        elif path == "captured-maximize":
            got, want = pm.torch_trajectory(*cell, capture=True, maximize=True), _torch_eager(cell)
        else:
            got = pm.torch_trajectory(*cell, capture=True, lr_factor=_lr_factor)
            want = pm.torch_trajectory(*cell, capture=False, lr_factor=_lr_factor)
    assert graphs.replays() > 0
    assert pm.difference(want, _torch_eager(cell))[0] > 0 or path != "captured-scheduled"  # the schedule acts
    _identical(got, want, f"captured ({path}) vs eager")


def _lr_factor(t: int) -> float:
    return 0.8**t


@pytest.mark.parametrize("cell", [pytest.param(c, id=_cell_id(c)) for c in CELLS])
def test_cupy_captured_path(cell):
    """CuPy's captured step (``precond_ref.adapters.cupy.captured``), its stream capture replaced
    by the CPU double of ``fake_cupy_graphs`` (a capture writes nothing and reads nothing on the
    host; a replay runs the recorded update again with the objects it was recorded with) on NumPy
    arrays behind ``tests/sync_guard.py`` (which stand for a GPU's: nothing is read on the host):
    bit-identical to the eager core on the same arrays (the same arithmetic on the same values),
    which meets the NumPy core to RTOL (where the NumPy core reads a value on the host, e.g. a step
    count, it may compute a scalar on the host instead of in an array: a last-bit difference)."""
    got = pm.core_trajectory(*cell, guarded=True, cupy_captured=True)
    _identical(got, pm.core_trajectory(*cell, guarded=True), "CuPy captured vs the eager core on the same arrays")
    _close_to_core(got, _numpy_core(cell), "CuPy captured vs the NumPy core")


ROW_BLOCK_PATHS = ("core", "torch-eager", "torch-captured", "cupy-captured")


@pytest.mark.parametrize("path", ROW_BLOCK_PATHS)
def test_s_adagrad_sketch_stepped_by_row_blocks(path, monkeypatch):
    """S-AdaGrad's FD step of a sketch over ``precond_ref.sketch.FD_ROWS_BYTES`` (lowered here to 1
    byte, so that every sketch of the MLP takes it, one row a block): the frame products taken by
    blocks of rows, written over the old basis where the caller owns the state (the torch class,
    CuPy's captured step) and joined into a new array by the pure core. The NumPy core on this path
    meets the whole-product core to RTOL (each entry the same sum of k + 1 products, ordered per
    block: a few ulps, see ``tests/test_sketch_rows.py``); torch eager (another BLAS) meets it to
    RTOL; the captured steps (CPU doubles, the same arithmetic on the same values as their eager
    runs) are bit-identical to them. Each run takes the row-block path. Principled mode: its
    incremental FD step is the one with row blocks (faithful mode's SVD of the whole frame has none)."""
    from precond_ref import sketch

    cell = ("s_adagrad", "principled", "mlp")
    whole = _numpy_core(cell)  # before the bound is lowered
    calls = []
    by_rows = sketch.frame_products_in_rows
    monkeypatch.setattr(sketch, "frame_products_in_rows", lambda *a, **k: calls.append(1) or by_rows(*a, **k))
    monkeypatch.setattr(sketch, "FD_ROWS_BYTES", 1)
    if path == "core":
        got = pm.core_trajectory(*cell)
        calls_here = len(calls)
        _close_to_core(got, whole, "NumPy core by row blocks vs the whole products")
    elif path == "torch-eager":
        got = pm.torch_trajectory(*cell)
        calls_here = len(calls)
        _close_to_core(got, pm.core_trajectory(*cell), "torch eager by row blocks vs the NumPy core by row blocks")
    elif path == "torch-captured":
        from fake_graphs import fake_graphs

        monkeypatch.setattr(pm.torch_class("s_adagrad"), "not_capturable_because", None)
        with fake_graphs() as graphs, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback from capture warns
            got = pm.torch_trajectory(*cell, capture=True)
        calls_here = len(calls)
        assert graphs.replays() > 0
        _identical(got, pm.torch_trajectory(*cell), "torch captured vs torch eager, by row blocks")
    else:
        got = pm.core_trajectory(*cell, guarded=True, cupy_captured=True)
        calls_here = len(calls)
        _identical(got, pm.core_trajectory(*cell, guarded=True), "CuPy captured vs the eager core, by row blocks")
    assert calls_here > 0


@pytest.mark.parametrize(
    "cell", [pytest.param(c, id=_cell_id(c)) for c in CELLS if c[0] in pm.LEGACY_NAMED]
)
def test_torch_restored_from_old_entry_names(cell):
    """A ``state_dict`` saved mid-interval under the older entry names (IF-Shampoo's
    ``tile_t/factor_n``, Sketchy's ``axis{n}_run{j}_{name}``) loads into the current optimizer
    (``legacy_names``) and continues bit-identically to the uninterrupted eager run, so it meets
    the core as that run does."""
    _identical(pm.torch_trajectory(*cell, restore_at=4, old_names=True), _torch_eager(cell), "restored from old names vs uninterrupted")


@pytest.mark.parametrize("method", pm.METHODS)
def test_torch_compiled_equals_core(method):
    """``torch.compile`` of the step (principled mode, refreshes unspread (``path_matrix.UNSPREAD``):
    one compilation per method and branch, refresh and reuse) gives the NumPy core's trajectory to
    RTOL. The ``aot_eager``
    backend: dynamo's full-graph capture, functionalisation and decompositions, which is what
    compiling changes in a float64 program; Inductor's fused kernels are checked against eager in
    test_torch_compile.py. On one Linear layer (``path_matrix.ONE_LAYER_MODEL``) rather than the
    MLP: dynamo traces every leaf's update into each graph, and one layer has a leaf of each kind
    the MLP has (a matrix and a vector)."""
    cell, unspread = (method, "principled", pm.ONE_LAYER_MODEL), pm.UNSPREAD.get(method, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
        got = pm.torch_trajectory(*cell, compile=TORCH_COMPILE, **unspread)
    _close_to_core(got, pm.core_trajectory(*cell, **unspread), "torch compiled vs the NumPy core")


@pytest.mark.parametrize("method", ["rf_adamw", "mbf"])
def test_torch_compiled_maximize_equals_core(method):
    """``torch.compile`` of the step (``aot_eager``, as ``test_torch_compiled_equals_core``) made
    with ``maximize=True`` and given the negated gradients: the step negates them back before the
    compiled update, so it gives the NumPy core's trajectory to RTOL; an element-wise method and a
    matrix method, on the one-layer model."""
    cell, unspread = (method, "principled", pm.ONE_LAYER_MODEL), pm.UNSPREAD.get(method, {})
    keep: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
        got = pm.torch_trajectory(*cell, compile=TORCH_COMPILE, maximize=True, keep=keep, **unspread)
    assert keep[0]._compiled, "the step was not compiled"
    _close_to_core(got, pm.core_trajectory(*cell, **unspread), "torch compiled with maximize vs the NumPy core")


@pytest.mark.parametrize("method", ["agd", "rf_rmsprop", "rf_adamw", "dasgo"])
def test_torch_class_default_captured_equals_core(method, monkeypatch):
    """The class default (``compile=None``) of the classes that compile by default, captured: on
    CUDA a param group of at least ``AUTO_MIN_ELEMENTS`` elements captures its compiled step. Here
    the threshold is 1 element, the compiler ``aot_eager`` (as ``test_torch_compiled_equals_core``)
    and CUDA graphs the CPU double of ``fake_graphs`` (checked to replay): the NumPy core's
    trajectory to RTOL, on the one-layer model."""
    from fake_graphs import fake_graphs

    from precond_ref.adapters import _torch_compile

    monkeypatch.setattr(_torch_compile, "AUTO_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_torch_compile.Auto, "options_for", lambda self, numel: dict(TORCH_COMPILE))
    cell = (method, "principled", pm.ONE_LAYER_MODEL)
    keep: list = []
    with fake_graphs() as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
        got = pm.torch_trajectory(*cell, compile=None, capture=True, keep=keep)
    assert graphs.replays() > 0 and keep[0]._compiled, "the captured step was not the compiled one"
    _close_to_core(got, pm.core_trajectory(*cell), "torch class default captured vs the NumPy core")


@pytest.mark.parametrize("method", ["agd", "rf_rmsprop", "rf_adamw", "dasgo"])
def test_torch_compiled_per_leaf_equals_core(method, monkeypatch):
    """The element-wise classes' compiled per-leaf kernels and DASGO's compiled per-leaf calls of
    its core update (``LeafCalls``) (a param group of
    ``PER_LEAF_MIN_TENSORS`` tensors or more; lowered to 1 here, so the MLP's group takes that path)
    give the NumPy core's trajectory to RTOL, as the whole-group graph does (``aot_eager``)."""
    from precond_ref.adapters import _torch_compile

    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    calls, whole = [], _torch_compile.CompiledStep._call
    monkeypatch.setattr(_torch_compile.CompiledStep, "_call", lambda self, *a: calls.append(1) or whole(self, *a))
    cell = (method, "principled", "mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager warns
        got = pm.torch_trajectory(*cell, compile=TORCH_COMPILE)
    assert not calls  # no step ran the whole-group graph
    _close_to_core(got, _numpy_core(cell), "torch compiled per leaf vs the NumPy core")


# --------------------------------------------------------------------------------------------
# The Frequent Directions step of a truncating sketch under TorchInductor


@pytest.mark.parametrize("cell, path", [
    pytest.param(c, path, id=f"{_cell_id(c)}-{path}")
    for c in pm.TRUNCATING_CELLS
    # the captured step runs the compiled update: principled mode's compiled row alone would
    # repeat its two patterns' compilation, with nothing else to show
    for path in (("compiled", "compiled-captured") if c[1] == "faithful" else ("compiled-captured",))
])
def test_truncating_sketch_compiled_by_inductor_equals_core(cell, path):
    """S-AdaGrad (its FD step is Sketchy's) in both modes with a sketch that truncates
    (``path_matrix.truncating_settings``): faithful with rank ``TRUNCATING_RANK`` = 4 on a 6-5-3
    MLP (every weight's sketch truncates from the fifth step); principled with rank 2 on one
    Linear layer 3 -> 3 (its two leaves take the incremental FD step and the whole factor's
    decomposition, as the MLP's do; refreshes unspread: a refresh graph and a reuse graph; the
    third and fourth refresh truncate), under ``compile=True`` (TorchInductor: one graph that
    writes every leaf's parameters and state in place) give the NumPy core's trajectory to RTOL;
    so does the captured step of that compiled update (``capture=True``, CUDA graphs replaced by
    the CPU double of ``fake_graphs``, the class's refusal lifted: its replays run the compiled
    update again).

    Fused kernels round each operation as the eager ones do up to a few ulps (FMA contraction,
    another order of a reduction), which the rounding model behind RTOL covers. A compiled graph
    that lets one value's buffer overwrite another still live (a leaf's basis weights overwritten
    by the next leaf's coordinates before the direction read them) moves the parameters by about
    an update, a tenth of them or more. On the 6-5-3 MLP faithful S-AdaGrad's graph gives
    Inductor's buffer reuse that overlap to make wherever a value is left inside a joined buffer
    (the FD step's finiteness test); on the matrix's 3-5-2 MLP with rank 2 it does not. Principled
    S-AdaGrad's graphs did not make it on the 6-5-3 MLP either; each leaf adds kernels to compile."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager, or from capture, warns
        got = pm.inductor_trajectory(*cell, captured=path == "compiled-captured", **pm.truncating_settings(cell))
    want = pm.core_trajectory(*cell, **pm.truncating_settings(cell))
    _close_to_core(got, want, f"torch {path} (Inductor) vs the NumPy core")


# --------------------------------------------------------------------------------------------
# optax under jax.jit against the core; a pickled state against the uninterrupted run


def _injected_rounding() -> float:
    """The rounding model of a float32 cell's step with its hyperparameters traced arrays against
    the step with Python numbers, both under ``jax.jit``: the two compute the same quantities in
    the same dtypes, and differ where a Python number lets a rule pick a form on the host or lets
    XLA fold a constant subexpression at another precision (``tests/test_hyperparameter_dtypes.py``):
    per step at most ``16 u`` of the update (``u`` the float32 unit roundoff), the updates about
    1e-2 of the parameters, so over ``STEPS`` steps ``STEPS * 16 u * 1e-2`` of the parameters."""
    import numpy as np

    return pm.STEPS * 16 * float(np.finfo(np.float32).eps) / 2 * 1e-2


@pytest.mark.parametrize("cell, path", _per_path(OPTAX_PATHS, {}) + _per_path(MLP_OPTAX_PATHS, {}, MLP_CELLS))
def test_optax_path(cell, path):
    """optax under ``jax.jit`` (x64, enabled for the whole suite in conftest) gives the core's
    trajectory: to RTOL against NumPy; bit-identical to the jitted core for a float32 cell. A state
    pickled and restored after 4 steps, or saved by orbax's ``StandardCheckpointer`` and restored
    into the structure ``init`` gives (``path_matrix.orbax_restored``, as Flax training scripts do),
    continues bit-identically under the same jitted step (no recompilation: the restored state has
    the original's structure).

    On the MLP's cells: the factory under ``optax.inject_hyperparams`` (every float argument of its
    signature, defaults included, a 0-D array in the state, traced by the jitted step), the arrays
    of another dtype than the one the cell computes in (``hyperparam_dtype``): float32 for a float64
    cell (cast up, exactly), float64 (the wrapper's default for float64 parameters) for a float32-state
    cell (cast down). It gives the core given the values the arrays hold
    (``path_matrix.injected_values``): to RTOL against NumPy; a float32 cell against the jitted
    core given those values as Python numbers, to the rounding model of :func:`_injected_rounding`.
    One compilation per cell, so one dtype per cell: the other, arrays of the dtype the cell
    computes in, casts nothing."""
    if path in MLP_OPTAX_PATHS:
        import jax.numpy as jnp
        import numpy as np

        dtype = "float64" if cell in FLOAT32 else "float32"
        opt, step = pm._jitted(*cell, False, dtype)
        state = opt.init(pm.nested({n: jnp.asarray(v) for n, v in pm.MODELS[cell[2]].init().items()}))
        floats = {v.dtype for v in state.hyperparams.values() if jnp.issubdtype(v.dtype, jnp.floating)}
        assert floats == {np.dtype(dtype)}, floats
        got = pm.optax_trajectory(*cell, injected=dtype)
        values = pm.injected_values(*cell[:2], np.dtype(dtype))
        if cell in FLOAT32:
            assert all(values[k] == v for k, v in pm.core_kwargs(*cell[:2]).items() if k in values)  # float64 values
            _close(got, _reference(cell, "jax"), _injected_rounding(), f"optax {path} vs the jitted core")
        else:
            _close_to_core(got, pm.core_trajectory(*cell, **values), f"optax {path} vs the NumPy core given its values")
        assert step._cache_size() == 1
        return
    jitted = _optax_jit(cell)
    if path == "jit":
        want = _reference(cell, "jax")
        if cell in FLOAT32:
            _identical(jitted, want, "optax jit vs the jitted core on JAX")
        else:
            _close_to_core(jitted, want, "optax jit vs the NumPy core")
    elif path == "pickled":
        _identical(pm.optax_trajectory(*cell, pickle_at=4), jitted, "pickled vs uninterrupted")
    else:
        _identical(pm.optax_trajectory(*cell, orbax_at=4), jitted, "through an orbax checkpoint vs uninterrupted")
    assert pm._jitted(*cell, False)[1]._cache_size() == 1


# --------------------------------------------------------------------------------------------
# optax in JAX's training loops: every step under ``jax.lax.scan``, an ensemble under ``jax.vmap``

LOOP_PATHS = ("scan", "vmap")


def _float32_program_rounding(cell, want) -> float:
    """The rounding model of a float32 cell run as another XLA program than the jitted step (the
    steps under ``jax.lax.scan``, the step under ``jax.vmap``) against that step: the same float32
    operations, whose reductions (batched under vmap) and fusions may sum in another order. It is
    the model behind RTOL in float32: per step ``n·κ·eps`` of the update, ``n`` <= 36 terms per
    reduction, ``eps`` of float32 and ``κ`` <= 1e2 for a damped root or solve; faithful ASGO's root
    is the undamped Polar-Express iteration of a rank-deficient statistic, which multiplies the
    statistic's rounding-level eigenvalues by its null-space gain ``Π a_j``
    (``linalg.inverse_sqrt_polar_express``; 2.2e4 for the default 10 steps), so ``κ`` is that gain.
    The updates are those of the jitted step's trajectory ``want`` (:func:`_model_scale`: at least 1e-2
    of the parameters a step), over ``STEPS`` steps."""
    import math

    import numpy as np

    from precond_ref import linalg

    kappa = 1e2
    if cell[:2] == ("asgo", "faithful"):
        kappa = math.prod(a for a, _, _ in linalg.polar_express_coefficients(pm.core_kwargs(*cell[:2]).get("root_steps", 10)))
    return pm.STEPS * 36 * kappa * float(np.finfo(np.float32).eps) * 1e-2 * _model_scale(want)


@pytest.mark.parametrize("cell, path", _per_path(LOOP_PATHS, {}))
def test_optax_training_loop_path(cell, path):
    """optax in the two ways JAX users train, every method in both modes on both models.

    ``scan``: the whole run one jitted program, ``jax.lax.scan`` over the steps (the carry the
    parameters and the optimizer state, so the step counter is a traced value and no decision is
    made on the host; the scanned inputs the batches; each step's gradient the matrix's torch
    gradient at the carried parameters, through ``jax.pure_callback``, bit-identical to every other
    path's given the same parameters). ``vmap``: an ensemble of ``path_matrix.MEMBERS`` models with
    different initial parameters, stacked on a leading axis, the state made by
    ``jax.vmap(opt.init)`` and each step ``jax.jit(jax.vmap(update))``; each member is compared
    with that member trained alone.

    Both compile another XLA program than the jitted step (XLA fuses a step with the next, or
    batches the reductions), so neither is bit-identical to it by construction. They are held to
    what the user relies on, the core's trajectory: to RTOL against NumPy, the model of the jit row;
    a float32 cell against optax under ``jax.jit`` step by step (the jit row holds it bit-identical
    to the jitted core), member by member through the same compiled step, to the rounding model of
    :func:`_float32_program_rounding`. Each path compiles once (the scanned program, the mapped step).

    The scanned run's state after the last step holds the integer entries (step and refresh
    counters, failure counts) of the state stepped under ``jax.jit``, exactly: a cell whose
    trajectory the counters do not move in these settings (a refresh every step or never) would
    not show a counter the scan carried wrongly, which a resumed run would then read."""
    if path == "scan":
        import jax
        import jax.numpy as jnp
        import numpy as np

        scanned, stepped = [], []
        got = pm.scan_trajectory(*cell, final_state=scanned)
        jitted = pm.optax_trajectory(*cell, final_state=stepped)  # the jit row's run, its state kept
        counters = [(jax.tree_util.keystr(k), np.asarray(a), np.asarray(b)) for (k, a), b in
                    zip(jax.tree_util.tree_leaves_with_path(scanned[0]), jax.tree_util.tree_leaves(stepped[0]))
                    if jnp.issubdtype(a.dtype, jnp.integer)]
        assert counters, "no integer entry in the state"
        bad = [(k, a.tolist(), b.tolist()) for k, a, b in counters if not np.array_equal(a, b)]
        assert not bad, f"integer state entries after the scan differ from those stepped under jax.jit: {bad}"
        if cell in FLOAT32:
            _close(got, jitted, _float32_program_rounding(cell, jitted), "optax under jax.lax.scan vs optax under jax.jit")
        else:
            _close_to_core(got, _numpy_core(cell), "optax under jax.lax.scan vs the NumPy core")
        assert pm._scanned(*cell)[1]._cache_size() == 1
        return
    members = pm.vmap_trajectories(*cell)
    for k, got in enumerate(members):
        if cell in FLOAT32:
            want = pm.optax_trajectory(*cell, member=k)
            _close(got, want, _float32_program_rounding(cell, want),
                   f"member {k} under jax.vmap vs alone under jax.jit")
        else:
            _close_to_core(got, pm.core_trajectory(*cell, member=k), f"member {k} under jax.vmap vs alone in the NumPy core")
    assert pm._vmapped(*cell)[1]._cache_size() == 1


# --------------------------------------------------------------------------------------------
# The plain forms (``precond_ref.plain_forms``) against the fast forms, on every path's base runs

PLAIN_PATHS = ("core", "core-device-decisions", "torch-eager", "optax-jit")

#: The methods whose small leaves run as one flat leaf (``engine.joined.pack``), under ``jax.jit`` too.
PACKED = ("agd", "rf_rmsprop", "rf_adamw")


def _fast(cell, path: str) -> list:
    if path == "core":
        return _numpy_core(cell)
    if path == "core-device-decisions":
        return _cached(("device decisions",) + cell, lambda: pm.core_trajectory(*cell))
    return _torch_eager(cell) if path == "torch-eager" else _optax_jit(cell)


def _plain(cell, path: str) -> list:
    if path == "torch-eager":
        return pm.torch_trajectory(*cell, plain=True)
    if path == "optax-jit":
        return pm.optax_trajectory(*cell, plain=True)
    return pm.core_trajectory(*cell, plain=True)


def _packed_rounding(cell) -> float:
    """The rounding model of a packed step against its leaves stepped alone under ``jax.jit``: XLA
    compiles a flat leaf's element-wise loop as another kernel than a lone leaf's, whose operations
    may round each result otherwise by about an ulp. An update is about 30 such operations and about
    1e-2 of the parameters, and a parameter plus an update that differs by an ulp rounds to one of two
    neighbours: per step at most ``(1 + 30e-2) eps`` of the parameters, over ``STEPS`` steps
    ``STEPS (1 + 0.3) eps``, with ``eps`` of the dtype the cell's state rounds in."""
    import numpy as np

    eps = np.finfo(np.float32 if cell in FLOAT32 else np.float64).eps
    return pm.STEPS * (1 + 30e-2) * float(eps)


@pytest.mark.parametrize(
    "cell, path",
    [pytest.param(c, p, id=f"{_cell_id(c)}-{p}") for c in CELLS if c[2] == "mlp" for p in PLAIN_PATHS],
)
def test_plain_forms_give_the_fast_forms_trajectory(cell, path, monkeypatch):
    """Every method in both modes on the MLP (the cheapest model: the conv cells' plain runs were
    bit-identical too, not repeated here for the suite's time), run within
    ``precond_ref.plain_forms()``, gives the trajectory of its fast forms bit for bit on the NumPy
    core (with the non-finite rule's decision read on the host, and left on the device as on a GPU,
    where the rule selects each run of stack pieces at once), on torch eager and under
    ``jax.jit``: each fast form
    computes its plain form's numbers element for element (a view of the pieces' memory, one
    selection of the joined pieces, a remembered slice, the leaves of a flat leaf), in the same
    operations on the same operands. The exception is a packed method under ``jax.jit``, held to the
    rounding model of :func:`_packed_rounding` (a float32 cell rounds in float32)."""
    if path == "core-device-decisions":
        from precond_ref.engine import skip

        monkeypatch.setattr(skip, "host_bool", lambda xp, x: None)
    got, want = _plain(cell, path), _fast(cell, path)
    if path == "optax-jit" and cell[0] in PACKED:
        tol = _packed_rounding(cell)
        _close(got, want, tol, "plain forms vs fast forms, a packed step under jax.jit")
    else:
        _identical(got, want, f"plain forms vs fast forms ({path})")


# --------------------------------------------------------------------------------------------
# A member of a paired block without a gradient

PAIRED = [
    (method, extra, mode, model, leaf)
    for method, extra in [("mbf", {}), ("if_shampoo", {"grouping": "weight_bias"})]
    for mode in pm.MODES
    for model in pm.MODELS
    for leaf in ("bias", "weight")
]
_HEAD_FIRST = {"mlp": None, "conv": [["fc.weight", "fc.bias", "conv.weight", "conv.bias"]]}


def _paired_param(case):
    method, extra, mode, model, leaf = case
    return pytest.param(case, id=f"{method}-{mode}-{model}-no-{leaf}-grad")


@pytest.mark.parametrize("case", [_paired_param(c) for c in PAIRED])
def test_paired_member_without_gradient(case):
    """The Linear layer's bias (or weight) has ``grad=None`` on steps 2 and 5 while its partner has
    one. The core expresses the same missing leaf by the adapter's rule
    (:func:`precond_ref.transform.missing_members`): a zero gradient in the block's update and that
    leaf's update dropped. Trajectories agree to RTOL, and after the run every parameter's
    ``step`` counts the 10 updates the block took, as the core's ``count`` does.

    The weight comes first in its param group (the conv model's group lists the Linear layer first,
    so that the conv bias, whose diagonal rule reads the count, is stepped in the same call)."""
    method, extra, mode, model, leaf = case
    layer = "fc1" if model == "mlp" else "fc"
    missing = {2: [f"{layer}.{leaf}"], 5: [f"{layer}.{leaf}"]}
    kept: list = []
    got = pm.torch_trajectory(method, mode, model, missing=missing, groups=_HEAD_FIRST[model], keep=kept, **extra)
    want = pm.core_trajectory(method, mode, model, missing=missing, **extra)
    _close_to_core(got, want, "torch with a missing gradient vs the core given a zero gradient")
    opt, named = kept
    steps = {n: int(opt.state[p]["step"]) for n, p in named}
    assert set(steps.values()) == {pm.STEPS}, steps


# --------------------------------------------------------------------------------------------
# MBF's warm start through the three APIs


@pytest.mark.parametrize("api", ["torch", "optax"])
@pytest.mark.parametrize("mode", pm.MODES)
@pytest.mark.parametrize("model", list(pm.MODELS))
def test_mbf_warm_start_equals_core(model, mode, api):
    """``MBF.warm_start`` (torch) and ``mbf_warm_start`` (optax) followed by 10 steps give the
    trajectory of the core's ``warm_start``, which differs from a cold start (so the statistic
    the warm start sets is used)."""
    warm = pm.warm_batches(model)
    want = pm.core_trajectory("mbf", mode, model, warm=warm)
    assert pm.difference(want, _numpy_core(("mbf", mode, model)))[0] > 1e-3
    if api == "torch":
        got = pm.torch_trajectory("mbf", mode, model, warm=warm)
    else:
        got = pm.optax_trajectory("mbf", mode, model, warm=warm)
    _close_to_core(got, want, f"{api} warm start vs the core's")


def test_cells_cover_every_method_and_mode():
    """Every method runs on both models in principled mode and on the MLP in both modes; the
    conv cells a faithful mode refuses are the authors' 2-D-only ASGO and DASGO."""
    for method in pm.METHODS:
        assert (method, "principled", "conv") in CELLS and (method, "faithful", "mlp") in CELLS
    refused = {c[0] for c in set((m, mode, model) for m in pm.METHODS for mode in pm.MODES for model in pm.MODELS) - set(CELLS)}
    assert refused == {"asgo", "dasgo"}
    assert {c[:2] for c in FLOAT32} == {("asgo", "faithful"), ("dasgo", "faithful"), ("rf_rmsprop", "faithful"), ("rf_adamw", "faithful")}
