"""The user's forgebench config and the table that maps an Ollama model to the Hugging Face
repo it was quantized from: `model_map.yaml`, shipped beside this module, with the user's
own entries (`model_map:` in ~/.config/forgebench/config.yaml) laid over it.

Apart from Ollama's models themselves (harness.sources.ollama): this is what forgebench
knows and the user says about them, read the same whether or not Ollama is installed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import InputError
from harness.sources.ollama import DEFAULT_TAG, parse_name, short_name

# What may follow a mapped tag and still name the same weights: "7b-instruct-q4_K_M".
QUALIFIER = re.compile(r"^(instruct|it|chat|i?q\d+(_[0-9a-z]+)*|fp16|bf16|f16|fp32|f32)$")


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
