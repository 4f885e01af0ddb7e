"""A state saved with the failure counter under an earlier name steps exactly as the same state
under its current name ``failures``.

The invariant: the renaming on load (``engine.checks.renamed_failures``, through each transform's
``legacy_names`` for an optax state and the torch adapter's ``load_state_dict``) moves arrays
without touching them, and ASGO's two earlier counters (roots not finite, iterative roots rejected)
become their sum, the one count of its discarded root updates. The same steps from either state
then give bitwise the same parameters and the same state, whose counter is ``failures`` alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import precond_ref as pr

#: factory, torch class, options, the counter's earlier names in a state of that configuration
CASES = {
    "asgo": (pr.asgo, "ASGO", dict(root_method="polar_express", root_steps=1, block_size=2, precondition_every=1),
             ("root_failures", "root_fallbacks")),
    "asgo_faithful": (pr.asgo, "ASGO", dict(mode="faithful"), ("root_failures",)),
    "sketchy": (pr.sketchy, "Sketchy", dict(rank=2, block_size=4), ("sketch_failures",)),
    "s_adagrad": (pr.s_adagrad, "SAdaGrad", dict(rank=2, block_size=7), ("sketch_failures",)),
    "if_shampoo": (pr.if_shampoo, "IFShampoo", dict(batch_size=4, block_size=4), ("factor_failures",)),
}
SHAPES = {"w": (6, 4), "v": (10,)}
OLD_NAMES = {name for *_, names in CASES.values() for name in names}


def _gradients(steps: int) -> list[dict]:
    rng = np.random.default_rng(4)
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]


def _saved_under(entries: dict, names: tuple, value: int, like) -> dict:
    """``entries`` with ``failures`` (set to ``value``) under the earlier ``names``: ``value`` split
    into one part per name, each of the dtype of ``like``'s conversion of an int32."""
    parts = [value - 2 * (len(names) - 1)] + [2] * (len(names) - 1)
    old = {k: v for k, v in entries.items() if k != "failures"}
    old.update({name: like(part) for name, part in zip(names, parts)})
    return old


def _counted(groups: dict) -> set:
    return {k for k, entries in groups.items() if "failures" in entries}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_optax_state_under_an_earlier_counter_name_steps_as_the_current_one(case):
    """optax (JAX, float64): a state whose groups hold the counter under its earlier name(s), 7
    split between them, steps as the same state holding ``failures = 7``."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from precond_ref.adapters.jax import to_optax

    factory, _, options, names = CASES[case]
    tx = to_optax(factory(learning_rate=1e-2, **options))
    # Jitted as an optax user runs it: the renaming happens when the state is traced, once per
    # state layout (eager, every control-flow operation of the step is traced again on every call).
    update = jax.jit(tx.update)
    grads = [{k: jnp.asarray(v) for k, v in g.items()} for g in _gradients(4)]
    params = {k: jnp.asarray(np.ones(s)) for k, s in SHAPES.items()}
    state = tx.init(params)
    _, state = update(grads[0], state, params)
    int32 = lambda n: jnp.asarray(n, dtype=jnp.int32)  # noqa: E731
    groups = state.groups
    current = state._replace(groups={k: {**e, "failures": int32(7)} if "failures" in e else e for k, e in groups.items()})
    old = state._replace(groups={k: _saved_under(e, names, 7, int32) if "failures" in e else e for k, e in groups.items()})
    assert _counted(current.groups) and not _counted(old.groups)
    runs = []
    for s in (current, old):
        p = params
        for g in grads[1:]:
            u, s = update(g, s, p)
            p = {k: p[k] + u[k] for k in p}
        runs.append((p, s))
    (p_new, s_new), (p_old, s_old) = runs
    for k in params:
        np.testing.assert_array_equal(np.asarray(p_old[k]), np.asarray(p_new[k]))
    assert jax.tree_util.tree_structure(s_old) == jax.tree_util.tree_structure(s_new)
    for a, b in zip(jax.tree_util.tree_leaves(s_old), jax.tree_util.tree_leaves(s_new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not any(name in entries for entries in s_old.groups.values() for name in OLD_NAMES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_torch_state_dict_under_an_earlier_counter_name_loads_as_the_current_one(case):
    """torch (float64): ``load_state_dict`` of a state_dict whose counter is under its earlier
    name(s), 7 split between them, then steps as the same state_dict with ``failures = 7``; the
    optimizer's own state_dict then names ``failures`` alone."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters import torch as pt

    _, cls_name, options, names = CASES[case]
    cls = getattr(pt, cls_name)
    grads = _gradients(4)
    int32 = lambda n: torch.tensor(n, dtype=torch.int32)  # noqa: E731
    extra = {"batch_size": options["batch_size"]} if "batch_size" in options else {}
    kwargs = {k: v for k, v in options.items() if k != "batch_size"}

    def optimizer():
        params = {k: torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for k, s in SHAPES.items()}
        return params, cls(list(params.values()), lr=1e-2, **kwargs, **extra)

    def step(params, opt, g):
        for k, p in params.items():
            p.grad = torch.from_numpy(g[k])
        opt.step(**extra)

    params, opt = optimizer()
    step(params, opt, grads[0])
    start = {k: p.detach().clone() for k, p in params.items()}
    saved = copy.deepcopy(opt.state_dict())
    current, old = copy.deepcopy(saved), copy.deepcopy(saved)
    for i, entries in saved["state"].items():
        if "failures" in entries:
            current["state"][i]["failures"] = int32(7)
            old["state"][i] = _saved_under(entries, names, 7, int32)
    assert any("failures" in e for e in current["state"].values()) and not any("failures" in e for e in old["state"].values())
    runs = []
    for state_dict in (current, old):
        params, opt = optimizer()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
        opt.load_state_dict(state_dict)
        for g in grads[1:]:
            step(params, opt, g)
        runs.append((params, opt.state_dict()))
    (p_new, s_new), (p_old, s_old) = runs
    for k in SHAPES:
        assert torch.equal(p_old[k], p_new[k]), k
    assert s_old["state"].keys() == s_new["state"].keys()
    for i in s_new["state"]:
        assert s_old["state"][i].keys() == s_new["state"][i].keys()
        for name, value in s_new["state"][i].items():
            assert torch.equal(torch.as_tensor(s_old["state"][i][name]), torch.as_tensor(value)), (i, name)
