"""What `validate` reads the way `run` reads it, beyond the spec's own schema: the serving
options checked against what Ollama accepts, token counts against the model's context, the
names each cell gets in Ollama and a GGUF read to its last tensor (chat templates:
`harness.sources.templates.require`; the services a run talks to: `harness.services`).

Each check raises InputError with the spec's file, line and field (`Spec.where`), so a
setting that would fail minutes into a run (a string num_ctx fails only when real Ollama
loads the model) costs one line before anything is written.
"""

from __future__ import annotations

import difflib
import re
import struct
from pathlib import Path
from typing import Any

from harness import backends
from harness.errors import ForgebenchError, InputError
from harness.sources import ollama as ollama_models
from harness.sources.ollama import GgufInfo
from harness.spec import Spec

# Ollama's options (api/types.go, Options and Runner, v0.33): the type FromMap demands when
# the model loads, and the range that means something. Ollama logs an unknown name and
# ignores it; a string for a number fails the model's load.
INT, FLOAT, BOOL, TEXT = "an integer", "a number", "true or false", "a string or strings"
OLLAMA_OPTIONS: dict[str, tuple[str, float | None, float | None]] = {
    "num_ctx": (INT, 1, None),
    "num_batch": (INT, 1, None),
    "num_gpu": (INT, -1, None),
    "main_gpu": (INT, 0, None),
    "use_mmap": (BOOL, None, None),
    "num_thread": (INT, 1, None),
    "num_keep": (INT, -1, None),
    "seed": (INT, None, None),
    "num_predict": (INT, -2, None),
    "top_k": (INT, 0, None),
    "top_p": (FLOAT, 0, 1),
    "min_p": (FLOAT, 0, 1),
    "typical_p": (FLOAT, 0, 1),
    "repeat_last_n": (INT, -1, None),
    "temperature": (FLOAT, 0, None),
    "repeat_penalty": (FLOAT, 0, None),
    "presence_penalty": (FLOAT, None, None),
    "frequency_penalty": (FLOAT, None, None),
    "stop": (TEXT, None, None),
}
OLLAMA_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
"""One part of an Ollama model name (namespace, model, tag): at most 80 ASCII characters."""


def serve_parameters(spec: Spec) -> None:
    """Every serve.parameters entry is an option Ollama knows, of its type, in its range."""
    for name, value in spec.serve.parameters.items():
        where = spec.where("serve", "parameters", name)
        if name not in OLLAMA_OPTIONS:
            close = difflib.get_close_matches(name, OLLAMA_OPTIONS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(OLLAMA_OPTIONS)}"
            raise InputError(f"{where}: not an Ollama option (Ollama ignores it); {hint}")
        kind, low, high = OLLAMA_OPTIONS[name]
        if not _is(kind, value):
            raise InputError(
                f"{where}: {value!r} is not {kind}; Ollama refuses it when the model loads"
                + (f" (write {name}: {value.strip()})" if _numeric_text(value) else "")
            )
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"from {low} to {high}"
            raise InputError(f"{where}: {value} is out of range; give {span}")


def _is(kind: str, value: Any) -> bool:
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == FLOAT:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _numeric_text(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\s*-?[0-9.]+\s*", value) is not None


def token_counts(spec: Spec, context: int | None, drift_text: Path) -> None:
    """Token counts against the model's trained context and the served context."""
    num_ctx = spec.serve.parameters.get("num_ctx", 2048)
    if context:
        limits = [("train", "max_seq_len", spec.train.max_seq_len, "training")]
        if spec.serves:
            limits.append(("serve", "parameters", "num_ctx", num_ctx, "serving"))
        if "drift" in spec.measure:
            limits.append(("drift", "ctx", spec.drift.ctx, "drift"))
        for *loc, value, use in limits:
            if value > context:
                raise InputError(
                    f"{spec.where(*loc)}: {value} tokens, more than the {context} the base was "
                    f"trained on, so {use} would run past the model's context; give at most "
                    f"{context}"
                )
    swept = spec.serve.sweep.num_ctx if spec.serve.sweep else []
    if context and (beyond := [v for v in swept if v > context]):
        raise InputError(
            f"{spec.where('serve', 'sweep', 'num_ctx')}: {beyond[0]} tokens, more than the "
            f"{context} the base was trained on, so serving would run past the model's "
            f"context; give at most {context}"
        )
    smallest, named = num_ctx, "serve.parameters.num_ctx"
    if swept and min(swept) < num_ctx:
        smallest, named = min(swept), "the smallest in serve.sweep.num_ctx"
    for section, tokens in (("bench", spec.bench.max_tokens), ("load", spec.load.max_tokens)):
        if section in spec.measure and tokens >= smallest:
            raise InputError(
                f"{spec.where(section, 'max_tokens')}: {tokens} tokens do not fit a served "
                f"context of {smallest} ({named}) with the prompt; lower it"
            )
    if "drift" in spec.measure:
        # a token is at least one character of the text, so its length bounds its tokens
        chars = len(drift_text.read_text())
        needed = max(2 * spec.drift.ctx, spec.drift.ctx * spec.drift.chunks)
        if needed > chars:
            raise InputError(
                f"{spec.where('drift', 'chunks')}: {spec.drift.chunks} chunks of drift.ctx "
                f"{spec.drift.ctx} need {needed} tokens and the drift text "
                f"({drift_text.name}) has fewer than {chars}; lower drift.ctx or drift.chunks"
            )


def model_names(spec: Spec) -> None:
    """Each cell's Ollama model name (forgebench/<model>) has parts Ollama accepts, whichever
    backend serves: `auto` picks Ollama wherever one runs."""
    suffixes = {"merge": "", "adapter": "-lora"}
    adapters: list[str | None] = [
        lora.name + suffixes[route] for lora in spec.lora for route in spec.route
    ]
    if spec.control:
        adapters.append(None)
    for adapter in adapters:
        for quant in spec.levels:
            name = backends.model_name(spec.name, adapter, quant, spec.base.ollama)
            part = name.split("/", 1)[1]
            if not OLLAMA_NAME_PART.match(part):
                field = ("name",) if spec.base.ollama is None else ("base", "ollama")
                raise InputError(
                    f"{spec.where(*field)}: the cell's Ollama model name {name} has a "
                    f"{len(part)}-character part; Ollama allows 80 ASCII letters, digits, "
                    "_ . - per part: shorten the experiment or LoRA names"
                )


def gguf(spec: Spec, field: tuple[str, ...], path: Path) -> GgufInfo:
    """A GGUF read to its last tensor, as convert and llama.cpp will read it."""
    where = spec.where(*field)
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InputError(f"{where}: {path} is not a GGUF file (no GGUF magic)")
    try:
        info = ollama_models.read_gguf(path)
    except (ForgebenchError, IndexError, struct.error, OverflowError, MemoryError) as exc:
        raise InputError(
            f"{where}: {path} is truncated or damaged: its {path.stat().st_size} bytes do not "
            f"hold the header and tensors it declares ({type(exc).__name__}); download or "
            "convert it again"
        ) from None
    if info.architecture == "?":
        raise InputError(
            f"{where}: {path} has no general.architecture: not a model GGUF (an adapter or a "
            "vocabulary?); give the model's GGUF"
        )
    if not info.parameters:
        raise InputError(f"{where}: {path} holds no tensors (vocabulary only?); give a model")
    return info
