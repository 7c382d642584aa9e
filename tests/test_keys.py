"""Cache keys cover what a stage reads: its own logic, the evals/ files, the server, the
llama.cpp programs, the resolved precision and the content (not the place) of user files.
Nothing here trains or serves a model."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from harness import hashing, sources, spec, toolchain
from harness.data import evals
from harness.errors import ForgebenchError
from harness.plan import cells as planning
from harness.plan import keys, store
from harness.plan.store import StageCall
from harness.stages import bench, drift

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "stage_versions.json"
REFRESH = ".tox/forgebench/bin/python scripts/stage_record.py > tests/stage_versions.json"


# --- forgebench's own logic: VERSION per stage, checked against the record ----------


def record_problem(stage: str, now: dict | None, recorded: dict | None) -> str | None:
    """What is wrong with a stage's entry in the record, in words a developer can act on."""
    where = f"harness/stages/{stage}.py"
    if now is None:
        return f"{stage} is recorded but has no module any more: refresh the record ({REFRESH})"
    if now["version"] is None:
        return f"{where} has no `VERSION = N` line: add `VERSION = 1` near its top, then {REFRESH}"
    if recorded is None:
        return f"{stage} is a new stage: record it ({REFRESH})"
    if now["version"] < recorded["version"]:
        return f"{where}: VERSION went down ({recorded['version']} -> {now['version']})"
    changed = sorted(
        name
        for name in now["sources"].keys() | recorded["sources"].keys()
        if now["sources"].get(name) != recorded["sources"].get(name)
    )
    if not changed:
        return None
    if now["version"] == recorded["version"]:
        return (
            f"{', '.join(changed)} changed since tests/stage_versions.json was recorded and "
            f"{where} still has VERSION = {now['version']}: if the change can change what "
            f"{stage} produces, bump VERSION there (cached {stage} outputs are then rebuilt); "
            f"either way refresh the record: {REFRESH}"
        )
    return f"{where}: VERSION bumped to {now['version']}; now refresh the record: {REFRESH}"


@pytest.mark.parametrize("stage", sorted({*keys.stage_names(), *json.loads(RECORD.read_text())}))
def test_stage_version_is_bumped_when_its_logic_changes(stage):
    now = keys.stage_record().get(stage)
    problem = record_problem(stage, now, json.loads(RECORD.read_text()).get(stage))
    assert problem is None, problem


def test_the_record_check_catches_an_edit_without_a_bump():
    recorded = {
        "version": 1,
        "sources": {"harness/stages/x.py": "a", "harness/data/training.py": "b"},
    }
    edited = {
        "version": 1,
        "sources": {"harness/stages/x.py": "a", "harness/data/training.py": "c"},
    }
    assert "harness/data/training.py changed" in record_problem("x", edited, recorded)
    assert "bump VERSION" in record_problem("x", edited, recorded)
    assert "refresh" in record_problem("x", {**edited, "version": 2}, recorded)
    assert record_problem("x", {**recorded, "version": None}, recorded).endswith(REFRESH)
    assert record_problem("x", recorded, recorded) is None


def test_stage_version_is_read_without_importing_the_stage(tmp_path, monkeypatch):
    (tmp_path / "heavy.py").write_text('"""doc"""\nimport no_such_module\n\nVERSION = 3  # why\n')
    (tmp_path / "unversioned.py").write_text("import os\n")
    monkeypatch.setattr(keys, "STAGES", tmp_path)
    assert keys.stage_names() == ["heavy", "unversioned"]  # a new stage module counts at once
    assert keys.stage_version("heavy") == {"forgebench.heavy": "3"}
    with pytest.raises(ForgebenchError, match=r"unversioned.py has no `VERSION = N` line"):
        keys.stage_version("unversioned")


