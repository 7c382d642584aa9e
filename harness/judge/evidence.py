"""What the verdicts read from a finished run: each cell's figures and the HF references.

The pipeline runs stages; `harness.judge.verdict` decides. In between, this module
gathers, for every cell, the per-item rows its decision rests on (the evaluate stage's,
each request scored alone on its server, so item by item reproducible), its speed, memory and drift
figures, and, per adapter, the PyTorch reference scores. A figure that should exist
and does not (a samples file missing from a finished stage) is an error of the
cell, never an empty set of items that a paired test would read as "no loss".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.chain import CONTROL
from harness.errors import ForgebenchError
from harness.judge import speed, verdict
from harness.judge.blame import Scores
from harness.plan.cells import Cell
from harness.plan.store import Store
from harness.run.outcomes import CellResult
from harness.spec import Spec


def task_names(spec: Spec) -> list[str]:
    """Every scored task: the spec's tasks, then its guard tasks."""
    return [t if isinstance(t, str) else t.name for t in spec.evaluate.all_tasks]


def guard_names(spec: Spec) -> list[str]:
    return [t if isinstance(t, str) else t.name for t in spec.evaluate.guard]


def primary_task(spec: Spec) -> str | None:
    """The task decisions are shown on: the spec's first."""
    if "evaluate" not in spec.measure or not spec.evaluate.tasks:
        return None
    first = spec.evaluate.tasks[0]
    return first if isinstance(first, str) else first.name


def verdicts(
    spec: Spec, cells: list[Cell], results: list[CellResult], store: Store
) -> tuple[dict[str, Any], str | None]:
    """Judge every cell; a spec that cannot be judged (no F16 cell) says why instead."""
    tasks = task_names(spec) if "evaluate" in spec.measure else []
    figures, references = [], {}
    for cell, result in zip(cells, results, strict=True):
        figures.append(_figures(cell, result, store, tasks, "evaluate" in spec.measure))
        if "reference" in cell.calls and cell.adapter not in references:
            label = "tuned HF" if cell.lora else "untuned HF"
            references[cell.adapter] = _scores(label, cell, result, "reference", store, tasks)
        if "reference_base" in cell.calls and CONTROL not in references:
            references[CONTROL] = _scores(
                "untuned HF", cell, result, "reference_base", store, tasks
            )
    try:
        judged = verdict.judge(figures, spec.budgets, references, tasks, guard_names(spec))
    except ForgebenchError as exc:
        return {}, str(exc)
    return judged, None


def _figures(cell: Cell, result: CellResult, store: Store, tasks: list[str], evaluated: bool):
    def metric(stage: str, name: str) -> float | None:
        outcome = result.stages.get(stage)
        return None if outcome is None or outcome.error else outcome.metrics.get(name)

    check = result.stages.get("check")
    template_broken = check is not None and check.metrics.get("check_template_ok") == 0
    unapplied = check is not None and check.metrics.get("adapter_applied") == 0
    requests = _requests("bench", cell, result, store)
    at = _budget_load(cell)  # a load budget's; none: the load's requests judge nothing
    loaded = _requests("load", cell, result, store) if at else []
    loaded = [r for r in loaded if r.get(at[0]) == at[1]] if at else []
    fig = verdict.Figures(
        cell.name,
        cell.adapter,
        cell.quant,
        status=result.status,
        route=cell.route,
        setting=cell.setting.name if cell.setting else None,
        rescored=bool(cell.setting and cell.setting.answers()),
        error=result.error,
        broken="template" if template_broken else "adapter not applied" if unapplied else None,
        evaluated=evaluated,
        decode_rates=[float(r["decode_tps"]) for r in requests if r.get("decode_tps")],
        ttft_ms=[float(r["ttft_s"]) * 1000 for r in requests if r.get("ttft_s") is not None],
        # llama-server's peak RSS; on Ollama, the size its /api/ps reports for the model
        memory_mb=metric("bench", "memory_mb") or metric("bench", "ollama_ps_size_mb"),
        load=speed.Loaded(
            [float(r["decode_tps"]) for r in loaded if r.get("decode_tps")],
            [float(r["ttft_s"]) * 1000 for r in loaded],
            [tpot_ms(r) for r in loaded],
        ),
        kld_mean=metric("drift", "kld_mean"),
        tuning_kld=metric("drift_tuning", "kld_mean"),
    )
    if result.status != "done" or not evaluated:
        return fig
    try:
        fig.items = {t: paired_items(store.path(cell.calls["evaluate"]), t) for t in tasks}
    except ForgebenchError as exc:
        fig.status, fig.error = "failed", str(exc)
        return fig
    fig.accuracy = {t: sum(items.values()) / len(items) for t, items in fig.items.items() if items}
    return fig


def _budget_load(cell: Cell) -> tuple[str, float] | None:
    """The load a load budget names, as the cell's load stage was keyed with it:
    ("concurrency", users) or ("rate", requests/s), the field its requests carry."""
    load = cell.calls.get("load")
    settings = load.settings["load"] if load is not None else {}
    if settings.get("users"):
        return "concurrency", settings["users"]
    return ("rate", settings["rate"]) if settings.get("rate") else None


def tpot_ms(request: dict) -> float:
    """Time per output token after the first (vLLM's TPOT): what a reader waits between
    tokens once the answer has begun."""
    tokens = max(int(request["tokens"]) - 1, 1)
    return (float(request["e2e_s"]) - float(request["ttft_s"])) * 1000 / tokens


def _requests(stage: str, cell: Cell, result: CellResult, store: Store) -> list[dict]:
    """Each request's figures (decode tok/s, TTFT) from a bench's or load's requests.jsonl."""
    outcome = result.stages.get(stage)
    if outcome is None or outcome.error or stage not in cell.calls:
        return []
    path = store.path(cell.calls[stage]) / "requests.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scores(
    label: str, cell: Cell, result: CellResult, role: str, store: Store, tasks: list[str]
) -> Scores:
    outcome = result.stages.get(role)
    if outcome is None:
        return Scores(label, error=f"{role} did not run")
    if outcome.error:
        return Scores(label, error=f"{role} failed: {outcome.error}")
    try:
        items = {t: paired_items(store.path(cell.calls[role]), t) for t in tasks}
    except ForgebenchError as exc:
        return Scores(label, error=str(exc))
    accuracy = {t: sum(v.values()) / len(v) for t, v in items.items() if v}
    return Scores(label, accuracy, items)


def paired_items(folder: Path, task: str) -> dict[str, bool]:
    """item id -> correct, from a stage's samples file; its absence is an error."""
    samples = folder / f"samples_{task}.jsonl"
    if not samples.is_file():
        raise ForgebenchError(f"{samples.name} is missing from {folder}: rerun to rebuild it")
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {str(r["doc_id"]): bool(r["correct"]) for r in rows}
