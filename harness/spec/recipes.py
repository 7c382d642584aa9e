"""Quantization recipes: a `quant:` entry that is a level made with more than its preset.

    quant:
      - q2_k                                          # the preset level
      - {level: q2_k, imatrix: train}                 # q2_k-imat-train
      - {level: q2_k, imatrix: text, tensor_types: {output: q8_0}}   # q2_k-imat-text-out-q8_0
      - {level: q3_k_m, name: q3_k_m-mine, imatrix: calib.txt}
      - {level: q4_k_m, by: ollama}                   # q4_k_m-ollama: `ollama create -q`

At 2-3 bits the preset levels lose the most, and an importance matrix (llama.cpp's
`llama-imatrix`, then `llama-quantize --imatrix`) and higher types for a few tensors are
what published "_L" and "imatrix" files use to win some of it back. Calibrating on the
user's own task, then measuring on that task whether it helped, is the point: a recipe is
judged like a level (against its F16, and beside the plain level it varies).

`imatrix`: `train` (the training conversations rendered through the model's chat
template), `text` (a general text: CPython's own reference documentation, which every
Python carries), or a text file. `tensor_types`: a tensor-name regex -> ggml type, as
`llama-quantize --tensor-type`; `output` and `token_embd` name the output head and the
token embeddings exactly (its --output-tensor-type and --token-embedding-type), since as
regexes they would also match `attn_output`.

`by: ollama`: the F16 goes to Ollama, whose create quantizes it (`ollama create -q`, the
`quantize` field of /api/create), for the levels it takes (`quant.OLLAMA_CREATE`). Users
quantize there too; measured beside the same level from llama-quantize, the table says
whether that costs anything on their model. Ollama keeps the file, so such a cell has no
KLD (llama-perplexity reads a file) and its size is what Ollama lists.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness import quant
from harness.spec.sections import NAME_PATTERN, Strict

CALIBRATIONS = ("train", "text")
NAMED_TENSORS = {"output": "out", "token_embd": "emb"}
"""Shorthands llama-quantize has flags of its own for, and how a derived name spells them."""


class QuantRecipe(Strict):
    level: str = Field(description="the preset level the recipe starts from, e.g. q2_k")
    imatrix: Literal["train", "text"] | Path | None = Field(
        None,
        description="calibration for an importance matrix: train (the training data in the "
        "model's chat template), text (a general text) or a text file",
    )
    tensor_types: dict[str, str] = Field(
        default_factory=dict,
        description="tensor-name regex (or output / token_embd) -> ggml type, e.g. "
        "{output: q8_0, ffn_down: q6_k}",
    )
    by: Literal["llama-quantize", "ollama"] = Field(
        "llama-quantize",
        description="who quantizes: llama-quantize here, or Ollama's create from the F16 "
        "(q8_0, q4_k_s, q4_k_m; needs serve.backend: ollama)",
    )
    chunks: int = Field(
        64, gt=0, le=4096, description="llama-imatrix chunks of 512 tokens, at most"
    )
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="the cell name's quant part; derived when unset (q2_k-imat-train)",
    )

    @field_validator("level")
    @classmethod
    def _a_level(cls, level: str) -> str:
        level = quant.canonical(level)
        if level == quant.F16:
            raise ValueError(
                "f16 is the reference every level is judged against: name a "
                "quantized level, e.g. q4_k_m"
            )
        return level

    @field_validator("tensor_types")
    @classmethod
    def _types(cls, types: dict[str, str]) -> dict[str, str]:
        out = {}
        for pattern, kind in types.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regex ({exc})") from None
            kind = kind.strip().lower()
            if kind not in quant.TENSOR_TYPES:
                raise ValueError(
                    f"{pattern}: unknown ggml type {kind!r}: one of {', '.join(quant.TENSOR_TYPES)}"
                )
            out[pattern] = kind
        return out

    @model_validator(mode="after")
    def _named(self) -> QuantRecipe:
        if self.by == "ollama":
            self._ollama_can_make()
        elif self.imatrix is None and not self.tensor_types:
            raise ValueError(
                f"a recipe adds imatrix, tensor_types or by: ollama to a level: give one, or "
                f"write {self.level} as a plain level"
            )
        if self.name is None:
            object.__setattr__(self, "name", self._derived_name())
        elif quant.level_of(self.name) != self.level or self.name == self.level:
            raise ValueError(
                f"name {self.name!r} must start with its level: {self.level}-<something>, so "
                "tables place it beside its level"
            )
        return self

    def _ollama_can_make(self) -> None:
        if self.level not in quant.OLLAMA_CREATE:
            raise ValueError(
                f"Ollama's create quantizes only to {', '.join(quant.OLLAMA_CREATE)}, not "
                f"{self.level}: pick one of those, or drop by: ollama"
            )
        if self.imatrix is not None or self.tensor_types:
            raise ValueError(
                "Ollama's create takes no importance matrix or tensor types: drop imatrix "
                "and tensor_types, or by: ollama"
            )

    def _derived_name(self) -> str:
        parts = [self.level]
        if self.by == "ollama":
            parts.append("ollama")
        if self.imatrix is not None:
            source = self.imatrix if isinstance(self.imatrix, str) else self.imatrix.stem
            parts.append(f"imat-{re.sub(r'[^A-Za-z0-9_.]+', '_', str(source))}")
        if self.tensor_types:
            if set(self.tensor_types) <= set(NAMED_TENSORS):
                parts += [f"{NAMED_TENSORS[t]}-{k}" for t, k in sorted(self.tensor_types.items())]
            else:
                given = json.dumps(self.tensor_types, sort_keys=True).encode()
                parts.append(f"types-{hashlib.sha256(given).hexdigest()[:6]}")
        return "-".join(parts)

    def quantize_settings(self) -> dict:
        """What the quantize stage is told beyond the level (its key holds these)."""
        return {"tensor_types": dict(sorted(self.tensor_types.items()))}
