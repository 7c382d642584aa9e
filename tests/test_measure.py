"""Serving and measuring on the real small model through llama.cpp's own server:
template check, accuracy through lm-eval, speed and memory, drift from F16."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest
from conftest import MEASURE_SPEC
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from harness import chain, spec
from harness.cli import app
from harness.judge import paired
from harness.judge.evidence import paired_items
from harness.plan import cells as planning

pytestmark = pytest.mark.slow


def llama_servers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "llama-server"]


def metric(cell, stage: str, name: str) -> float:
    return cell.stages[stage].metrics[name]


def test_every_cell_passes_the_chat_check(measured):
    assert len(measured) == 8
    for name, cell in measured.items():
        assert cell.status == "done", (name, cell.error)
        assert metric(cell, "check", "check_ok") == 1


def test_training_shows_through_the_served_model(measured, e2e):
    """On the 80 held-out items, paired: the tuned q8_0 cell surely beats the untuned one (the
    upper bound of the drop below zero at 95%, on the rows the verdicts read)."""
    base = metric(measured["base-q8_0"], "evaluate", "accuracy_arithmetic")
    tuned = metric(measured["main-q8_0"], "evaluate", "accuracy_arithmetic")
    assert tuned > base, f"served accuracy: base {base:.2f}, tuned {tuned:.2f}"
    cells = {c.name: c for c in planning.plan(spec.load(e2e.folder / "measure.yaml"))}
    rows = {
        name: paired_items(e2e.store.path(cells[name].calls["evaluate"]), "arithmetic")
        for name in ("base-q8_0", "main-q8_0")
    }
    t = paired.table(rows["base-q8_0"], rows["main-q8_0"])
    assert t.interval(0.95)[1] < 0, t


def test_a_quantized_cell_scored_twice_answers_the_same_item_by_item(measured, e2e):
    """The scores verdicts read are reproducible: main-q4_k_m's evaluate output removed from
    the store and the measure spec run again (everything else cached) gives byte-identical
    samples, every reply the same, one request in flight and no prompt cache."""
    cells = {c.name: c for c in planning.plan(spec.load(e2e.folder / "measure.yaml"))}
    call = cells["main-q4_k_m"].calls["evaluate"]
    folder = e2e.store.path(call)
    first = (folder / "samples_arithmetic.jsonl").read_bytes()
    shutil.rmtree(folder)
    again = e2e.run(e2e.folder / "measure.yaml")
    assert again.executed == {"evaluate": 1}, again.executed
    second = (folder / "samples_arithmetic.jsonl").read_bytes()
    flips = [
        (a["doc_id"], a["response"], b["response"])
        for a, b in zip(
            map(json.loads, first.splitlines()), map(json.loads, second.splitlines()), strict=True
        )
        if a["response"] != b["response"]
    ]
    assert not flips, f"{len(flips)} of 80 replies differ, e.g. {flips[:2]}"
    assert first == second


def test_drift_grows_as_bits_shrink(measured):
    kld = [metric(measured[f"main-{q}"], "drift", "kld_mean") for q in ("q8_0", "q4_k_m", "q2_k")]
    assert 0 <= kld[0] < kld[1] < kld[2], kld
    top1 = [metric(measured[f"main-{q}"], "drift", "top1_agreement") for q in ("q8_0", "q2_k")]
    assert 1.0 >= top1[0] > top1[1] > 0, top1
    assert "drift" not in measured["main-f16"].stages


def test_speed_and_memory_are_measured(measured, e2e):
    """Every timed request decodes the same fixed length (end of sequence ignored), and the
    verdict's decode bounds reach MLflow beside the median."""
    cells = {c.name: c for c in planning.plan(spec.load(e2e.folder / "measure.yaml"))}
    client = MlflowClient(f"sqlite:///{e2e.folder / 'mlflow.db'}")
    for name, cell in measured.items():
        bench = cell.stages["bench"].metrics
        assert bench["decode_tps_p50"] > 0 and bench["stream_tps_p50"] > 0
        assert 0 < bench["ttft_ms_p50"] <= bench["ttft_ms_p95"]
        assert bench["memory_mb"] > 0 and bench["load_s"] > 0
        assert bench["llama_bench_tg_tps"] > 0 and bench["llama_bench_pp_tps"] > 0
        requests = e2e.store.path(cells[name].calls["bench"]) / "requests.jsonl"
        rows = requests.read_text().splitlines()
        tokens = {json.loads(line)["completion_tokens"] for line in rows}
        assert tokens == {32}, (name, tokens)  # bench.max_tokens in MEASURE_SPEC
        logged = client.get_run(cell.run_id).data.metrics
        assert logged["decode_tps_p50_lower"] <= bench["decode_tps_p50"]
        assert bench["decode_tps_p50"] <= logged["decode_tps_p50_upper"]


