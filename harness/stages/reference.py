"""reference: the eval tasks scored in PyTorch, on the HF model a cell's GGUFs are made from.

Spec keys: `evaluate.*`, `data`, `serve.system`; the chat template is the model folder's
own (resolve wrote the spec's into it). The untuned base (resolve's folder) and each
merged adapter (merge's folder) are scored with transformers through lm-eval's own `hf`
model, on the same items, with the same task YAML (prompt, stop strings, token limit,
scorer), the same chat template and greedy decoding as the served cells. That is the
start of the blame chain: untuned HF -> tuned HF is what training did, tuned HF -> F16
GGUF what the export did, F16 -> each level what quantization did.

The model runs in fp32 on the CPU (what the F16 GGUF approximates, with no bf16
rounding of its own) and in bf16 on a GPU. Generation is batched (left padding), so
a 100-item task costs a few batched passes, not 100 sequential ones.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

from harness.data import evals
from harness.stages import Progress
from harness.stages.evaluate import score, scored_tasks

VERSION = 1

BATCH_SIZE = 16
"""Items generated together; SmolLM2-135M on 2 cores takes about as long per batch of 16
as per item, and memory is far from the limit at that size."""


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = inputs["model"] / "model"
    trust = settings["trust_remote_code"]
    progress("loading the HF model", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    cuda = settings["dtype"] == "bf16"  # a GPU was visible when the run was planned
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=trust
    ).eval()
    # HFLM warns that a model object (ours: fp32, our chat template) skips its own loading
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = HFLM(
        pretrained=model.to("cuda" if cuda else "cpu"),
        tokenizer=tokenizer,
        batch_size=BATCH_SIZE,
        device="cuda" if cuda else "cpu",
    )
    # its request bar ignores TQDM_DISABLE and would garble the run's own progress
    lm.generate_until = functools.partial(lm.generate_until, disable_tqdm=True)
    with tempfile.TemporaryDirectory(prefix="forgebench-ref-") as tmp:
        tasks = evals.prepare(scored_tasks(settings), settings["data"], Path(tmp))
        progress(f"PyTorch reference: {', '.join(t.name for t in tasks)}", None)
        metrics, _ = score(
            lm, tasks, settings["evaluate"]["limit"], out, system=settings.get("system")
        )
    return metrics
