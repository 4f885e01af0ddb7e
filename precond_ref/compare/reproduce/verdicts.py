"""The verdict rules of ``reproduce``: written before the run, applied to its per-seed numbers.

Every claim of the report names one :class:`Rule`; the rule's :meth:`Rule.describe` is the text the
report prints next to the verdict, and :meth:`Rule.assess` the code that reaches it, so the two
cannot drift apart. A rule sees only numbers measured by the run, one per seed, and answers one of
:data:`VERDICTS`.

The common shape of every rule: the per-seed statistic is a **paired difference** (the claimed
method minus its baseline on the same seed, same data order and same initial weights) or, for a
claim about one quantity, the quantity itself; its noise is the two-sided 95% Student-t interval of
the mean, ``mean ± t(0.975, n - 1) * s / sqrt(n)`` (:func:`interval`). A claim **holds** when the
whole interval is on the claimed side, **does not hold** when the whole interval is on the other
side, and is **inconclusive at this scale** when the interval straddles the boundary; it is
**underpowered** instead when the claim states the size of its effect (a tolerance of a match, an
``effect`` of an ordering) and the interval's half-width, the smallest effect this many seeds
could detect, exceeds it. A claim about GPU time is **not testable on this hardware** when the run
is not on a GPU (:class:`OnHardware`).

One interval per rule, of the differences: a seed that is bad for both methods alike moves both
sides and cancels in its difference, and a noisy method widens only its own differences' interval.
With one seed there is no interval, and every rule is inconclusive.

Pure Python (no NumPy), so that the rules are unit-tested without the experiments' dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "HOLDS", "FAILS", "INCONCLUSIVE", "UNDERPOWERED", "NOT_TESTABLE", "VERDICTS", "Rule", "Ordering", "MatchesOrBeats", "Threshold",
    "OnHardware", "combine", "interval", "t_quantile", "spread",
]

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive at this scale"
UNDERPOWERED = "underpowered"
NOT_TESTABLE = "not testable on this hardware"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNDERPOWERED, NOT_TESTABLE)

# Two-sided 95% quantiles t(0.975, df) of Student's t distribution, df = 1..30 (standard tables,
# e.g. NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2), to three decimals.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959963984540054


def t_quantile(df: int) -> float:
    """``t(0.975, df)``: the table for ``df <= 30``, above it the Cornish-Fisher expansion around
    the normal quantile (Abramowitz and Stegun 26.7.5), within 1e-3 of the exact value there."""
    if df < 1:
        raise ValueError(f"t_quantile: degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` in the denominator); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided 95% Student-t interval of the mean of ``values``
    (infinite with fewer than two values: one seed has no noise estimate)."""
    values = _check(values, "interval")
    mean = _mean(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = t_quantile(len(values) - 1) * spread(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


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


def _evidence(statistic: str, values: list[float]) -> dict:
    mean, low, high = interval(values)
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 - JSON has no infinity
    return {"statistic": statistic, "n": len(values), "mean": mean, "low": finite(low), "high": finite(high),
            "detectable": finite((high - low) / 2)}


def _powered(verdict: str, low: float, high: float, effect: float | None) -> str:
    """An inconclusive verdict is underpowered when the claimed ``effect`` is smaller than the
    interval's half-width (the smallest effect these seeds could tell from none)."""
    if verdict == INCONCLUSIVE and effect is not None and (high - low) / 2 > effect:
        return UNDERPOWERED
    return verdict


_NOISE = "the 95% t-interval of the mean over the seeds"


class Rule:
    """A verdict rule: ``describe()`` for the report, ``assess(...)`` for the verdict and its
    evidence (the statistic's mean and 95% interval), ``decide(...)`` for the verdict alone."""

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def assess(self, *values: Sequence[float]) -> tuple[str, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decide(self, *values: Sequence[float]) -> str:
        return self.assess(*values)[0]

    def to_json(self) -> dict:
        return {"kind": type(self).__name__, "text": self.describe(), **self.__dict__}


@dataclass
class Ordering(Rule):
    """Claim: ``a`` is better than ``b`` (lower when ``lower_is_better``), seed by seed (paired).

    The statistic is the per-seed gain ``b - a`` (``a - b`` when higher is better): holds if its
    interval lies above 0, does not hold if below 0, else inconclusive (underpowered when
    ``effect``, the gain the claim states, is below the interval's half-width).
    """

    a: str
    b: str
    lower_is_better: bool = True
    effect: float | None = None

    def describe(self) -> str:
        better = "lower" if self.lower_is_better else "higher"
        power = (f" (underpowered if the interval's half-width exceeds the claimed gain {self.effect:g})"
                 if self.effect is not None else "")
        return (
            f"paired per seed, the gain of {self.a} over {self.b} ({better} is better); holds if {_NOISE} of the gain "
            f"lies above 0, does not hold if it lies below 0, otherwise inconclusive{power}"
        )

    def assess(self, a: Sequence[float], b: Sequence[float]) -> tuple[str, dict]:
        a, b = _paired(a, b, self.a, self.b)
        sign = 1.0 if self.lower_is_better else -1.0
        gains = [sign * (y - x) for x, y in zip(a, b)]  # > 0 where a is better
        evidence = _evidence(f"gain of {self.a} over {self.b}", gains)
        _, low, high = interval(gains)
        return _powered(HOLDS if low > 0 else FAILS if high < 0 else INCONCLUSIVE, low, high, self.effect), evidence


@dataclass
class MatchesOrBeats(Rule):
    """Claim: ``a`` is at least as good as ``b`` ("matches or beats", "competitive", "keeps").

    The statistic is the per-seed shortfall of ``a`` behind ``b`` (paired); ``tolerance`` is the
    shortfall that still counts as a match, relative to ``|mean(b)|`` when ``relative`` (a loss),
    absolute otherwise (an accuracy). Holds if the shortfall's interval lies below the tolerance (a
    non-inferiority test), does not hold if it lies above it, else inconclusive.
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
            f"paired per seed, the shortfall of {self.a} behind {self.b} (how far {worse}); holds if {_NOISE} of the "
            f"shortfall lies below the tolerance {tol}, does not hold if it lies above it, otherwise inconclusive "
            f"(underpowered if the interval's half-width exceeds the tolerance)"
        )

    def assess(self, a: Sequence[float], b: Sequence[float]) -> tuple[str, dict]:
        a, b = _paired(a, b, self.a, self.b)
        sign = 1.0 if self.lower_is_better else -1.0
        shortfalls = [sign * (x - y) for x, y in zip(a, b)]  # > 0 where a is worse
        tol = self.tolerance * abs(_mean(b)) if self.relative else self.tolerance
        evidence = {**_evidence(f"shortfall of {self.a} behind {self.b}", shortfalls), "tolerance": tol}
        _, low, high = interval(shortfalls)
        return _powered(HOLDS if high <= tol else FAILS if low > tol else INCONCLUSIVE, low, high, tol), evidence


@dataclass
class Threshold(Rule):
    """Claim: a measured quantity is below (or above) ``bound``.

    Holds if the quantity's interval lies on the claimed side of the bound, does not hold if it lies
    on the other side, else inconclusive.
    """

    quantity: str
    bound: float
    below: bool = True

    def describe(self) -> str:
        side, other = ("below", "above") if self.below else ("above", "below")
        return (
            f"holds if {_NOISE} of {self.quantity} lies {side} {self.bound:g}, does not hold if it lies {other} "
            f"{self.bound:g}, otherwise inconclusive"
        )

    def assess(self, values: Sequence[float]) -> tuple[str, dict]:
        values = _check(values, self.quantity)
        evidence = {**_evidence(self.quantity, values), "bound": self.bound}
        _, low, high = interval(values)
        if self.below:
            verdict = HOLDS if high < self.bound else FAILS if low > self.bound else INCONCLUSIVE
        else:
            verdict = HOLDS if low > self.bound else FAILS if high < self.bound else INCONCLUSIVE
        return verdict, evidence


@dataclass
class OnHardware(Rule):
    """A claim about time on a GPU ("wall clock", "the parallelism of GPUs"): ``rule`` decides it
    when the run's device is of type ``device_type``; on any other device it is not testable."""

    rule: Rule
    device_type: str = "cuda"

    def describe(self) -> str:
        return (f"{NOT_TESTABLE} unless the run is on a {self.device_type} device (a claim about GPU time); "
                f"on one: {self.rule.describe()}")

    def assess(self, device: str, *values: Sequence[float]) -> tuple[str, dict]:
        if str(device).split(":")[0] != self.device_type:
            return NOT_TESTABLE, {"statistic": f"the run is on {device}, not {self.device_type}"}
        return self.rule.assess(*values)

    def to_json(self) -> dict:
        return {"kind": "OnHardware", "text": self.describe(), "device_type": self.device_type, "rule": self.rule.to_json()}


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several parts (e.g. "beats Adam *and* SGD"): not testable if any part is
    not testable on this hardware, else does not hold if any part does not hold, holds if every
    part holds, underpowered if any part is, otherwise inconclusive."""
    if not verdicts:
        raise ValueError("combine: no verdicts")
    unknown = [v for v in verdicts if v not in VERDICTS]
    if unknown:
        raise ValueError(f"combine: unknown verdict(s) {unknown}")
    if any(v == NOT_TESTABLE for v in verdicts):
        return NOT_TESTABLE
    if any(v == FAILS for v in verdicts):
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == UNDERPOWERED for v in verdicts):
        return UNDERPOWERED
    return INCONCLUSIVE
