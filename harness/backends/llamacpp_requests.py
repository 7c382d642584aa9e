"""What goes to a llama-server and what comes back: the fields of a deployment's requests,
an OpenAI-style chat request carrying the deployment's system prompt and options, and the
server-sent events of its answer read as Chunks.

Apart from `llamacpp.LlamaServer`, which runs the server processes, since these are pure
functions of the deployment's ServeConfig, tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from harness.backends.base import Chunk, ServeConfig
from harness.errors import ForgebenchError

# Ollama option name -> llama-server request field.
REQUEST_OPTIONS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "seed": "seed",
    "num_predict": "max_tokens",
}


def applied(config: ServeConfig) -> dict[str, Any]:
    """The request fields of a deployment of `config`: no prompt cache (no request reuses
    another's cached prompt, so with one request in flight each is computed alone and
    answers the same every time), and its own adapter at scale 1."""
    adapter = {"lora": [{"id": 0, "scale": 1.0}]} if config.adapter else {}
    return {"cache_prompt": False} | adapter


def with_system(messages: list[dict[str, str]], config: ServeConfig) -> list[dict[str, str]]:
    """The conversation with the deployment's system prompt, unless it brings its own."""
    if config.system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": config.system}, *messages]
    return messages


def request_body(
    messages: list[dict[str, str]],
    config: ServeConfig,
    max_tokens: int,
    fields: dict[str, Any],
    adapter_scale: float | None = None,
) -> dict:
    """An OpenAI-style chat request carrying the deployment's system prompt, options and
    request `fields`; with `adapter_scale`, its adapter at that scale, greedy."""
    messages = with_system(messages, config)
    # cache_prompt off: every request is measured from a cold prompt, and the
    # server's prompt token count is the whole rendered prompt
    body: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "cache_prompt": False,
    }
    for name, field in REQUEST_OPTIONS.items():
        if name in config.parameters:
            body[field] = config.parameters[name]
    if config.stop:
        body["stop"] = list(config.stop)
    body |= fields
    if adapter_scale is not None:
        if not fields.get("lora"):
            raise ForgebenchError(f"{config.model_name} is served without an adapter to scale")
        body["lora"] = [{**lora, "scale": adapter_scale} for lora in fields["lora"]]
        body["temperature"] = 0.0  # a probe: only the adapter may make two answers differ
    return body


def parse_stream(lines: Iterator[str]) -> Iterator[Chunk]:
    """Server-sent events of /v1/chat/completions -> Chunks; the last carries `timings`."""
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        choice = (event.get("choices") or [{}])[0]
        text = (choice.get("delta") or {}).get("content") or ""
        reason = choice.get("finish_reason")
        if reason is None:
            if text:
                yield Chunk(text)
            continue
        timings = event.get("timings") or {}
        yield Chunk(
            text,
            done=True,
            done_reason=reason,
            prompt_tokens=timings.get("prompt_n"),
            completion_tokens=timings.get("predicted_n"),
            prompt_seconds=timings["prompt_ms"] / 1000 if "prompt_ms" in timings else None,
            decode_seconds=timings["predicted_ms"] / 1000 if "predicted_ms" in timings else None,
        )
