"""quantize: F16 GGUF -> quantized GGUF, with llama.cpp's quantizer via llama-cpp-python.

`llama_model_quantize` runs in a child process (`python -m
harness.stages.quantize SRC DST FTYPE`): native code that crashes takes only
that process down, and the cell fails with a message instead of the run. The
result is read back with the `gguf` package to check it has the file type asked
for, since llama.cpp silently falls back to other types for tensors whose rows
do not fit a quant's block size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import quant
from harness.errors import StageError
from harness.sources import gguf as gguf_meta
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    level = settings["level"]
    progress(f"quantizing to {level}", None)
    src, dst = inputs["gguf"] / "model.gguf", out / "model.gguf"
    ftype = quant.file_type(level)
    log = out / "quantize.log"
    with log.open("w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "harness.stages.quantize", str(src), str(dst), str(int(ftype))],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise StageError(
            f"llama.cpp quantizer failed for {level} (exit {done.returncode}): {tail[0]}"
        )
    written = gguf_meta.file_type(dst)
    if written != int(ftype):
        raise StageError(f"quantized file has file type {written}, expected {int(ftype)} ({level})")
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log.read_text())
    return {
        "gguf_bytes": dst.stat().st_size,
        # tensors whose row size does not fit the level's block size get another type
        "fallback_tensors": int(fallback.group(1)) if fallback else 0,
    }


def _quantize(src: str, dst: str, ftype: int) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))


if __name__ == "__main__":
    source, dest, file_type = sys.argv[1:4]
    sys.exit(_quantize(source, dest, int(file_type)))
