"""Cells as Ray Core tasks, for sweeps that outgrow one machine.

Every stage call the plan needs (once by key) that is not served becomes one task, whose
arguments are the tasks of its inputs, so Ray starts it when they are done and runs
independent builds side by side. Each cell's served stages run as one more task that
owns the cell's deployment; a cell whose served stage reads another cell's output
waits for that cell's task. Tasks hand back outcomes and the driver alone writes MLflow
(harness.pipeline).

The store must be a path every node mounts: tasks read their inputs from it and write
their outputs there, in the store's own format (and under its own locks). A worker
refuses to build with package, stage or llama.cpp versions that the key does not name
(harness.plan.keys.differs_here), so an output's key always says what made it. Ray retries a
task whose node died; a stage's own error is an outcome, never a retry.

Resources are Ray's: one CPU a task by default, `executor.resources` in the spec per
stage and for `serve`. A cell that benches takes a whole node (all the CPUs of the
smallest one), so its timings are its own and the bench key names that node's machine.
A request that no node can fit is refused before anything is submitted: Ray itself
would wait for such a node forever.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from typing import Any

from harness import host
from harness.chain import SERVED
from harness.errors import InputError
from harness.plan.cells import Cell
from harness.plan.store import StageCall, Store
from harness.run.deployment import Served
from harness.run.executor import execute, run_cell
from harness.run.outcomes import CellResult, Outcome, Quiet, Reporter
from harness.spec import Resources, Spec

log = logging.getLogger(__name__)
RETRIES = 3
"""Times Ray runs a task again when its worker or node dies (not when the stage fails)."""


class RayExecutor:
    """Cells on the Ray cluster at `address` (a local one when None and RAY_ADDRESS unset)."""

    def __init__(self, address: str | None = None):
        self.address = address
        self.executed: Counter = Counter()
        self._options: dict[str, dict[str, Any]] = {}
        self._started = False

    def prepare(self, spec: Spec, cells: list[Cell]) -> None:
        """Connect, and refuse a resource request that no node of the cluster can fit."""
        ray = _ray()
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            self._started = True
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        tasks = {call.stage for cell in cells for r, call in cell.calls.items() if r not in SERVED}
        if any(role in SERVED for cell in cells for role in cell.calls):
            tasks.add("serve")
        self._options = {task: _options(spec, task, nodes) for task in sorted(tasks)}
        try:
            for task, options in self._options.items():
                _refuse_infeasible(task, options, nodes)
        except InputError:
            if self._started:  # nothing will run: leave no connection behind
                ray.shutdown()
            raise

    def run(
        self, spec: Spec, cells: list[Cell], store: Store, reporter: Reporter
    ) -> Generator[CellResult, None, None]:
        ray = _ray()
        build = ray.remote(max_retries=RETRIES, retry_exceptions=False)(_build)
        serve = ray.remote(max_retries=RETRIES, retry_exceptions=False)(_serve)
        builds: dict[str, Any] = {}  # key -> its task's ObjectRef
        pending: dict[Any, tuple[Cell, str, StageCall | None]] = {}

        def submit(call: StageCall, cell: Cell, role: str) -> Any:
            if call.key not in builds:
                inputs = [submit(dep, cell, dep.stage) for dep in call.inputs.values()]
                ref = build.options(**self._options[call.stage], name=f"{call.stage} {cell.name}")
                builds[call.key] = ref.remote(call, store.root, *inputs)
                pending[builds[call.key]] = (cell, role, call)
            return builds[call.key]

        owner = {c.key: cell for cell in cells for r, c in cell.calls.items() if r in SERVED}
        cell_tasks: dict[str, Any] = {}
        for cell in cells:
            built = [submit(c, cell, r) for r, c in cell.calls.items() if r not in SERVED]
            after = {
                owner[dep.key].name
                for role, call in cell.calls.items()
                if role in SERVED
                for dep in call.inputs.values()
                if dep.key in owner and owner[dep.key] is not cell
            }
            served = any(role in SERVED for role in cell.calls)
            options = self._options["serve"] if served else {"num_cpus": 0}
            ref = serve.options(**options, name=f"serve {cell.name}")
            cell_tasks[cell.name] = ref.remote(
                spec, cell, store.root, len(built), *built, *(cell_tasks[n] for n in after)
            )
            pending[cell_tasks[cell.name]] = (cell, "serve", None)
        try:
            yield from self._collect(ray, pending, reporter)
        finally:
            for ref in pending:
                ray.cancel(ref)
            if self._started:
                ray.shutdown()

    def _collect(
        self, ray: Any, pending: dict[Any, tuple[Cell, str, StageCall | None]], reporter: Reporter
    ) -> Generator[CellResult, None, None]:
        """Each task's outcome as it comes back: a build's is reported, a cell's yielded."""
        outcomes: dict[str, Outcome] = {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell, role, call = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as exc:  # lost past its retries, or an input was
                value = _lost(exc, cell, call, outcomes)
            if call is not None:
                outcomes[call.key] = value
                if not value.cached and not value.error:
                    self.executed[call.stage] += 1
                reporter.stage_started(cell, role, value.cached)
                reporter.stage_finished(cell, role, value)
                continue
            result, executed, ran = value
            self.executed.update(executed)
            cell.calls.update(ran.calls)  # the bench key names the node that benched
            for role, outcome in result.stages.items():
                if role in SERVED:
                    reporter.stage_started(cell, role, outcome.cached)
                    reporter.stage_finished(cell, role, outcome)
            yield result


def _build(call: StageCall, root: Path, *inputs: Outcome) -> Outcome:
    """A task: one stage call, its inputs' outcomes in hand (built by their own tasks)."""
    for dep, outcome in zip(call.inputs.values(), inputs, strict=True):
        if outcome.error:
            said = outcome.error
            why = said if said.startswith("its input") else f"its input {dep.stage} failed: {said}"
            return Outcome(call.key, False, 0.0, error=why)
    return execute(call, Store(root), Quiet(), Counter(), verify=True)


TIMED = ("bench", "load")
"""The served stages that time the cell: they take a whole node, and their keys its machine."""


def _serve(
    spec: Spec, cell: Cell, root: Path, built: int, *ready: Any
) -> tuple[CellResult, Counter, Cell]:
    """A task: the cell's served stages on one deployment it owns, after its builds (their
    outcomes) and the cells whose served outputs it reads (their results)."""
    outcomes = {outcome.key: outcome for outcome in ready[:built]}
    for result, _, _ in ready[built:]:
        outcomes |= {outcome.key: outcome for outcome in result.stages.values()}
    for timed in TIMED:  # their keys name the node that timed them
        if timed in cell.calls and cell.calls[timed].settings["machine"] != host.machine():
            call = cell.calls[timed]
            here = dataclasses.replace(call, settings={**call.settings, "machine": host.machine()})
            cell = dataclasses.replace(cell, calls={**cell.calls, timed: here})
    store, executed = Store(root), Counter()
    with Served(spec, cell, store) as served:
        result = run_cell(cell, store, Quiet(), outcomes, executed, served, verify=True)
    if served.left_behind:  # Ollama went away before the model could be removed
        result.deployed = served.left_behind[0]
    return result, executed, cell


def _lost(exc: Exception, cell: Cell, call: StageCall | None, outcomes: dict[str, Outcome]):
    """What a task that Ray could not finish hands back instead: a failed outcome, or a
    failed cell holding the outcomes its builds did have."""
    whole = str(exc).strip()
    error = f"lost on the Ray cluster: {whole.splitlines()[0] if whole else type(exc).__name__}"
    if call is not None:
        return Outcome(call.key, False, 0.0, error=error, detail=whole)
    stages = {r: outcomes[c.key] for r, c in cell.calls.items() if c.key in outcomes}
    failed = CellResult(
        cell.name, cell.adapter, cell.quant, "failed", stages, error=error, route=cell.route
    )
    return failed, Counter(), cell


def _options(spec: Spec, task: str, nodes: list[dict[str, float]]) -> dict[str, Any]:
    """Ray's options for a task: the spec's request, else one CPU (a benching cell: all the
    CPUs of the smallest node, so that nothing else runs beside its timings)."""
    asked = spec.executor.resources.get(task)
    if asked is None:
        cpus = [node["CPU"] for node in nodes if node.get("CPU")]
        whole = task == "serve" and set(TIMED) & set(spec.measure) and cpus
        asked = Resources(cpus=min(cpus) if whole else 1.0)
        if whole and len(set(cpus)) > 1:
            log.warning("nodes differ in CPUs: a bench may share a larger node with builds")
    options: dict[str, Any] = {"num_cpus": asked.cpus, "num_gpus": asked.gpus}
    if asked.memory_gb:
        options["memory"] = int(asked.memory_gb * 2**30)
    return options


def _refuse_infeasible(task: str, options: dict[str, Any], nodes: list[dict[str, float]]):
    wanted = {
        "CPU": options["num_cpus"],
        "GPU": options["num_gpus"],
        "memory": options.get("memory", 0),
    }
    if any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        return
    largest = {k: max((node.get(k, 0) for node in nodes), default=0) for k in wanted}
    raise InputError(
        f"executor.resources.{task}: {_describe(wanted)} fits no node of the Ray cluster "
        f"(at most {_describe(largest)} on one node): ask for less, or add a node that has it"
    )


def _describe(resources: dict[str, float]) -> str:
    return (
        f"{resources['CPU']:g} CPU, {resources['GPU']:g} GPU, "
        f"{resources['memory'] / 2**30:.1f} GiB memory"
    )


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(
            "the ray executor needs Ray: pip install 'forgebench[ray]' (on every node)"
        ) from None
    return ray
