"""Phases of periodic work: which blocks refresh on which call, and the refresh of those due.

A method with a refresh interval ``T`` may spread its blocks' refreshes over the interval: each
block gets a phase ``p < T`` and refreshes on the calls ``count % T == p`` (and on the first), so
that no call does all the blocks' expensive work (:class:`precond_ref.blocking.PhaseDue`,
:func:`precond_ref.blocking.spread_schedule`; each phase's predicate read by
:meth:`~precond_ref.engine.context.StepContext.every`). Each method's rule for a block's phase is
one named function here, and :func:`refreshes` is every layout's refresh driver: for each phase
due, for each batch of its blocks (the layout's stacking, :func:`phase_stacks` for the equal blocks
of all leaves), ``cond(due, refresh, keep)``, each batch's results handed back to its blocks by
:func:`handed_back`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Sequence

from .._backend import cond, host_bool
from ..blocking import Stack, stable_hash, stack, unstack
from ..transform import check_positive_int

__all__ = [
    "refreshes", "phase_stacks", "handed_back", "hashed_phases", "shape_phase", "tile_phase",
    "phase_share", "refresh_runs", "prototype_schedule",
]


def hashed_phases(keys: Sequence[tuple[str, int]], phases: int) -> list[int]:
    """The phase of each block among ``phases``, from its key ``(leaf, block index along the leaf's
    side)``: ``(h(leaf) + index) mod phases``, ``h`` :func:`precond_ref.blocking.stable_hash` (ASGO).
    The blocks of one leaf take consecutive phases (a side of up to ``phases`` blocks is refreshed
    one block per step), and leaves start at phases spread by ``h``. A block's phase depends on its
    own key only: the same whatever other parameters the transform steps (param groups, shards) and
    on every run."""
    return [(stable_hash(leaf) + index) % phases for leaf, index in keys]


def shape_phase(shape: tuple, phases: int) -> int:
    """A leaf's first refresh phase, from its shape (:func:`precond_ref.blocking.stable_hash`;
    Sketchy's runs take the phases after it in turn), so that leaves of different shapes start in
    different phases; the shape, not the path, so that naming or grouping the parameters differently
    (torch's named and unnamed parameters) refreshes on the same steps."""
    if phases <= 1:
        return 0
    return stable_hash(str(tuple(shape))) % phases


def tile_phase(t: int, interval: Any, stagger: bool) -> int:
    """The refresh phase of tile ``t`` of a blocked tensor (IF-Shampoo): ``t % T`` when staggered
    over an integer interval ``T > 1``, else 0 (every tile refreshes with the plain interval)."""
    spread = stagger and isinstance(interval, int) and not isinstance(interval, bool) and interval > 1
    return t % interval if spread else 0


def phase_share(n: int, first: int, stop: int, phases: int) -> tuple[int, int]:
    r"""The contiguous ``(start, end)`` of ``n`` blocks (a stack's, or a leaf's pieces) that belong
    to the phases ``first`` to ``stop - 1`` of ``phases``: phase :math:`p` owns blocks
    :math:`\lfloor np/P \rfloor` to :math:`\lfloor n(p+1)/P \rfloor - 1`, ``n`` split as evenly as
    contiguous shares allow, so consecutive phases own consecutive blocks."""
    return n * first // phases, n * stop // phases


def refresh_runs(xp: Any, decisions: Sequence[Any]) -> list[tuple[Any, int, int]]:
    """The refreshes of one call as ``(predicate, first, stop)``:
    phases ``first`` to ``stop - 1`` refresh together where ``predicate`` holds. ``decisions[p]``
    says whether phase :math:`p` is due (the rule's schedule). Decisions known on the host (Python
    bools, or arrays that read for free, :func:`precond_ref._backend.host_bool`) merge into runs of
    consecutive due phases, ``predicate`` True: where every phase is due (a warm-up), each stack is
    refreshed by one batched call instead of one per share. A device decision keeps its own phase."""
    runs: list[tuple[Any, int, int]] = []
    for phase, due in enumerate(decisions):
        known = due if isinstance(due, bool) else host_bool(xp, due)
        if known is None:
            runs.append((due, phase, phase + 1))
        elif known and runs and runs[-1][0] is True and runs[-1][2] == phase:
            runs[-1] = (True, runs[-1][1], phase + 1)
        elif known:
            runs.append((True, phase, phase + 1))
    return runs


def refreshes(
    xp: Any,
    decisions: Sequence[Any],
    batches: Callable[[int, int], Iterable[Any]],
    branches: Callable[[Any], tuple[Callable, Callable]],
    *,
    kept: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """The refresh driver: for each phase due, for each batch of its blocks, ``cond(due, refresh,
    keep)``; yields each batch with its result, one batch at a time (a layout stores a batch's
    results, and lets its stacked copies go, before the next batch is made).

    ``decisions[p]`` says whether phase ``p`` is due: a Python bool (decided on the host) or a 0-D
    bool array (then :func:`precond_ref._backend.cond` selects, without a host read). A phase
    decided ``False`` on the host computes nothing, unless ``kept`` (a layout whose blocks have
    work between refreshes: its batches then go through ``keep``). ``batches(first, stop)`` is the
    layout's stacking: the batches of the blocks of phases ``first`` to ``stop - 1``, each
    with its ``operands`` (a :class:`~precond_ref.blocking.Stack`: :func:`phase_stacks`), and
    ``branches(batch)`` the ``(refresh, keep)`` of a batch, each called on its operands.
    """
    for phase, due in enumerate(decisions):
        if not kept and due is False:
            continue
        for batch in batches(phase, phase + 1):
            result = cond(xp, due, *branches(batch), *batch.operands)
            yield batch, result
            del batch, result  # the batch's stacked copies go before the next batch is made


def phase_stacks(
    xp: Any, phases: Sequence[int], members: Sequence[tuple], labels: Optional[Sequence[Hashable]] = None,
) -> Callable[[int, int], list[Stack]]:
    """The ``batches`` of :func:`refreshes` for blocks ``members[u]`` (operands with a leading block
    axis) in phase ``phases[u]``: the blocks of the phases asked for whose operands agree in trailing
    shape, dtype and device (and in ``labels[u]``) as one stack (:func:`precond_ref.blocking.stack`),
    each stack's ``indices`` those of ``members``."""

    def batches(first: int, stop: int) -> list[Stack]:
        chosen = [u for u in range(len(phases)) if first <= phases[u] < stop]
        stacks = stack(xp, [members[u] for u in chosen], labels=None if labels is None else [labels[u] for u in chosen])
        return [s._replace(indices=tuple(chosen[i] for i in s.indices)) for s in stacks]

    return batches


def handed_back(batch: Stack, result: tuple) -> list[tuple[int, tuple]]:
    """``(u, piece)`` for each member ``u`` of ``batch``: its slice of the batch's ``result``
    (:func:`precond_ref.blocking.unstack`: views)."""
    pieces = unstack([batch], [result], max(batch.indices) + 1)
    return [(u, pieces[u]) for u in batch.indices]


def _prototype_gap(step: int, interval: int) -> int:
    return min(max(int(math.log(step + 1, 4)), 1), interval)


def prototype_schedule(interval: int) -> Callable[[Any], Any]:
    """The prototype's warm-up refresh schedule as a predicate ``count -> bool`` (jit-compatible).

    ``LocalOptimizer_GGT`` refreshes at step 0 and then at ``step + min(max(int(log4(step + 1)), 1), T)``
    (the floating-point ``math.log``): every step up to 15, every 2 steps up to 63, every 3 up to
    255, ..., every ``T`` steps eventually. The refresh steps with one gap ``j`` form an arithmetic
    progression, so the predicate needs only the first refresh step of each gap (at most ``T``).
    """
    check_positive_int("interval", interval)
    starts: list[tuple[int, int]] = []  # (first refresh step with this gap, gap)
    step = 0
    while True:
        gap = _prototype_gap(step, interval)
        starts.append((step, gap))
        if gap == interval:
            break
        # jump close to the end of this gap's range, then walk (the float log decides the border)
        far = max(0, (4 ** (gap + 1) - 1 - step) // gap - 2)
        step += far * gap
        while _prototype_gap(step, interval) == gap:
            step += gap
    bounds = [s for s, _ in starts[1:]] + [None]

    def predicate(count: Any) -> Any:
        # a host int gives a Python bool, a 0-D int array a 0-D bool array (the steps' ranges are disjoint)
        due = False
        for (start, gap), end in zip(starts, bounds):
            in_range = count >= start if end is None else (count >= start) & (count < end)
            due = due | (in_range & ((count - start) % gap == 0))
        return due

    predicate.starts = tuple(starts)  # type: ignore[attr-defined]
    return predicate
