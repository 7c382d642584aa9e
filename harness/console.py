"""What a person sees while a run goes on, and the tables at the end (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from harness.pipeline import STAGES, Cell, Outcome, RunSummary


class RichReporter:
    """Live progress: one bar over all stage calls, one line for the stage at work."""

    def __init__(self, console: Console, total: int):
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.overall = self.progress.add_task("stages", total=total)
        self.current: TaskID | None = None
        self.label = ""

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage_started(self, cell: Cell, stage: str, cached: bool) -> None:
        self.label = f"{cell.adapter} {stage}" + (f" {cell.quant}" if stage == "quantize" else "")
        self.current = self.progress.add_task(self.label, total=None)

    def stage_progress(self, message: str, fraction: float | None) -> None:
        if self.current is None:
            return
        self.progress.update(
            self.current,
            description=f"{self.label}: {message}",
            total=1.0 if fraction is not None else None,
            completed=fraction if fraction is not None else 0,
        )

    def stage_finished(self, cell: Cell, stage: str, outcome: Outcome) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        self.progress.advance(self.overall)
        what = self.label
        if outcome.error:
            self.console.print(f"[red]✗[/] {what}: {outcome.error}")
        elif outcome.cached:
            self.console.print(f"[dim]· {what}: cached ({outcome.key})[/]")
        else:
            self.console.print(f"[green]✓[/] {what} in {outcome.seconds:.1f}s")


def summary_table(summary: RunSummary) -> Table:
    table = Table(title=f"{summary.experiment}: {len(summary.cells)} cells")
    table.add_column("cell", no_wrap=True)
    table.add_column("status")
    for stage in STAGES:
        table.add_column(f"{stage} s", justify="right")
    table.add_column("MB", justify="right")
    table.add_column("run", no_wrap=True)
    for cell in summary.cells:
        times = []
        for stage in STAGES:
            outcome = cell.stages.get(stage)
            times.append(
                "-"
                if outcome is None
                else f"{outcome.seconds:.1f}" + ("*" if outcome.cached else "")
            )
        status = "[green]done[/]" if cell.status == "done" else f"[red]failed[/] {cell.error}"
        size = f"{cell.gguf_bytes / 2**20:.1f}" if cell.gguf_bytes else "-"
        table.add_row(cell.cell, status, *times, size, (cell.run_id or "")[:8])
    table.caption = "seconds per stage; * taken from the store (time of the run that built it)"
    return table


def plan_table(rows: list[dict]) -> Table:
    table = Table()
    table.add_column("cell")
    for stage in STAGES:
        table.add_column(stage)
    for row in rows:
        cells = []
        for stage in STAGES:
            entry = row["stages"].get(stage)
            cells.append(
                "-"
                if entry is None
                else "[dim]cached[/]"
                if entry["cached"]
                else "[yellow]to do[/]"
            )
        table.add_row(row["cell"], *cells)
    return table
