"""merge: base + LoRA adapter -> one full HF model folder, via peft's `merge_and_unload`.

Merging is a packaging step, not training (seed 004): Ollama cannot attach a
LoRA adapter for most architectures, so the increment is folded into the base
weights and the result converted like any other model. The tokenizer and its
chat template are saved beside the weights, since the converter reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress("merging the adapter into the base", None)
    base_dir = inputs["base"] / "model"
    trust = settings["trust_remote_code"]
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=trust
    )
    merged = PeftModel.from_pretrained(base, inputs["adapter"] / "adapter").merge_and_unload()
    model_dir = out / "model"
    merged.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust).save_pretrained(model_dir)
    return {}
