"""The median decode rate's distribution-free bounds and how a budget is judged on them."""

from __future__ import annotations

import math

from harness import speed


def test_the_bounds_are_the_order_statistics_the_binomial_allows():
    """12 requests at 95%: P(Bin(12, 1/2) <= 2) = 79/4096 <= 0.05 < P(<= 3), so the 3rd
    smallest and the 3rd largest; 6 requests: only the extremes (1/64)."""
    rates = [float(r) for r in range(1, 13)]
    m = speed.median(rates, 0.95)
    assert (m.value, m.lower, m.upper, m.n) == (6.0, 3.0, 10.0, 12)
    assert sum(math.comb(12, k) for k in range(3)) / 2**12 <= 0.05
    six = speed.median([float(r) for r in range(1, 7)], 0.95)
    assert (six.lower, six.upper) == (1.0, 6.0)
    three = speed.median([1.0, 2.0, 3.0], 0.95)
    assert three.lower is None and "too few to bound" in three.describe("tok/s")


def test_a_budget_is_missed_met_or_unjudged_by_the_bounds():
    m = speed.median([float(r) for r in range(90, 102)], 0.95)  # 90..101: bounds 92, 99
    assert speed.judge(m, 100, "decode p50", "tok/s")[0] == "missed"
    assert speed.judge(m, 92, "decode p50", "tok/s")[0] == "met"
    state, said = speed.judge(m, 95, "decode p50", "tok/s")
    assert state == "unjudged" and "straddles the budget 95" in said
