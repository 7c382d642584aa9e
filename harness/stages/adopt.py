"""adopt: a peft LoRA adapter trained elsewhere (`lora: [{name, path}]`) -> the same output
the train stage leaves (`adapter/`), after checking that its tensors fit the base.

Most users train with Unsloth, axolotl, LLaMA-Factory or TRL and want the result checked
before it ships. Such an adapter enters the chain where a trained one would: merge (or
convert_lora on the adapter route), then every level and measurement as usual, and its
training link compares the tuned HF model with the untuned base like any other. Its key is
the folder's content, so a copy elsewhere reuses every output and an edited adapter rebuilds.

An adapter made for another base would fail deep in peft's loader with a size-mismatch
traceback, or worse, load into a base of the same shapes by another name: the first is
refused here in one line naming the tensor, and the adapter's own name for its base is kept
in `source.json` for the record.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness.errors import ForgebenchError, StageError
from harness.hashing import tree_sha256
from harness.sources import adapters
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    folder = Path(settings["adapter"])
    progress(f"checking the adapter in {folder} against the base", None)
    try:
        adapter = adapters.read(folder)
    except ForgebenchError as exc:
        raise StageError(str(exc)) from None
    tensors = adapters.tensor_shapes(adapter.weights)
    base = _base_shapes(inputs["base"] / "model", settings["trust_remote_code"])
    if why := adapters.misfit(adapter, tensors, base):
        raise StageError(
            f"the adapter in {folder} was not trained on this base: {why} (its "
            f"{adapters.CONFIG} names {adapter.base_model}); give the base it was trained "
            "on, or train one on this base"
        )
    kept = out / "adapter"
    kept.mkdir()
    shutil.copy2(folder / adapters.CONFIG, kept / adapters.CONFIG)
    shutil.copy2(adapter.weights, kept / adapter.weights.name)
    source = {
        "path": str(folder),
        "sha256": tree_sha256(folder),
        "base_model_name_or_path": adapter.base_model,
    }
    (out / "source.json").write_text(json.dumps(source, indent=2))
    return {
        "adapter_r": adapter.r,
        "adapter_alpha": adapter.alpha,
        "adapter_tensors": len(tensors),
        "trainable_params": sum(math.prod(shape) for shape in tensors.values()),
    }


def _base_shapes(model_dir: Path, trust: bool) -> dict[str, tuple[int, ...]]:
    """The base's parameter shapes, from its config on the meta device (no weights read)."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    # a tied output head shares the embedding's tensor and is listed under both names
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
