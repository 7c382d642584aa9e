"""`forgebench release`: the release loop a scheduler runs (harness.release)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from filelock import FileLock, Timeout

from harness import env
from harness import release as releasing
from harness.backends import ollama_answers
from harness.cli.app import DEFAULT_STORE, SpecArg, StoreOpt, app, console, err, friendly
from harness.cli.experiment import execute, prepared
from harness.errors import InputError
from harness.judge import gate
from harness.plan import ollama as server


@app.command()
@friendly
def release(
    spec: SpecArg,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="the MLflow model and the Ollama name the release moves: MODEL@ALIAS and "
            "MODEL:latest",
        ),
    ],
    store: StoreOpt = DEFAULT_STORE,
    alias: Annotated[str, typer.Option("--alias", help="the champion's alias")] = "champion",
    by: Annotated[str, typer.Option("--by", help="size (smallest ok file) or speed")] = "size",
    output: Annotated[Path | None, typer.Option("--output", help="also write the summary")] = None,
    speed_drop_pct: float = 10.0,
    memory_rise_pct: float = 10.0,
) -> None:
    """Run the spec, pick its cell, gate it against MODEL@ALIAS and, only on a pass, deploy
    it to Ollama as MODEL:latest (after the chat check) and move the alias. Exit 0
    promoted, 1 rejected (champion and deployment untouched), 2 bad input; prints a
    Markdown summary. A second release of one model waits for the first."""
    if by not in ("size", "speed"):
        raise InputError(f"--by {by}: use size or speed")
    ready = prepared(spec, store)
    releasing.shipped_adapter(ready.spec)
    if not ollama_answers():
        raise InputError(
            f"release deploys to Ollama and none answers at {env.ollama_host()}: start "
            "`ollama serve` or point OLLAMA_HOST at one"
        )
    server.refuse_what_it_cannot(ready.spec)  # the pick is created there, whatever serves
    locks = env.cache_root() / "release"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"{model.replace('/', '_')}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        err.print(f"waiting for another `forgebench release --model {model}` to finish")
        lock.acquire()
    try:
        summary = execute(ready, spec)
        tolerances = gate.Tolerances(speed_drop_pct=speed_drop_pct, memory_rise_pct=memory_rise_pct)
        outcome = releasing.release(
            ready.spec, ready.cells, ready.store, summary, model, alias, by, tolerances
        )
    finally:
        lock.release()
    console.print(outcome.markdown, markup=False, highlight=False, soft_wrap=True)
    if output:
        output.write_text(outcome.markdown)
    raise typer.Exit(0 if outcome.promoted else 1)
