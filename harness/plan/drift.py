"""The drift calls: a GGUF's KL divergence and top-1 agreement against a reference F16,
whose logits `drift_base` saves once; with `drift.task`, on the task's own text too.

`drift.task` enters a key only when it is on, so specs without it keep their keys. The
task's text is the first evaluated task's items (the arithmetic items come from `data`),
and drift_base counts its tokens with the tokenizer of the HF folder the F16 came from.
"""

from __future__ import annotations

from typing import Any

from harness.plan import keys
from harness.plan.store import StageCall
from harness.spec import Spec


def _settings(spec: Spec) -> dict[str, Any]:
    return {
        "drift": spec.drift.model_dump(mode="json", exclude=set() if spec.drift.task else {"task"})
    }


def reference(
    spec: Spec, f16: StageCall, model: StageCall, data: dict[str, Any], extra: dict[str, StageCall]
) -> StageCall:
    """drift_base on `f16` (made from the HF folder `model`); `extra` adds the adapter route's
    LoRA GGUF."""
    settings, inputs = _settings(spec), {"gguf": f16, **extra}
    if spec.drift.task:
        first = spec.evaluate.tasks[0]
        task = first if isinstance(first, str) else {"name": first.name, "path": str(first.path)}
        settings["task_text"] = {"task": task, "data": data}
        inputs["model"] = model
    return StageCall("drift_base", settings, inputs, keys.versions("drift_base"))


def measured(
    spec: Spec, gguf: StageCall, against: StageCall, extra: dict[str, StageCall]
) -> StageCall:
    """drift of `gguf` against the logits `against` (a drift_base call) saved."""
    inputs = {"gguf": gguf, "reference": against, **extra}
    return StageCall("drift", _settings(spec), inputs, keys.versions("drift"))
