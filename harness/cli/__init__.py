"""The `forgebench` command (`commands`) and what a person sees while it runs (`console`)."""

from harness.cli.commands import app

__all__ = ["app"]
