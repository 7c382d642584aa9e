"""The `forgebench` command: each command parses, calls the library, prints.

Errors a user can fix (`ForgebenchError`) are printed as one line with their
exit code (2 for a bad spec); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from harness import __version__
from harness.errors import ForgebenchError, InputError
from harness.spec.schema import DEFAULT_TOLERANCE

app = typer.Typer(
    help=__doc__.splitlines()[0],
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Logs and CI get Rich's 80 columns when not on a terminal, which truncates the
# matrix tables to ellipses; give them room unless COLUMNS says otherwise.
LOG_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(width=LOG_WIDTH)
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="experiment spec (YAML)", show_default=False)]
StoreOpt = Annotated[
    Path, typer.Option("--store", envvar="FORGEBENCH_STORE", help="where stage outputs are cached")
]
DEFAULT_STORE = Path(".forgebench") / "store"
state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"forgebench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """Fine-tune with LoRA, quantize with llama.cpp, measure what quantization costs."""
    state["debug"] = debug


def friendly(command):
    """Turn a ForgebenchError into one red line and its exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ForgebenchError as exc:
            if state["debug"]:
                raise
            # escaped: a message quoting "[invalid]" or "[q_proj]" is text, not Rich markup
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


@app.command()
@friendly
def validate(
    specs: Annotated[list[Path], typer.Argument(help="spec files")],
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Check specs without running anything: everything `run` checks before its first stage
    (files, settings, services, the download, disk and memory on this machine)."""
    from harness import preflight
    from harness import spec as spec_module
    from harness.plan import cells as planning
    from harness.plan.store import Store

    for path in specs:
        loaded = spec_module.load(path)
        shape = preflight.check(loaded)
        the_store = Store(store)
        preflight.fits(preflight.needs(loaded, shape, planning.plan(loaded), the_store), the_store)
        fetch = preflight.download(loaded)
        console.print(
            f"[green]ok[/] {path}: {len(loaded.lora)} LoRA configs x "
            f"{len(loaded.quant)} quant levels"
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
    from harness import preflight
    from harness import spec as spec_module
    from harness.cli.console import plan_table
    from harness.judge import sample_size
    from harness.plan import cells as planning
    from harness.plan.store import Store

    loaded = spec_module.load(spec)
    shape = preflight.check(loaded)
    fetch = preflight.download(loaded)
    the_store = Store(store)
    cells = planning.plan(loaded)
    needs = preflight.needs(loaded, shape, cells, the_store)
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
    from harness import pipeline, preflight, toolchain
    from harness import spec as spec_module
    from harness.cli.console import RichReporter, summary_table, times_table
    from harness.judge import evidence
    from harness.plan import cells as planning
    from harness.plan.store import Store
    from harness.run import executor as executors
    from harness.track import tracking

    if executor not in (None, "serial", "ray"):
        raise InputError(f"--executor {executor}: not an executor; use serial or ray")
    loaded = spec_module.load(spec)
    shape = preflight.check(loaded)
    cells = planning.plan(loaded)
    the_store = Store(store)
    preflight.fits(preflight.needs(loaded, shape, cells, the_store), the_store)
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
            executors.chosen(loaded, executor, ray_address),
        )
    console.print(summary_table(summary, evidence.primary_task(loaded)))
    if times:
        console.print(times_table(summary))
    # by stage, not role: reference_base and drift_tuning run the reference and drift stages
    present = {call.stage for call in planning.unique_calls(cells).values()}
    stages = [stage for stage in planning.STAGES if stage in present]
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
        f"results: [bold]{tracking.ui_command(summary.tracking_uri, summary.experiment)}[/]"
        f" (experiment {summary.experiment!r}, run {summary.parent_run_id})",
        soft_wrap=True,
    )
    if summary.failed:
        raise ForgebenchError(
            f"{len(summary.failed)} of {len(summary.cells)} cells failed: "
            + "; ".join(f"{c.cell} ({c.error})" for c in summary.failed)
        )


def _confirm_download(fetch, yes: bool) -> None:
    """Ask before a large download; unattended runs must say --yes."""
    if fetch is None or yes:
        return
    if not sys.stdin.isatty():
        raise InputError(f"this run would download {fetch.describe()}: rerun with --yes")
    if not typer.confirm(f"download {fetch.describe()}?", default=False):
        raise typer.Exit(1)


ExperimentArg = Annotated[
    str, typer.Argument(help="experiment name, or the spec file that names it", show_default=False)
]
UriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI"),
]
RunOpt = Annotated[str | None, typer.Option("--run", help="parent run id (default: latest)")]
ByOpt = Annotated[str, typer.Option("--by", help="size (smallest file) or speed (fastest decode)")]


def _invocation(experiment: str, uri: str | None, run_id: str | None):
    from harness.track import results, tracking

    if experiment.endswith((".yaml", ".yml")) or Path(experiment).is_file():
        from harness import spec as spec_module

        loaded = spec_module.load(Path(experiment))
        experiment, uri = loaded.name, uri or tracking.tracking_uri(loaded)
    return results.load(uri or tracking.DEFAULT_URI, experiment, run_id)


@app.command()
@friendly
def report(
    experiment: ExperimentArg,
    tracking_uri: UriOpt = None,
    run_id: RunOpt = None,
    by: ByOpt = "size",
    out: Annotated[Path, typer.Option("--out", help="reports folder")] = Path("reports"),
) -> None:
    """Write reports/<experiment>/index.html and report.md, from MLflow alone."""
    from harness import report as report_module

    inv = _invocation(experiment, tracking_uri, run_id)
    index, md = report_module.write(inv, out / inv.experiment, by)
    console.print(f"report: {index} and {md}", soft_wrap=True)


@app.command()
@friendly
def best(
    experiment: ExperimentArg,
    tracking_uri: UriOpt = None,
    run_id: RunOpt = None,
    by: ByOpt = "size",
    register: Annotated[
        str | None, typer.Option("--register", help="register the chosen GGUF as this MLflow model")
    ] = None,
    alias: Annotated[str, typer.Option("--alias", help="alias for the registered version")] = (
        "candidate"
    ),
    route: Annotated[
        str | None,
        typer.Option("--route", help="choose among this route's cells only: merge or adapter"),
    ] = None,
) -> None:
    """The quant level (and route) to ship per adapter: the smallest (or fastest) ok cell."""
    from harness.judge.best import choose
    from harness.track import tracking

    inv = _invocation(experiment, tracking_uri, run_id)
    uri = inv.tracking_uri
    if route is not None and not any(r.route == route and r.adapter != "base" for r in inv.rows):
        raise InputError(
            f"--route {route}: run {inv.run_id} has no cells on that route; its routes: "
            + ", ".join(sorted({r.route for r in inv.rows if r.adapter != "base"}))
        )
    for choice in choose(inv.rows, by, route):
        mark = "[green]✓[/]" if choice.row else "[red]✗[/]"
        console.print(f"{mark} [bold]{choice.adapter}[/]: {choice.why}", soft_wrap=True)
        if choice.front:
            console.print("   Pareto front: " + ", ".join(r.cell for r in choice.front))
        if choice.row is None:
            continue
        tracking.tag(uri, choice.row.run_id, "forgebench.best", by)
        if register and choice.adapter != "base":
            gguf = Path(choice.row.tags["forgebench.gguf"])
            lora = choice.row.tags.get("forgebench.lineage.lora_gguf")
            version = tracking.register(
                uri, register, choice.row.run_id, gguf, alias, Path(lora) if lora else None
            )
            console.print(f"   registered {register} version {version} as @{alias}")


@app.command(name="check")
@friendly
def check_command(
    candidate: Annotated[
        str, typer.Option("--candidate", help="run id, EXPERIMENT:CELL (latest run) or MODEL@ALIAS")
    ],
    baseline: Annotated[
        str,
        typer.Option(
            "--baseline",
            help="run id, EXPERIMENT:CELL or MODEL@ALIAS, e.g. forgebench-math@champion",
        ),
    ],
    tracking_uri: UriOpt = None,
    output: Annotated[Path | None, typer.Option("--output", help="also write the summary")] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="the accuracy drop a task may lose, shown at --confidence [default: the "
            f"task's in the candidate's spec, else {DEFAULT_TOLERANCE}]",
        ),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            "--confidence",
            help="of the one-sided bound on each drop [default: the candidate spec's, else 0.95]",
        ),
    ] = None,
    accept: Annotated[
        list[str] | None,
        typer.Option(
            "--accept",
            metavar="VERDICT",
            help="a candidate verdict other than ok to release anyway, e.g. slow; repeatable",
        ),
    ] = None,
    speed_drop_pct: float = 10.0,
    memory_rise_pct: float = 10.0,
    promote: Annotated[
        bool,
        typer.Option("--promote", help="on a pass, move the baseline's alias to the candidate"),
    ] = False,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip",
            metavar="FIGURE",
            help="gate without this figure (accuracy, decode or memory), which otherwise "
            "fails the gate when it is not measured on both runs or, for decode and memory, "
            "was measured on another machine; repeatable",
        ),
    ] = None,
) -> None:
    """Release gate: exit 0 if the candidate is judged ok and shown within tolerance of the
    baseline, 1 if it regressed or cannot be shown (accuracy not shown within tolerance, a
    figure not measured or not comparable, items that differ, a candidate not done or not
    ok), 2 on bad input; prints a Markdown summary."""
    from harness.judge import gate
    from harness.track import tracking

    try:
        uri = tracking_uri or tracking.DEFAULT_URI
        cand_id, base_id = _run_ref(uri, candidate), _run_ref(uri, baseline)
        cand, base = tracking.run_view(uri, cand_id), tracking.run_view(uri, base_id)
        result = gate.compare(
            cand,
            base,
            tracking.samples(uri, cand_id),
            tracking.samples(uri, base_id),
            gate.Tolerances(
                tolerance, confidence, speed_drop_pct, memory_rise_pct, frozenset(accept or ())
            ),
            frozenset(skip or ()),
        )
    except ForgebenchError as exc:  # for a CI job, 1 means "regressed" and nothing else
        raise InputError(str(exc)) from None
    summary = result.markdown(cand, base)
    print(summary, end="")
    if output:
        output.write_text(summary)
    if result.passed and promote:
        if "@" not in baseline:
            raise InputError("--promote needs the baseline given as MODEL@ALIAS")
        name, alias_name = baseline.removeprefix("models:/").split("@", 1)
        gguf = cand.tags.get("forgebench.gguf")
        try:
            version = tracking.set_alias(
                uri, name, alias_name, cand_id, Path(gguf) if gguf else None
            )
        except ForgebenchError as exc:
            raise InputError(str(exc)) from None
        err.print(f"promoted: {name}@{alias_name} -> version {version}")
    raise typer.Exit(0 if result.passed else 1)


def _run_ref(uri: str, ref: str) -> str:
    """EXPERIMENT:CELL -> that cell's run in the latest invocation; else a run id or alias."""
    from harness.track import results, tracking

    if ":" in ref and "@" not in ref and not ref.startswith("models:/"):
        experiment, cell = ref.split(":", 1)
        rows = {r.cell: r for r in results.load(uri, experiment).rows}
        if cell not in rows:
            raise ForgebenchError(
                f"no cell {cell!r} in the latest run of {experiment!r}; cells: {', '.join(rows)}"
            )
        return rows[cell].run_id
    return tracking.resolve_run(uri, ref)


@app.command()
@friendly
def setup() -> None:
    """Fetch the llama.cpp source matching the installed runtime and build its tools (once)."""
    from harness import toolchain

    path = toolchain.ensure_source(log=lambda m: console.print(m))
    with console.status("building llama-server, llama-bench, llama-perplexity"):
        bin_dir = toolchain.build_tools(log=lambda m: console.print(m))
    console.print(f"llama.cpp: {toolchain.revision()} at {path}; tools in {bin_dir}")


@app.command()
@friendly
def clean(
    match: Annotated[
        str, typer.Option("--match", help="only models whose name matches this glob")
    ] = "forgebench/*",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, remove nothing")] = False,
) -> None:
    """Remove the models forgebench left in Ollama (serve.keep) from the server at OLLAMA_HOST."""
    from fnmatch import fnmatch

    from harness.backends.ollama import OllamaBackend

    with OllamaBackend() as ollama:
        names = [n for n in ollama.deployed() if fnmatch(n, match) or fnmatch(n, f"{match}:*")]
        for name in names:
            if not dry_run:
                ollama.delete(name)
            console.print(f"{'would remove' if dry_run else 'removed'} {name}")
    if not names:
        console.print(f"no forgebench models matching {match!r} at {ollama.host}")


@app.command()
@friendly
def models(
    hf: Annotated[
        bool, typer.Option("--hf", help="list the Hugging Face cache and model_dirs instead")
    ] = False,
) -> None:
    """List local Ollama models: GGUF, architecture, size, quant, context, mapped HF base."""
    from harness.sources import ollama as ollama_models

    lines = ollama_models.hf_cache_lines() if hf else ollama_models.model_lines()
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# Stages report their own progress; library progress bars would only garble it.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's request bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
