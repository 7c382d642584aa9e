"""Verdict logic on constructed figures: the blame chain with its intervals, slow,
broken, and every way a verdict fails closed (unjudged, never ok, when something was not
measured or not shown within tolerance)."""

from __future__ import annotations

import pytest

from harness.errors import ForgebenchError
from harness.judge.speed import Loaded, share_bounds
from harness.judge.verdict import Figures, Scores, judge, slow_reasons
from harness.spec import BudgetSpec

N = 300


def items(n_right: int, n: int = N) -> dict[str, bool]:
    """n items, the first `n_right` of them correct."""
    return {str(i): i < n_right for i in range(n)}


def cell(adapter: str, level: str, right: int = 210, guard: int | None = None, **kw) -> Figures:
    fig = Figures(f"{adapter}-{level}", adapter, level, evaluated=True, **kw)
    fig.items = {"arith": items(right)}
    if guard is not None:
        fig.items["caps"] = items(guard)
    fig.accuracy = {t: sum(v.values()) / len(v) for t, v in fig.items.items()}
    return fig


def hf(label: str, right: int, guard: int | None = None) -> Scores:
    scores = Scores(label, items={"arith": items(right)})
    if guard is not None:
        scores.items["caps"] = items(guard)
    scores.accuracy = {t: sum(v.values()) / len(v) for t, v in scores.items.items()}
    return scores


BUDGETS = BudgetSpec(
    decode_tps_min=40, ttft_ms_p95_max=800, memory_mb_max=1024, tolerance=0.05, confidence=0.95
)
FAST = {
    "decode_rates": [48.0, 49.0, 50.0, 51.0, 52.0, 50.0] * 2,
    "ttft_ms": [100.0] * 60,  # a p95 is bounded from 59 requests
    "memory_mb": 300.0,
}


def chain(base_hf=180, tuned_hf=210, f16=210, levels=(("q8_0", 210),), base_cells=True, **kw):
    """An untuned base (HF and served) and adapter a (HF, F16, levels), all measured."""
    cells = [cell("a", "f16", f16, **FAST), *[cell("a", q, r, **FAST) for q, r in levels]]
    if base_cells:
        cells += [cell("base", "f16", base_hf, **FAST), cell("base", "q8_0", base_hf, **FAST)]
    references = {"base": hf("untuned HF", base_hf), "a": hf("tuned HF", tuned_hf)}
    return judge(cells, kw.pop("budgets", BUDGETS), references, ["arith"], **kw)


def test_a_sound_chain_is_ok_and_every_link_says_its_interval():
    v = chain()
    assert v["a-q8_0"].verdict == "ok" and v["a-f16"].verdict == "ok"
    steps = [link.step for link in v["a-q8_0"].links]
    assert steps == ["training", "export", "quantization", "end to end"]
    assert all(link.state == "held" for link in v["a-q8_0"].links)
    assert any("gain +0.10 [" in note and "surely above zero" in note for note in v["a-q8_0"].notes)
    assert any("within tolerance 0.05" in note for note in v["a-q8_0"].notes)
    assert v["a-q8_0"].chain == {
        "chain_hf_base_arith": 0.6,
        "chain_hf_tuned_arith": 0.7,
        "chain_f16_arith": 0.7,
    }


def test_ok_means_shown_within_tolerance_not_that_no_loss_was_found():
    """100 items, 6 lost and 4 gained: no significant loss (the old rule said ok), but the
    interval reaches past 0.05, so the level is unjudged and says what would decide it."""
    cells = [cell("a", "f16", 70, **FAST), cell("a", "q4_0", 70, **FAST)]
    for fig in cells:
        fig.items["arith"] = items(70, 100)
    near = dict(items(70, 100))
    near.update({str(i): False for i in range(6)} | {str(99 - i): True for i in range(4)})
    cells[1].items["arith"] = near
    refs = {"base": hf("untuned HF", 0), "a": hf("tuned HF", 0)}
    refs["base"].items["arith"], refs["a"].items["arith"] = items(10, 100), items(70, 100)
    v = judge(cells, BUDGETS, refs, ["arith"])["a-q4_0"]
    assert v.verdict == "unjudged"
    assert "straddles tolerance 0.05" in v.reasons[0]
    assert "items would decide it" in v.reasons[0]


