"""A cell's settings and figures in the shapes MLflow takes: nested settings as dotted
params, one number per metric name (a stage that also serves another role under its own
prefix), and the training curve. Kept apart from the writer, which only sends them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.chain import ADAPTERS
from harness.hashing import tree_sha256
from harness.run.outcomes import CellResult
from harness.spec import LoraSpec


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as MLflow params (`train.lr`, `lora.target_modules`)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else key, inner))
        return out
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return {prefix: str(value)}


RENAMED = {"reference": "hf", "reference_base": "hf_base", "drift_tuning": "tuning"}
"""Roles whose stage also serves another role: their figures are logged under a prefix
(`hf.accuracy_arithmetic`, `tuning.kld_mean`), so they never overwrite the cell's own."""


def stage_metrics(result: CellResult) -> dict[str, float]:
    """A cell's numeric figures, one value per name: where two stages report a name, the
    later in the chain wins."""
    out: dict[str, float] = {}
    for role, outcome in result.stages.items():
        out[f"time_{role}_s"] = round(outcome.seconds, 3)
        prefix = f"{RENAMED[role]}." if role in RENAMED else ""
        out |= {
            prefix + k: float(v)
            for k, v in outcome.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def result_curve(result: CellResult) -> list[tuple[int, float]]:
    train = result.stages.get("train")
    return [tuple(p) for p in train.metrics.get("loss_curve", [])] if train else []


def adapter_lineage(lora: LoraSpec) -> dict[str, str]:
    """Where an adapter came from, beyond the spec's path: the folder's content hash for an
    adopted one (`lora.path_sha256`) or the parent a training continued (`lora.resume_from_
    sha256`), and the parent's stage key when the folder is a forgebench store output
    (`.../train/KEY/adapter`), so a chain of nights can be followed back run by run through
    the `forgebench.key.train` tags."""
    out = {}
    for field in ("path", "resume_from"):
        if getattr(lora, field) is None or not (folder := Path(getattr(lora, field))).is_dir():
            continue
        out[f"lora.{field}_sha256"] = tree_sha256(folder)
        stage = folder.parent.parent.name
        if folder.name == "adapter" and stage in ADAPTERS:
            out[f"lora.{field}_key"] = f"{stage}/{folder.parent.name}"
    return out
