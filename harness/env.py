"""Defaults read from the environment: where forgebench caches, where Ollama listens."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """FORGEBENCH_CACHE, else $XDG_CACHE_HOME/forgebench (~/.cache/forgebench)."""
    if "FORGEBENCH_CACHE" in os.environ:
        return Path(os.environ["FORGEBENCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "forgebench"


def ollama_host(host: str | None = None) -> str:
    """`host` (default: OLLAMA_HOST, else 127.0.0.1:11434) as the ollama client reads it,
    with scheme and port filled in."""
    if host is None:
        host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    host = host.strip()
    if "://" not in host:
        host = f"http://{host}"
    if host.count(":") < 2:
        host = f"{host}:11434"
    return host.rstrip("/")
