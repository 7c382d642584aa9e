"""drift: how far a quantized GGUF's next-token distribution is from its own F16's.

Spec keys: `drift.*` (`ctx`, `chunks`, `task`). Uses llama.cpp's own
`llama-perplexity --kl-divergence` on a fixed text (`evals/drift_text.txt`,
GSM8K test items, MIT), against the F16 logits that `drift_base` saved once
per adapter. With `drift.task`, again on the task's own text that drift_base
wrote (the first evaluated task's items with their answers): a general text can hide
what a level or an importance matrix does to the task. Those figures end in `_task`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness import toolchain
from harness.data.evals import EVALS
from harness.errors import StageError
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it

TEXT = EVALS / "drift_text.txt"
TASK_TEXT, TASK_LOGITS, TASK_CTX = "task_text.txt", "task_logits.bin", "task_ctx.json"
"""What drift_base leaves for the task's text: the text, the F16's logits on it, and the
context it was cut into (the task's text may be shorter than two of `drift.ctx`)."""
PATTERNS = {
    "kld_mean": r"Mean\s+KLD:\s+([-\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s+([-\d.]+)",
    "top1_agreement": r"Same top p:\s+([-\d.]+)",
    "ppl_ratio": r"Mean\s+PPL\(Q\)/PPL\(base\)\s*:\s+([-\d.]+)",
    "ppl": r"Mean\s+PPL\(Q\)\s*:\s+([-\d.]+)",
}


def perplexity(
    model: Path,
    settings: dict[str, Any],
    extra: list[str],
    log: Path,
    inputs: dict[str, Path],
    text: Path = TEXT,
    ctx: int | None = None,
) -> str:
    """llama-perplexity on `model` over `text`; on the adapter route (an `adapter` input)
    with its LoRA GGUF applied, so that a level is compared with the F16 of its own route."""
    args = ["-m", str(model), "-f", str(text), "-c", str(ctx or settings["ctx"])]
    args += ["--chunks", str(settings["chunks"]), *extra]
    if "adapter" in inputs:
        args += ["--lora", str(inputs["adapter"] / "adapter.gguf")]
    return toolchain.run_tool("llama-perplexity", args, log)


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("KL divergence against F16", None)
    model, reference = inputs["gguf"] / "model.gguf", inputs["reference"]
    log = perplexity(
        model,
        settings["drift"],
        ["--kl-divergence-base", str(reference / "logits.bin"), "--kl-divergence"],
        out / "perplexity.log",
        inputs,
    )
    metrics = figures(log, out / "perplexity.log")
    if settings["drift"].get("task"):
        progress("KL divergence against F16 on the task's text", None)
        task_log = perplexity(
            model,
            settings["drift"],
            ["--kl-divergence-base", str(reference / TASK_LOGITS), "--kl-divergence"],
            out / "perplexity_task.log",
            inputs,
            reference / TASK_TEXT,
            json.loads((reference / TASK_CTX).read_text())["ctx"],
        )
        task = figures(task_log, out / "perplexity_task.log")
        metrics |= {f"{name}_task": value for name, value in task.items()}
    return metrics


def figures(log: str, where: Path) -> dict[str, float]:
    metrics = {}
    for name, pattern in PATTERNS.items():
        match = re.search(pattern, log)
        if match is None:
            raise StageError(f"llama-perplexity printed no {name}; see {where}")
        metrics[name] = float(match.group(1))
    metrics["top1_agreement"] /= 100.0  # printed as a percentage
    return metrics
