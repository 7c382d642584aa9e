"""The chain of stages, the only place that knows their order.

    resolve -> train -> merge -> convert (F16) -> quantize       builds the cell's GGUF
            -> reference_base, reference                          the HF models scored in PyTorch
            -> check -> evaluate -> settle -> bench               on the served model
            -> drift_base (F16, once per adapter) -> drift        llama-perplexity, offline
            -> drift_tuning                                       tuned F16 vs untuned F16

`plan()` expands a spec into cells (one per LoRA config x quant level, plus
the untuned base at every level) whose stage calls share keys wherever their
inputs agree, so N adapters x M levels train N adapters and convert N models.
A cell's `calls` map a role to a stage call; a role is the stage's name except
where one stage serves twice (`reference_base` and `drift_tuning` run the
reference and drift stages on the untuned side of the training link). `run()`
executes every cell, reusing what the store already holds, and logs every cell
to MLflow, cached or not. A cell whose stage fails is recorded as failed with its
reason; the other cells go on. A failed reference leaves the cell unjudged, not failed.
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

from harness import backends, host, keys, quant, sources, templates, toolchain
from harness.errors import ForgebenchError, StageError
from harness.spec import LoraSpec, Spec
from harness.store import StageCall, Store, sha256_file

BUILD = ("resolve", "train", "merge", "convert", "quantize")
REFERENCES = ("reference_base", "reference")
"""PyTorch scores of the untuned base and of the cell's own HF model: the chain's start."""
SERVED = ("check", "evaluate", "settle", "bench")
"""Stages that need the cell's model deployed on a backend."""
STAGES = (*BUILD, *REFERENCES, *SERVED, "drift_base", "drift", "drift_tuning")
ADVISORY = (*REFERENCES, "drift_tuning")
"""Roles whose failure leaves the cell unjudged (or a note missing), not failed."""
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
    """Expand a spec into its cells without running or importing anything heavy.

    Within an adapter the F16 cell comes first: the other levels are judged, and their
    contested items settled, against it."""
    base = spec.base.model_dump(mode="json")
    template = templates.given(spec)
    resolve = StageCall(
        "resolve",
        {"base": {**base, **sources.identity(base)}, "chat_template": template and template.text},
        versions=_versions("transformers", "gguf") | keys.versions("resolve"),
    )
    data = _data_identity(spec)
    backend = backends.resolve_name(spec.serve.backend) if spec.serves else ""
    adapters: list[LoraSpec | None] = ([None] if spec.control else []) + list(spec.lora)
    levels = sorted(spec.quant, key=lambda level: level != quant.REFERENCE)
    trust = spec.base.trust_remote_code
    base_f16 = StageCall(
        "convert", {"outtype": quant.REFERENCE}, {"model": resolve}, keys.versions("convert")
    )
    base_reference = _reference(spec, resolve)
    cells = []
    for lora in adapters:
        calls: dict[str, StageCall] = {"resolve": resolve}
        model = resolve
        if lora is not None:
            calls["train"] = StageCall(
                "train",
                {
                    "lora": lora.settings(),
                    "train": {
                        **spec.train.model_dump(mode="json", exclude={"checkpoint_every"}),
                        "precision": keys.resolved_precision(spec.train.precision),
                    },
                    "data": data,
                    "trust_remote_code": trust,
                },
                {"base": resolve},
                _versions("torch", "transformers", "peft") | keys.versions("train"),
                runtime={"checkpoint_every": spec.train.checkpoint_every},
            )
            model = calls["merge"] = StageCall(
                "merge",
                {"trust_remote_code": trust},
                {"base": resolve, "adapter": calls["train"]},
                _versions("torch", "transformers", "peft") | keys.versions("merge"),
            )
        f16 = calls["convert"] = (
            StageCall(
                "convert", {"outtype": quant.REFERENCE}, {"model": model}, keys.versions("convert")
            )
            if lora is not None
            else base_f16
        )
        references = {}
        if base_reference is not None:
            if lora is not None:
                references["reference_base"] = base_reference
            references["reference"] = _reference(spec, model)
        f16_settle = None
        for level in levels:
            cell_calls = dict(calls)
            if level != quant.REFERENCE:
                cell_calls["quantize"] = StageCall(
                    "quantize", {"level": level}, {"gguf": f16}, keys.versions("quantize")
                )
            cell_calls |= references
            judge_by = references.get("reference") if level == quant.REFERENCE else f16_settle
            measured = _measurements(spec, cell_calls, model, f16, backend, judge_by)
            if level == quant.REFERENCE:
                f16_settle = measured.get("settle")
                if lora is not None and "drift" in spec.measure:
                    measured["drift_tuning"] = _tuning_drift(spec, f16, base_f16)
            cells.append(Cell(lora, level, cell_calls | measured, backend))
    return cells