def test_no_server_outlives_the_run(measured):
    assert llama_servers() == []


def test_measurements_reach_mlflow(measured, e2e):
    client = MlflowClient(f"sqlite:///{e2e.folder / 'mlflow.db'}")
    run = client.get_run(measured["main-q4_k_m"].run_id)
    for name in ("arithmetic_exact_match", "decode_tps_p50", "kld_mean", "memory_mb"):
        assert name in run.data.metrics, name
    assert run.data.tags["forgebench.backend"] == "llamacpp"


def test_the_same_chain_through_ollama(e2e, monkeypatch):
    """Deploy, check, score and bench through the Ollama backend (the test double here, a
    real server when OLLAMA_HOST answers in the contract tests). One level, q8_0, for the
    tuned and the untuned base: an F16 GGUF is deployed as any other (FROM its path), and
    llama-server's run above covers every level."""
    from ollama_double import OllamaDouble

    path = e2e.folder / "ollama.yaml"
    text = MEASURE_SPEC.format(template="", db=e2e.folder / "mlflow.db")
    path.write_text(
        text.replace("backend: llamacpp", "backend: ollama").replace(
            "quant: [f16, q8_0, q4_k_m, q2_k]", "quant: [q8_0]"
        )
    )
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        summary = e2e.run(path)
        assert double.models == {}, "the run left models behind in Ollama"
    cells = {c.cell: c for c in summary.cells}
    assert sorted(cells) == ["base-q8_0", "main-q8_0"]
    assert [c.status for c in summary.cells] == ["done"] * 2, [c.error for c in summary.cells]
    for cell in cells.values():
        assert metric(cell, "check", "check_ok") == 1
        assert cell.stages["bench"].metrics["decode_tps_p50"] > 0
        assert cell.stages["bench"].metrics["ollama_ps_size_mb"] > 0
    base = metric(cells["base-q8_0"], "evaluate", "accuracy_arithmetic")
    tuned = metric(cells["main-q8_0"], "evaluate", "accuracy_arithmetic")
    assert tuned > base, (base, tuned)
    client = MlflowClient(f"sqlite:///{e2e.folder / 'mlflow.db'}")
    run = client.get_run(cells["main-q8_0"].run_id)
    assert run.data.tags["forgebench.backend"] == "ollama"
    modelfile = {a.path for a in client.list_artifacts(run.info.run_id, "serve")}
    assert "serve/Modelfile" in modelfile

    # serve.keep leaves every cell's model in Ollama, even when all was cached; clean removes
    kept = e2e.folder / "ollama-keep.yaml"
    kept.write_text(path.read_text().replace("backend: ollama", "backend: ollama, keep: true"))
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        again = e2e.run(kept)
        names = [f"forgebench/e2e-{cell}:latest" for cell in cells]
        assert sorted(double.models) == sorted(names)
        assert again.executed == {}
        tags = client.get_run(again.cells[0].run_id).data.tags
        assert tags["forgebench.deployed"] == f"forgebench/e2e-{again.cells[0].cell}"
        listed = CliRunner().invoke(app, ["clean", "--match", "forgebench/e2e-main-*", "--dry-run"])
        assert listed.output.splitlines() == ["would remove forgebench/e2e-main-q8_0:latest"]
        assert len(double.models) == 2
        cleaned = CliRunner().invoke(app, ["clean"])
        assert cleaned.exit_code == 0, cleaned.output
        assert double.models == {}


