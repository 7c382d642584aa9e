"""Verdict logic on constructed figures: the blame chain, slow, broken, and every way a
verdict fails closed (unjudged, never ok, when something was not measured)."""

from __future__ import annotations

import pytest

from harness.blame import mcnemar, needed_losses
from harness.errors import ForgebenchError
from harness.spec import BudgetSpec
from harness.verdict import Figures, Scores, judge


def items(n_right: int, n: int = 100) -> dict[str, bool]:
    """n items, the first `n_right` of them correct."""
    return {str(i): i < n_right for i in range(n)}


def cell(adapter: str, level: str, right: int = 70, guard: int | None = None, **kw) -> Figures:
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
    decode_tps_min=40,
    ttft_ms_p95_max=800,
    memory_mb_max=1024,
    accuracy_drop_max=0.03,
    significance=0.05,
)
FAST = {"decode_tps": 50.0, "ttft_ms_p95": 100.0, "memory_mb": 300.0}


def chain(base_hf=60, tuned_hf=70, f16=70, levels=(("q8_0", 70),), base_cells=True, **kw):
    """An untuned base (HF and served) and adapter a (HF, F16, levels), all measured."""
    cells = [cell("a", "f16", f16, **FAST), *[cell("a", q, r, **FAST) for q, r in levels]]
    if base_cells:
        cells += [cell("base", "f16", base_hf, **FAST), cell("base", "q8_0", base_hf, **FAST)]
    references = {"base": hf("untuned HF", base_hf), "a": hf("tuned HF", tuned_hf)}
    return judge(cells, kw.pop("budgets", BUDGETS), references, ["arith"], **kw)


def test_mcnemar_counts_only_disagreements():
    lost, gained, p = mcnemar(items(70), items(50))
    assert (lost, gained) == (20, 0)
    assert p == pytest.approx(2 * 0.5**20)
    assert mcnemar(items(70), items(70)) == (0, 0, 1.0)


def test_the_fewest_losses_that_can_count():
    # two-sided exact p of m losses and no gains is 2 * 0.5**m: 5 -> 0.0625, 6 -> 0.031
    assert needed_losses(100, 0.03, 0.05) == 6
    assert needed_losses(1000, 0.03, 0.05) == 31  # now the budget binds: more than 3%


def test_a_sound_chain_is_ok_and_says_what_it_could_detect():
    v = chain()
    assert v["a-q8_0"].verdict == "ok" and v["a-f16"].verdict == "ok"
    assert any("could show drops >= 0.06" in note for note in v["a-q8_0"].notes)
    assert [link.step for link in v["a-q8_0"].links] == ["training", "export", "quantization"]
    assert v["a-q8_0"].chain == {
        "chain_hf_base_arith": 0.6,
        "chain_hf_tuned_arith": 0.7,
        "chain_f16_arith": 0.7,
    }


def test_each_step_is_blamed_for_its_own_loss():
    training = chain(base_hf=70, tuned_hf=50, f16=50, levels=(("q8_0", 50),))
    assert {training[c].verdict for c in ("a-f16", "a-q8_0")} == {"stupid (training)"}
    assert "training: lost 20, gained 0" in training["a-f16"].reasons[0]
    export = chain(tuned_hf=70, f16=50, levels=(("q8_0", 50),))
    assert export["a-f16"].verdict == "stupid (export)"
    assert export["a-q8_0"].verdict == "stupid (export)"  # and quantization lost nothing more
    quantization = chain(levels=(("q2_k", 40),))
    assert quantization["a-f16"].verdict == "ok"
    assert quantization["a-q2_k"].verdict == "stupid (quantization)"


def test_a_drop_that_chance_explains_is_not_stupid():
    near = {**items(70), "0": False, "1": False, "99": True}  # lost 2, gained 1
    cells = [cell("a", "f16", 70, **FAST), cell("a", "q4_0", 70, **FAST)]
    cells[1].items["arith"] = near
    refs = {"base": hf("untuned HF", 60), "a": hf("tuned HF", 70)}
    v = judge(cells, BudgetSpec(accuracy_drop_max=0.0), refs, ["arith"])
    assert v["a-q4_0"].verdict == "ok"


