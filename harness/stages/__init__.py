"""The stages of the chain, one module each.

Every stage module has the same entry point,
`run(settings, inputs, out, progress) -> metrics`: `settings` is exactly what
went into the stage's cache key, `inputs` maps input names to the finished
output folders of upstream stages, `out` is an empty folder to fill. A stage
reads nothing else, which is what makes its cached output safe to reuse.
The order of stages is known only to `harness.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

Progress = Callable[[str, float | None], None]
"""A stage reports what it is doing (`message`, fraction done or None)."""


class Stage(Protocol):
    def run(
        self, settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress
    ) -> dict[str, Any]: ...
