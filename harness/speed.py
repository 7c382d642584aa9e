"""A speed figure with a stated confidence: the median per-request decode rate and its
distribution-free bounds.

The bench times the same fixed-length decodes (the same prompts, `bench.max_tokens`
generated tokens each, end-of-sequence ignored where the server allows it) several times.
The median's one-sided bound at confidence c is an order statistic: the k-th smallest of
n rates is below the true median with probability P(Binomial(n, 1/2) >= k), so the lower
bound is the largest k-th smallest with P(Binomial(n, 1/2) <= k - 1) <= 1 - c (and the
upper bound the mirror image). It assumes only that the requests are exchangeable, not
that rates are normal, which a few requests on a busy CPU are not.

A budget is missed ("slow") when the upper bound is below it, met when the lower bound is
at or above it, and unjudged otherwise, with the interval, so a cell near its budget is
not "slow" one run and "ok" the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Median:
    value: float
    lower: float | None
    """None when n rates are too few to bound the median at the confidence asked."""
    upper: float | None
    n: int

    def describe(self, unit: str) -> str:
        if self.lower is None or self.upper is None:
            return f"{self.value:.0f} {unit} (median of {self.n}, too few to bound)"
        return f"{self.value:.0f} [{self.lower:.0f}, {self.upper:.0f}] {unit} (median of {self.n})"


def median(values: list[float], confidence: float) -> Median:
    """The median (nearest rank, an actual request) and its one-sided bounds."""
    ordered = sorted(values)
    n = len(ordered)
    middle = ordered[math.ceil(n / 2) - 1]
    k = _rank(n, 1 - confidence)
    if k == 0:
        return Median(middle, None, None, n)
    return Median(middle, ordered[k - 1], ordered[n - k], n)


def _rank(n: int, alpha: float) -> int:
    """The largest k with P(Binomial(n, 1/2) <= k - 1) <= alpha (0 when even k = 1 fails)."""
    k, below = 0, 0.0
    while k < n:
        below += math.comb(n, k) / 2**n  # P(X <= k)
        if below > alpha:
            break
        k += 1
    return k


def judge(figure: Median, budget: float, name: str, unit: str) -> tuple[str, str]:
    """("missed" | "met" | "unjudged", what to say): a minimum the figure must reach."""
    shown = f"{name} {figure.describe(unit)}"
    if figure.upper is not None and figure.upper < budget:
        return "missed", f"{shown} < {budget:.4g}"
    if figure.lower is not None and figure.lower >= budget:
        return "met", f"{shown} >= {budget:.4g}"
    return "unjudged", f"{shown} straddles the budget {budget:.4g}: add bench.repeats"
