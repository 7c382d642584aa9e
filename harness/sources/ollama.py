"""Ollama models as training bases: find the GGUF, map it to its full-precision HF base.

A model a user runs in Ollama is a quantized GGUF; training needs the
full-precision weights it was made from (seed 000). So `base: {ollama: NAME}`
finds the model (through the server's API when one answers, else in Ollama's
store on disk), reads its GGUF's metadata, looks its Hugging Face base up in
`model_map.yaml` (extended by the user's config), and checks the mapping
against that base's config.json before trusting it. Local copies (`model_dirs`
in the config) and the HF cache come first, so nothing is downloaded twice.
Where no base is reachable, `fallback: gguf` trains on the dequantized GGUF,
and the lineage says that is lossy.

The store layout follows Ollama's own code: manifests at
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
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.env import ollama_host
from harness.errors import ForgebenchError, InputError
from harness.sources import gguf as gguf_meta

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
BLOB_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
# What may follow a mapped tag and still name the same weights: "7b-instruct-q4_K_M".
QUALIFIER = re.compile(r"^(instruct|it|chat|i?q\d+(_[0-9a-z]+)*|fp16|bf16|f16|fp32|f32)$")
HF_CHECKS = (
    ("vocab_size", "vocabulary size", "vocab_size"),
    ("block_count", "layer count", "num_hidden_layers"),
    ("embedding_length", "hidden size", "hidden_size"),
)


# --- the user's config --------------------------------------------------------


class UserConfig(BaseModel):
    """~/.config/forgebench/config.yaml: where local models live, extra mappings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dirs: list[Path] = Field(
        default_factory=list, description="folders holding HF model folders (org/name or name)"
    )
    model_map: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Ollama model -> {tag: HF repo}, over the shipped table"
    )


def config_path() -> Path:
    """FORGEBENCH_CONFIG, else the XDG config folder's forgebench/config.yaml."""
    if os.environ.get("FORGEBENCH_CONFIG"):
        return Path(os.environ["FORGEBENCH_CONFIG"]).expanduser()
    folder = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(folder) / "forgebench" / "config.yaml"


def load_config() -> UserConfig:
    """The user's config; none at the default place is an empty one, a bad one an error."""
    path = config_path()
    if not path.is_file():
        if os.environ.get("FORGEBENCH_CONFIG"):
            raise InputError(f"FORGEBENCH_CONFIG names {path}, which is not a file")
        return UserConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the forgebench config: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the forgebench config is a mapping (model_dirs, model_map)")
    try:
        config = UserConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise InputError(f"{path}: {where}: {err['msg']}") from None
    dirs = [(path.parent / d.expanduser()).resolve() for d in config.model_dirs]
    return config.model_copy(update={"model_dirs": dirs})


# --- the mapping table --------------------------------------------------------


@dataclass(frozen=True)
class ModelMap:
    models: dict[str, dict[str, str]]
    """Ollama model (lower case, no tag) -> {tag: HF repo, or another tag as an alias}."""
    architectures: dict[str, str]
    """HF model_type -> GGUF general.architecture."""
    trimmed_vocab: frozenset[str]


def load_map(config: UserConfig) -> ModelMap:
    """The shipped table with the user's entries laid over it, tag by tag."""
    data = yaml.safe_load(resources.files("harness.sources").joinpath("model_map.yaml").read_text())
    models = {_lower(name): _lower_keys(tags) for name, tags in data["models"].items()}
    for name, tags in config.model_map.items():
        models[_lower(name)] = models.get(_lower(name), {}) | _lower_keys(tags)
    return ModelMap(models, data["architectures"], frozenset(data["trimmed_vocab"]))


def _lower(value: Any) -> str:
    return str(value).lower()


def _lower_keys(tags: dict[Any, Any]) -> dict[str, str]:
    return {_lower(tag): str(repo) for tag, repo in tags.items()}


def lookup(name: str, table: ModelMap) -> str | None:
    """The HF repo an Ollama model was quantized from, per the table; None when unknown."""
    host, namespace, model, tag = parse_name(name)
    tags = table.models.get(_lower(short_name(host, namespace, model, "")).removesuffix(":"))
    if not tags:
        return None
    key = _mapped_tag(tag.lower(), tags)
    if key is None:
        return None
    repo = tags[key]
    if "/" not in repo:  # an alias: latest: 7b
        repo = tags.get(repo.lower(), "")
    return repo if "/" in repo else None


def _mapped_tag(tag: str, tags: dict[str, str]) -> str | None:
    """The longest listed tag that `tag` is, or starts with, followed only by qualifiers; a tag
    of qualifiers alone (hf.co/...:Q4_K_M) names the model's default weights, `latest`."""
    parts = tag.split("-")
    for n in range(len(parts), -1, -1):
        key = "-".join(parts[:n]) or DEFAULT_TAG
        if key in tags and all(QUALIFIER.match(rest) for rest in parts[n:]):
            return key
    return None


# --- names, the store and the API ----------------------------------------------


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


