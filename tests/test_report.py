"""The report's blame chain ("where the quality went"), on cells built here as MLflow would
hold them, so it needs no training: the chart and the text mark the step the verdict blames,
and the page renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from harness import report
from harness.errors import InputError
from harness.judge.best import choose
from harness.report import plots as report_plots
from harness.track import Invocation, RunView

LEVELS = ("f16", "q8_0", "q4_k_m", "q2_k")


def cell(adapter: str, level: str, accuracy: dict[str, float], **extra) -> RunView:
    """One cell's run: `extra` holds metrics, and `verdict`, `steps` and `reasons` tags."""
    verdict, steps = extra.pop("verdict", "ok"), extra.pop("steps", "")
    reasons = extra.pop("reasons", "")
    tags = {
        "forgebench.cell": f"{adapter}-{level}",
        "forgebench.adapter": adapter,
        "forgebench.quant": level,
        "forgebench.status": "done",
        "forgebench.primary_task": "arithmetic",
        "forgebench.guard_tasks": "general",
        "forgebench.verdict": verdict,
        "forgebench.verdict_reasons": reasons,
        "forgebench.steps_lost": steps,
    }
    metrics = {f"accuracy_{t}": a for t, a in accuracy.items()}
    metrics |= {"gguf_mb": 270.0 / (1 + LEVELS.index(level)), "decode_tps_p50": 40.0, **extra}
    return RunView("r" * 32, f"{adapter}-{level}", "FINISHED", {}, metrics, tags)


def chain_metrics(base: dict[str, float], tuned: dict[str, float] | None, f16: dict[str, float]):
    out = {f"chain_hf_base_{t}": a for t, a in base.items()}
    out |= {f"chain_hf_tuned_{t}": a for t, a in (tuned or {}).items()}
    return out | {f"chain_f16_{t}": a for t, a in f16.items()}


def rows() -> list[RunView]:
    """`main` loses arithmetic at q2_k; `forgetful` loses the guard task in training; the
    control `base` has no tuned model; `main-q4_k_m` dips significantly, but by less than the
    spec allows, so its verdict says ok."""
    base, general = {"arithmetic": 0.2, "general": 0.6}, {"arithmetic": 0.8, "general": 0.6}
    main = chain_metrics(base, general, general)
    main_acc = {
        "f16": general,
        "q8_0": general,
        "q4_k_m": {"arithmetic": 0.75, "general": 0.58},
        "q2_k": {"arithmetic": 0.45, "general": 0.5},
    }
    forgetful = chain_metrics(
        base, {"arithmetic": 0.85, "general": 0.3}, {"arithmetic": 0.85, "general": 0.3}
    )
    forgetting = {
        "link_training_general_drop": 0.3,
        "link_training_general_p": 0.0001,
        "link_training_arithmetic_drop": -0.65,
        "link_training_arithmetic_p": 1e-9,
    }
    out = [cell("base", q, base, **chain_metrics(base, None, base)) for q in LEVELS]
    for q in LEVELS:
        extra = dict(main)
        if q == "q2_k":
            extra |= {
                "link_quantization_arithmetic_drop": 0.35,
                "link_quantization_arithmetic_p": 2e-6,
            }
            extra |= {"verdict": "stupid (quantization)", "steps": "quantization"}
            extra["reasons"] = "quantization: arithmetic 0.450 vs F16 0.800 (p=2e-06)"
        if q == "q4_k_m":
            extra |= {
                "link_quantization_arithmetic_drop": 0.05,
                "link_quantization_arithmetic_p": 0.01,
            }
        out.append(cell("main", q, main_acc[q], **extra))
    for q in LEVELS:
        reasons = "training: general 0.300 vs untuned 0.600 (p=1e-04)"
        out.append(
            cell(
                "forgetful",
                q,
                {"arithmetic": 0.85, "general": 0.3},
                verdict="stupid (training: forgetting)",
                steps="training",
                reasons=reasons,
                **forgetful,
                **forgetting,
            )
        )
    return out


def test_chain_runs_from_untuned_base_to_smallest_quant_and_blames_the_verdicts_step():
    points = report_plots.chain(rows(), "main", ["arithmetic", "general"])
    assert [p.label for p in points] == ["untuned HF", "tuned HF", "F16 GGUF", *LEVELS[1:]]
    assert [p.accuracy["arithmetic"] for p in points] == [0.2, 0.8, 0.8, 0.8, 0.75, 0.45]
    # q4_k_m's dip is significant but its verdict is ok: only the step the verdict names is marked
    assert [p.label for p in points if p.lost] == ["q2_k"]
    control = report_plots.chain(rows(), "base", ["arithmetic"])
    assert [p.label for p in control][:2] == ["untuned HF", "F16 GGUF"]
    assert control[1].step == "export" and not any(p.lost for p in control)


