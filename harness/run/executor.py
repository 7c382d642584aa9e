"""Executors run a plan's cells: every stage call built at most once by key (or taken from
the store), each cell's served stages on one deployment (its own, or on the serial
executor its level's shared llama-server on the adapter route), and each cell's result
handed back to the driver as soon as it is complete. Only the driver (pipeline.run)
writes MLflow, so an executor's work can move to other processes without a run left
RUNNING by one that died.

`Serial` runs everything in this process, cell after cell: the default. `chosen` picks
the spec's or the command line's (harness.run.ray runs cells as Ray tasks)."""

from __future__ import annotations

import errno
import importlib
import json
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from typing import Any, Protocol

from harness.chain import ADVISORY, BUILD, SERVED
from harness.errors import ForgebenchError, StageError
from harness.plan import keys
from harness.plan.cells import Cell
from harness.plan.store import StageCall, Store
from harness.run.deployment import Served, Sharing
from harness.run.outcomes import CellResult, Outcome, Reporter
from harness.spec import Spec


class Executor(Protocol):
    """Runs cells; `executed` counts the stage calls built (not taken from the store)."""

    executed: Counter

    def prepare(self, spec: Spec, cells: list[Cell]) -> None:
        """Refuse, before anything is written, what this executor cannot run."""
        ...

    def run(
        self, spec: Spec, cells: list[Cell], store: Store, reporter: Reporter
    ) -> Generator[CellResult, None, None]:
        """Each cell's result, as soon as it is complete (in any order an executor likes;
        `CellResult.cell` names it). Closing the iterator early stops what is left."""
        ...


class Serial:
    """Every cell in this process, in plan order, one deployment at a time; except that
    the adapter route's cells of one base level run together, on one llama-server
    (harness/run/deployment.py): their build stages first, so that it loads every LoRA GGUF."""

    def __init__(self) -> None:
        self.executed: Counter = Counter()
        self._outcomes: dict[str, Outcome] = {}

    def prepare(self, spec: Spec, cells: list[Cell]) -> None:
        """Nothing to refuse: this process planned the cells."""

    def run(
        self, spec: Spec, cells: list[Cell], store: Store, reporter: Reporter
    ) -> Generator[CellResult, None, None]:
        sharing = Sharing(spec, cells, store)
        try:
            for batch in sharing.batches(cells):
                if len(batch) > 1:
                    for cell in batch:
                        run_cell(cell, store, reporter, self._outcomes, self.executed, None)
                for cell in batch:
                    yield self._served(spec, cell, store, reporter, sharing)
        finally:
            sharing.close()

    def _served(
        self, spec: Spec, cell: Cell, store: Store, reporter: Reporter, sharing: Sharing
    ) -> CellResult:
        try:
            with Served(spec, cell, store, sharing) as served:
                result = run_cell(cell, store, reporter, self._outcomes, self.executed, served)
                if served.kept and result.status == "done":
                    try:
                        result.deployed = served.deploy().deployment.model_name
                    except ForgebenchError as exc:
                        result.status, result.error = "failed", f"serve.keep: {exc}"
        finally:
            sharing.done(cell)
        if served.left_behind:
            model, why = served.left_behind
            result.deployed = model
            reporter.notice(
                f"{cell.name}: {model} was left on the server ({why}); "
                "`forgebench clean` lists and removes it"
            )
        return result


def run_cell(
    cell: Cell,
    store: Store,
    reporter: Reporter,
    outcomes: dict[str, Outcome],
    executed: Counter,
    served: Served | None,
    verify: bool = False,
) -> CellResult:
    """Run a cell's stages in order; a build failure ends the cell, a check that fails or
    errors makes it "broken" or failed and ends its served stages (nothing is scored on a
    model that is not a working chat model), a failed measurement marks it failed, and a
    failed reference only leaves it to be judged "unjudged". With no `served`, only the
    build stages run (what a shared server needs before it starts)."""
    stages: dict[str, Outcome] = {}
    status, error = "done", None

    def result(**files: Any) -> CellResult:
        return CellResult(
            cell.name,
            cell.adapter,
            cell.quant,
            status,
            stages,
            error=error,
            route=cell.route,
            **files,
        )

    for role, call in cell.calls.items():
        if served is None and role not in BUILD:
            continue
        if role in SERVED and status != "done":
            continue
        if call.key not in outcomes:
            missing = _inputs(call, store, reporter, outcomes, executed)
            if missing:
                outcomes[call.key] = Outcome(call.key, False, 0.0, error=missing)
            else:
                reporter.stage_started(cell, role, store.has(call))
                extra = {"served": served} if role in SERVED else {}
                outcomes[call.key] = execute(call, store, reporter, executed, verify, **extra)
                reporter.stage_finished(cell, role, outcomes[call.key])
        outcome = stages[role] = outcomes[call.key]
        if outcome.error and role not in ADVISORY:
            status, error = "failed", f"{role}: {outcome.error}"
            if role in BUILD:
                return result()
        elif role == "check" and not outcome.metrics.get("check_ok"):
            status, error = "broken", f"check: {outcome.metrics.get('check_reasons')}"
    gguf = store.path(cell.gguf) / "model.gguf"
    adapter = store.path(cell.lora_gguf) / "adapter.gguf" if cell.lora_gguf else None
    size = gguf.stat().st_size
    if cell.server_quantize is not None:
        # the F16 is what Ollama was given (what a registry keeps to make it again); the
        # size is that of the file Ollama made, as the check read it
        size = stages["check"].metrics.get("served_model_bytes") if "check" in stages else None
    extra = adapter.stat().st_size if adapter else 0
    return result(gguf=str(gguf), gguf_bytes=size + extra if size else None)


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
        outcomes[dep.key] = execute(dep, store, reporter, executed)
        if outcomes[dep.key].error:
            return f"its input {dep.stage} failed: {outcomes[dep.key].error}"
    return None


def execute(
    call: StageCall,
    store: Store,
    reporter: Reporter,
    executed: Counter,
    verify: bool = False,
    **extra: Any,
) -> Outcome:
    """Build one call whose inputs are in the store (or take it from there). `verify`:
    first refuse, as the outcome's error, to build with versions its key does not name
    (a worker on another node; this process planned the keys itself)."""
    if store.has(call):
        return _cached_outcome(call, store)
    if verify and (why := keys.differs_here(call)):
        return Outcome(call.key, False, 0.0, error=why)
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
        message = disk_full(exc, store) or (whole.splitlines()[0] if whole else type(exc).__name__)
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


def disk_full(exc: BaseException, store: Store) -> str | None:
    """The line for a build that ran out of disk: where, how much is free, and that the
    store kept nothing of it (`Store.building` removes the partial folder), so freeing
    space and rerunning redoes just this; None for any other error."""
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return None
    try:
        free = f"{shutil.disk_usage(store.root).free / 2**30:.1f} GiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"the disk holding the store {store.root} is full ({free}); nothing of this stage "
        "was kept: free some space and rerun"
    )


def ensure(call: StageCall, store: Store, reporter: Reporter) -> Path:
    """Build one call and what it depends on, unless the store has them; its output folder."""
    for dep in call.inputs.values():
        ensure(dep, store, reporter)
    outcome = execute(call, store, reporter, Counter())
    if outcome.error:
        raise StageError(f"{call.stage}: {outcome.error}")
    return store.path(call)


def _cached_outcome(call: StageCall, store: Store) -> Outcome:
    folder = store.path(call)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Outcome(call.key, True, store.manifest(call)["seconds"], metrics)
