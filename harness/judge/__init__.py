"""Judging a run: paired accuracy differences (`paired`), speed quantiles with bounds
(`speed`), the blame chain (`blame`), the verdicts and what they read (`verdict`,
`evidence`), the items a task needs (`sample_size`), the level to ship (`best`) and the
release gate (`gate`)."""

from harness.judge.best import choose
from harness.judge.verdict import Verdict, judge

__all__ = ["Verdict", "choose", "judge"]
