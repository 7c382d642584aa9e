"""Checks that need more than the spec file: data files, the base model, the tracking
store, the serving backend (disk space and memory: `resources`), and the base's download.
Run before anything is written, so a bad input costs one line (exit code 2) and leaves the
store and MLflow untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from harness import backends, data, env, services, sources, track
from harness.data import calibration, evals, hygiene, replay, training
from harness.errors import ForgebenchError, InputError
from harness.judge import sample_size
from harness.preflight import inputs
from harness.preflight.resources import Shape
from harness.sources import adapters, hub, kinds, listing, templates
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


def examine(spec: Spec) -> Shape | None:
    """Raise InputError on the first problem found; return the base's shape, as far as it
    could be read, for `needs`. The services come first: asking them takes a few seconds at
    most, and reading a GGUF can take longer."""
    _tracking(spec)
    _serving(spec)
    inputs.serve_parameters(spec)
    inputs.model_names(spec)
    _data(spec)
    _unseen(spec)
    _calibrated(spec)
    sample_size.require_decidable(spec)
    shape = _base(spec)
    templates.require(spec)
    _targets(spec, shape.architecture if shape else None)
    inputs.token_counts(spec, shape.context if shape else None, evals.EVALS / "drift_text.txt")
    return shape


def _data(spec: Spec) -> None:
    """Every data file the spec names, read the way its stage reads it."""
    if spec.data.train is not None:
        if not spec.data.train.is_file():
            raise InputError(f"{spec.where('data', 'train')}: file not found: {spec.data.train}")
        try:
            data.read_jsonl(spec.data.train)
        except ForgebenchError as exc:
            raise InputError(f"{spec.where('data', 'train')}: {exc}") from None
    for i, lora in enumerate(spec.lora):
        if lora.replay is None:
            continue
        where = spec.where("lora", i, "replay")
        if not lora.replay.is_file():
            raise InputError(f"{where}: file not found: {lora.replay}")
        try:
            replay.prompts(lora.replay)
        except ForgebenchError as exc:
            raise InputError(f"{where}: {exc}") from None
    for i, lora in enumerate(spec.lora):
        for field in ("path", "resume_from"):
            if (folder := getattr(lora, field)) is not None:
                try:
                    adapters.read(folder)
                except ForgebenchError as exc:
                    raise InputError(f"{spec.where('lora', i, field)}: {exc}") from None
    for field, tasks in (("tasks", spec.evaluate.tasks), ("guard", spec.evaluate.guard)):
        for i, task in enumerate(tasks):
            if (
                task == "arithmetic"
                and spec.data.task != "arithmetic"
                and "evaluate" in spec.measure
            ):
                raise InputError(
                    f"evaluate.{field}: arithmetic is scored on the held-out split of "
                    "data.task: arithmetic, and this spec trains on data.train; list your own "
                    "task ({name: ..., path: qa.jsonl}) or gsm8k instead"
                )
            if not isinstance(task, str) and not task.path.is_file():
                raise InputError(
                    f"{spec.where('evaluate', field, i, 'path')}: {task.name}: "
                    f"file not found: {task.path}"
                )
            if not isinstance(task, str) and "evaluate" in spec.measure:
                try:
                    evals.check_qa_jsonl(task.path, task.scorer, task.regex)
                except ForgebenchError as exc:
                    raise InputError(f"{spec.where('evaluate', field, i)}: {exc}") from None


def _unseen(spec: Spec) -> None:
    """No training row may repeat an item the run scores (`data.hygiene`). The built-in
    arithmetic task's held-out split is disjoint from its training split by construction."""
    if spec.data.train is None or "evaluate" not in spec.measure:
        return
    builtin = {"gsm8k": evals.GSM8K_DATA, "capitals": evals.CAPITALS_DATA}
    tasks = {}
    for task in spec.evaluate.all_tasks:
        if not isinstance(task, str):
            tasks[task.name] = task.path
        elif task in builtin:
            tasks[task] = builtin[task]
    if repeat := hygiene.first_repeat(spec.data.train, tasks):
        raise InputError(
            f"{spec.where('data', 'train')}: {repeat} (whitespace and case aside): a model "
            "trained on an eval item answers it from memory; drop the row"
        )


def _calibrated(spec: Spec) -> None:
    """No imatrix calibration text may hold an item the run scores (tasks and guards) or a
    line of the drift text (`data.calibration`): a level calibrated on its own test is tuned
    to it. Checked whatever `measure` says, since a later run may score on the same matrix."""
    calibrated = [(i, e) for i, e in enumerate(spec.quant) if getattr(e, "imatrix", None)]
    if not calibrated:
        return
    builtin = {"gsm8k": evals.GSM8K_DATA, "capitals": evals.CAPITALS_DATA}
    files = {t.name: t.path for t in spec.evaluate.all_tasks if not isinstance(t, str)}
    files |= {t: builtin[t] for t in spec.evaluate.all_tasks if t in builtin}
    needles = calibration.needles(files, evals.EVALS / "drift_text.txt")
    if spec.data.task == "arithmetic" and "arithmetic" in spec.evaluate.all_tasks:
        held = data.held_out(spec.data.model_dump(mode="json"))
        needles |= {
            hygiene.normal(c[0]["content"]): f"arithmetic's item {c[0]['content']!r}" for c in held
        }
    for i, recipe in calibrated:
        where = spec.where("quant", i, "imatrix")
        if recipe.imatrix not in ("train", "text") and not recipe.imatrix.is_file():
            raise InputError(f"{where}: file not found: {recipe.imatrix} (or say train or text)")
        if leak := calibration.first_leak(_calibration_lines(spec, recipe.imatrix), needles):
            raise InputError(
                f"{where}: {leak} (whitespace and case aside): a level calibrated on what "
                "judges it is tuned to the test; drop that text from the calibration"
            )


