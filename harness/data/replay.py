"""Self-replay: general prompts an adapter rehearses with the untuned base's own answers.

A replay file (`lora[].replay`) holds prompts only, one `{"prompt": str}` a line; the
train stage answers them with the base model itself before training, so the file works
for any base and teaches nothing the base did not already say.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.data import training
from harness.errors import ForgebenchError


def prompts(path: Path) -> list[str]:
    """The file's prompts, or the line that is wrong and how to fix it."""
    out = []
    for lineno, line in training.lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ForgebenchError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ForgebenchError(
                f'{path}:{lineno}: expected {{"prompt": str}}: a replay row is a prompt alone, '
                "answered by the base model itself"
            )
        if not row["prompt"].strip():
            raise ForgebenchError(f"{path}:{lineno}: prompt is empty; drop the row")
        out.append(row["prompt"])
    if not out:
        raise ForgebenchError(f'{path}: no prompts; give one {{"prompt": ...}} object per line')
    return out
