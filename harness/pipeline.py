"""The chain of stages, the only place that knows their order.

    resolve -> train -> merge -> convert (F16) -> quantize       builds the cell's GGUF
            -> check -> evaluate -> bench                         on the served model
            -> drift_base (F16, once per adapter) -> drift        llama-perplexity, offline

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

from harness import backends, host, quant, sources, toolchain
from harness.errors import ForgebenchError, StageError
from harness.spec import LoraSpec, Spec
from harness.store import StageCall, Store, sha256_file

BUILD = ("resolve", "train", "merge", "convert", "quantize")
SERVED = ("check", "evaluate", "bench")
"""Stages that need the cell's model deployed on a backend."""
STAGES = (*BUILD, *SERVED, "drift_base", "drift")
CONTROL = "base"
"""The adapter name of the control cells, which run the untuned base."""


@dataclass(frozen=True)
class Cell:
    lora: LoraSpec | None
    quant: str
    calls: dict[str, StageCall]
    """stage name -> call, in chain order; only the stages this cell needs."""
    backend: str = "llamacpp"

    @property
    def adapter(self) -> str:
        return self.lora.name if self.lora else CONTROL

    @property
    def name(self) -> str:
        return f"{self.adapter}-{self.quant}"

    @property
    def gguf(self) -> StageCall:
        """The call whose output folder holds this cell's model.gguf."""
        return self.calls.get("quantize") or self.calls["convert"]

    @property
    def model(self) -> StageCall:
        """The call whose output holds the HF folder (tokenizer, chat template)."""
        return self.calls.get("merge") or self.calls["resolve"]


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
    backend = backends.resolve_name(spec.serve.backend) if set(SERVED) & set(spec.measure) else ""
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
                    "train": spec.train.model_dump(mode="json", exclude={"checkpoint_every"}),
                    "data": data,
                    "trust_remote_code": trust,
                },
                {"base": resolve},
                _versions("torch", "transformers", "peft"),
                runtime={"checkpoint_every": spec.train.checkpoint_every},
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
            cell_calls |= _measurements(spec, cell_calls, model, f16, backend, llama_cpp)
            cells.append(Cell(lora, level, cell_calls, backend))
    return cells


def _measurements(
    spec: Spec,
    calls: dict[str, StageCall],
    model: StageCall,
    f16: StageCall,
    backend: str,
    llama_cpp: dict[str, str],
) -> dict[str, StageCall]:
    """The measuring stages the spec asks for, keyed on the cell's GGUF and how it is served."""
    gguf = calls.get("quantize") or f16
    # keep decides what happens after measuring, not what is measured
    served = {"serve": spec.serve.model_dump(mode="json", exclude={"keep"}), "backend": backend}
    if spec.serve.chat_template is not None:
        if not spec.serve.chat_template.is_file():
            raise ForgebenchError(
                f"serve.chat_template: file not found: {spec.serve.chat_template}"
            )
        served["chat_template_sha256"] = sha256_file(spec.serve.chat_template)
    out: dict[str, StageCall] = {}
    if "check" in spec.measure:
        from harness.stages import check

        out["check"] = StageCall(
            "check",
            {**served, "probe": check.CONVERSATION, "max_tokens": check.MAX_TOKENS},
            {"gguf": gguf, "model": model},
            llama_cpp,
        )
    if "evaluate" in spec.measure:
        out["evaluate"] = StageCall(
            "evaluate",
            {**served, "evaluate": _evaluate_identity(spec), "data": _data_identity(spec)},
            {"gguf": gguf, "model": model},
            {**llama_cpp, **_versions("lm-eval")},
        )
    if "bench" in spec.measure:
        out["bench"] = StageCall(
            "bench",
            {**served, "bench": spec.bench.model_dump(mode="json"), "machine": host.machine()},
            {"gguf": gguf, "model": model},
            llama_cpp,
        )
    if "drift" in spec.measure and gguf is not f16:
        drift = spec.drift.model_dump(mode="json")
        out["drift_base"] = StageCall("drift_base", {"drift": drift}, {"gguf": f16}, llama_cpp)
        out["drift"] = StageCall(
            "drift", {"drift": drift}, {"gguf": gguf, "reference": out["drift_base"]}, llama_cpp
        )
    return out


def _evaluate_identity(spec: Spec) -> dict[str, Any]:
    evaluate = spec.evaluate.model_dump(mode="json")
    for task in spec.evaluate.tasks:
        if not isinstance(task, str):
            if not task.path.is_file():
                raise ForgebenchError(f"evaluate.tasks: {task.name}: file not found: {task.path}")
            evaluate.setdefault("task_sha256", {})[task.name] = sha256_file(task.path)
    return evaluate


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


