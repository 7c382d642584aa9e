"""drift: how far a quantized GGUF's next-token distribution is from its own F16's.

Spec keys: `drift.*` (`ctx`, `chunks`). Uses llama.cpp's own
`llama-perplexity --kl-divergence` on a fixed text (`evals/drift_text.txt`,
GSM8K test items, MIT), against the F16 logits that `drift_base` saved once
per adapter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness import toolchain
from harness.data.evals import EVALS
from harness.errors import StageError
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it

TEXT = EVALS / "drift_text.txt"
PATTERNS = {
    "kld_mean": r"Mean\s+KLD:\s+([-\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s+([-\d.]+)",
    "top1_agreement": r"Same top p:\s+([-\d.]+)",
    "ppl_ratio": r"Mean\s+PPL\(Q\)/PPL\(base\)\s*:\s+([-\d.]+)",
    "ppl": r"Mean\s+PPL\(Q\)\s*:\s+([-\d.]+)",
}


def perplexity(
    model: Path, settings: dict[str, Any], extra: list[str], log: Path, inputs: dict[str, Path]
) -> str:
    """llama-perplexity on `model`; on the adapter route (an `adapter` input) with its LoRA
    GGUF applied, so that a level is compared with the F16 of its own route."""
    args = ["-m", str(model), "-f", str(TEXT), "-c", str(settings["ctx"])]
    args += ["--chunks", str(settings["chunks"]), *extra]
    if "adapter" in inputs:
        args += ["--lora", str(inputs["adapter"] / "adapter.gguf")]
    return toolchain.run_tool("llama-perplexity", args, log)


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("KL divergence against F16", None)
    log = perplexity(
        inputs["gguf"] / "model.gguf",
        settings["drift"],
        ["--kl-divergence-base", str(inputs["reference"] / "logits.bin"), "--kl-divergence"],
        out / "perplexity.log",
        inputs,
    )
    metrics = {}
    for name, pattern in PATTERNS.items():
        match = re.search(pattern, log)
        if match is None:
            raise StageError(f"llama-perplexity printed no {name}; see {out / 'perplexity.log'}")
        metrics[name] = float(match.group(1))
    metrics["top1_agreement"] /= 100.0  # printed as a percentage
    return metrics
