"""Hyperparameters given as 0-D arrays of another floating dtype than the parameters.

``optax.inject_hyperparams`` makes every numeric hyperparameter an array of the widest floating
dtype in the parameter tree (``optax.tree.dtype(params, "highest")``): under x64 a tree that mixes
float32 and float64 leaves gives the float32 leaves float64 hyperparameters. The engine casts each
configuration field to the dtype each group computes in (``engine.options.operands``), so every
method steps such a tree jitted, keeps each leaf's update and state dtypes, and takes the step a
Python number of the same value gives.

The hyperparameter values are exact in float32, so no cast changes them: the array runs and the
Python-number run compute the same quantities in the same dtypes, and differ only where a Python
number lets the rule pick a form on the host (AGD's stepwise difference for ``b1 >= 1/2``, the
graft's unguarded quotient) or lets XLA fold a constant subexpression (``1 - b``, ``b**t`` of a
constant base) at another precision, or XLA fuses the two programs differently. Each such form is
a handful of roundings, each of relative size ``u`` (the leaf dtype's unit roundoff), of quantities
no larger than the step's own scale, so per leaf and step ``|got - want| <= 16 u max|want|`` (the
differences seen are at most ``2 u max|want|``; most methods give bit-equal updates). That holds
where the step is well conditioned: Sketchy's direction is ``(L + eps I)^(-1/4)`` of its sketch
``L``, whose rounding errors grow as ``|L|/eps`` (faithful Sketchy with ``eps = 2**-24`` and a
rank-deficient sketch: about ``1800 u``), so its cases take ``eps = 1/4``, not small against the
unit-variance gradients' statistic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import precond_ref as pr
import precond_ref.adapters.jax as pj

#: 1 - 2**-10, a second-moment decay exact in float32
B2 = 0.9990234375

#: name -> (factory name, float hyperparameters (values exact in float32), other arguments). The
#: nine methods, the faithful modes whose one-sided and per-axis layouts run other rules, and
#: scale_by_sketchy.
CASES = {
    "agd": ("agd", dict(learning_rate=2**-7, b1=0.875, b2=B2, delta=2**-17, weight_decay=2**-7, clip=4.0), {}),
    "agd_faithful": ("agd", dict(learning_rate=2**-7, b1=0.875, b2=B2, delta=2**-17, weight_decay=2**-7),
                     dict(mode="faithful")),
    "agd_win": ("agd", dict(learning_rate=2**-7, b1=0.875, b2=B2, delta=2**-17, weight_decay=2**-7), dict(win=True)),
    "asgo": ("asgo", dict(learning_rate=2**-5, b1=0.875, b2=0.75, weight_decay=2**-4, damping=2**-10, eps=2**-30,
                          rms_target=0.25, fallback_b1=0.875, fallback_b2=0.9375, fallback_eps=2**-27,
                          fallback_weight_decay=2**-6), {}),
    "asgo_faithful": ("asgo", dict(learning_rate=2**-5, b1=0.875, b2=0.75, weight_decay=2**-4, eps=2**-30,
                                   rms_target=0.25, fallback_b1=0.875, fallback_b2=0.9375, fallback_eps=2**-27,
                                   fallback_weight_decay=2**-6), dict(mode="faithful")),
    "dasgo": ("dasgo", dict(learning_rate=2**-5, b1=0.875, b2=0.75, eps=2**-27, weight_decay=2**-4, rms_target=0.25,
                            fallback_b1=0.875, fallback_b2=0.9375, fallback_eps=2**-27, fallback_weight_decay=2**-6), {}),
    "mbf": ("mbf", dict(learning_rate=2**-5, damping=2**-10, momentum=0.875, b2=0.875, weight_decay=2**-6,
                        diagonal_b2=B2, diagonal_eps=2**-27, kl_clip=2**-6), {}),
    "rf_rmsprop": ("rf_rmsprop", dict(learning_rate=0.25, b2=B2, damping=2**-13, momentum=0.875, weight_decay=2**-6,
                                      initial_scale=1.0), dict(batch_size=8)),
    "rf_adamw": ("rf_adamw", dict(learning_rate=0.5, b1=0.875, b2=B2, damping=2**-13, weight_decay=2**-6,
                                  initial_scale=1.0), dict(batch_size=8)),
    "if_shampoo": ("if_shampoo", dict(learning_rate=2**-5, momentum=0.875, preconditioner_lr=2**-7,
                                      preconditioner_momentum=0.5, damping=2**-10, weight_decay=2**-6, kl_clip=2**-6),
                   dict(batch_size=8)),
    "sketchy": ("sketchy", dict(learning_rate=2**-7, b2=B2, eps=0.25, graft_b2=B2, graft_eps=2**-70, momentum=0.875,
                                weight_decay=2**-6), dict(rank=2)),
    "sketchy_faithful": ("sketchy", dict(learning_rate=2**-7, b2=B2, eps=0.25, graft_b2=B2, graft_eps=2**-70,
                                         momentum=0.875, weight_decay=2**-6), dict(rank=2, mode="faithful")),
    "s_adagrad": ("s_adagrad", dict(learning_rate=0.25, delta=2**-10, eps=2**-24, b2=B2, momentum=0.5,
                                    weight_decay=2**-6), dict(rank=2)),
    "scale_by_sketchy": ("scale_by_sketchy", dict(b2=B2, eps=0.25), dict(rank=2)),
}
#: the arguments that are not hyperparameters of a step (inject_hyperparams leaves them as given)
STATIC = ("rank", "batch_size")
STEPS = 2

_rng = np.random.default_rng(0)
#: a matrix and a vector per dtype (the vector: a one-sided method's fallback leaf); the two float32
#: leaves are small enough for an element-wise method to run them as one flat leaf
SHAPES = {"w": (4, 3), "b": (3,)}
VALUES = [{k: _rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS + 1)]


def _mixed(values: dict) -> dict:
    """The values as a tree of float32 and float64 leaves (``w32``, ``b32``, ``w64``, ``b64``)."""
    return {f"{k}{bits}": jnp.asarray(v, dtype) for k, v in values.items()
            for bits, dtype in (("32", jnp.float32), ("64", jnp.float64))}


def _run(tx: optax.GradientTransformation) -> tuple[list, list]:
    """The updates and the state's arrays of ``STEPS`` jitted steps on the mixed tree."""
    params = _mixed(VALUES[0])
    state, step, updates = tx.init(params), jax.jit(tx.update), []
    for values in VALUES[1:]:
        u, state = step(_mixed(values), state, params)
        updates.append(u)
    inner = state.inner_state if hasattr(state, "inner_state") else state
    return updates, jax.tree_util.tree_leaves(inner)