def test_no_chain_figures_means_no_chain():
    plain = [r for r in rows() if r.adapter == "main"]
    for r in plain:
        r.metrics = {k: v for k, v in r.metrics.items() if not k.startswith("chain_")}
    assert report_plots.chain(plain, "main", ["arithmetic"]) == []
    assert report.quality_chain(plain) == []


def test_chart_marks_the_blamed_link_on_the_task_that_lost():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ["arithmetic", "general"]
    for adapter, where in (("main", (5, 0.45)), ("forgetful", (1, 0.3))):
        points = report_plots.chain(rows(), adapter, tasks)
        fig = report_plots.chain_plot(plt, adapter, points, tasks)
        marks = [
            (line.get_xdata()[0], line.get_ydata()[0])
            for line in fig.axes[0].get_lines()
            if line.get_marker() == "X"
        ]
        plt.close(fig)
        # forgetful: the guard task lost in training (arithmetic gained), so the guard is marked
        assert marks == [where], adapter


def test_report_text_shows_each_adapters_chain_and_the_verdict_with_its_step(tmp_path):
    inv = Invocation("chain", "sqlite:///x.db", "p" * 32, {}, rows())
    _, md = report.write(inv, tmp_path)
    text = md.read_text()
    line = next(li for li in text.splitlines() if li.startswith("| main-q2_k |"))
    assert "| stupid (quantization) |" in line
    assert (
        "- main, arithmetic: untuned HF 0.200 → tuned HF 0.800 → F16 GGUF 0.800 → q8_0 0.800"
        " → q4_k_m 0.750 → q2_k 0.450 ✗ quantization lost"
    ) in text
    forgetful = [li for li in text.splitlines() if li.startswith("- forgetful,")]
    assert "✗ training lost" in forgetful[1] and "guard general" in forgetful[1]
    assert "✗" not in forgetful[0]
    base = next(li for li in text.splitlines() if li.startswith("- base, arithmetic:"))
    assert "tuned HF" not in base.replace("untuned HF", "")
    for adapter in ("base", "main", "forgetful"):
        name = f"chain_{adapter}.png"
        assert f"![{name}]({name})" in text
        assert Image.open(tmp_path / name).size[0] > 200
    assert text.count("![chain_main.png]") == 1, "a chain chart is shown once, in its section"


def test_the_report_opens_with_the_decision_and_gives_each_reason_once(tmp_path):
    inv = Invocation("chain", "sqlite:///x.db", "p" * 32, {}, rows())
    _, md = report.write(inv, tmp_path)
    text = md.read_text()
    assert text.index("## Decision") < text.index("## Cells") < text.index("## Why not ok")
    decisions = text.split("## Decision")[1].split("## Cells")[0]
    assert "- **main**: ship q4_k_m: smallest file" in decisions
    assert "- **forgetful**: ship nothing: no level was shown ok (forgetful-f16 " in decisions
    reason = "quantization: arithmetic 0.450 vs F16 0.800 (p=2e-06)"
    assert text.count(reason) == 1, "a reason is given once, under Why not ok"


def render(page: Path, tmp_path: Path) -> tuple[str, Image.Image]:
    """The page as headless Chromium sees it: its DOM, and a screenshot."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,4000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dom, Image.open(shot)


def test_chain_report_renders_in_chromium(tmp_path):
    inv = Invocation("chain", "sqlite:///x.db", "p" * 32, {}, rows())
    index, _ = report.write(inv, tmp_path / "report")
    dom, shot = render(index, tmp_path)
    assert len(re.findall(r"<tr class=", dom)) == 12, "one table row per cell"
    assert '<tr class="stupid">' in dom, "the verdict's step does not change the row's colour"
    section = dom.split("Where the quality went", 1)[1].split("<h2>", 1)[0]
    charts = re.findall(r'src="data:image/png;base64,([^"]+)"', section)
    assert len(charts) == 3, "one chain chart per adapter"
    for data in charts:
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert width > 200 and height > 200
    picture = shot.convert("L")
    ink = sum(1 for p in picture.getdata() if p < 200) / (picture.width * picture.height)
    assert ink > 0.02, "the screenshot is (nearly) blank"


def served_at(row: RunView, name: str, evaluation: str, **metrics) -> RunView:
    """`row`'s level served at the serving setting `name`, its scores from `evaluation`."""
    level = row.tags["forgebench.quant"]
    tags = row.tags | {
        "forgebench.cell": f"{row.adapter}-{level}-{name}",
        "forgebench.quant": f"{level}-{name}",
        "forgebench.setting": name,
        "forgebench.key.evaluate": evaluation,
    }
    return RunView(row.run_id, tags["forgebench.cell"], "FINISHED", {}, row.metrics | metrics, tags)


