"""settle: re-score, one request at a time, the items a cell and its reference disagree on.

Spec keys: as `evaluate`. Scoring with `evaluate.concurrency` above 1 goes through
llama-server's batched decoding, and a K-quant's matrix kernels sum in a different
order depending on what else is in the batch, so an item can be answered differently
from one run to the next (measured on the quickstart: 46 of 1,200 responses differed
between two identical runs, all at K-quant levels, 3 of them flipping right/wrong).
Only the items on which a cell and its reference disagree decide a paired test, so
those are asked again with nothing else in flight; the verdict reads the settled rows.
That makes verdicts repeatable without paying for a sequential pass over every item.

The reference is the F16 cell's settled rows for a quantized cell, and the PyTorch
reference for the F16 cell (deterministic: fixed batches, greedy).
Each rescored row keeps its batched answer under `batched`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from harness import evals
from harness.stages import Progress
from harness.stages.evaluate import evaluate, scored_tasks, stopped_of, wilson, write_samples

VERSION = 1


def read_rows(folder: Path, task: str) -> list[dict[str, Any]]:
    path = folder / f"samples_{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from {folder}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def disagreements(own: list[dict], reference: list[dict]) -> list[int]:
    ref = {row["doc_id"]: row["correct"] for row in reference}
    return [
        row["doc_id"]
        for row in own
        if row["doc_id"] in ref and ref[row["doc_id"]] != row["correct"]
    ]


def run(
    settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress, served
) -> dict:
    names = [t if isinstance(t, str) else t["name"] for t in scored_tasks(settings)]
    own = {task: read_rows(inputs["evaluate"], task) for task in names}
    contested = {
        task: ids
        for task in names
        if (ids := disagreements(own[task], read_rows(inputs["reference"], task)))
    }
    rescored: dict[str, list[dict]] = {}
    if contested:
        served.deploy()
        progress(
            f"re-scoring {sum(map(len, contested.values()))} contested items, 1 at a time", None
        )
        with tempfile.TemporaryDirectory(prefix="forgebench-settle-") as tmp:
            tasks = [
                t
                for t in evals.prepare(scored_tasks(settings), settings["data"], Path(tmp))
                if t.name in contested
            ]
            again = Path(tmp) / "again"
            again.mkdir()
            evaluate(
                served.deployment.openai_base_url,
                served.deployment.model_name,
                tasks,
                None,
                1,
                again,
                system=settings["serve"].get("system"),
                only=contested,
                stopped=stopped_of(served),
                request_fields=served.deployment.request_fields,
            )
            rescored = {task.name: read_rows(again, task.name) for task in tasks}
    metrics: dict[str, float] = {}
    for task in names:
        rows = _merge(own[task], rescored.get(task, []))
        write_samples(rows, out / f"samples_{task}.jsonl")
        metrics |= _accuracy(task, rows)
        metrics[f"settle_rescored_{task}"] = float(len(contested.get(task, [])))
        metrics[f"settle_changed_{task}"] = float(
            sum(
                1
                for row in rows
                if "batched" in row and row["batched"]["correct"] != row["correct"]
            )
        )
    return metrics


def _merge(rows: list[dict], again: list[dict]) -> list[dict]:
    by_id = {row["doc_id"]: row for row in again}
    merged = []
    for row in rows:
        new = by_id.get(row["doc_id"])
        if new is None:
            merged.append(row)
            continue
        batched = {"response": row["response"], "correct": row["correct"]}
        merged.append({**new, "batched": batched})
    return merged


def _accuracy(task: str, rows: list[dict]) -> dict[str, float]:
    right = sum(bool(row["correct"]) for row in rows)
    low, high = wilson(right, len(rows))
    return {
        f"accuracy_{task}": right / len(rows),
        f"accuracy_{task}_ci_low": low,
        f"accuracy_{task}_ci_high": high,
    }
