"""Finished cells as MLflow holds them: what `best`, `check` and `report` read.

Everything comes from the tracking server, not the local store, so a report
can be rebuilt anywhere the MLflow server is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness import quant
from harness.chain import CONTROL, MERGE
from harness.track import reader
from harness.track.reader import RunView


@dataclass
class Invocation:
    experiment: str
    tracking_uri: str
    run_id: str
    tags: dict[str, str]
    rows: list[RunView]
    """Its cells: the control adapter's first, then by adapter, route and level."""


def load(uri: str, experiment: str, run_id: str | None = None) -> Invocation:
    """The latest invocation of `experiment` (or the one named), with all its cells."""
    parent, rows = reader.invocation(uri, experiment, run_id)
    rows.sort(
        key=lambda r: (
            r.adapter != CONTROL,
            r.adapter,
            r.route != MERGE,
            quant.rank(r.level),
            bool(r.setting),  # a level's serving settings after it
            r.cell,
        )
    )
    return Invocation(experiment, uri, parent.run_id, parent.tags, rows)
