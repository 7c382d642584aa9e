"""The train stage asks the model for logits only at the positions whose next token is a
label (the answer), not over the whole sequence. That must be the same loss and the same
gradients as the model's own loss over every position, or the speed-up trains another
model. Checked on a tiny Llama built from a config here (random weights, no download),
with examples of different lengths so that padding and the union of answer positions
across a batch both come into play."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.stages.train import IGNORE, Collator

PAD = 0


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def example(prompt: int, answer: int, offset: int) -> dict[str, list[int]]:
    ids = [(offset + 7 * i) % 96 + 1 for i in range(prompt + answer)]
    return {"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]}


BATCH = [example(9, 3, 1), example(5, 2, 2), example(12, 4, 3), example(6, 1, 4)]


def full_batch(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """The plain way: every position's logits, the model shifting the labels itself."""
    width = max(len(ex["input_ids"]) for ex in examples)
    pads = [width - len(ex["input_ids"]) for ex in examples]
    return {
        "input_ids": torch.tensor(
            [ex["input_ids"] + [PAD] * n for ex, n in zip(examples, pads, strict=True)]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(ex["input_ids"]) + [0] * n for ex, n in zip(examples, pads, strict=True)]
        ),
        "labels": torch.tensor(
            [ex["labels"] + [IGNORE] * n for ex, n in zip(examples, pads, strict=True)]
        ),
    }


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_answer_only_logits_give_the_full_loss_and_its_gradients():
    model = tiny_llama()
    collate = Collator(pad_id=PAD)
    ours = collate(BATCH)
    width = ours["input_ids"].shape[1]
    assert 0 < len(ours["logits_to_keep"]) < width - 1  # fewer positions than the sequence

    plain_loss, plain_grads = loss_and_grads(model, full_batch(BATCH))
    loss, grads = loss_and_grads(model, ours)
    assert loss == pytest.approx(plain_loss.item(), rel=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_the_collator_keeps_every_label_and_counts_the_padding():
    collate = Collator(pad_id=PAD)
    ours = collate(BATCH)
    answers = sum(sum(label != IGNORE for label in ex["labels"]) for ex in BATCH)
    assert int((ours["labels"] != IGNORE).sum()) == answers
    assert collate.tokens == sum(len(ex["input_ids"]) for ex in BATCH)
    assert collate.padding == 4 * 16 - collate.tokens
