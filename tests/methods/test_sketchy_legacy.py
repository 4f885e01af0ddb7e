"""Sketchy / S-AdaGrad checkpoints saved under the earlier entry names keep loading.

The fixtures (tests/data/sketchy_legacy_{torch.pt,core.pkl}, made by tests/data/sketchy_legacy_make.py
with the older code it names) hold states whose sketch entries are ``axis{n}_{name}`` and
``axis{n}_run{j}_{name}``, and the parameters that code reached in the next steps. Loaded into the
current code, whose entries are ``sketches/{n}/{j}/{name}``, the same steps reach the same parameters:
the renaming (``legacy_names``) moves arrays without touching them, so the float64 trajectories are
those of the old code up to the rounding of the same operations (1e-12 relative: a few ulps per
operation on another BLAS/LAPACK, about 1e-14 after 3 steps of small products and decompositions;
an entry under a wrong name moves a step by O(lr)).
"""

from __future__ import annotations

import importlib
import pathlib
import pickle
import sys

import numpy as np
import pytest

import precond_ref as pr

DATA = pathlib.Path(__file__).parent.parent / "data"
sys.path.insert(0, str(DATA))
make = importlib.import_module("sketchy_legacy_make")
sys.path.remove(str(DATA))

CASES = {
    "sketchy": (pr.sketchy, make.SKETCHY_OPTIONS),
    "s_adagrad": (pr.s_adagrad, make.S_ADAGRAD_OPTIONS),
}


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_core_state_of_the_earlier_names_continues_its_trajectory(method):
    """The pickled PrecondState (NumPy, old names) gives the old code's next K parameters, and the
    state it returns has only the current names."""
    with open(DATA / "sketchy_legacy_core.pkl", "rb") as f:
        saved = pickle.load(f)[method]
    assert any(key.startswith("axis0_run") for entries in saved["state"].groups.values() for key in entries)
    factory, options = CASES[method]
    tx = factory(learning_rate=1e-2, **options)
    params, state = saved["params"], saved["state"]
    for g, want in zip(saved["grads"], saved["after"]):
        u, state = tx.update(g, state, params)
        params = {k: params[k] + u[k] for k in params}
        for k in want:
            _close(params[k], want[k])
    assert not any(key.startswith("axis") for entries in state.groups.values() for key in entries)
    fresh = tx.init(saved["params"])
    assert {k: set(v) for k, v in state.groups.items()} == {k: set(v) for k, v in fresh.groups.items()}


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_torch_state_dict_of_the_earlier_names_loads_and_continues(method):
    """``load_state_dict`` of the old ``state_dict`` (float64) into the torch adapter, then the old
    code's next K parameters."""
    torch = pytest.importorskip("torch")
    from precond_ref.adapters import torch as pt

    saved = torch.load(DATA / "sketchy_legacy_torch.pt", weights_only=False)[method]
    cls = {"sketchy": pt.Sketchy, "s_adagrad": pt.SAdaGrad}[method]
    params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    opt = cls(list(params.values()), lr=1e-2, **CASES[method][1])
    opt.load_state_dict(saved["state_dict"])
    for g, want in zip(saved["grads"], saved["after"]):
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        for k in want:
            _close(params[k].detach().numpy(), want[k].numpy())
    keys = {key for entries in opt.state_dict()["state"].values() for key in entries}
    assert "sketches/0/1/basis" in keys and not any(key.startswith("axis") for key in keys)


def test_unblocked_state_names_the_block_size_that_loads_it():
    """A state with unblocked sketches (one (d, k) basis per axis) given to a blocked Sketchy is
    refused, and the error names the block_size that lays it out again: its longest axis (50)."""
    params = {"w": np.ones((40, 50))}
    state = pr.sketchy(block_size=64, rank=2, precondition_every=1).init(params)
    with pytest.raises(ValueError, match=r"unblocked sketches loads with block_size=50 \(its longest axis"):
        pr.sketchy(block_size=16, rank=2, precondition_every=1).update(params, state, params)
