"""The experiment spec: the YAML a user writes, its schema and its loading with line numbers."""

from harness.spec.budgets import DEFAULT_TOLERANCE, BudgetSpec
from harness.spec.loading import load
from harness.spec.schema import Spec
from harness.spec.sections import LoraSpec, Resources

__all__ = ["DEFAULT_TOLERANCE", "BudgetSpec", "LoraSpec", "Resources", "Spec", "load"]