def _numpy_steps(tx, params: dict, grads: list, apply: bool = False) -> tuple[list, object]:
    """The core transform ``tx`` on NumPy: the updates of one step per gradient of ``grads`` from
    ``tx.init(params)`` (the parameters moved by each update where ``apply``), and the last state."""
    state, updates = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        if apply:
            params = {k: params[k] + u[k] for k in params}
        updates.append(u)
    return updates, state


@functools.lru_cache(maxsize=None)
def _python_numbers(case: str) -> tuple[list, list]:
    """The run with every hyperparameter a Python number (the reference of both array runs)."""
    name, hyperparameters, other = CASES[case]
    return _run(getattr(pj, name)(**hyperparameters, **other))


def _check_against_numbers(case: str, updates: list, state: list) -> None:
    """Each leaf's updates and the state's arrays have the dtypes of the Python-number run, and the
    updates equal its updates within 16 u max|want| of the leaf's dtype (module docstring)."""
    want_updates, want_state = _python_numbers(case)
    assert [(a.shape, a.dtype) for a in state] == [(a.shape, a.dtype) for a in want_state]
    for got, want in zip(updates, want_updates):
        for leaf in want:
            assert got[leaf].dtype == want[leaf].dtype == (jnp.float32 if leaf.endswith("32") else jnp.float64), leaf
            g, w = np.asarray(got[leaf], np.float64), np.asarray(want[leaf], np.float64)
            bound = 16 * np.finfo(want[leaf].dtype).eps / 2 * np.max(np.abs(w))
            assert np.all(np.abs(g - w) <= bound), (leaf, np.max(np.abs(g - w)) / bound)


@pytest.mark.parametrize("case", list(CASES))
def test_inject_hyperparams_over_float32_and_float64_leaves(case):
    """``optax.inject_hyperparams`` over a tree of float32 and float64 leaves: every float
    hyperparameter a float64 0-D array, traced under jit, and each float32 leaf computes with
    them. The step runs, each leaf keeps its dtype, and the updates are those of Python numbers."""
    name, hyperparameters, other = CASES[case]
    tx = optax.inject_hyperparams(getattr(pj, name), static_args=tuple(k for k in STATIC if k in other))(
        **hyperparameters, **other)
    state = tx.init(_mixed(VALUES[0]))
    assert {v.dtype for v in state.hyperparams.values()} == {jnp.dtype(jnp.float64)}
    _check_against_numbers(case, *_run(tx))


