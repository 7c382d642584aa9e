"""The commands that plan and run an experiment: `validate`, `plan`, `run`."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from harness import chain, pipeline, preflight, toolchain, track
from harness import run as run_package
from harness import spec as spec_module
from harness.cli.app import DEFAULT_STORE, SpecArg, StoreOpt, app, console, friendly, state
from harness.cli.console import RichReporter, plan_table, summary_table, times_table
from harness.errors import ForgebenchError, InputError
from harness.judge import evidence, sample_size
from harness.plan import cells as planning
from harness.plan.cells import Cell
from harness.plan.store import Store
from harness.run.outcomes import RunSummary
from harness.spec import Spec


@dataclass(frozen=True)
class Prepared:
    """A spec as every command that plans it reads it: loaded, checked, expanded into cells,
    with the store and the disk and memory the cells need."""

    spec: Spec
    cells: list[Cell]
    store: Store
    needs: list[preflight.Need]


def prepared(path: Path, store: Path) -> Prepared:
    """Load, check and plan a spec (one line, exit 2, on anything wrong with it)."""
    loaded = spec_module.load(path)
    loaded, notes = track.with_parents(loaded, track.tracking_uri(loaded), Path(store).absolute())
    for note in notes:
        console.print(f"[dim]{note}[/]", soft_wrap=True)
    shape = preflight.examine(loaded)
    cells = planning.plan(loaded)
    the_store = Store(store)
    return Prepared(loaded, cells, the_store, preflight.needs(loaded, shape, cells, the_store))


@app.command()
@friendly
def validate(
    specs: Annotated[list[Path], typer.Argument(help="spec files")],
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Check specs without running anything: everything `run` checks before its first stage
    (files, settings, services, the download, disk and memory on this machine)."""
    for path in specs:
        ready = prepared(path, store)
        loaded = ready.spec
        preflight.fits(ready.needs, ready.store)
        fetch = preflight.download(loaded)
        served = len(loaded.serve.settings())
        console.print(
            f"[green]ok[/] {path}: {len(loaded.lora)} LoRA configs x "
            f"{len(loaded.levels)} quant levels"
            + (f" x {served + 1} serving settings (the spec's own and {served})" if served else "")
            + (f"; downloads first: {fetch.describe()}" if fetch else ""),
            soft_wrap=True,
        )