def test_stage_sources_follow_the_harness_modules_a_stage_uses():
    def names(stage: str) -> set[str]:
        return {p.relative_to(ROOT).as_posix() for p in keys.stage_sources(stage)}

    assert {"harness/stages/train.py", "harness/data/training.py"} <= names("train")
    assert {"harness/data/evals.py", "harness/backends/llamacpp.py"} <= names("evaluate")
    assert "harness/stages/drift.py" in names("drift_base")  # imported from a sibling stage
    assert "harness/toolchain.py" in names("convert")  # imported inside run()
    assert "harness/plan/store.py" not in names("convert")  # caching is not the stage's logic


# --- the evals/ files a stage reads, by content ----------------------------------


@pytest.fixture
def evals_copy(tmp_path, monkeypatch):
    """The repository's evals/ copied elsewhere, and a task of our own that includes a base
    with a `!function` scorer and names its data, as lm-eval task YAML does."""

    def use(folder: Path) -> Path:
        shutil.copytree(evals.EVALS, folder)
        (folder / "_base_yaml").write_text(
            "filter_list:\n  - filter: [{function: custom, filter_fn: !function sc.fn}]\n"
        )
        (folder / "sc.py").write_text("def fn(r, d):\n    return r\n")
        (folder / "data" / "t.jsonl").write_text('{"question": "q", "answer": "a"}\n')
        (folder / "t.yaml").write_text(
            "include: _base_yaml\ntask: t\n"
            "dataset_kwargs: {data_files: {test: evals/data/t.jsonl}}\n"
        )
        monkeypatch.setattr(evals, "EVALS", folder)
        monkeypatch.setattr(evals, "QA_TEMPLATE", folder / "_qa_template_yaml")
        builtin = {name: folder / path.name for name, path in evals.BUILTIN.items()}
        monkeypatch.setattr(evals, "BUILTIN", {**builtin, "t": folder / "t.yaml"})
        monkeypatch.setattr(bench, "PROMPTS", folder / bench.PROMPTS.name)
        monkeypatch.setattr(drift, "TEXT", folder / drift.TEXT.name)
        return folder

    return use


def identities(tasks=("arithmetic", "gsm8k")) -> dict[str, dict]:
    return {s: keys.evals_identity(s, tasks if s == "evaluate" else ()) for s in STAGES_READING}


STAGES_READING = ("evaluate", "bench", "drift", "drift_base", "check")


def test_evals_identity_is_content_not_place(evals_copy, tmp_path):
    evals_copy(tmp_path / "a" / "evals")
    first = identities()
    evals_copy(tmp_path / "b" / "evals")
    assert identities() == first
    assert first["check"] == {}  # reads no evals/ file
    assert set(first["evaluate"]["evals"]) >= {
        "forgebench_gsm8k.yaml",
        "data/gsm8k/test.jsonl",
        "forgebench_arithmetic.yaml",
        "_qa_template_yaml",  # included by forgebench_arithmetic.yaml
    }
    assert not any(name.startswith("/") for name in first["evaluate"]["evals"])


def test_editing_an_evals_file_changes_only_the_stages_that_read_it(evals_copy, tmp_path):
    folder = evals_copy(tmp_path / "evals")
    before = identities()
    arithmetic = keys.evals_identity("evaluate", ["arithmetic"])
    with (folder / "data" / "gsm8k" / "test.jsonl").open("a") as fh:
        fh.write('{"question": "1+1?", "answer": "#### 2"}\n')
    after = identities()
    assert after["evaluate"] != before["evaluate"]
    assert keys.evals_identity("evaluate", ["arithmetic"]) == arithmetic  # reads no GSM8K
    assert {s for s in STAGES_READING if after[s] != before[s]} == {"evaluate"}
    (folder / "drift_text.txt").write_text("another text, longer than the first one was")
    changed = {s for s, v in identities().items() if v != after[s]}
    assert changed == {"drift", "drift_base"}


