"""Checks that run before anything is written: the inputs read the way a run reads them
(`inputs`), the base, data and services (`checks`), disk and memory (`resources`)."""

from harness.preflight.checks import check, download
from harness.preflight.resources import BYTES_PER_WEIGHT, fits, needs

__all__ = ["BYTES_PER_WEIGHT", "check", "download", "fits", "needs"]
