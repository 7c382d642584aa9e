"""Verdict logic on constructed figures: slow, stupid, both, broken, and the edges."""

from __future__ import annotations

import pytest

from harness.errors import ForgebenchError
from harness.spec import BudgetSpec
from harness.verdict import Figures, judge, mcnemar


def items(n_right: int, n: int = 100, offset: int = 0) -> dict[str, bool]:
    """n items, `n_right` of them correct, starting at `offset` (wrapping)."""
    return {str(i): ((i - offset) % n) < n_right for i in range(n)}


def cell(adapter: str, level: str, right: int = 70, **kw) -> Figures:
    return Figures(
        f"{adapter}-{level}",
        adapter,
        level,
        accuracy={"arith": right / 100},
        items={"arith": items(right)},
        **kw,
    )


BUDGETS = BudgetSpec(
    decode_tps_min=40,
    ttft_ms_p95_max=800,
    memory_mb_max=1024,
    accuracy_drop_max=0.03,
    significance=0.05,
    kld_max=0.1,
)


def test_mcnemar_counts_only_disagreements():
    ref, cand = items(70), items(50)  # cand loses 20 items ref got right, gains none
    lost, gained, p = mcnemar(ref, cand)
    assert (lost, gained) == (20, 0)
    assert p == pytest.approx(2 * 0.5**20)
    assert mcnemar(ref, dict(ref)) == (0, 0, 1.0)


def test_ok_slow_stupid_and_both():
    cells = [
        cell("a", "f16", 70, decode_tps=30, kld_mean=None),
        cell("a", "q8_0", 70, decode_tps=50, kld_mean=0.01),
        cell("a", "q4_k_m", 50, decode_tps=60, kld_mean=0.05),
        cell("a", "q2_k", 40, decode_tps=20, kld_mean=0.4),
    ]
    v = judge(cells, BUDGETS)
    assert v["a-f16"].verdict == "slow" and v["a-f16"].reasons == ["decode 30 tok/s < 40"]
    assert v["a-q8_0"].verdict == "ok" and v["a-q8_0"].reasons == []
    assert v["a-q4_k_m"].verdict == "stupid"
    assert v["a-q4_k_m"].reasons[0].startswith("arith 0.50 vs 0.70 at f16, McNemar p=")
    assert v["a-q2_k"].verdict == "slow+stupid"
    assert any(r.startswith("KLD 0.4 > 0.1") for r in v["a-q2_k"].reasons)


def test_a_drop_that_chance_explains_is_not_stupid():
    # 2 items lost, 1 gained of 100: a 1-point drop; even with a zero budget, p is large
    ref = cell("a", "f16", 70)
    cand = Figures(
        "a-q4_0",
        "a",
        "q4_0",
        accuracy={"arith": 0.69},
        items={"arith": {**items(70), "0": False, "1": False, "99": True}},
    )
    v = judge([ref, cand], BudgetSpec(accuracy_drop_max=0.0))
    assert v["a-q4_0"].verdict == "ok"


def test_ties_with_the_reference_are_ok():
    v = judge([cell("a", "f16"), cell("a", "q8_0")], BUDGETS)
    assert v["a-q8_0"].verdict == "ok"


def test_broken_cells_and_a_broken_reference():
    cells = [cell("a", "f16", status="broken", error="check: did not stop"), cell("a", "q8_0", 10)]
    v = judge(cells, BUDGETS)
    assert v["a-f16"].verdict == "broken" and v["a-f16"].reasons == ["check: did not stop"]
    assert v["a-q8_0"].verdict == "ok"  # nothing sound to compare against


def test_all_cells_failing():
    cells = [
        cell(a, q, status="failed", error="quantize: boom") for a in "ab" for q in ("f16", "q8_0")
    ]
    assert {v.verdict for v in judge(cells, BUDGETS).values()} == {"broken"}


def test_missing_f16_is_a_clear_error():
    with pytest.raises(ForgebenchError, match=r"no f16 cell for a: .* add f16 to the spec"):
        judge([cell("a", "q8_0")], BUDGETS)


def test_tuned_is_compared_with_the_untuned_base_at_the_same_level():
    cells = [
        cell("base", "f16", 10),
        cell("base", "q8_0", 10),
        cell("a", "f16", 70),
        cell("a", "q8_0", 70),
    ]
    notes = judge(cells, BUDGETS)["a-q8_0"].notes
    assert notes and notes[0].startswith("arith: tuned 0.70 vs untuned 0.10 at q8_0")
