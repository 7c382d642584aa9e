"""MLflow, written to from this module only.

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
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from filelock import FileLock

from harness import __version__, host, services
from harness.errors import InputError
from harness.sources import templates

if TYPE_CHECKING:
    from harness.plan.cells import Cell
    from harness.run.outcomes import CellResult, RunSummary
    from harness.spec.schema import Spec

T = TypeVar("T")

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT = "mlflow.parentRunId"

# MLflow announces a new sqlite store at INFO ("Creating initial MLflow database tables...",
# "Updating database tables") on the console of whichever command opens it first; nobody asked
# for that. Its warnings and errors still show.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow's tag for what an experiment is: model training ("Machine learning" in the UI), not
the GenAI apps the UI otherwise assumes for an experiment without traces."""
VIEW = "forgebench"
"""The experiment's saved runs view, kept as the MLflow UI keeps the views it saves (an
experiment tag `mlflow.sharedViewState.<id>`; the UI's Views menu lists it)."""
VIEW_TAG = f"mlflow.sharedViewState.{VIEW}"

CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""MLflow's client retries a failed request 7 times with a backoff factor of 2 and waits 120 s
for each answer: a run whose tracking server stopped sat silent for 8 minutes, then died. With
these, a request to a stopped server fails in about 3 s (two retries, 1 and 2 s apart) and one
to a server that hangs in about 33 s. And with a tracking server, MLflow prints two lines
("View run ... at", "View experiment at") for every run it closes, into the middle of the
progress display; the run prints its own link at the end. A value the user set wins (MLflow
reads them per request)."""


def tracking_uri(spec: Spec) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or DEFAULT_URI


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


def ui_command(uri: str, experiment: str | None = None) -> str:
    """How to look at the results; given the experiment, also the address that opens it in
    MLflow's model-training view on forgebench's view of the cells (`mlflow ui` serves at
    127.0.0.1:5000). MLflow 3.17's UI takes the view kind from the address (`workflowType`)
    before the experiment's kind tag."""
    server = uri.startswith(("http://", "https://"))
    command = f"open {uri}" if server else f"mlflow ui --backend-store-uri {uri}"
    found = _client(uri).get_experiment_by_name(experiment) if experiment else None
    if found is None:
        return command
    where = uri.rstrip("/") if server else "http://127.0.0.1:5000"
    link = (
        f"{where}/#/experiments/{found.experiment_id}/runs"
        f"?viewStateShareKey={VIEW}&workflowType=machine_learning"
    )
    return f"open {link}" if server else f"{command}, then open {link}"


def view_state(spec: Spec) -> dict[str, Any]:
    """What forgebench's view shows: the cells alone, flat (sorted by name, MLflow does not
    nest them under their invocation's run), the verdict, each task's accuracy (primary
    first), speed, size and memory, then the verdict's reasons."""
    tasks = [t if isinstance(t, str) else t.name for t in spec.evaluate.all_tasks]
    columns = [
        "tags.`forgebench.verdict`",
        *(f"metrics.`accuracy_{task}`" for task in tasks),
        "metrics.`decode_tps_p50`",
        "metrics.`gguf_mb`",
        "metrics.`memory_mb`",
        "tags.`forgebench.verdict_reasons`",
    ]
    return {
        "searchFilter": "tags.`forgebench.kind` = 'cell'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {"tags.`forgebench.verdict`": 230},
    }


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as MLflow params (`train.lr`, `lora.target_modules`)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else key, inner))
        return out
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return {prefix: str(value)}


