"""The interface every serving backend keeps, and the names and records it deals in.

`ollama` and `llamacpp` build on these, and `harness.backends` re-exports them beside the
two backends; they live apart from the package's face so that a backend module can
import them without importing the package that imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.errors import ForgebenchError

NAMESPACE = "forgebench"
"""Every model forgebench deploys is named forgebench/..., so `forgebench clean` finds them."""


def model_name(experiment: str, adapter: str | None, quant: str, source: str | None) -> str:
    """forgebench/<experiment>-<adapter>-<quant>; a model made from an Ollama model is named
    after it: forgebench/<source>-ft-<adapter>-<quant> (the untuned control <source>-<quant>)."""
    if source is None:
        return f"{NAMESPACE}/{experiment}-{adapter or 'base'}-{quant}"
    stem = re.sub(r"[^a-z0-9._-]+", "-", source.rsplit("/", 1)[-1].lower()).strip("-._")
    return f"{NAMESPACE}/{stem}-ft-{adapter}-{quant}" if adapter else f"{NAMESPACE}/{stem}-{quant}"


@dataclass(frozen=True)
class ServeConfig:
    """What to deploy besides the weights."""

    model_name: str
    """Name the server will know the model by, e.g. forgebench/quickstart-r8-qv-q4_k_m."""
    chat_template: str
    """The model's own Jinja chat template (from its tokenizer / GGUF metadata)."""
    stop: tuple[str, ...] = ()
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    """Sampling and context options in Ollama's names (temperature, num_ctx, top_k, ...)."""
    slots: int = 1
    """Parallel requests the server should handle (llama-server -np; OLLAMA_NUM_PARALLEL)."""
    adapter: Path | None = None
    """A LoRA GGUF served on top of the weights at scale 1 (the adapter route):
    llama-server's --lora, Ollama's ADAPTER."""
    quantize: str | None = None
    """A level the server quantizes the (F16) weights to as it takes them: Ollama's
    create `quantize` (`ollama create -q`). llama-server serves a file as it is."""
    cache_type: str | None = None
    """The KV-cache type for K and V (f16, q8_0, q4_0); None: the server's default (f16).
    llama-server --cache-type-k/-v; Ollama's is server-wide (OLLAMA_KV_CACHE_TYPE)."""
    flash_attn: str | None = None
    """on or off; None: the server's default (llama-server's auto). Server-wide on Ollama."""
    adapters: tuple[Path, ...] = ()
    """LoRA GGUFs loaded into one llama-server but applied to no request that does not
    pick one (`Deployment.request_fields`): the adapter route's server shared by a base
    level's cells (harness/run/deployment.py). Ollama takes one ADAPTER per model, not these."""


@dataclass
class Deployment:
    backend: str
    model_name: str
    base_url: str
    """The server's root URL, e.g. http://127.0.0.1:8081."""
    load_seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    request_fields: dict[str, Any] = field(default_factory=dict)
    """Fields every request to this deployment carries beside the messages: on a
    llama-server with LoRA GGUFs, `lora`, the adapter it applies (a request that does not
    name an adapter gets each at the server's global scale)."""

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"


@dataclass
class Chunk:
    """One piece of a streamed answer; the last one has `done` and the server's figures."""

    text: str
    done: bool = False
    done_reason: str | None = None
    """"stop" (end-of-turn or a stop string) or "length" (hit max tokens)."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_seconds: float | None = None
    """Server-side prefill time."""
    decode_seconds: float | None = None
    """Server-side generation time."""


class ServerStopped(ForgebenchError):
    """The deployment's server died or stopped answering while a stage used it.

    The first line says how (an exit code or signal, or the address that stopped
    answering): it is the cell's reason in the table and on the console. The lines after
    it, the last lines of the server's own log, go with the full reason to MLflow."""

    def __init__(self, how: str, log_tail: list[str] | tuple[str, ...] = ()) -> None:
        self.how, self.log_tail = how, tuple(log_tail)
        lines = [how]
        if self.log_tail:
            lines += ["last lines of its log:", *(f"  {line}" for line in self.log_tail)]
        super().__init__("\n".join(lines))

    def after(self, answers: int) -> ServerStopped:
        """The same death, saying how far the stage got."""
        return ServerStopped(f"{self.how} after {answers} answers", self.log_tail)


class Backend(Protocol):
    name: str

    def deploy(self, gguf: Path, config: ServeConfig) -> Deployment: ...

    def chat(
        self,
        deployment: Deployment,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        adapter_scale: float | None = None,
        fixed_length: bool = False,
    ) -> Iterator[Chunk]:
        """`adapter_scale`: a probe at this scale of the deployed adapter (0 answers as the
        base alone), answered greedily; None serves the deployment as it is, with its
        options. Ollama takes 0 or 1 only. `fixed_length`: generate `max_tokens` whatever
        the model says (llama-server's `ignore_eos`; Ollama has no such option and may stop
        early), so every timed request decodes the same length."""
        ...

    def render_prompt(self, deployment: Deployment, messages: list[dict[str, str]]) -> str | None:
        """The prompt text the server builds for `chat` with these messages (its template,
        the deployment's system prompt, the generation prompt), without generating; BOS
        and EOS the tokenizer adds are not in it. None when the server cannot show it."""
        ...

    def memory_bytes(self, deployment: Deployment) -> int | None: ...

    def stopped(self, deployment: Deployment) -> ServerStopped | None:
        """Asked after a request failed to connect: how the deployment's server stopped
        (exited, stopped answering), or None while it is up, when the failure was a
        passing one worth a retry."""
        ...

    def remove(self, deployment: Deployment) -> None: ...

    def close(self) -> None: ...