def test_a_significant_loss_within_tolerance_is_ok():
    """1000 items, 15 lost: chance does not explain 0.015, but it is surely below 0.05."""
    cells = [cell("a", "f16", **FAST), cell("a", "q4_0", **FAST)]
    cells[0].items["arith"], cells[1].items["arith"] = items(700, 1000), items(685, 1000)
    refs = {"base": hf("untuned HF", 0), "a": hf("tuned HF", 0)}
    refs["base"].items["arith"], refs["a"].items["arith"] = items(500, 1000), items(700, 1000)
    assert judge(cells, BUDGETS, refs, ["arith"])["a-q4_0"].verdict == "ok"


def test_each_step_is_blamed_for_its_own_loss():
    export = chain(tuned_hf=210, f16=150, levels=(("q8_0", 150),))
    assert export["a-f16"].verdict == "stupid (export)"
    assert export["a-q8_0"].verdict == "stupid (export)"  # and quantization lost nothing more
    quantization = chain(levels=(("q2_k", 120),))
    assert quantization["a-f16"].verdict == "ok"
    assert quantization["a-q2_k"].verdict == "stupid (quantization)"
    assert "beyond tolerance 0.05" in quantization["a-q2_k"].reasons[0]
    assert "Holm-adjusted across the run" in quantization["a-q2_k"].reasons[0]


def test_training_that_gains_nothing_is_stupid_whatever_follows():
    """Wrong labels: the tuned model is no better than the base on its own task, so every
    level is stupid (training: no gain), however faithfully it is exported."""
    v = chain(base_hf=210, tuned_hf=150, f16=150, levels=(("q8_0", 150),))
    assert {v[c].verdict for c in ("a-f16", "a-q8_0")} == {"stupid (training: no gain)"}
    assert "not surely above zero" in v["a-f16"].reasons[0]
    same = chain(base_hf=210, tuned_hf=210, f16=210, levels=(("q8_0", 210),))
    assert same["a-q8_0"].verdict == "stupid (training: no gain)"
    wanted = BUDGETS.model_copy(update={"min_gain": 0.2})
    assert chain(budgets=wanted)["a-q8_0"].verdict == "stupid (training: no gain)"


def test_stupid_holds_the_error_rate_across_the_whole_run():
    """A drop whose one-sided p against the tolerance is about 0.02 is stupid in a run of
    one comparison, not among many (Holm): it is then unjudged, never ok."""

    def run(extra_levels: int) -> str:
        levels = [("q4_0", 185), *((f"q{i}", 210) for i in range(extra_levels))]
        cells = [cell("a", "f16", **FAST), *[cell("a", q, r, **FAST) for q, r in levels]]
        refs = {"base": hf("untuned HF", 60), "a": hf("tuned HF", 210)}
        return judge(cells, BUDGETS, refs, ["arith"])["a-q4_0"].verdict

    assert run(0) == "stupid (quantization)"
    assert run(12) == "unjudged"


def test_forgetting_a_guard_task_is_blamed_on_training():
    cells = [cell("a", "f16", 210, guard=90, **FAST)]
    refs = {"base": hf("untuned HF", 0, guard=195), "a": hf("tuned HF", 210, guard=90)}
    v = judge(cells, BUDGETS, refs, ["arith", "caps"], guard=["caps"])
    assert v["a-f16"].verdict == "stupid (training: forgetting)"
    (guard_link,) = [x for x in v["a-f16"].links if x.task == "caps" and x.step == "end to end"]
    assert guard_link.reference == "untuned HF"  # a guard task is judged from the base


def test_a_missing_or_failed_reference_is_unjudged():
    cells = [cell("a", "f16", **FAST), cell("a", "q8_0", **FAST)]
    missing = judge(cells, BUDGETS, {"base": hf("untuned HF", 180)}, ["arith"])
    assert {v.verdict for v in missing.values()} == {"unjudged"}
    failed = {"base": hf("untuned HF", 180), "a": Scores("tuned HF", error="reference failed")}
    v = judge(cells, BUDGETS, failed, ["arith"])
    assert v["a-q8_0"].verdict == "unjudged" and "reference failed" in v["a-q8_0"].reasons[0]


