"""What a run hands back as it goes: each stage call's outcome, each cell's result, the
run's summary, and the reporter a front end is told through. Its own module because the
pipeline, its executors, tracking and the console all read these types (harness.track.results
reads finished cells back from MLflow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from harness.chain import MERGE

if TYPE_CHECKING:
    from harness.plan.cells import Cell


class Reporter(Protocol):
    """What a front end is told while a run goes on."""

    def stage_started(self, cell: Cell, stage: str, cached: bool) -> None: ...
    def stage_progress(self, message: str, fraction: float | None) -> None: ...
    def stage_finished(self, cell: Cell, stage: str, outcome: Outcome) -> None: ...
    def notice(self, message: str) -> None:
        """Something the user must know now, in one line, while the run goes on."""


class Quiet:
    """A reporter that shows nothing, for library use and scripts."""

    def stage_started(self, cell: Cell, stage: str, cached: bool) -> None: ...
    def stage_progress(self, message: str, fraction: float | None) -> None: ...
    def stage_finished(self, cell: Cell, stage: str, outcome: Outcome) -> None: ...
    def notice(self, message: str) -> None: ...


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
    route: str = MERGE
    """How the adapter ships: merged into the weights, or a LoRA GGUF beside the base."""


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
    """cell name -> harness.judge.verdict.Verdict"""
    verdict_error: str | None = None
    tracking_lost: str | None = None
    """Why the run stopped logging to MLflow part way (harness.track.writer.Experiment.lost)."""

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.status != "done"]