# --- the Hugging Face side ------------------------------------------------------


def local_copy(repo: str, model_dirs: list[Path]) -> Path | None:
    """A folder under one of `model_dirs` named org/name or name, holding a config.json."""
    for folder in model_dirs:
        for candidate in (folder / repo, folder / repo.split("/")[-1]):
            if (candidate / "config.json").is_file():
                return candidate
    return None


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The HF cache's snapshot of `repo` when it is complete: config.json and every weight file
    (a half-finished download would otherwise pass for cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        complete = all((folder / shard).is_file() for shard in shards)
    else:
        weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
        complete = bool(weights)
    return folder if complete and (folder / "config.json").is_file() else None


def download_size(repo: str, revision: str | None = None) -> int | None:
    """Bytes that a first use of `repo` would download (0 when all cached), from the hub's
    file metadata; None when that cannot be known (offline, hub unreachable)."""
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import DryRunError, HfHubHTTPError

    if is_offline_mode():
        return None
    try:
        files = snapshot_download(repo, revision=revision, dry_run=True)
    except DryRunError:
        return None
    except HfHubHTTPError as exc:
        raise _hub_error(repo, exc) from None
    return sum(f.file_size or 0 for f in files if f.will_download)


def _hf_config(repo: str, revision: str | None) -> dict[str, Any] | None:
    """config.json alone, from the cache or fetched; None when neither can provide it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(repo, "config.json", revision=revision)
    except LocalEntryNotFoundError:
        return None
    except HfHubHTTPError as exc:
        raise _hub_error(repo, exc) from None
    return json.loads(Path(path).read_text())


def _hub_error(repo: str, exc: Exception) -> ForgebenchError:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return ForgebenchError(f"{repo} has no such revision on the Hugging Face hub")
    if isinstance(exc, RepositoryNotFoundError):
        return ForgebenchError(
            f"{repo} is not on the Hugging Face hub or is gated: accept its licence on "
            "huggingface.co and log in (`hf auth login`), or fix the mapping"
        )
    return ForgebenchError(f"{repo}: Hugging Face hub error: {str(exc).splitlines()[0]}")


def verify(info: GgufInfo, config: dict[str, Any], name: str, repo: str, table: ModelMap) -> None:
    """Refuse a mapping whose HF config does not describe the same network as the GGUF."""
    model_type = str(config.get("model_type", ""))
    shape = {**config, **config.get("text_config", {})}  # multimodal configs nest the LM's
    expected = table.architectures.get(model_type, model_type.replace("_", ""))
    problems = []
    if info.architecture != expected:
        problems.append(
            f"architecture {info.architecture} in the GGUF, {model_type or '?'} "
            f"(GGUF {expected}) in config.json"
        )
    for attr, label, key in HF_CHECKS:
        ours, theirs = getattr(info, attr), shape.get(key)
        trimmed = attr == "vocab_size" and model_type in table.trimmed_vocab
        if ours is None or theirs is None:
            problems.append(f"{label} unknown ({ours} in the GGUF, {theirs} in config.json)")
        elif ours != theirs and not (trimmed and ours < theirs):
            problems.append(f"{label} {ours} in the GGUF, {theirs} in config.json")
    if problems:
        raise ForgebenchError(
            f"Ollama model {name} does not match its mapped base {repo}: "
            + "; ".join(problems)
            + f": fix the mapping (model_map: in {config_path()})"
        )


# --- resolving base: {ollama: ...} -----------------------------------------------


@dataclass(frozen=True)
class Resolution:
    model: OllamaModel
    info: GgufInfo
    repo: str | None
    base: dict[str, Any]
    """What harness.sources materializes instead: {hf, revision}, {path} or {gguf}."""
    lineage: dict[str, Any]
    """Merged over the materialized base's lineage: where it came from and how it was checked."""
    warning: str | None = None
    """Set when training falls back to the dequantized GGUF; say it before training."""


def resolve_base(base: dict[str, Any]) -> Resolution:
    """`base: {ollama: NAME}` -> the verified HF base to train on (a local copy, the HF cache,
    else the hub), or, with `fallback: gguf`, the model's own GGUF dequantized."""
    config = load_config()
    table = load_map(config)
    model = find_model(base["ollama"])
    info = model_info(model)
    repo = lookup(model.name, table)
    if repo is None:
        reason = f"no Hugging Face base is known for it ({info.architecture}, {info.size_label})"
        hint = f"add one under model_map: in {config_path()}"
    else:
        found = _hf_base(repo, base.get("revision"), config.model_dirs)
        if isinstance(found, tuple):
            hf_base, hf_config = found
            verify(info, hf_config, model.name, repo, table)
            return Resolution(model, info, repo, hf_base, _lineage(model, info, repo, True))
        reason = found
        hint = (
            f"fetch it once (`hf download {repo}`) or list a local copy under model_dirs: "
            f"in {config_path()}"
        )
    return _fallback(base, model, info, repo, reason, hint)


def _hf_base(
    repo: str, revision: str | None, model_dirs: list[Path]
) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """(the base to materialize, its config.json), or why no HF base is reachable."""
    from huggingface_hub import is_offline_mode

    folder = local_copy(repo, model_dirs)
    if folder is not None:
        return {"path": str(folder)}, json.loads((folder / "config.json").read_text())
    snapshot = cached_snapshot(repo, revision)
    if snapshot is not None:
        return {"hf": repo, "revision": revision}, json.loads(
            (snapshot / "config.json").read_text()
        )
    if is_offline_mode():
        return f"{repo} is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1)"
    config = _hf_config(repo, revision)
    if config is None:
        return f"{repo} is not in the Hugging Face cache and the hub cannot be reached"
    return {"hf": repo, "revision": revision}, config


def _fallback(
    base: dict[str, Any],
    model: OllamaModel,
    info: GgufInfo,
    repo: str | None,
    reason: str,
    hint: str,
) -> Resolution:
    """Train on the dequantized GGUF, only when the spec opted in: it is lossy."""
    if base.get("fallback") != "gguf":
        raise ForgebenchError(
            f"Ollama model {model.name}: {reason}: {hint}, or set "
            f"base: {{ollama: {base['ollama']}, fallback: gguf}} to train on its "
            f"{info.file_type} GGUF dequantized (lossy)"
        )
    if model.gguf is None or not model.gguf.is_file():
        raise ForgebenchError(
            f"Ollama model {model.name}: {reason}, and its GGUF is not on this machine to fall "
            "back on"
        )
    warning = (
        f"{model.name}: {reason}; training on weights dequantized from its {info.file_type} "
        "GGUF: lossy, what quantization discarded does not come back"
    )
    lineage = _lineage(model, info, repo, False) | {"fallback_reason": reason}
    return Resolution(model, info, repo, {"gguf": str(model.gguf)}, lineage, warning)


def _lineage(model: OllamaModel, info: GgufInfo, repo: str | None, verified: bool) -> dict:
    return {
        "source_kind": "ollama",
        "ollama_model": model.name,
        "ollama_digest": model.digest,
        "ollama_gguf": str(model.gguf),
        "ollama_file_type": info.file_type,
        "hf_base": repo or "",
        "mapping_verified": verified,
    }


# --- what `forgebench models` prints ---------------------------------------------


def model_lines() -> list[str]:
    """`forgebench models`: each local Ollama model, its GGUF and the HF base it maps to."""
    config = load_config()
    table = load_map(config)
    found = discover()
    if not found.models:
        return [f"no Ollama models in {found.source}", *found.skipped]
    lines = [f"Ollama models from {found.source}:"]
    for model in found.models:
        try:
            shape = model_info(model).describe()
        except ForgebenchError as exc:
            shape = f"unreadable: {exc}"
        repo = lookup(model.name, table)
        hf_base = _hf_state(repo, config.model_dirs) if repo else "unknown (no mapping)"
        lines += [
            f"  {model.name}  {shape}",
            f"    GGUF: {model.gguf or 'none (not a GGUF model)'}",
            f"    HF base: {hf_base}",
        ]
    return lines + found.skipped


def _hf_state(repo: str, model_dirs: list[Path]) -> str:
    folder = local_copy(repo, model_dirs)
    if folder is not None:
        return f"{repo} (local copy at {folder})"
    return f"{repo} ({'cached' if cached_snapshot(repo) else 'not cached'})"


def hf_cache_lines() -> list[str]:
    """`forgebench models --hf`: the models in the HF cache and in model_dirs, with sizes."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    where = constants.HF_HUB_CACHE  # read now: scan_cache_dir's default is bound at import
    try:
        cache = scan_cache_dir(where)
    except CacheNotFound:
        lines = [f"no Hugging Face cache at {where}"]
    else:
        repos = sorted((r for r in cache.repos if r.repo_type == "model"), key=lambda r: r.repo_id)
        total = human_size(sum(r.size_on_disk for r in repos))
        count = f"{len(repos)} model{'' if len(repos) == 1 else 's'}"
        lines = [f"Hugging Face cache at {where}: {count}, {total}"]
        for repo in repos:
            refs = sorted({ref for rev in repo.revisions for ref in rev.refs}) or ["(no refs)"]
            lines.append(
                f"  {repo.repo_id}  {human_size(repo.size_on_disk)}  {repo.nb_files} files  "
                f"{', '.join(refs)}"
            )
    config = load_config()
    if config.model_dirs:
        lines.append(f"model_dirs (from {config_path()}):")
        lines += [
            f"  {folder}  {human_size(_folder_size(folder))}"
            for folder in _model_folders(config.model_dirs)
        ]
    return lines


def _model_folders(model_dirs: list[Path]) -> list[Path]:
    """HF model folders (with a config.json) at depth 1 or 2 (org/name) under each dir."""
    found = []
    for folder in model_dirs:
        found += sorted(p.parent for p in folder.glob("*/config.json"))
        found += sorted(p.parent for p in folder.glob("*/*/config.json"))
    return found


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