class Experiment:
    """One invocation of a spec: a parent run and a child run per cell."""

    def __init__(
        self, spec: Spec, spec_path: Path, notice: Callable[[str], None] = lambda message: None
    ):
        self.spec, self.spec_path, self.notice = spec, spec_path, notice
        self.uri = tracking_uri(spec)
        self.lost: str | None = None
        """Why logging stopped mid-run (the tracking server stopped answering), in one line;
        the run goes on, its results in the store, and a rerun logs every cell."""
        # an explicit client, never mlflow.set_tracking_uri: that also sets the
        # MLFLOW_TRACKING_URI environment variable, so the next spec run in the same
        # process (or any child process) would log to this spec's store
        with _first_use_lock(self.uri):  # the first client creates a sqlite store's tables
            self.client = _client(self.uri)
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
        if KIND_TAG not in tags:
            self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND)
        state = json.dumps(view_state(self.spec))
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if json.loads(tags[VIEW_TAG])["state"] == state:
                return
        now = int(time.time() * 1000)
        envelope = {"name": "forgebench", "createdAt": now, "updatedAt": now, "state": state}
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG, json.dumps(envelope))

    def __enter__(self) -> Experiment:
        killed = self._close_killed_runs()
        parent = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={
                "forgebench.version": __version__,
                "forgebench.kind": "invocation",
                "forgebench.spec_path": str(self.spec_path),
                "forgebench.pid": str(os.getpid()),
                "forgebench.host": socket.gethostname(),
                "forgebench.resumes": ",".join(killed),
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
            if tags.get("forgebench.kind") != "invocation":
                continue
            if tags.get("forgebench.host") != socket.gethostname() or _alive(
                tags.get("forgebench.pid")
            ):
                continue
            for child in running:
                if child.data.tags.get(PARENT) == run.info.run_id:
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
            if not _tracking_failure(error):
                raise
            self.lost = self._why_lost(error)
            self.notice(self.lost)
            return None

    def _why_lost(self, error: BaseException) -> str:
        text = str(error).strip()
        first = text.splitlines()[0][:300] if text else type(error).__name__
        if self.uri.startswith(("http://", "https://")) and not _answers(self.uri):
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
            tags={PARENT: self.parent_id, "forgebench.kind": "cell"},
        )
        run_id = run.info.run_id
        params = {"cell": cell.name, "adapter": cell.adapter, "quant": cell.quant}
        params["route"] = cell.route
        params |= flatten("base", self.spec.base.model_dump(mode="json", exclude_none=True))
        params |= flatten("data", self.spec.data.model_dump(mode="json", exclude_none=True))
        if cell.lora is not None:
            params |= flatten("lora", cell.lora.model_dump(mode="json", exclude_none=True))
            params |= flatten("train", self.spec.train.model_dump(mode="json"))
        tags = {
            "forgebench.cell": cell.name,
            "forgebench.adapter": cell.adapter,
            "forgebench.quant": cell.quant,
            "forgebench.route": cell.route,
            "forgebench.status": result.status,
            "forgebench.backend": cell.backend,
            "forgebench.llama_cpp": lineage.get("llama_cpp", ""),
        }
        tags |= flatten(
            "forgebench.lineage", {k: v for k, v in lineage.items() if k != "llama_cpp"}
        )
        now = int(time.time() * 1000)
        values = stage_metrics(result)
        for stage, outcome in result.stages.items():
            tags[f"forgebench.key.{stage}"] = outcome.key
            tags[f"forgebench.cached.{stage}"] = str(outcome.cached).lower()
            if outcome.detail:  # the reason in full; forgebench.error has its first line
                tags[f"forgebench.error_detail.{stage}"] = outcome.detail
        if result.deployed:
            tags["forgebench.deployed"] = result.deployed
        served_template = chat_template if chat_template and chat_template.is_file() else None
        if served_template:
            tags["forgebench.chat_template.source"] = templates.source(self.spec)
            tags["forgebench.chat_template.sha256"] = hashlib.sha256(
                served_template.read_bytes()
            ).hexdigest()
        if result.gguf_bytes is not None:
            tags["forgebench.gguf"] = result.gguf or ""
            values["gguf_bytes"] = float(result.gguf_bytes)
            values["gguf_mb"] = round(result.gguf_bytes / 2**20, 2)
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        if result.error:
            tags["forgebench.error"] = result.error[:5000]
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

        from harness.data import evals

        now = int(time.time() * 1000)
        common = {
            "forgebench.machine": host.machine(),
            "forgebench.confidence": str(self.spec.budgets.confidence),
        }
        if primary_task:
            common["forgebench.primary_task"] = primary_task
        if guard := [t if isinstance(t, str) else t.name for t in self.spec.evaluate.guard]:
            common["forgebench.guard_tasks"] = ",".join(guard)
        for task in self.spec.evaluate.all_tasks:
            name, scorer = evals.scorer_of(task)
            common[f"forgebench.scorer.{name}"] = scorer
        for run_id, cell in self.cells.items():
            tags, metrics = dict(common), {}
            if cell in verdicts:
                judged = verdicts[cell]
                tags["forgebench.verdict"] = judged.verdict
                tags["forgebench.verdict_reasons"] = "; ".join(judged.reasons)[:5000]
                tags["forgebench.verdict_notes"] = "; ".join(judged.notes)[:5000]
                steps = dict.fromkeys(step.split(":")[0] for step in judged.steps)
                tags["forgebench.steps_lost"] = ",".join(steps)
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
        self.client.set_tag(self.parent_id, "forgebench.failed_cells", str(len(summary.failed)))
        self.client.set_terminated(self.parent_id, "FAILED" if summary.failed else "FINISHED")


