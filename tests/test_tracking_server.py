"""Results in one shared MLflow: the e2e spec run against a real `mlflow server` process
(sqlite behind it, artifacts uploaded through it, as the README's multi-user setup has
it), then read back from that server alone by `report` and `best`. The spec's work is all
in the e2e store already, so this costs the logging, not the chain."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from harness.cli import app

pytestmark = pytest.mark.slow


def test_a_run_logs_to_a_shared_server_and_reads_back_from_it(
    e2e, mlflow_server, monkeypatch, tmp_path
):
    url, artifacts = mlflow_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # wins over the spec's sqlite file
    result = CliRunner().invoke(app, ["run", str(e2e.spec_path), "--store", str(e2e.store.root)])
    assert result.exit_code == 0, result.output
    assert f"open {url}" in result.output  # where to look: the server, not `mlflow ui`

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("e2e")
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`forgebench.kind` = 'invocation'"
    )
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    cells = sorted(run.data.tags["forgebench.cell"] for run in children)
    assert cells == sorted(cell.name for cell in e2e.cells().values())
    assert {run.info.status for run in [parent, *children]} == {"FINISHED"}
    # artifacts went through the server into its destination, not into this folder
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec"}
    assert any(artifacts.rglob("run_record.json"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

    out = tmp_path / "reports"
    report = CliRunner().invoke(app, ["report", "e2e", "--tracking-uri", url, "--out", str(out)])
    assert report.exit_code == 0, report.output
    assert (out / "e2e" / "index.html").is_file() and (out / "e2e" / "report.md").is_file()
    best = CliRunner().invoke(app, ["best", "e2e", "--tracking-uri", url])
    assert best.exit_code == 0, best.output
