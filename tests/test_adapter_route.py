"""The adapter route on the real chain: the e2e adapter, trained once for the suite, shipped
both ways at F16 and Q4_K_M and served by llama-server, beside the merged cells the
`measured` run already scored (they come from the store: nothing is trained here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import MEASURE_SPEC
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from harness import spec
from harness.cli import app
from harness.judge import evidence, paired, verdict
from harness.judge.evidence import paired_items
from harness.plan import cells as planning
from harness.run.deployment import Served
from harness.run.outcomes import CellResult, Outcome
from harness.stages import check, convert_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def routes(e2e, measured):
    """The measure spec at f16 and q4_k_m on both routes, run after `measured`."""
    # an experiment of its own: the chain tests count the cells of "e2e" in MLflow
    text = (
        MEASURE_SPEC.format(template="", db=e2e.folder / "mlflow.db")
        .replace("name: e2e\n", "name: e2e-routes\n")
        .replace("quant: [f16, q8_0, q4_k_m, q2_k]", "quant: [f16, q4_k_m]")
        .replace("serve:", "route: [merge, adapter]\nserve:")
    )
    assert "name: e2e-routes" in text and "quant: [f16, q4_k_m]\nroute:" in text
    path = e2e.folder / "routes.yaml"
    path.write_text(text)
    summary = e2e.run(path)
    return path, summary, {c.cell: c for c in summary.cells}


def test_the_adapter_route_builds_only_the_lora_gguf(routes):
    _, summary, cells = routes
    assert {"train", "merge", "convert", "quantize"}.isdisjoint(summary.executed), (
        "the merged cells, the base's F16 and its Q4_K_M are in the store already"
    )
    assert summary.executed["convert_lora"] == 1, "one LoRA GGUF serves both levels"
    for name in ("main-lora-f16", "main-lora-q4_k_m"):
        assert cells[name].status == "done", cells[name].error
        assert cells[name].stages["check"].metrics["adapter_applied"] == 1
        judged = summary.verdicts[name]
        assert not judged.verdict.startswith("broken"), judged.reasons
        # every link was measured: its F16 (of its own route) and its references were there
        assert all(link.table is not None for link in judged.links), judged.reasons


def test_the_lora_gguf_changes_the_served_output(routes, e2e):
    """Scale 1 against scale 0 on the check's probes, with the trained adapter's LoRA GGUF."""
    path, *_ = routes
    cell = {c.name: c for c in planning.plan(spec.load(path))}["main-lora-f16"]
    effect = json.loads((e2e.store.path(cell.calls["check"]) / "adapter_effect.json").read_text())
    assert any(a["scale_0"] != a["scale_1"] for a in effect["answers"])


def test_both_routes_agree_at_f16_on_the_same_items(routes, e2e):
    """Base + LoRA at F16 is the merged model at F16: the 95% interval of their difference on
    the same items holds zero."""
    path, *_ = routes
    cells = {c.name: c for c in planning.plan(spec.load(path))}
    merged, lora = (
        paired_items(e2e.store.path(cells[name].calls["evaluate"]), "arithmetic")
        for name in ("main-f16", "main-lora-f16")
    )
    assert merged.keys() == lora.keys()
    t = paired.table(merged, lora)
    lower, upper = t.interval(0.975)
    assert lower <= 0 <= upper, f"merged F16 and base + LoRA F16 differ: {t}"


def test_mlflow_has_the_route_and_what_was_served(routes, e2e):
    path, summary, cells = routes
    run = MlflowClient(summary.tracking_uri).get_run(cells["main-lora-q4_k_m"].run_id)
    tags = run.data.tags
    plan = {c.name: c for c in planning.plan(spec.load(path))}["main-lora-q4_k_m"]
    manifest = e2e.store.manifest(plan.lora_gguf)
    assert tags["forgebench.route"] == "adapter"
    assert tags["forgebench.lineage.lora_gguf_sha256"] == manifest["outputs"]["adapter.gguf"]
    base = e2e.store.manifest(plan.gguf)["outputs"]["model.gguf"]
    assert tags["forgebench.lineage.gguf_sha256"] == base
    local = MlflowClient(summary.tracking_uri).download_artifacts(run.info.run_id, "serve")
    modelfile = (Path(local) / "Modelfile").read_text().splitlines()
    assert modelfile[1] == f"ADAPTER {e2e.store.path(plan.lora_gguf) / 'adapter.gguf'}"


def test_the_report_compares_the_routes_and_best_takes_a_route(routes, tmp_path):
    _, summary, _ = routes
    uri = summary.tracking_uri
    result = CliRunner().invoke(
        app, ["report", "e2e-routes", "--tracking-uri", uri, "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    report = (tmp_path / "e2e-routes" / "report.md").read_text()
    section = report.split("## Merge route against adapter route")[1].split("## ")[0]
    assert "| main f16 |" in section and "| main q4_k_m |" in section
    assert "80 items" in section, "paired on the evaluation's items"
    chosen = CliRunner().invoke(
        app, ["best", "e2e-routes", "--tracking-uri", uri, "--route", "adapter"]
    )
    assert chosen.exit_code == 0, chosen.output
    assert "by route adapter" in chosen.output or "no cell is ok" in chosen.output
    assert "main-lora" in chosen.output or "by route adapter" in chosen.output


def test_a_zeroed_adapter_is_broken_adapter_not_applied(routes, e2e, tmp_path):
    """The trained adapter with every lora_B zeroed, converted by llama.cpp's converter and
    served beside the base: the chat check passes the template, and fails the adapter."""
    from safetensors.torch import load_file, save_file

    path, *_ = routes
    loaded = spec.load(path)
    cell = {c.name: c for c in planning.plan(loaded)}["main-lora-f16"]
    trained = e2e.store.path(cell.calls["train"]) / "adapter"
    zeroed = tmp_path / "train" / "adapter"
    shutil.copytree(trained, zeroed)
    weights = load_file(zeroed / "adapter_model.safetensors")
    save_file(
        {k: v.zero_() if "lora_B" in k else v for k, v in weights.items()},
        zeroed / "adapter_model.safetensors",
    )
    call = cell.lora_gguf
    inputs = {"base": e2e.store.path(call.inputs["base"]), "adapter": zeroed.parent}
    (tmp_path / "lora").mkdir()
    convert_lora.run(call.settings, inputs, tmp_path / "lora", lambda *_: None)
    (tmp_path / "check").mkdir()
    with Served(loaded, cell, e2e.store) as served:
        served.adapter = tmp_path / "lora" / convert_lora.FILE
        metrics = check.run(
            cell.calls["check"].settings, {}, tmp_path / "check", lambda *_: None, served
        )
    assert metrics["check_template_ok"] == 1 and metrics["adapter_applied"] == 0
    assert check.NOT_APPLIED in metrics["check_reasons"]
    outcome = Outcome("k", False, 1.0, metrics)
    result = CellResult(cell.name, "main", "f16", "broken", {"check": outcome})
    fig = evidence._figures(cell, result, e2e.store, [], False)
    judged = verdict.judge([fig], loaded.budgets, {}, [], [])
    assert judged[cell.name].verdict == "broken (adapter not applied)"
