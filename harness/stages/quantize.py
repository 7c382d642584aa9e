"""quantize: F16 GGUF -> quantized GGUF, with llama.cpp's own `llama-quantize`.

Spec keys: `quant` (a level, or a recipe: `harness.spec.recipes`). A recipe's importance
matrix comes from the `imatrix` stage (an `imatrix` input) and its per-tensor types go to
llama-quantize as `--tensor-type` (`output` and `token_embd` as their own flags). The
program runs as a child process: native code that crashes takes only that process down,
and the cell fails with a message instead of the run. The result is read back with the
`gguf` package: the file type must be the level's, and every tensor a recipe names must
have the type it asked for, since llama.cpp silently falls back to other types for
tensors whose rows do not fit a type's block size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from harness import quant, toolchain
from harness.errors import StageError
from harness.sources import gguf as gguf_meta
from harness.stages import Progress

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it

FLAGS = {"output": "--output-tensor-type", "token_embd": "--token-embedding-type"}


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    level = settings["level"]
    types = settings.get("tensor_types") or {}
    progress(
        f"quantizing to {level}" + (" with an importance matrix" if "imatrix" in inputs else ""),
        None,
    )
    src, dst = inputs["gguf"] / "model.gguf", out / "model.gguf"
    ftype = quant.file_type(level)
    args = ["--imatrix", str(inputs["imatrix"] / "imatrix.gguf")] if "imatrix" in inputs else []
    for pattern, kind in types.items():
        args += (
            [FLAGS[pattern], kind] if pattern in FLAGS else ["--tensor-type", f"{pattern}={kind}"]
        )
    args += [str(src), str(dst), level.upper(), str(os.cpu_count() or 1)]
    log = toolchain.run_tool("llama-quantize", args, out / "quantize.log")
    written = gguf_meta.file_type(dst)
    if written != int(ftype):
        raise StageError(f"quantized file has file type {written}, expected {int(ftype)} ({level})")
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
    metrics = {
        "gguf_bytes": dst.stat().st_size,
        # tensors whose row size does not fit the level's block size get another type
        "fallback_tensors": int(fallback.group(1)) if fallback else 0,
    }
    if types:
        metrics["tensor_types_set"] = _types_set(dst, types)
    return metrics


def _types_set(path: Path, types: dict[str, str]) -> int:
    """How many tensors got a type the recipe asked for; a pattern that matched none, or a
    tensor that came out as another type, fails the stage (the recipe did not happen)."""
    import gguf

    tensors = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
    total = 0
    for pattern, kind in types.items():
        if pattern in FLAGS:
            # a tied model has no output.weight: its token embeddings are the output head
            name = f"{pattern}.weight"
            hits = (
                [name]
                if name in tensors
                else (["token_embd.weight"] if pattern == "output" else [])
            )
        else:
            hits = [name for name in tensors if re.search(pattern, name)]
        if not hits:
            raise StageError(f"tensor_types: {pattern!r} matches no tensor of {path.name}")
        wrong = [f"{name} is {tensors[name]}" for name in hits if tensors[name] != kind]
        if wrong:
            raise StageError(
                f"tensor_types: asked {pattern}={kind}, but {wrong[0]} (llama.cpp fell back)"
            )
        total += len(hits)
    return total
