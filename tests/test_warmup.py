"""train.warmup_ratio reaches the Trainer as a count of optimizer steps, the count
transformers 5 makes of a ratio, so transformers 4 (which reads warmup_steps as a count
only) warms up too. Nothing here trains."""

from __future__ import annotations

import math

import pytest

from harness.stages.train import warmup_steps


@pytest.mark.parametrize(
    ("ratio", "examples", "batch", "accum", "epochs", "steps"),
    [
        (0.0, 400, 8, 1, 2, 0),
        (0.1, 400, 8, 1, 2, 10),  # 50 batches an epoch, 100 steps
        (0.1, 401, 8, 1, 1, 6),  # 51 batches: the last short batch is a step
        (0.05, 400, 8, 4, 1.5, 1),  # 13 steps an epoch (12 and a partial), 20 in all
        (0.5, 3, 8, 4, 1, 1),  # one batch, at least one step
    ],
)
def test_warmup_steps_count_optimizer_steps(ratio, examples, batch, accum, epochs, steps):
    assert warmup_steps(ratio, examples, batch, accum, epochs) == steps


def test_same_count_as_transformers_5_makes_of_a_ratio():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 reads warmup_steps as a count only")
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=0.1, use_cpu=True)
    total = math.ceil(2 * 50)
    assert warmup_steps(0.1, 400, 8, 1, 2) == args.get_warmup_steps(total)
