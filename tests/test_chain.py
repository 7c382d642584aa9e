"""The real chain on SmolLM2-135M: train, merge, convert, quantize, cache, MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPLAY
from gguf import GGUFReader
from mlflow.tracking import MlflowClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import data, pipeline, quant, spec
from harness.data import replay
from harness.plan import cells as planning
from harness.run import executor, outcomes
from harness.stages.train import REPLAY_TOKENS

pytestmark = pytest.mark.slow

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1869 the Suez Canal opened, "
    "shortening the sea route between Europe and Asia by about 7,000 kilometres. "
    "What is 48 + 17? The answer is 65, and 65 - 17 is 48."
)


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()


def test_cli_run_reports_cells_and_where_to_look(e2e):
    assert "work done: resolve 1, train 2, merge 2, convert 3, quantize 9" in e2e.cli_output
    assert "mlflow ui --backend-store-uri sqlite:///" in e2e.cli_output


def test_merged_model_equals_base_plus_adapter(e2e):
    base_dir = e2e.output("main-f16", "resolve")
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "model")
    ids = tokenizer(TEXT, return_tensors="pt")
    with_adapter = PeftModel.from_pretrained(
        hf_model(base_dir), e2e.output("main-f16", "train") / "adapter"
    ).eval()
    merged = hf_model(e2e.output("main-f16", "merge"))
    plain = hf_model(base_dir)
    with torch.no_grad():
        expected, got = with_adapter(**ids).logits, merged(**ids).logits
        untouched = plain(**ids).logits
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(got, untouched, atol=1e-3), "the adapter changed nothing"


def test_f16_gguf_agrees_with_merged_model(e2e):
    from llama_cpp import Llama

    merged_dir = e2e.output("main-f16", "merge")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir / "model")
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        hf_top = hf_model(merged_dir)(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    llm = Llama(
        str(e2e.output("main-f16", "convert") / "model.gguf"),
        logits_all=True,
        n_ctx=256,
        verbose=False,
        seed=0,
    )
    llm.eval(ids)
    gguf_top = np.asarray(llm.scores[: len(ids)]).argmax(-1)
    agreement = float((gguf_top == hf_top).mean())
    assert agreement >= 0.95, f"next-token argmax agrees on {agreement:.1%} of positions"


def test_quantized_files_have_the_asked_type_and_shrink(e2e):
    sizes = []
    for level in ("f16", "q8_0", "q4_k_m", "q2_k"):
        stage = "convert" if level == "f16" else "quantize"
        path = e2e.output(f"main-{level}", stage) / "model.gguf"
        file_type = int(GGUFReader(path).get_field("general.file_type").contents())
        assert file_type == int(quant.file_type(level)), level
        sizes.append(path.stat().st_size)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes


def exact_match(model_dir, conversations) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "model", padding_side="left")
    model = hf_model(model_dir)
    prompts = [
        tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answers = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return float(
        np.mean(
            [a.strip() == c[-1]["content"] for a, c in zip(answers, conversations, strict=True)]
        )
    )


def test_adapter_raises_heldout_exact_match(e2e):
    held_out = data.held_out(spec.load(e2e.spec_path).data.model_dump(mode="json"))
    base = exact_match(e2e.output("main-f16", "resolve"), held_out)
    tuned = exact_match(e2e.output("main-f16", "merge"), held_out)
    # the untuned model answers in sentences (exact match ~0); 135M parameters add
    # two-digit numbers poorly, so the gain is in format and some arithmetic
    assert tuned >= base + 0.15, f"held-out exact match: base {base:.2f}, tuned {tuned:.2f}"


def test_a_replay_adapter_rehearses_the_bases_own_answers(e2e):
    """`replay:` mixes general prompts, answered by the untuned base itself, into the
    training set; the train stage keeps them beside the adapter."""
    out = e2e.output("small-f16", "train")
    rehearsed = [json.loads(line)["messages"] for line in (out / "replay.jsonl").open()]
    assert [m[0]["content"] for m in rehearsed] == replay.prompts(REPLAY)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_replay_examples"] == len(rehearsed) == 8
    assert metrics["train_examples"] == spec.load(e2e.spec_path).data.n_train + 8
    assert not (e2e.output("main-f16", "train") / "replay.jsonl").exists()
    # the answer is the base's greedy one: the same prompt asked alone gives it again
    base_dir = e2e.output("small-f16", "resolve")
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "model")
    ids = tokenizer.apply_chat_template(
        rehearsed[0][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out_ids = hf_model(base_dir).generate(**ids, max_new_tokens=REPLAY_TOKENS, do_sample=False)
    alone = tokenizer.decode(out_ids[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert alone.strip().split("\n")[0].strip() == rehearsed[0][1]["content"]


def test_every_cell_is_in_mlflow(e2e):
    client = MlflowClient(f"sqlite:///{e2e.folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`forgebench.kind` = 'cell'", max_results=500
    )
    first = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        first.setdefault(run.data.tags["forgebench.cell"], run)
    assert len(first) == 12
    tuned = first["main-q4_k_m"]
    assert tuned.info.status == "FINISHED"
    assert tuned.data.params["lora.r"] == "16" and tuned.data.params["quant"] == "q4_k_m"
    assert tuned.data.params["train.lr"] == "0.0003"
    assert tuned.data.metrics["gguf_bytes"] > 0
    assert tuned.data.metrics["train_tokens_per_s"] > 0
    assert tuned.data.tags["forgebench.lineage.lossy"] == "True"
    assert "llama-cpp-python==" in tuned.data.tags["forgebench.llama_cpp"]
    curve = client.get_metric_history(tuned.info.run_id, "train_loss")
    assert len(curve) == 50  # 400 examples / batch 8, one epoch: a point per step
    assert "train_loss" not in first["base-q4_k_m"].data.metrics
    parent = client.get_run(tuned.data.tags["mlflow.parentRunId"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec", "run_record.json"} <= artifacts


def test_rerun_does_no_work(e2e):
    summary = e2e.run(e2e.spec_path)
    assert summary.executed == {}
    assert all(o.cached for c in summary.cells for o in c.stages.values())
    assert not summary.failed


class LastFirst:
    """An executor that hands the cells back last first, as a cluster's would in whatever
    order they finish."""

    def __init__(self) -> None:
        self.serial = executor.Serial()
        self.executed = self.serial.executed

    def prepare(self, spec, cells):
        self.serial.prepare(spec, cells)

    def run(self, spec, cells, store, reporter):
        yield from reversed(list(self.serial.run(spec, cells, store, reporter)))


def test_cells_may_come_back_in_any_order(e2e):
    """The driver logs each cell once, as it comes back, under one parent run, and the
    summary and its verdicts keep the plan's order whatever order the executor kept."""
    loaded = spec.load(e2e.spec_path)
    summary = pipeline.run(loaded, e2e.spec_path, e2e.store, outcomes.Quiet(), executor=LastFirst())
    planned = [cell.name for cell in planning.plan(loaded)]
    assert [c.cell for c in summary.cells] == planned
    assert list(summary.verdicts) == planned
    client = MlflowClient(f"sqlite:///{e2e.folder / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id],
        f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'",
    )
    assert sorted(r.data.tags["forgebench.cell"] for r in children) == sorted(planned)
    assert {r.info.run_id for r in children} == {c.run_id for c in summary.cells}
    assert all(r.info.status == "FINISHED" for r in children)


def test_changing_one_lora_retrains_exactly_one(e2e):
    summary = e2e.run(e2e.write_spec("smaller.yaml", small_r=2))
    assert summary.executed == {"train": 1, "merge": 1, "convert": 1, "quantize": 3}


def test_adding_a_quant_level_quantizes_only_the_new_level(e2e):
    summary = e2e.run(e2e.write_spec("more.yaml", quant=("f16", "q8_0", "q4_k_m", "q2_k", "q6_k")))
    assert summary.executed == {"quantize": 3}  # base, main and small at q6_k
