"""Eager cost of an MBF step in operations: an eager step's time is its number of
operations (about 20 us each on a CPU, a kernel launch each on a GPU), not its FLOPs, so the
per-layer count of a plain step (no statistics, no refresh) is pinned here.

Counts are torch dispatcher calls, exact for a fixed code path (no timing, no machine dependence).
The marginal count of one more layer is taken between two models, so the step's fixed work (the
learning rate, the KL clip's scalar algebra, the skip decision) cancels.
"""

from __future__ import annotations

import pytest

import precond_ref as pr

torch = pytest.importorskip("torch")


_VIEWS = frozenset({"view", "unsqueeze", "select", "slice", "split", "split_with_sizes", "reshape", "_reshape_alias",
                    "expand", "transpose", "t", "permute", "squeeze", "as_strided", "alias", "detach", "unbind"})


def _plain_step_ops(n_fc: int, n_diagonal: int, kernels: bool = False, weight_decay: float = 1e-3) -> int:
    """Dispatcher calls of one plain MBF step (principled defaults, KL clip on) on ``n_fc`` FC
    layers 8 x 5 with bias and ``n_diagonal`` scale vectors of length 8, float64; with ``kernels``
    only those that are not views (each a kernel launch on a GPU)."""
    from dispatched import Dispatched

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    params = {f"fc{i}": {"bias": randn(8), "weight": randn(8, 5)} for i in range(n_fc)}
    params.update({f"norm{i}": {"scale": randn(8)} for i in range(n_diagonal)})
    grads = {k: {n: randn(*v.shape) for n, v in d.items()} for k, d in params.items()}
    opt = pr.mbf(learning_rate=1e-2, weight_decay=weight_decay, statistics_every=1000, precondition_every=1000)
    state = opt.init(params)
    _, state = opt.update(grads, state, params, step=0)  # statistics and refresh: step 0
    with Dispatched() as dispatched:
        opt.update(grads, state, params, step=1)  # plain: heavy ball, product, clip, step
    return len([name for name in dispatched.names if not (kernels and name in _VIEWS)])


def test_plain_step_operations_per_layer():
    """Invariant: one more FC layer [W | b] costs a plain step at most 16 dispatcher calls, of which
    at most 8 are not views (kernels on a GPU), and one more diagonal-rule leaf at most 2, whatever
    the number of layers. Per FC layer: the block layout (2: unsqueeze, concat), the heavy ball
    m <- mu m + g on all layers' blocks joined end to end (``transform.leafwise``: no kernel of its
    own, 5 views: the flattened m and g, its slice of the result and the reshape), F^{-1} m (1),
    the KL quadratic <D, m> as one dot of the flattened views (3), the layer's -alpha nu times D
    (1), the split back into W, b (2), the decay (2 per leaf); nothing else is per layer: the
    transform's non-finite check runs on all leaves at once, the KL clip's scalar algebra once per
    step on the vector of all layers (linalg.kl_clip_of_quadratic, its entries handed back by one
    unstack), the diagonal rule once on all small diagonal leaves concatenated (per leaf: its
    slices)."""
    fc = (_plain_step_ops(6, 1) - _plain_step_ops(2, 1)) / 4
    fc_kernels = (_plain_step_ops(6, 1, kernels=True) - _plain_step_ops(2, 1, kernels=True)) / 4
    diagonal = (_plain_step_ops(1, 6) - _plain_step_ops(1, 2)) / 4
    assert fc <= 16, fc
    assert fc_kernels <= 8, fc_kernels
    assert diagonal <= 2, diagonal


def test_diagonal_leaves_selected_joined_on_a_gpu():
    """Invariant: with a GPU's grouping (the skip decision not read on the host, so every new state
    entry is selected by the non-finite rule, ``StepContext.unless_skipped``), one more
    diagonal-rule leaf costs a plain step no kernel: the diagonal rule runs on all small diagonal
    leaves concatenated and its new entries (a, v) are selected once on the joined vectors, each
    leaf's slices marked selected (``engine.context.settle_pieces``); before, each leaf's two
    entries were selected again by the transform (2 kernels per leaf). Without weight decay, whose
    2 kernels per leaf are the leaf's own update."""
    from precond_ref.benchmarks.counting import gpu_grouping

    with gpu_grouping():
        counts = [_plain_step_ops(1, n, kernels=True, weight_decay=0.0) for n in (2, 6)]
    diagonal = (counts[1] - counts[0]) / 4
    assert diagonal == 0, diagonal


def test_warm_up_refresh_inverts_each_stack_once():
    """The warm-up refreshes every share of every stack on each statistics call (the authors'
    schedule; spread over P = T2/T1 shares only afterwards): decided on the host, the shares form
    one run (``engine.phases.refresh_runs``), so each stack of equal-size blocks is inverted by one batched
    call, whatever P. Here one stack of three 2 x 2 blocks (an FC layer of 6 outputs,
    block_size 2) and P = 3: one batched inverse, not one per share (before: 3)."""
    from dispatched import Dispatched

    gen = torch.Generator().manual_seed(0)
    params = {"fc": {"weight": torch.randn(6, 4, generator=gen, dtype=torch.float64)}}
    grads = {"fc": {"weight": torch.randn(6, 4, generator=gen, dtype=torch.float64)}}
    opt = pr.mbf(learning_rate=1e-2, statistics_every=1, precondition_every=3, block_size=2, refresh_phases=3)
    state = opt.init(params)
    with Dispatched() as dispatched:
        opt.update(grads, state, params, step=0)  # warm-up: every phase due
    inverses = [name for name in dispatched.names if name.startswith("linalg_inv")]
    assert inverses == ["linalg_inv_ex"], inverses


def _warm_up_step_ops(n_fc: int) -> int:
    """Dispatcher calls of one warm-up step (statistics and every inverse, P = 3 shares) on
    ``n_fc`` FC layers 6 x 4 with bias cut into three 2-row blocks, float64."""
    from dispatched import Dispatched

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    params = {f"fc{i}": {"bias": randn(6), "weight": randn(6, 4)} for i in range(n_fc)}
    grads = {k: {n: randn(*v.shape) for n, v in d.items()} for k, d in params.items()}
    opt = pr.mbf(learning_rate=1e-2, statistics_every=1, precondition_every=3, block_size=2, refresh_phases=3)
    state = opt.init(params)
    with Dispatched() as dispatched:
        opt.update(grads, state, params, step=0)
    return len(dispatched.names)


def test_warm_up_step_operations_per_layer():
    """Invariant: one more blocked FC layer costs a warm-up step (statistics, then every inverse)
    at most 40 dispatcher calls: the plain step's 15, its statistic's EMA with the finite check
    (read on the host: a finite statistic is kept without a selection), and its share of the
    stacked refresh (its blocks in the stack and back, its flags); the batched inverse itself runs
    once per stack, not per layer. A stack-shaped statistic (full, b, b) enters the stack without
    a reshape."""
    per_layer = (_warm_up_step_ops(6) - _warm_up_step_ops(2)) / 4
    assert per_layer <= 40, per_layer
