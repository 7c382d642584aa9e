"""Checks that need more than the spec file: data files, the base model, the tracking
store, the serving backend, disk space. Run before anything is written, so a bad input
costs one line (exit code 2) and leaves the store and MLflow untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import data, quant
from harness.errors import ForgebenchError, InputError
from harness.spec import Spec

# Linear layers LoRA can target, by architecture (GGUF names and HF model_type).
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_MODULES = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "smollm3", "granite"),
        LLAMA_LIKE,
    ),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
# Bytes per weight of each level, for the disk estimate (F16 GGUF and merged fp32 folder too).
BYTES_PER_WEIGHT = {
    "f16": 2.0,
    "q8_0": 1.07,
    "q6_k": 0.82,
    "q5_k_m": 0.71,
    "q5_k_s": 0.69,
    "q5_0": 0.69,
    "q4_k_m": 0.61,
    "q4_k_s": 0.57,
    "q4_0": 0.56,
    "q3_k_l": 0.54,
    "q3_k_m": 0.49,
    "q3_k_s": 0.44,
    "q2_k": 0.41,
}


def check(spec: Spec, store_root: Path | None = None) -> None:
    """Raise InputError on the first problem found."""
    _data(spec)
    architecture, parameters = _base(spec)
    _targets(spec, architecture)
    _tracking(spec)
    _serving(spec)
    if store_root is not None:
        _disk(spec, parameters, store_root)


def _data(spec: Spec) -> None:
    if spec.data.train is not None:
        if not spec.data.train.is_file():
            raise InputError(f"data.train: file not found: {spec.data.train}")
        try:
            data.read_jsonl(spec.data.train)
        except ForgebenchError as exc:
            raise InputError(f"data.train: {exc}") from None
    for task in spec.evaluate.tasks:
        if not isinstance(task, str) and not task.path.is_file():
            raise InputError(f"evaluate.tasks: {task.name}: file not found: {task.path}")
    if spec.serve.chat_template is not None and not spec.serve.chat_template.is_file():
        raise InputError(f"serve.chat_template: file not found: {spec.serve.chat_template}")


def _base(spec: Spec) -> tuple[str | None, int | None]:
    """The base's architecture and parameter count, where they can be read cheaply."""
    from harness import ollama_models, sources

    base = spec.base
    if base.model or base.gguf:
        path = sources.bundled_gguf(base.model) if base.model else base.gguf
        if not path.is_file():
            raise InputError(f"base.gguf: file not found: {path}")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise InputError(f"base.gguf: {path} is not a GGUF file (no GGUF magic)")
        info = ollama_models.read_gguf(path)
        return info.architecture, info.parameters
    if base.path:
        if not (base.path / "config.json").is_file():
            raise InputError(
                f"base.path: {base.path} is not a Hugging Face model folder (no config.json)"
            )
        import json

        return json.loads((base.path / "config.json").read_text()).get("model_type"), None
    return None, None


def _targets(spec: Spec, architecture: str | None) -> None:
    known = TARGET_MODULES.get(architecture or "")
    if known is None:
        return
    for i, lora in enumerate(spec.lora):
        unknown = [m for m in lora.target_modules if m not in known and m != "all-linear"]
        if unknown:
            raise InputError(
                f"lora[{i}].target_modules: {', '.join(unknown)} not in a "
                f"{architecture} model; use some of {', '.join(known)} or all-linear"
            )


def _tracking(spec: Spec) -> None:
    from harness import tracking

    uri = tracking.tracking_uri(spec)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.absolute().parent.is_dir():
            raise InputError(f"tracking uri {uri}: folder {db.absolute().parent} does not exist")
    elif not uri.startswith(("http://", "https://", "file:", "databricks", "postgresql", "mysql")):
        raise InputError(
            f"tracking uri {uri!r}: not an MLflow store; use sqlite:///mlflow.db "
            "or http://host:5000"
        )


def _serving(spec: Spec) -> None:
    from harness import backends

    served = {"check", "evaluate", "bench"} & set(spec.measure)
    if served and spec.serve.backend == "ollama" and not backends.ollama_answers():
        raise InputError(
            f"serve.backend: ollama, but no Ollama server answers at "
            f"{backends.ollama_host()}; start `ollama serve` or use backend: auto"
        )


def _disk(spec: Spec, parameters: int | None, store_root: Path) -> None:
    if not parameters:
        return
    adapters = len(spec.lora) + int(spec.control)
    per_adapter = 4.0 + sum(BYTES_PER_WEIGHT.get(q, 2.0) for q in {*spec.quant, quant.REFERENCE})
    need = parameters * (per_adapter * adapters + 4.0)  # + the dequantized base
    folder = store_root
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InputError(
            f"not enough disk for the store at {store_root}: about "
            f"{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
        )
    return []
