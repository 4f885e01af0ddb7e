"""The skip rule's invariant checked on one optimizer (specs README rule 6, ``on_nonfinite="skip"``)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def assert_skipped_steps_keep_state(
    opt: Any, shapes: dict, wrap: Callable, to_np: Callable, rng: np.random.Generator, bad: tuple,
    *, warm: int = 3, skipped: int = 2,
) -> None:
    """``warm`` finite steps of ``opt`` on parameters of ``shapes``, then ``skipped`` consecutive
    steps whose gradient holds a NaN at ``bad`` (leaf name, index): each gives zero updates, adds
    one to ``nonfinite_count`` and leaves every state entry exactly as it was."""
    params = {k: wrap(rng.standard_normal(s)) for k, s in shapes.items()}
    state = opt.init(params)
    for _ in range(warm):
        _, state = opt.update({k: wrap(rng.standard_normal(s)) for k, s in shapes.items()}, state, params)
    leaf, index = bad
    for _ in range(skipped):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        grads[leaf][index] = np.nan
        upd, new = opt.update({k: wrap(v) for k, v in grads.items()}, state, params)
        assert all(np.all(to_np(u) == 0) for u in upd.values())
        assert int(new.nonfinite_count) == int(state.nonfinite_count) + 1
        for key, entries in new.groups.items():
            for name, value in entries.items():
                np.testing.assert_array_equal(to_np(value), to_np(state.groups[key][name]), err_msg=f"{key} {name}")
        state = new
