"""The skip rule for bad gradients, on every method.

A float32 gradient entry of 1.8e19 is finite, but its square overflows: before the rule, AGD, ASGO,
DASGO, Sketchy, RF-RMSProp and RF-AdamW kept +Inf in their state forever with ``nonfinite_count``
still 0. ``build_transform`` now treats a gradient whose squared norm reaches
``OVERFLOW_MARGIN * finfo.max`` like a non-finite one: zero updates, state untouched, counted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import precond_ref as pr
from precond_ref.transform import OVERFLOW_MARGIN
from precond_ref.tree import tree_flatten, tree_map

from test_sync_free import CONFIGS, _params


def _finite_state(state) -> bool:
    return all(np.all(np.isfinite(np.asarray(v))) for v in tree_flatten(state.groups)[0])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_spike_that_would_overflow_the_state_is_skipped_and_counted(name):
    rng = np.random.default_rng(0)
    params = tree_map(lambda a: a.astype(np.float32), _params(rng))
    grad = lambda: tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)  # noqa: E731
    opt = CONFIGS[name]()
    state = opt.init(params)
    for i in range(3):
        _, state = opt.update(grad(), state, params, step=i)
    spike = grad()
    spike["fc"]["weight"][0, 0] = 1.8e19
    updates, after = opt.update(spike, state, params, step=3)
    assert int(after.nonfinite_count) == 1 and int(after.count) == int(state.count)
    assert all(np.all(u == 0) for u in tree_flatten(updates)[0])
    tree_map(np.testing.assert_array_equal, after.groups, state.groups)
    for i in range(4, 7):
        updates, after = opt.update(grad(), after, params, step=i)
    assert _finite_state(after) and int(after.nonfinite_count) == 1
    assert all(np.all(np.isfinite(u)) for u in tree_flatten(updates)[0])


def _in_four_rows(w, value):
    """``value`` at four entries of a (2, 3, 4) tensor, each in a row of its own."""
    for i, j in ((0, 0), (0, 2), (1, 1), (1, 2)):
        w[i, j, i + j] = value


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_threshold_is_the_squared_norm_against_the_dtype_range(dtype, shape):
    """Skipped exactly when ‖g‖² ≥ OVERFLOW_MARGIN · finfo(dtype).max: one entry carrying the
    norm, or (a tensor) four entries in different rows a quarter each."""
    limit = math.sqrt(np.finfo(dtype).max * OVERFLOW_MARGIN)
    opt = pr.agd(learning_rate=1e-3)
    params = {"w": np.zeros(shape, dtype=dtype)}
    state = opt.init(params)
    for factor, skipped in ((0.99, 0), (1.01, 1)):
        w = np.zeros(shape, dtype=dtype)
        if len(shape) == 1:
            w[0] = factor * limit
        else:
            _in_four_rows(w, factor * limit / 2)
        _, after = opt.update({"w": w}, state, params)
        assert int(after.nonfinite_count) == skipped
    with pytest.raises(FloatingPointError, match="gradient of leaf 'w' too large for the statistics"):
        pr.agd(learning_rate=1e-3, on_nonfinite="raise").update({"w": np.full(4, 2 * limit, dtype=dtype)}, state)


def test_the_threshold_holds_under_torch_compile_where_tensors_are_summed_row_by_row():
    """As above, for the compiled step's sum (the rows of a tensor first): four entries in
    different rows, a quarter of the squared norm each, just below and just above the limit."""
    import torch
    from array_api_compat import array_namespace

    from precond_ref.transform import gradient_ok

    xp = array_namespace(torch.zeros(1))
    limit = math.sqrt(np.finfo(np.float32).max * OVERFLOW_MARGIN)
    ok = torch.compile(lambda g: gradient_ok(xp, [g]), fullgraph=True, dynamic=False)
    for factor, expected in ((0.99, True), (1.01, False)):
        g = torch.zeros((2, 3, 4), dtype=torch.float32)
        _in_four_rows(g, factor * limit / 2)
        assert bool(ok(g)) is expected


def test_bf16_gradients_are_measured_in_their_compute_dtype():
    """A bf16 gradient near bf16's largest value is an ordinary float32 statistic: not skipped."""
    import torch

    opt = pr.agd(learning_rate=1e-3)
    params = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    g = {"w": torch.full((4,), 3e38, dtype=torch.bfloat16)}
    _, after = opt.update(g, opt.init(params), params)
    assert int(after.nonfinite_count) == 1  # (3e38)² overflows float32: skipped
    g = {"w": torch.full((4,), 1e10, dtype=torch.bfloat16)}
    _, after = opt.update(g, opt.init(params), params)
    assert int(after.nonfinite_count) == 0