@pytest.mark.parametrize("case", list(CASES))
def test_float32_hyperparameters_widen_for_float64_leaves(case):
    """Every float hyperparameter a float32 0-D array, given to the factory: the float64 leaves
    compute with them widened (exactly: the values are float32 numbers), the float32 leaves as
    they are."""
    name, hyperparameters, other = CASES[case]
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in hyperparameters.items()}
    _check_against_numbers(case, *_run(getattr(pj, name)(**arrays, **other)))


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_float64_hyperparameter_with_float32_parameters(case):
    """The core transforms on NumPy float32 parameters, each float hyperparameter alone a float64
    0-D array (a NumPy 0-D array, unlike a NumPy scalar, is no weak operand: it promotes a float32
    array): the updates and the state keep their dtypes and equal those of Python numbers."""
    name, hyperparameters, other = CASES[case]
    factory = getattr(pr, name)

    def run(**kwargs) -> tuple[list, list]:
        params = {k: np.asarray(v, np.float32) for k, v in VALUES[0].items()}
        grads = [{k: np.asarray(v, np.float32) for k, v in values.items()} for values in VALUES[1:]]
        updates, state = _numpy_steps(factory(**kwargs, **other), params, grads)
        return updates, [a for entries in state.groups.values() for a in entries.values()]

    want_updates, want_state = run(**hyperparameters)
    for key, value in hyperparameters.items():
        updates, state = run(**{**hyperparameters, key: np.asarray(value, np.float64)})
        assert [(a.shape, a.dtype) for a in state] == [(a.shape, a.dtype) for a in want_state], key
        for got, want in zip(updates, want_updates):
            for leaf in want:
                assert got[leaf].dtype == np.float32, (key, leaf)
                bound = 16 * np.finfo(np.float32).eps / 2 * np.max(np.abs(want[leaf]))
                assert np.all(np.abs(got[leaf].astype(np.float64) - want[leaf]) <= bound), (key, leaf)


#: The methods whose step forms a product of the learning rate with another hyperparameter
#: (η_t λ; Win's 1 + η_t λ and 1/(3 + 2 η_t λ)) from the learning rate as given at the step.
PRODUCT_CASES = ["agd", "agd_win", "agd_faithful", "rf_adamw"]


@pytest.mark.parametrize("case", PRODUCT_CASES)
def test_float32_learning_rate_times_python_weight_decay_over_float64_parameters(case):
    """A float32 0-D learning rate with the other hyperparameters Python numbers, over float64
    parameters: the products of η_t with a Python λ are formed in float64, as they are of Python
    numbers, not rounded to float32 (a Python number takes the dtype of the array it meets). The
    values are float32 numbers whose products are not, so every product is computed the same way
    in both runs: each step's updates equal those of the Python-number run within 16 u max|want|,
    u of float64 (module docstring); a product rounded to float32 is off by up to 2**-24 of
    η_t λ w, about 1e5 times that."""
    name, hyperparameters, other = CASES[case]
    values = {k: float(np.float32(v * 0.9371)) for k, v in hyperparameters.items()}
    factory = getattr(pr, name)

    def run(learning_rate) -> list:
        params = {k: np.asarray(v, np.float64) for k, v in VALUES[0].items()}
        grads = [{k: np.asarray(v, np.float64) for k, v in values_t.items()} for values_t in VALUES[1:] * 5]
        tx = factory(**{**values, "learning_rate": learning_rate}, **other)
        return _numpy_steps(tx, params, grads, apply=True)[0]

    want = run(values["learning_rate"])
    for got, expected in zip(run(np.asarray(values["learning_rate"], np.float32)), want):
        for leaf in expected:
            assert got[leaf].dtype == np.float64, leaf
            bound = 16 * np.finfo(np.float64).eps / 2 * np.max(np.abs(expected[leaf]))
            assert np.all(np.abs(got[leaf] - expected[leaf]) <= bound), (leaf, np.max(np.abs(got[leaf] - expected[leaf])) / bound)


@pytest.mark.parametrize("case", ["asgo", "dasgo"])
def test_float32_rms_target_over_float32_matrices_joined(case):
    """A float32 0-D ``rms_target`` over float32 parameters of two matrices of different shapes,
    whose renormalisation runs joined and in float64: the targets r·sqrt(mn) are formed of r
    taken in float64 (a product rounded once, as of a Python number) and made for the step (an
    array keys no kept constant), and each step's updates equal those of a Python ``rms_target``
    bit for bit: both form the same float64 product r·sqrt(mn) of the same value (r is exact in
    float32), then the same arithmetic. Formed in float32 first, the target was off by up to half
    an ulp of float32, which the float64 renormalisation carried into the update."""
    name, hyperparameters, other = CASES[case]
    values = {**hyperparameters, "rms_target": float(np.float32(0.2 * 0.9371))}
    shapes = {"w": (4, 3), "v": (5, 2)}
    rng = np.random.default_rng(1)
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]

    def run(rms_target) -> list:
        params = {k: np.ones(s, np.float32) for k, s in shapes.items()}
        return _numpy_steps(getattr(pr, name)(**{**values, "rms_target": rms_target}, **other), params, grads)[0]

    want = run(values["rms_target"])
    for got, expected in zip(run(np.asarray(values["rms_target"], np.float32)), want):
        for leaf in expected:
            assert got[leaf].dtype == np.float32, leaf
            assert np.array_equal(got[leaf], expected[leaf]), leaf


