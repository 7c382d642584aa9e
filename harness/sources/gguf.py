"""A GGUF's tokenizer as llama.cpp will use it (special token ids and types, add-BOS/EOS),
and the file type its tensors were written as.

A GGUF carries its own copy of the tokenizer's special tokens. When that copy disagrees
with the HF tokenizer the model was trained with (another EOS id, a special token stored
as plain text, a BOS the tokenizer never adds), the served model sees other prompts, or
never stops, while every file looks fine. The metadata is read by walking the header.
What llama.cpp *does* with it is asked of llama.cpp itself, through llama-cpp-python (the
revision the server and converter are built from): a missing `add_bos_token` falls back
to a per-vocabulary default, and end-of-generation tokens are partly recognised by their
text (`<|im_end|>` stops generation even when no id names it), rules not worth copying.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROL = 3
"""gguf.TokenType.CONTROL: a special token, matched whole in a prompt, not split as text."""
TOKENS, TOKEN_TYPES_KEY = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
TOKEN_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}


@dataclass(frozen=True)
class TokenizerMeta:
    """The GGUF's tokenizer metadata; ids are None where the key is absent."""

    eos_id: int | None
    eot_id: int | None
    bos_id: int | None
    add_bos_token: bool | None
    """The metadata key as written; None when absent (llama.cpp then uses its default)."""
    chat_template: str | None
    tokens: list[str]
    token_types: list[int]

    def text(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]

    def type_name(self, token_id: int) -> str:
        kind = self.token_types[token_id] if 0 <= token_id < len(self.token_types) else None
        return f"{TOKEN_TYPES.get(kind, 'absent')} ({kind})"


@dataclass(frozen=True)
class EngineView:
    """What llama.cpp makes of the GGUF's tokenizer."""

    add_bos: bool
    add_eos: bool
    end_of_generation: frozenset[int]
    """Those of the asked ids at which llama.cpp ends a generation."""


def read(path: Path) -> TokenizerMeta:
    """The tokenizer's metadata, walked by `header` (GGUFReader would parse every field
    into numpy arrays: 12 s for Gemma's 262k-token vocabulary, 2.7 s for SmolLM2's 49k,
    on every check)."""
    fields = header(path, (TOKENS, TOKEN_TYPES_KEY)).fields
    return TokenizerMeta(
        eos_id=_int(fields.get("tokenizer.ggml.eos_token_id")),
        eot_id=_int(fields.get("tokenizer.ggml.eot_token_id")),
        bos_id=_int(fields.get("tokenizer.ggml.bos_token_id")),
        add_bos_token=_bool(fields.get("tokenizer.ggml.add_bos_token")),
        chat_template=fields.get("tokenizer.chat_template"),
        tokens=fields.get(TOKENS) or [],
        token_types=[int(t) for t in fields.get(TOKEN_TYPES_KEY) or []],
    )


