"""The refresh driver of ``precond_ref.engine.phases`` (every layout's refresh on its phase)."""

from __future__ import annotations

import numpy as np

from precond_ref.engine.phases import handed_back, phase_stacks, refreshes


def test_refreshes_runs_each_batch_of_each_phase_due():
    """``refreshes``: for each phase due, each batch of its blocks through ``cond(due, refresh,
    keep)``. Blocks in phases 0, 1, 1, 2 (the equal blocks of a phase one stack, ``phase_stacks``)
    with phase 1 decided False on the host: phases 0 and 2 refreshed, phase 1 computed not at all,
    or kept with ``kept``; a device decision (a 0-D array) selected by its value."""
    members = [(np.full((1, 2), float(u)),) for u in range(4)]
    batches = phase_stacks(np, [0, 1, 1, 2], members)
    calls = []

    def branches(batch):
        calls.append(batch.indices)
        return (lambda a: (a + 10,)), (lambda a: (a,))

    def run(decisions, **options):
        calls.clear()
        return {u: float(piece[0][0, 0]) for batch, result in refreshes(np, decisions, batches, branches, **options)
                for u, piece in handed_back(batch, result)}

    assert run([True, False, True]) == {0: 10.0, 3: 13.0}
    assert calls == [(0,), (3,)]
    assert run([True, False, True], kept=True) == {0: 10.0, 1: 1.0, 2: 2.0, 3: 13.0}
    assert calls == [(0,), (1, 2), (3,)]
    assert run([np.asarray(False), False, True]) == {0: 0.0, 3: 13.0}
