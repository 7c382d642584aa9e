"""Finished cells as MLflow holds them: what `best`, `check` and `report` read.

Everything comes from the tracking server, not the local store, so a report
can be rebuilt anywhere the MLflow server is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import quant
from harness.track import reader, schema

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
    route: str = "merge"

    def accuracy(self, task: str | None = None) -> float | None:
        task = task or primary_task([self])
        return self.metrics.get(f"accuracy_{task}") if task else None

    @property
    def line(self) -> str:
        """The adapter as its route ships it (`r8-qv`, `r8-qv-lora`): what plots and the
        quality chain group a level's cells by."""
        return f"{self.adapter}-lora" if self.route == "adapter" else self.adapter

    @property
    def size_mb(self) -> float | None:
        return self.metrics.get("gguf_mb")

    @property
    def decode_tps(self) -> float | None:
        return self.metrics.get("decode_tps_p50")


@dataclass
class Invocation:
    experiment: str
    tracking_uri: str
    run_id: str
    tags: dict[str, str]
    rows: list[Row]


def primary_task(rows: list[Row]) -> str | None:
    """The first evaluated task (the spec's first), which decisions are made on."""
    for row in rows:
        if task := row.tags.get(schema.PRIMARY_TASK):
            return task
    return None


def load(uri: str, experiment: str, run_id: str | None = None) -> Invocation:
    """The latest invocation of `experiment` (or the one named), with all its cells."""
    parent, children = reader.invocation(uri, experiment, run_id)
    rows = [
        Row(
            cell=run.tags.get(schema.CELL, run.name),
            adapter=run.tags.get(schema.ADAPTER, ""),
            quant=run.tags.get(schema.QUANT, ""),
            status=run.tags.get(schema.STATUS, ""),
            verdict=run.tags.get(schema.VERDICT, ""),
            reasons=run.tags.get(schema.VERDICT_REASONS, ""),
            metrics=run.metrics,
            params=run.params,
            tags=run.tags,
            run_id=run.run_id,
            loss=run.loss,
            route=run.tags.get(schema.ROUTE, "merge"),
        )
        for run in children
    ]
    rows.sort(
        key=lambda r: (r.adapter != "base", r.adapter, r.route != "merge", ORDER.get(r.quant, 99))
    )
    return Invocation(experiment, uri, parent.run_id, parent.tags, rows)
