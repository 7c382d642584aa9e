"""Serving backends: one small interface, two implementations.

A backend deploys a GGUF with its chat template, stop tokens, system prompt
and parameters, streams generations, shows the prompt it renders, reports
load time and memory, and removes what it deployed. Stages use this
interface (`base`), never a backend module directly; `get(name)` picks one
(`choice`), with `auto` meaning Ollama when a server answers at OLLAMA_HOST and
the embedded llama.cpp server otherwise.

Every deployment also exposes an OpenAI-compatible `/v1` endpoint
(`Deployment.openai_base_url`), which is what lm-eval scores through.
"""

from harness.backends.base import (
    NAMESPACE,
    Backend,
    Chunk,
    Deployment,
    ServeConfig,
    ServerStopped,
    model_name,
)
from harness.backends.choice import BACKENDS, get, ollama_answers, resolve_name
from harness.backends.llamacpp import LlamaServer
from harness.backends.ollama import OllamaBackend

__all__ = [
    "BACKENDS",
    "NAMESPACE",
    "Backend",
    "Chunk",
    "Deployment",
    "LlamaServer",
    "OllamaBackend",
    "ServeConfig",
    "ServerStopped",
    "get",
    "model_name",
    "ollama_answers",
    "resolve_name",
]
