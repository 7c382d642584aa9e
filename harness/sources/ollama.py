"""Ollama's local models: their names, the store on disk, the server's API, and what each
model's GGUF says about itself.

A model is found through the server's API when one answers, else in Ollama's store on
disk. The store layout follows Ollama's own code: manifests at
`manifests/<host>/<namespace>/<model>/<tag>` (manifest/paths.go,
types/model/name.go), the weights in the layer of media type
`application/vnd.ollama.image.model` (server/images.go), blobs at
`blobs/sha256-<hex>` (manifest.BlobsPath), and a model's digest is the sha256
of its manifest file (manifest.ParseNamedManifest), as `ollama list` shows it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.env import ollama_host
from harness.errors import ForgebenchError, InputError
from harness.sources import gguf as gguf_meta

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
BLOB_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")


def parse_name(name: str) -> tuple[str, str, str, str]:
    """host, namespace, model, tag, with Ollama's defaults (types/model/name.go ParseName)."""
    rest, tag = name.strip(), DEFAULT_TAG
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = rest.rsplit(":", 1)
    parts = rest.split("://", 1)[-1].split("/")
    if len(parts) > 3 or not all(parts) or not tag:
        raise InputError(f"{name!r} is not an Ollama model name (e.g. qwen2.5-coder:7b)")
    host, namespace, model = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts][-3:]
    return host, namespace, model, tag


def short_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The name as `ollama list` shows it (types/model/name.go DisplayShortest)."""
    if host.lower() != DEFAULT_HOST:
        prefix = f"{host}/{namespace}/"
    elif namespace.lower() != DEFAULT_NAMESPACE:
        prefix = f"{namespace}/"
    else:
        prefix = ""
    return f"{prefix}{model}:{tag}"


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF says about itself; what `models` shows and verification compares."""

    architecture: str
    parameters: int | None
    size_label: str | None
    file_type: str
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    vocab_size: int | None

    def describe(self) -> str:
        params = self.size_label or "?"
        if self.parameters:
            params += f" ({self.parameters / 1e6:,.1f}M parameters)"
        return (
            f"{self.architecture}, {params}, {self.file_type}, context {self.context_length or '?'}"
        )


@dataclass(frozen=True)
class OllamaModel:
    name: str
    """As `ollama list` shows it, e.g. qwen2.5-coder:7b."""
    digest: str
    """sha256 of the manifest: what `ollama list` shows as its ID, and what changes on a pull."""
    size: int
    gguf: Path | None
    """The blob of the model layer; None for a model without one."""
    reported: GgufInfo | None = None
    """What the server reported (/api/show), for when its blob is not on this machine."""


@dataclass(frozen=True)
class Discovery:
    models: list[OllamaModel]
    source: str
    """Where they were found, in words, for messages."""
    skipped: list[str] = field(default_factory=list)


