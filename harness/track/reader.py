"""Runs read back from MLflow as plain data: an invocation and its cells, one run, a run
named by id or registered alias, and the per-item correctness its evaluation logged. What
the results, the release gate and the report read; none of them imports mlflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from harness import quant
from harness.chain import ADAPTER, MERGE
from harness.errors import ForgebenchError
from harness.track import connect, schema

AGGREGATE = re.compile(r"^load_c(\d+)_agg_tps$")
"""The load stage's aggregate tok/s at c concurrent streams (harness.stages.load)."""


@dataclasses.dataclass
class RunView:
    """A run as plain data, so readers of results need not import mlflow; for a cell's
    run, what forgebench tagged it with (cell, adapter, level, route, status, verdict)."""

    run_id: str
    name: str
    run_status: str
    """MLflow's: RUNNING, FINISHED, FAILED or KILLED."""
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    loss: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def cell(self) -> str:
        return self.tags.get(schema.CELL, self.name)

    @property
    def adapter(self) -> str:
        return self.tags.get(schema.ADAPTER, "")

    @property
    def quant(self) -> str:
        return self.tags.get(schema.QUANT, "")

    @property
    def route(self) -> str:
        return self.tags.get(schema.ROUTE, MERGE)

    @property
    def setting(self) -> str:
        """A serving setting's name (`ctx8192-np4`); empty at the spec's own setting."""
        return self.tags.get(schema.SETTING, "")

    @property
    def level(self) -> str:
        """The level (or recipe) of the cell's GGUF, without its serving setting."""
        return quant.without_setting(self.quant, self.setting)

    @property
    def status(self) -> str:
        """What the cell came to: "done", "failed" or "broken" (not MLflow's run status)."""
        return self.tags.get(schema.STATUS, "")

    @property
    def verdict(self) -> str:
        return self.tags.get(schema.VERDICT, "")

    @property
    def reasons(self) -> str:
        return self.tags.get(schema.VERDICT_REASONS, "")

    @property
    def line(self) -> str:
        """The adapter as its route ships it (`r8-qv`, `r8-qv-lora`): what plots and the
        quality chain group a level's cells by."""
        return f"{self.adapter}-lora" if self.route == ADAPTER else self.adapter

    @property
    def size_mb(self) -> float | None:
        return self.metrics.get("gguf_mb")

    @property
    def decode_tps(self) -> float | None:
        return self.metrics.get("decode_tps_p50")

    @property
    def throughput(self) -> dict[int, float]:
        """The load's aggregate generated tok/s by concurrency (harness.stages.load)."""
        found = {int(m[1]): v for k, v in self.metrics.items() if (m := AGGREGATE.match(k))}
        return dict(sorted(found.items()))

    def accuracy(self, task: str | None = None) -> float | None:
        task = task or primary_task([self])
        return self.metrics.get(f"accuracy_{task}") if task else None


def primary_task(rows: list[RunView]) -> str | None:
    """The first evaluated task (the spec's first), which decisions are made on."""
    for row in rows:
        if task := row.tags.get(schema.PRIMARY_TASK):
            return task
    return None


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
    client = connect.reader(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ForgebenchError(f"no MLflow experiment {experiment!r} at {uri}; run the spec first")
    if run_id is None:
        parents = client.search_runs(
            [found.experiment_id],
            f"tags.`{schema.RUN_KIND}` = 'invocation'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise ForgebenchError(f"experiment {experiment!r} has no forgebench runs at {uri}")
        run_id = parents[0].info.run_id
    children = client.search_runs(
        [found.experiment_id], f"tags.`{schema.PARENT}` = '{run_id}'", max_results=5000
    )
    return _view(client, client.get_run(run_id), False), [_view(client, r) for r in children]


def run_view(uri: str, run_id: str) -> RunView:
    client = connect.reader(uri)
    return _view(client, client.get_run(run_id))


def resolve_run(uri: str, ref: str) -> str:
    """A run id from a run id or a registered model alias (`models:/NAME@ALIAS` or `NAME@ALIAS`)."""
    client = connect.reader(uri)
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

    client = connect.reader(uri)
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
