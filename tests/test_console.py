"""The closing table of `forgebench run`, on a run summary built here: per cell the verdict
with the step that lost quality, the primary accuracy, decode speed, size and run id, one line
per cell however long the reasons; the seconds per stage in a table of their own (`--times`)."""

from __future__ import annotations

from rich.console import Console

from harness.cli.console import REASONS_WIDTH, summary_table, times_table
from harness.judge.verdict import Verdict
from harness.run.outcomes import CellResult, Outcome, RunSummary

LONG = (
    "quantization: arithmetic 0.450 vs F16 0.800 (lost 31, gained 3, p=2e-06); "
    "general 0.500 vs F16 0.600 (lost 12, gained 2, p=0.004); the tail end of a long reason"
)


def result(name: str, status: str = "done", error: str | None = None, **metrics) -> CellResult:
    adapter, quant = name.rsplit("-", 1)
    stages = {
        "train": Outcome("k-train", cached=True, seconds=61.0),
        "quantize": Outcome("k-quant", cached=False, seconds=4.25),
        "evaluate": Outcome("k-eval", cached=False, seconds=12.5, metrics=metrics),
    }
    return CellResult(
        name, adapter, quant, status, stages, gguf_bytes=100 * 2**20, error=error, run_id=name * 4
    )


def summary(verdicts: dict[str, Verdict], error: str | None = None) -> RunSummary:
    cells = [
        result("main-f16", accuracy_arithmetic=0.8, decode_tps_p50=41.25),
        result("main-q2_k", accuracy_arithmetic=0.45, decode_tps_p50=88.0),
        result("main-q4_k_m", "failed", error="quantize: llama-quantize [exit 1] out of disk"),
    ]
    return RunSummary("exp", cells, {}, "sqlite:///x.db", "p" * 32, "/store", verdicts, error)


def render(table, width: int = 160) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def line_of(lines: list[str], cell: str) -> str:
    (line,) = [li for li in lines if cell in li]
    return line


VERDICTS = {
    "main-f16": Verdict("main-f16", "ok"),
    "main-q2_k": Verdict("main-q2_k", "stupid (quantization)", [LONG]),
    "main-q4_k_m": Verdict("main-q4_k_m", "broken", ["quantize failed"]),
}


def test_each_cell_shows_verdict_with_step_accuracy_speed_size_and_run():
    lines = render(summary_table(summary(VERDICTS), "arithmetic"))
    ok = line_of(lines, "main-f16")
    assert " ok " in ok and "0.800" in ok and "41.2" in ok and "100.0" in ok
    assert ("main-f16" * 4)[:8] in ok
    stupid = line_of(lines, "main-q2_k")
    assert "stupid (quantization)" in stupid and "0.450" in stupid and "88.0" in stupid
    assert any("arithmetic" in li for li in lines[:4]), "the accuracy column names its task"
    assert not any("61.0" in li or "resolve" in li for li in lines), "seconds only with --times"


def test_long_reasons_are_cut_to_one_line_with_an_ellipsis():
    for width in (160, 100):
        lines = render(summary_table(summary(VERDICTS), "arithmetic"), width)
        stupid = line_of(lines, "main-q2_k")
        assert "quantizati" in stupid and "…" in stupid, "a narrow terminal cuts it further"
        assert not any("tail end" in li for li in lines), "the rest is in MLflow, not wrapped"
        # the row is one line: the line under it is the next cell's (or the border)
        below = lines[lines.index(stupid) + 1]
        assert "main-q4_k_m" in below or set(below.strip()) <= set("─━┈└┘┴╵│ ")
    wide = line_of(render(summary_table(summary(VERDICTS), "arithmetic"), 300), "main-q2_k")
    assert LONG[: REASONS_WIDTH - 1] + "…" in wide, "cut to REASONS_WIDTH even with room"


def test_times_table_has_the_seconds_per_stage_cached_marked():
    lines = render(times_table(summary(VERDICTS)))
    header = next(li for li in lines if "train" in li)
    assert "quantize" in header and "evaluate" in header
    assert "drift_base" not in header and "load" not in header, "only stages some cell ran"
    row = line_of(lines, "main-f16")
    assert "61.0*" in row and "4.2" in row and "12.5" in row


def test_a_cell_nobody_judged_says_unjudged_and_why():
    """No verdict is never shown as ok: the run could not be judged, and the table says why."""
    lines = render(summary_table(summary({}, "no f16 cell to judge against"), "arithmetic"))
    row = line_of(lines, "main-f16")
    assert "unjudged" in row and "no f16 cell to judge against" in row
    failed = line_of(lines, "main-q4_k_m")
    assert "failed" in failed and "[exit 1]" in failed, "an error's brackets are not markup"


