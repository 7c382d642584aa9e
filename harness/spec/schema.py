"""The experiment spec: one YAML file a user writes, validated before anything runs.

Every model forbids unknown keys, so a typo is an error rather than a silently
ignored setting. `load()` turns pydantic's errors into one line that names the
file, the line and the field (`quickstart.yaml:12: lora[1].r: ...`).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from harness import quant
from harness.chain import MEASUREMENTS, SERVED_MEASUREMENTS, TASKS
from harness.errors import SpecError
from harness.families import FAMILIES

DEFAULT_TOLERANCE = 0.05
"""The accuracy drop a task may lose when the spec does not say: five points, which a few
hundred items can show at the disagreement rates quantized small models have."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseRef(Strict):
    """Where the base model comes from; exactly one of the source keys."""

    model: str | None = Field(None, description="a bundled model name, e.g. smollm2-135m")
    hf: str | None = Field(None, description="a Hugging Face repo id, read from the local HF cache")
    path: Path | None = Field(None, description="a local Hugging Face model folder")
    gguf: Path | None = Field(None, description="a GGUF file, dequantized for training (lossy)")
    ollama: str | None = Field(
        None, description="an Ollama model, e.g. qwen2.5-coder:7b: trained on its verified HF base"
    )
    fallback: Literal["gguf"] | None = Field(
        None, description="with ollama: no HF base reachable -> its GGUF, dequantized (lossy)"
    )
    revision: str | None = Field(None, description="HF revision (with hf: or ollama:)")
    trust_remote_code: bool = False

    @field_validator("hf")
    @classmethod
    def _repo_id(cls, repo: str | None) -> str | None:
        """The hub's own rule, so a malformed id is this line and not its traceback."""
        if repo is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(repo)
            except HFValidationError as exc:
                raise ValueError(
                    f"{repo!r} is not a Hugging Face repo id, org/name ({exc})"
                ) from None
        return repo

    @model_validator(mode="after")
    def _one_source(self) -> BaseRef:
        sources = ("model", "hf", "path", "gguf", "ollama")
        given = [k for k in sources if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of model, hf, path or gguf (or ollama)"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.fallback and not self.ollama:
            raise ValueError("fallback: gguf applies to base: {ollama: ...} only")
        if self.revision and not (self.hf or self.ollama):
            raise ValueError("revision applies to base: {hf: ...} or {ollama: ...} only; drop it")
        return self


class DataSpec(Strict):
    """Training data: the built-in seeded arithmetic task or a JSONL file of your own."""

    task: Literal["arithmetic"] | None = None
    train: Path | None = Field(
        None, description="JSONL of chat ({messages}) or prompt/completion rows"
    )
    n_train: int = Field(400, gt=0)
    n_eval: int = Field(100, gt=0)
    seed: int = 1
    system: str | None = Field(None, description="system prompt added to every training example")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.task is None) == (self.train is None):
            raise ValueError("give exactly one of task or train")
        if self.task == "arithmetic" and self.n_train + self.n_eval > ARITHMETIC_PROBLEMS:
            raise ValueError(
                f"n_train + n_eval is {self.n_train + self.n_eval}, and the arithmetic task "
                f"has {ARITHMETIC_PROBLEMS} distinct problems (0..99 + or - 0..99); ask for fewer"
            )
        return self


ARITHMETIC_PROBLEMS = 100 * 100 * 2
"""Distinct problems `data.arithmetic` can draw; asking for more would never finish."""


class TrainSpec(Strict):
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(256, gt=8)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(
        0, ge=0, description="save LoRA weights + optimizer every N steps so a killed run resumes"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware has bf16 units, else fp32"
    )


class LoraSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    replay: Path | None = Field(
        None,
        description="JSONL of general prompts ({prompt} rows) mixed into this adapter's "
        "training set with the untuned base model's own greedy answers (self-replay): the "
        "adapter rehearses what the base already does, against forgetting",
    )

    def settings(self) -> dict[str, Any]:
        """What the adapter depends on: everything but its display name (and no `replay`
        key when there is none, so adapters trained before it existed keep their keys)."""
        return self.model_dump(
            mode="json", exclude={"name"} | ({"replay"} if self.replay is None else set())
        )


