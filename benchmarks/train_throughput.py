"""Training throughput: forgebench's train stage against a plain peft + PyTorch loop.

Both train the quickstart's r16-qkvo LoRA on SmolLM2-135M over the same
examples, in this one process, one after the other; the figure is useful
(non-padding) tokens per second of the training loop itself (model loading
excluded), and the table gives the ratio. Target: >= 1.2x on every CPU, so
`--precision fp32` measures the stage as it runs on a CPU without bf16 units
(the stage picks bf16 autocast by itself where the CPU has them). The stage is
run through its own `train.run`, never a copy of its loop; the CPU's vector
flags are printed, since they decide which kernels both loops get.

    tox -e forgebench -- bench        # or: python benchmarks/train_throughput.py --examples 240
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import data, host, spec
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import executor, outcomes
from harness.stages import train

ROOT = Path(__file__).resolve().parents[1]


def base_model(store: Store) -> Path:
    """The quickstart's resolved base, built into the store if it is not there yet."""
    quickstart = spec.load(ROOT / "experiments" / "quickstart.yaml")
    return executor.ensure(planning.plan(quickstart)[0].calls["resolve"], store, outcomes.Quiet())


def plain_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict:
    """What a plain loop feeds the model: padded ids, mask and labels, the loss computed by
    the model over every position's logits."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids, mask, labels = [], [], []
    for ex in examples:
        pad = width - len(ex["input_ids"])
        ids.append(ex["input_ids"] + [pad_id] * pad)
        mask.append([1] * len(ex["input_ids"]) + [0] * pad)
        labels.append(ex["labels"] + [train.IGNORE] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def plain_loop(base_dir: Path, settings: dict) -> float:
    """The reference: fp32, shuffled batches padded to their longest example."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "model")
    examples = train.tokenize(tokenizer, data.training_set(settings["data"]), 256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir / "model", dtype=torch.float32)
    lora = settings["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    batch_size = settings["train"]["batch_size"]
    tokens = 0
    started = time.perf_counter()
    for _epoch in range(int(settings["train"]["epochs"])):
        for i in range(0, len(order), batch_size):
            chosen = [examples[j] for j in order[i : i + batch_size]]
            tokens += sum(len(ex["input_ids"]) for ex in chosen)
            loss = model(**plain_batch(chosen, tokenizer.pad_token_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return tokens / (time.perf_counter() - started)


def vector_flags() -> str:
    """The CPU's vector extensions that decide the kernels (bf16 units or not)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + " ".join(wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--store", type=Path, default=Path(".forgebench") / "store")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the stage's train.precision; fp32 measures a CPU without bf16 units",
    )
    args = parser.parse_args()

    quickstart = spec.load(ROOT / "experiments" / "quickstart.yaml")
    r16 = next(lo for lo in quickstart.lora if lo.name == "r16-qkvo")
    settings = {
        "lora": r16.settings(),
        "train": {
            **quickstart.train.model_dump(mode="json"),
            "epochs": 1,
            "precision": args.precision,
        },
        "data": {**quickstart.data.model_dump(mode="json"), "n_train": args.examples},
        "trust_remote_code": False,
    }
    base_dir = base_model(Store(args.store))
    console = Console()
    console.print(f"reference: plain peft + PyTorch loop, {args.examples} examples ...")
    reference = plain_loop(base_dir, settings)
    console.print("forgebench train stage ...")
    with tempfile.TemporaryDirectory() as out:
        metrics = train.run(settings, {"base": base_dir}, Path(out), lambda *_: None)
    ours = metrics["train_tokens_per_s"]

    table = Table(
        title=f"training throughput, SmolLM2-135M LoRA r16 ({platform.node()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__})"
    )
    table.add_column("loop")
    table.add_column("useful tokens/s", justify="right")
    table.add_column("padding", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("plain peft + PyTorch, fp32", f"{reference:.0f}", "", "1.00x")
    precision = "bf16 autocast" if metrics["train_bf16"] else "fp32"
    table.add_row(
        f"forgebench ({precision}, length-grouped, answer logits only)",
        f"{ours:.0f}",
        f"{metrics['train_padding_fraction']:.1%}",
        f"{ours / reference:.2f}x",
    )
    console.print(table)
    console.print(f"machine: {host.machine()}; vector flags: {vector_flags()}")
    console.print(f"threads: {torch.get_num_threads()}; target >= 1.20x")


if __name__ == "__main__":
    main()
