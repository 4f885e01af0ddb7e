"""The verdict rules of ``reproduce``: written before the run, applied to its per-seed numbers.

Every claim of the report names one :class:`Rule`; the rule's :meth:`Rule.describe` is the text the
report prints next to the verdict, and :meth:`Rule.decide` the code that reaches it, so the two
cannot drift apart. A rule sees only numbers measured by the run, one per seed (or one per seed and
configuration), and answers one of :data:`VERDICTS`.

The common shape of every rule: a claim **holds** when it is true in at least
``ceil(2/3 * seeds)`` of the seeds *and* the mean margin exceeds the seeds' spread (the larger
sample standard deviation of the two sides, or of the one side); it **does not hold** when its
negation passes the same test; anything else is **inconclusive at this scale** (the seeds
disagree, or the margin is inside the noise).

Pure Python (no NumPy), so that the rules are unit-tested without the experiments' dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["HOLDS", "FAILS", "INCONCLUSIVE", "VERDICTS", "Rule", "Ordering", "MatchesOrBeats", "Threshold", "combine", "spread", "quorum"]

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive at this scale"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` in the denominator); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def quorum(seeds: int) -> int:
    """Seeds that must agree: ``ceil(2/3 * seeds)`` (2 of 3, 2 of 2, 4 of 5, 1 of 1)."""
    return -(-2 * seeds // 3)


def _paired(a: Sequence[float], b: Sequence[float], name_a: str, name_b: str) -> tuple[list[float], list[float]]:
    a, b = _check(a, name_a), _check(b, name_b)
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} seeds and {name_b} {len(b)}: a paired rule needs the same seeds")
    return a, b


def _check(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what}: no values (at least one seed is needed)")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: non-finite value in {values}")
    return values


class Rule:
    """A verdict rule: ``describe()`` for the report, ``decide(...)`` for the verdict."""

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"kind": type(self).__name__, "text": self.describe(), **self.__dict__}


@dataclass
class Ordering(Rule):
    """Claim: ``a`` is better than ``b`` (lower when ``lower_is_better``), seed by seed (paired).

    Holds if ``a`` is better in at least :func:`quorum` of the seeds and the mean margin exceeds
    the seeds' spread; does not hold if ``b`` is better by the same test; else inconclusive.
    """

    a: str
    b: str
    lower_is_better: bool = True

    def describe(self) -> str:
        better = "lower" if self.lower_is_better else "higher"
        return (
            f"holds if {self.a} is {better} than {self.b} in at least 2/3 of the seeds (paired) and the mean gap "
            f"exceeds the seeds' spread (the larger sample std of the two); does not hold if {self.b} wins by the "
            f"same test; otherwise inconclusive"
        )

    def decide(self, a: Sequence[float], b: Sequence[float]) -> str:
        a, b = _paired(a, b, self.a, self.b)
        sign = 1.0 if self.lower_is_better else -1.0
        gains = [sign * (y - x) for x, y in zip(a, b)]  # > 0 where a is better
        noise = max(spread(a), spread(b))
        need = quorum(len(a))
        if sum(g > 0 for g in gains) >= need and _mean(gains) > noise:
            return HOLDS
        if sum(g < 0 for g in gains) >= need and -_mean(gains) > noise:
            return FAILS
        return INCONCLUSIVE


@dataclass
class MatchesOrBeats(Rule):
    """Claim: ``a`` is at least as good as ``b`` ("matches or beats", "competitive", "keeps").

    ``tolerance`` is the margin that still counts as a match, relative to ``|mean(b)|`` when
    ``relative`` (a loss), absolute otherwise (an accuracy). Holds if ``a`` is no worse than ``b``
    plus the tolerance in at least :func:`quorum` of the seeds and the mean shortfall is within the
    tolerance plus the seeds' spread; does not hold if ``a`` is worse than ``b`` plus the tolerance
    in the quorum of seeds and the mean shortfall exceeds the tolerance plus the spread.
    """

    a: str
    b: str
    tolerance: float
    relative: bool = True
    lower_is_better: bool = True

    def describe(self) -> str:
        tol = f"{100 * self.tolerance:g}% of {self.b}'s mean" if self.relative else f"{self.tolerance:g}"
        worse = "above" if self.lower_is_better else "below"
        return (
            f"holds if {self.a} is at most {tol} {worse} {self.b} in at least 2/3 of the seeds (paired) and the mean "
            f"shortfall is within that tolerance plus the seeds' spread; does not hold if it falls short by more than "
            f"the tolerance in 2/3 of the seeds and on average by more than tolerance plus spread; otherwise inconclusive"
        )

    def decide(self, a: Sequence[float], b: Sequence[float]) -> str:
        a, b = _paired(a, b, self.a, self.b)
        sign = 1.0 if self.lower_is_better else -1.0
        shortfalls = [sign * (x - y) for x, y in zip(a, b)]  # > 0 where a is worse
        tol = self.tolerance * abs(_mean(b)) if self.relative else self.tolerance
        noise = max(spread(a), spread(b))
        need = quorum(len(a))
        if sum(s <= tol for s in shortfalls) >= need and _mean(shortfalls) <= tol + noise:
            return HOLDS
        if sum(s > tol for s in shortfalls) >= need and _mean(shortfalls) > tol + noise:
            return FAILS
        return INCONCLUSIVE


@dataclass
class Threshold(Rule):
    """Claim: a measured quantity is below (or above) ``bound``.

    Holds if at least :func:`quorum` of the seeds are on the claimed side and the mean is there by
    more than the seeds' spread; does not hold if the quorum is on the other side and the mean is
    beyond the bound by more than the spread; else inconclusive.
    """

    quantity: str
    bound: float
    below: bool = True

    def describe(self) -> str:
        side, other = ("at most", "above") if self.below else ("at least", "below")
        return (
            f"holds if {self.quantity} is {side} {self.bound:g} in at least 2/3 of the seeds and its mean is on that "
            f"side by more than the seeds' spread; does not hold if it is {other} {self.bound:g} by the same test; "
            f"otherwise inconclusive"
        )

    def decide(self, values: Sequence[float]) -> str:
        values = _check(values, self.quantity)
        sign = 1.0 if self.below else -1.0
        margins = [sign * (self.bound - v) for v in values]  # >= 0 on the claimed side
        noise = spread(values)
        need = quorum(len(values))
        if sum(m >= 0 for m in margins) >= need and _mean(margins) > noise:
            return HOLDS
        if sum(m < 0 for m in margins) >= need and -_mean(margins) > noise:
            return FAILS
        return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several parts (e.g. "beats Adam *and* SGD"): holds if every part holds,
    does not hold if any part does not hold, otherwise inconclusive."""
    if not verdicts:
        raise ValueError("combine: no verdicts")
    unknown = [v for v in verdicts if v not in VERDICTS]
    if unknown:
        raise ValueError(f"combine: unknown verdict(s) {unknown}")
    if any(v == FAILS for v in verdicts):
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE
