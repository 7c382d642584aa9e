"""Checks that need more than the spec file: data files, the base model, the tracking
store, the serving backend, disk space. Run before anything is written, so a bad input
costs one line (exit code 2) and leaves the store and MLflow untouched.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import data, env, services
from harness.data import evals, replay
from harness.errors import ForgebenchError, InputError
from harness.judge import sample_size
from harness.plan.store import Store
from harness.preflight import inputs
from harness.sources import templates
from harness.sources.ollama import GgufInfo
from harness.spec.schema import Spec

if TYPE_CHECKING:
    from harness.plan.cells import Cell

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


def check(spec: Spec) -> Shape | None:
    """Raise InputError on the first problem found; return the base's shape, as far as it
    could be read, for `needs`. The services come first: asking them takes a few seconds at
    most, and reading a GGUF can take longer."""
    _tracking(spec)
    _serving(spec)
    inputs.serve_parameters(spec)
    inputs.model_names(spec)
    _data(spec)
    sample_size.check(spec)
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


def _base(spec: Spec) -> Shape | None:
    """The base's architecture and size, where they can be read without downloading."""
    from harness import sources
    from harness.sources import ollama as ollama_models

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
        snapshot = ollama_models.cached_snapshot(base.hf, base.revision)
        try:
            return Shape.of_folder(snapshot) if snapshot else None
        except ForgebenchError as exc:
            raise InputError(f"{spec.where('base', 'hf')}: {exc}") from None
    return None


@dataclass(frozen=True)
class Shape:
    """What the resource estimates need from the base; any part may be unknown."""

    architecture: str | None
    parameters: int | None
    layers: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    context: int | None = None
    """The context length the base was trained on."""

    @classmethod
    def of_gguf(cls, info: GgufInfo) -> Shape:
        return cls(
            info.architecture,
            info.parameters,
            info.block_count,
            info.embedding_length,
            info.vocab_size,
            info.context_length,
        )

    @classmethod
    def of_folder(cls, folder: Path) -> Shape:
        """From config.json, with the parameter count from the weight files' headers;
        ForgebenchError naming the file that cannot be read as transformers will read it."""
        path = folder / "config.json"
        try:
            config = json.loads(path.read_bytes())
        except (ValueError, OSError) as exc:
            raise ForgebenchError(f"{path}: not a readable JSON config ({exc})") from None
        if not isinstance(config, dict):
            raise ForgebenchError(f"{path}: a model config is a JSON object")
        config = {**config, **(config.get("text_config") or {})}
        return cls(
            config.get("model_type"),
            _safetensors_parameters(folder),
            config.get("num_hidden_layers"),
            config.get("hidden_size"),
            config.get("vocab_size"),
            config.get("max_position_embeddings"),
        )


def _safetensors_parameters(folder: Path) -> int | None:
    """Sum the tensor shapes in each safetensors header (8-byte length + JSON), no weights read."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with path.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            header.pop("__metadata__", None)
            end = max((t["data_offsets"][1] for t in header.values()), default=0)
            total += sum(math.prod(t["shape"]) for t in header.values())
        except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ForgebenchError(
                f"{path}: not a safetensors file (its header cannot be read); download it again"
            ) from None
        if path.stat().st_size < 8 + length + end:
            raise ForgebenchError(
                f"{path}: truncated: {path.stat().st_size} bytes, its header declares "
                f"{8 + length + end}; download it again"
            )
    return total


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
    import os

    from harness.track import tracking

    uri = tracking.tracking_uri(spec)
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
    from harness import backends

    if (
        spec.serves
        and spec.serve.backend == "ollama"
        and not backends.ollama_answers(services.SERVICE_TIMEOUT_S)
    ):
        raise InputError(
            f"serve.backend: ollama, but no Ollama server answers at "
            f"{env.ollama_host()}; start `ollama serve` or use backend: auto"
        )


@dataclass(frozen=True)
class Need:
    """One resource a run will take, estimated before it starts."""

    what: str
    bytes: int
    fix: str

    def describe(self) -> str:
        return f"{self.what} about {self.bytes / 2**30:.1f} GiB"


def needs(spec: Spec, shape: Shape | None, cells: list[Cell], store: Store) -> list[Need]:
    """Disk for the outputs of `cells` not in `store` yet, and memory for training and
    serving: `plan` shows them, `run` refuses (`fits`) a spec that will not fit. Empty when
    the base's size cannot be read offline."""
    if shape is None or not shape.parameters:
        return []
    disk = _disk_bytes(spec, shape, cells, store)
    out = [Need("disk for the store", disk, "free some disk or use --store elsewhere")]
    training = training_bytes(shape, spec.train.batch_size, spec.train.max_seq_len)
    if training is not None:
        out.append(
            Need("memory for training", training, "lower train.batch_size or train.max_seq_len")
        )
    n_ctx = int(spec.serve.parameters.get("num_ctx", 2048))
    serving = serving_bytes(shape, n_ctx, spec.serve.slots)
    loads = spec.serves or "drift" in spec.measure  # llama-perplexity loads the model too
    if serving is not None and loads and not _remote_ollama(cells[0].backend):
        out.append(
            Need("memory for serving", serving, "lower serve.slots or serve.parameters.num_ctx")
        )
    return out


