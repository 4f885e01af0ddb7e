"""optax's own common tests of its contributed optimizers, run unchanged against our transforms.

The test bodies are those of ``optax/contrib/_common_test.py`` from the installed optax (it ships
in the wheel): each upstream test function is re-bound to a namespace in which
``_get_opt_factory(name)`` returns our optax factory, and parametrised over ``OPTIMIZERS`` on the
upstream grids (targets, dtypes, ``wrap``). Nothing of the upstream file is copied or edited; if a
new optax adds a test, ``test_every_upstream_test_is_bound`` fails until it is bound here too.

What upstream checks, per transform: extra ``update`` arguments are accepted and one compilation
serves every step; 30 000 jitted steps reach the optimum of a parabola, Rosenbrock's function, a
matrix parabola and a mixed 1-D/2-D target to 3e-2; ``optax.tree.map_params`` works on the state;
plain ``optax.inject_hyperparams`` (only upstream's list of static names, e.g. ``rank``) gives the
same step; updates keep bf16/float32 dtypes, also inside ``optax.MultiSteps``; the state keeps
its dtypes across ``lax.cond`` in fp16/bf16/float32/float64; a constant schedule equals the
constant learning rate.
"""

from __future__ import annotations

import re
import types

import pytest

pytest.importorskip("absl.testing.parameterized")
upstream = pytest.importorskip("optax.contrib._common_test")

from absl.testing import parameterized  # noqa: E402

import precond_ref.adapters.jax as pj  # noqa: E402

# Every other argument keeps its default, except ASGO/DASGO's decoupled weight decay (default 0.1,
# from the authors' language models): it moves the optimum away from upstream's targets. Learning
# rates: the method's default where it has one that suits these problems; MBF has none (1e-3);
# the root-free methods' steps scale like 1/|g| far from the optimum (1e-2 to cover upstream's
# distance 11 in 30 000 steps), and S-AdaGrad's like 1/sqrt(t) (0.3). Root-free methods need the
# number of examples the loss averages (1 here).
OPTIMIZERS = tuple(
    {"opt_name": name, "opt_kwargs": kwargs, "wrapper_name": None, "wrapper_kwargs": None}
    for name, kwargs in [
        ("agd", {"learning_rate": 1e-3}),
        ("asgo", {"learning_rate": 1e-2, "weight_decay": 0.0}),
        ("dasgo", {"learning_rate": 1e-2, "weight_decay": 0.0}),
        ("mbf", {"learning_rate": 1e-3}),
        ("rf_rmsprop", {"learning_rate": 1e-2, "batch_size": 1}),
        ("rf_adamw", {"learning_rate": 1e-2, "batch_size": 1}),
        ("if_shampoo", {"learning_rate": 1e-3, "batch_size": 1}),
        ("sketchy", {"learning_rate": 1e-3}),
        ("s_adagrad", {"learning_rate": 0.3}),
    ]
)


def _get_opt_factory(opt_name):
    return getattr(pj, opt_name)


def _bound(name):
    """Upstream's test function ``name`` (undecorated), looking up optimizers among ours."""
    function = getattr(upstream.ContribTest, f"{name}0").__wrapped__
    namespace = dict(function.__globals__, _get_opt_factory=_get_opt_factory)
    return types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__)


_TARGETS = (upstream._setup_parabola, upstream._setup_rosenbrock, upstream._setup_matrix_parabola,
            upstream._setup_mixed_tensor_target)
# Upstream's grids, per test (the optimizer list is the first product axis).
_GRIDS = {
    "test_optimizers_accept_extra_args": dict(wrap=[True, False]),
    "test_optimizers": dict(target=_TARGETS, dtype=("float32",)),
    "test_optimizers_can_be_wrapped_in_inject_hyperparams": dict(),
    "test_preserve_dtype": dict(dtype=("bfloat16", "float32")),
    "test_gradient_accumulation": dict(dtype=("bfloat16", "float32")),
    "test_state_shape_dtype_shard_stability": dict(
        dtype=(upstream.jnp.float16, upstream.jnp.bfloat16, upstream.jnp.float32, upstream.jnp.float64)
    ),
    "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such": dict(),
}


PrecondContribTest = types.new_class(
    "PrecondContribTest",
    (parameterized.TestCase,),
    exec_body=lambda namespace: namespace.update(
        {name: parameterized.product(OPTIMIZERS, **grid)(_bound(name)) for name, grid in _GRIDS.items()}
    ),
)


def test_every_upstream_test_is_bound():
    """Every test of the installed optax's common suite runs here (a new one must be added)."""
    upstream_tests = {name.rstrip("0123456789") for name in vars(upstream.ContribTest) if name.startswith("test")}
    assert upstream_tests == set(_GRIDS)


@pytest.mark.parametrize(
    "factory, kwargs, static",
    [
        (pj.asgo, dict(root_steps=5), ("root_steps",)),
        (pj.mbf, dict(statistics_every=2, precondition_every=4), ("statistics_every", "precondition_every")),
        (pj.sketchy, dict(rank=4, merge_dims=8), ("rank", "merge_dims")),
        (pj.s_adagrad, dict(rank=4), ("rank",)),
        (pj.asgo, dict(block_size=2, spread_refresh=False), ("block_size",)),  # a bool is not injected
        (pj.mbf, dict(block_size=2, refresh_phases=2), ("block_size", "refresh_phases")),
        (pj.if_shampoo, dict(block_size=2, spread_refresh=False, batch_size=1), ("block_size",)),
        (pj.asgo, dict(root_tolerance=1e-3), ("root_tolerance",)),
    ],
    ids=["asgo", "mbf", "sketchy", "s_adagrad", "asgo_blocks", "mbf_blocks", "if_shampoo_blocks", "asgo_root_tolerance"],
)
def test_injected_static_integer_names_the_static_args(factory, kwargs, static):
    """Plain inject_hyperparams works with the defaults (upstream's inject test
    above); a number that fixes shapes, loops or refresh steps, or that a host-side check reads
    (ASGO's ``root_tolerance``, which was refused without naming ``static_args``), given
    explicitly, raises an error naming the exact ``static_args``; with them the transformation
    is built."""
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.ones((3, 2), jnp.float32)}
    with pytest.raises(ValueError, match=re.escape(f"static_args={static!r}")):
        optax.inject_hyperparams(factory)(learning_rate=1e-2, **kwargs).init(params)
    state = optax.inject_hyperparams(factory, static_args=static)(learning_rate=1e-2, **kwargs).init(params)
    assert set(state.hyperparams) >= {"learning_rate"} and not set(static) & set(state.hyperparams)