class Quiet:
    """A reporter that shows nothing, for library use and scripts."""

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
    status: str  # "done", "broken" (failed the chat check) or "failed"
    stages: dict[str, Outcome]
    gguf: str | None = None
    gguf_bytes: int | None = None
    error: str | None = None
    run_id: str | None = None
    deployed: str | None = None
    """The Ollama model left in place (serve.keep), for `ollama run`."""


@dataclass
class RunSummary:
    experiment: str
    cells: list[CellResult]
    executed: dict[str, int]
    """Stage calls actually run (not taken from the store), by stage name."""
    tracking_uri: str
    parent_run_id: str
    store: str
    verdicts: dict[str, Any] = field(default_factory=dict)
    """cell name -> harness.verdict.Verdict"""
    verdict_error: str | None = None

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.status != "done"]


def run(
    spec: Spec, spec_path: Path, store: Store, reporter: Reporter, fail_fast: bool = False
) -> RunSummary:
    from harness import tracking

    cells = plan(spec)
    outcomes: dict[str, Outcome] = {}
    executed: Counter = Counter()
    results = []
    with tracking.Experiment(spec, spec_path) as experiment:
        for cell in cells:
            with Served(spec, cell, store) as served:
                result = _run_cell(cell, store, reporter, outcomes, executed, served)
                if served.kept and result.status == "done":
                    try:
                        result.deployed = served.deploy().deployment.model_name
                    except ForgebenchError as exc:
                        result.status, result.error = "failed", f"serve.keep: {exc}"
            result.run_id = experiment.log_cell(
                cell, result, _lineage(store, cell), _artifacts(store, cell, result)
            )
            results.append(result)
            if fail_fast and result.status != "done":
                break
        summary = RunSummary(
            spec.name,
            results,
            dict(executed),
            experiment.uri,
            experiment.parent_id,
            str(store.root),
        )
        summary.verdicts, summary.verdict_error = _verdicts(
            spec, cells[: len(results)], results, store
        )
        experiment.tag_verdicts(summary.verdicts, _primary_task(spec))
        experiment.finish(summary)
    return summary


def _primary_task(spec: Spec) -> str | None:
    if "evaluate" not in spec.measure or not spec.evaluate.tasks:
        return None
    first = spec.evaluate.tasks[0]
    return first if isinstance(first, str) else first.name


def _verdicts(
    spec: Spec, cells: list[Cell], results: list[CellResult], store: Store
) -> tuple[dict[str, Any], str | None]:
    """Judge every cell; a spec that cannot be judged (no F16 cell) says why instead."""
    from harness import verdict

    figures = []
    for cell, result in zip(cells, results, strict=True):
        metrics = {k: v for o in result.stages.values() for k, v in o.metrics.items()}
        fig = verdict.Figures(
            cell.name,
            cell.adapter,
            cell.quant,
            status=result.status,
            error=result.error,
            decode_tps=metrics.get("decode_tps_p50"),
            ttft_ms_p95=metrics.get("ttft_ms_p95"),
            memory_mb=metrics.get("memory_mb"),
            kld_mean=metrics.get("kld_mean"),
        )
        evaluate = result.stages.get("evaluate")
        if evaluate is not None and not evaluate.error:
            folder = store.path(cell.calls["evaluate"])
            for task in _task_names(spec):
                if f"accuracy_{task}" in metrics:
                    fig.accuracy[task] = metrics[f"accuracy_{task}"]
                    fig.items[task] = _paired_items(folder / f"samples_{task}.jsonl")
        figures.append(fig)
    try:
        return verdict.judge(figures, spec.budgets), None
    except ForgebenchError as exc:
        return {}, str(exc)


def _task_names(spec: Spec) -> list[str]:
    return [t if isinstance(t, str) else t.name for t in spec.evaluate.tasks]


def _paired_items(samples: Path) -> dict[str, bool]:
    if not samples.is_file():
        return {}
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {str(r["doc_id"]): bool(r["correct"]) for r in rows}


