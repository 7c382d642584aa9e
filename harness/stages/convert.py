"""convert: HF model folder -> F16 GGUF, with llama.cpp's own `convert_hf_to_gguf.py`.

The converter comes from the same llama.cpp tree as the quantizer and the
runtime (see `harness.toolchain`); it runs as a subprocess so that its own
`gguf-py` is the one it imports. Conversion is never reimplemented here.
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


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    progress(f"converting to {settings['outtype'].upper()} GGUF", None)
    gguf = out / "model.gguf"
    log = out / "convert.log"
    with log.open("w") as fh:
        done = subprocess.run(
            [
                sys.executable,
                str(toolchain.converter()),
                str(inputs["model"] / "model"),
                "--outfile",
                str(gguf),
                "--outtype",
                settings["outtype"],
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise StageError(f"convert_hf_to_gguf.py failed (exit {done.returncode}): {tail[0]}")
    return {"gguf_bytes": gguf.stat().st_size}
