"""Speed figures with a stated confidence: a quantile of per-request figures (the median
decode rate, the p95 time to first token) and its distribution-free bounds.

The bench times the same fixed-length decodes (the same prompts, `bench.max_tokens`
generated tokens each, end-of-sequence ignored where the server allows it) several times.
A quantile's one-sided bound at confidence c is an order statistic: the k-th smallest of n
values is below the true q-quantile with probability P(Binomial(n, q) >= k), so the lower
bound is the largest k-th smallest with P(Binomial(n, q) <= k - 1) <= 1 - c, and the upper
bound the smallest j-th smallest with P(Binomial(n, q) <= j - 1) >= c. It assumes only
that the requests are exchangeable, not that times are normal, which a few requests on a
busy CPU are not. A tail quantile needs many requests: p95's upper bound at 95% exists
from 59 on.

A minimum (decode) is missed ("slow") when the upper bound is below it, met when the
lower bound is at or above it; a maximum (TTFT) is missed when the lower bound is above
it, met when the upper bound is at or below it; unjudged otherwise, with the interval, so
a cell near its budget is not "slow" one run and "ok" the next.

Goodput under load (the share of requests meeting latency targets) is a binomial share,
bounded exactly (Clopper-Pearson) and judged the same way against its minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Quantile:
    value: float
    lower: float | None
    """None when n values are too few to bound the quantile at the confidence asked."""
    upper: float | None
    n: int
    q: float = 0.5
    confidence: float = 0.95

    @property
    def name(self) -> str:
        return "median" if self.q == 0.5 else f"p{self.q * 100:g}"

    def describe(self, unit: str) -> str:
        low = "-" if self.lower is None else f"{self.lower:.0f}"
        high = "-" if self.upper is None else f"{self.upper:.0f}"
        shown = f"{self.value:.0f} [{low}, {high}] {unit} ({self.name} of {self.n})"
        if self.lower is None or self.upper is None:
            return shown[:-1] + f", too few to bound; {needed(self.q, self.confidence)} would)"
        return shown


def quantile(values: list[float], q: float, confidence: float) -> Quantile:
    """The q-quantile (nearest rank: an actual request) and its one-sided bounds."""
    ordered = sorted(values)
    n = len(ordered)
    value = ordered[max(math.ceil(q * n), 1) - 1]
    k, j = _ranks(n, q, confidence)
    return Quantile(
        value,
        ordered[k - 1] if k else None,
        ordered[j - 1] if j else None,
        n,
        q,
        confidence,
    )


def median(values: list[float], confidence: float) -> Quantile:
    return quantile(values, 0.5, confidence)


def needed(q: float, confidence: float = 0.95) -> int:
    """The fewest values that bound the q-quantile on both sides at `confidence`."""
    n = 1
    while not all(_ranks(n, q, confidence)):
        n += 1
    return n


def _cdf(n: int, q: float) -> list[float]:
    """P(Binomial(n, q) <= k) for k = 0..n."""
    out, total = [], 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * q**k * (1 - q) ** (n - k)
        out.append(total)
    return out


def _ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """(k, j): the largest k with P(Binomial(n, q) <= k - 1) <= 1 - confidence, and the
    smallest j with P(Binomial(n, q) <= j - 1) >= confidence; 0 for a side that even the
    extreme value cannot bound."""
    cdf = _cdf(n, q)
    k = 0
    while k < n and cdf[k] <= 1 - confidence:
        k += 1
    j = next((j for j in range(1, n + 1) if cdf[j - 1] >= confidence), 0)
    return k, j


def against(
    figure: Quantile, budget: float, name: str, unit: str, at_most: bool = False
) -> tuple[str, str]:
    """("missed" | "met" | "unjudged", what to say): a minimum the figure must reach, or
    with `at_most` a maximum it must stay under."""
    shown = f"{name} {figure.describe(unit)}"
    low, high = figure.lower, figure.upper
    if at_most:
        if low is not None and low > budget:
            return "missed", f"{shown} > {budget:.4g}"
        if high is not None and high <= budget:
            return "met", f"{shown} <= {budget:.4g}"
    else:
        if high is not None and high < budget:
            return "missed", f"{shown} < {budget:.4g}"
        if low is not None and low >= budget:
            return "met", f"{shown} >= {budget:.4g}"
    return "unjudged", f"{shown} straddles the budget {budget:.4g}: add bench.repeats"


def share_bounds(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson one-sided bounds at `confidence` of a share seen as k of n: the
    lower is the share under which k or more would be that rare, the upper the share over
    which k or fewer would; exact, so a share near 1 from few requests is not overstated."""

    def at_most(j: int, p: float) -> float:  # P(Binomial(n, p) <= j): falls as p rises
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(j + 1))

    def solve(j: int, target: float) -> float:
        low, high = 0.0, 1.0
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if at_most(j, mid) > target else (low, mid)
        return (low + high) / 2

    alpha = 1 - confidence
    lower = 0.0 if k == 0 else solve(k - 1, 1 - alpha)
    upper = 1.0 if k == n else solve(k, alpha)
    return lower, upper


