"""Ollama's `/api/chat` stream read as the backends' Chunks: the answer apart from the
model's thinking, Ollama's nanosecond durations as seconds.

Kept apart from `ollama.OllamaBackend`, which makes the calls, so that what each of the
server's figures means across its versions, which the check and bench stages rely on, is
read in one place (see `chunk_from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.backends.base import Chunk


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
        prompt_seconds=seconds(part.prompt_eval_duration),
        decode_seconds=seconds(part.eval_duration),
    )


def seconds(nanoseconds: int | None) -> float | None:
    return nanoseconds / 1e9 if nanoseconds is not None else None
