"""What an Ollama release no longer does, by version: a spec that needs it is refused
before anything is built, in one line naming the version, rather than failing cell by cell
at its deploy.

Ollama 0.34.1 (2026-09-14, ollama PR #14969) removed LoRA adapters from create: a create
that names one is answered 400 "LoRA adapters are no longer supported" (third parties
quote server/create.go's `errAdaptersUnsupported` and report that answer from 0.34.2),
and its import guide says since "Ollama does not quantize GGUF models during import".
The newest Ollama source readable here, v0.33.0-rc2, still takes one ADAPTER per model and
quantizes an F16 GGUF with llama-quantize; 0.34's own source could not be read, so both
limits rest on those reports and the docs, and a server that does otherwise is still
checked after create (`OllamaBackend` reads the quantization level back).
"""

from __future__ import annotations

import re

NO_ADAPTERS = (0, 34, 1)
"""The first release whose create refuses an adapter."""
NO_GGUF_QUANTIZE = (0, 34, 1)
"""The first release whose create does not quantize a GGUF."""


def release(version: str) -> tuple[int, int, int] | None:
    """`0.34.2` -> (0, 34, 2), `0.33.0-rc2` -> (0, 33, 0); None for a development build
    (`0.0.0`) or anything else, whose abilities are not known from its number."""
    found = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version.strip())
    if found is None:
        return None
    number = tuple(int(part) for part in found.groups())
    return None if number == (0, 0, 0) else number  # type: ignore[return-value]


def takes_adapters(version: str) -> bool:
    number = release(version)
    return number is None or number < NO_ADAPTERS


def quantizes_gguf(version: str) -> bool:
    number = release(version)
    return number is None or number < NO_GGUF_QUANTIZE