RENAMED = {"reference": "hf", "reference_base": "hf_base", "drift_tuning": "tuning"}
"""Roles whose stage also serves another role: their figures are logged under a prefix
(`hf.accuracy_arithmetic`, `tuning.kld_mean`), so they never overwrite the cell's own."""


def stage_metrics(result: CellResult) -> dict[str, float]:
    """A cell's numeric figures, one value per name: where two stages report a name, the
    later in the chain wins."""
    out: dict[str, float] = {}
    for role, outcome in result.stages.items():
        out[f"time_{role}_s"] = round(outcome.seconds, 3)
        prefix = f"{RENAMED[role]}." if role in RENAMED else ""
        out |= {
            prefix + k: float(v)
            for k, v in outcome.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def result_curve(result: CellResult) -> list[tuple[int, float]]:
    train = result.stages.get("train")
    return [tuple(p) for p in train.metrics.get("loss_curve", [])] if train else []


@dataclasses.dataclass
class RunView:
    """A run as plain data, so readers of results need not import mlflow."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    loss: list[tuple[int, float]]


def _view(client: Any, run: Any, with_loss: bool = True) -> RunView:
    loss: list[tuple[int, float]] = []
    if with_loss and "train_loss" in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        loss = sorted((m.step, m.value) for m in history)
    return RunView(
        run.info.run_id,
        run.info.run_name,
        run.info.status,
        dict(run.data.params),
        dict(run.data.metrics),
        dict(run.data.tags),
        loss,
    )


def invocation(
    uri: str, experiment: str, run_id: str | None = None
) -> tuple[RunView, list[RunView]]:
    """A forgebench invocation (latest unless named) and its cell runs."""
    from harness.errors import ForgebenchError

    client = _reader(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ForgebenchError(f"no MLflow experiment {experiment!r} at {uri}; run the spec first")
    if run_id is None:
        parents = client.search_runs(
            [found.experiment_id],
            "tags.`forgebench.kind` = 'invocation'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise ForgebenchError(f"experiment {experiment!r} has no forgebench runs at {uri}")
        run_id = parents[0].info.run_id
    children = client.search_runs(
        [found.experiment_id], f"tags.`{PARENT}` = '{run_id}'", max_results=5000
    )
    return _view(client, client.get_run(run_id), False), [_view(client, r) for r in children]


@contextlib.contextmanager
def _first_use_lock(uri: str):
    """Two runs started together on a new sqlite store would both create its tables and
    the experiment, and one would fail; an OS lock beside the database file serializes
    that first use (released by the kernel if its holder dies)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        yield


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(uri)


def _tracking_failure(error: BaseException) -> bool:
    """An error of the tracking store (MLflow's own, or the HTTP client's underneath it),
    rather than a bug of ours."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException | requests.RequestException)


def _answers(uri: str) -> bool:
    """Whether a tracking server answers at all, asked as `validate` asks it (the same
    timeout, and the certificate settings MLflow's client uses)."""
    try:
        services.answers(f"{uri.rstrip('/')}/health", "MLflow", "", services.mlflow_tls())
    except InputError:
        return False
    return True


def _reader(uri: str):
    """A client for reading what runs logged: a sqlite store that does not exist is refused,
    where MLflow would create an empty database (and ./mlruns) on the way to an empty answer."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(
            f"no MLflow database at {uri}: run a spec first, or pass --tracking-uri (or "
            "MLFLOW_TRACKING_URI) where it logged"
        )
    return _client(uri)


def tag(uri: str, run_id: str, key: str, value: str) -> None:
    _client(uri).set_tag(run_id, key, value)


def run_view(uri: str, run_id: str) -> RunView:
    client = _reader(uri)
    return _view(client, client.get_run(run_id))


def resolve_run(uri: str, ref: str) -> str:
    """A run id from a run id or a registered model alias (`models:/NAME@ALIAS` or `NAME@ALIAS`)."""
    from harness.errors import ForgebenchError

    client = _reader(uri)
    if "@" in ref:
        name, alias = ref.removeprefix("models:/").split("@", 1)
        try:
            return client.get_model_version_by_alias(name, alias).run_id
        except Exception as exc:  # mlflow raises its own RestException subclasses
            raise ForgebenchError(f"no model version {name}@{alias} at {uri}: {exc}") from None
    try:
        return client.get_run(ref).info.run_id
    except Exception:
        raise ForgebenchError(f"no MLflow run {ref!r} at {uri}") from None


def samples(uri: str, run_id: str) -> dict[str, dict[str, bool]]:
    """Per-item correctness logged by the evaluate stage: task -> item -> correct, each item
    named by its content (`item_key`), so two runs pair only the items they share."""
    from mlflow.artifacts import download_artifacts

    client = _reader(uri)
    out: dict[str, dict[str, bool]] = {}
    for artifact in client.list_artifacts(run_id, "samples"):
        name = Path(artifact.path).name
        if not (name.startswith("samples_") and name.endswith(".jsonl")):
            continue
        local = Path(
            download_artifacts(run_id=run_id, artifact_path=artifact.path, tracking_uri=uri)
        )
        rows = [json.loads(line) for line in local.read_text().splitlines() if line.strip()]
        out[name[len("samples_") : -len(".jsonl")]] = {
            item_key(r): bool(r["correct"]) for r in rows
        }
    return out


def item_key(row: dict[str, Any]) -> str:
    """An item by its content: the prompt as sent and the target (a row logged without
    them, by an older forgebench, by its doc id)."""
    if "prompt" not in row or "target" not in row:
        return f"doc {row['doc_id']}"
    content = json.dumps([row["prompt"], row["target"]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def register(
    uri: str, name: str, run_id: str, gguf: Path, alias: str, lora: Path | None = None
) -> str:
    """Register a cell's GGUF (logged to its run; on the adapter route with its LoRA GGUF
    beside it) as a model version and point `alias` at it."""
    client = _client(uri)
    if not any(a.path == "gguf" for a in client.list_artifacts(run_id)):
        client.log_artifact(run_id, str(gguf), "gguf")
        if lora is not None:
            client.log_artifact(run_id, str(lora), "gguf")
    with contextlib.suppress(Exception):  # already registered
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/gguf", run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(run_id, "forgebench.registered", f"{name}@{alias} v{version.version}")
    return version.version


def set_alias(uri: str, name: str, alias: str, run_id: str, gguf: Path | None) -> str:
    """Move `alias` to the version registered from `run_id`, registering it first if needed."""
    client = _client(uri)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            client.set_registered_model_alias(name, alias, version.version)
            return version.version
    if gguf is None:
        from harness.errors import ForgebenchError

        raise ForgebenchError(f"run {run_id} has no GGUF to register as {name}")
    return register(uri, name, run_id, gguf, alias)