def test_serving_settings_ride_on_their_level_and_get_a_table_and_plots(tmp_path, monkeypatch):
    """A setting is not a step of the chain or of best's walk: one that loses answers (a
    q4_0 KV cache at q8_0) stops nothing, and its level still ships. The report pairs each
    setting with its level at the spec's own setting, and plots load and memory."""
    plain = rows()
    main = {r.tags["forgebench.quant"]: r for r in plain if r.adapter == "main"}
    for level in ("q8_0", "q4_k_m"):
        main[level].tags["forgebench.key.evaluate"] = f"eval-{level}"
        main[level].metrics |= {"load_c1_agg_tps": 40.0, "batched_c1_gen_tps": 50.0,
                                "load_memory_mb": 300.0, "kv_cache_mb": 45.0,
                                "load_ctx_tokens": 2048.0}  # fmt: skip
    lost = served_at(main["q8_0"], "kv_q4_0", "eval-kv")
    lost.tags["forgebench.verdict"] = "stupid (serving)"
    wide = served_at(
        main["q4_k_m"], "ctx8192-np2", "eval-q4_k_m", load_c2_agg_tps=70.0,
        batched_c2_gen_tps=90.0, load_memory_mb=640.0, kv_cache_mb=360.0,
        load_ctx_tokens=16384.0,
    )  # fmt: skip
    answers = {"arithmetic": {str(i): i < 80 for i in range(100)}}
    changed = {"arithmetic": {str(i): i < 70 for i in range(100)}}
    monkeypatch.setattr(
        "harness.track.samples", lambda uri, run: changed if run == "changed" else answers
    )
    lost.run_id = "changed"
    inv = Invocation("chain", "sqlite:///x.db", "p" * 32, {}, [*plain, lost, wide])
    _, md = report.write(inv, tmp_path)
    text = md.read_text()
    decisions = text.split("## Decision")[1].split("## Cells")[0]
    assert "- **main**: ship q4_k_m: smallest file" in decisions
    assert "→ q4_k_m 0.750 → q2_k 0.450 ✗ quantization lost" in text, "the chain has no setting"
    table = text.split("## Serving settings against the spec's own")[1].split("\n## ")[0]
    lost_row = next(li for li in table.splitlines() if li.startswith("| main q8_0 kv_q4_0 |"))
    assert "| stupid (serving) |" in lost_row and "100 items: 10, 0, +0.10" in lost_row
    wide_row = next(li for li in table.splitlines() if "main q4_k_m ctx8192-np2" in li)
    assert "answers shared" in wide_row and "c1 40 (50) / c1 40 (50), c2 70 (90)" in wide_row
    assert "| 300 / 640 |" in wide_row and "| 45.0 / 360.0 |" in wide_row
    for name in ("throughput_main_q4_k_m.png", "memory_vs_context.png"):
        assert Image.open(tmp_path / name).size[0] > 200


def test_best_by_throughput_ships_what_serves_most_at_the_load_budget_users():
    """With a load budget at 2 users, `--by throughput` compares each ok cell's aggregate
    at 2 concurrent streams, not at whatever concurrency flatters it; without one, each
    cell at its best; a budget at a rate gives nothing to compare (every cell that keeps up
    serves the rate), so that is refused, as is a way to choose that does not exist."""
    plain = rows()
    main = {r.tags["forgebench.quant"]: r for r in plain if r.adapter == "main"}
    main["q4_k_m"].metrics |= {"load_c1_agg_tps": 40.0, "load_c2_agg_tps": 60.0}
    wide = served_at(main["q4_k_m"], "np4", "eval-q4_k_m", load_c2_agg_tps=55.0)
    wide.metrics["load_c4_agg_tps"] = 150.0
    cells = [*plain, wide]

    def chosen(load: str | None, by: str = "throughput"):
        for row in cells:
            row.tags.pop("forgebench.load", None)
            row.tags |= {"forgebench.load": load} if load else {}
        return next(c for c in choose(cells, by) if c.adapter == "main")

    at_two = chosen("users=2")
    assert at_two.row is main["q4_k_m"], at_two.why
    assert "60 tok/s at 2 concurrent streams" in at_two.why
    assert "judged ok at 2 users" in at_two.why
    at_best = chosen(None)
    assert at_best.row is wide and "150 tok/s at 4 concurrent streams" in at_best.why
    with pytest.raises(InputError, match="names a rate"):
        chosen("rate=2")
    with pytest.raises(InputError, match="choose by one of size, speed, throughput"):
        chosen(None, by="fast")
