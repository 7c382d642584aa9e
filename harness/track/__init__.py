"""Runs in MLflow: the writer logs each invocation and its cells (`writer`); readers take
them back as plain data (`reader`: one `RunView` a run; `results`: an invocation's cells);
`registry` marks a chosen cell after its run; `lineage` finds a named run and the adapter it
trained; `connect` reaches the tracking store; `view` is how MLflow's UI shows the cells;
`schema` names the tags every run carries."""

from harness.track.connect import DEFAULT_URI, tracking_uri
from harness.track.lineage import run_of, with_parents
from harness.track.reader import RunView, primary_task, resolve_run, run_view, samples
from harness.track.registry import register, set_alias, tag
from harness.track.results import Invocation
from harness.track.view import ui_command
from harness.track.writer import Experiment

__all__ = [
    "DEFAULT_URI",
    "Experiment",
    "Invocation",
    "RunView",
    "primary_task",
    "register",
    "resolve_run",
    "run_of",
    "run_view",
    "samples",
    "set_alias",
    "tag",
    "tracking_uri",
    "ui_command",
    "with_parents",
]