class ServeSpec(Strict):
    """How every cell is served: Ollama when one answers (auto), else llama.cpp's server."""

    backend: Literal["auto", "ollama", "llamacpp"] = "auto"
    system: str | None = None
    chat_template: str | None = Field(
        None,
        description="the chat template for training, serving and checking, in place of the "
        "model's own (a base model has none): a family (chatml, gemma, llama3) or a Jinja file",
    )
    parameters: dict[str, bool | int | float | str | list[str]] = Field(
        default_factory=lambda: {"temperature": 0, "num_ctx": 2048},
        description="Ollama option names: temperature, num_ctx, top_k, top_p, seed, ...",
    )
    slots: int = Field(
        1,
        gt=0,
        le=256,
        description="parallel requests (llama-server -np; llama.cpp's most: 256); one, as "
        "Ollama's default, keeps every answer reproducible",
    )
    keep: bool = Field(
        False,
        description="leave each cell's model in Ollama after measuring (`forgebench clean` "
        "removes them); the llama.cpp backend cannot keep a model",
    )

    @field_validator("system")
    @classmethod
    def _fits_a_modelfile(cls, system: str | None) -> str | None:
        """The Ollama backend writes the deployment as a Modelfile, whose parser ends a
        triple-quoted SYSTEM at the first three quotes and knows no escapes."""
        if system is not None and ('"""' in system or system.endswith('"')):
            raise ValueError(
                'a system prompt holding """ or ending in " cannot be written to an Ollama '
                "Modelfile; use other quotes"
            )
        return system


class EvalTaskSpec(Strict):
    """A user's own question/answer JSONL ({"question", "answer"} rows) and how replies are
    scored: `exact` (the stripped reply is the answer), `contains` (the answer occurs in the
    reply), `last_number` (the reply's last number), `regex` (the pattern's first group)."""

    name: str = Field(pattern=NAME_PATTERN)
    path: Path
    scorer: Literal["exact", "contains", "last_number", "regex"] = "exact"
    regex: str | None = Field(None, description="with scorer: regex, the pattern to extract")

    @model_validator(mode="after")
    def _regex_given(self) -> EvalTaskSpec:
        if (self.scorer == "regex") != (self.regex is not None):
            raise ValueError("give `regex:` exactly when scorer is regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self

    @field_validator("name")
    @classmethod
    def _not_builtin(cls, name: str) -> str:
        """Scores are logged by task name (`<name>_accuracy`), and the gate and the verdict
        compare runs by it: a task of one's own must not pass for a built-in one."""
        if name in typing.get_args(BuiltinTask):
            raise ValueError(
                f"{name!r} is a built-in task's name, and its scores would be logged as that "
                f"task's ({name}_accuracy); name yours otherwise, or list {name} on its own"
            )
        return name


BuiltinTask = Literal["arithmetic", "gsm8k", "capitals"]


class EvaluateSpec(Strict):
    tasks: list[BuiltinTask | EvalTaskSpec] = Field(default_factory=lambda: ["arithmetic"])
    guard: list[BuiltinTask | EvalTaskSpec] = Field(
        default_factory=list,
        description="tasks the adapter must not hurt: significantly worse than the untuned "
        "base is 'stupid (training: forgetting)'",
    )
    limit: int | None = Field(None, gt=0, description="items per task (all when unset)")
    concurrency: int = Field(
        1,
        gt=0,
        description="requests in flight; above 1 llama-server batches them, and batched "
        "answers are not item by item reproducible",
    )

    @property
    def all_tasks(self) -> list[str | EvalTaskSpec]:
        """What is scored: the tasks, then the guard tasks."""
        return [*self.tasks, *self.guard]

    @model_validator(mode="after")
    def _names_once(self) -> EvaluateSpec:
        names = [t if isinstance(t, str) else t.name for t in self.all_tasks]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(
                f"task named twice in tasks and guard: {', '.join(dupes)}; list it once"
            )
        return self


class BenchSpec(Strict):
    warmup: int = Field(1, ge=0)
    repeats: int = Field(
        2,
        gt=0,
        description="passes over the fixed prompt set (6 prompts): 12 requests bound the "
        "median decode rate between their 3rd smallest and 3rd largest at 95%",
    )
    max_tokens: int = Field(64, gt=1)


class DriftSpec(Strict):
    ctx: int = Field(512, gt=16)
    chunks: int = Field(6, gt=0)


RENAMED_BUDGETS = {
    "accuracy_drop_max": "a drop is judged against budgets.tolerance (per task) with an "
    "interval, not a point estimate; write tolerance: <fraction>",
    "significance": "bounds are stated by budgets.confidence (0.95 for significance 0.05)",
}


class BudgetSpec(Strict):
    """When a cell is "slow" (misses a speed or memory budget) or "stupid" (loses accuracy
    beyond a task's tolerance, shown at the stated confidence, or drifts from its F16)."""

    decode_tps_min: float | None = Field(
        None,
        gt=0,
        description="slow if the median decode tok/s of the bench's fixed-length requests is "
        "surely below (its upper bound at the stated confidence is)",
    )
    decode_speedup_min: float | None = Field(
        None,
        gt=0,
        description="slow if the median decode is surely below this many times the median of "
        "the F16 of the same adapter and route, measured in the same run (means the same on "
        "every CPU)",
    )
    ttft_ms_p95_max: float | None = Field(
        None,
        gt=0,
        description="slow if the p95 time to first token of the bench's requests is surely "
        "above (its lower bound at the stated confidence is); bounding a p95 at 95% takes 59 "
        "requests",
    )
    memory_mb_max: float | None = Field(None, gt=0, description="slow if peak memory is above")
    tolerance: float | dict[str, float] = Field(
        DEFAULT_TOLERANCE,
        description="the accuracy drop a task may lose, as a fraction: one for every task, "
        "or per task name ({arithmetic: 0.1, default: 0.05})",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="of every one-sided bound: an ok link's drop is below its tolerance, a "
        "stupid cell's beyond it, at this confidence (run-wide, by Holm, for stupid)",
    )
    min_gain: float = Field(
        0.0, ge=0, lt=1, description="training must surely raise a target task by more"
    )
    kld_max: float | None = Field(None, gt=0, description="stupid if mean KLD from F16 is above")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for old, new in RENAMED_BUDGETS.items():
                if old in raw:
                    raise ValueError(f"budgets.{old} is gone: {new}")
        return raw

    @field_validator("tolerance")
    @classmethod
    def _fractions(cls, tolerance: float | dict[str, float]) -> float | dict[str, float]:
        values = tolerance.values() if isinstance(tolerance, dict) else [tolerance]
        if any(not 0 < v < 1 for v in values):
            raise ValueError("a tolerance is a fraction of the items, above 0 and below 1")
        return tolerance

    def tolerance_of(self, task: str) -> float:
        if isinstance(self.tolerance, dict):
            return self.tolerance.get(task, self.tolerance.get("default", DEFAULT_TOLERANCE))
        return self.tolerance


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins")


class Resources(Strict):
    """What one task asks of a Ray node (Ray's own units: CPUs, GPUs, bytes of memory)."""

    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0, description="reserved memory; none by default")


