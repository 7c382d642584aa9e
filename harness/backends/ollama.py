"""The Ollama backend: a GGUF served by an Ollama server, through the official `ollama` client.

Deploying uploads the GGUF as a blob (skipped when the server already holds that digest) and
creates the model with a Go template derived from the model's own Jinja chat template, so
Ollama renders prompts as the model was trained to see them, plus its stop strings, system
prompt and parameters (Ollama's option names); `/api/show` is then read back to confirm what
the server kept. Ollama 0.30+ may serve the GGUF's own Jinja template instead (see
`template_source`); the deployment records which one serves, and the check judges that one.
Chat streams `/api/chat`; the last chunk carries Ollama's own token counts and timings
(nanoseconds on the wire, seconds here), the model's thinking apart from its answer.
`modelfile()` writes the same deployment as a Modelfile, for `ollama create -f` by hand.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama

from harness import families
from harness.backends import (
    NAMESPACE,
    Chunk,
    Deployment,
    ServeConfig,
    ServerStopped,
)
from harness.env import ollama_host
from harness.errors import ForgebenchError
from harness.hashing import file_sha256
from harness.sources import gguf as gguf_meta

KEEP_ALIVE = "10m"
"""How long Ollama keeps a deployed model loaded after each request."""

# The default system turn goes before a first message that is not a system one, as the
# Jinja templates test messages[0]; not on `.System`, which an empty or later system
# message would get wrong (Go's rendering of both is checked in tests/test_go_template.py).
CHATML_DEFAULT_SYSTEM = (
    "{{- $first := true }}{{- range .Messages }}{{- if $first }}"
    '{{- if eq .Role "system" }}{{ else }}<|im_start|>system\n%s<|im_end|>\n{{ end }}'
    "{{- end }}{{- $first = false }}{{- end }}"
)
# A ChatML template's system turn written out as a literal, used when the conversation
# does not start with a system message (SmolLM2's "You are a helpful AI assistant named
# SmolLM", Qwen's "You are Qwen").
DEFAULT_SYSTEM = re.compile(r"""['"]<\|im_start\|>system(?:\n|\\n)([^'"{}]*?)<\|im_end\|>""")

T = TypeVar("T")


def go_template(jinja_template: str) -> tuple[str, list[str]]:
    """The Ollama (Go) template and stop strings equivalent to a model's Jinja chat template.

    Recognises ChatML (SmolLM2, Qwen), Llama 3 and Gemma by their turn markers and raises
    ValueError for anything else: a guessed template would serve a model that looks fine
    and answers badly. The derived template renders the same prompt text as the Jinja one
    for system/user/assistant conversations (Llama 3.1's date preamble aside), so the
    prompt token count Ollama reports matches the tokenizer's.
    """
    if "<|im_start|>" in jinja_template:
        default = DEFAULT_SYSTEM.search(jinja_template)
        prefix = CHATML_DEFAULT_SYSTEM % default.group(1).replace("\\n", "\n") if default else ""
        chatml = families.BY_NAME["chatml"]
        return prefix + chatml.go, list(chatml.stops)
    family = families.recognise(jinja_template)
    if family is not None:
        return family.go, list(family.stops)
    raise ValueError(
        "unrecognised chat template: not ChatML (<|im_start|>), Llama 3 (<|start_header_id|>) "
        "or Gemma (<start_of_turn>); give the model a known template (serve.chat_template) "
        "or use serve.backend: llamacpp, which runs the Jinja template itself"
    )


def modelfile(
    gguf_path: Path,
    template: str,
    system: str | None,
    parameters: dict[str, Any],
    adapter: Path | None = None,
) -> str:
    """The deployment as a Modelfile, for `ollama create NAME -f Modelfile` by hand.

    Quoting follows Ollama's parser (parser/parser.go): TEMPLATE and SYSTEM go in triple
    quotes, string parameters (stop strings) in quotes, one PARAMETER line per list item.
    The parser has no escapes, so a value holding three quotes cannot be written.
    """
    lines = [f"FROM {_quoted(str(Path(gguf_path).resolve()), bare_ok=True)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_quoted(str(Path(adapter).resolve()), bare_ok=True)}")
    lines.append(f'TEMPLATE """{_checked(template)}"""')
    if system:
        lines.append(f'SYSTEM """{_checked(system)}"""')
    for name, value in parameters.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            lines.append(f"PARAMETER {name} {_parameter(item)}")
    return "\n".join(lines) + "\n"


def _checked(value: str) -> str:
    """Ollama's parser ends a triple-quoted value at the first three quotes and knows no
    escapes: a value holding three quotes, or ending in one (which would merge with the
    closing three), cannot be written without changing what it says."""
    if '"""' in value or value.endswith('"'):
        raise ValueError(f"a Modelfile cannot hold {value[:40]!r}: it would end the quotes early")
    return value