def test_a_quantized_cell_whose_f16_broke_is_unjudged_not_ok():
    cells = [
        cell("a", "f16", status="broken", error="check: did not stop"),
        cell("a", "q8_0", **FAST),
    ]
    v = judge(cells, BUDGETS, {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}, ["arith"])
    assert v["a-f16"].verdict == "broken" and v["a-f16"].reasons == ["check: did not stop"]
    assert v["a-q8_0"].verdict == "unjudged"


def test_items_that_do_not_pair_up_are_unjudged():
    cells = [cell("a", "f16", **FAST), cell("a", "q8_0", **FAST)]
    cells[1].items["arith"] = {f"other-{i}": True for i in range(N)}
    v = judge(cells, BUDGETS, {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}, ["arith"])
    assert v["a-q8_0"].verdict == "unjudged" and "share no items" in v["a-q8_0"].reasons[0]


def test_slow_is_judged_on_the_median_s_bounds_and_a_missing_figure_is_unjudged():
    v = chain()
    assert v["a-q8_0"].verdict == "ok"
    slow = {**FAST, "decode_rates": [28.0, 29.0, 30.0, 31.0, 32.0, 30.0] * 2}
    cells = [cell("a", "f16", **FAST), cell("a", "q8_0", 120, **slow)]
    refs = {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}
    both = judge(cells, BUDGETS, refs, ["arith"])["a-q8_0"]
    assert both.verdict == "slow+stupid (quantization)"
    assert both.reasons[0] == "decode p50 30 [29, 31] tok/s (median of 12) < 40"
    near = {**FAST, "decode_rates": [36.0, 38.0, 39.0, 41.0, 42.0, 44.0] * 2}
    cells[1] = cell("a", "q8_0", **near)
    straddles = judge(cells, BUDGETS, refs, ["arith"])["a-q8_0"]
    assert straddles.verdict == "unjudged"
    assert "straddles the budget 40" in straddles.reasons[0]
    cells[1] = cell("a", "q8_0", **{**FAST, "memory_mb": None})
    unmeasured = judge(cells, BUDGETS, refs, ["arith"])["a-q8_0"]
    assert unmeasured.verdict == "unjudged" and unmeasured.reasons[0].startswith("memory not")


def test_the_kld_budget_blames_quantization_and_needs_its_figure():
    budgets = BUDGETS.model_copy(update={"kld_max": 0.1})
    cells = [cell("a", "f16", **FAST), cell("a", "q2_k", kld_mean=0.4, **FAST)]
    refs = {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}
    v = judge(cells, budgets, refs, ["arith"])
    assert v["a-q2_k"].verdict == "stupid (quantization)"
    assert v["a-q2_k"].reasons == ["KLD 0.4 > 0.1 from f16"]
    cells[1].kld_mean = None
    assert judge(cells, budgets, refs, ["arith"])["a-q2_k"].verdict == "unjudged"


def test_a_template_mismatch_is_broken_template():
    cells = [cell("a", "f16", status="broken", broken="template", error="check: template: x")]
    v = judge(cells, BUDGETS, {}, ["arith"])
    assert v["a-f16"].verdict == "broken (template)"


def test_all_cells_failing():
    cells = [
        cell(a, q, status="failed", error="quantize: boom") for a in "ab" for q in ("f16", "q8_0")
    ]
    assert {v.verdict for v in judge(cells, BUDGETS).values()} == {"broken"}


def test_missing_f16_is_a_clear_error():
    with pytest.raises(ForgebenchError, match=r"no f16 cell for a: .* add f16 to the spec"):
        judge([cell("a", "q8_0")], BUDGETS)


def test_an_evaluated_cell_with_no_task_scored_is_unjudged():
    v = judge([cell("a", "f16", **FAST)], BUDGETS, {}, [])
    assert v["a-f16"].verdict == "unjudged"