class ExecutorSpec(Strict):
    """Where the cells run: in this process (`serial`) or as tasks on a Ray cluster."""

    kind: Literal["serial", "ray"] = "serial"
    address: str | None = Field(
        None, description="a Ray cluster (host:port or auto); a local one is started if unset"
    )
    resources: dict[Literal[(*TASKS, "serve")], Resources] = Field(
        default_factory=dict,
        description="per stage, and `serve` for a cell's served stages (default: 1 CPU each; "
        "a cell that benches takes a whole node)",
    )


class Spec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    base: BaseRef
    data: DataSpec
    train: TrainSpec = TrainSpec()
    lora: list[LoraSpec] = Field(min_length=1)
    quant: list[str] = Field(min_length=1)
    route: list[Literal["merge", "adapter"]] = Field(
        default_factory=lambda: ["merge"],
        min_length=1,
        description="merge: the adapter merged into the base, then converted and quantized; "
        "adapter: the base GGUF at each level served with the LoRA as its own GGUF",
    )
    control: bool = Field(True, description="also run the untuned base at every quant level")
    measure: list[Literal[MEASUREMENTS]] = Field(
        default_factory=lambda: list(MEASUREMENTS),
        description="what to measure on every cell once its GGUF exists",
    )
    serve: ServeSpec = ServeSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    bench: BenchSpec = BenchSpec()
    drift: DriftSpec = DriftSpec()
    budgets: BudgetSpec = BudgetSpec()
    tracking: TrackingSpec = TrackingSpec()
    executor: ExecutorSpec = ExecutorSpec()
    _source: tuple[Path, yaml.Node | None] | None = PrivateAttr(None)
    """The file and YAML tree `load` read, so checks made later can name the line."""

    @property
    def serves(self) -> bool:
        """Whether a measurement deploys the cells' models (a backend is needed)."""
        return bool(set(SERVED_MEASUREMENTS) & set(self.measure))

    def where(self, *loc: str | int) -> str:
        """`spec.yaml:12: serve.parameters.num_ctx`: where a setting is, for a message about
        it from a check after `load` (preflight); just the dotted name for a spec built in code."""
        if self._source is None:
            return _dotted(loc)
        path, root = self._source
        return f"{path}:{_line_of(root, loc)}: {_dotted(loc)}"

    @model_validator(mode="after")
    def _budgets_are_measured(self) -> Spec:
        needs = {
            "decode_tps_min": "bench",
            "decode_speedup_min": "bench",
            "ttft_ms_p95_max": "bench",
            "memory_mb_max": "bench",
            "kld_max": "drift",
        }
        for budget, measurement in needs.items():
            if getattr(self.budgets, budget) is not None and measurement not in self.measure:
                raise ValueError(
                    f"budgets.{budget} is set but measure leaves out "
                    f"{measurement}: add it to measure or drop the budget"
                )
        return self

    @model_validator(mode="after")
    def _tolerances_name_tasks(self) -> Spec:
        if isinstance(self.budgets.tolerance, dict):
            tasks = [t if isinstance(t, str) else t.name for t in self.evaluate.all_tasks]
            if unknown := sorted(set(self.budgets.tolerance) - {*tasks, "default"}):
                raise ValueError(
                    f"budgets.tolerance names {', '.join(unknown)}, not a task of evaluate; "
                    f"name one of {', '.join(tasks)} or default"
                )
        return self

    @field_validator("quant")
    @classmethod
    def _known_levels(cls, levels: list[str]) -> list[str]:
        canonical = [quant.check(level) for level in levels]
        dupes = sorted({lv for lv in canonical if canonical.count(lv) > 1})
        if dupes:
            raise ValueError(f"quant level listed twice: {', '.join(dupes)}")
        return canonical

    @field_validator("route")
    @classmethod
    def _routes_once(cls, routes: list[str]) -> list[str]:
        if len(set(routes)) != len(routes):
            raise ValueError("route listed twice: list each of merge and adapter at most once")
        return routes

    @field_validator("lora")
    @classmethod
    def _unique_names(cls, loras: list[LoraSpec]) -> list[LoraSpec]:
        names = [lo.name for lo in loras]
        if "base" in names:
            raise ValueError("'base' names the untuned control cells; pick another LoRA name")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"LoRA name used twice: {', '.join(dupes)}; names must be unique")
        return loras


