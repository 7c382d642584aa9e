"""Running a plan's cells: the serial executor and its engine (`executor`), the Ray executor
(`ray`), a served cell's deployment and the adapter route's shared servers (`deployment`),
and what a run hands back as it goes (`outcomes`)."""

from __future__ import annotations

from harness.run.executor import Executor, Serial
from harness.run.ray import RayExecutor
from harness.spec import Spec

__all__ = ["Executor", "RayExecutor", "Serial", "chosen"]


def chosen(spec: Spec, kind: str | None = None, address: str | None = None) -> Executor:
    """The command line's executor (`kind`, `address`), else the spec's `executor:`."""
    kind = kind or spec.executor.kind
    if kind == "serial":
        return Serial()
    return RayExecutor(address or spec.executor.address)