#: Calls that cast a value to a dtype (``_backend.as_operand``, ``cast``, ``scalar_array``,
#: ``engine.options.widened``, an array library's ``astype``/``asarray``).
CASTS = {"astype", "asarray", "as_operand", "cast", "scalar_array", "widened"}


@pytest.mark.parametrize("case", PRODUCT_CASES + ["rf_rmsprop", "rf_adamw_corrected"])
def test_float64_learning_rate_over_float32_parameters_steps_as_a_python_number(case):
    """A float64 0-D learning rate over float32 parameters (the torch optimizers pass ``lr`` as a
    float64 tensor) gives the steps of the same Python number bit for bit, on NumPy: a number is a
    weak scalar, rounded to float32 where it meets a float32 array, and each scalar formed of the
    array is so too. Its products with other hyperparameters (η_t λ, Win's) are formed in float64
    and rounded once, as a product of Python numbers is, and where η_t meets a float32 array
    before the runner's cast (RF-AdamW's η_t/c₁, ``StepValues.operand``) it is rounded to float32
    first, as a number is; divided in float64 and rounded once, η_t/c₁ differs in the last bit
    for some steps."""
    name, hyperparameters, other = CASES[case.removesuffix("_corrected")]
    if case == "rf_adamw_corrected":
        other = {**other, "bias_correction": True}
    values = {k: float(np.float32(v * 0.9371)) if k != "learning_rate" else 0.0123 for k, v in hyperparameters.items()}
    factory = getattr(pr, name)

    def run(learning_rate) -> list:
        params = {k: np.asarray(v, np.float32) for k, v in VALUES[0].items()}
        grads = [{k: np.asarray(v, np.float32) for k, v in values_t.items()} for values_t in VALUES[1:] * 6]
        return _numpy_steps(factory(**{**values, "learning_rate": learning_rate}, **other), params, grads, apply=True)[0]

    for got, want in zip(run(np.asarray(0.0123, np.float64)), run(0.0123)):
        for leaf in want:
            assert got[leaf].dtype == np.float32 and np.array_equal(got[leaf], want[leaf]), leaf


def _casts_by_function(module) -> dict:
    """``{function name: sorted cast calls}`` of every function defined in ``module`` (nested ones
    and lambdas under their enclosing function's name) that calls one of :data:`CASTS`."""
    import ast
    import inspect

    found: dict = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.FunctionDef):
            names = {getattr(c.func, "id", None) or getattr(c.func, "attr", None)
                     for c in ast.walk(node) if isinstance(c, ast.Call)}
            if names & CASTS:
                found[node.name] = sorted(names & CASTS)
    return found


def test_rules_cast_only_in_mixed_precision_arithmetic():
    """The rules are written as the paper's equations of operands the runner makes (docs/engine.md,
    "What a rule is handed"; the project's bar: no casting words in a rule). The step scalars of
    the element-wise rules (AGD, faithful AGD, RF-RMSProp, RF-AdamW) are formulas of the
    configuration and the step's values: ``engine.elementwise.StepValues`` widens a narrower
    array hyperparameter, gives the step number in the state's (or the rule's counter) dtype, and
    ``step_scalars`` casts every array scalar to the state's dtype. The
    fallback Adam of ASGO and DASGO and MBF's diagonal rule read the step number ``t.step`` in the
    state's dtype (``engine.elementwise.step_values``); IF-Shampoo's refresh gets its configuration
    as operands of the factors' dtype, B of the gradient's, and its step size β₂ (times the
    group's ``preconditioner_lr_scale``) in the factors' dtype, and its KL clip η and κ in the
    dtype of ⟨D, G⟩ (``engine.tiles``). What casts remain is IF-Shampoo's mixed-precision
    arithmetic, which moves the grouped tensor between the factors' dtype (``factor_dtype``,
    one per axis) and the gradient's work dtype, each cast rounding the tensor for the axes after
    it (``_factor_step``, ``_precondition``, ``_descend``), and AGD's ``z_0 = θ_0``, a copy of
    the parameter in the state's dtype. No function of asgo.py, mbf.py or sketchy.py casts."""
    import importlib

    names = ("asgo", "mbf", "sketchy", "root_free", "agd")
    modules = {name: importlib.import_module(f"precond_ref.methods.{name}") for name in names}
    found = {name: _casts_by_function(module) for name, module in modules.items()}
    assert found == {
        "asgo": {},
        "mbf": {},
        "sketchy": {},
        "root_free": {"_factor_step": ["cast"], "_precondition": ["astype", "cast"], "_descend": ["cast"]},
        "agd": {"_agd_init": ["astype"]},
    }