def load(path: Path | str) -> Spec:
    """Read and validate a spec; relative paths in it are taken from the spec's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text; save the spec as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}:1: a spec is a YAML mapping with name, base, data, lora and quant")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        errors = _meant(exc.errors(), raw)
        err = errors[0]
        loc = tuple(part for part in err["loc"] if not _union_member(part))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = err["msg"].removeprefix("Value error, ")
        raise SpecError(
            f"{path}:{_line_of(root, loc)}: {_dotted(loc) or 'spec'}: {message}{more}"
        ) from None
    spec = _resolve_paths(spec, path.parent)
    spec._source = (path, root)
    return spec


def _resolve_paths(spec: Spec, folder: Path) -> Spec:
    def absolute(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (folder / p).resolve()

    base = spec.base.model_copy(
        update={"path": absolute(spec.base.path), "gguf": absolute(spec.base.gguf)}
    )
    data = spec.data.model_copy(update={"train": absolute(spec.data.train)})

    def tasks(items: list) -> list:
        return [
            t if isinstance(t, str) else t.model_copy(update={"path": absolute(t.path)})
            for t in items
        ]

    evaluate = spec.evaluate.model_copy(
        update={"tasks": tasks(spec.evaluate.tasks), "guard": tasks(spec.evaluate.guard)}
    )
    template = spec.serve.chat_template
    if template is not None and template not in FAMILIES:  # a file, relative to the spec
        template = str(absolute(Path(template)))
    serve = spec.serve.model_copy(update={"chat_template": template})
    loras = [lora.model_copy(update={"replay": absolute(lora.replay)}) for lora in spec.lora]
    return spec.model_copy(
        update={"base": base, "data": data, "evaluate": evaluate, "serve": serve, "lora": loras}
    )


def _union_member(part: str | int) -> bool:
    """A location part pydantic adds for one member of a union: `literal['arithmetic',...]`,
    `function-after[_regex_given(), EvalTaskSpec]`, `EvalTaskSpec`."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper())


def _meant(errors: list[dict], raw: Any) -> list[dict]:
    """Of a union's members' errors, those of the member the input was written as: a task
    given as a mapping is a task of one's own, so "should be 'arithmetic'" would mislead."""

    def written_as(err: dict) -> bool:
        value = raw
        for part in err["loc"]:
            if _union_member(part):
                return part.startswith("literal[") == isinstance(value, str)
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                return True
        return True

    return [err for err in errors if written_as(err)] or errors


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: yaml.Node | None, loc: tuple) -> int:
    """The 1-based line of the deepest YAML node that `loc` reaches."""
    line = node.start_mark.line + 1 if node else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
            if child is None:  # unknown key: point at the key itself
                child = next((k for k, _ in node.value if k.value == part), None)
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line
