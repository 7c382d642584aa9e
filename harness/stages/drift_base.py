"""drift_base: an F16 GGUF's logits on the drift text, computed once per adapter.

Every quant level of the same adapter is compared against this file by the
`drift` stage, so the F16 model runs over the text once, not once per level. With
`drift.task` it also writes the task's own text, the first evaluated task's items with
their answers, and saves the F16's logits on that too (the HF folder it was converted
from, a `model` input, counts its tokens). Calibration never holds these items (validate
refuses it), so the text is held out from any imatrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.data import evals
from harness.stages import Progress
from harness.stages.drift import TASK_CTX, TASK_LOGITS, TASK_TEXT, perplexity

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it

SMALLEST_CTX = 64


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("F16 reference logits", None)
    model = inputs["gguf"] / "model.gguf"
    drift = settings["drift"]
    perplexity(
        model,
        drift,
        ["--kl-divergence-base", str(out / "logits.bin")],
        out / "perplexity.log",
        inputs,
    )
    if not drift.get("task"):
        return {}
    progress("F16 reference logits on the task's text", None)
    text, tokens = task_text(settings["task_text"], inputs["model"] / "model")
    (out / TASK_TEXT).write_text(text)
    # llama-perplexity needs two chunks of the context at least
    ctx = min(drift["ctx"], max(SMALLEST_CTX, tokens // 2))
    (out / TASK_CTX).write_text(json.dumps({"ctx": ctx, "tokens": tokens}))
    perplexity(
        model,
        drift,
        ["--kl-divergence-base", str(out / TASK_LOGITS)],
        out / "perplexity_task.log",
        inputs,
        out / TASK_TEXT,
        ctx,
    )
    return {"task_text_tokens": tokens}


def task_text(task_settings: dict[str, Any], folder: Path) -> tuple[str, int]:
    """The task's items, each question and its answer as plain text (llama-perplexity
    reads chat markup as words, not as the special tokens it stands for), and their
    token count by the model's own tokenizer."""
    from transformers import AutoTokenizer

    rows = evals.qa_items(task_settings["task"], task_settings["data"])
    text = "".join(f"{row['question']}\n{row['answer']}\n\n" for row in rows)
    return text, len(AutoTokenizer.from_pretrained(folder)(text)["input_ids"])
