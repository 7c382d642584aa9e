"""Checks that run before anything is written: the inputs read the way a run reads them
(`inputs`), the base, data and services (`checks`), disk and memory (`resources`)."""

from harness.preflight.checks import download, examine
from harness.preflight.resources import BYTES_PER_WEIGHT, Need, fits, needs

__all__ = ["BYTES_PER_WEIGHT", "Need", "download", "examine", "fits", "needs"]
