"""What a cell measures on its GGUF, as stage calls: check, evaluate, bench and load on the
served model (keyed on how it is served: the backend, the spec's serve section and, for a
serving setting's cell, that setting), drift offline.

A setting's check and evaluation are keyed on the part of it that can change answers
(`Setting.answers`), so a setting of context, slots or threads shares its cell's
evaluation; bench and load are keyed on all of it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from harness import host
from harness.errors import ForgebenchError
from harness.hashing import digest
from harness.plan import drift, keys
from harness.plan.store import StageCall
from harness.spec import Spec
from harness.spec.serving import Setting
from harness.stages import check


def package_versions(*packages: str) -> dict[str, str]:
    """The installed versions of `packages`, for a stage key."""
    return {p: metadata.version(p) for p in packages}


def measurements(
    spec: Spec,
    calls: dict[str, StageCall],
    model: StageCall,
    f16: StageCall,
    backend: str,
    in_ollama: str | None = None,
    setting: Setting | None = None,
) -> dict[str, StageCall]:
    """The measuring stages the spec asks for, keyed on the cell's GGUF and how it is served
    (`in_ollama`: the level Ollama's create quantizes the F16 to; `setting`: a serving
    setting besides the spec's own, see the module docstring)."""
    gguf = calls.get("quantize") or f16
    # the adapter route serves the base GGUF with the LoRA GGUF: both name what is measured
    on = {"gguf": gguf, "model": model} | (
        {"adapter": calls["convert_lora"]} if "convert_lora" in calls else {}
    )
    # keep decides what happens after measuring, not what is measured; the template is the
    # model folder's (resolve's key holds the spec's text)
    exclude = {"keep", "chat_template", "sweep"}
    served = {"serve": spec.serve.model_dump(mode="json", exclude=exclude), "backend": backend}
    if in_ollama is not None:
        served["ollama_quantize"] = in_ollama
    speed = served | ({"setting": setting.as_dict()} if setting else {})
    if setting is not None and setting.answers():
        served = served | {"setting": setting.answers()}
    out: dict[str, StageCall] = {}
    if "check" in spec.measure:
        out["check"] = StageCall(
            "check",
            {**served, "probe": check.CONVERSATION, "max_tokens": check.MAX_TOKENS},
            on,
            keys.versions("check", backend),
        )
    if "evaluate" in spec.measure:
        scoring = {**served, "evaluate": evaluate_identity(spec), "data": data_identity(spec)}
        tasks = spec.evaluate.all_tasks
        out["evaluate"] = StageCall(
            "evaluate",
            scoring,
            on,
            package_versions("lm-eval") | keys.versions("evaluate", backend, tasks),
        )
    if "bench" in spec.measure:
        out["bench"] = StageCall(
            "bench",
            {**speed, "bench": spec.bench.model_dump(mode="json"), "machine": host.machine()},
            on,
            keys.versions("bench", backend),
        )
    if "load" in spec.measure:
        out["load"] = StageCall(
            "load",
            {**speed, "load": load_identity(spec), "machine": host.machine()},
            on,
            keys.versions("load", backend),
        )
    if "drift" in spec.measure and gguf is not f16:
        lora = {"adapter": on["adapter"]} if "adapter" in on else {}
        out["drift_base"] = drift.reference(spec, f16, model, data_identity(spec), lora)
        out["drift"] = drift.measured(spec, gguf, out["drift_base"], lora)
    return out


def load_identity(spec: Spec) -> dict[str, Any]:
    """The load stage's settings: the spec's, and the users or the rate a load budget
    names, which it must drive."""
    load = spec.load.model_dump(mode="json")
    if (budget := spec.budgets.load) is not None:
        load |= {"users": budget.users} if budget.users else {"rate": budget.rate}
    return load


def evaluate_identity(spec: Spec) -> dict[str, Any]:
    evaluate = spec.evaluate.model_dump(mode="json")
    for task in spec.evaluate.all_tasks:
        if not isinstance(task, str):
            if not task.path.is_file():
                raise ForgebenchError(f"evaluate.tasks: {task.name}: file not found: {task.path}")
            evaluate.setdefault("task_sha256", {})[task.name] = digest(task.path)
    return evaluate


def data_identity(spec: Spec) -> dict[str, Any]:
    data = spec.data.model_dump(mode="json")
    if spec.data.train is not None:
        if not spec.data.train.is_file():
            raise ForgebenchError(f"data.train: file not found: {spec.data.train}")
        data["train_sha256"] = digest(spec.data.train)
    return data
