"""imatrix: an importance matrix for a recipe's quantization, by llama.cpp's `llama-imatrix`.

Spec keys: a `quant:` recipe's `imatrix` and `chunks`. The F16 GGUF a cell's levels are
made from runs over the calibration text, and llama-imatrix records how much each weight
column contributes there; `llama-quantize --imatrix` then spends its bits on those. The
calibration text is written beside the matrix (`calibration.txt`), so what calibrated a
shipped file can be read back:

- `train`: the training conversations, each rendered whole through the model's own chat
  template (special tokens parsed as such), which is the text the model meets when serving;
- `text`: a general text, `harness.data.calibration.general_text`;
- a file: its text as it is.

Validate has refused a text that holds an eval item, a guard item or a drift-text line.
Chunks are 512 tokens (llama-imatrix's default context); the text must hold two at least.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness import data, toolchain
from harness.data import calibration
from harness.errors import StageError
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it

CTX = 512


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    source = settings["calibration"]["source"]
    progress(f"rendering the calibration text ({source})", None)
    text, special = calibration_text(settings["calibration"], inputs)
    calibration_file = out / "calibration.txt"
    calibration_file.write_text(text)
    progress(f"llama-imatrix over at most {settings['chunks']} chunks of {CTX} tokens", None)
    args = ["-m", str(inputs["gguf"] / "model.gguf"), "-f", str(calibration_file)]
    args += ["-o", str(out / "imatrix.gguf"), "-c", str(CTX), "--chunks", str(settings["chunks"])]
    args += ["--no-ppl", *(["--parse-special"] if special else [])]
    try:
        log = toolchain.run_tool("llama-imatrix", args, out / "imatrix.log")
    except StageError:
        short = re.search(r"tokenizes to only (\d+) tokens", (out / "imatrix.log").read_text())
        if short is None:
            raise
        raise StageError(
            f"the calibration text ({source}) is {short.group(1)} tokens; llama-imatrix needs "
            f"two chunks of {CTX} at least: calibrate on more rows or a longer text"
        ) from None
    computed = re.search(r"computing over (\d+) chunks", log)
    if computed is None or not (out / "imatrix.gguf").is_file():
        raise StageError(f"llama-imatrix wrote no matrix; see {out / 'imatrix.log'}")
    return {"imatrix_chunks": int(computed.group(1)), "calibration_chars": len(text)}


def calibration_text(
    calibration_settings: dict[str, Any], inputs: dict[str, Path]
) -> tuple[str, bool]:
    """The calibration text, and whether its special tokens (chat markup) are to be parsed."""
    source = calibration_settings["source"]
    if source == "text":
        return calibration.general_text(), False
    if source == "file":
        return Path(calibration_settings["path"]).read_text(), False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs["model"] / "model")
    rendered = [
        tokenizer.apply_chat_template(conversation, tokenize=False)
        for conversation in data.training_set(calibration_settings["data"])
    ]
    return "\n".join(rendered), True
