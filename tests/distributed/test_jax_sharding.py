"""optax transformations with parameters sharded over a 4-device mesh (``jax_worker.py``).

The worker needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before jax is imported,
so it runs in its own interpreter (with a timeout); each test judges one method's JSON line.
"""

from __future__ import annotations

import os

import pytest
from session_jobs import json_lines_of

WORKER = os.path.join(os.path.dirname(__file__), "jax_worker.py")
METHODS = ["agd", "asgo", "dasgo", "mbf", "rf_rmsprop", "rf_adamw", "if_shampoo", "sketchy", "s_adagrad"]
EPS64 = 2.0**-52


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA_FLAGS: the suite's, for compile time (xla_flags.py)
    return json_lines_of(tmp_path_factory, "jax_sharding", WORKER, "the JAX sharding worker", env=env)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_training_matches_one_device(results, method):
    """Three jitted steps with NamedSharding parameters equal the same steps on one device.

    The core is placement-free, so only the order of the reductions XLA splits across the 4
    devices may change: float64 rounding of at most ~1e-15 relative per operation. The bound
    1e-12 allows the three steps' amplification by the preconditioners (up to ~1e3 for the
    rank-truncated sketches) and still fails on any real error (a wrong block, state on the wrong
    parameter), which changes the result at O(1). The step compiles once: the state stays where
    ``init`` put it (``state_shardings`` predicts it exactly).
    """
    line = results[method]
    assert line["rel"] <= 1e-12, line["rel"]
    assert line["compiles"] == 1
    assert line["same_prediction"]


@pytest.mark.parametrize("method", METHODS)
def test_state_shardings_of_a_chain_are_where_init_places_them(results, method):
    """``state_shardings`` of ``optax.chain(clip_by_global_norm, <method>, trace,
    masked(<method>, weights), masked(trace, weights))`` is exactly where the chain's ``init``
    places its state: the method's blocks as for the method alone (masked: those of the weights),
    optax's ``trace`` buffers (copies of the parameter tree, the masked one with MaskedNodes for
    the biases) like the parameters. It refused any state that was not the method's own."""
    assert results[method]["chain_prediction"]


def test_a_step_inside_optax_combinators_compiles_once(results):
    """ASGO inside ``MultiSteps(inject_hyperparams(...))``, initialised and stepped with
    ``state_shardings``' shardings: the step compiles once over three steps (optax's counters and
    injected hyperparameters replicated, not left on the default device, which would compile a
    second program on the second step), and MultiSteps' accumulated gradients keep the
    parameters' specs."""
    line = results["combinators"]
    assert line["compiles"] == 1
    assert line["accumulated_specs"] == line["param_specs"]


@pytest.mark.parametrize("method", METHODS)
def test_eager_steps_on_sharded_parameters_match_one_device(results, method):
    """Steps outside ``jax.jit`` also take sharded parameters and give the one-device numbers
    (those of the same steps jitted on one device; same bound as the jitted steps, derived above:
    eager and jitted steps differ only in the order of float64 roundings). Arrays the core makes
    during a step (0-D selection operands and hyperparameters, identities, flags, sketch probes)
    are left uncommitted on JAX (``transform.placement``): made on the device of a sharded array, a
    multi-device sharding, they raised ``IndexError`` or ``ValueError``. The second step takes the
    first one's state; where its refresh is not due its flags are made from no sharded array, and
    an array made like them (``_backend.array_device`` of an uncommitted array) was committed to
    the default device, which Sketchy's and S-AdaGrad's failure count then joined with the
    sharded step's flags (``ValueError``: incompatible devices). The state the steps return lies on
    the mesh: every array committed to its 4 devices."""
    eager_rel = results[method]["eager_rel"]
    assert not isinstance(eager_rel, str), eager_rel
    assert eager_rel <= 1e-12, eager_rel
    assert results[method]["eager_off_the_mesh"] == []


@pytest.mark.parametrize("method", METHODS)
def test_core_transform_inits_and_steps_on_sharded_parameters(results, method):
    """The core transform (``precond_ref.<method>``, without the optax adapter, whose ``init`` is
    jitted and places the state) takes sharded parameters: its eager ``init`` makes the state
    arrays that have no parameter's shape (counters, statistics, sketches, factors) on no device,
    since a multi-device sharding fits no other shape (it raised ``IndexError`` or
    ``IndivisibleError``), and its jitted step gives the one-device numbers (bound as above)."""
    core_rel = results[method]["core_rel"]
    assert not isinstance(core_rel, str), core_rel
    assert core_rel <= 1e-12, core_rel


@pytest.mark.parametrize("method", METHODS)
def test_state_is_sharded_like_the_parameters(results, method):
    """``init`` on sharded parameters works (it used to put the 0-d counter on a rank-2 sharding)
    and shards the state like the parameters where its shape allows: the counters are
    replicated, and every state entry with a parameter's shape has that parameter's spec (here
    l1/kernel is sharded by rows and l2/kernel by columns over the 4 devices)."""
    line = results[method]
    assert line["counter"] == "P()"
    expected = {"l1/kernel": "P('x', None)", "l2/kernel": "P(None, 'x')"}
    same_shape = {"agd": ("m", "b"), "asgo": ("momentum",), "dasgo": ("momentum",),
                  "rf_rmsprop": ("s", "momentum"), "rf_adamw": ("m", "s"), "if_shampoo": ("momentum/0",),
                  "sketchy": ("momentum", "graft_second_moment"), "s_adagrad": ("momentum",), "mbf": ()}
    for key, spec in expected.items():
        for entry in same_shape[method]:
            assert line["entries"][key][entry] == spec, (key, entry)


@pytest.mark.parametrize("method", METHODS)
def test_optax_tree_map_params_works(results, method):
    """``optax.tree.map_params`` (optax's tool for deriving state shardings) accepts the state: it
    calls ``init`` with a params placeholder, which used to raise "params has no array leaves".
    The state holds no copy of the parameter tree (it is stored per block), so every field is a
    non-parameter field."""
    assert results[method]["map_params"] == "PyTreeDef(CustomNode(namedtuple[PrecondState], [None, None, None]))"
