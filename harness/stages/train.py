"""train: base + data + one LoRA config -> a peft adapter (safetensors) and its training curve.

Spec keys: `data.*`, `train.*` and one entry of `lora:`; with `resume_from:` the adapter
starts from an earlier one's weights and settings (last night's, to train on tonight's data).

Built on the transformers `Trainer` rather than TRL's `SFTTrainer`: the only
SFT feature needed is a loss on the assistant's answer alone, and that is a
label mask computed here from the model's own chat template (TRL does it only
for templates carrying `{% generation %}` markers, which most do not). The
Trainer brings seeding, gradient accumulation, schedulers, mixed precision and
checkpointing without another dependency.

Speed: batches are grouped by length (less padding) and, where the hardware
has bf16 units (any CUDA GPU; CPUs with AVX512-BF16 or AMX, their AVX-512 kernels
not turned off), the forward and backward passes run under bf16 autocast while the
weights and optimizer stay in fp32. `precision: fp32` turns that off.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from harness import data as datasets
from harness.data import hygiene, replay
from harness.errors import ForgebenchError, StageError
from harness.sources import adapters, templates
from harness.stages import Progress

VERSION = 3  # bump when this stage's outputs change: tests/test_keys.py checks it

IGNORE = -100
"""The label of a token the loss skips (the prompt, padding), as PyTorch's cross entropy
and transformers' loss functions take it."""

