"""The median decode rate's distribution-free bounds and how a budget is judged on them."""

from __future__ import annotations

import math

from harness.judge import speed


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
    assert speed.against(m, 100, "decode p50", "tok/s")[0] == "missed"
    assert speed.against(m, 92, "decode p50", "tok/s")[0] == "met"
    state, said = speed.against(m, 95, "decode p50", "tok/s")
    assert state == "unjudged" and "straddles the budget 95" in said


def test_a_tail_quantile_is_bounded_only_from_enough_requests():
    """p95's upper bound at 95% is the largest of 59 (1 - 0.95^59 >= 0.95 > 1 - 0.95^58)."""
    assert speed.needed(0.95, 0.95) == 59 and 1 - 0.95**59 >= 0.95 > 1 - 0.95**58
    assert speed.needed(0.5, 0.95) == 5
    twelve = speed.quantile([float(t) for t in range(1, 13)], 0.95, 0.95)
    assert twelve.value == 12.0 and twelve.upper is None
    assert "too few to bound; 59 would" in twelve.describe("ms")
    sixty = speed.quantile([float(t) for t in range(1, 61)], 0.95, 0.95)
    assert (sixty.value, sixty.upper) == (57.0, 60.0) and sixty.lower is not None


def test_a_maximum_is_missed_only_when_the_lower_bound_is_above_it():
    p95 = speed.quantile([float(t) for t in range(1, 61)], 0.95, 0.95)
    assert speed.against(p95, 50, "TTFT", "ms", at_most=True)[0] == "missed"
    assert speed.against(p95, 60, "TTFT", "ms", at_most=True)[0] == "met"
    assert speed.against(p95, 58, "TTFT", "ms", at_most=True)[0] == "unjudged"
    # twelve fast requests cannot show a p95 under budget, but twelve slow ones do miss it
    slow = speed.quantile([900.0 + t for t in range(12)], 0.95, 0.95)
    assert speed.against(slow, 800, "TTFT", "ms", at_most=True)[0] == "missed"
    fast = speed.quantile([100.0 + t for t in range(12)], 0.95, 0.95)
    assert speed.against(fast, 800, "TTFT", "ms", at_most=True)[0] == "unjudged"
