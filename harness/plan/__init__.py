"""The plan: a spec expanded into cells and their stage calls (`cells`), what a stage's
key covers beyond the spec (`keys`), and the content-addressed store of stage outputs
(`store`)."""

from harness.plan.cells import Cell, plan, unique_calls
from harness.plan.store import StageCall, Store

__all__ = ["Cell", "StageCall", "Store", "plan", "unique_calls"]
