"""A side-by-side table of the report: two cells that differ in one thing (the route, or a
quantization recipe against its plain level), with the paired accuracy difference on the
items both were scored on. The pages render every comparison the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from harness.judge import paired as paired_stats
from harness.track import RunView


@dataclass
class Comparison:
    key: str
    """The HTML table's id."""
    title: str
    note: str
    columns: tuple[tuple[str, str], ...]
    """(key, column title) in order."""
    rows: list[dict[str, str]]
    """Each row's text by key."""


Items = Callable[[RunView], dict[str, dict[str, bool]]]
"""A row's per-item correctness by task (from its samples artifacts)."""


def paired_on(
    task: str | None, first: RunView, second: RunView, items: Items
) -> paired_stats.Table | None:
    """`first` (the reference) against `second` on the items both were scored on; None when
    either did not finish or has no per-item samples for the task."""
    if not task or not first.status == second.status == "done":
        return None
    mine, theirs = items(first).get(task, {}), items(second).get(task, {})
    return paired_stats.table(mine, theirs) if mine.keys() & theirs.keys() else None


def both(rows: Sequence[RunView], fmt: str, value: str | Callable[[RunView], float | None]) -> str:
    """The figure of each row, "a / b": a metric's name or a function of the row."""
    got = [r.metrics.get(value) if isinstance(value, str) else value(r) for r in rows]
    return " / ".join("-" if v is None else format(v, fmt) for v in got)


def paired_text(table: paired_stats.Table | None) -> str:
    """ "N items: lost, gained, drop [95% interval]", the second cell's drop from the first's."""
    if table is None:
        return "-"
    lower, upper = table.interval(0.975)  # each side at 97.5%: the two-sided 95% interval
    interval = f"[{lower:+.2f}, {upper:+.2f}]"
    return f"{table.n} items: {table.lost}, {table.gained}, {table.drop:+.2f} {interval}"
