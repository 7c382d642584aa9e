"""The experiment spec: one YAML file a user writes, validated before anything runs.

Every model forbids unknown keys, so a typo is an error rather than a silently
ignored setting. `Spec` puts the sections (harness.spec.sections, harness.spec.budgets)
together and checks what spans them; `harness.spec.loading` reads the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from harness import quant
from harness.chain import CONTROL, DEFAULT_MEASUREMENTS, MEASUREMENTS, SERVED_MEASUREMENTS
from harness.spec.budgets import BudgetSpec
from harness.spec.lines import dotted, line_of
from harness.spec.recipes import QuantRecipe
from harness.spec.sections import (
    NAME_PATTERN,
    BaseRef,
    BenchSpec,
    DataSpec,
    DriftSpec,
    EvaluateSpec,
    ExecutorSpec,
    LoadSpec,
    LoraSpec,
    Strict,
    TrackingSpec,
    TrainSpec,
)
from harness.spec.serving import ServeSpec


class Spec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    base: BaseRef
    data: DataSpec
    train: TrainSpec = TrainSpec()
    lora: list[LoraSpec] = Field(min_length=1)
    quant: list[str | QuantRecipe] = Field(
        min_length=1,
        description="levels (f16, q8_0, q4_k_m, ...) and recipes (a level with an importance "
        "matrix or per-tensor types, see harness.spec.recipes)",
    )
    route: list[Literal["merge", "adapter"]] = Field(
        default_factory=lambda: ["merge"],
        min_length=1,
        description="merge: the adapter merged into the base, then converted and quantized; "
        "adapter: the base GGUF at each level served with the LoRA as its own GGUF",
    )
    control: bool = Field(True, description="also run the untuned base at every quant level")
    measure: list[Literal[MEASUREMENTS]] = Field(
        default_factory=lambda: list(DEFAULT_MEASUREMENTS),
        description="what to measure on every cell once its GGUF exists",
    )
    serve: ServeSpec = ServeSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    bench: BenchSpec = BenchSpec()
    load: LoadSpec = LoadSpec()
    drift: DriftSpec = DriftSpec()
    budgets: BudgetSpec = BudgetSpec()
    tracking: TrackingSpec = TrackingSpec()
    executor: ExecutorSpec = ExecutorSpec()
    _source: tuple[Path, yaml.Node | None] | None = PrivateAttr(None)
    """The file and YAML tree `load` read, so checks made later can name the line."""

    @property
    def serves(self) -> bool:
        """Whether a measurement deploys the cells' models (a backend is needed)."""
        return bool(set(SERVED_MEASUREMENTS) & set(self.measure))

    def where(self, *loc: str | int) -> str:
        """`spec.yaml:12: serve.parameters.num_ctx`: where a setting is, for a message about
        it from a check after `load` (preflight); just the dotted name for a spec built in code."""
        if self._source is None:
            return dotted(loc)
        path, root = self._source
        return f"{path}:{line_of(root, loc)}: {dotted(loc)}"

    @model_validator(mode="after")
    def _budgets_are_measured(self) -> Spec:
        needs = {
            "decode_tps_min": "bench",
            "decode_speedup_min": "bench",
            "ttft_ms_p95_max": "bench",
            "memory_mb_max": "bench",
            "kld_max": "drift",
            "load": "load",
        }
        for budget, measurement in needs.items():
            if getattr(self.budgets, budget) is not None and measurement not in self.measure:
                raise ValueError(
                    f"budgets.{budget} is set but measure leaves out "
                    f"{measurement}: add it to measure or drop the budget"
                )
        return self

    @model_validator(mode="after")
    def _tolerances_name_tasks(self) -> Spec:
        if isinstance(self.budgets.tolerance, dict):
            tasks = [t if isinstance(t, str) else t.name for t in self.evaluate.all_tasks]
            if unknown := sorted(set(self.budgets.tolerance) - {*tasks, "default"}):
                raise ValueError(
                    f"budgets.tolerance names {', '.join(unknown)}, not a task of evaluate; "
                    f"name one of {', '.join(tasks)} or default"
                )
        return self

    @field_validator("quant")
    @classmethod
    def _known_levels(cls, entries: list[str | QuantRecipe]) -> list[str | QuantRecipe]:
        canonical = [e if isinstance(e, QuantRecipe) else quant.canonical(e) for e in entries]
        names = [e.name if isinstance(e, QuantRecipe) else e for e in canonical]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"quant level listed twice: {', '.join(map(str, dupes))}")
        return canonical

    @property
    def levels(self) -> list[str]:
        """The cells' quant names, as listed: levels and recipes' names."""
        return [e.name if isinstance(e, QuantRecipe) else e for e in self.quant]

    def recipe(self, name: str) -> QuantRecipe | None:
        """The recipe a quant name stands for; None for a plain level."""
        return next((e for e in self.quant if isinstance(e, QuantRecipe) and e.name == name), None)

    @field_validator("route")
    @classmethod
    def _routes_once(cls, routes: list[str]) -> list[str]:
        if len(set(routes)) != len(routes):
            raise ValueError("route listed twice: list each of merge and adapter at most once")
        return routes

    @field_validator("lora")
    @classmethod
    def _unique_names(cls, loras: list[LoraSpec]) -> list[LoraSpec]:
        names = [lo.name for lo in loras]
        if CONTROL in names:
            raise ValueError(f"'{CONTROL}' names the untuned control cells; pick another LoRA name")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"LoRA name used twice: {', '.join(dupes)}; names must be unique")
        return loras
