"""The spec's sections: where the base comes from, the data, training, the adapters,
evaluation, benching, drift, tracking and the executor.

They live apart from `Spec`, which puts them together, so each file stays one concern;
`Strict` is here because every section and the spec itself build on it.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.chain import TASKS

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
    """One adapter of the matrix: a LoRA config to train, the same continued from an earlier
    adapter (`resume_from`), or a peft adapter trained elsewhere (`path`), which is taken as it
    is: its settings are its adapter_config.json's."""

    name: str = Field(pattern=NAME_PATTERN)
    r: int | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    replay: Path | None = Field(
        None,
        description="JSONL of general prompts ({prompt} rows) mixed into this adapter's "
        "training set with the untuned base model's own greedy answers (self-replay): the "
        "adapter rehearses what the base already does, against forgetting",
    )
    path: Path | None = Field(
        None,
        description="a peft LoRA adapter folder trained elsewhere (Unsloth, axolotl, TRL, a "
        "peft script): not trained, checked against the base and measured like the others",
    )
    resume_from: str | None = Field(
        None,
        description="an earlier adapter to continue training from, on this spec's data, "
        "with a fresh optimizer (r, alpha and target modules are its own): a peft adapter "
        "folder, or a run that trained one: NAME@ALIAS, EXPERIMENT:CELL or a run id",
    )

    @model_validator(mode="after")
    def _one_way(self) -> LoraSpec:
        """Settings the adapter folder already fixes are refused rather than ignored: a
        value given beside `path` or `resume_from` would silently not be the one used."""
        given = self.model_fields_set
        if self.path is not None and self.resume_from is not None:
            raise ValueError(
                "give path (an adapter to measure as it is) or resume_from (one to train "
                "further), not both"
            )
        folder = "path" if self.path is not None else "resume_from" if self.resume_from else ""
        if folder == "resume_from" and names_a_run(self.resume_from):
            folder = ""  # its settings start a first night, and must agree with a parent
        fixed = {"r", "alpha", "target_modules", "bias", "dropout"}
        if folder == "path":
            fixed.add("replay")
        if folder and (clash := sorted(given & fixed)):
            raise ValueError(
                f"{', '.join(clash)}: the adapter folder's adapter_config.json fixes "
                f"{'it' if len(clash) == 1 else 'them'} with {folder}; drop "
                f"{'it' if len(clash) == 1 else 'them'}"
            )
        if (
            not folder
            and self.resume_from is None
            and (
                missing := [k for k in ("r", "alpha", "target_modules") if getattr(self, k) is None]
            )
        ):
            raise ValueError(
                f"give {', '.join(missing)} (a LoRA config to train), or path: a peft "
                "adapter folder trained elsewhere"
            )
        return self

    @property
    def adopted(self) -> bool:
        """Taken as it is from `path`, not trained here."""
        return self.path is not None

    def settings(self) -> dict[str, Any]:
        """What the adapter depends on: everything but its display name (and no `replay`,
        `path` or `resume_from` key when there is none, so adapters trained before they
        existed keep their keys)."""
        unset = {k for k in ("replay", "path", "resume_from") if getattr(self, k) is None}
        if self.resume_from is not None:
            unset |= {"r", "alpha", "target_modules", "bias", "dropout"}
        return self.model_dump(mode="json", exclude={"name"} | unset)


RUN_REFERENCE = re.compile(r"^(models:/)?[^/@\s]+@[^/@\s]+$|^[^/:\s]+:[^/:\s]+$|^[0-9a-f]{32}$")
"""How `resume_from` names a run rather than a folder: NAME@ALIAS (a registered model's
alias), EXPERIMENT:CELL (that cell in the experiment's latest run) or an MLflow run id."""


def names_a_run(value: str) -> bool:
    return bool(RUN_REFERENCE.match(value))


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


class LoadSpec(Strict):
    """The load benchmark (`measure: [load]`, harness/stages/load.py)."""

    concurrency: list[int] = Field(
        default_factory=list,
        description="concurrent streams to drive the server at (default: 1, 2, 4, ... up to "
        "the setting's slots, and the slots)",
    )
    requests: int = Field(3, gt=0, description="requests each stream sends, one after another")
    repeats: int = Field(3, gt=0, description="times each concurrency is driven")
    max_tokens: int = Field(32, gt=1, description="tokens every request decodes")
    rates: list[float] = Field(
        default_factory=list,
        description="request rates (requests/s) to drive at with random (Poisson) arrivals",
    )
    arrivals: int = Field(12, gt=0, description="requests sent at each rate")

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError("list each concurrency once, each at least 1")
        return sorted(values)

    @field_validator("rates")
    @classmethod
    def _rates(cls, values: list[float]) -> list[float]:
        if any(v <= 0 for v in values):
            raise ValueError("a rate is requests per second, above 0")
        return values


class DriftSpec(Strict):
    ctx: int = Field(512, gt=16)
    chunks: int = Field(6, gt=0)
    task: bool = Field(
        False,
        description="also on the task's own text (the first evaluated task's items with "
        "their answers): a general text can hide what a level or an imatrix does to the task",
    )


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