def engine_view(path: Path, ids: set[int]) -> EngineView:
    """Load only the vocabulary (no weights) and ask llama.cpp, its load log kept quiet
    (llama-cpp-python prints llama.cpp's log at the level of its "llama-cpp-python" logger)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    finally:
        log.setLevel(level)
    if not model:
        raise ValueError(f"llama.cpp could not read the vocabulary of {path}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return EngineView(
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            add_eos=bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
            end_of_generation=frozenset(i for i in ids if llama_cpp.llama_vocab_is_eog(vocab, i)),
        )
    finally:
        llama_cpp.llama_model_free(model)


SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
"""GGUF metadata value types -> struct format (8 is a string, 9 an array)."""
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Array:
    """An array field not read out: its item type and length (a vocabulary's size)."""

    item: int
    count: int


@dataclass(frozen=True)
class Header:
    """A GGUF's metadata and tensor table, read by walking the header. GGUFReader parses
    every field, a vocabulary into numpy arrays, seconds for Gemma's 262k tokens; `validate`
    needs a few keys, the parameter count and where the data ends."""

    fields: dict[str, Any]
    """Scalars and strings by key; an array as `Array`, or as a list when asked for."""
    parameters: int
    data_end: int
    """The size a whole file has: the aligned data section's end, past its last tensor."""


def header(path: Path, arrays: tuple[str, ...] = ()) -> Header:
    """Walk `path`'s header; the arrays named in `arrays` are read out as lists (of
    strings or numbers), the others kept as `Array`.
    ValueError for a file that is not a GGUF, struct.error for one cut inside its header."""
    from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    with Path(path).open("rb") as fh:
        read = fh.read

        def unpack(fmt: str) -> Any:
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return read(unpack("<Q")).decode("utf-8", errors="replace")

        def skip(kind: int) -> None:
            if kind == STRING:
                fh.seek(unpack("<Q"), 1)
            elif kind == ARRAY:
                item, count = unpack("<I"), unpack("<Q")
                if item in SCALARS:
                    fh.seek(struct.calcsize(SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in SCALARS:
                fh.seek(struct.calcsize(SCALARS[kind]), 1)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        unpack("<I")  # version
        tensor_count, field_count = unpack("<Q"), unpack("<Q")
        fields: dict[str, Any] = {}
        for _ in range(field_count):
            name, kind = string(), unpack("<I")
            if kind == STRING:
                fields[name] = string()
            elif kind in SCALARS:
                fields[name] = unpack(SCALARS[kind])
            elif kind == ARRAY:
                at = fh.tell()
                item, count = unpack("<I"), unpack("<Q")
                if name in arrays and item == STRING:
                    fields[name] = [string() for _ in range(count)]
                elif name in arrays and item in SCALARS:
                    fmt = SCALARS[item]
                    fields[name] = list(
                        struct.unpack(f"<{count}{fmt[1:]}", read(struct.calcsize(fmt) * count))
                    )
                else:
                    fh.seek(at)
                    skip(ARRAY)
                    fields[name] = Array(item, count)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
        parameters, ends = 0, []
        for _ in range(tensor_count):
            string()
            dims = [unpack("<Q") for _ in range(unpack("<I"))]
            kind, offset = unpack("<I"), unpack("<Q")
            n = math.prod(dims)
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            parameters += n
            ends.append(offset + n // block * size)
        align = int(fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        start = -(-fh.tell() // align) * align
    return Header(fields, parameters, start + max(ends, default=0))


def kv_cache_bytes(path: Path, n_ctx: int, cache_type: str) -> int | None:
    """The KV cache llama.cpp reserves for `n_ctx` tokens (every slot's) at `cache_type`:
    per layer, K and V of every KV head, at the type's bytes per value. None for a model
    whose GGUF does not say its attention shape, or one with sliding-window layers (their
    cache is the window, not the context)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    fields = header(path).fields
    arch = fields.get("general.architecture")
    get = lambda key: fields.get(f"{arch}.{key}")  # noqa: E731
    heads, kv_heads, layers = (
        get("attention.head_count"), get("attention.head_count_kv"), get("block_count")
    )
    if not (heads and layers) or get("attention.sliding_window"):
        return None
    kv_heads = kv_heads or heads
    head_dim = get("attention.key_length") or get("embedding_length") // heads
    value_dim = get("attention.value_length") or head_dim
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
    values = layers * kv_heads * (head_dim + value_dim) * n_ctx
    return values // block * size


def file_type(path: Path) -> int | None:
    """`general.file_type`: the llama.cpp file type (`gguf.LlamaFileType`) its tensors were
    written as, None when the writer left it out."""
    value = header(path).fields.get("general.file_type")
    return None if value is None else int(value)


def file_type_name(number: int | None) -> str:
    """`LlamaFileType` 15 -> "Q4_K_M"; "unknown" for a missing or unlisted number."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(number)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "unknown"


def _int(value) -> int | None:
    return None if value is None else int(value)


def _bool(value) -> bool | None:
    return None if value is None else bool(value)
