"""convert_lora: the trained peft adapter -> a LoRA GGUF, with llama.cpp's own
`convert_lora_to_gguf.py`, for the adapter route.

The adapter route serves the base GGUF of each level with this file beside it (llama-server
`--lora`, Ollama's `ADAPTER`), so N adapters x M levels need M base files and N small LoRA
files instead of N x M whole models (seed 004). The converter comes from the same llama.cpp
tree as the runtime (see `harness.toolchain`) and reads only the base's config and
tokenizer (`--base`), never its weights, and never the hub.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import toolchain
from harness.errors import StageError
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it
FILE = "adapter.gguf"


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress(f"converting the adapter to a {settings['outtype'].upper()} LoRA GGUF", None)
    gguf = out / FILE
    log = out / "convert.log"
    command = [
        sys.executable,
        str(toolchain.converter(toolchain.LORA_CONVERTER)),
        "--base",
        str(inputs["base"] / "model"),
        "--outfile",
        str(gguf),
        "--outtype",
        settings["outtype"],
        str(inputs["adapter"] / "adapter"),
    ]
    if settings["trust_remote_code"]:
        command.insert(-1, "--trust-remote-code")
    with log.open("w") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not gguf.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise StageError(f"convert_lora_to_gguf.py failed (exit {done.returncode}): {tail[0]}")
    return {"lora_gguf_bytes": gguf.stat().st_size}
