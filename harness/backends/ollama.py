"""The Ollama backend: a GGUF served by an Ollama server, through the official `ollama` client.

Deploying uploads the GGUF as a blob (unless the server holds that digest) and creates the
model with a Go template derived from its own Jinja chat template, its stop strings, system
prompt and parameters; `/api/show` then confirms what the server kept (Ollama 0.30+ may
serve the GGUF's Jinja template instead: `ollama_modelfile.template_source`). With
`ServeConfig.quantize` the create quantizes the F16 (`ollama create -q`), and the
deployment records the tensor types and size it made. Chat streams `/api/chat`, whose last
chunk carries Ollama's token counts and timings (`ollama_stream`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama

from harness.backends.base import NAMESPACE, Chunk, Deployment, ServeConfig, ServerStopped
from harness.backends.ollama_modelfile import (
    create_parameters,
    go_template,
    kept_template,
    modelfile,
)
from harness.backends.ollama_stream import chunk_from, seconds
from harness.env import ollama_host
from harness.errors import ForgebenchError
from harness.hashing import file_sha256

KEEP_ALIVE = "10m"
"""How long Ollama keeps a deployed model loaded after each request."""

T = TypeVar("T")


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
        try:
            source = kept_template(shown.template, template, config, gguf)
        except ValueError as exc:
            raise ForgebenchError(f"Ollama at {self.host} {exc}") from None
        details = shown.details
        made = self._quantized(config, details) if config.quantize else {}
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
            }
            | made,
        )

    def _quantized(self, config: ServeConfig, details: Any) -> dict[str, Any]:
        """What Ollama's create made of the F16 it was asked to quantize: each tensor's type
        (/api/show verbose) and the size `ollama list` shows (the weights, a few bytes of
        template and parameters). A server that ignored `quantize` is refused: the cell
        would be its F16."""
        name, wanted = config.model_name, (config.quantize or "").upper()
        if (level := details.quantization_level if details else None) != wanted:
            raise ForgebenchError(
                f"Ollama at {self.host} was asked to quantize {name} to {wanted} and serves "
                f"it at {level}: drop the recipe by: ollama for this server"
            )
        body = {"model": name, "verbose": True}
        shown = self._call(f"show {name}", lambda: self._raw("POST", "/api/show", json=body))
        size = getattr(self._listed(name), "size", None)
        return {
            "tensor_types": {t["name"]: t["type"].lower() for t in shown.json()["tensors"]},
            "model_bytes": int(size) if size is not None else None,
        }

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
                quantize=config.quantize.upper() if config.quantize else None,
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
        return seconds(reply.load_duration) or time.perf_counter() - started

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
        body = {"model": deployment.model_name, "messages": messages, "stream": False}
        body |= {"options": {"num_predict": 1}, "keep_alive": KEEP_ALIVE}
        body["_debug_render_only"] = True
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

    def copy(self, source: str, destination: str) -> None:
        """Give a model another name (POST /api/copy): the same layers, nothing uploaded,
        and `destination` replaced at once, so what serves under it is never half made."""
        self._call(
            f"copy {source} to {destination}", lambda: self._client.copy(source, destination)
        )

    def digest(self, name: str) -> str | None:
        """The model's digest as `ollama list` shows it; None when there is no such model."""
        return getattr(self._listed(name), "digest", None)

    def _listed(self, name: str) -> Any:
        """The model's `ollama list` entry; None when there is no such model."""
        listed, wanted = self._call("list models", self._client.list), _tagged(name)
        return next((m for m in listed.models if _tagged(m.model or "") == wanted), None)

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
        one-line ForgebenchError, the server's error text kept verbatim. A connection
        dropped mid-request is a server that died while answering (`ServerStopped`, naming
        its address) when it no longer answers at all, else a one-line error of its own:
        httpx's words alone ("Server disconnected without sending a response.") name
        neither Ollama nor where it ran."""
        try:
            return call()
        except (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout):
            raise ForgebenchError(
                f"no Ollama server answers at {self.host}; start `ollama serve` "
                "or use serve.backend: llamacpp"
            ) from None
        except httpx.TransportError as exc:
            if (gone := self.stopped(None)) is not None:
                raise gone from None
            raise ForgebenchError(f"Ollama at {self.host} could not {what}: {exc}") from None
        except ollama.ResponseError as exc:
            status = f" ({exc.status_code})" if exc.status_code > 0 else ""
            raise ForgebenchError(
                f"Ollama at {self.host} could not {what}{status}: {exc.error}"
            ) from exc


def _tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
