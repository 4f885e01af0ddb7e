"""The JAX sharding scenario, run by ``test_jax_sharding.py`` in a fresh interpreter (not collected).

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is imported, which the
rest of the suite has already done without it. Trains every optax transformation 3 jitted steps
with parameters sharded by ``NamedSharding`` over a 4-device mesh, and on one device, and 2 steps
eagerly on the sharded parameters, and prints one JSON line per method with what the test checks.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU client gives its thread pool max(cores, devices) threads, and runs on it both each
# device's share of a multi-device program and the dispatch of each share, which blocks while
# that device has too many computations in flight. With 4 pool threads, three shares of one
# program can wait in a collective while the fourth thread dispatches the next program and
# blocks: the collective never completes (XLA aborts after 40 s). Eight threads hold one
# program's four shares and the next program's four dispatches.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)

import precond_ref  # noqa: E402
import precond_ref.adapters.jax as pj  # noqa: E402

B = 8
METHODS = {
    "agd": (pj.agd, dict(learning_rate=5e-2), {}),
    "asgo": (pj.asgo, dict(learning_rate=5e-2, weight_decay=1e-3), {}),
    "dasgo": (pj.dasgo, dict(learning_rate=5e-2, weight_decay=1e-3), {}),
    "mbf": (pj.mbf, dict(learning_rate=5e-2, damping=1.0, statistics_every=1, precondition_every=2), {}),
    "rf_rmsprop": (pj.rf_rmsprop, dict(learning_rate=2e-2, damping=0.1, momentum=0.9), dict(batch_size=B)),
    "rf_adamw": (pj.rf_adamw, dict(learning_rate=5e-2, damping=1e-2, batch_size=B), {}),
    "if_shampoo": (pj.if_shampoo, dict(learning_rate=1e-2, preconditioner_lr=0.5, damping=0.1, batch_size=B), {}),
    "sketchy": (pj.sketchy, dict(learning_rate=3e-2, rank=2, weight_decay=1e-3), {}),
    "s_adagrad": (pj.s_adagrad, dict(learning_rate=3e-1, rank=2, momentum=0.5, precondition_every=2), {}),
}
SPECS = {"l1": {"kernel": P("x", None), "bias": P("x")}, "l2": {"kernel": P(None, "x"), "bias": P()}}


def problem():
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    params = {
        "l1": {"kernel": jax.random.normal(k[0], (8, 12)) / 3, "bias": jnp.zeros(12)},
        "l2": {"kernel": jax.random.normal(k[1], (12, 4)) / 3, "bias": jnp.zeros(4)},
    }
    xs, ys = jax.random.normal(k[2], (3, B, 8)), jax.random.normal(k[3], (3, B, 4))
    return params, xs, ys


def loss(params, x, y):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return jnp.mean((h @ params["l2"]["kernel"] + params["l2"]["bias"] - y) ** 2)


def train(opt, extra, params, xs, ys):
    state = opt.init(params)
    placed = jax.tree.map(lambda a: a.sharding, state)
    # Keeping the parameters' and the state's shardings as they are compiles the step once.
    keep = (jax.tree.map(lambda a: a.sharding, params), pj.state_shardings(opt, params))

    @functools.partial(jax.jit, out_shardings=keep)
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    trajectory = []
    for x, y in zip(xs, ys):
        params, state = step(params, state, x, y)
        trajectory.append(params)
    return trajectory, state, placed, step._cache_size()


def eager_training(opt, extra, params, xs, ys):
    """The first two of the jitted training's steps without jax.jit (a user debugging, or a step
    too irregular to compile), the second taking the state the first made: it meets arrays the
    first made, and where a refresh is not due (ASGO, IF-Shampoo, MBF, Sketchy and S-AdaGrad
    here refresh every 2 or 3 steps) it makes its flags from no sharded array. Returns the
    parameters and the state after them."""
    state = opt.init(params)
    for x, y in zip(xs[:2], ys[:2]):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


def off_the_mesh(state, devices):
    """The paths of the state's arrays that do not lie committed on all of ``devices`` (an eager
    step's arrays are sharded as XLA's propagation chose for the operation that made each, so
    their specs are not compared)."""
    return [
        jax.tree_util.keystr(path)
        for path, a in jax.tree_util.tree_leaves_with_path(state)
        if not (a.committed and a.sharding.device_set == set(devices))
    ]


def core_step(name, kwargs, extra, params, x, y):
    """The core transform's own ``init`` (not the adapter's jitted one) on ``params``, then one
    jitted step: its state arrays of other shapes than a parameter's are made on no device."""
    core = getattr(precond_ref, name)(**kwargs)
    state = core.init(params)
    grads = jax.grad(loss)(params, x, y)
    updates, _ = jax.jit(functools.partial(core.update, **extra))(grads, state, params)
    return optax.apply_updates(params, updates)


