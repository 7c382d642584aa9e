"""Merge route against adapter route, cell by cell: the same adapter at the same level,
shipped merged into the weights or as a LoRA GGUF beside the base GGUF.

No other tool measures both on the same items (seed 004: users choose blind). Accuracy is
compared on the items both cells were scored on: the adapter route's drop against the
merge route with its 95% interval (`harness.judge.paired`, as `check` compares a candidate with
its baseline); KLD is each route's own, to the F16 of its route.
The rest are the cells' own figures from MLflow: decode tok/s, TTFT, memory, the bytes a
user ships (base plus LoRA on the adapter route) and the seconds its files took to build.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.chain import ADAPTER, MERGE, ROUTE_BUILD
from harness.judge import paired as paired_stats
from harness.report.comparison import Comparison, Items, both, paired_on, paired_text
from harness.track import Invocation, RunView, primary_task

BUILD_STAGES = ROUTE_BUILD
"""The stages whose files differ between the routes (training is the same for both). A
base file the adapter route shares between adapters is counted in full for each."""
COLUMNS = (
    ("pair", "adapter, level"),
    ("accuracy", "accuracy merge / adapter"),
    ("paired", "paired: lost, gained, drop [95% interval]"),
    ("kld", "KLD to own F16"),
    ("decode", "decode tok/s"),
    ("ttft", "TTFT p95 ms"),
    ("memory", "memory MB"),
    ("size", "files MB"),
    ("build", "build s"),
)


@dataclass
class Pair:
    adapter: str
    quant: str
    merge: RunView
    adapter_row: RunView
    task: str | None
    paired: paired_stats.Table | None
    """Merge (reference) against adapter on the items both scored; None when either cell
    has no per-item samples for the task."""


def pairs(inv: Invocation, items: Items) -> list[Pair]:
    """Every adapter x level run on both routes, in the report's row order. `items` gives a
    row's per-item correctness by task (from its samples artifacts)."""
    task = primary_task(inv.rows)
    by = {(r.adapter, r.route, r.quant): r for r in inv.rows}
    out = []
    for row in inv.rows:
        other = by.get((row.adapter, ADAPTER, row.quant))
        if row.route != MERGE or other is None:
            continue
        paired = paired_on(task, row, other, items)
        out.append(Pair(row.adapter, row.quant, row, other, task, paired))
    return out


NOTE = (
    "Each figure merge / adapter. Paired: the items both were scored on, those the merged "
    "cell got right and the adapter cell wrong, the reverse, the adapter route's drop with its "
    "95% interval (Newcombe's hybrid score). Files: what "
    "ships (base GGUF plus LoRA GGUF on the adapter route). Build: seconds of merge, "
    "convert, convert_lora and quantize (training is the same for both routes)."
)


def section(inv: Invocation, items: Items) -> Comparison:
    return Comparison(
        "routes",
        "Merge route against adapter route",
        NOTE,
        COLUMNS,
        [values(p) for p in pairs(inv, items)],
    )


def values(pair: Pair) -> dict[str, str]:
    rows = (pair.merge, pair.adapter_row)

    def build(row: RunView) -> float | None:
        times = [row.metrics.get(f"time_{stage}_s") for stage in BUILD_STAGES]
        return sum(t for t in times if t is not None) if any(times) else None

    return {
        "pair": f"{pair.adapter} {pair.quant}",
        "accuracy": both(rows, ".3f", lambda r: r.accuracy(pair.task)),
        "paired": paired_text(pair.paired),
        "kld": both(rows, ".4f", "kld_mean"),
        "decode": both(rows, ".1f", "decode_tps_p50"),
        "ttft": both(rows, ".0f", "ttft_ms_p95"),
        "memory": both(rows, ".0f", "memory_mb"),
        "size": both(rows, ".1f", "gguf_mb"),
        "build": both(rows, ".1f", build),
    }
