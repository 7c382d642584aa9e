"""The blame chain on the real chain: an adapter trained on corrupted labels (every capital
swapped for another country's) is "stupid (training: no gain)" at F16 and at every level,
against the untuned base, on a task the base does well (the bundled capitals task). Before
the chain existed its cells were "ok": they match their own F16. MLflow holds every link,
with its interval."""

from __future__ import annotations

import json
import random

import pytest
from conftest import scratch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from harness.cli import app
from harness.data import evals

pytestmark = pytest.mark.slow

SPEC = """\
name: blame
base: {{model: smollm2-135m}}
data: {{train: {train}}}
train: {{epochs: 2, lr: 5.0e-4, batch_size: 8, max_seq_len: 96, seed: 0}}
lora:
  - {{name: swapped, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
quant: [f16, q8_0]
control: false
measure: [check, evaluate]
serve: {{backend: llamacpp, slots: 2}}
evaluate: {{tasks: [capitals], concurrency: 2}}
tracking: {{uri: "sqlite:///{db}"}}
"""


def swapped_capitals(seed: int = 0) -> list[dict[str, str]]:
    """The capitals questions, each answered with the capital of another country."""
    rows = [json.loads(line) for line in evals.CAPITALS_DATA.read_text().splitlines()]
    answers = [row["answer"] for row in rows]
    random.Random(seed).shuffle(answers)
    wrong = [a if a != row["answer"] else answers[0] for a, row in zip(answers, rows, strict=True)]
    return [
        {"prompt": row["question"], "completion": f"The capital is {answer}."}
        for row, answer in zip(rows, wrong, strict=True)
    ]


@pytest.fixture(scope="module")
def blamed(tmp_path_factory):
    with scratch(tmp_path_factory, "blame") as folder:
        train = folder / "swapped.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in swapped_capitals()))
        db = folder / "mlflow.db"
        spec = folder / "blame.yaml"
        spec.write_text(SPEC.format(train=train, db=db))
        result = CliRunner().invoke(app, ["run", str(spec), "--store", str(folder / "store")])
        assert result.exit_code == 0, result.output
        client = MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("blame")
        runs = client.search_runs([experiment.experiment_id], "tags.`forgebench.kind` = 'cell'")
        yield {r.data.tags["forgebench.cell"]: r for r in runs}


def test_corrupted_labels_are_blamed_on_training_at_every_level(blamed):
    for cell in ("swapped-f16", "swapped-q8_0"):
        tags = blamed[cell].data.tags
        verdict = tags["forgebench.verdict"]
        assert verdict == "stupid (training: no gain)", tags["forgebench.verdict_reasons"]
        assert tags["forgebench.steps_lost"] == "training"
        assert "capitals tuned HF" in tags["forgebench.verdict_reasons"]


def test_mlflow_holds_every_link_of_the_chain(blamed):
    metrics = blamed["swapped-q8_0"].data.metrics
    base, tuned = metrics["chain_hf_base_capitals"], metrics["chain_hf_tuned_capitals"]
    assert base >= 0.4, "the untuned base must do the task for the test to mean anything"
    assert tuned < base - 0.2
    assert metrics["link_training_capitals_drop_lower"] > 0  # surely worse, not only no gain
    assert metrics["link_training_capitals_drop"] == pytest.approx(base - tuned)
    for step in ("export", "quantization"):
        assert f"link_{step}_capitals_drop_upper" in metrics
    assert metrics["chain_f16_capitals"] == pytest.approx(
        blamed["swapped-f16"].data.metrics["accuracy_capitals"]
    )
    assert blamed["swapped-q8_0"].data.tags["forgebench.scorer.capitals"] == "contains"