def test_ollama_stopping_mid_run_costs_only_the_cells_that_needed_it(e2e, measured, monkeypatch):
    """Ollama dies right after the first cell's bench, its connections dropped: that cell is
    done (its model, which could not be removed, recorded as left on the server), the other
    fails in one line naming Ollama's address, `forgebench clean` lists the model
    left behind and removes it, and a rerun once Ollama is back serves only the failed cells
    again, building nothing."""
    from ollama_double import OllamaDouble

    from harness.stages import bench

    path = e2e.folder / "ollama-outage.yaml"
    text = MEASURE_SPEC.format(template="", db=e2e.folder / "mlflow.db")
    path.write_text(
        text.replace("backend: llamacpp", "backend: ollama")
        .replace("quant: [f16, q8_0, q4_k_m, q2_k]", "quant: [q8_0]")
        .replace("max_tokens: 32", "max_tokens: 24")  # a bench of its own: served again
    )
    measure_once = bench.run
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)

        def bench_then_die(*args, **kwargs):
            metrics = measure_once(*args, **kwargs)
            double.stop()
            return metrics

        monkeypatch.setattr(bench, "run", bench_then_die)
        stopped = e2e.run(path)
        monkeypatch.setattr(bench, "run", measure_once)
        statuses = [cell.status for cell in stopped.cells]
        assert statuses == ["done", "failed"], [c.error for c in stopped.cells]
        for cell in stopped.cells[1:]:
            assert f"no Ollama server answers at http://{double.host}" in cell.error
            assert "\n" not in cell.error and "Traceback" not in cell.error

        first = stopped.cells[0]
        assert first.deployed and first.deployed.startswith("forgebench/e2e-")  # left behind

        double.start_again()
        listed = CliRunner().invoke(app, ["clean", "--dry-run"]).output.splitlines()
        assert listed == [f"would remove {first.deployed}:latest"]
        again = e2e.run(path)
        assert [cell.status for cell in again.cells] == ["done"] * 2
        assert again.executed["bench"] == 1  # the failed cell's served stages, nothing built
        assert set(again.executed) <= {"check", "evaluate", "bench"}
        assert sorted(double.models) == [f"{first.deployed}:latest"]
        cleaned = CliRunner().invoke(app, ["clean"])
        assert cleaned.exit_code == 0 and double.models == {}, cleaned.output


def test_ollama_dying_in_each_served_stage_costs_only_the_cells_that_needed_it(
    e2e, measured, monkeypatch
):
    """Ollama dies at the first request of check, then (once back) of evaluate, then of
    bench: each time the cell being served and the one after it fail, each in one line
    naming Ollama's address, and each next run builds nothing and serves only what was
    lost, until a run with Ollama up finishes both cells and leaves no model of theirs on
    the server. Its own serving parameters and item count, so no served stage is cached."""
    from ollama_double import OllamaDouble

    from harness.stages import bench, check, evaluate

    path = e2e.folder / "ollama-dies.yaml"
    text = MEASURE_SPEC.format(template="", db=e2e.folder / "mlflow.db")
    path.write_text(
        text.replace("backend: llamacpp", "backend: ollama, parameters: {num_ctx: 1024}")
        .replace("quant: [f16, q8_0, q4_k_m, q2_k]", "quant: [q8_0]")
        .replace("tasks: [arithmetic]", "tasks: [arithmetic], limit: 16")
        .replace("max_tokens: 32", "max_tokens: 8")
    )
    stages = {"check": check, "evaluate": evaluate, "bench": bench}
    inside: list[str] = []
    """The served stage running now, while one runs."""

    def watched(name: str):
        original = stages[name].run

        def run(*args, **kwargs):
            inside.append(name)
            try:
                return original(*args, **kwargs)
            finally:
                inside.pop()

        return run

    for name in stages:
        monkeypatch.setattr(stages[name], "run", watched(name))

    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        dying_in: list[str] = []

        def dies_at_first_request(answer):
            def handle(h, body):
                if inside and inside[-1] in dying_in:
                    dying_in.clear()
                    double.stop()
                    h.close_connection = True  # the request is never answered
                    return None
                return answer(h, body)

            return handle

        for route in ("chat", "generate", "openai_chat"):
            setattr(double, route, dies_at_first_request(getattr(double, route)))

        for stage in ("check", "evaluate", "bench"):
            dying_in.append(stage)
            summary = e2e.run(path)
            assert not dying_in, f"Ollama was never asked during {stage}"
            assert not set(summary.executed) & set(chain.BUILD), summary.executed
            assert [c.status for c in summary.cells] == ["failed", "failed"], summary.executed
            first, second = (c.error for c in summary.cells)
            assert first.startswith(f"{stage}: "), first
            assert second.startswith("check: "), second  # it could not deploy
            for error in (first, second):
                assert f"http://{double.host}" in error, error
                assert "\n" not in error and "Traceback" not in error, error
            double.start_again()
        summary = e2e.run(path)
        errors = [c.error for c in summary.cells]
        assert [c.status for c in summary.cells] == ["done", "done"], errors
        assert summary.executed == {"check": 1, "evaluate": 1, "bench": 2}, summary.executed
        assert double.models == {}, "the run left models behind in Ollama"
