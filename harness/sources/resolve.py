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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import ForgebenchError
from harness.sources import hub
from harness.sources.model_map import ModelMap, config_path, load_config, load_map, lookup
from harness.sources.ollama import GgufInfo, OllamaModel, find_model, model_info

HF_CHECKS = (
    ("vocab_size", "vocabulary size", "vocab_size"),
    ("block_count", "layer count", "num_hidden_layers"),
    ("embedding_length", "hidden size", "hidden_size"),
)


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
        found = hub.hf_base(repo, base.get("revision"), config.model_dirs)
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
