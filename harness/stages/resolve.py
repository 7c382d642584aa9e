"""resolve: the spec's `base:` -> a Hugging Face model folder (+ lineage.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import sources
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("loading the base model", None)
    model_dir = out / "model"
    model_dir.mkdir()
    lineage = sources.materialize(settings["base"], model_dir)
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
    return {}
