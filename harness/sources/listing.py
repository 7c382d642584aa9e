"""What `forgebench models` prints: each local Ollama model with its GGUF and the HF base it
maps to, or (`--hf`) the models in the Hugging Face cache and in `model_dirs`, with sizes.
Only reads what the other modules here find; nothing is resolved or downloaded.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import ForgebenchError
from harness.sources.hub import cached_snapshot, local_copy
from harness.sources.model_map import config_path, load_config, load_map, lookup
from harness.sources.ollama import discover, model_info


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