def _relative_difference(a_tree, b_tree):
    return max(
        float(np.linalg.norm(a - b) / np.linalg.norm(b))
        for a, b in zip(jax.device_get(jax.tree.leaves(a_tree)), jax.device_get(jax.tree.leaves(b_tree)))
    )


def combinators_training(params, xs, ys):
    """ASGO inside ``optax.MultiSteps`` of ``optax.inject_hyperparams``, its state initialised by
    a jitted ``init`` with ``state_shardings`` as out_shardings and kept there by a jitted step:
    the number of compilations of three steps, the specs of MultiSteps' accumulated gradients (a
    copy of the parameter tree) after them, and the parameters' specs."""
    opt = optax.MultiSteps(optax.inject_hyperparams(pj.asgo)(learning_rate=5e-2), every_k_schedule=2)
    predicted = pj.state_shardings(opt, params)
    state = jax.jit(opt.init, out_shardings=predicted)(params)

    @functools.partial(jax.jit, out_shardings=(jax.tree.map(lambda a: a.sharding, params), predicted))
    def step(params, state, x, y):
        updates, state = opt.update(jax.grad(loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    for x, y in zip(xs, ys):
        params, state = step(params, state, x, y)
    return {
        "method": "combinators", "compiles": step._cache_size(),
        "accumulated_specs": [str(a.sharding.spec) for a in jax.tree.leaves(state.acc_grads)],
        "param_specs": [str(a.sharding.spec) for a in jax.tree.leaves(params)],
    }


def main() -> None:
    devices = jax.devices()
    assert len(devices) == 4, devices
    mesh = Mesh(devices, ("x",))
    params, xs, ys = problem()
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
    sharded = jax.device_put(params, shardings)
    single = jax.device_put(params, devices[0])
    for name, (factory, kwargs, extra) in METHODS.items():
        opt = factory(**kwargs)
        one, _, _, _ = train(opt, extra, single, xs, ys)
        trajectory, state, placed, compiles = train(opt, extra, sharded, xs, ys)
        many = trajectory[-1]
        rel = _relative_difference(many, one[-1])
        try:
            # The reference: the one-device jitted training (an eager step on one device compiles
            # each operation on its own).
            eager_params, eager_state = eager_training(opt, extra, sharded, xs, ys)
            eager_rel = _relative_difference(eager_params, one[1])
            eager_off_the_mesh = off_the_mesh(eager_state, devices)
        except Exception as error:  # noqa: BLE001 - reported to the test
            eager_rel = eager_off_the_mesh = f"{type(error).__name__}: {error}"[:300]
        try:
            core_rel = _relative_difference(core_step(name, kwargs, extra, sharded, xs[0], ys[0]), one[0])
        except Exception as error:  # noqa: BLE001 - reported to the test
            core_rel = f"{type(error).__name__}: {error}"[:300]
        # Shardings of the state: those init chose, those state_shardings predicts.
        predicted = pj.state_shardings(opt, sharded)
        same_prediction = jax.tree.all(jax.tree.map(lambda a, b: a == b, placed, predicted))
        kernel_entries = {
            key: {k: str(v.spec) for k, v in entries.items()} for key, entries in placed.groups.items()
        }
        # Inside optax's combinators: a chain whose other states are empty or copies of the
        # parameter tree (a masked one holding MaskedNodes), which init places like the
        # parameters, and the method masked to the weights (so the prediction is exact).
        weights = {"l1": {"kernel": True, "bias": False}, "l2": {"kernel": True, "bias": False}}
        chained = optax.chain(optax.clip_by_global_norm(1.0), opt, optax.trace(0.5), optax.masked(opt, weights),
                              optax.masked(optax.trace(0.5), weights))
        chain_placed = jax.tree.map(lambda a: a.sharding, chained.init(sharded))
        chain_prediction = jax.tree.all(jax.tree.map(lambda a, b: a == b, chain_placed, pj.state_shardings(chained, sharded)))
        mapped = optax.tree.map_params(opt, lambda p: p, state, transform_non_params=lambda _: None)
        params_after_sharded = [str(a.sharding.spec) for a in jax.tree.leaves(many)]
        print(json.dumps({
            "method": name, "rel": rel, "eager_rel": eager_rel, "eager_off_the_mesh": eager_off_the_mesh, "core_rel": core_rel, "compiles": compiles, "same_prediction": bool(same_prediction), "chain_prediction": bool(chain_prediction),
            "counter": str(placed.count.spec), "entries": kernel_entries,
            "map_params": repr(jax.tree.structure(mapped)), "param_specs": params_after_sharded,
        }), flush=True)
    print(json.dumps(combinators_training(sharded, xs, ys)), flush=True)


if __name__ == "__main__":
    main()
