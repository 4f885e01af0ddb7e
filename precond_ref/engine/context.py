"""The step's context: what a method's per-group functions receive besides arrays.

:class:`StepContext` carries the step's host-side facts (the call number, the host decisions of
periodic work), the values computed once per step for every group (:meth:`StepContext.once`), and
the non-finite rule's selection of new state entries (:meth:`StepContext.unless_skipped`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

from .._backend import IdentityDict, hashable, is_dense, is_number, scalar_array, select, torch_compiling
from ..transform import Interval, ScalarOrSchedule, is_due, schedule_value
from ..tree import Path

__all__ = ["StepContext", "settle_pieces"]

Array = Any


class StepContext(NamedTuple):
    """What ``update_group`` receives besides arrays.

    ``count`` is the number of updates applied *before* this one (0 on the first update), as a
    0-D int32 array; ``extra`` holds the keyword arguments given to ``update``; ``paths`` are the
    tree paths of the group's leaves (for layout rules that depend on names, such as Flax's
    out-last ``kernel``). ``calls`` counts the calls before this one, skipped steps included: a
    Python int when the caller passed ``step=``, else a 0-D int32 array. ``due`` holds the host
    decisions a compiled caller passed, or ``None``: ``(numbers, predicates, decisions)``, the
    declared intervals that are numbers and the others, each as ``(position, interval)`` pairs
    (split once by the runner, so that :meth:`every` tests its argument's kind once and scans the
    declarations of that kind alone), and the decisions by position. ``ok`` is the step's
    0-D bool skip predicate (``None`` when nothing is skipped), ``settled`` the entries
    :meth:`unless_skipped` already selected (an :class:`IdentityDict` of them), and ``shared`` the values :meth:`once`
    computed for this update (one dict for all its groups). ``applied`` is ``True`` when the step
    is known on the host not to be skipped (``ok`` was read where that costs no synchronisation):
    selections by ``ok`` are then skipped, but for an array that is not dense (see
    :func:`is_dense`), whose selection would lay it out anew.
    """

    xp: Any
    count: Array
    extra: dict[str, Any]
    paths: tuple[Path, ...] = ()
    calls: Any = None
    due: Any = None
    ok: Any = None
    settled: Optional[IdentityDict] = None
    shared: Optional[dict] = None
    applied: bool = False

    def once(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, evaluated once per update for all groups that ask with an equal ``key``.

        For per-step values that do not depend on a group's arrays (a bias correction, the
        learning rate as a 0-D array of a dtype on a device): every group of a model would
        otherwise compute its own copy, a few 0-D operations each (kernel launches on a GPU, graph
        nodes for a compiler to trace). ``key`` names the value and everything it depends on
        besides the step's hyperparameters (which one transform's groups share), e.g. dtype and
        device; an element of ``key`` that is unhashable (CuPy's device) enters as its
        :func:`~precond_ref._backend.hashable` stand-in.
        """
        if self.shared is None:
            return compute()
        try:
            found = key in self.shared
        except TypeError:  # an unhashable element (CuPy's device): the key of stand-ins, made only then
            key = tuple([hashable(k) for k in key])
            found = key in self.shared
        if not found:
            self.shared[key] = compute()
        return self.shared[key]

    def scalar(self, name: str, hyperparameter: ScalarOrSchedule, dtype: Any, device: Any) -> Array:
        """Hyperparameter ``name`` at this step as a 0-D array of ``dtype`` on ``device``, made
        once per update (:meth:`once`)."""
        return self.once((name, dtype, device), lambda: scalar_array(self.xp, self.value(hyperparameter), dtype, device))

    def settle(self, entries: Any) -> None:
        """Tell the transform that ``entries`` (new state arrays) need no selection by the
        non-finite rule: the method knows each already is its old value on a skipped step (a
        refresh that kept its state, a phase not due). Nothing to tell where nothing is selected,
        nor under ``torch.compile`` (the identity of a traced value would recompile)."""
        if self.ok is None or self.settled is None or torch_compiling():
            return
        for entry in entries:
            self.settled[entry] = True

    def negated(self, name: str, hyperparameter: ScalarOrSchedule, dtype: Any, device: Any, *, weak: bool = False) -> Any:
        """``-`` :meth:`scalar` (e.g. ``-η``, the factor of a step), made once per update.

        With ``weak``, a hyperparameter whose value at this step is a number gives ``-value``, a
        Python number (as :func:`~precond_ref._backend.as_operand` keeps it), not a 0-D array: a
        weak scalar takes the dtype of the array it meets, and its product with another number of
        the configuration (``-η λ``) is rounded once, from double precision, where a 0-D array's is
        rounded in ``dtype``. A value that is an array is the same 0-D array either way.
        """
        if weak:
            value = self.once((name,), lambda: self.value(hyperparameter))
            if is_number(value):  # a Python number (schedule_value makes a NumPy scalar one)
                return -value
            hyperparameter = value  # this step's array: scalar() casts it, no schedule evaluated again
        value = self.scalar(name, hyperparameter, dtype, device)
        return self.once(("-" + name, dtype, device), lambda: -value)

    def value(self, hyperparameter: ScalarOrSchedule) -> Any:
        """A hyperparameter at this step (constants pass through; schedules get ``count``)."""
        return schedule_value(hyperparameter, self.count)

    def every(self, interval: Interval) -> Any:
        """Does the periodic work with this interval run on this call? (see :func:`is_due`).

        A Python bool when the call number is known on the host (``update(..., step=)`` or
        ``due=``), so that :func:`cond` branches without reading the device; a 0-D bool array
        otherwise. The interval must be one the method declared to :func:`build_transform`.
        """
        if self.due is not None:
            numbers, predicates, decisions = self.due
            # A number is compared with the declared numbers by value, anything else with the
            # declared predicates by identity: never `is` between a number and a function, which
            # dynamo may not trace.
            if is_number(interval):
                for i, declared in numbers:
                    if declared == interval:
                        return decisions[i]
            else:
                for i, declared in predicates:
                    if declared is interval:
                        return decisions[i]
            raise ValueError(f"interval {interval!r} was not declared to build_transform(intervals=...)")
        return is_due(interval, self.calls)

    def unless_skipped(self, new: Array, old: Array) -> Array:
        """A state entry after this step: ``new``, or ``old`` if the step is skipped (non-finite rule).

        :func:`build_transform` makes this selection for every entry a method returns. A method
        that forms its update from new state entries selects them here first and forms the update
        from the result: a compiler then reads the stored entry instead of recomputing it from the
        old one in the parameters' loop, which on XLA's CPU backend copies every donated state array
        (measured in ``docs/backends.md``). The transform does not select such an entry again.
        """
        if self.ok is None or (self.applied and is_dense(new)):
            return new
        selected = select(self.xp, self.ok, new, old)  # skip.entry_kept's selection
        self.settled[selected] = True
        return selected


def settle_pieces(ctx: StepContext, whole: Array, pieces: Sequence[Array]) -> Sequence[Array]:
    """``pieces`` (the slices of ``whole`` a method hands back to its leaves), marked as selected by
    the non-finite rule when ``whole`` was (:meth:`StepContext.unless_skipped`): a slice of a
    selection is the selection of the slice, so the transform does not select each piece again.
    A method that stacks its leaves' state then makes one selection per stack, not one per leaf."""
    if ctx.settled is not None and whole in ctx.settled:
        for piece in pieces:
            ctx.settled[piece] = True
    return pieces