# peft still reads a property transformers 5 deprecates: a warning the user can do
# nothing about, printed into the middle of the progress display
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run(
    settings: dict[str, Any],
    inputs: dict[str, Path],
    out: Path,
    progress: Progress,
    scratch: Path | None = None,
    checkpoint_every: int = 0,
) -> dict:
    """With `scratch` and `checkpoint_every`, checkpoints (adapter, optimizer, scheduler and
    RNG states) go to `scratch`, and a rerun after a kill resumes from the latest one."""
    train, lora = settings["train"], settings["lora"]
    base_dir = inputs["base"] / "model"
    trust = settings["trust_remote_code"]
    progress("loading the base model", None)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust)
    conversations = datasets.training_set(settings["data"])

    torch.manual_seed(train["seed"])
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=trust
    )
    replayed = []
    if lora.get("replay"):
        prompts = replay.prompts(Path(lora["replay"]))
        progress(f"answering {len(prompts)} replay prompts with the base model", None)
        replayed = self_replay(model, tokenizer, prompts, settings["data"].get("system"))
    examples = tokenize(tokenizer, conversations + replayed, train["max_seq_len"])
    seen = None
    if lora.get("resume_from"):
        model = continued(model, Path(lora["resume_from"]), progress)
        seen = hygiene.seen_before(conversations, Path(lora["resume_from"]))
    else:
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                target_modules=lora["target_modules"],
                bias=lora["bias"],
                task_type="CAUSAL_LM",
            ),
        )
    trainable, total = model.get_nb_trainable_parameters()

    bf16 = use_bf16(train["precision"])
    collate = Collator(
        pad_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id
    )
    curve = Curve(progress)
    args = TrainingArguments(
        output_dir=str(scratch or out / "trainer"),
        num_train_epochs=train["epochs"],
        learning_rate=train["lr"],
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"],
        warmup_steps=warmup_steps(
            train["warmup_ratio"],
            len(examples),
            train["batch_size"],
            train["grad_accum"],
            train["epochs"],
        ),
        weight_decay=train["weight_decay"],
        seed=train["seed"],
        data_seed=train["seed"],
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length",
        logging_steps=1,
        save_strategy="steps" if scratch and checkpoint_every else "no",
        save_steps=checkpoint_every or 500,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[curve]
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through `progress`, not print
    resume = get_last_checkpoint(str(scratch)) if scratch and scratch.is_dir() else None
    if resume:
        progress(f"resuming from {Path(resume).name}", None)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started

    model.save_pretrained(out / "adapter")
    if replayed:  # what the adapter rehearsed, to read beside its scores
        with (out / "replay.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"messages": chat}) + "\n" for chat in replayed)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    # the whole curve, including the steps before a resume
    points = [(e["step"], float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    if not points or not all(math.isfinite(loss) for _, loss in points):
        raise StageError("training produced no finite loss; lower train.lr or check the data")
    return {
        "train_examples": len(examples),
        "train_replay_examples": len(replayed),
        "train_tokens": collate.tokens,
        "train_padding_fraction": round(
            collate.padding / max(1, collate.tokens + collate.padding), 4
        ),
        "train_seconds": round(seconds, 2),
        "train_tokens_per_s": round(collate.tokens / seconds, 1),
        "train_final_loss": points[-1][1],
        "trainable_params": trainable,
        "total_params": total,
        "train_bf16": int(bf16),
        "train_resumed_from_step": int(resume.rsplit("-", 1)[-1]) if resume else 0,
        **({} if seen is None else {"train_rows_seen_before": seen}),
        "loss_curve": points,
    }


def continued(model, parent: Path, progress: Progress):
    """The base with an earlier adapter's weights, trainable: tonight's training goes on from
    last night's adapter (its r, alpha and target modules; a fresh optimizer). Its tensors are
    checked against the base first, so one trained for another base is one line."""
    progress(f"continuing from the adapter in {parent}", None)
    try:
        adapter = adapters.read(parent)
    except ForgebenchError as exc:
        raise StageError(f"lora.resume_from: {exc}") from None
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if why := adapters.misfit(adapter, adapters.tensor_shapes(adapter.weights), shapes):
        raise StageError(
            f"lora.resume_from: the adapter in {parent} was not trained on this base: {why}"
        )
    return PeftModel.from_pretrained(model, parent, is_trainable=True)


REPLAY_TOKENS = 24
"""The longest replay answer generated, in tokens: a replayed example rehearses the base's
manner of answering, which its first line shows."""
REPLAY_BATCH = 40


def self_replay(model, tokenizer, prompts: list[str], system: str | None) -> list:
    """Each prompt with the untuned base's own greedy answer (its first line, as the guard
    tasks read answers), ready to mix into the training set.

    Rehearsing the base's own outputs keeps an adapter from unlearning how the base
    answers things outside the target task (the quickstart's arithmetic adapters otherwise
    forget capitals: they start answering in bare words), with no general dataset to ship
    and nothing the base did not already know. Prompts whose answer is empty are dropped."""
    head = [{"role": "system", "content": system}] if system else []
    chats = [[*head, {"role": "user", "content": prompt}] for prompt in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    replayed = []
    model.eval()  # as loaded; the Trainer switches it to training mode itself
    try:
        with torch.inference_mode():
            for start in range(0, len(chats), REPLAY_BATCH):
                batch = chats[start : start + REPLAY_BATCH]
                encoded = tokenizer.apply_chat_template(
                    batch,
                    add_generation_prompt=True,
                    padding=True,
                    return_tensors="pt",
                    return_dict=True,
                )
                out = model.generate(
                    **encoded, max_new_tokens=REPLAY_TOKENS, do_sample=False, pad_token_id=pad
                )
                for chat, row in zip(batch, out[:, encoded["input_ids"].shape[1] :], strict=True):
                    answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                    answer = answer.split("\n", 1)[0].strip()
                    if answer:
                        replayed.append([*chat, {"role": "assistant", "content": answer}])
    finally:
        tokenizer.padding_side = side
    return replayed


def warmup_steps(ratio: float, examples: int, batch_size: int, grad_accum: int, epochs) -> int:
    """train.warmup_ratio as a number of optimizer steps, counted as transformers' Trainer
    counts them (one process: ceil(examples / batch) batches an epoch, an optimizer step per
    grad_accum of them, at least one), rounded up as transformers 5 rounds a ratio passed as
    warmup_steps. transformers 4 reads warmup_steps as a count only, so passing the ratio
    itself meant no warmup there."""
    batches = math.ceil(examples / batch_size)
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return math.ceil(ratio * math.ceil(epochs * per_epoch))


def tokenize(tokenizer, conversations: list, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Token ids with labels only on the final assistant turn (IGNORE elsewhere).

    The prompt part is the template rendered up to the generation prompt; it
    must be a prefix of the full rendering, which holds for every sane chat
    template, and is checked because a template that breaks it would silently
    train on the wrong tokens.
    """
    if not tokenizer.chat_template:
        # resolve refuses such a model before this; kept as a guard
        raise StageError(templates.missing(tokenizer.name_or_path or "the model"))
    examples = []
    for conversation in conversations:
        prompt = _ids(tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True))
        full = _ids(tokenizer.apply_chat_template(conversation))
        if full[: len(prompt)] != prompt:
            raise StageError(
                "the chat template renders the prompt differently inside the full "
                "conversation; cannot mask the loss to the answer"
            )
        full = full[:max_seq_len]
        labels = ([IGNORE] * len(prompt) + full[len(prompt) :])[:max_seq_len]
        if all(label == IGNORE for label in labels):
            raise StageError(f"an example's prompt is longer than train.max_seq_len={max_seq_len}")
        examples.append({"input_ids": full, "labels": labels})
    return examples


def _ids(rendered) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def use_bf16(precision: str) -> bool:
    """bf16 autocast where it is fast: a CUDA GPU that has it, or a CPU with bf16 units
    whose AVX-512 kernels torch dispatches to. Held to AVX2 kernels (`ATEN_CPU_CAPABILITY`)
    bf16 is emulated, slower than fp32: training runs as on an AVX2-only CPU."""
    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Collator:
    """Pads a batch to its longest example, counts real vs padding tokens, and asks the
    model for logits only where the loss reads them.

    The loss is on the answer alone, a few tokens at the end of each example, but a causal
    LM projects every position onto the whole vocabulary (49,152 rows for SmolLM2: a fifth
    of the model's multiply-adds, and a softmax over each). So the batch carries
    `logits_to_keep`, the positions that predict some row's label, and the labels already
    shifted to those positions (`shift_labels`): the model's own loss function then averages
    over exactly the tokens it did before, at a fraction of the head's cost."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0
        self.padding = 0

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids, labels, mask = [], [], []
        for ex in batch:
            pad = width - len(ex["input_ids"])
            ids.append(ex["input_ids"] + [self.pad_id] * pad)
            labels.append(ex["labels"] + [IGNORE] * pad)
            mask.append([1] * len(ex["input_ids"]) + [0] * pad)
            self.tokens += len(ex["input_ids"])
            self.padding += pad
        # position i predicts token i + 1; the last position predicts nothing
        targets = torch.tensor(labels)[:, 1:]
        keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
        shifted = targets[:, keep].contiguous()
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": shifted,
            "shift_labels": shifted,
            "logits_to_keep": keep,
        }


class Curve(TrainerCallback):
    """Reports the loss at every logging step as progress."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress(
                f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.3f}",
                state.global_step / max(1, state.max_steps),
            )
