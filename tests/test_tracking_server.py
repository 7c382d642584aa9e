"""Results in one shared MLflow: the e2e spec run against a real `mlflow server` process
(sqlite behind it, artifacts uploaded through it, as the README's multi-user setup has
it), then read back from that server alone by `report` and `best`; and that server
stopped in the middle of a run, then started again for a rerun. The spec's work is all
in the e2e store already, so this costs the logging, not the chain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import TrackingServer, scratch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from harness.cli import app
from harness.track import schema

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


STOPPING_RUN = textwrap.dedent(
    """\
    import os, signal, socket, sys, time
    from harness import track
    from harness.cli import app

    group, port = int(sys.argv[1]), int(sys.argv[2])
    logged = track.Experiment._log_cell

    def log_then_stop_the_server(self, *args):
        run_id = logged(self, *args)
        if len(self.cells) == 2:  # the second cell is logged: the server goes away
            os.killpg(group, signal.SIGTERM)
            while socket.socket().connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(0.1)
        return run_id

    track.Experiment._log_cell = log_then_stop_the_server
    app(sys.argv[3:], prog_name="forgebench")
    """
)
"""`forgebench run` in a process of its own, as a scheduled job runs it, with one thing
added: the tracking server is stopped right after the second cell is logged."""


def test_a_tracking_server_stopped_mid_run_is_one_line_and_a_rerun_logs_each_cell_once(
    e2e, tmp_path_factory, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    cells = sorted(cell.name for cell in e2e.cells().values())
    run = ["run", str(e2e.spec_path), "--store", str(e2e.store.root)]
    with scratch(tmp_path_factory, "outage") as folder:
        server = TrackingServer(folder).start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        try:
            stopping = [sys.executable, "-c", STOPPING_RUN, str(server.process.pid)]
            stopped = subprocess.run(
                [*stopping, str(server.port), *run],
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "COLUMNS": "250"},
            )
            server.start()  # back, on the same port and database
            again = CliRunner().invoke(app, run)
            client = MlflowClient(server.url)
            experiment = client.get_experiment_by_name("e2e").experiment_id
            everything = client.search_runs([experiment], max_results=1000)
        finally:
            server.stop()

    # what the user saw: a warning when it happened, the table of cells, one error line
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 1, output
    assert "Traceback" not in output
    warned = [line for line in output.splitlines() if line.startswith("warning:")]
    assert warned == [
        f"warning: the tracking server at {server.url} stopped answering; the run goes on "
        "building and measuring without logging, every result kept in the store"
    ], output
    assert all(cell in output for cell in cells)
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: the tracking server at {server.url} stopped answering:")
    assert f"{len(cells)} cells built and measured, 2 logged" in last
    # nothing else names the server: no retries logged, no MLflow "View run" lines
    assert [line for line in output.splitlines() if server.url in line] == [warned[0], last]

    # the rerun: every cell logged once under its parent, the stopped run closed, none RUNNING
    assert again.exit_code == 0, again.output
    assert "RUNNING" not in {run.info.status for run in everything}
    parents = [r for r in everything if r.data.tags.get("forgebench.kind") == "invocation"]
    first, second = sorted(parents, key=lambda run: run.info.start_time)
    assert (first.info.status, second.info.status) == ("KILLED", "FINISHED")
    assert second.data.tags["forgebench.resumes"] == first.info.run_id
    parent = second.info.run_id
    children = [r for r in everything if r.data.tags.get(schema.PARENT) == parent]
    assert sorted(r.data.tags["forgebench.cell"] for r in children) == cells
    assert {r.info.status for r in children} == {"FINISHED"}
