"""Every method's ``update`` runs without host synchronisation.

On a GPU a step stalls the device queue whenever the host reads a device value or copies host data
into a device array. The core must do neither once the caller says on which call it is
(``update(..., step=i)``, what the adapters pass): interval decisions are made on the host, and the
non-finite skip selects element-wise. ``tests/sync_guard.py`` is an array namespace that raises on
any such transfer; each method runs several steps under it, refresh and reuse steps alike, and must
also give exactly the numbers of plain NumPy (the guard only watches).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.tree import tree_map

import sync_guard

CONFIGS = {
    "agd": lambda: pr.agd(learning_rate=1e-2, weight_decay=1e-2),
    "agd-faithful-amsgrad-clip": lambda: pr.agd(learning_rate=1e-2, mode="faithful", amsgrad=True, clip=1.0),
    "agd-win": lambda: pr.agd(learning_rate=1e-2, win=True, weight_decay=1e-2),
    "asgo-eigh-every2": lambda: pr.asgo(precondition_every=2, root_method="eigh"),
    # Iterative roots without their convergence check (root_tolerance=inf): matmuls only.
    "asgo-newton-schulz": lambda: pr.asgo(root_method="newton_schulz", root_tolerance=math.inf),
    "asgo-polar-express-blocked": lambda: pr.asgo(root_method="polar_express", block_size=3, root_tolerance=math.inf),
    "asgo-newton-every2": lambda: pr.asgo(root_method="newton", precondition_every=2, root_tolerance=math.inf),
    # The checked root: a block that fails its check keeps its previous root, selected on the device.
    "asgo-polar-express-checked": lambda: pr.asgo(root_method="polar_express"),
    "asgo-faithful": lambda: pr.asgo(mode="faithful", weight_decay=0.0, fallback_mask=lambda path, leaf: leaf.ndim != 2),
    "dasgo": lambda: pr.dasgo(),
    "sketchy-every2": lambda: pr.sketchy(learning_rate=1e-2, rank=2, precondition_every=2),
    "sketchy-faithful": lambda: pr.sketchy(learning_rate=1e-2, rank=2, mode="faithful"),
    "s_adagrad": lambda: pr.s_adagrad(learning_rate=1e-2, rank=2),
    "rf_rmsprop": lambda: pr.rf_rmsprop(learning_rate=1e-2, batch_size=8),
    "rf_adamw": lambda: pr.rf_adamw(learning_rate=1e-2, batch_size=8),
    "if_shampoo-every2": lambda: pr.if_shampoo(learning_rate=1e-2, batch_size=8, precondition_every=2),
    "if_shampoo-weight_bias-lr_scale": lambda: pr.if_shampoo(
        learning_rate=1e-2, batch_size=8, grouping="weight_bias", preconditioner_lr_scale=pr.prototype_lr_scale
    ),
    "if_shampoo-prototype": lambda: pr.if_shampoo(
        learning_rate=1e-2, batch_size=8, precondition_every=pr.prototype_schedule(3), mode="faithful"
    ),
    "mbf-t1-2-t2-4": lambda: pr.mbf(learning_rate=1e-3, statistics_every=2, precondition_every=4),
    "mbf-faithful": lambda: pr.mbf(learning_rate=1e-3, mode="faithful"),
}

STEPS = 6


def _params(rng: np.random.Generator) -> dict:
    # fc2 and conv2 share block shapes with fc and conv: the batched paths (stacked across layers).
    return {
        "fc": {"weight": rng.standard_normal((5, 4)), "bias": rng.standard_normal(5)},
        "fc2": {"weight": rng.standard_normal((5, 4))},
        "conv": {"weight": rng.standard_normal((3, 2, 2, 2))},
        "conv2": {"weight": rng.standard_normal((2, 2, 2, 2))},
        "scale": rng.standard_normal(4),
    }


def _run(opt, params, grads, wrap_arrays: bool):
    convert = sync_guard.wrap if wrap_arrays else (lambda x: x)
    params = tree_map(convert, params)
    state = opt.init(params)
    outputs = []
    for i, g in enumerate(grads):
        g = tree_map(convert, g)
        if wrap_arrays:
            with sync_guard.armed():
                updates, state = opt.update(g, state, params, step=i)
                params = pr.apply_updates(params, updates)
        else:
            updates, state = opt.update(g, state, params, step=i)
            params = pr.apply_updates(params, updates)
        outputs.append(tree_map(sync_guard.unwrap, updates))
    return outputs, tree_map(sync_guard.unwrap, params)


_KNOWN_SYNCS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(raises=sync_guard.HostTransfer, reason=_KNOWN_SYNCS[n], strict=True))
        if n in _KNOWN_SYNCS
        else n
        for n in sorted(CONFIGS)
    ],
)
def test_update_never_transfers_between_host_and_device(name):
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [tree_map(lambda p: rng.standard_normal(p.shape), params) for _ in range(STEPS)]
    grads[3] = tree_map(lambda g: g * np.nan, grads[3])  # a skipped step is sync-free too
    opt = CONFIGS[name]()
    guarded, guarded_params = _run(opt, params, grads, wrap_arrays=True)
    plain, plain_params = _run(opt, params, grads, wrap_arrays=False)
    for a, b in zip(guarded, plain):
        tree_map(np.testing.assert_array_equal, a, b)
    tree_map(np.testing.assert_array_equal, guarded_params, plain_params)


def test_the_guard_catches_each_kind_of_transfer():
    """The guard must be able to fail: each conversion the core must avoid raises while armed."""
    x = sync_guard.wrap(np.ones((2, 2)))
    xp = x.__array_namespace__()
    reads = [
        lambda: bool(xp.all(x > 0)),
        lambda: float(xp.sum(x)),
        lambda: int(xp.sum(x)),
        lambda: xp.sum(x).item(),
        lambda: x.tolist(),
        lambda: [1, 2, 3][xp.astype(xp.sum(x) - 4.0, xp.int64)],
        lambda: x[x > 0],
        lambda: np.asarray(x),
        lambda: xp.asarray(0.5, dtype=xp.float64),
    ]
    for read in reads:
        with sync_guard.armed(), pytest.raises(sync_guard.HostTransfer):
            read()
        read()  # unarmed: allowed
    with sync_guard.armed():
        y = xp.full((), 0.5, dtype=xp.float64) * x + 1.0  # kernels with scalar arguments: fine
    np.testing.assert_array_equal(sync_guard.unwrap(y), 1.5 * np.ones((2, 2)))
