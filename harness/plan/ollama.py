"""What the spec asks of an Ollama server that its release no longer does, refused while
planning (`validate` and `run` alike): the adapter route needs a create that takes an
ADAPTER, a recipe `by: ollama` a create that quantizes a GGUF (`ollama_versions`); and a
sweep of what Ollama sets only for the whole server (`server_wide`)."""

from __future__ import annotations

from harness.backends import ollama_versions
from harness.chain import ADAPTER
from harness.env import ollama_host
from harness.errors import InputError
from harness.plan import keys
from harness.spec import Spec, serving


def refuse_what_it_cannot(spec: Spec) -> None:
    server_wide(spec)
    version = keys.served_identity("ollama")["ollama"]
    server = f"Ollama {version} at {ollama_host()}"
    if ADAPTER in spec.route and not ollama_versions.takes_adapters(version):
        raise InputError(
            f"{spec.where('route')}: {server} no longer takes LoRA adapters (removed in "
            "0.34.1, ollama PR #14969), so route adapter cannot be served there: use "
            "route: [merge], serve.backend: llamacpp, or Ollama 0.33"
        )
    if ollama_versions.quantizes_gguf(version):
        return
    for i, name in enumerate(spec.levels):
        if (recipe := spec.recipe(name)) is not None and recipe.by == "ollama":
            raise InputError(
                f"{spec.where('quant', i)}: {server} does not quantize GGUF models during "
                f"import (since 0.34.1, its import guide): drop {name}, or measure it on "
                "Ollama 0.30 to 0.33"
            )


def server_wide(spec: Spec) -> None:
    """Ollama takes num_ctx and threads per model, but parallel slots, the KV-cache type and
    flash attention for the whole server, from its environment when it starts: a sweep of
    those cannot be served one cell at a time there (backend auto that found Ollama; an
    explicit backend: ollama is refused by the spec itself)."""
    if name := serving.server_wide(spec.serve.sweep):
        raise InputError(
            f"{spec.where('serve', 'sweep', name)}: {serving.server_wide_message(name)}"
        )