def models_dir() -> Path:
    """Ollama's model store: OLLAMA_MODELS, default ~/.ollama/models (envconfig.Models)."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def discover() -> Discovery:
    """The local Ollama models: from the server when one answers (it knows where its own
    store is), else from the store on disk."""
    host = ollama_host()
    listed = _from_api(host)
    if listed is not None:
        return Discovery(listed[0], f"the Ollama server at {host}", listed[1])
    root = models_dir()
    models, skipped = _from_store(root)
    return Discovery(models, f"the model store at {root} (no server answered at {host})", skipped)


def find_model(name: str) -> OllamaModel:
    """One model by name, matched as Ollama matches names (all parts, case-insensitive)."""
    wanted = [part.lower() for part in parse_name(name)]
    found = discover()
    for model in found.models:
        if [part.lower() for part in parse_name(model.name)] == wanted:
            return model
    for line in found.skipped:  # listed, but the server could not describe it
        if [part.lower() for part in parse_name(line.partition(": ")[0])] == wanted:
            raise InputError(f"Ollama model {line}")
    raise InputError(
        f"no Ollama model {name!r} in {found.source}: `ollama pull {name}`, "
        "or see `forgebench models`"
    )


def _from_store(root: Path) -> tuple[list[OllamaModel], list[str]]:
    """Every manifest under manifests/<host>/<namespace>/<model>/<tag>, as Ollama globs them."""
    manifests = root / "manifests"
    models, skipped = [], []
    for path in sorted(p for p in manifests.glob("*/*/*/*") if p.is_file()):
        try:
            models.append(_from_manifest(root, path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            skipped.append(f"{path}: unreadable manifest ({exc})")
    return models, skipped


def _from_manifest(root: Path, path: Path) -> OllamaModel:
    raw = path.read_bytes()
    manifest = json.loads(raw)
    layers = manifest["layers"]
    weights = next((x for x in layers if x.get("mediaType") == MODEL_MEDIA_TYPE), None)
    host, namespace, model, tag = path.relative_to(root / "manifests").parts
    return OllamaModel(
        name=short_name(host, namespace, model, tag),
        digest=hashlib.sha256(raw).hexdigest(),
        size=sum(int(x.get("size", 0)) for x in [*layers, manifest.get("config") or {}]),
        gguf=_blob(root, weights["digest"]) if weights else None,
    )


def _blob(root: Path, digest: str) -> Path:
    if not BLOB_DIGEST.match(digest):
        raise ValueError(f"invalid blob digest {digest!r}")
    return root / "blobs" / digest.replace(":", "-")


def _from_api(host: str) -> tuple[list[OllamaModel], list[str]] | None:
    """The server's models (/api/tags, then /api/show each) and a line for each one it
    could not show; None when no server answers. One /api/show that fails (a cloud model
    while offline: server/routes.go ShowHandler asks ollama.com) costs that model only."""
    import httpx
    import ollama

    client = ollama.Client(host=host, timeout=10)
    try:
        listed = client.list()
    except (ConnectionError, httpx.TransportError):
        return None
    except ollama.ResponseError as exc:
        raise ForgebenchError(f"the Ollama server at {host} failed: {exc.error}") from None
    models, skipped = [], []
    for item in (item for item in listed.models if item.model):
        try:
            models.append(_api_model(client, item))
        except ollama.ResponseError as exc:
            skipped.append(f"{item.model}: /api/show failed ({exc.status_code}): {exc.error}")
        except httpx.TransportError as exc:
            skipped.append(f"{item.model}: /api/show did not answer ({exc})")
    return models, skipped


def _api_model(client: Any, item: Any) -> OllamaModel:
    shown = client.show(item.model)
    return OllamaModel(
        name=item.model,
        digest=item.digest or "",
        size=int(item.size or 0),
        gguf=_weights_path(shown.modelfile),
        reported=_reported_info(shown),
    )


def _weights_path(modelfile: str | None) -> Path | None:
    """The weights' path: /api/show's Modelfile opens with `FROM <blob>` (server/images.go)."""
    for line in (modelfile or "").splitlines():
        if line.startswith("FROM "):
            return Path(line.removeprefix("FROM ").strip())
    return None


def _reported_info(shown: Any) -> GgufInfo:
    """The same facts from /api/show's model_info, for a server whose blobs we cannot read."""
    info = dict(shown.modelinfo or {})
    details = shown.details
    arch = info.get("general.architecture") or (details.family if details else None) or "?"
    return GgufInfo(
        architecture=arch,
        parameters=info.get("general.parameter_count"),
        size_label=details.parameter_size if details else None,
        file_type=(details.quantization_level if details else None) or "unknown",
        context_length=info.get(f"{arch}.context_length"),
        block_count=info.get(f"{arch}.block_count"),
        embedding_length=info.get(f"{arch}.embedding_length"),
        vocab_size=info.get(f"{arch}.vocab_size"),
    )


# --- GGUF metadata ------------------------------------------------------------


def model_info(model: OllamaModel) -> GgufInfo:
    """From the GGUF itself when it is on this machine, else what the server reported."""
    if model.gguf is not None and model.gguf.is_file():
        return read_gguf(model.gguf)
    if model.reported is not None:
        return model.reported
    raise ForgebenchError(f"Ollama model {model.name} has no GGUF on this machine ({model.gguf})")


def read_gguf(path: Path) -> GgufInfo:
    """A GGUF's architecture, shape, quant level and context length."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ForgebenchError(f"cannot read GGUF {path}: {exc.strerror}") from None
    return _read_gguf(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_gguf(path: str, size: int, mtime_ns: int) -> GgufInfo:
    """Cached on size and mtime; a file shorter than its tensors is refused."""
    try:
        header = gguf_meta.header(Path(path))
    except (ValueError, OSError) as exc:
        raise ForgebenchError(f"{path} is not a readable GGUF: {exc}") from None
    if header.data_end > size:
        raise ForgebenchError(
            f"{path} is truncated: {size} bytes, its tensors end at {header.data_end}"
        )
    value = header.fields.get
    arch = value("general.architecture") or "?"
    tokens = value("tokenizer.ggml.tokens")
    return GgufInfo(
        architecture=arch,
        parameters=header.parameters,
        size_label=value("general.size_label"),
        file_type=gguf_meta.file_type_name(value("general.file_type")),
        context_length=value(f"{arch}.context_length"),
        block_count=value(f"{arch}.block_count"),
        embedding_length=value(f"{arch}.embedding_length"),
        vocab_size=tokens.count
        if isinstance(tokens, gguf_meta.Array)
        else value(f"{arch}.vocab_size"),
    )
