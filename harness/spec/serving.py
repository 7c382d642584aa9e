"""Serving settings as an axis: the same GGUF behind other context, slots, KV cache, flash
attention or threads.

    serve:
      slots: 1
      parameters: {num_ctx: 2048}
      sweep:
        num_ctx: [2048, 8192]
        slots: [1, 4]
        kv_cache: [f16, q8_0, q4_0]

The spec's own `serve` section is the baseline setting: its cells keep their names and
keys. Every other combination of the listed values is a setting, one cell per level
named after the values that differ from the baseline (`q4_k_m-ctx8192-np4-kv_q8_0`),
built from the same GGUF.

Which settings can change answers, and so are scored again: the KV-cache type (K and V
stored at fewer bits, so attention reads other numbers) and flash attention (attention
computed in another order, with other rounding). The others only reserve memory or
share the cores: `num_ctx` (every prompt and answer here fits the baseline's), `slots`
(answers are scored on a deployment with the baseline's slots, so no request is batched
with another it would not be) and `threads` (ggml gives each output row to one thread,
so the sums are the same). A setting of those shares its cell's evaluation, and only its
speed and memory are measured anew.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.spec.sections import Strict

KV_CACHE = ("f16", "q8_0", "q4_0")
"""The KV-cache types offered, for K and V alike (llama-server --cache-type-k/-v;
Ollama's OLLAMA_KV_CACHE_TYPE takes the same three)."""
CHANGES_ANSWERS = ("kv_cache", "flash_attn")
"""The settings whose cells are scored again (see the module docstring)."""
SERVER_WIDE = ("slots", "kv_cache", "flash_attn")
"""What Ollama sets for the whole server (OLLAMA_NUM_PARALLEL, OLLAMA_KV_CACHE_TYPE,
OLLAMA_FLASH_ATTENTION), not per model: only llama-server takes them per deployment."""
SERVER_WIDE_ENV = {
    "slots": "OLLAMA_NUM_PARALLEL",
    "kv_cache": "OLLAMA_KV_CACHE_TYPE",
    "flash_attn": "OLLAMA_FLASH_ATTENTION",
}
ORDER = ("num_ctx", "slots", "kv_cache", "flash_attn", "threads")
SHORT = {"num_ctx": "ctx", "slots": "np", "kv_cache": "kv_", "flash_attn": "fa_", "threads": "t"}
"""How a setting's name spells each value: ctx8192, np4, kv_q8_0, fa_on, t1."""


def server_wide(sweep: ServeSweep | None) -> str | None:
    """The first server-wide setting (`SERVER_WIDE`) the sweep lists values of."""
    return next((name for name in SERVER_WIDE if sweep and getattr(sweep, name)), None)


def server_wide_message(name: str) -> str:
    return (
        f"sweep.{name}: Ollama sets {name} for the whole server ({SERVER_WIDE_ENV[name]}), "
        "not per model, so forgebench cannot sweep it there: sweep it with serve.backend: "
        "llamacpp, or restart Ollama with each value and run once per value"
    )


class ServeSweep(Strict):
    """The values each serving setting takes; the product of the lists is swept."""

    num_ctx: list[int] = Field(default_factory=list, description="context per slot, tokens")
    slots: list[int] = Field(default_factory=list, description="parallel requests")
    kv_cache: list[Literal[KV_CACHE]] = Field(
        default_factory=list, description="KV-cache type for K and V: f16, q8_0, q4_0"
    )
    flash_attn: list[Literal["on", "off"]] = Field(
        default_factory=list, description="flash attention on or off (llama-server's auto if unset)"
    )
    threads: list[int] = Field(default_factory=list, description="CPU threads")

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _yaml_booleans(cls, values: list) -> list:
        """YAML reads `on` and `off` as booleans."""
        if not isinstance(values, list):
            return values
        return [{True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v for v in values]

    @field_validator("num_ctx", "slots", "threads")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if bad := [v for v in values if v < 1]:
            raise ValueError(f"must be at least 1, not {bad[0]}")
        return values

    @model_validator(mode="after")
    def _once_each(self) -> ServeSweep:
        for name in ORDER:
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: list each once")
        return self


@dataclass(frozen=True)
class Setting:
    """One combination of the sweep that differs from the baseline, by the values that
    differ, in `ORDER`."""

    values: tuple[tuple[str, int | str], ...]

    @property
    def name(self) -> str:
        return "-".join(f"{SHORT[k]}{v}" for k, v in self.values)

    def as_dict(self) -> dict[str, int | str]:
        return dict(self.values)

    def answers(self) -> dict[str, int | str]:
        """The part of the setting that can change answers (`CHANGES_ANSWERS`)."""
        return {k: v for k, v in self.values if k in CHANGES_ANSWERS}


def baseline(num_ctx: int, slots: int, threads: int | None) -> dict[str, int | str | None]:
    """The spec's own serving values; kv_cache f16 and flash attention at llama-server's
    default (auto) unless the sweep names them."""
    return {
        "num_ctx": num_ctx,
        "slots": slots,
        "kv_cache": "f16",
        "flash_attn": None,
        "threads": threads,
    }


def settings(sweep: ServeSweep | None, base: dict[str, int | str | None]) -> list[Setting]:
    """Every combination of the sweep's values but the baseline's, each once."""
    if sweep is None:
        return []
    axes = [
        [(name, value) for value in getattr(sweep, name)] or [(name, base[name])] for name in ORDER
    ]
    out: dict[str, Setting] = {}
    for combination in itertools.product(*axes):
        differs = tuple((k, v) for k, v in combination if v is not None and v != base[k])
        if differs:
            setting = Setting(differs)
            out.setdefault(setting.name, setting)
    return list(out.values())


class ServeSpec(Strict):
    """How every cell is served: Ollama when one answers (auto), else llama.cpp's server."""

    backend: Literal["auto", "ollama", "llamacpp"] = "auto"
    system: str | None = None
    chat_template: str | None = Field(
        None,
        description="the chat template for training, serving and checking, in place of the "
        "model's own (a base model has none): a family (chatml, gemma, llama3) or a Jinja file",
    )
    parameters: dict[str, bool | int | float | str | list[str]] = Field(
        default_factory=lambda: {"temperature": 0, "num_ctx": 2048},
        description="Ollama option names: temperature, num_ctx, top_k, top_p, seed, ...",
    )
    slots: int = Field(
        1,
        gt=0,
        le=256,
        description="parallel requests (llama-server -np; llama.cpp's most: 256); one, as "
        "Ollama's default, keeps every answer reproducible",
    )
    sweep: ServeSweep | None = Field(
        None,
        description="serving settings to measure besides this baseline: lists of num_ctx, "
        "slots, kv_cache, flash_attn, threads (harness.spec.serving)",
    )
    keep: bool = Field(
        False,
        description="leave each cell's model in Ollama after measuring (`forgebench clean` "
        "removes them); the llama.cpp backend cannot keep a model",
    )

    @field_validator("system")
    @classmethod
    def _fits_a_modelfile(cls, system: str | None) -> str | None:
        """The Ollama backend writes the deployment as a Modelfile, whose parser ends a
        triple-quoted SYSTEM at the first three quotes and knows no escapes."""
        if system is not None and ('"""' in system or system.endswith('"')):
            raise ValueError(
                'a system prompt holding """ or ending in " cannot be written to an Ollama '
                "Modelfile; use other quotes"
            )
        return system

    @model_validator(mode="after")
    def _v_cache_needs_flash_attention(self) -> ServeSpec:
        """llama.cpp stores a quantized V cache only with flash attention on."""
        sweep = self.sweep
        if sweep and "off" in sweep.flash_attn and set(sweep.kv_cache) - {"f16"}:
            raise ValueError(
                "sweep: kv_cache below f16 with flash_attn off cannot run (llama.cpp "
                "quantizes the V cache only with flash attention): drop off from flash_attn"
            )
        return self

    @model_validator(mode="after")
    def _ollama_sweeps_per_model_only(self) -> ServeSpec:
        if self.backend == "ollama" and (wide := server_wide(self.sweep)):
            raise ValueError(server_wide_message(wide))
        return self

    def baseline(self) -> dict[str, int | str | None]:
        """The spec's own serving values, which every setting is named against."""
        threads = self.parameters.get("num_thread")
        return baseline(
            int(self.parameters.get("num_ctx", 2048)),
            self.slots,
            int(threads) if threads is not None else None,
        )

    def settings(self) -> list[Setting]:
        """The swept settings besides the baseline, in the sweep's order."""
        return settings(self.sweep, self.baseline())