def test_forgetting_a_guard_task_is_blamed_on_training():
    cells = [cell("a", "f16", 70, guard=30, **FAST)]
    refs = {"base": hf("untuned HF", 0, guard=65), "a": hf("tuned HF", 70, guard=30)}
    v = judge(cells, BUDGETS, refs, ["arith", "caps"], guard=["caps"])
    assert v["a-f16"].verdict == "stupid (training: forgetting)"
    # the untuned base cannot do arith at all: training cannot have lost on it
    assert any(link.state == "n/a" for link in v["a-f16"].links if link.task == "arith")


def test_a_guard_task_the_base_cannot_do_is_unjudged():
    cells = [cell("a", "f16", 70, guard=0, **FAST)]
    refs = {"base": hf("untuned HF", 60, guard=2), "a": hf("tuned HF", 70, guard=0)}
    v = judge(cells, BUDGETS, refs, ["arith", "caps"], guard=["caps"])
    assert v["a-f16"].verdict == "unjudged"
    assert "at the floor" in "; ".join(v["a-f16"].reasons)


def test_a_reference_at_the_floor_judges_nothing():
    v = chain(base_hf=0)  # the untuned base scores 0 everywhere
    assert v["base-q8_0"].verdict == "unjudged"
    assert v["base-f16"].verdict == "unjudged"
    assert "nothing could be detected" in v["base-q8_0"].reasons[0]
    assert v["a-q8_0"].verdict == "ok"  # the tuned chain has something to lose


def test_a_missing_or_failed_reference_is_unjudged():
    cells = [cell("a", "f16", 70, **FAST), cell("a", "q8_0", 70, **FAST)]
    missing = judge(cells, BUDGETS, {"base": hf("untuned HF", 60)}, ["arith"])
    assert {v.verdict for v in missing.values()} == {"unjudged"}
    failed = {"base": hf("untuned HF", 60), "a": Scores("tuned HF", error="reference failed")}
    v = judge(cells, BUDGETS, failed, ["arith"])
    assert v["a-q8_0"].verdict == "unjudged" and "reference failed" in v["a-q8_0"].reasons[0]


def test_a_quantized_cell_whose_f16_broke_is_unjudged_not_ok():
    cells = [
        cell("a", "f16", 70, status="broken", error="check: did not stop"),
        cell("a", "q8_0", 70, **FAST),
    ]
    v = judge(cells, BUDGETS, {"base": hf("untuned HF", 60), "a": hf("tuned HF", 70)}, ["arith"])
    assert v["a-f16"].verdict == "broken" and v["a-f16"].reasons == ["check: did not stop"]
    assert v["a-q8_0"].verdict == "unjudged"


def test_items_that_do_not_pair_up_are_unjudged():
    cells = [cell("a", "f16", 70, **FAST), cell("a", "q8_0", 70, **FAST)]
    cells[1].items["arith"] = {f"other-{i}": True for i in range(100)}
    v = judge(cells, BUDGETS, {"base": hf("untuned HF", 60), "a": hf("tuned HF", 70)}, ["arith"])
    assert v["a-q8_0"].verdict == "unjudged" and "share no items" in v["a-q8_0"].reasons[0]


def test_slow_is_judged_on_the_slow_tail_and_a_missing_figure_is_unjudged():
    v = chain(levels=(("q8_0", 70),))
    assert v["a-q8_0"].verdict == "ok"
    cells = [cell("a", "f16", 70, **FAST), cell("a", "q8_0", 40, **{**FAST, "decode_tps": 30})]
    refs = {"base": hf("untuned HF", 60), "a": hf("tuned HF", 70)}
    both = judge(cells, BUDGETS, refs, ["arith"])["a-q8_0"]
    assert both.verdict == "slow+stupid (quantization)"
    assert both.reasons[0] == "decode p5 30 tok/s < 40"
    cells[1] = cell("a", "q8_0", 70, **{**FAST, "memory_mb": None})
    unmeasured = judge(cells, BUDGETS, refs, ["arith"])["a-q8_0"]
    assert unmeasured.verdict == "unjudged" and unmeasured.reasons[0].startswith("memory not")


def test_the_kld_budget_blames_quantization_and_needs_its_figure():
    budgets = BUDGETS.model_copy(update={"kld_max": 0.1})
    cells = [cell("a", "f16", 70, **FAST), cell("a", "q2_k", 70, kld_mean=0.4, **FAST)]
    refs = {"base": hf("untuned HF", 60), "a": hf("tuned HF", 70)}
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
    slow = Figures("a-f16", "a", "f16", **{**FAST, "decode_tps": 30})
    assert judge([slow], BUDGETS, {}, [])["a-f16"].verdict == "slow+unjudged"
