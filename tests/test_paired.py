"""The paired interval every verdict and the gate decide with, against published values,
and the procedures built on it (one-sided p, Holm, the smallest decidable tolerance)."""

from __future__ import annotations

import random

import pytest

from harness.judge import paired
from harness.judge.paired import Table


def test_newcombe_matches_the_published_interval():
    """Cavo et al. (2012), complete response before and after consolidation therapy: 59
    both, 6 before only, 16 after only, 80 neither. Fagerland, Lydersen and Laake,
    "Statistical Analysis of Contingency Tables", ch. 8, Newcombe square-and-add:
    -0.0621 (95% CI -0.1186 to -0.0046); each one-sided bound is at 97.5%."""
    t = Table(59, 6, 16, 80)
    assert t.drop == pytest.approx(-0.0621, abs=5e-5)
    lower, upper = t.interval(0.975)
    assert lower == pytest.approx(-0.1186, abs=5e-5)
    assert upper == pytest.approx(-0.0046, abs=5e-5)


def test_no_disagreement_at_the_ceiling_bounds_the_drop_by_the_smallest_tolerance():
    lower, upper = Table(100, 0, 0, 0).interval(0.95)
    assert upper == pytest.approx(paired.smallest_tolerance(100, 0.95))
    assert upper == pytest.approx(1.6449**2 / (100 + 1.6449**2), rel=1e-4)
    assert lower == pytest.approx(-upper)


def test_the_table_counts_only_shared_items():
    reference = {"1": True, "2": True, "3": False, "4": False, "x": True}
    candidate = {"1": True, "2": False, "3": True, "4": False, "y": False}
    assert paired.table(reference, candidate) == Table(1, 1, 1, 1)


def test_the_one_sided_p_is_where_the_lower_bound_meets_the_tolerance():
    t = Table(160, 25, 0, 115)
    p = t.p_beyond(0.05)
    assert 0 < p < 0.05
    assert t.interval(1 - p)[0] == pytest.approx(0.05, abs=1e-6)
    assert Table(160, 5, 5, 130).p_beyond(0.05) == 1.0  # no drop seen: nothing beyond


def test_holm_steps_down_and_stops_at_the_first_kept_hypothesis():
    assert paired.holm([0.01, 0.04, 0.03, 0.005], 0.05) == [True, False, False, True]
    assert paired.holm([0.001, 0.02, 0.04], 0.05) == [True, True, True]
    assert paired.holm([], 0.05) == []


def test_items_to_decide_grow_as_the_drop_nears_the_tolerance():
    near = Table(40, 8, 5, 47).items_to_decide(0.05, 0.95)
    far = Table(40, 5, 5, 50).items_to_decide(0.05, 0.95)
    assert near > far > 100
    assert Table(40, 15, 10, 35).items_to_decide(0.05, 0.95) is None  # drop exactly 0.05


def test_a_drop_equal_to_the_tolerance_is_rarely_held():
    """Simulated: 100 items, 20% disagreement, a true drop of exactly the tolerance 0.1:
    "held" (upper bound below it) must come out at most 1 - confidence of the time."""
    rng = random.Random(0)
    held = 0
    runs = 2000
    for _ in range(runs):
        lost = gained = 0
        for _ in range(100):
            u = rng.random()
            lost += u < 0.15
            gained += 0.15 <= u < 0.20
        t = Table(50, lost, gained, 50 - lost - gained + 0)
        held += t.interval(0.95)[1] < 0.1
    assert held / runs <= 0.06
