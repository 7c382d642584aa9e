"""The quantize call of a level or a recipe, and the imatrix call a recipe adds.

A plain level's call is what it always was (`{"level": ...}` from the F16), so adding
recipes to a spec changes no key of the levels it already had. A recipe's importance
matrix is keyed on the F16 it runs over and on its calibration text by content: the
training data's identity (the chat template is in the model's key), the general text's
sha256, or a file's content (`harness.plan.store.portable`). Two recipes that calibrate
the same way share one matrix.
"""

from __future__ import annotations

from typing import Any

from harness.data import calibration
from harness.errors import InputError
from harness.plan import keys
from harness.plan.store import StageCall
from harness.spec import Spec
from harness.spec.recipes import QuantRecipe


def quantize_call(
    spec: Spec, name: str, f16: StageCall, model: StageCall, data: dict[str, Any]
) -> StageCall:
    """The call that makes level or recipe `name` from `f16`; `model` is the HF folder the
    F16 was converted from (its chat template renders `imatrix: train`)."""
    recipe = spec.recipe(name)
    if recipe is None:
        return StageCall("quantize", {"level": name}, {"gguf": f16}, keys.versions("quantize"))
    inputs = {"gguf": f16}
    if recipe.imatrix is not None:
        inputs["imatrix"] = imatrix_call(recipe, f16, model, data)
    return StageCall(
        "quantize",
        {"level": recipe.level, **recipe.quantize_settings()},
        inputs,
        keys.versions("quantize"),
    )


def ollama_level(spec: Spec, name: str) -> str | None:
    """The level Ollama's create makes `name` at, for a recipe `by: ollama`; else None.
    Such a recipe exists only on an Ollama server, and `auto` may pick llama-server,
    which serves files as they are: the spec must name the backend."""
    recipe = spec.recipe(name)
    if recipe is None or recipe.by != "ollama":
        return None
    if spec.serve.backend != "ollama" or not spec.serves:
        where = spec.where("quant", spec.levels.index(name))
        raise InputError(
            f"{where}: {name} is made by Ollama's create and measured on what it serves: "
            "set serve.backend: ollama and measure check, evaluate or bench"
        )
    return recipe.level


def imatrix_call(
    recipe: QuantRecipe, f16: StageCall, model: StageCall, data: dict[str, Any]
) -> StageCall:
    inputs = {"gguf": f16}
    if recipe.imatrix == "train":
        source: dict[str, Any] = {"source": "train", "data": data}
        inputs["model"] = model
    elif recipe.imatrix == "text":
        source = {"source": "text", "sha256": calibration.general_text_sha256()}
    else:
        source = {"source": "file", "path": str(recipe.imatrix)}
    return StageCall(
        "imatrix",
        {"calibration": source, "chunks": recipe.chunks},
        inputs,
        keys.versions("imatrix"),
    )
