"""The chain of stages, the only place that knows their order, and the plan: a spec
expanded into cells and their stage calls.

    resolve -> train -> merge -> convert (F16) -> quantize       builds the cell's GGUF
    (route adapter: resolve -> convert (F16) -> quantize, the base's GGUF at each level,
     and train -> convert_lora, the LoRA GGUF served beside it)
            -> reference_base, reference                          the HF models scored in PyTorch
            -> check -> evaluate -> bench                         on the served model
            -> drift_base (F16, once per adapter) -> drift        llama-perplexity, offline
            -> drift_tuning                                       tuned F16 vs untuned F16

`plan()` expands a spec into cells (one per LoRA config x route x quant level, plus
the untuned base at every level) whose stage calls share keys wherever their
inputs agree, so N adapters x M levels train N adapters and convert N models.
A cell's `calls` map a role to a stage call; a role is the stage's name except
where one stage serves twice (`reference_base` and `drift_tuning` run the
reference and drift stages on the untuned side of the training link). Planning
runs nothing and imports nothing heavy: `plan`, `validate` and every executor read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness import backends, quant, sources
from harness.chain import ADAPTER, CONTROL, MERGE
from harness.errors import ForgebenchError, InputError
from harness.plan import drift, keys, ollama, recipes
from harness.plan.measures import data_identity, evaluate_identity, measurements, package_versions
from harness.plan.store import StageCall
from harness.sources import adapters, templates
from harness.spec import LoraSpec, Spec
from harness.spec.serving import Setting

NOT_CONVERTIBLE = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Cell:
    lora: LoraSpec | None
    quant: str
    calls: dict[str, StageCall]
    """stage name -> call, in chain order; only the stages this cell needs."""
    backend: str = "llamacpp"
    route: str = MERGE
    server_quantize: str | None = None
    """The level Ollama's create quantizes the F16 to (a recipe `by: ollama`): the cell has
    no quantize stage, `gguf` is the F16, and what serves is Ollama's own file."""
    setting: Setting | None = None
    """A serving setting besides the spec's own (harness.spec.serving): the cell is its
    level's GGUF served so, and `quant` is the level's name and the setting's."""

    @property
    def level(self) -> str:
        """The level or recipe the cell's GGUF is made at, without its serving setting."""
        return quant.without_setting(self.quant, self.setting and self.setting.name)

    @property
    def adapter(self) -> str:
        return self.lora.name if self.lora else CONTROL

    @property
    def line(self) -> str:
        """The adapter as this route ships it: `r8-qv`, on the adapter route `r8-qv-lora`."""
        return f"{self.adapter}-lora" if self.route == ADAPTER else self.adapter

    @property
    def name(self) -> str:
        return f"{self.line}-{self.quant}"

    @property
    def lora_gguf(self) -> StageCall | None:
        """The call whose output holds the LoRA GGUF served beside the base (adapter route)."""
        return self.calls.get("convert_lora")

    @property
    def gguf(self) -> StageCall:
        """The call whose output folder holds this cell's model.gguf."""
        return self.calls.get("quantize") or self.calls["convert"]

    @property
    def model(self) -> StageCall:
        """The call whose output holds the HF folder (tokenizer, chat template)."""
        return self.calls.get("merge") or self.calls["resolve"]


def plan(spec: Spec) -> list[Cell]:
    """Expand a spec into its cells without running or importing anything heavy.

    Within an adapter the F16 cell comes first: the other levels are judged against it."""
    base = spec.base.model_dump(mode="json")
    template = templates.given(spec)
    resolve = StageCall(
        "resolve",
        {"base": {**base, **sources.identity(base)}, "chat_template": template and template.text},
        versions=package_versions("transformers", "gguf") | keys.versions("resolve"),
    )
    data = data_identity(spec)
    backend = backends.resolve_name(spec.serve.backend) if spec.serves else ""
    if backend == "ollama":
        ollama.refuse_what_it_cannot(spec)
    adapters: list[LoraSpec | None] = ([None] if spec.control else []) + list(spec.lora)
    levels = sorted(spec.levels, key=lambda level: level != quant.F16)
    trust = spec.base.trust_remote_code
    base_f16 = StageCall(
        "convert", {"outtype": quant.F16}, {"model": resolve}, keys.versions("convert")
    )
    base_reference = _reference(spec, resolve)
    cells = []
    for lora in adapters:
        calls: dict[str, StageCall] = {"resolve": resolve}
        model = resolve
        if lora is not None:
            adapter = _adapter(spec, lora, resolve, data)
            calls[adapter.stage] = adapter
            model = StageCall(
                "merge",
                {"trust_remote_code": trust},
                {"base": resolve, "adapter": adapter},
                package_versions("torch", "transformers", "peft") | keys.versions("merge"),
            )
        references = {}
        if base_reference is not None:
            if lora is not None:
                references["reference_base"] = base_reference
            # the adapter route's PyTorch model is the same base + adapter: the merged one
            references["reference"] = _reference(spec, model)
        for route in spec.route if lora is not None else [MERGE]:
            line = dict(calls)
            if route == MERGE and lora is not None:
                line["merge"] = model
                line["convert"] = StageCall(
                    "convert",
                    {"outtype": quant.F16},
                    {"model": model},
                    keys.versions("convert"),
                )
            else:
                line["convert"] = base_f16
            if route == ADAPTER:
                _convertible(spec, lora)
                line["convert_lora"] = StageCall(
                    "convert_lora",
                    {"outtype": quant.F16, "trust_remote_code": trust},
                    {"base": resolve, "adapter": adapter},
                    package_versions("transformers", "peft") | keys.versions("convert_lora"),
                )
            cells += _levels(spec, lora, route, line, references, levels, backend, base_f16)
    return cells