# What each stage writes, in bytes per weight of the base: an fp32 HF folder, an F16 GGUF.
OUTPUT_BYTES_PER_WEIGHT = {"resolve": 4.0, "merge": 4.0, "convert": BYTES_PER_WEIGHT["f16"]}


def _disk_bytes(spec: Spec, shape: Shape, cells: list[Cell], store: Store) -> int:
    """The outputs still to build, by stage, from the parameter count."""
    from harness.plan.cells import unique_calls

    calls = unique_calls(cells)
    total = 0.0
    for call in calls.values():
        if store.has(call):
            continue
        if call.stage in OUTPUT_BYTES_PER_WEIGHT:
            total += shape.parameters * OUTPUT_BYTES_PER_WEIGHT[call.stage]
        elif call.stage == "quantize":
            total += shape.parameters * BYTES_PER_WEIGHT.get(call.settings["level"], 2.0)
        elif call.stage == "drift_base" and shape.vocab:
            # llama-perplexity keeps the F16 logits of the scored half of each chunk, 2 bytes each
            total += spec.drift.chunks * spec.drift.ctx // 2 * shape.vocab * 2
    return int(total)


def fits(needs: list[Need], store: Store) -> None:
    """Raise InputError, with the numbers, for the first need this machine cannot meet."""
    import psutil

    ram = psutil.virtual_memory().available, "available"
    folder = store.root
    while not folder.exists():
        folder = folder.parent
    room = {
        "disk for the store": (free_disk(folder), f"free at {folder}"),
        "memory for training": _training_memory() or ram,
        "memory for serving": ram,
    }
    for need in needs:
        available, where = room[need.what]
        if need.bytes > available:
            raise InputError(
                f"not enough {need.what}: about {need.bytes / 2**30:.1f} GiB needed, "
                f"{available / 2**30:.1f} GiB {where}; {need.fix}"
            )


def free_disk(folder: Path) -> int:
    """Bytes free on the filesystem holding `folder`."""
    return shutil.disk_usage(folder).free


# Memory estimates, in bytes. Training keeps fp32 weights (autocast computes in bf16) and,
# per layer and token, about 34 x hidden bytes of 16-bit activations for the backward pass
# (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
# 2022), counted at fp32 here; the logits, their softmax and its gradient are fp32 over
# the whole vocabulary. RUNTIME is what torch, transformers and peft take before any model.
RUNTIME = 700 * 2**20
ACTIVATION_BYTES_PER_HIDDEN = 34 * 2
LOGIT_COPIES = 3


def training_bytes(shape: Shape, batch_size: int, max_seq_len: int) -> int | None:
    """Peak memory of one training step, or None when the shape is unknown."""
    if not (shape.parameters and shape.layers and shape.hidden and shape.vocab):
        return None
    tokens = batch_size * max_seq_len
    weights = 4 * shape.parameters
    activations = shape.layers * tokens * shape.hidden * ACTIVATION_BYTES_PER_HIDDEN
    logits = tokens * shape.vocab * 4 * LOGIT_COPIES
    return RUNTIME + weights + activations + logits


def serving_bytes(shape: Shape, n_ctx: int, slots: int) -> int | None:
    """The largest cell served (its F16 GGUF) plus an f16 KV cache of n_ctx per slot."""
    if not (shape.parameters and shape.layers and shape.hidden):
        return None
    kv_cache = 2 * shape.layers * n_ctx * slots * shape.hidden * 2  # K and V, f16, no GQA saving
    return int(shape.parameters * BYTES_PER_WEIGHT["f16"]) + kv_cache


def _training_memory() -> tuple[int, str] | None:
    """Free GPU memory where training will run on a GPU (the train stage's choice)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free, "free on the GPU"


def _remote_ollama(backend: str) -> bool:
    """Serving memory is the Ollama host's, not ours, when that host is another machine."""
    from urllib.parse import urlsplit


    if backend != "ollama":
        return False
    host = urlsplit(env.ollama_host()).hostname or ""
    return host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


# --- what a run would download first ------------------------------------------


@dataclass(frozen=True)
class Download:
    """Hub files a run must fetch before it can train: `plan` shows it, `run` asks first."""

    repo: str
    size: int

    def describe(self) -> str:
        from harness.sources.ollama import human_size

        return f"{human_size(self.size)} from the Hugging Face hub ({self.repo})"


def download(spec: Spec) -> Download | None:
    """The base's download, when it is not in the HF cache (or a model_dirs folder)."""
    from huggingface_hub import is_offline_mode

    from harness.sources import ollama as ollama_models

    base = spec.base.model_dump(mode="json")
    if base.get("ollama"):
        base = ollama_models.resolve_base(base).base
    if not base.get("hf"):
        return None
    repo, revision = base["hf"], base.get("revision")
    if ollama_models.cached_snapshot(repo, revision) is not None:
        return None
    if is_offline_mode():
        raise InputError(
            f"base: {repo} is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE=1): fetch it once (`hf download {repo}`) or point "
            "base: {path: ...} at a local copy"
        )
    size = ollama_models.download_size(repo, revision)
    if size is None:
        raise InputError(
            f"base: {repo} is not in the local Hugging Face cache and the hub cannot be "
            f"reached: check the network and HF_TOKEN, or fetch it once (`hf download {repo}`)"
        )
    return Download(repo, size) if size else None
