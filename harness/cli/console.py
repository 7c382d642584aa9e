"""What a person sees while a run goes on, and the tables at the end (rich)."""

from __future__ import annotations

from rich import box
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
from rich.text import Text

from harness.chain import STAGES
from harness.plan.cells import Cell
from harness.run.outcomes import CellResult, Outcome, RunSummary
from harness.track.reader import AGGREGATE


class RichReporter:
    """Live progress: one bar over all stage calls, one line for the stage at work."""

    def __init__(self, console: Console, total: int, debug: bool = False):
        self.console = console
        self.debug = debug  # --debug: a failed stage's whole reason (a log tail) under its line
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

    def notice(self, message: str) -> None:
        self.console.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)

    def stage_started(self, cell: Cell, stage: str, cached: bool) -> None:
        self.label = f"{cell.line} {stage}" + (f" {cell.quant}" if stage == "quantize" else "")
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
            # as text, not markup: an error quoting "[user]" or "[invalid]" would lose it
            self.console.print(Text.assemble(("✗", "red"), f" {what}: {outcome.error}"))
            if self.debug and outcome.detail:
                self.console.print(Text(outcome.detail, style="dim"))
        elif outcome.cached:
            self.console.print(f"[dim]· {what}: cached ({outcome.key})[/]")
        else:
            self.console.print(f"[green]✓[/] {what} in {outcome.seconds:.1f}s")


REASONS_WIDTH = 60
"""Reasons are cut to this many characters, so a cell stays one line; MLflow keeps them whole."""
VERDICT_STYLE = {
    "ok": "green",
    "slow": "yellow",
    "stupid": "red",
    "slow+stupid": "red",
    "broken": "bold red",
    "failed": "bold red",
    "unjudged": "dim",
}


def clip(text: str, width: int = REASONS_WIDTH) -> str:
    """One line of at most `width` characters, an ellipsis marking what was cut."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def verdict_of(summary: RunSummary, cell: CellResult) -> tuple[str, str]:
    """(verdict with its step, reasons) for the table; a cell nobody judged says so."""
    judged = summary.verdicts.get(cell.cell)
    if judged is not None:
        return judged.verdict, "; ".join(judged.reasons) or (cell.error or "")
    if cell.status != "done":
        return cell.status, cell.error or ""
    return "unjudged", summary.verdict_error or ""


def summary_table(summary: RunSummary, task: str | None = None) -> Table:
    """Per cell: the verdict and the step that lost quality, the primary task's accuracy, the
    decode speed, the file size and the MLflow run."""
    table = Table(
        title=f"{summary.experiment}: {len(summary.cells)} cells",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("cell", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    # The one column that gives way on a narrow terminal: cut further, never wrapped.
    table.add_column("why", overflow="ellipsis", max_width=REASONS_WIDTH)
    table.add_column(task or "accuracy", justify="right", min_width=5)
    table.add_column("tok/s", justify="right", min_width=5)
    loaded = any("load" in cell.stages for cell in summary.cells)
    if loaded:
        table.add_column("load tok/s", justify="right", no_wrap=True)
    table.add_column("MB", justify="right", min_width=5)
    table.add_column("run", no_wrap=True)
    for cell in summary.cells:
        metrics = {k: v for o in cell.stages.values() for k, v in o.metrics.items()}
        verdict, reasons = verdict_of(summary, cell)
        accuracy = metrics.get(f"accuracy_{task}") if task else None
        tps = metrics.get("decode_tps_p50")
        table.add_row(
            Text(cell.cell),
            Text(verdict, style=VERDICT_STYLE.get(verdict.split(" (")[0], "")),
            Text(clip(reasons), style="dim", no_wrap=True, overflow="ellipsis"),
            "-" if accuracy is None else f"{accuracy:.3f}",
            "-" if tps is None else f"{tps:.1f}",
            *([peak_load(metrics)] if loaded else []),
            f"{cell.gguf_bytes / 2**20:.1f}" if cell.gguf_bytes else "-",
            (cell.run_id or "")[:8],
        )
    table.caption = (
        "tok/s: served decode, p50; "
        + ("load tok/s: the load's highest aggregate, at c streams; " if loaded else "")
        + "why: cut to one line, whole in MLflow"
    )
    return table


def peak_load(metrics: dict[str, float]) -> str:
    """`118 @c4`: the load's highest aggregate tok/s and the concurrency it came at."""
    found = [(v, int(m[1])) for k, v in metrics.items() if (m := AGGREGATE.match(k))]
    if not found:
        return "-"
    value, c = max(found)
    return f"{value:.0f} @c{c}"


def times_table(summary: RunSummary) -> Table:
    """Seconds per stage and cell (`run --times`): where a run's time went."""
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("cell", no_wrap=True)
    stages = [s for s in STAGES if any(s in cell.stages for cell in summary.cells)]
    for stage in stages:
        table.add_column(stage, justify="right")
    for cell in summary.cells:
        times = []
        for stage in stages:
            outcome = cell.stages.get(stage)
            times.append(
                "-"
                if outcome is None
                else f"{outcome.seconds:.1f}" + ("*" if outcome.cached else "")
            )
        table.add_row(Text(cell.cell), *times)
    table.caption = "seconds per stage; * taken from the store (time of the run that built it)"
    return table


def plan_table(rows: list[dict]) -> Table:
    table = Table()
    table.add_column("cell")
    stages = [s for s in STAGES if any(s in row["stages"] for row in rows)]
    for stage in stages:
        table.add_column(stage)
    for row in rows:
        cells = []
        for stage in stages:
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
