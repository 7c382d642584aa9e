"""What a run will take before it starts: the base's shape as far as it can be read
without downloading (`Shape`), the disk and memory its cells need (`needs`), and whether
this machine has them (`fits`). Apart from the input checks (`checks`), which refuse a
spec that cannot run at all, since these only estimate: `plan` shows them, `run` refuses
a spec that will not fit.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from harness import env
from harness.errors import ForgebenchError, InputError
from harness.plan.cells import Cell, unique_calls
from harness.plan.store import Store
from harness.sources.ollama import GgufInfo
from harness.spec import Spec

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
    # the largest context a setting reserves (harness.spec.serving), one slot counting it
    base = spec.serve.baseline()
    served = [base | s.as_dict() for s in spec.serve.settings()] + [base]
    n_ctx = max(int(s["num_ctx"]) * int(s["slots"]) for s in served)
    serving = serving_bytes(shape, n_ctx, 1)
    loads = spec.serves or "drift" in spec.measure  # llama-perplexity loads the model too
    if serving is not None and loads and not _remote_ollama(cells[0].backend):
        out.append(
            Need(
                "memory for serving",
                serving,
                "lower serve.slots or serve.parameters.num_ctx (or the largest in serve.sweep)",
            )
        )
    return out


# What each stage writes, in bytes per weight of the base: an fp32 HF folder, an F16 GGUF.
OUTPUT_BYTES_PER_WEIGHT = {"resolve": 4.0, "merge": 4.0, "convert": BYTES_PER_WEIGHT["f16"]}


def _disk_bytes(spec: Spec, shape: Shape, cells: list[Cell], store: Store) -> int:
    """The outputs still to build, by stage, from the parameter count."""
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
    if backend != "ollama":
        return False
    host = urlsplit(env.ollama_host()).hostname or ""
    return host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
