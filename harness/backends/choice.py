"""Which backend serves: one by name, or `auto`, Ollama when a server answers at
OLLAMA_HOST and the embedded llama.cpp server otherwise."""

from __future__ import annotations

import httpx

from harness.backends.base import Backend
from harness.backends.llamacpp import LlamaServer
from harness.backends.ollama import OllamaBackend
from harness.env import ollama_host

BACKENDS = ("ollama", "llamacpp")


def ollama_answers(timeout: float = 0.5) -> bool:
    try:
        return httpx.get(f"{ollama_host()}/api/version", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def resolve_name(choice: str) -> str:
    """`auto` -> "ollama" when a server answers at OLLAMA_HOST, else "llamacpp"."""
    if choice != "auto":
        return choice
    return "ollama" if ollama_answers() else "llamacpp"


def get(name: str) -> Backend:
    """A backend by name."""
    if name == "ollama":
        return OllamaBackend()
    if name == "llamacpp":
        return LlamaServer()
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
