"""The commands that read finished runs back from MLflow: `report`, `best` and the release
gate `check`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harness import report as report_module
from harness import spec as spec_module
from harness import track
from harness.chain import CONTROL
from harness.cli.app import app, console, err, friendly
from harness.errors import ForgebenchError, InputError
from harness.judge import gate
from harness.judge.best import choose
from harness.spec import DEFAULT_TOLERANCE
from harness.track import results, schema

ExperimentArg = Annotated[
    str, typer.Argument(help="experiment name, or the spec file that names it", show_default=False)
]
UriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI"),
]
RunOpt = Annotated[str | None, typer.Option("--run", help="parent run id (default: latest)")]
ByOpt = Annotated[
    str,
    typer.Option(
        "--by",
        help="size (smallest file), speed (fastest decode for one user) or throughput (most "
        "aggregate tok/s under load, at the users budgets.load names)",
    ),
]


def _invocation(experiment: str, uri: str | None, run_id: str | None):
    if experiment.endswith((".yaml", ".yml")) or Path(experiment).is_file():
        loaded = spec_module.load(Path(experiment))
        experiment, uri = loaded.name, uri or track.tracking_uri(loaded)
    return results.load(uri or track.DEFAULT_URI, experiment, run_id)


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
    inv = _invocation(experiment, tracking_uri, run_id)
    uri = inv.tracking_uri
    if route is not None and not any(r.route == route and r.adapter != CONTROL for r in inv.rows):
        raise InputError(
            f"--route {route}: run {inv.run_id} has no cells on that route; its routes: "
            + ", ".join(sorted({r.route for r in inv.rows if r.adapter != CONTROL}))
        )
    for choice in choose(inv.rows, by, route):
        mark = "[green]✓[/]" if choice.row else "[red]✗[/]"
        console.print(f"{mark} [bold]{choice.adapter}[/]: {choice.why}", soft_wrap=True)
        if choice.front:
            console.print("   Pareto front: " + ", ".join(r.cell for r in choice.front))
        if choice.row is None:
            continue
        track.tag(uri, choice.row.run_id, schema.BEST, by)
        if register and choice.adapter != CONTROL:
            gguf = Path(choice.row.tags[schema.GGUF])
            lora = choice.row.tags.get(f"{schema.LINEAGE}.lora_gguf")
            version = track.register(
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
    try:
        uri = tracking_uri or track.DEFAULT_URI
        cand_id, base_id = track.run_of(uri, candidate), track.run_of(uri, baseline)
        tolerances = gate.Tolerances(
            tolerance, confidence, speed_drop_pct, memory_rise_pct, frozenset(accept or ())
        )
        cand = track.run_view(uri, cand_id)
        result, base = gate.against(uri, cand, base_id, tolerances, frozenset(skip or ()))
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
        gguf = cand.tags.get(schema.GGUF)
        try:
            version = track.set_alias(uri, name, alias_name, cand_id, Path(gguf) if gguf else None)
        except ForgebenchError as exc:
            raise InputError(str(exc)) from None
        err.print(f"promoted: {name}@{alias_name} -> version {version}")
    raise typer.Exit(0 if result.passed else 1)