def test_a_load_run_shows_its_highest_aggregate_and_where_it_came():
    """A run that measured no bench (measure: [load]) still shows its speed: the load's
    highest aggregate tok/s and the concurrency it came at; the column is there only
    when some cell ran the load."""
    plain = summary({})
    assert "load tok/s" not in "\n".join(render(summary_table(plain, "arithmetic")))
    cell = plain.cells[0]
    cell.stages["load"] = Outcome(
        "k-load",
        cached=False,
        seconds=20.0,
        metrics={"load_c1_agg_tps": 40.0, "load_c2_agg_tps": 71.5, "load_c4_agg_tps": 66.0},
    )
    lines = render(summary_table(plain, "arithmetic"))
    assert "load tok/s" in "\n".join(lines)
    assert "72 @c2" in line_of(lines, "main-f16")
    assert " - " in line_of(lines, "main-q2_k").split("88.0")[1], "no load, no figure"


SPEC = """\
name: viewed
base: {model: smollm2-135m}
data: {task: arithmetic, n_train: 40, n_eval: 20}
lora: [{name: a, r: 4, alpha: 8, target_modules: [q_proj]}]
quant: [q8_0]
control: false
evaluate: {tasks: [arithmetic], guard: [capitals]}
budgets: {tolerance: 0.3}
tracking: {uri: "sqlite:///%s"}
"""


def logged(tmp_path, capfd):
    """A spec's first invocation on a new sqlite store, outside any git checkout: one cell
    logged and judged, as `forgebench run` logs it; (uri, the cell's name, the console)."""
    from harness import spec, track
    from harness.plan import cells as planning

    path = tmp_path / "viewed.yaml"
    path.write_text(SPEC % (tmp_path / "mlflow.db"))
    loaded = spec.load(path)
    (cell,) = planning.plan(loaded)
    capfd.readouterr()
    with track.Experiment(loaded, path) as experiment:
        experiment.log_cell(cell, result(cell.name), {})
        experiment.tag_verdicts({cell.name: Verdict(cell.name, "ok")}, "arithmetic")
    out, err = capfd.readouterr()
    return track.tracking_uri(loaded), cell.name, out + err


def test_a_first_run_on_a_new_sqlite_store_prints_nothing_of_mlflows(tmp_path, capfd):
    _, _, console = logged(tmp_path, capfd)
    for noise in ("Creating initial MLflow", "Updating database", "alembic", "Context impl"):
        assert noise not in console, console
    assert "fatal:" not in console, "no git probe reaches the console"


def test_the_experiment_opens_as_model_training_on_the_cells_with_their_verdict(tmp_path, capfd):
    """MLflow's experiment kind, runs named after cells, and a saved view (the UI's Views
    menu) whose first columns are the verdict and each task's accuracy, primary first."""
    import json

    from mlflow.tracking import MlflowClient

    from harness import track
    from harness.track.view import KIND_TAG

    uri, name, _ = logged(tmp_path, capfd)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("viewed")
    assert experiment.tags[KIND_TAG] == "custom_model_development"
    cells = client.search_runs([experiment.experiment_id], "tags.`forgebench.kind` = 'cell'")
    assert [run.info.run_name for run in cells] == [name] == ["a-q8_0"]
    view = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.forgebench"])["state"])
    assert view["selectedColumns"][:3] == [
        "tags.`forgebench.verdict`",
        "metrics.`accuracy_arithmetic`",
        "metrics.`accuracy_capitals`",
    ]
    assert cells[0].data.tags["forgebench.verdict"] == "ok"
    link = track.ui_command(uri, "viewed")
    assert link.startswith(f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/")
    assert f"/experiments/{experiment.experiment_id}/runs?viewStateShareKey=forgebench" in link
    assert "workflowType=machine_learning" in link


def test_a_failed_stage_prints_its_words_as_written_and_the_whole_reason_only_with_debug():
    from harness.cli.console import RichReporter
    from harness.plan.cells import Cell

    failed = Outcome(
        "k-eval",
        cached=False,
        seconds=1.0,
        error="evaluate: row [user] has no answer",
        detail="evaluate: row [user] has no answer\nlast lines of its log:\n  srv  ready",
    )
    cell = Cell(None, "f16", {})
    for debug, expected in ((False, 1), (True, 4)):
        console = Console(width=160, record=True, color_system=None)
        with RichReporter(console, total=1, debug=debug) as reporter:
            reporter.stage_started(cell, "evaluate", cached=False)
            reporter.stage_finished(cell, "evaluate", failed)
        lines = [li for li in console.export_text().splitlines() if li.strip()]
        assert lines[0] == f"✗ {cell.adapter} evaluate: evaluate: row [user] has no answer"
        assert len(lines) == expected, lines
