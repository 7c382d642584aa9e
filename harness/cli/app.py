"""The `forgebench` command: each command parses, calls the library, prints.

Errors a user can fix (`ForgebenchError`) are printed as one line with their
exit code (2 for a bad spec); `--debug` shows the traceback instead. This module holds
the Typer app, the consoles and the options the command modules share.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from harness import __version__
from harness.errors import ForgebenchError

# Stages report their own progress; library progress bars would only garble it.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's request bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