@app.command()
@friendly
def plan(
    spec: SpecArg,
    store: StoreOpt = DEFAULT_STORE,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Show the matrix and which stages are cached or still to do; runs nothing."""
    ready = prepared(spec, store)
    loaded, cells, the_store, needs = ready.spec, ready.cells, ready.store, ready.needs
    fetch = preflight.download(loaded)
    rows = [
        {
            "cell": c.name,
            "adapter": c.adapter,
            "route": c.route,
            "quant": c.quant,
            "stages": {
                s: {"key": call.key, "cached": the_store.has(call)} for s, call in c.calls.items()
            },
        }
        for c in cells
    ]
    unique = planning.unique_calls(cells)
    todo = Counter(call.stage for call in unique.values() if not the_store.has(call))
    tasks = sample_size.plan(loaded)
    if as_json:
        print(
            json.dumps(
                {
                    "experiment": loaded.name,
                    "store": str(the_store.root),
                    "cells": rows,
                    "todo": dict(todo),
                    "download": fetch and {"repo": fetch.repo, "bytes": fetch.size},
                    "needs": {need.what: need.bytes for need in needs},
                    "tasks": [dataclasses.asdict(task) for task in tasks],
                },
                indent=2,
            )
        )
        return
    console.print(pipeline_plan_title(loaded.name, len(cells), todo))
    console.print(plan_table(rows))
    for task in tasks:
        console.print(task.describe(loaded.budgets.confidence), soft_wrap=True)
    if needs:
        console.print("estimated: " + ", ".join(n.describe() for n in needs), soft_wrap=True)
    if fetch is not None:
        console.print(f"downloads first: {fetch.describe()}", soft_wrap=True)


def pipeline_plan_title(name: str, n_cells: int, todo: Counter) -> str:
    work = ", ".join(f"{stage} {n}" for stage, n in todo.items()) or "nothing (all cached)"
    return f"[bold]{name}[/]: {n_cells} cells; to do: {work}"


@app.command()
@friendly
def run(
    spec: SpecArg,
    store: StoreOpt = DEFAULT_STORE,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="stop at the first failed cell")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="download an uncached base without asking")
    ] = False,
    times: Annotated[
        bool, typer.Option("--times", help="also print the seconds each stage took, per cell")
    ] = False,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            help="where the cells run: serial or ray (default: the spec's executor.kind)",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="a Ray cluster, host:port (with --executor ray)"),
    ] = None,
) -> None:
    """Run every cell of a spec, reusing cached stages; log everything to MLflow."""
    if executor not in (None, "serial", "ray"):
        raise InputError(f"--executor {executor}: not an executor; use serial or ray")
    ready = prepared(spec, store)
    summary = execute(ready, spec, yes, times, fail_fast, executor, ray_address)
    if summary.failed:
        raise ForgebenchError(
            f"{len(summary.failed)} of {len(summary.cells)} cells failed: "
            + "; ".join(f"{c.cell} ({c.error})" for c in summary.failed)
        )


def execute(
    ready: Prepared,
    spec: Path,
    yes: bool = False,
    times: bool = False,
    fail_fast: bool = False,
    executor: str | None = None,
    ray_address: str | None = None,
) -> RunSummary:
    """What `run` does once the spec is prepared, up to its summary (a failed cell is in
    it, not raised): `release` runs its spec the same way."""
    loaded, cells, the_store = ready.spec, ready.cells, ready.store
    preflight.fits(ready.needs, the_store)
    _confirm_download(preflight.download(loaded), yes)
    toolchain.ensure_source(log=lambda m: console.print(f"[dim]{m}[/]"))
    if loaded.measure:
        toolchain.build_tools(log=lambda m: console.print(f"[dim]{m}[/]"))
    if loaded.serves:
        console.print(
            f"serving through [bold]{cells[0].backend}[/]"
            + (
                " (no Ollama answered at OLLAMA_HOST)"
                if loaded.serve.backend == "auto" and cells[0].backend == "llamacpp"
                else ""
            )
        )
    total = len(planning.unique_calls(cells))
    console.print(
        f"[bold]{loaded.name}[/]: {len(cells)} cells, {total} stage calls, store {the_store.root}"
    )
    with RichReporter(console, total, debug=state["debug"]) as reporter:
        summary = pipeline.run(
            loaded,
            spec,
            the_store,
            reporter,
            fail_fast,
            run_package.chosen(loaded, executor, ray_address),
        )
    console.print(summary_table(summary, evidence.primary_task(loaded)))
    if times:
        console.print(times_table(summary))
    # by stage, not role: reference_base and drift_tuning run the reference and drift stages
    present = {call.stage for call in planning.unique_calls(cells).values()}
    stages = [stage for stage in chain.STAGES if stage in present]
    work = ", ".join(f"{s} {summary.executed.get(s, 0)}" for s in stages)
    console.print(f"work done: {work}", soft_wrap=True)
    if summary.tracking_lost:
        logged = sum(1 for cell in summary.cells if cell.run_id)
        raise ForgebenchError(
            f"{summary.tracking_lost.split(';')[0]}: {len(summary.cells)} cells built and "
            f"measured, {logged} logged; once it works again, rerun `forgebench run {spec}` to "
            "log every cell (nothing is rebuilt)"
        )
    console.print(
        f"results: [bold]{track.ui_command(summary.tracking_uri, summary.experiment)}[/]"
        f" (experiment {summary.experiment!r}, run {summary.parent_run_id})",
        soft_wrap=True,
    )
    return summary


def _confirm_download(fetch, yes: bool) -> None:
    """Ask before a large download; unattended runs must say --yes."""
    if fetch is None or yes:
        return
    if not sys.stdin.isatty():
        raise InputError(f"this run would download {fetch.describe()}: rerun with --yes")
    if not typer.confirm(f"download {fetch.describe()}?", default=False):
        raise typer.Exit(1)
