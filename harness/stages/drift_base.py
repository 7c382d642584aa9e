"""drift_base: an F16 GGUF's logits on the drift text, computed once per adapter.

Every quant level of the same adapter is compared against this file by the
`drift` stage, so the F16 model runs over the text once, not once per level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.stages import Progress
from harness.stages.drift import perplexity

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("F16 reference logits", None)
    perplexity(
        inputs["gguf"] / "model.gguf",
        settings["drift"],
        ["--kl-divergence-base", str(out / "logits.bin")],
        out / "perplexity.log",
        inputs,
    )
    return {}