def test_evals_identity_follows_includes_functions_and_data(evals_copy, tmp_path):
    folder = evals_copy(tmp_path / "evals")
    task = keys.evals_identity("evaluate", ["t"])["evals"]
    assert set(task) == {"t.yaml", "_base_yaml", "sc.py", "data/t.jsonl"}
    (folder / "sc.py").write_text("def fn(r, d):\n    return [x.strip() for x in r]\n")
    assert keys.evals_identity("evaluate", ["t"])["evals"]["sc.py"] != task["sc.py"]
    (folder / "data" / "t.jsonl").unlink()
    with pytest.raises(ForgebenchError, match=r"t.jsonl: evaluation file not found"):
        keys.evals_identity("evaluate", ["t"])


def test_a_user_task_reads_the_question_answer_bases(evals_copy, tmp_path):
    evals_copy(tmp_path / "evals")
    files = keys.evals_identity("evaluate", [{"name": "mine", "path": "/x.jsonl"}])["evals"]
    assert "_qa_template_yaml" in files and "forgebench_gsm8k.yaml" not in files


# --- the server, llama.cpp programs and precision ----------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ollama_server_version_is_in_served_keys(monkeypatch):
    from ollama_double import VERSION, OllamaDouble

    keys._ollama_version.cache_clear()
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        assert keys.served_identity("ollama") == {"ollama": VERSION}
        assert keys.versions("evaluate", "ollama")["ollama"] == VERSION
    assert keys.served_identity("llamacpp") == {}
    assert "ollama" not in keys.versions("convert", "ollama")


def test_ollama_that_does_not_answer_is_one_line(monkeypatch):
    keys._ollama_version.cache_clear()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed_port()}")
    with pytest.raises(ForgebenchError) as caught:
        keys.served_identity("ollama")
    assert "\n" not in str(caught.value)
    assert "did not answer GET /api/version" in str(caught.value)
    assert "serve.backend: llamacpp" in str(caught.value)


def test_precision_auto_resolves_as_training_decides():
    from harness.stages import train  # imports torch: the one test here that does

    assert keys.resolved_precision("auto") == ("bf16" if train.use_bf16("auto") else "fp32")
    assert keys.resolved_precision("fp32") == "fp32"
    assert keys.resolved_precision("bf16") == "bf16"


def test_training_held_to_avx2_kernels_runs_fp32_as_on_an_avx2_only_cpu(monkeypatch):
    """`ATEN_CPU_CAPABILITY=avx2` is how an AVX2-only CPU's timings are estimated on a
    faster one: bf16 would run emulated there, so auto precision is fp32, and the keys say so."""
    import torch

    from harness.stages import train

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # what keys read; torch reads it at start
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert train.use_bf16("auto") is False
    assert keys.resolved_precision("auto") == "fp32"
    assert train.use_bf16("bf16") is True, "a precision the spec names is taken as named"


def test_hidden_gpus_are_no_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert keys.gpu_visible() is False


