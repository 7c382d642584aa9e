"""The `forgebench` command: the Typer app (`app`), its commands by what they work on
(`experiment`: validate, plan, run; `results`: report, best, check; `release`: the release
loop; `tools`: setup, clean, models) and what a person sees while a run goes on (`console`)."""

from harness.cli import experiment, release, results, tools  # noqa: F401 (each registers its commands)
from harness.cli.app import app

__all__ = ["app"]