def test_a_cell_whose_accuracy_was_not_measured_is_never_ok():
    """Fast and small is not "ok": a spec that measures only speed (or nothing) has shown no
    accuracy, so its cells are unjudged, and "slow+unjudged" when a budget was missed."""
    fast = Figures("a-f16", "a", "f16", **FAST)
    v = judge([fast], BUDGETS, {}, [])["a-f16"]
    assert v.verdict == "unjudged"
    assert v.reasons == ["accuracy not measured: add evaluate to the spec's measure list"]
    nothing = Figures("a-f16", "a", "f16")
    assert judge([nothing], BudgetSpec(), {}, [])["a-f16"].verdict == "unjudged"
    slow = Figures("a-f16", "a", "f16", **{**FAST, "decode_rates": [30.0] * 12})
    assert judge([slow], BUDGETS, {}, [])["a-f16"].verdict == "slow+unjudged"


def test_a_relative_decode_budget_reads_the_f16_of_the_same_run():
    """decode_speedup_min 1.5: the F16 is slow against itself, a level 1.8x faster meets it,
    whatever the CPU's absolute speed."""
    budgets = BUDGETS.model_copy(update={"decode_tps_min": None, "decode_speedup_min": 1.5})
    fast = {**FAST, "decode_rates": [r * 1.8 for r in FAST["decode_rates"]]}
    cells = [cell("a", "f16", **FAST), cell("a", "q4_k_m", **fast)]
    refs = {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}
    v = judge(cells, budgets, refs, ["arith"])
    assert v["a-f16"].verdict == "slow"
    assert v["a-f16"].reasons[0].startswith("decode p50 (1.5x f16's 50) 50 [")
    assert v["a-q4_k_m"].verdict == "ok"


def test_ttft_p95_is_judged_on_its_bounds_not_on_the_slowest_request():
    """p95 of 12 requests is the slowest one: it can show a budget missed, never met."""
    slow, unjudged = slow_reasons(cell("a", "q8_0", **{**FAST, "ttft_ms": [900.0] * 12}), BUDGETS)
    assert any(r.startswith("TTFT 900 [900, -] ms (p95 of 12") for r in slow) and not unjudged
    slow, unjudged = slow_reasons(cell("a", "q8_0", **{**FAST, "ttft_ms": [100.0] * 12}), BUDGETS)
    assert not slow and any("too few to bound; 59 would" in r for r in unjudged)
    assert slow_reasons(cell("a", "q8_0", **FAST), BUDGETS) == ([], [])


def setting(level: str, name: str, right: int, rescored: bool = True, **kw) -> Figures:
    """Adapter a's `level` GGUF served at the serving setting `name`."""
    fig = cell("a", f"{level}-{name}", right, **kw)
    fig.setting, fig.rescored = name, rescored
    return fig


def test_a_serving_setting_is_judged_through_its_level_at_the_spec_own_setting():
    """The chain of a setting that can change answers ends in a serving link from the same
    level at the spec's own setting; a cache that loses answers is stupid (serving), and the
    quantization link is the level's own, not the setting's."""
    cells = [
        cell("a", "f16", 210, **FAST),
        cell("a", "q8_0", 210, **FAST),
        setting("q8_0", "kv_q8_0", 210, **FAST),
        setting("q8_0", "kv_q4_0", 150, **FAST),
        setting("f16", "ctx8192", 210, rescored=False, **FAST),
    ]
    references = {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}
    v = judge(cells, BUDGETS, references, ["arith"])
    steps = [link.step for link in v["a-q8_0-kv_q8_0"].links]
    assert steps == ["training", "export", "quantization", "serving", "end to end"]
    assert v["a-q8_0-kv_q8_0"].verdict == "ok"
    assert v["a-q8_0-kv_q4_0"].verdict == "stupid (serving)"
    quantization = next(li for li in v["a-q8_0-kv_q4_0"].links if li.step == "quantization")
    assert quantization.state == "held", "the level itself lost nothing"
    # context cannot change answers: no serving link, and F16 has no quantization link
    assert [li.step for li in v["a-f16-ctx8192"].links] == ["training", "export", "end to end"]
    assert v["a-f16-ctx8192"].verdict == "ok"