def unique_calls(cells: list[Cell]) -> dict[str, StageCall]:
    """Every stage call the cells need, once by key, with the inputs no cell names as a role
    (the untuned F16 and its logits that drift_tuning reads when control is off)."""
    out: dict[str, StageCall] = {}
    todo = [call for cell in cells for call in cell.calls.values()]
    while todo:
        call = todo.pop(0)
        if call.key not in out:
            out[call.key] = call
            todo += call.inputs.values()
    return out


def _reference(spec: Spec, model: StageCall) -> StageCall | None:
    """The PyTorch score of an HF model folder, on the items the served cells are scored on."""
    if "evaluate" not in spec.measure:
        return None
    tasks = spec.evaluate.all_tasks
    return StageCall(
        "reference",
        {
            "evaluate": _evaluate_identity(spec),
            "data": _data_identity(spec),
            "system": spec.serve.system,
            "trust_remote_code": spec.base.trust_remote_code,
            "dtype": "bf16" if keys.gpu_visible() else "fp32",
        },
        {"model": model},
        _versions("torch", "transformers", "lm-eval") | keys.versions("reference", tasks=tasks),
    )


def _tuning_drift(spec: Spec, f16: StageCall, base_f16: StageCall) -> StageCall:
    """How far training moved the model on general text: the tuned F16 against the
    untuned F16, as drift measures a level against its F16."""
    drift = spec.drift.model_dump(mode="json")
    untuned = StageCall(
        "drift_base", {"drift": drift}, {"gguf": base_f16}, keys.versions("drift_base")
    )
    return StageCall(
        "drift", {"drift": drift}, {"gguf": f16, "reference": untuned}, keys.versions("drift")
    )


def _measurements(
    spec: Spec,
    calls: dict[str, StageCall],
    model: StageCall,
    f16: StageCall,
    backend: str,
    judge_by: StageCall | None = None,
) -> dict[str, StageCall]:
    """The measuring stages the spec asks for, keyed on the cell's GGUF and how it is served.
    `judge_by` holds the rows the cell's contested items are settled against."""
    gguf = calls.get("quantize") or f16
    # keep decides what happens after measuring, not what is measured; the template is the
    # model folder's (resolve's key holds the spec's text)
    exclude = {"keep", "chat_template"}
    served = {"serve": spec.serve.model_dump(mode="json", exclude=exclude), "backend": backend}
    out: dict[str, StageCall] = {}
    if "check" in spec.measure:
        from harness.stages import check

        out["check"] = StageCall(
            "check",
            {**served, "probe": check.CONVERSATION, "max_tokens": check.MAX_TOKENS},
            {"gguf": gguf, "model": model},
            keys.versions("check", backend),
        )
    if "evaluate" in spec.measure:
        scoring = {**served, "evaluate": _evaluate_identity(spec), "data": _data_identity(spec)}
        tasks = spec.evaluate.all_tasks
        out["evaluate"] = StageCall(
            "evaluate",
            scoring,
            {"gguf": gguf, "model": model},
            _versions("lm-eval") | keys.versions("evaluate", backend, tasks),
        )
        if judge_by is not None:
            out["settle"] = StageCall(
                "settle",
                scoring,
                {"gguf": gguf, "model": model, "evaluate": out["evaluate"], "reference": judge_by},
                _versions("lm-eval") | keys.versions("settle", backend, tasks),
            )
    if "bench" in spec.measure:
        out["bench"] = StageCall(
            "bench",
            {**served, "bench": spec.bench.model_dump(mode="json"), "machine": host.machine()},
            {"gguf": gguf, "model": model},
            keys.versions("bench", backend),
        )
    if "drift" in spec.measure and gguf is not f16:
        drift = spec.drift.model_dump(mode="json")
        out["drift_base"] = StageCall(
            "drift_base", {"drift": drift}, {"gguf": f16}, keys.versions("drift_base")
        )
        out["drift"] = StageCall(
            "drift",
            {"drift": drift},
            {"gguf": gguf, "reference": out["drift_base"]},
            keys.versions("drift"),
        )
    return out


