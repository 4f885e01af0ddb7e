"""S-AdaGrad's FD steps in stacks of bounded size (``S_ADAGRAD_STACK_BYTES``)."""

from __future__ import annotations

import numpy as np

import precond_ref as pr
import importlib

sketchy = importlib.import_module("precond_ref.methods.sketchy")  # (the package exports a function of that name)


def _run(steps=4):
    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.standard_normal((6, 5)) for i in range(4)} | {"b": rng.standard_normal(7)}
    opt = pr.s_adagrad(learning_rate=0.1, rank=3, block_size=10, momentum=0.5)
    state = opt.init(params)
    out = []
    for _ in range(steps):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        updates, state = opt.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
        out.append(updates)
    return out


def test_chunked_steps_equal_one_stack(monkeypatch):
    """The updates with every run stepped alone (a bound of 1 byte) equal those of the default,
    where the equal runs of the 4 weights share a stack: a batched product of the same numbers,
    so equal to a few ulps (rtol 1e-12 in float64)."""
    default = _run()
    monkeypatch.setattr(sketchy, "S_ADAGRAD_STACK_BYTES", 1)
    chunked = _run()
    for a, b in zip(default, chunked):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)