def test_a_setting_speed_is_judged_against_the_f16_served_the_same_way():
    """decode_speedup_min compares a setting's decode with its F16 at the same setting: one
    thread is not slow for being slower than two."""
    budgets = BudgetSpec(decode_speedup_min=1.2, tolerance=0.05)
    slow_f16 = {**FAST, "decode_rates": [20.0] * 12}
    fast_q8 = {**FAST, "decode_rates": [30.0] * 12}
    cells = [
        cell("a", "f16", 210, **FAST),
        cell("a", "q8_0", 210, **{**FAST, "decode_rates": [70.0] * 12}),
        setting("f16", "t1", 210, rescored=False, **slow_f16),
        setting("q8_0", "t1", 210, rescored=False, **fast_q8),
    ]
    references = {"base": hf("untuned HF", 180), "a": hf("tuned HF", 210)}
    v = judge(cells, budgets, references, ["arith"])
    assert v["a-q8_0-t1"].verdict == "ok", v["a-q8_0-t1"].reasons
    assert v["a-q8_0"].verdict == "ok"


def test_a_load_budget_is_judged_on_the_requests_at_its_users():
    budgets = BudgetSpec.model_validate(
        {"load": {"users": 2, "decode_tps_min": 40, "ttft_ms_p95_max": 800}, "tolerance": 0.05}
    )
    met = Figures("x", "a", "q8_0", load=Loaded([50.0] * 12, [100.0] * 60))
    assert slow_reasons(met, budgets) == ([], [])
    missed = Figures("x", "a", "q8_0", load=Loaded([20.0] * 12, [100.0] * 60))
    slow, _ = slow_reasons(missed, budgets)
    assert len(slow) == 1 and "decode per user at 2 users" in slow[0]
    unmeasured = Figures("x", "a", "q8_0")
    slow, unjudged = slow_reasons(unmeasured, budgets)
    assert not slow and len(unjudged) == 2 and "at 2 users not measured" in unjudged[0]


def test_goodput_is_the_share_of_requests_within_both_targets_with_exact_bounds():
    """A request counts only when its TTFT and its time per output token both meet their
    targets; the share is judged by its Clopper-Pearson bounds, so 12 of 12 cannot show
    0.9 (its lower bound is 0.05 ** (1 / 12) = 0.78) while 60 of 60 can."""
    assert share_bounds(12, 12, 0.95)[0] == pytest.approx(0.05 ** (1 / 12))
    assert share_bounds(0, 12, 0.95)[1] == pytest.approx(1 - 0.05 ** (1 / 12))
    budgets = BudgetSpec.model_validate(
        {"load": {"rate": 2, "goodput": {"share_min": 0.9, "ttft_ms_max": 500, "tpot_ms_max": 50}}}
    )

    def verdict_on(ttft: list[float], tpot: list[float]) -> tuple[list[str], list[str]]:
        return slow_reasons(Figures("x", "a", "q8_0", load=Loaded([], ttft, tpot)), budgets)

    assert verdict_on([100.0] * 60, [20.0] * 60) == ([], [])
    _, unjudged = verdict_on([100.0] * 12, [20.0] * 12)
    assert len(unjudged) == 1 and "goodput at 2 requests/s 12/12" in unjudged[0]
    # each request meets one target and misses the other: none counts
    slow, _ = verdict_on([100.0, 900.0] * 30, [90.0, 20.0] * 30)
    assert len(slow) == 1 and "0/60" in slow[0] and "TTFT <= 500 ms and TPOT <= 50 ms" in slow[0]
    _, unjudged = verdict_on([], [])
    assert unjudged == ["goodput at 2 requests/s not measured (budget 0.9)"]


@pytest.mark.parametrize(
    ("load", "said"),
    [
        ({"decode_tps_min": 4}, "name the load as users"),
        ({"users": 2, "rate": 1, "decode_tps_min": 4}, "name the load as users"),
        ({"users": 2}, "name decode_tps_min, ttft_ms_p95_max or goodput"),
        ({"users": 2, "goodput": {"share_min": 0.9}}, "name ttft_ms_max or tpot_ms_max"),
    ],
)
def test_a_load_budget_names_one_load_and_something_to_hold(load, said):
    with pytest.raises(ValueError, match=said):
        BudgetSpec.model_validate({"load": load})
