"""Quant levels users pick by name, mapped onto llama.cpp's own file types.

The numbers come from the `gguf` package's `LlamaFileType` (llama.cpp's
`llama_ftype`), so there is no second table to keep in sync. Only levels that
need no importance matrix are offered; a recipe (`harness.spec.recipes`) adds one
to a level, or per-tensor types, under a name that starts with its level's
(`q2_k-imat-train`), so every table that orders levels places it beside its level.
"""

from __future__ import annotations

import difflib

from gguf import GGMLQuantizationType, LlamaFileType

# Ordered from largest to smallest bits per weight.
LEVELS: dict[str, LlamaFileType] = {
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q5_k_s": LlamaFileType.MOSTLY_Q5_K_S,
    "q5_0": LlamaFileType.MOSTLY_Q5_0,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q3_k_l": LlamaFileType.MOSTLY_Q3_K_L,
    "q3_k_m": LlamaFileType.MOSTLY_Q3_K_M,
    "q3_k_s": LlamaFileType.MOSTLY_Q3_K_S,
    "q2_k": LlamaFileType.MOSTLY_Q2_K,
}

F16 = "f16"
"""The level every other level of the same model is compared against."""

OLLAMA_CREATE = ("q8_0", "q4_k_s", "q4_k_m")
"""The levels Ollama's create quantizes an F16 to (`ollama create -q`; ollama
fs/ggml/type.go ParseFileType, which refuses every other)."""


def normalize(name: str) -> str:
    """Accept the spellings people use (`Q4_K_M`, `q4-k-m`) for one canonical name."""
    return name.strip().lower().replace("-", "_")


def file_type(name: str) -> LlamaFileType:
    return LEVELS[normalize(name)]


def suggestion(name: str) -> str:
    close = difflib.get_close_matches(normalize(name), LEVELS, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def canonical(name: str) -> str:
    """Return the canonical level name, or raise ValueError with a did-you-mean."""
    level = normalize(name)
    if level not in LEVELS:
        raise ValueError(
            f"unknown quant level {name!r}: {suggestion(name)}known levels: {', '.join(LEVELS)}"
        )
    return level


def without_setting(name: str, setting: str | None) -> str:
    """A cell's quant name without its serving setting's suffix (`q8_0-np2` -> `q8_0`): the
    level or recipe its GGUF is made at (harness.spec.serving names such cells)."""
    return name.removesuffix(f"-{setting}") if setting else name


def level_of(name: str) -> str | None:
    """The level a cell's quant is made at: the name itself, or the level a recipe's name
    starts with (`q2_k-imat-train` -> `q2_k`); None for a name that is neither."""
    if name in LEVELS:
        return name
    prefixes = [level for level in LEVELS if name.startswith(f"{level}-")]
    return max(prefixes, key=len, default=None)


def rank(name: str) -> tuple[int, bool, str]:
    """Where a level or recipe sorts, in tables and in `best`'s walk: largest level first, a
    level's recipes just before the plain level. The walk stops at the first cell not shown
    within tolerance, so it goes from what should hold to what may not, and an importance
    matrix or higher-typed tensors are there to lose less than the plain level."""
    level = level_of(name)
    order = list(LEVELS).index(level) if level else len(LEVELS)
    return order, name == level, name


WRITABLE = [
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "Q3_K",
    "Q2_K",
]
TENSOR_TYPES = tuple(t.name.lower() for t in GGMLQuantizationType if t.name in WRITABLE)
"""The ggml types llama-quantize writes for one tensor (--tensor-type NAME=TYPE) without an
importance matrix, as gguf names them (the i-quants need one for every tensor)."""
