"""A peft LoRA adapter folder that forgebench did not train (Unsloth, axolotl, LLaMA-Factory,
TRL, a plain peft script) or an earlier night's to continue from: what its adapter_config.json
says, read without torch, and whether its tensors fit a base.

The base an adapter names in its config (`base_model_name_or_path`) is a hub id or a path on
the trainer's machine, so it cannot decide a match; the tensors can. A LoRA pair for a linear
layer of shape (out, in) is lora_A (r, in) and lora_B (out, r), so an adapter trained on
another base (another width, fewer layers, other module names) shows in the first tensor that
has no module of its shape in the base.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ForgebenchError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
"""What peft puts before a module's name in the saved keys."""


@dataclass(frozen=True)
class Adapter:
    folder: Path
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    """Module names, or one regular expression as peft also takes."""
    bias: str
    base_model: str
    """What the trainer called the base: a hint for messages, never a check."""
    weights: Path
    fan_in_fan_out: bool
    extras: tuple[str, ...]
    """peft features llama.cpp's LoRA converter cannot take: DoRA, modules_to_save."""


def read(folder: Path) -> Adapter:
    """The adapter's config, or one line saying why the folder is not a LoRA adapter."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not folder.is_dir():
        raise ForgebenchError(f"{folder}: no such folder; name a peft adapter's folder")
    if not config_path.is_file():
        raise ForgebenchError(
            f"{folder}: no {CONFIG}, so not a peft adapter folder (peft's "
            "model.save_pretrained(folder) writes one)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ForgebenchError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ForgebenchError(
            f"{config_path}: peft_type is {kind!r}; forgebench measures LoRA adapters "
            "(peft_type LORA)"
        )
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise ForgebenchError(
            f"{folder}: no {' or '.join(WEIGHTS)} beside {CONFIG}; save the adapter's "
            "weights there (peft's save_pretrained does)"
        )
    targets = config.get("target_modules") or ()
    extras = [
        name
        for name, on in (
            ("use_dora", config.get("use_dora")),
            ("modules_to_save", config.get("modules_to_save")),
        )
        if on
    ]
    return Adapter(
        folder=folder,
        r=int(config.get("r") or 0),
        alpha=float(config.get("lora_alpha") or 0),
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
        bias=str(config.get("bias") or "none"),
        base_model=str(config.get("base_model_name_or_path") or "unnamed"),
        weights=weights,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        extras=tuple(extras),
    )


LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(\.[^.]+)?\.weight$")
EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_[AB])(\.[^.]+)?$")


def misfit(
    adapter: Adapter, tensors: Mapping[str, Sequence[int]], base: Mapping[str, Sequence[int]]
) -> str | None:
    """Why the adapter's tensors (name -> shape) do not fit the base's parameters (name ->
    shape), naming the first tensor that does not; None when every one fits."""
    for key, shape in sorted(tensors.items()):
        name = key.removeprefix(PREFIX)
        if ".lora_magnitude_vector" in name:  # DoRA's: fits where its module's lora_B does
            continue
        found = LORA_KEY.match(name) or EMBEDDING_KEY.match(name)
        target = f"{found['module']}.weight" if found else name
        if target not in base:
            return (
                f"its tensor {key} is for {target.removesuffix('.weight')}, which this base "
                "has no such module for"
            )
        held = tuple(base[target])
        if found is None:  # a bias or a whole module (modules_to_save): the same shape
            fits, wants = tuple(shape) == held, f"{list(held)}"
        else:
            out, inp = held[::-1] if adapter.fan_in_fan_out else held
            if found["part"] == "lora_embedding_A":  # (r, rows of the embedding)
                fits, wants = shape[1] == held[0], f"[r, {held[0]}]"
            elif found["part"] == "lora_embedding_B":
                fits, wants = shape[0] == held[1], f"[{held[1]}, r]"
            elif found["part"] == "lora_A":
                fits, wants = shape[-1] == inp, f"[r, {inp}]"
            else:
                fits, wants = shape[0] == out, f"[{out}, r]"
        if not fits:
            return f"its tensor {key} is {list(shape)} where this base's {target} takes {wants}"
    return None


def tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in an adapter's weights; a safetensors file by its header alone."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open  # numpy's view: no torch for a header

        with safe_open(weights, framework="numpy") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    import torch  # heavy, and only the stages read an older peft's pickled .bin

    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}
