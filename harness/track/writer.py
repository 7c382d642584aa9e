"""MLflow, written to as a spec runs (after the run, only `registry` writes to it).

One MLflow experiment per spec name; one parent run per invocation, one child
run per cell, cached or not, so that every invocation's runs are complete on
their own. Child runs carry the cell's params (base, lora.*, quant, train.*,
data.*), its metrics (training curve, throughput, GGUF size, stage times) and
tags (stage keys, what was cached, lineage, llama.cpp revision); the parent
carries the spec and the run summary as artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from harness import __version__, host
from harness.data import evals
from harness.plan.cells import Cell
from harness.run.outcomes import CellResult, RunSummary
from harness.sources import templates
from harness.spec import Spec
from harness.track import connect, schema, view
from harness.track.figures import adapter_lineage, flatten, result_curve, stage_metrics

T = TypeVar("T")


def _alive(pid: str | None) -> bool:
    if not pid or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Experiment:
    """One invocation of a spec: a parent run and a child run per cell."""

    def __init__(
        self, spec: Spec, spec_path: Path, notice: Callable[[str], None] = lambda message: None
    ):
        self.spec, self.spec_path, self.notice = spec, spec_path, notice
        self.uri = connect.tracking_uri(spec)
        self.lost: str | None = None
        """Why logging stopped mid-run (the tracking server stopped answering), in one line;
        the run goes on, its results in the store, and a rerun logs every cell."""
        # an explicit client, never mlflow.set_tracking_uri: that also sets the
        # MLFLOW_TRACKING_URI environment variable, so the next spec run in the same
        # process (or any child process) would log to this spec's store
        with connect.first_use_lock(self.uri):  # the first client creates a sqlite store's tables
            self.client = connect.client(self.uri)
            existing = self.client.get_experiment_by_name(spec.name)
            self.experiment_id = (
                existing.experiment_id if existing else self.client.create_experiment(spec.name)
            )
        self._declare_view()
        self.parent_id = ""
        self.cells: dict[str, str] = {}
        """run id -> cell name, for the tags set once every cell is known."""

    def _declare_view(self) -> None:
        """The experiment's kind (unless someone set another) and forgebench's view of it,
        rewritten only when the spec's tasks change it."""
        tags = self.client.get_experiment(self.experiment_id).tags
        if view.KIND_TAG not in tags:
            self.client.set_experiment_tag(self.experiment_id, view.KIND_TAG, view.KIND)
        state = json.dumps(view.view_state(self.spec))
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if json.loads(tags[view.VIEW_TAG])["state"] == state:
                return
        now = int(time.time() * 1000)
        envelope = {"name": "forgebench", "createdAt": now, "updatedAt": now, "state": state}
        self.client.set_experiment_tag(self.experiment_id, view.VIEW_TAG, json.dumps(envelope))

    def __enter__(self) -> Experiment:
        killed = self._close_killed_runs()
        parent = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={
                schema.VERSION: __version__,
                schema.RUN_KIND: "invocation",
                schema.SPEC_PATH: str(self.spec_path),
                schema.PID: str(os.getpid()),
                schema.HOST: socket.gethostname(),
                schema.RESUMES: ",".join(killed),
            },
        )
        self.parent_id = parent.info.run_id
        self.client.log_artifact(self.parent_id, str(self.spec_path), "spec")
        return self

    def _close_killed_runs(self) -> list[str]:
        """Runs left RUNNING by a process that no longer exists are closed as KILLED.

        A run is only closed when it was started on this host by a process that is
        gone, so a second forgebench working on the same experiment is left alone.
        """
        killed = []
        running = self.client.search_runs(
            [self.experiment_id], "attributes.status = 'RUNNING'", max_results=5000
        )
        for run in running:
            tags = run.data.tags
            if tags.get(schema.RUN_KIND) != "invocation":
                continue
            if tags.get(schema.HOST) != socket.gethostname() or _alive(tags.get(schema.PID)):
                continue
            for child in running:
                if child.data.tags.get(schema.PARENT) == run.info.run_id:
                    self.client.set_terminated(child.info.run_id, "KILLED")
            self.client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
        return killed

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.lost:
            status = "KILLED" if exc_type is KeyboardInterrupt else "FAILED"
            self.client.set_terminated(self.parent_id, status)

    def log_cell(
        self,
        cell: Cell,
        result: CellResult,
        lineage: dict[str, Any],
        artifacts: list[tuple[str, Path]] = (),
        chat_template: Path | None = None,
    ) -> str | None:
        """The cell's run id; None once the tracking store has failed (`lost`)."""
        return self._unless_lost(
            lambda: self._log_cell(cell, result, lineage, artifacts, chat_template)
        )

    def _unless_lost(self, work: Callable[[], T]) -> T | None:
        """`work()`, only while the tracking store works. Its first failure is told to
        `notice` once, in one line: the cells' results are in the store by then, so the run
        goes on building and measuring, logs nothing more, and a rerun logs every cell (the
        finished ones from the store). A stage's result never waits on MLflow."""
        if self.lost:
            return None
        try:
            return work()
        except Exception as error:  # MLflow's own errors, or the HTTP client's under them
            if not connect.tracking_failure(error):
                raise
            self.lost = self._why_lost(error)
            self.notice(self.lost)
            return None

    def _why_lost(self, error: BaseException) -> str:
        text = str(error).strip()
        first = text.splitlines()[0][:300] if text else type(error).__name__
        if self.uri.startswith(("http://", "https://")) and not connect.answers(self.uri):
            what = f"the tracking server at {self.uri} stopped answering"
        else:
            what = f"logging to {self.uri} failed ({first})"
        return (
            f"{what}; the run goes on building and measuring without logging, every result "
            "kept in the store"
        )

    def _log_cell(
        self,
        cell: Cell,
        result: CellResult,
        lineage: dict[str, Any],
        artifacts: list[tuple[str, Path]],
        chat_template: Path | None,
    ) -> str:
        """`chat_template`: the file resolve wrote, the text every served stage used."""
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(
            self.experiment_id,
            run_name=cell.name,
            tags={schema.PARENT: self.parent_id, schema.RUN_KIND: "cell"},
        )
        run_id = run.info.run_id
        params = {"cell": cell.name, "adapter": cell.adapter, "quant": cell.quant}
        params["route"] = cell.route
        if cell.setting is not None:
            params |= flatten("setting", cell.setting.as_dict())
        params |= flatten("base", self.spec.base.model_dump(mode="json", exclude_none=True))
        params |= flatten("data", self.spec.data.model_dump(mode="json", exclude_none=True))
        if cell.lora is not None:
            params |= flatten("lora", cell.lora.model_dump(mode="json", exclude_none=True))
            params |= adapter_lineage(cell.lora)
            if not cell.lora.adopted:
                params |= flatten("train", self.spec.train.model_dump(mode="json"))
        tags = {
            schema.CELL: cell.name,
            schema.ADAPTER: cell.adapter,
            schema.QUANT: cell.quant,
            schema.ROUTE: cell.route,
            schema.SETTING: cell.setting.name if cell.setting else "",
            schema.STATUS: result.status,
            schema.BACKEND: cell.backend,
            schema.LLAMA_CPP: lineage.get("llama_cpp", ""),
        }
        tags |= flatten(schema.LINEAGE, {k: v for k, v in lineage.items() if k != "llama_cpp"})
        now = int(time.time() * 1000)
        values = stage_metrics(result)
        for stage, outcome in result.stages.items():
            tags[f"{schema.KEY}.{stage}"] = outcome.key
            tags[f"{schema.CACHED}.{stage}"] = str(outcome.cached).lower()
            if outcome.detail:  # the reason in full; forgebench.error has its first line
                tags[f"{schema.ERROR_DETAIL}.{stage}"] = outcome.detail
        if result.deployed:
            tags[schema.DEPLOYED] = result.deployed
        served_template = chat_template if chat_template and chat_template.is_file() else None
        if served_template:
            tags[schema.CHAT_TEMPLATE_SOURCE] = templates.source(self.spec)
            tags[schema.CHAT_TEMPLATE_SHA256] = hashlib.sha256(
                served_template.read_bytes()
            ).hexdigest()
        if result.gguf_bytes is not None:
            tags[schema.GGUF] = result.gguf or ""
            values["gguf_bytes"] = float(result.gguf_bytes)
            values["gguf_mb"] = round(result.gguf_bytes / 2**20, 2)
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        if result.error:
            tags[schema.ERROR] = result.error[:5000]
        metrics += [Metric("train_loss", loss, now, step) for step, loss in result_curve(result)]
        self.client.log_batch(
            run_id,
            metrics=metrics,
            params=[Param(k, v[:6000]) for k, v in params.items()],
            tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
        )
        for folder, path in artifacts:
            self.client.log_artifact(run_id, str(path), folder)
        if served_template:
            self.client.log_artifact(run_id, str(served_template), "serve")
        for stage, outcome in result.stages.items():
            if outcome.traceback:
                self.client.log_text(run_id, outcome.traceback, f"errors/{stage}.txt")
        self.client.set_terminated(run_id, "FINISHED" if result.status == "done" else "FAILED")
        self.cells[run_id] = cell.name
        return run_id

    def tag_verdicts(self, verdicts: dict[str, Any], primary_task: str | None) -> None:
        """Verdicts need every cell (a cell is judged against its F16 and the HF models its
        chain starts from), so they come last, with the chain's figures as metrics."""
        self._unless_lost(lambda: self._tag_verdicts(verdicts, primary_task))

    def _tag_verdicts(self, verdicts: dict[str, Any], primary_task: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        common = {
            schema.MACHINE: host.machine(),
            schema.CONFIDENCE: str(self.spec.budgets.confidence),
        }
        if primary_task:
            common[schema.PRIMARY_TASK] = primary_task
        if budget := self.spec.budgets.load:
            named = f"users={budget.users}" if budget.users else f"rate={budget.rate:g}"
            common[schema.LOAD] = named
        if guard := [t if isinstance(t, str) else t.name for t in self.spec.evaluate.guard]:
            common[schema.GUARD_TASKS] = ",".join(guard)
        for task in self.spec.evaluate.all_tasks:
            name, scorer = evals.scorer_of(task)
            common[f"{schema.SCORER}.{name}"] = scorer
        for run_id, cell in self.cells.items():
            tags, metrics = dict(common), {}
            if cell in verdicts:
                judged = verdicts[cell]
                tags[schema.VERDICT] = judged.verdict
                tags[schema.VERDICT_REASONS] = "; ".join(judged.reasons)[:5000]
                tags[schema.VERDICT_NOTES] = "; ".join(judged.notes)[:5000]
                steps = dict.fromkeys(step.split(":")[0] for step in judged.steps)
                tags[schema.STEPS_LOST] = ",".join(steps)
                metrics = dict(judged.chain) | judged.speed
                for link in judged.links:
                    metrics |= link.metrics()
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                tags=[RunTag(k, str(v)) for k, v in tags.items()],
            )

    def finish(self, summary: RunSummary) -> None:
        """Closes the parent run; after a lost tracking store it stays RUNNING, and the next
        run of the spec on this host closes it as KILLED."""
        self._unless_lost(lambda: self._finish(summary))

    def _finish(self, summary: RunSummary) -> None:
        record = {
            "version": 1,
            "spec": self.spec.model_dump(mode="json"),
            "summary": dataclasses.asdict(summary),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "run_record.json"
            path.write_text(json.dumps(record, indent=2, default=str))
            self.client.log_artifact(self.parent_id, str(path))
        self.client.set_tag(self.parent_id, schema.FAILED_CELLS, str(len(summary.failed)))
        self.client.set_terminated(self.parent_id, "FAILED" if summary.failed else "FINISHED")