def goodput(
    ttft_ms: list[float], tpot_ms: list[float], target: Any, confidence: float, at: str
) -> tuple[str, str]:
    """("missed" | "met" | "unjudged", what to say) for a goodput budget
    (harness.spec.budgets.Goodput) on each request's TTFT and time per output token."""
    good = sum(
        (target.ttft_ms_max is None or t <= target.ttft_ms_max)
        and (target.tpot_ms_max is None or p <= target.tpot_ms_max)
        for t, p in zip(ttft_ms, tpot_ms, strict=True)
    )
    n = len(ttft_ms)
    low, high = share_bounds(good, n, confidence)
    limits = [
        f"{name} <= {limit:g} ms"
        for name, limit in (("TTFT", target.ttft_ms_max), ("TPOT", target.tpot_ms_max))
        if limit is not None
    ]
    shown = (
        f"goodput {at} {good}/{n} = {good / n:.2f} [{low:.2f}, {high:.2f}] ({' and '.join(limits)})"
    )
    if high < target.share_min:
        return "missed", f"{shown} < {target.share_min:g}"
    if low >= target.share_min:
        return "met", f"{shown} >= {target.share_min:g}"
    return "unjudged", f"{shown} straddles {target.share_min:g}: add load.arrivals or requests"


@dataclass
class Loaded:
    """Each load request's figures at the load a budget names, one per request in the same
    order (a decode rate only where the server timed it)."""

    decode_rates: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    """Time per output token after the first."""


def under_load(loaded: Loaded, budget: Any, confidence: float) -> tuple[list[str], list[str]]:
    """(missed, not shown met) for a load budget (harness.spec.budgets.LoadBudget) on the
    requests at its load."""
    missed: list[str] = []
    unjudged: list[str] = []
    for limit, values, q, name, unit, at_most in (
        (budget.decode_tps_min, loaded.decode_rates, 0.5, "decode per user", "tok/s", False),
        (budget.ttft_ms_p95_max, loaded.ttft_ms, 0.95, "TTFT", "ms", True),
    ):
        if limit is None:
            continue
        name = f"{name} {budget.at}"
        if not values:
            unjudged.append(f"{name} not measured (budget {limit:g} {unit})")
            continue
        state, said = against(quantile(values, q, confidence), limit, name, unit, at_most)
        {"missed": missed, "unjudged": unjudged}.get(state, []).append(said)
    if (target := budget.goodput) is not None:
        if not loaded.ttft_ms:
            unjudged.append(f"goodput {budget.at} not measured (budget {target.share_min:g})")
        else:
            state, said = goodput(loaded.ttft_ms, loaded.tpot_ms, target, confidence, budget.at)
            {"missed": missed, "unjudged": unjudged}.get(state, []).append(said)
    return missed, unjudged