def _evaluate_identity(spec: Spec) -> dict[str, Any]:
    evaluate = spec.evaluate.model_dump(mode="json")
    for task in spec.evaluate.all_tasks:
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
    """The failure's first line: the cell's reason on the console and in the table."""
    detail: str | None = None
    """The whole message, where it says more than its first line (a dead server's last
    log lines): the full reason, in MLflow."""
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
    from harness import evidence, tracking

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
                cell,
                result,
                _lineage(store, cell),
                _artifacts(store, cell, result),
                chat_template=store.path(cell.calls["resolve"]) / templates.FILE,
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
        summary.verdicts, summary.verdict_error = evidence.verdicts(
            spec, cells[: len(results)], results, store
        )
        experiment.tag_verdicts(summary.verdicts, primary_task(spec))
        experiment.finish(summary)
    return summary


def primary_task(spec: Spec) -> str | None:
    from harness import evidence

    return evidence.primary_task(spec)


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
                chat_template=self.tokenizer.chat_template,  # resolve saw to it that one is there
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
    """Run a cell's stages in order; a build failure ends the cell, a check that fails or
    errors makes it "broken" or failed and ends its served stages (nothing is scored on a
    model that is not a working chat model), a failed measurement marks it failed, and a
    failed reference only leaves it to be judged "unjudged"."""
    stages: dict[str, Outcome] = {}
    status, error = "done", None
    for role, call in cell.calls.items():
        if role in SERVED and status != "done":
            continue
        if call.key not in outcomes:
            missing = _inputs(call, store, reporter, outcomes, executed)
            if missing:
                if role == "settle":  # its reference cell failed: nothing to settle against
                    continue
                outcomes[call.key] = Outcome(call.key, False, 0.0, error=missing)
            else:
                reporter.stage_started(cell, role, store.has(call))
                extra = {"served": served} if role in SERVED else {}
                outcomes[call.key] = _execute(call, store, reporter, executed, **extra)
                reporter.stage_finished(cell, role, outcomes[call.key])
        outcome = stages[role] = outcomes[call.key]
        if outcome.error and role not in ADVISORY:
            status, error = "failed", f"{role}: {outcome.error}"
            if role in BUILD:
                return CellResult(cell.name, cell.adapter, cell.quant, status, stages, error=error)
        elif role == "check" and not outcome.metrics.get("check_ok"):
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


def _inputs(
    call: StageCall,
    store: Store,
    reporter: Reporter,
    outcomes: dict[str, Outcome],
    executed: Counter,
) -> str | None:
    """Build what `call` reads that is not in the store yet (a cell may read another
    cell's output: drift_tuning the untuned F16's logits); why not, when it cannot be had.
    Served outputs of other cells are never built here: they need that cell's model."""
    for dep in call.inputs.values():
        if store.has(dep):
            continue
        if dep.key in outcomes:
            if outcomes[dep.key].error:
                return f"its input {dep.stage} failed: {outcomes[dep.key].error}"
            continue
        if dep.stage in SERVED:
            return f"its input {dep.stage} ({dep.key}) has not been measured"
        if missing := _inputs(dep, store, reporter, outcomes, executed):
            return missing
        outcomes[dep.key] = _execute(dep, store, reporter, executed)
        if outcomes[dep.key].error:
            return f"its input {dep.stage} failed: {outcomes[dep.key].error}"
    return None


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
        whole = str(exc).strip()
        message = whole.splitlines()[0] if whole else type(exc).__name__
        return Outcome(
            call.key,
            False,
            time.perf_counter() - started,
            error=message,
            detail=whole if whole != message else None,
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
    """Files worth keeping beside a cell's run: per-item samples (the settled ones where
    contested items were re-scored, for paired comparisons later), the PyTorch
    reference's samples, the chat check's exchange and export parity diff, the Modelfile
    a user can `ollama create -f`."""
    samples = "settle" if _ok(result, "settle") else "evaluate"
    wanted = [
        (samples, "samples", "samples_*.jsonl"),
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
    lineage_file = store.path(cell.calls["resolve"]) / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    return {**lineage, "llama_cpp": toolchain.revision()}
