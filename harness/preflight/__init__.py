"""Checks that run before anything is written: the inputs read the way a run reads them
(`inputs`), the base, data, services and disk (`checks`)."""

from harness.preflight.checks import BYTES_PER_WEIGHT, check, download, fits, needs

__all__ = ["BYTES_PER_WEIGHT", "check", "download", "fits", "needs"]
