"""A run: the plan (harness.plan.cells) handed to an executor (harness.run.executor), each
cell logged to MLflow as its result comes back, cached or not, then the verdicts. A cell
whose stage fails is recorded as failed with its reason; the other cells go on. A failed
reference leaves the cell unjudged, not failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import toolchain, track
from harness.judge import evidence
from harness.plan.cells import Cell, plan
from harness.plan.store import Store
from harness.run.executor import Executor, Serial
from harness.run.outcomes import CellResult, Reporter, RunSummary
from harness.sources import templates
from harness.spec import Spec


def run(
    spec: Spec,
    spec_path: Path,
    store: Store,
    reporter: Reporter,
    fail_fast: bool = False,
    executor: Executor | None = None,
) -> RunSummary:
    executor = executor or Serial()
    cells = plan(spec)
    executor.prepare(spec, cells)
    by_name = {cell.name: cell for cell in cells}
    results: list[CellResult] = []
    with track.Experiment(spec, spec_path, reporter.notice) as experiment:
        work = executor.run(spec, cells, store, reporter)
        try:
            for result in work:
                cell = by_name[result.cell]
                result.run_id = experiment.log_cell(
                    cell,
                    result,
                    _lineage(store, cell),
                    _artifacts(store, cell, result),
                    chat_template=store.path(cell.calls["resolve"]) / templates.FILE,
                )
                results.append(result)
                if fail_fast and result.status != "done":
                    break
        finally:
            work.close()
        results.sort(key=lambda result: cells.index(by_name[result.cell]))  # plan order
        summary = RunSummary(
            spec.name,
            results,
            dict(executor.executed),
            experiment.uri,
            experiment.parent_id,
            str(store.root),
        )
        summary.verdicts, summary.verdict_error = evidence.verdicts(
            spec, [by_name[result.cell] for result in results], results, store
        )
        experiment.tag_verdicts(summary.verdicts, evidence.primary_task(spec))
        experiment.finish(summary)
        summary.tracking_lost = experiment.lost
    return summary


def _artifacts(store: Store, cell: Cell, result: CellResult) -> list[tuple[str, Path]]:
    """Files worth keeping beside a cell's run: per-item samples (for paired comparisons
    later: the gate), the PyTorch reference's samples, the chat check's exchange and export
    parity diff, the Modelfile a user can `ollama create -f`."""
    wanted = [
        ("evaluate", "samples", "samples_*.jsonl"),
        ("reference", "samples_hf", "samples_*.jsonl"),
        ("check", "serve", "verdict.json"),
        ("check", "serve", "parity_diff.txt"),
        ("check", "serve", "Modelfile"),
        ("bench", "bench", "requests.jsonl"),
    ]
    out = []
    for stage, folder, pattern in wanted:
        if _ok(result, stage):
            out += [(folder, path) for path in sorted(store.path(cell.calls[stage]).glob(pattern))]
    return out


def _ok(result: CellResult, stage: str) -> bool:
    outcome = result.stages.get(stage)
    return outcome is not None and not outcome.error


def _lineage(store: Store, cell: Cell) -> dict[str, Any]:
    """Where the base came from, and the files the cell served with their sha256 (from the
    store's manifests): the GGUF, and on the adapter route the LoRA GGUF beside it."""
    lineage_file = store.path(cell.calls["resolve"]) / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    served = {"gguf": (cell.gguf, "model.gguf")}
    if cell.lora_gguf is not None:
        served["lora_gguf"] = (cell.lora_gguf, "adapter.gguf")
    for name, (call, file) in served.items():
        if store.has(call):
            lineage[f"{name}_sha256"] = store.manifest(call)["outputs"].get(file, "")
    if cell.lora_gguf is not None:
        lineage["lora_gguf"] = str(store.path(cell.lora_gguf) / "adapter.gguf")
    return {**lineage, "llama_cpp": toolchain.revision()}