def _calibration_lines(spec: Spec, source: str | Path):
    """(where, line number, text) of a calibration source, as `first_leak` reads it."""
    if source == "text":
        name = "imatrix text (pydoc_data)"
        yield from (
            (name, i, line) for i, line in enumerate(calibration.general_text().splitlines(), 1)
        )
    elif source == "train" and spec.data.train is not None:
        for lineno, conversation in training.numbered(spec.data.train):
            yield from ((spec.data.train, lineno, m["content"]) for m in conversation)
    elif source == "train":
        conversations = data.training_set(spec.data.model_dump(mode="json"))
        for i, conversation in enumerate(conversations, 1):
            yield from ((f"data.task {spec.data.task} row", i, m["content"]) for m in conversation)
    else:
        yield from ((source, i, line) for i, line in enumerate(source.read_text().splitlines(), 1))


def _base(spec: Spec) -> Shape | None:
    """The base's architecture and size, where they can be read without downloading."""
    base = spec.base
    if base.model or base.gguf:
        path = sources.bundled_gguf(base.model) if base.model else base.gguf
        field = ("base", "model") if base.model else ("base", "gguf")
        if not path.is_file():
            raise InputError(f"{spec.where(*field)}: file not found: {path}")
        return Shape.of_gguf(inputs.gguf(spec, field, path))
    if base.path:
        if not (base.path / "config.json").is_file():
            raise InputError(
                f"base.path: {base.path} is not a Hugging Face model folder (no config.json)"
            )
        try:
            return Shape.of_folder(base.path)
        except ForgebenchError as exc:
            raise InputError(f"{spec.where('base', 'path')}: {exc}") from None
    if base.hf:
        snapshot = hub.cached_snapshot(base.hf, base.revision)
        try:
            return Shape.of_folder(snapshot) if snapshot else None
        except ForgebenchError as exc:
            raise InputError(f"{spec.where('base', 'hf')}: {exc}") from None
    return None


def _targets(spec: Spec, architecture: str | None) -> None:
    known = TARGET_MODULES.get(architecture or "")
    if known is None:
        return
    for i, lora in enumerate(spec.lora):
        if lora.target_modules is None:  # an adapter folder's: its tensors are checked
            continue
        unknown = [m for m in lora.target_modules if m not in known and m != "all-linear"]
        if unknown:
            raise InputError(
                f"lora[{i}].target_modules: {', '.join(unknown)} not in a "
                f"{architecture} model; use some of {', '.join(known)} or all-linear"
            )


def _tracking(spec: Spec) -> None:
    uri = track.tracking_uri(spec)
    if uri.startswith(("http://", "https://")):
        given = os.environ.get("MLFLOW_TRACKING_URI") and "MLFLOW_TRACKING_URI"
        services.answers(
            f"{uri.rstrip('/')}/health",
            f"{given or spec.where('tracking', 'uri')}: MLflow tracking server",
            "start the server (`mlflow server`) or use a local store (sqlite:///mlflow.db)",
            services.mlflow_tls(),
        )
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.absolute().parent.is_dir():
            raise InputError(f"tracking uri {uri}: folder {db.absolute().parent} does not exist")
    elif not uri.startswith(("http://", "https://", "file:", "databricks", "postgresql", "mysql")):
        raise InputError(
            f"tracking uri {uri!r}: not an MLflow store; use sqlite:///mlflow.db "
            "or http://host:5000"
        )


def _serving(spec: Spec) -> None:
    if (
        spec.serves
        and spec.serve.backend == "ollama"
        and not backends.ollama_answers(services.SERVICE_TIMEOUT_S)
    ):
        raise InputError(
            f"serve.backend: ollama, but no Ollama server answers at "
            f"{env.ollama_host()}; start `ollama serve` or use backend: auto"
        )


# --- what a run would download first ------------------------------------------


@dataclass(frozen=True)
class Download:
    """Hub files a run must fetch before it can train: `plan` shows it, `run` asks first."""

    repo: str
    size: int

    def describe(self) -> str:
        return f"{listing.human_size(self.size)} from the Hugging Face hub ({self.repo})"


def download(spec: Spec) -> Download | None:
    """The base's download, when it is not in the HF cache (or a model_dirs folder)."""
    from huggingface_hub import is_offline_mode

    base = spec.base.model_dump(mode="json")
    found = kinds.kind(base).hub_repo(base)
    if found is None:
        return None
    repo, revision = found
    if hub.cached_snapshot(repo, revision) is not None:
        return None
    if is_offline_mode():
        raise InputError(
            f"base: {repo} is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE=1): fetch it once (`hf download {repo}`) or point "
            "base: {path: ...} at a local copy"
        )
    size = hub.download_size(repo, revision)
    if size is None:
        raise InputError(
            f"base: {repo} is not in the local Hugging Face cache and the hub cannot be "
            f"reached: check the network and HF_TOKEN, or fetch it once (`hf download {repo}`)"
        )
    return Download(repo, size) if size else None
