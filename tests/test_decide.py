"""What users run forgebench for, on the measured e2e experiment: the report (from MLflow
alone, rendered in headless Chromium), the best quant level, and the release gate."""

from __future__ import annotations

import base64
import io
import re

import pytest
from conftest import release_gate
from mlflow.tracking import MlflowClient
from PIL import Image
from test_report import render
from typer.testing import CliRunner

from harness.cli import app
from harness.judge.best import choose
from harness.track import results

pytestmark = pytest.mark.slow


def uri(e2e) -> str:
    return f"sqlite:///{e2e.folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def report(measured, e2e, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    result = CliRunner().invoke(
        app,
        [
            "report",
            "e2e",
            "--tracking-uri",
            uri(e2e),
            "--out",
            str(out),
            "--run",
            e2e.measured.parent_run_id,
        ],
    )
    assert result.exit_code == 0, result.output
    return out / "e2e"


def test_report_markdown_matches_mlflow(report, e2e):
    md = (report / "report.md").read_text()
    inv = results.load(uri(e2e), "e2e", e2e.measured.parent_run_id)
    for row in inv.rows:
        line = next(li for li in md.splitlines() if li.startswith(f"| {row.cell} |"))
        assert f"| {row.verdict} |" in line
        assert f"{row.accuracy():.3f}" in line
        assert f"{row.metrics['gguf_mb']:.1f}" in line
        # the served decode speed beside the engine's own figure for the same GGUF
        served, engine = row.metrics["decode_tps_p50"], row.metrics["llama_bench_tg_tps"]
        assert f"| {served:.1f} | {engine:.1f} |" in line
    assert md.index("## Decision") < md.index("## Cells") and "- **main**: ship " in md
    for name in (
        "accuracy_vs_size.png",
        "pareto.png",
        "decode_tps.png",
        "training_loss.png",
        "tuned_vs_base.png",
        "chain_main.png",  # where the quality went: untuned HF -> tuned HF -> F16 -> levels
        "chain_base.png",
    ):
        assert f"![{name}]({name})" in md and (report / name).stat().st_size > 0
    main = next(r for r in inv.rows if r.cell == "main-q8_0")
    for link in ("chain_hf_base_arithmetic", "chain_hf_tuned_arithmetic", "chain_f16_arithmetic"):
        assert link in main.metrics, link


def test_report_html_renders_in_chromium(report, tmp_path):
    dom, shot = render(report / "index.html", tmp_path)
    rows = re.findall(r"<tr class=", dom)
    assert len(rows) == 8, "one table row per cell"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == len(list(report.glob("*.png"))) >= 5, "every plot is on the page"
    for data in images:
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert width > 200 and height > 200
    picture = shot.convert("L")
    ink = sum(1 for p in picture.getdata() if p < 200) / (picture.width * picture.height)
    assert ink > 0.02, "the screenshot is (nearly) blank"


def test_best_picks_the_smallest_ok_cell_and_registers_it(measured, e2e):
    result = CliRunner().invoke(
        app,
        [
            "best",
            "e2e",
            "--tracking-uri",
            uri(e2e),
            "--register",
            "e2e-main",
            "--run",
            e2e.measured.parent_run_id,
        ],
    )
    assert result.exit_code == 0, result.output
    inv = results.load(uri(e2e), "e2e", e2e.measured.parent_run_id)
    ok = [r for r in inv.rows if r.adapter == "main" and r.verdict == "ok"]
    chosen = min(ok, key=lambda r: r.size_mb)
    assert f"main: {chosen.quant}: smallest file" in result.output
    assert [c.row.cell for c in choose(inv.rows) if c.adapter == "main"] == [chosen.cell]
    version = MlflowClient(uri(e2e)).get_model_version_by_alias("e2e-main", "candidate")
    assert version.run_id == chosen.run_id


def gate(e2e, candidate: str, baseline: str, *extra: str):
    return release_gate(uri(e2e), candidate, baseline, *extra)


def test_gate_passes_a_build_no_worse_than_the_baseline(measured, e2e, tmp_path):
    result = gate(
        e2e,
        measured["main-q8_0"].run_id,
        measured["main-f16"].run_id,
        "--output",
        str(tmp_path / "gate.md"),
        "--speed-drop-pct",
        "100",
        "--memory-rise-pct",
        "100",
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("## forgebench check: PASS")
    assert (tmp_path / "gate.md").read_text() == result.output


def test_gate_fails_a_regressed_build(measured, e2e):
    """q2_k loses the adapter's arithmetic (the verdict calls it stupid): the gate says 1."""
    assert (
        measured["main-q2_k"].stages["evaluate"].metrics["accuracy_arithmetic"]
        < (measured["main-f16"].stages["evaluate"].metrics["accuracy_arithmetic"])
    )
    result = gate(
        e2e,
        measured["main-q2_k"].run_id,
        measured["main-f16"].run_id,
        "--speed-drop-pct",
        "100",
        "--memory-rise-pct",
        "100",
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "arithmetic:" in result.output


def test_gate_bad_input_is_exit_2(measured, e2e):
    result = gate(e2e, "e2e:no-such-cell", "e2e:main-f16")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: no cell 'no-such-cell'")