def _adapter(spec: Spec, lora: LoraSpec, resolve: StageCall, data: dict) -> StageCall:
    """The call that gives the cell its adapter: `adopt` for a peft folder trained
    elsewhere (keyed by the folder's content), else `train`."""
    trust = spec.base.trust_remote_code
    if lora.path is not None:
        return StageCall(
            "adopt",
            {"adapter": str(lora.path), "trust_remote_code": trust},
            {"base": resolve},
            package_versions("torch", "transformers", "safetensors") | keys.versions("adopt"),
        )
    return StageCall(
        "train",
        {
            "lora": lora.settings(),
            "train": {
                **spec.train.model_dump(mode="json", exclude={"checkpoint_every"}),
                "precision": keys.resolved_precision(spec.train.precision),
            },
            "data": data,
            "trust_remote_code": trust,
        },
        {"base": resolve},
        package_versions("torch", "transformers", "peft") | keys.versions("train"),
        runtime={"checkpoint_every": spec.train.checkpoint_every},
    )


def _levels(
    spec: Spec,
    lora: LoraSpec | None,
    route: str,
    calls: dict[str, StageCall],
    references: dict[str, StageCall],
    levels: list[str],
    backend: str,
    base_f16: StageCall,
) -> list[Cell]:
    """One route's cells, F16 first: each level's (or recipe's) GGUF and what the spec
    measures on it."""
    f16 = calls["convert"]
    model = calls.get("merge") or calls["resolve"]
    data = data_identity(spec)
    cells = []
    for level in levels:
        cell_calls = dict(calls)
        in_ollama = recipes.ollama_level(spec, level)
        if level != quant.F16 and in_ollama is None:
            quantize = recipes.quantize_call(spec, level, f16, model, data)
            if "imatrix" in quantize.inputs:  # a role too, so its time and figures are logged
                cell_calls["imatrix"] = quantize.inputs["imatrix"]
            cell_calls["quantize"] = quantize
        cell_calls |= references
        measured = measurements(spec, cell_calls, model, f16, backend, in_ollama)
        tuned_f16 = level == quant.F16 and lora is not None and route == MERGE
        if tuned_f16 and "drift" in spec.measure:
            # how far training moved the model: the tuned F16 against the untuned F16
            untuned = drift.reference(spec, base_f16, calls["resolve"], data, {})
            measured["drift_tuning"] = drift.measured(spec, f16, untuned, {})
        cells.append(Cell(lora, level, cell_calls | measured, backend, route, in_ollama))
        for setting in spec.serve.settings():  # the same GGUF, served otherwise
            served = measurements(spec, cell_calls, model, f16, backend, in_ollama, setting)
            name = f"{level}-{setting.name}"
            calls_of = cell_calls | measured | served
            cells.append(Cell(lora, name, calls_of, backend, route, in_ollama, setting))
    return cells


def _convertible(spec: Spec, lora: LoraSpec) -> None:
    """What llama.cpp's LoRA converter and runtime cannot take, refused before anything runs:
    an adapter on the embedding or the output head (tied to the embedding in small models,
    and a full-rank delta llama.cpp's LoRA loader does not apply), one that trains biases
    (the converter stops at any tensor that is not lora_A or lora_B), or one with peft's
    DoRA or whole trained modules. An adapter folder (`path`, `resume_from`) says its own."""
    where = spec.where("lora", spec.lora.index(lora))
    targets, bias, extras = lora.target_modules or [], lora.bias, ()
    if folder := lora.path or lora.resume_from:
        try:
            found = adapters.read(folder)
        except ForgebenchError as exc:
            raise InputError(f"{where}: {exc}") from None
        targets, bias, extras = list(found.target_modules), found.bias, found.extras
    if bad := sorted(set(targets) & set(NOT_CONVERTIBLE)):
        raise InputError(
            f"{where}.target_modules: LoRA {lora.name} trains {', '.join(bad)}, which "
            "convert_lora_to_gguf.py cannot take for route adapter: drop them from "
            "target_modules or use route: [merge]"
        )
    if bias != "none":
        raise InputError(
            f"{where}.bias: LoRA {lora.name} trains biases ({bias}), which "
            "convert_lora_to_gguf.py cannot take for route adapter: set bias: none or use "
            "route: [merge]"
        )
    if extras:
        raise InputError(
            f"{where}: LoRA {lora.name} uses peft's {' and '.join(extras)}, which "
            "convert_lora_to_gguf.py cannot take for route adapter: use route: [merge]"
        )


def unique_calls(cells: list[Cell]) -> dict[str, StageCall]:
    """Every stage call the cells need, once by key, with the inputs no cell names as a role
    (the untuned F16 and its logits that drift_tuning reads when control is off)."""
    out: dict[str, StageCall] = {}
    todo = [call for cell in cells for call in cell.calls.values()]
    while todo:
        call = todo.pop(0)
        if call.key not in out:
            out[call.key] = call
            todo += call.inputs.values()
    return out


def _reference(spec: Spec, model: StageCall) -> StageCall | None:
    """The PyTorch score of an HF model folder, on the items the served cells are scored on."""
    if "evaluate" not in spec.measure:
        return None
    tasks = spec.evaluate.all_tasks
    return StageCall(
        "reference",
        {
            "evaluate": evaluate_identity(spec),
            "data": data_identity(spec),
            "system": spec.serve.system,
            "trust_remote_code": spec.base.trust_remote_code,
            "dtype": "bf16" if keys.gpu_visible() else "fp32",
        },
        {"model": model},
        package_versions("torch", "transformers", "lm-eval")
        | keys.versions("reference", tasks=tasks),
    )