@pytest.fixture
def own_tools(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in (*toolchain.TOOLS, "libggml.so"):
        (folder / name).write_bytes(name.encode())
    monkeypatch.setenv("FORGEBENCH_LLAMA_CPP_BIN", str(folder))
    return folder


def test_own_llama_cpp_programs_count_by_content(own_tools, tmp_path, monkeypatch):
    before = {s: keys.llama_cpp_identity(s, "llamacpp") for s in ("bench", "drift", "convert")}
    assert "llama.cpp-bin" in before["bench"] and "llama.cpp-bin" not in before["convert"]
    assert before["bench"]["llama.cpp"] == toolchain.revision()
    (own_tools / "llama-perplexity").write_bytes(b"rebuilt, and longer")
    after = {s: keys.llama_cpp_identity(s, "llamacpp") for s in ("bench", "drift", "convert")}
    assert {s for s in after if after[s] != before[s]} == {"drift"}
    (own_tools / "libggml.so").write_bytes(b"a rebuilt shared library")  # every program links it
    rebuilt = keys.llama_cpp_identity("bench", "llamacpp")
    assert rebuilt != after["bench"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(own_tools, moved)
    monkeypatch.setenv("FORGEBENCH_LLAMA_CPP_BIN", str(moved))
    assert keys.llama_cpp_identity("bench", "llamacpp") == rebuilt
    (moved / "llama-bench").unlink()
    with pytest.raises(ForgebenchError, match="llama-bench not found"):
        keys.llama_cpp_identity("bench", "llamacpp")


def test_llama_server_counts_only_where_it_serves(own_tools):
    served = keys.llama_cpp_identity("check", "llamacpp")
    assert "llama-server" in served["llama.cpp-bin"]
    assert "llama.cpp-bin" not in keys.llama_cpp_identity("check", "ollama")


def test_own_llama_cpp_tree_without_git_is_named_by_content(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / toolchain.CONVERTER).write_text("# converter\n")
    monkeypatch.setenv("FORGEBENCH_LLAMA_CPP", str(tmp_path / "a"))
    first = toolchain.revision()
    monkeypatch.setenv("FORGEBENCH_LLAMA_CPP", str(tmp_path / "b"))
    assert toolchain.revision() == first and str(tmp_path) not in first


# --- user files by content, not by place --------------------------------------------


def hf_folder(folder: Path, weights: bytes = b"weights") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_a_path_base_counts_by_its_files_content(tmp_path):
    a = sources.identity({"path": str(hf_folder(tmp_path / "a"))})
    b = hf_folder(tmp_path / "b")
    assert sources.identity({"path": str(b)}) == a and str(tmp_path) not in json.dumps(a)
    os.utime(b / "config.json", (1, 1))  # touched, not changed
    (b / ".cache").mkdir()  # hf download's own metadata
    (b / ".cache" / "meta").write_text("downloaded at some time")
    assert sources.identity({"path": str(b)}) == a
    (b / "model.safetensors").write_bytes(b"other weights")
    assert sources.identity({"path": str(b)}) != a
    (b / "model.safetensors").rename(b / "renamed.safetensors")
    assert sources.identity({"path": str(b)}) != a


def test_a_big_file_is_hashed_once_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "PERSIST_BYTES", 4)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF and some weights")
    first = hashing.file_sha256(model)
    assert hashing._persisted()[str(model)][-1] == first
    monkeypatch.setattr(hashing, "_memo", {})  # a new process

    def no_hashing(path):
        raise AssertionError("hashed again")

    monkeypatch.setattr(hashing, "digest", no_hashing)
    assert hashing.file_sha256(model) == first
    model.write_bytes(b"GGUF with other weights in it")  # changed: size and mtime move
    with pytest.raises(AssertionError, match="hashed again"):
        hashing.file_sha256(model)


def test_keys_see_the_content_of_files_named_in_settings(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    a, b = (
        StageCall("train", {"data": {"train": str(tmp_path / n / "train.jsonl")}}) for n in "ab"
    )
    assert a.key == b.key and a.settings != b.settings  # the stage still gets its own path
    (tmp_path / "b" / "train.jsonl").write_text('{"prompt": "p", "completion": "other"}\n')
    assert StageCall("train", dict(b.settings)).key != a.key
    for name in ("a", "b"):
        (tmp_path / name / "replay.jsonl").write_text('{"prompt": "What do bees make?"}\n')
    a, b = (
        StageCall("train", {"lora": {"replay": str(tmp_path / n / "replay.jsonl")}}) for n in "ab"
    )
    assert a.key == b.key
    (tmp_path / "b" / "replay.jsonl").write_text('{"prompt": "Who wrote Hamlet?"}\n')
    assert StageCall("train", dict(b.settings)).key != a.key
    tasks = {"evaluate": {"tasks": ["gsm8k", {"name": "x", "path": str(tmp_path / "nope")}]}}
    with pytest.raises(ForgebenchError, match=r"evaluate.tasks\[1\].path: file not found"):
        store.portable(tasks)


# --- the plan: what the lead's planning.plan() does with all of the above ----------

SPEC = """\
name: moved
base: {path: model}
data: {train: train.jsonl}
lora:
  - {name: a, r: 4, alpha: 8, target_modules: [q_proj]}
quant: [f16, q8_0]
serve: {backend: llamacpp, chat_template: template.jinja}
evaluate: {tasks: [gsm8k, {name: mine, path: qa.jsonl}]}
"""


def spec_folder(folder: Path) -> Path:
    hf_folder(folder / "model")
    (folder / "train.jsonl").write_text('{"prompt": "1+1", "completion": "2"}\n')
    (folder / "qa.jsonl").write_text('{"question": "2+2", "answer": "4"}\n')
    (folder / "template.jinja").write_text("{{ messages }}")
    (folder / "spec.yaml").write_text(SPEC)
    return folder / "spec.yaml"


def planned(path: Path) -> dict[tuple[str, str], StageCall]:
    cells = planning.plan(spec.load(path))
    return {(c.name, stage): call for c in cells for stage, call in c.calls.items()}


def test_the_same_spec_in_another_folder_has_the_same_keys(tmp_path):
    here, there = planned(spec_folder(tmp_path / "a")), planned(spec_folder(tmp_path / "b"))
    assert {k: c.key for k, c in here.items()} == {k: c.key for k, c in there.items()}
    (tmp_path / "b" / "qa.jsonl").write_text('{"question": "2+3", "answer": "5"}\n')
    edited = planned(tmp_path / "b" / "spec.yaml")
    changed = {call.stage for k, call in edited.items() if call.key != here[k].key}
    assert changed == {"reference", "evaluate"}  # the stages that score the tasks


def test_plan_keys_carry_each_stage_version(tmp_path):
    for call in planned(spec_folder(tmp_path)).values():
        name = f"forgebench.{call.stage}"
        assert call.versions[name] == keys.stage_version(call.stage)[name]


def test_plan_keys_cover_the_evals_files_read(tmp_path, evals_copy):
    folder = evals_copy(tmp_path / "evals")
    path = spec_folder(tmp_path / "spec")
    before = planned(path)
    (folder / "bench_prompts.jsonl").write_text('{"messages": []}\n')
    after = planned(path)
    changed = {call.stage for k, call in after.items() if call.key != before[k].key}
    assert changed == {"bench"}


def test_plan_trains_at_the_resolved_precision(tmp_path):
    train = next(c for (_, s), c in planned(spec_folder(tmp_path)).items() if s == "train")
    assert train.settings["train"]["precision"] == keys.resolved_precision("auto")


def test_plan_keys_name_own_llama_cpp_programs(tmp_path, own_tools):
    calls = planned(spec_folder(tmp_path / "spec"))
    bench_call = next(c for (_, s), c in calls.items() if s == "bench")
    assert (
        bench_call.versions["llama.cpp-bin"]
        == keys.llama_cpp_identity("bench", "llamacpp")["llama.cpp-bin"]
    )


def test_a_worker_refuses_what_its_key_does_not_name(tmp_path, evals_copy):
    """A Ray worker builds only with what the driver planned the key with: its packages, a
    stage's logic, the evals/ files; anything else is one line naming what differs."""
    folder = evals_copy(tmp_path / "evals")
    calls = planned(spec_folder(tmp_path / "spec"))
    assert all(keys.differs_here(call) is None for call in calls.values())
    train = next(call for (_, stage), call in calls.items() if stage == "train")
    older = StageCall(train.stage, train.settings, train.inputs, {**train.versions, "peft": "0.1"})
    assert keys.differs_here(older).startswith("train: this node has peft ")
    assert "where the plan has 0.1: install the driver's versions" in keys.differs_here(older)
    (folder / "bench_prompts.jsonl").write_text('{"messages": []}\n')
    bench_call = next(call for (_, stage), call in calls.items() if stage == "bench")
    assert "bench_prompts.jsonl" in keys.differs_here(bench_call)
    evaluate = next(call for (_, stage), call in calls.items() if stage == "evaluate")
    assert keys.differs_here(evaluate) is None  # reads no bench prompt
