"""A cell marked after its run: a tag on its run (`best` names the choice), its GGUF
registered as an MLflow model version, and an alias pointed at that version (what `best
--register` and the release gate's `--promote` do).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from harness.errors import ForgebenchError
from harness.track import connect, schema


def tag(uri: str, run_id: str, key: str, value: str) -> None:
    connect.client(uri).set_tag(run_id, key, value)


def register(
    uri: str, name: str, run_id: str, gguf: Path, alias: str, lora: Path | None = None
) -> str:
    """Register a cell's GGUF (logged to its run; on the adapter route with its LoRA GGUF
    beside it) as a model version and point `alias` at it."""
    client = connect.client(uri)
    if not any(a.path == "gguf" for a in client.list_artifacts(run_id)):
        client.log_artifact(run_id, str(gguf), "gguf")
        if lora is not None:
            client.log_artifact(run_id, str(lora), "gguf")
    with contextlib.suppress(Exception):  # already registered
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/gguf", run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(run_id, schema.REGISTERED, f"{name}@{alias} v{version.version}")
    return version.version


def set_alias(uri: str, name: str, alias: str, run_id: str, gguf: Path | None) -> str:
    """Move `alias` to the version registered from `run_id`, registering it first if needed."""
    client = connect.client(uri)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            client.set_registered_model_alias(name, alias, version.version)
            return version.version
    if gguf is None:
        raise ForgebenchError(f"run {run_id} has no GGUF to register as {name}")
    return register(uri, name, run_id, gguf, alias)