class Served:
    """The cell's model on its backend, deployed only when a served stage has work to do."""

    def __init__(self, spec: Spec, cell: Cell, store: Store):
        self.spec, self.cell, self.store = spec, cell, store
        self.gguf = store.path(cell.gguf) / "model.gguf"
        self.config: backends.ServeConfig | None = None
        self.backend: backends.Backend | None = None
        self.deployment: backends.Deployment | None = None
        self.tokenizer = None

    def __enter__(self) -> Served:
        return self

    def deploy(self) -> Served:
        if self.deployment is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                self.store.path(self.cell.model) / "model",
                trust_remote_code=self.spec.base.trust_remote_code,
            )
            config = backends.ServeConfig(
                model_name=backends.model_name(
                    self.spec.name,
                    self.cell.lora.name if self.cell.lora else None,
                    self.cell.quant,
                    self.spec.base.ollama,
                ),
                chat_template=(
                    self.spec.serve.chat_template.read_text()
                    if self.spec.serve.chat_template
                    else self.tokenizer.chat_template or ""
                ),
                system=self.spec.serve.system,
                parameters=dict(self.spec.serve.parameters),
                slots=self.spec.serve.slots,
            )
            self.config = config
            self.backend = backends.get(self.cell.backend)
            self.deployment = self.backend.deploy(self.gguf, config)
        return self

    def __exit__(self, *exc) -> None:
        if self.backend is not None:
            try:
                if self.deployment is not None and not self.kept:
                    self.backend.remove(self.deployment)
            finally:
                self.backend.close()

    @property
    def kept(self) -> bool:
        """serve.keep leaves an Ollama model in place for `ollama run`; a llama-server
        cannot outlive the run."""
        return self.spec.serve.keep and self.cell.backend == "ollama"


def _run_cell(
    cell: Cell,
    store: Store,
    reporter: Reporter,
    outcomes: dict[str, Outcome],
    executed: Counter,
    served: Served,
) -> CellResult:
    """Run a cell's stages in order; a build failure ends the cell, a failed template
    check makes it "broken" (not scored), a failed measurement marks it failed."""
    stages: dict[str, Outcome] = {}
    status, error = "done", None
    for stage, call in cell.calls.items():
        if stage in SERVED and status == "broken":
            continue
        if call.key not in outcomes:
            reporter.stage_started(cell, stage, store.has(call))
            extra = {"served": served} if stage in SERVED else {}
            outcomes[call.key] = _execute(call, store, reporter, executed, **extra)
            reporter.stage_finished(cell, stage, outcomes[call.key])
        outcome = stages[stage] = outcomes[call.key]
        if outcome.error:
            status, error = "failed", f"{stage}: {outcome.error}"
            if stage in BUILD:
                return CellResult(cell.name, cell.adapter, cell.quant, status, stages, error=error)
        elif stage == "check" and not outcome.metrics.get("check_ok"):
            status, error = "broken", f"check: {outcome.metrics.get('check_reasons')}"
    gguf = store.path(cell.gguf) / "model.gguf"
    return CellResult(
        cell.name,
        cell.adapter,
        cell.quant,
        status,
        stages,
        gguf=str(gguf),
        gguf_bytes=gguf.stat().st_size,
        error=error,
    )


def _execute(
    call: StageCall, store: Store, reporter: Reporter, executed: Counter, **extra: Any
) -> Outcome:
    if store.has(call):
        return _cached_outcome(call, store)
    inputs = {name: store.path(dep) for name, dep in call.inputs.items()}
    module = importlib.import_module(f"harness.stages.{call.stage}")
    started = time.perf_counter()
    try:
        with store.lock(call):
            if store.has(call):  # another process built it while we waited
                return _cached_outcome(call, store)
            with store.building(call) as out:
                if call.runtime.get("checkpoint_every"):
                    extra |= {"scratch": store.scratch(call), **call.runtime}
                metrics = module.run(call.settings, inputs, out, reporter.stage_progress, **extra)
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


def ensure(call: StageCall, store: Store, reporter: Reporter) -> Path:
    """Build one call and what it depends on, unless the store has them; its output folder."""
    for dep in call.inputs.values():
        ensure(dep, store, reporter)
    outcome = _execute(call, store, reporter, Counter())
    if outcome.error:
        raise StageError(f"{call.stage}: {outcome.error}")
    return store.path(call)


def _cached_outcome(call: StageCall, store: Store) -> Outcome:
    folder = store.path(call)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Outcome(call.key, True, store.manifest(call)["seconds"], metrics)


def _artifacts(store: Store, cell: Cell, result: CellResult) -> list[tuple[str, Path]]:
    """Files worth keeping beside a cell's run: per-item samples (for paired comparisons
    later), the chat check's exchange, the Modelfile a user can `ollama create -f`."""
    wanted = [
        ("evaluate", "samples", "samples_*.jsonl"),
        ("check", "serve", "verdict.json"),
        ("check", "serve", "Modelfile"),
        ("bench", "bench", "requests.jsonl"),
    ]
    out = []
    for stage, folder, pattern in wanted:
        outcome = result.stages.get(stage)
        if outcome is not None and not outcome.error:
            out += [(folder, path) for path in sorted(store.path(cell.calls[stage]).glob(pattern))]
    return out


def _lineage(store: Store, cell: Cell) -> dict[str, Any]:
    lineage_file = store.path(cell.calls["resolve"]) / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    return {**lineage, "llama_cpp": toolchain.revision()}
