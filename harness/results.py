"""Finished cells as MLflow holds them: what `best`, `check` and `report` read.

Everything comes from the tracking server, not the local store, so a report
can be rebuilt anywhere the MLflow server is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness import quant
from harness.errors import ForgebenchError

ORDER = {level: i for i, level in enumerate(quant.LEVELS)}


@dataclass
class Row:
    cell: str
    adapter: str
    quant: str
    status: str
    verdict: str
    reasons: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    run_id: str
    loss: list[tuple[int, float]] = field(default_factory=list)

    def accuracy(self, task: str | None = None) -> float | None:
        task = task or primary_task([self])
        return self.metrics.get(f"accuracy_{task}") if task else None

    @property
    def size_mb(self) -> float | None:
        return self.metrics.get("gguf_mb")

    @property
    def decode_tps(self) -> float | None:
        return self.metrics.get("decode_tps_p50")


@dataclass
class Invocation:
    experiment: str
    run_id: str
    tags: dict[str, str]
    rows: list[Row]


def primary_task(rows: list[Row]) -> str | None:
    """The first evaluated task (the spec's first), which decisions are made on."""
    for row in rows:
        if task := row.tags.get("forgebench.primary_task"):
            return task
    return None


def load(uri: str, experiment: str, run_id: str | None = None) -> Invocation:
    """The latest invocation of `experiment` (or the one named), with all its cells."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
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
    parent = client.get_run(run_id)
    children = client.search_runs(
        [found.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000
    )
    rows = [_row(client, run) for run in children]
    rows.sort(key=lambda r: (r.adapter != "base", r.adapter, ORDER.get(r.quant, 99)))
    return Invocation(experiment, run_id, dict(parent.data.tags), rows)


def _row(client: Any, run: Any) -> Row:
    tags = dict(run.data.tags)
    loss = []
    if "train_loss" in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        loss = sorted((m.step, m.value) for m in history)
    return Row(
        cell=tags.get("forgebench.cell", run.info.run_name),
        adapter=tags.get("forgebench.adapter", ""),
        quant=tags.get("forgebench.quant", ""),
        status=tags.get("forgebench.status", ""),
        verdict=tags.get("forgebench.verdict", ""),
        reasons=tags.get("forgebench.verdict_reasons", ""),
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=tags,
        run_id=run.info.run_id,
        loss=loss,
    )