def _quoted(value: str, bare_ok: bool = False) -> str:
    if bare_ok and not re.search(r'[\s"]', value):
        return value
    return f'"{value}"' if '"' not in value else f'"""{_checked(value)}"""'


def _parameter(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return _quoted(value) if isinstance(value, str) else str(value)


def create_parameters(config: ServeConfig, stops: list[str]) -> dict[str, Any]:
    """The model's parameters: the config's, with the template's and config's stop strings."""
    given = config.parameters.get("stop") or []
    given = [given] if isinstance(given, str) else list(given)
    merged = list(dict.fromkeys([*stops, *config.stop, *given]))
    return {**config.parameters, **({"stop": merged} if merged else {})}


GO_TEMPLATE, GGUF_TEMPLATE = "go_template", "gguf_chat_template"
"""Which template serves, in Ollama's own words (server/images.go selectedTemplateSource)."""


def template_source(shown: str | None, go: str, jinja: str) -> str | None:
    """Which template Ollama serves, from what /api/show calls the template: the Go
    template it was given, or the GGUF's own (tokenizer.chat_template), which Ollama 0.30+
    prefers when that one mentions tools or <think> and the Go template lacks those
    abilities (server/images.go GetModel, shouldPreferChatTemplate: PreferChatTemplate);
    then chat runs llama-server's Jinja path and /api/show returns the Jinja text
    (server/routes.go selectedModelTemplate). That is accepted only when it is the
    deployment's own Jinja template (`jinja`, which the Go one was derived from); None
    for anything else."""
    if shown == go:
        return GO_TEMPLATE
    if shown == jinja:
        return GGUF_TEMPLATE
    return None


@dataclass
class ThinkingChunk(Chunk):
    """A Chunk with the model's thinking, which Ollama streams apart from the answer
    (message.thinking: llama-server's reasoning_content), so it is never scored."""

    thinking: str = ""


def chunk_from(part: Any) -> ThinkingChunk:
    """One streamed /api/chat object as a Chunk; the final one's durations, sent in
    nanoseconds, become seconds.

    `prompt_eval_count` is the whole prompt from Ollama 0.31 (cache_n + prompt_n of
    llama-server's timings, llm/llama_server.go promptEvalCount) but only its part outside
    the prompt cache in 0.30 (prompt_n), while `prompt_eval_duration` times that part in
    both. Only on a cold cache (the first chat after `deploy`) do both versions give the
    prompt's length and its prefill time; the check and bench read them there."""
    text = (part.message.content or "") if part.message else ""
    thinking = (part.message.thinking or "") if part.message else ""
    if not part.done:
        return ThinkingChunk(text, thinking=thinking)
    return ThinkingChunk(
        text,
        thinking=thinking,
        done=True,
        done_reason=part.done_reason,
        prompt_tokens=part.prompt_eval_count,
        completion_tokens=part.eval_count or 0,
        prompt_seconds=_seconds(part.prompt_eval_duration),
        decode_seconds=_seconds(part.eval_duration),
    )


def _seconds(nanoseconds: int | None) -> float | None:
    return nanoseconds / 1e9 if nanoseconds is not None else None


class OllamaBackend:
    """Models on one Ollama server. `ServeConfig.slots` is not the client's to set: parallel
    requests are the server's OLLAMA_NUM_PARALLEL."""

    name = "ollama"

    def __init__(self, host: str | None = None) -> None:
        """`host` as OLLAMA_HOST takes it (default: OLLAMA_HOST, else 127.0.0.1:11434)."""
        self.host = ollama_host(host)
        self._client = ollama.Client(self.host, timeout=httpx.Timeout(600.0, connect=5.0))
        self._made: dict[str, tuple[ServeConfig, dict[str, str], str, dict]] = {}
        """model name -> what it was created from, to make it again without its adapter"""

    def deploy(self, gguf: Path, config: ServeConfig) -> Deployment:
        template, stops = go_template(config.chat_template)
        parameters = create_parameters(config, stops)
        version = self._call("report its version", lambda: self._raw("GET", "/api/version").json())
        digest, uploaded = self._upload(gguf)
        adapters = {}
        if config.adapter is not None:
            adapters = {config.adapter.name: self._upload(config.adapter)[0]}
        self._create(config, config.model_name, {gguf.name: digest}, template, parameters, adapters)
        self._made[config.model_name] = (config, {gguf.name: digest}, template, parameters)
        shown = self._call(
            f"show {config.model_name}", lambda: self._client.show(config.model_name)
        )
        source = template_source(shown.template, template, config.chat_template)
        if source is None:
            embedded = gguf_meta.read(gguf).chat_template
            kept = "the GGUF's own, " if embedded and shown.template == embedded else ""
            raise ForgebenchError(
                f"Ollama at {self.host} kept another template for {config.model_name} "
                f"({kept}not the one it was given nor the deployment's chat template), so it "
                "would not render prompts as the model expects; start it with "
                "OLLAMA_GO_TEMPLATE=1 to serve the given one (server/routes.go "
                "shouldUseGoTemplate) or use serve.backend: llamacpp"
            )
        details = shown.details
        load_seconds = self._load_seconds(config.model_name)
        return Deployment(
            self.name,
            config.model_name,
            self.host,
            load_seconds,
            {
                "ollama_version": version.get("version"),
                "digest": digest,
                "blob_uploaded": uploaded,
                "quantization_level": details.quantization_level if details else None,
                "parameter_size": details.parameter_size if details else None,
                "family": details.family if details else None,
                "template": shown.template,
                "template_source": source,
                "capabilities": list(shown.capabilities or []),
                "context_length": self._running(config.model_name).get("context_length"),
                "stop": parameters.get("stop", []),
                "modelfile": modelfile(gguf, template, config.system, parameters, config.adapter),
                "adapters": adapters,
            },
        )

    def _upload(self, path: Path) -> tuple[str, bool]:
        """The file as a blob on the server, sent only when it lacks that digest (the digest
        is remembered: bench deploys the same file again); (digest, whether it was sent)."""
        digest = f"sha256:{file_sha256(path)}"
        uploaded = not self._has_blob(digest)
        if uploaded:
            sent = self._call(f"take {path.name}", lambda: self._client.create_blob(path))
            if sent != digest:
                raise ForgebenchError(f"{path} changed while it was uploaded to Ollama")
        return digest, uploaded

    def _create(
        self,
        config: ServeConfig,
        name: str,
        files: dict[str, str],
        template: str,
        parameters: dict,
        adapters: dict[str, str] | None = None,
    ) -> None:
        """Create the model (with its ADAPTER, when `adapters` names one), following the
        status stream; a failure raises with the server's own words."""

        def create() -> None:
            last = ""
            for progress in self._client.create(
                name,
                files=files,
                adapters=adapters or None,
                template=template,
                system=config.system,
                parameters=parameters,
                stream=True,
            ):
                last = progress.status
            if last != "success":
                raise ForgebenchError(f"Ollama ended creating {name} with {last!r}")

        self._call(f"create {name}", create)

    def _has_blob(self, digest: str) -> bool:
        """HEAD /api/blobs/<digest>: ollama 0.6's create_blob always sends the whole file."""

        def head() -> bool:
            try:
                self._raw("HEAD", f"/api/blobs/{digest}")
            except ollama.ResponseError as exc:
                if exc.status_code == 404:
                    return False
                raise
            return True

        return self._call(f"look up blob {digest}", head)

    def _raw(self, method: str, path: str, **request: Any) -> httpx.Response:
        """A request the client has no method for (HEAD /api/blobs, GET /api/version, a
        render-only chat), through the client's own transport, so host, headers and errors
        stay its own."""
        return self._client._request_raw(method, path, **request)

    def _load_seconds(self, name: str) -> float:
        """Unload, then time a load with no prompt (GenerateHandler answers "load" once the
        runner is up), which leaves the model loaded for KEEP_ALIVE with an empty prompt
        cache: the first chat after a deploy is evaluated whole, whatever the server's
        version counts as prompt tokens (see `chunk_from`). A load is also where Ollama
        first checks the model's options, so a bad one fails the deploy here."""
        self._call(f"unload {name}", lambda: self._client.generate(name, "", keep_alive=0))
        started = time.perf_counter()
        reply = self._call(
            f"load {name}", lambda: self._client.generate(name, "", keep_alive=KEEP_ALIVE)
        )
        return _seconds(reply.load_duration) or time.perf_counter() - started

    def chat(
        self,
        deployment: Deployment,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        adapter_scale: float | None = None,
        fixed_length: bool = False,
    ) -> Iterator[Chunk]:
        """`adapter_scale` 0 asks the model made from the same base without its ADAPTER
        (Ollama applies an adapter at scale 1 and takes no scale per request). Ollama has
        no option to ignore the end of sequence: `fixed_length` cannot be honoured, and a
        reply may stop before `max_tokens` (its decode rate is per token all the same)."""
        name = deployment.model_name
        options: dict[str, Any] = {"num_predict": max_tokens}
        if adapter_scale is not None:
            if not deployment.details.get("adapters") or adapter_scale not in (0.0, 1.0):
                raise ForgebenchError(
                    f"{name}: Ollama serves an ADAPTER at scale 1 only, and this model has "
                    f"{'one' if deployment.details.get('adapters') else 'none'}; asked for "
                    f"scale {adapter_scale}"
                )
            options["temperature"] = 0.0  # a probe: only the adapter may make answers differ
            if adapter_scale == 0.0:
                name = self._without_adapter(deployment)
        stream = self._call(
            f"chat with {name}",
            lambda: self._client.chat(
                name, messages, stream=True, options=options, keep_alive=KEEP_ALIVE
            ),
        )
        parts = iter(stream)
        while (part := self._call(f"chat with {name}", lambda: next(parts, None))) is not None:
            yield chunk_from(part)

    def render_prompt(self, deployment: Deployment, messages: list[dict[str, str]]) -> str | None:
        """The prompt Ollama builds for `chat` with these messages (its Go template, the
        model's system prompt), from `/api/chat` with `_debug_render_only` (Ollama 0.11.5+,
        server/routes.go: answered with `_debug_info.rendered_template`, nothing generated).
        None from an older server, which ignores the field and answers a normal chat, kept
        to one token here."""
        body = {
            "model": deployment.model_name,
            "messages": messages,
            "stream": False,
            "options": {"num_predict": 1},
            "keep_alive": KEEP_ALIVE,
            "_debug_render_only": True,
        }
        reply = self._call(
            f"render a prompt for {deployment.model_name}",
            lambda: self._raw("POST", "/api/chat", json=body).json(),
        )
        return (reply.get("_debug_info") or {}).get("rendered_template")

    def memory_bytes(self, deployment: Deployment) -> int | None:
        """What Ollama reports the loaded model takes (/api/ps `size`: its own account of
        weights, KV cache and compute graph, set at load, whatever was served since), in
        bytes; None when it is not loaded. Not a process's resident memory, which a remote
        server does not show: bench reports it as `ollama_ps_size_mb`, not `memory_mb`."""
        size = self._running(deployment.model_name).get("size")
        return int(size) if size is not None else None

    def _running(self, name: str) -> dict[str, Any]:
        """The model's /api/ps entry (size, context_length: the num_ctx it was loaded with,
        which without a num_ctx parameter Ollama picks from the server's GPU memory, 4096,
        32768 or 262144, server/routes.go Serve, capped at the model's trained context);
        empty when it is not loaded."""
        running = self._call("list running models", self._client.ps)
        wanted = {name, _tagged(name)}
        found = [m for m in running.models if m.model in wanted or m.name in wanted]
        return found[0].model_dump() if found else {}

    def stopped(self, deployment: Deployment) -> ServerStopped | None:
        """Asked after a request failed to connect: whether Ollama still answers at its
        address. Ollama's runner restarts itself, so only an unreachable server ends a stage."""
        try:
            self._raw("GET", "/api/version", timeout=2.0)
        except (ConnectionError, httpx.HTTPError):
            return ServerStopped(f"Ollama at {self.host} stopped answering")
        except ollama.ResponseError:
            return None
        return None

    def _without_adapter(self, deployment: Deployment) -> str:
        """The deployment's base alone, its template, system and parameters the same, made
        once as <name>-noadapter and removed with the deployment."""
        name = f"{deployment.model_name}-noadapter"
        if not deployment.details.get("without_adapter"):
            config, files, template, parameters = self._made[deployment.model_name]
            self._create(config, name, files, template, parameters)
            deployment.details["without_adapter"] = name
        return name

    def remove(self, deployment: Deployment) -> None:
        if name := deployment.details.get("without_adapter"):
            self.delete(name)
        self.delete(deployment.model_name)

    def delete(self, name: str) -> None:
        """Unload and delete a model; one already gone is not an error."""

        def remove() -> None:
            try:
                self._client.generate(name, "", keep_alive=0)
                self._client.delete(name)
            except ollama.ResponseError as exc:
                if exc.status_code != 404:
                    raise

        self._call(f"remove {name}", remove)

    def deployed(self) -> list[str]:
        """The models forgebench created on this server (its namespace), as Ollama names them."""
        listed = self._call("list models", self._client.list)
        return sorted(m.model for m in listed.models if m.model.startswith(f"{NAMESPACE}/"))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OllamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """Run one client call; an unreachable server or an error answer becomes a
        one-line ForgebenchError, the server's error text kept verbatim."""
        try:
            return call()
        except (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout):
            raise ForgebenchError(
                f"no Ollama server answers at {self.host}; start `ollama serve` "
                "or use serve.backend: llamacpp"
            ) from None
        except ollama.ResponseError as exc:
            status = f" ({exc.status_code})" if exc.status_code > 0 else ""
            raise ForgebenchError(
                f"Ollama at {self.host} could not {what}{status}: {exc.error}"
            ) from exc


def _tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
