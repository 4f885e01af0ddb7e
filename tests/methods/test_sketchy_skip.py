"""A skipped step (non-finite gradient) under ``on_nonfinite="skip"`` leaves every sketch entry as
it was, now that the FD step itself returns the previous sketch on such a step (``accept``) and the
transform no longer selects those entries again (one d x k pass less per sketch)."""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.sketch import SKETCH_KEYS, fd_init, fd_update, fd_update_apply
from skipped_steps import assert_skipped_steps_keep_state


@pytest.mark.parametrize("path", ["svd", "gram", "incremental", "incremental_gram", "subspace", "qr_svd"])
@pytest.mark.parametrize("apply", [False, True])
def test_fd_step_refused_by_accept_returns_previous_sketch(path, apply):
    """Invariant (sketch.py ``_fd_step``'s ``accept``): with ``accept`` False the returned sketch is
    the previous one exactly (a selection, no arithmetic), on every decomposition path, and ``ok``
    still reports the decomposition's own health (True here: finite data)."""
    rng = np.random.default_rng(0)
    d, k, m = 300, 8, 3 if path != "gram" else 300
    sketch = fd_init(np, d, k, dtype=np.float64, device="cpu")
    sketch, _ = fd_update(np, sketch, rng.standard_normal((d, m)), exponent=-0.5, decomposition=path)
    step = fd_update_apply if apply else fd_update
    out = step(np, sketch, rng.standard_normal((d, m)), exponent=-0.5, decomposition=path, accept=np.asarray(False))
    new, ok = out[0], out[1]
    assert bool(ok)
    for key in SKETCH_KEYS:
        np.testing.assert_array_equal(new[key], sketch[key])
    accepted = step(np, sketch, rng.standard_normal((d, m)), exponent=-0.5, decomposition=path, accept=np.asarray(True))[0]
    assert not np.array_equal(accepted["basis"], sketch["basis"])


def _factories():
    return [
        lambda: pr.sketchy(0.1, rank=3, block_size=16, precondition_1d=True),
        lambda: pr.sketchy(0.1, rank=3, block_size=16, precondition_every=1),
        lambda: pr.sketchy(0.1, rank=4, mode="faithful"),
        lambda: pr.s_adagrad(0.1, rank=3, block_size=50),
        lambda: pr.s_adagrad(0.1, rank=3, block_size=50, precondition_every=2),
    ]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("factory", range(5))
def test_skipped_step_keeps_every_sketch(backend, factory):
    """Invariant (specs README rule 6, non-finite policy 'skip'): a step whose gradient holds a NaN
    changes no state entry and gives zero updates, on steps where a refresh phase is due and where
    it is not (two consecutive bad steps with ``precondition_every=2``), for blocked, phased and
    unblocked sketches, in NumPy and in eager torch (whose transform skips the selection of the
    entries the method settled)."""
    rng = np.random.default_rng(1)
    shapes = {"w": (40, 12), "v": (33,), "c": (3, 5, 8)}
    if backend == "torch":
        torch = pytest.importorskip("torch")
        wrap = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
        to_np = lambda a: a.numpy()  # noqa: E731
    else:
        wrap, to_np = np.asarray, np.asarray
    assert_skipped_steps_keep_state(_factories()[factory](), shapes, wrap, to_np, rng, ("w", (1, 2)))
