"""The Hugging Face side of a base: a local copy (the config's `model_dirs`), the HF cache,
else the hub, in that order, so nothing is downloaded twice; and what a first use would
download. Kept apart from Ollama's side: a `base: {hf: ...}` needs it as much as an
Ollama model mapped to its HF base does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import ForgebenchError


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


def hf_base(
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
