"""The chain of stages, the only place that knows their order.

    resolve -> train -> merge -> convert (F16) -> quantize

`plan()` expands a spec into cells (one per LoRA config x quant level, plus
the untuned base at every level) whose stage calls share keys wherever their
inputs agree, so N adapters x M levels train N adapters and convert N models.
`run()` executes every cell, reusing what the store already holds, and logs
every cell to MLflow, cached or not. A cell whose stage fails is recorded as
failed with its reason; the other cells go on.
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from harness import quant, sources, toolchain
from harness.errors import ForgebenchError
from harness.spec import LoraSpec, Spec
from harness.store import StageCall, Store, sha256_file

STAGES = ("resolve", "train", "merge", "convert", "quantize")
CONTROL = "base"
"""The adapter name of the control cells, which run the untuned base."""


@dataclass(frozen=True)
class Cell:
    lora: LoraSpec | None
    quant: str
    calls: dict[str, StageCall]
    """stage name -> call, in chain order; only the stages this cell needs."""

    @property
    def adapter(self) -> str:
        return self.lora.name if self.lora else CONTROL

    @property
    def name(self) -> str:
        return f"{self.adapter}-{self.quant}"

    @property
    def final(self) -> StageCall:
        return list(self.calls.values())[-1]


def _versions(*packages: str) -> dict[str, str]:
    return {p: metadata.version(p) for p in packages}


def plan(spec: Spec) -> list[Cell]:
    """Expand a spec into its cells without running or importing anything heavy."""
    base = spec.base.model_dump(mode="json")
    resolve = StageCall(
        "resolve",
        {"base": {**base, **sources.identity(base)}},
        versions=_versions("transformers", "gguf"),
    )
    llama_cpp = {"llama.cpp": toolchain.revision()}
    data = _data_identity(spec)
    adapters: list[LoraSpec | None] = ([None] if spec.control else []) + list(spec.lora)
    cells = []
    for lora in adapters:
        calls: dict[str, StageCall] = {"resolve": resolve}
        model = resolve
        if lora is not None:
            trust = spec.base.trust_remote_code
            calls["train"] = StageCall(
                "train",
                {
                    "lora": lora.settings(),
                    "train": spec.train.model_dump(mode="json"),
                    "data": data,
                    "trust_remote_code": trust,
                },
                {"base": resolve},
                _versions("torch", "transformers", "peft"),
            )
            model = calls["merge"] = StageCall(
                "merge",
                {"trust_remote_code": trust},
                {"base": resolve, "adapter": calls["train"]},
                _versions("torch", "transformers", "peft"),
            )
        f16 = calls["convert"] = StageCall(
            "convert", {"outtype": quant.REFERENCE}, {"model": model}, llama_cpp
        )
        for level in spec.quant:
            cell_calls = dict(calls)
            if level != quant.REFERENCE:
                cell_calls["quantize"] = StageCall(
                    "quantize", {"level": level}, {"gguf": f16}, llama_cpp
                )
            cells.append(Cell(lora, level, cell_calls))
    return cells


def _data_identity(spec: Spec) -> dict[str, Any]:
    data = spec.data.model_dump(mode="json")
    if spec.data.train is not None:
        if not spec.data.train.is_file():
            raise ForgebenchError(f"data.train: file not found: {spec.data.train}")
        data["train_sha256"] = sha256_file(spec.data.train)
    return data


class Reporter(Protocol):
    """What a front end is told while a run goes on."""

    def stage_started(self, cell: Cell, stage: str, cached: bool) -> None: ...
    def stage_progress(self, message: str, fraction: float | None) -> None: ...
    def stage_finished(self, cell: Cell, stage: str, outcome: Outcome) -> None: ...


@dataclass
class Outcome:
    """One stage call's result in this invocation."""

    key: str
    cached: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None


@dataclass
class CellResult:
    cell: str
    adapter: str
    quant: str
    status: str  # "done" or "failed"
    stages: dict[str, Outcome]
    gguf: str | None = None
    gguf_bytes: int | None = None
    error: str | None = None
    run_id: str | None = None


@dataclass
class RunSummary:
    experiment: str
    cells: list[CellResult]
    executed: dict[str, int]
    """Stage calls actually run (not taken from the store), by stage name."""
    tracking_uri: str
    parent_run_id: str
    store: str

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.status != "done"]


def run(spec: Spec, spec_path: Path, store: Store, reporter: Reporter) -> RunSummary:
    from harness import tracking

    cells = plan(spec)
    outcomes: dict[str, Outcome] = {}
    executed: Counter = Counter()
    results = []
    with tracking.Experiment(spec, spec_path) as experiment:
        for cell in cells:
            result = _run_cell(cell, store, reporter, outcomes, executed)
            result.run_id = experiment.log_cell(cell, result, _lineage(store, cell))
            results.append(result)
        summary = RunSummary(
            spec.name,
            results,
            dict(executed),
            experiment.uri,
            experiment.parent_id,
            str(store.root),
        )
        experiment.finish(summary)
    return summary


def _run_cell(
    cell: Cell, store: Store, reporter: Reporter, outcomes: dict[str, Outcome], executed: Counter
) -> CellResult:
    stages: dict[str, Outcome] = {}
    for stage, call in cell.calls.items():
        if call.key not in outcomes:
            reporter.stage_started(cell, stage, store.has(call))
            outcomes[call.key] = _execute(call, store, reporter, executed)
            reporter.stage_finished(cell, stage, outcomes[call.key])
        outcome = stages[stage] = outcomes[call.key]
        if outcome.error:
            return CellResult(
                cell.name,
                cell.adapter,
                cell.quant,
                "failed",
                stages,
                error=f"{stage}: {outcome.error}",
            )
    gguf = store.path(cell.final) / "model.gguf"
    return CellResult(
        cell.name,
        cell.adapter,
        cell.quant,
        "done",
        stages,
        gguf=str(gguf),
        gguf_bytes=gguf.stat().st_size,
    )


def _execute(call: StageCall, store: Store, reporter: Reporter, executed: Counter) -> Outcome:
    if store.has(call):
        return _cached_outcome(call, store)
    inputs = {name: store.path(dep) for name, dep in call.inputs.items()}
    module = importlib.import_module(f"harness.stages.{call.stage}")
    started = time.perf_counter()
    try:
        with store.building(call) as out:
            metrics = module.run(call.settings, inputs, out, reporter.stage_progress)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one cell's failure must not lose the others
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Outcome(
            call.key,
            False,
            time.perf_counter() - started,
            error=message,
            traceback=traceback.format_exc(),
        )
    executed[call.stage] += 1
    return Outcome(call.key, False, time.perf_counter() - started, metrics)


def _cached_outcome(call: StageCall, store: Store) -> Outcome:
    folder = store.path(call)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Outcome(call.key, True, store.manifest(call)["seconds"], metrics)


def _lineage(store: Store, cell: Cell) -> dict[str, Any]:
    lineage_file = store.path(cell.calls["resolve"]) / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    return {**lineage, "llama_cpp": toolchain.revision()}
