"""The figures the release gate and `best` decide on, and how they decide, on constructed
runs: nearest-rank percentiles and the slow tail, the gate's tolerances, every way it fails
closed (not measured, not comparable, not done, not ok, scored on other items), and `best`
walking the levels largest first and never shipping a cell whose verdict is not "ok"."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from harness import track
from harness.cli import app
from harness.errors import InputError
from harness.judge import gate
from harness.judge.best import choose
from harness.stages.bench import percentile, summarise
from harness.track.reader import RunView, item_key

MACHINE = "ci-1: AMD EPYC, 2 cores, x86_64"
TOL = gate.Tolerances()


def run(
    name: str = "cand",
    metrics: dict[str, float] | None = None,
    **tags: str | None,
) -> RunView:
    """A finished cell judged ok, benched on MACHINE; keyword tags override (None drops)."""
    base = {
        "forgebench.cell": name,
        "forgebench.status": "done",
        "forgebench.verdict": "ok",
        "forgebench.machine": MACHINE,
    }
    for key, value in tags.items():
        base[f"forgebench.{key}"] = value
    return RunView(
        run_id=f"id-{name}",
        name=name,
        run_status="FINISHED",
        params={},
        metrics={"decode_tps_p50": 100.0, "memory_mb": 500.0} if metrics is None else metrics,
        tags={k: v for k, v in base.items() if v is not None},
        loss=[],
    )


def items(right: int, wrong: int, start: int = 0) -> dict[str, bool]:
    return {str(start + i): i < right for i in range(right + wrong)}


SAME = {"sums": items(80, 20)}


def check(candidate=None, baseline=None, cand_items=None, base_items=None, **kw):
    return gate.compare(
        candidate or run(),
        baseline or run("base"),
        SAME if cand_items is None else cand_items,
        SAME if base_items is None else base_items,
        kw.pop("tol", TOL),
        **kw,
    )


# -- figures ------------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 50) == 10  # ceil(10) = 10th, not an average of 10 and 11
    assert percentile(values, 95) == 19  # ceil(19) = 19th
    assert percentile(values, 5) == 1  # ceil(1) = 1st
    assert percentile(values, 52.5) == 11  # ceil(10.5) = 11th: half rounds up, not to even
    assert percentile(values, 47.5) == 10  # ceil(9.5) = 10th
    assert percentile(list(range(60)), 5) == 2  # ceil(3) = 3rd, though 5/100*60 > 3 in floats
    assert percentile([7.0], 5) == percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_every_throughput_has_its_slow_tail():
    """Six requests, one slow: p5 of a throughput and p95 of TTFT are that request."""
    samples = [
        {"ttft_s": 0.1, "stream_tps": 50.0, "prefill_tps": 500.0, "decode_tps": 60.0}
        for _ in range(5)
    ] + [{"ttft_s": 0.9, "stream_tps": 5.0, "prefill_tps": 40.0, "decode_tps": 6.0}]
    figures = summarise(samples)
    assert figures["decode_tps_p5"] == 6.0 and figures["decode_tps_p50"] == 60.0
    assert figures["stream_tps_p5"] == 5.0 and figures["prefill_tps_p5"] == 40.0
    assert figures["ttft_ms_p95"] == 900.0 and figures["ttft_ms_p50"] == 100.0
    assert not [name for name in figures if name.endswith("tps_p95")]  # no fast tail
    assert figures["bench_requests"] == 6


# -- tolerances -----------------------------------------------------------------------------


def test_no_worse_build_passes():
    result = check()
    assert result.passed, result.failures
    assert result.markdown(run(), run("base")).startswith("## forgebench check: PASS")


def test_accuracy_drop_surely_beyond_tolerance_regresses():
    worse = {"sums": items(50, 50)}  # 30 items lost, none gained
    result = check(cand_items=worse)
    assert not result.passed
    assert [r.split(":")[0] for r in result.regressions] == ["sums"]
    assert result.refusals == []
    text = result.markdown(run(), run("base"))
    assert "sums: regressed: drop +0.300 [" in text.split("Regressions:")[1]


def test_a_drop_chance_could_explain_is_not_shown_within_tolerance_and_fails():
    """10 items, 3 lost and 1 gained: not significant, and not shown to be small either;
    the gate passes only what it showed."""
    base = {"sums": {str(i): i < 8 for i in range(10)}}
    cand = {"sums": {str(i): i < 5 or i == 9 for i in range(10)}}
    result = check(cand_items=cand, base_items=base)
    assert not result.passed
    assert result.regressions[0].startswith("sums: not shown within tolerance: drop +0.200")


def test_significant_accuracy_drop_within_tolerance_passes():
    """1000 items, 15 lost: p is tiny but 0.015 is surely below the tolerance 0.05."""
    base = {"sums": items(800, 200)}
    cand = {"sums": {k: v and int(k) >= 15 for k, v in base["sums"].items()}}
    assert check(cand_items=cand, base_items=base).passed
    strict = gate.Tolerances(tolerance=0.01)
    assert not check(cand_items=cand, base_items=base, tol=strict).passed


def test_a_candidate_scored_on_other_items_is_refused():
    """Eight of ten items the same, two others: pairing the shared eight would judge a
    candidate on a different eval set; the gate refuses it in one line."""
    cand = {"sums": {**{str(i): True for i in range(8)}, "x1": True, "x2": True}}
    base = {"sums": {str(i): True for i in range(10)}}
    result = check(cand_items=cand, base_items=base)
    assert not result.passed
    (refusal,) = result.refusals
    assert refusal.startswith("sums: the candidate was scored on other items (2 of its 10")


def test_items_pair_by_content_not_by_position():
    """The same questions in another order pair up; another question at the same doc id
    does not."""
    rows = [{"doc_id": 0, "prompt": [{"role": "user", "content": "1+1"}], "target": "2"}]
    moved = [{**rows[0], "doc_id": 7}]
    other = [{"doc_id": 0, "prompt": [{"role": "user", "content": "2+2"}], "target": "4"}]
    assert item_key(rows[0]) == item_key(moved[0])
    assert item_key(rows[0]) != item_key(other[0])


@pytest.mark.parametrize(
    ("decode", "memory", "passed"),
    [
        (90.0, 500.0, True),  # -10% is the limit itself
        (89.0, 500.0, False),
        (100.0, 550.0, True),  # +10%
        (100.0, 551.0, False),
        (200.0, 100.0, True),  # faster and smaller
    ],
)
def test_speed_and_memory_tolerances(decode, memory, passed):
    result = check(candidate=run(metrics={"decode_tps_p50": decode, "memory_mb": memory}))
    assert result.passed is passed, result.failures
    assert result.refusals == []


# -- fails closed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cand_metrics", "base_metrics", "figure"),
    [
        ({"memory_mb": 500.0}, None, "decode"),
        (None, {"memory_mb": 500.0}, "decode"),
        ({"decode_tps_p50": 0.0, "memory_mb": 500.0}, None, "decode"),
        ({"decode_tps_p50": float("nan"), "memory_mb": 500.0}, None, "decode"),
        ({"decode_tps_p50": 100.0}, None, "memory"),
        (None, {"decode_tps_p50": 100.0}, "memory"),
    ],
)
def test_a_figure_not_measured_fails_unless_skipped(cand_metrics, base_metrics, figure):
    cand, base = run(metrics=cand_metrics), run("base", metrics=base_metrics)
    result = check(cand, base)
    assert not result.passed and result.regressions == []
    assert [r for r in result.refusals if r.startswith(f"{figure}: ")], result.refusals
    assert f"--skip {figure}" in result.refusals[0]
    skipped = check(cand, base, skip=frozenset({figure}))
    assert skipped.passed, skipped.failures
    assert f"skipped (--skip {figure})" in skipped.markdown(cand, base)


@pytest.mark.parametrize(
    ("cand_items", "base_items"),
    [
        ({}, SAME),  # candidate has no per-item samples
        (SAME, {}),  # baseline has none
        ({}, {}),
        ({"sums": items(8, 2, start=100)}, SAME),  # scored on other items
        ({"other": items(8, 2)}, SAME),  # baseline's task missing on the candidate
        (SAME, {"sums": SAME["sums"], "other": items(8, 2)}),  # one of two missing
    ],
)
def test_accuracy_without_paired_items_fails_unless_skipped(cand_items, base_items):
    result = check(cand_items=cand_items, base_items=base_items)
    assert not result.passed and result.regressions == []
    assert [r for r in result.refusals if "--skip accuracy" in r], result.refusals
    assert check(cand_items=cand_items, base_items=base_items, skip={"accuracy"}).passed


def test_a_task_only_the_candidate_has_is_shown_not_failed():
    cand = {"sums": SAME["sums"], "new": items(5, 5)}
    result = check(cand_items=cand)
    assert result.passed, result.failures
    assert ("new accuracy", "10 items", "", "no baseline") in result.rows


@pytest.mark.parametrize(
    ("tags", "says"),
    [
        ({"status": "failed"}, "candidate status is 'failed', not 'done'"),
        ({"status": None}, "candidate status is None"),
        ({"verdict": "broken (template)"}, "candidate verdict is 'broken (template)', not 'ok'"),
        ({"verdict": "broken"}, "candidate verdict is 'broken', not 'ok': why"),
        ({"verdict": "unjudged"}, "candidate verdict is 'unjudged', not 'ok': why"),
        ({"verdict": "slow"}, "candidate verdict is 'slow', not 'ok': why; --accept 'slow'"),
        ({"verdict": "stupid (quantization)"}, "candidate verdict is 'stupid (quantization)'"),
        ({"verdict": "slow+stupid (training: forgetting)"}, "candidate verdict is 'slow+"),
        ({"verdict": None}, "candidate has no verdict"),
    ],
)
def test_a_candidate_not_done_or_not_ok_fails(tags, says):
    candidate = run(**tags, verdict_reasons="why")
    result = check(candidate)
    assert not result.passed
    assert [r for r in result.refusals if r.startswith(says)], result.refusals
    assert "Cannot pass:" in result.markdown(candidate, run("base"))
    # skipping figures does not skip the candidate's own state
    assert not check(candidate, skip={"decode", "memory"}).passed


def test_accept_releases_exactly_the_verdicts_it_names():
    slow = run(verdict="slow")
    accepting = gate.Tolerances(accept=frozenset({"slow"}))
    assert check(slow, tol=accepting).passed
    assert not check(run(verdict="slow+stupid (quantization)"), tol=accepting).passed
    assert check(run(verdict="ok")).passed


@pytest.mark.parametrize(
    ("cand_machine", "base_machine"),
    [("ci-2: AMD EPYC, 2 cores, x86_64", MACHINE), (None, MACHINE), (MACHINE, None), (None, None)],
)
def test_speed_and_memory_from_two_machines_are_not_compared(cand_machine, base_machine):
    cand, base = run(machine=cand_machine), run("base", machine=base_machine)
    result = check(cand, base)
    assert not result.passed
    assert sorted(r.split(":")[0] for r in result.refusals) == ["decode", "memory"]
    assert ("decode tok/s (p50)", "100.0", "100.0", "not comparable") in result.rows
    assert not check(cand, base, skip={"decode"}).passed
    only_accuracy = check(cand, base, skip={"decode", "memory"})
    assert only_accuracy.passed, only_accuracy.failures


def test_memory_from_the_two_backends_is_not_compared():
    ollama = run(metrics={"decode_tps_p50": 100.0, "ollama_ps_size_mb": 400.0})
    result = check(ollama, run("base"))
    assert not result.passed
    assert "the candidate reports ollama_ps_size_mb, the baseline memory_mb" in (result.refusals[0])
    both = check(ollama, run("base", metrics={"decode_tps_p50": 100.0, "ollama_ps_size_mb": 300}))
    assert both.regressions == ["memory MB (ollama_ps_size_mb): 400.0 vs 300.0 (+33.3%)"]


def test_every_check_is_reported_not_only_the_first():
    candidate = run(metrics={"memory_mb": 900.0}, status="failed")
    result = check(candidate, cand_items={"sums": items(40, 60)})
    assert [r.split(":")[0] for r in result.refusals] == [
        "candidate status is 'failed', not 'done'",
        "decode",
    ]
    assert [r.split(":")[0] for r in result.regressions] == ["sums", "memory MB (memory_mb)"]


def test_skip_takes_only_the_gate_s_figures():
    with pytest.raises(InputError, match="--skip speed: not a figure"):
        check(skip={"speed"})
    with pytest.raises(InputError, match="compare nothing"):
        check(skip=set(gate.FIGURES))


def test_check_command_takes_skip_repeated(monkeypatch):
    views = {"c": run(metrics={"memory_mb": 500.0}, machine="other"), "b": run("base")}
    monkeypatch.setattr(track, "run_of", lambda uri, ref: ref)
    monkeypatch.setattr(track, "run_view", lambda uri, run_id: views[run_id])
    monkeypatch.setattr(track, "samples", lambda uri, run_id: SAME)
    command = ["check", "--candidate", "c", "--baseline", "b", "--tracking-uri", "sqlite://"]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 1 and "Cannot pass:" in refused.output
    passed = CliRunner().invoke(app, [*command, "--skip", "decode", "--skip", "memory"])
    assert passed.exit_code == 0, passed.output
    bad = CliRunner().invoke(app, [*command, "--skip", "speed"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "error: --skip speed: not a figure the gate compares; known: accuracy, decode, memory"
    ]


# -- best -----------------------------------------------------------------------------------


def row(quant: str, verdict: str, size: float, status: str = "done", reasons: str = "") -> RunView:
    tags = {
        "forgebench.cell": f"main-{quant}",
        "forgebench.adapter": "main",
        "forgebench.quant": quant,
        "forgebench.status": status,
        "forgebench.verdict": verdict,
        "forgebench.verdict_reasons": reasons,
    }
    metrics = {"gguf_mb": size, "decode_tps_p50": 1000 / size}
    return RunView(f"id-{quant}", f"main-{quant}", "FINISHED", {}, metrics, tags)


def test_best_never_picks_a_cell_not_judged_ok():
    rows = [
        row("f16", "ok", 300.0),
        row("q8_0", "ok (see notes)", 160.0),
        row("q4_k_m", "unjudged", 100.0, reasons="no F16 accuracy to compare to"),
        row("q4_0", "", 90.0),
        row("q2_k", "ok", 60.0, status="failed"),
    ]
    for by in ("size", "speed"):
        [choice] = choose(rows, by)
        assert choice.row is not None and choice.row.cell == "main-f16", (by, choice.why)
        assert "among the 1 cells judged ok" in choice.why


def test_no_cell_ok_lists_every_cell_s_verdict_and_reasons():
    rows = [
        row("q8_0", "unjudged", 160.0, reasons="accuracy not measured"),
        row("q4_k_m", "stupid (quantization)", 100.0, reasons="accuracy 0.41 < 0.60"),
        row("q2_k", "broken (template)", 60.0, status="broken", reasons="no end-of-turn"),
        row("q4_0", "", 90.0),
    ]
    [choice] = choose(rows)
    assert choice.row is None
    assert choice.why == (
        "no cell is ok: main-q8_0: unjudged: accuracy not measured; "
        "main-q4_k_m: stupid (quantization): accuracy 0.41 < 0.60; "
        "main-q2_k: broken (template) (status broken): no end-of-turn; "
        "main-q4_0: no verdict: no reasons recorded"
    )


def test_best_walks_the_levels_largest_first_and_stops_at_the_first_not_shown():
    """A slow F16 does not stop the walk (its accuracy held); an unjudged q4_k_m does, so the
    smaller q2_k, ok on its own, is not shipped: the pick keeps the stated confidence."""
    rows = [
        row("q2_k", "ok", 60.0),
        row("f16", "slow", 300.0),
        row("q4_k_m", "unjudged", 100.0, reasons="straddles tolerance"),
        row("q8_0", "ok", 160.0),
    ]
    [choice] = choose(rows)
    assert choice.row.cell == "main-q8_0", choice.why
    assert "walking the levels largest first" in choice.why
    [none] = choose([row("f16", "unjudged", 300.0), row("q2_k", "ok", 60.0)])
    assert none.row is None
    assert none.why.startswith("no cell is ok before the walk from the largest level stops")


def test_the_gate_judges_by_the_candidate_spec_s_tolerance_unless_told():
    """The candidate was judged ok with tolerance 0.3 on sums: the gate uses the same rule
    (a 0.2 drop on 100 items passes), and --tolerance overrides it."""
    base = {"sums": items(80, 20)}
    cand = {"sums": {k: v and int(k) >= 20 for k, v in base["sums"].items()}}
    loose = run(
        metrics={"decode_tps_p50": 100.0, "memory_mb": 500.0, "link_e2e_sums_tolerance": 0.3}
    )
    assert check(loose, cand_items=cand, base_items=base).passed
    told = gate.Tolerances(tolerance=0.05)
    assert not check(loose, cand_items=cand, base_items=base, tol=told).passed
