"""resolve: the spec's `base:` -> a Hugging Face model folder (+ lineage.json), with the
chat template that serves in its tokenizer.

The spec's `serve.chat_template` (its text, in this stage's settings) is written into the
folder's tokenizer here and nowhere else: training's loss mask, the merged model and the
GGUF converted from it, the check, the PyTorch reference and both backends' deployments all
read it from there, so no two of them can use different templates. The text that serves is
also kept as chat_template.jinja beside the folder, for the run's record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import sources
from harness.sources import templates
from harness.stages import Progress

VERSION = 4  # bump when this stage's outputs change: tests/test_keys.py checks it


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("loading the base model", None)
    model_dir = out / "model"
    model_dir.mkdir()
    lineage = sources.materialize(settings["base"], model_dir)
    text = templates.apply(model_dir, settings.get("chat_template"), settings["base"])
    (out / templates.FILE).write_text(text)
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
    return {}
