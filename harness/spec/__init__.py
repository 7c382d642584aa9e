"""The experiment spec: the YAML a user writes, its schema and its loading with line numbers."""

from harness.spec.schema import BudgetSpec, LoraSpec, Spec, load

__all__ = ["BudgetSpec", "LoraSpec", "Spec", "load"]
