"""Quantization recipes (`quant:` entries with an importance matrix or per-tensor types):
named beside their level, planned without touching the plain levels' keys, and built
through llama.cpp's own llama-imatrix and llama-quantize. The build runs on the suite's
tiny model (conftest's `tiny_base`): it checks mechanics (keys, caching, what lands in the
GGUF), not whether a recipe helps a task, which the README's table measures on SmolLM2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest
from conftest import scratch

from harness import data, pipeline, quant, spec
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import outcomes

SPEC = """\
name: recipes
base: {{path: "{base}"}}
data: {{task: arithmetic, n_train: 96, seed: 5}}
train: {{epochs: 1, lr: 3.0e-4, batch_size: 8, max_seq_len: 128, seed: 0}}
lora:
  - {{name: a, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}}
quant: [{quant}]
control: false
measure: [{measure}]
drift: {{ctx: 128, chunks: 2, task: true}}
tracking: {{uri: "sqlite:///{db}"}}
"""
RECIPES = (
    "f16, q4_k_m, {level: q4_k_m, imatrix: train, tensor_types: {output: q8_0, attn_q: q6_k}}, "
    "{level: q4_k_m, imatrix: text, chunks: 4}"
)


def write(folder: Path, name: str, base: Path, quant_line: str, measure: str = "") -> Path:
    path = folder / name
    text = SPEC.format(base=base, quant=quant_line, db=folder / "mlflow.db", measure=measure)
    path.write_text(text)
    return path


def test_recipes_are_named_beside_their_level_and_sort_just_before_it(tmp_path):
    path = write(tmp_path, "names.yaml", tmp_path, f"q2_k, {RECIPES}, q8_0")
    loaded = spec.load(path)
    assert loaded.levels == [
        "q2_k",
        "f16",
        "q4_k_m",
        "q4_k_m-imat-train-types-" + loaded.levels[3].rsplit("-", 1)[1],
        "q4_k_m-imat-text",
        "q8_0",
    ]
    assert loaded.levels[3] != "q4_k_m-imat-train"  # the tensor types are in the name
    ordered = sorted(loaded.levels, key=quant.rank)
    assert ordered[:2] == ["f16", "q8_0"]
    assert set(ordered[2:4]) == set(loaded.levels[3:5]) and ordered[4] == "q4_k_m"
    assert ordered[-1] == "q2_k"
    assert quant.level_of("q4_k_m-imat-text") == "q4_k_m"


def test_adding_recipes_changes_no_key_of_the_plain_levels(tmp_path):
    base = tmp_path / "base"  # planning reads nothing of it but its (empty) content
    base.mkdir()
    plain = planning.plan(spec.load(write(tmp_path, "plain.yaml", base, "f16, q4_k_m")))
    both = planning.plan(spec.load(write(tmp_path, "both.yaml", base, RECIPES)))
    keys = {c.name: {r: call.key for r, call in c.calls.items()} for c in both}
    for cell in plain:
        assert {r: call.key for r, call in cell.calls.items()} == keys[cell.name]


def test_a_calibration_file_counts_by_content_not_by_path(tmp_path):
    one, two, base = tmp_path / "one", tmp_path / "two", tmp_path / "base"
    base.mkdir()
    for folder in (one, two):
        folder.mkdir()
        (folder / "calib.txt").write_text("Notes on sums.\n" * 200)

    def imatrix_key(folder: Path) -> str:
        path = write(folder, "s.yaml", base, "f16, {level: q2_k, imatrix: calib.txt}")
        cell = planning.plan(spec.load(path))[-1]
        return cell.calls["quantize"].inputs["imatrix"].key

    assert imatrix_key(one) == imatrix_key(two)
    (two / "calib.txt").write_text("Other notes.\n" * 200)
    assert imatrix_key(one) != imatrix_key(two)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_base):
    with scratch(tmp_path_factory, "recipes") as folder:
        path = write(folder, "recipes.yaml", tiny_base, RECIPES, measure="drift")
        loaded = spec.load(path)
        store = Store(folder / "store")
        summary = pipeline.run(loaded, path, store, outcomes.Quiet())
        yield loaded, path, store, summary


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_a_recipe_puts_its_tensor_types_and_its_imatrix_in_the_gguf(built):
    loaded, _, store, summary = built
    assert [c.status for c in summary.cells] == ["done"] * 4, [c.error for c in summary.cells]
    assert summary.executed["imatrix"] == 2, "train and text calibrate differently"
    assert summary.executed["quantize"] == 3
    cells = {c.name: c for c in planning.plan(loaded)}
    recipe = next(name for name in cells if "imat-train" in name)
    plain = tensor_types(store.path(cells["a-q4_k_m"].gguf) / "model.gguf")
    mine = tensor_types(store.path(cells[recipe].gguf) / "model.gguf")
    # the tiny model ties its output head to the token embeddings, as SmolLM2 does
    assert "output.weight" not in mine and mine["token_embd.weight"] == "q8_0"
    attn_q = [name for name in mine if name.endswith("attn_q.weight")]
    assert attn_q and all(mine[name] == "q6_k" for name in attn_q)
    assert all(plain[name] == "q4_k" for name in attn_q)
    assert plain["token_embd.weight"] != "q8_0"
    reader = gguf.GGUFReader(store.path(cells[recipe].gguf) / "model.gguf")
    assert "quantize.imatrix.file" in reader.fields
    assert (
        "quantize.imatrix.file"
        not in gguf.GGUFReader(store.path(cells["a-q4_k_m"].gguf) / "model.gguf").fields
    )
    result = {c.cell: c for c in summary.cells}[recipe].stages
    assert result["quantize"].metrics["tensor_types_set"] == len(attn_q) + 1
    assert result["imatrix"].metrics["imatrix_chunks"] >= 2


@pytest.mark.slow
def test_the_calibration_text_is_kept_and_a_rerun_builds_nothing(built):
    loaded, path, store, _ = built
    cells = {c.name: c for c in planning.plan(loaded)}
    recipe = next(name for name in cells if "imat-train" in name)
    calibration = store.path(cells[recipe].calls["quantize"].inputs["imatrix"])
    text = (calibration / "calibration.txt").read_text()
    assert "<|im_start|>user" in text, "the training rows, in the model's own chat template"
    manifest = json.loads((calibration / "manifest.json").read_text())
    assert manifest["settings"]["calibration"]["source"] == "train"
    again = pipeline.run(spec.load(path), path, store, outcomes.Quiet())
    assert again.executed == {}, again.executed


@pytest.mark.slow
def test_drift_on_the_tasks_own_text_beside_the_drift_text(built):
    """`drift.task`: each level's KLD and top-1 agreement against its F16 on the held-out
    arithmetic items too (`_task`), the F16's logits on them saved once by drift_base."""
    loaded, _, store, summary = built
    for cell in summary.cells:
        if cell.cell.endswith("-f16"):
            continue
        drift = cell.stages["drift"].metrics
        assert drift["kld_mean_task"] >= 0 and 0 < drift["top1_agreement_task"] <= 1
        assert drift["kld_mean_task"] != drift["kld_mean"], "two texts, two figures"
    cells = {c.name: c for c in planning.plan(loaded)}
    base = store.path(cells["a-q4_k_m"].calls["drift_base"])
    held_out = data.held_out(loaded.data.model_dump(mode="json"))
    text = (base / "task_text.txt").read_text()
    assert f"{held_out[0][0]['content']}\n{held_out[0][-1]['content']}\n" in text
    assert json.loads((base / "task_ctx.json").read_text())["tokens"] > 0


@pytest.mark.slow
def test_a_recipe_by_ollama_is_quantized_by_its_create_and_measured_beside_the_level(
    built, tiny_base, monkeypatch
):
    """`{level: q4_k_m, by: ollama}`: the F16 goes to Ollama (the double, which quantizes as
    Ollama 0.30+ does, through llama.cpp's llama-quantize), nothing is quantized here, and
    the cell records the tensor types and size of the file Ollama made. With the same
    quantizer those equal llama-quantize's own q4_k_m beside it, and so do the answers; a
    real Ollama at another llama.cpp revision need not, which is what the cell measures.
    (No bench: the tiny model ends the bench's prompts at once, and Ollama cannot be told
    to go on, so it would stream nothing to time.)"""
    from ollama_double import OllamaDouble

    _, _, store, _ = built
    folder = store.root.parent
    quant_line = "q4_k_m, {level: q4_k_m, by: ollama}"
    path = write(folder, "ollama.yaml", tiny_base, quant_line, measure="check, evaluate")
    path.write_text(
        path.read_text() + "serve: {backend: ollama}\nevaluate: {tasks: [arithmetic], limit: 24}\n"
    )
    loaded = spec.load(path)
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)  # planning reads Ollama's version
        cells = {c.name: c for c in planning.plan(loaded)}
        summary = pipeline.run(loaded, path, store, outcomes.Quiet())
        assert double.models == {}
    made = cells["a-q4_k_m-ollama"]
    assert made.server_quantize == "q4_k_m" and "quantize" not in made.calls
    assert made.gguf.key == cells["a-q4_k_m"].calls["convert"].key, "Ollama gets the F16"
    assert "drift" not in made.calls, "the file stays in Ollama: no KLD"
    results = {c.cell: c for c in summary.cells}
    assert [c.status for c in summary.cells] == ["done"] * 2, [c.error for c in summary.cells]
    assert "quantize" not in summary.executed, "q4_k_m was built by the recipes run"
    local = store.path(cells["a-q4_k_m"].gguf) / "model.gguf"
    served = json.loads((store.path(made.calls["check"]) / "served_model.json").read_text())
    assert served["tensor_types"] == tensor_types(local)
    assert results["a-q4_k_m-ollama"].gguf_bytes == served["model_bytes"] == local.stat().st_size
    scores = [
        results[name].stages["evaluate"].metrics["accuracy_arithmetic"]
        for name in ("a-q4_k_m", "a-q4_k_m-ollama")
    ]
    assert scores[0] == scores[1], scores


TYPES = "F32, F16, Q4_K_S, Q4_K_M, Q8_0"


@pytest.mark.slow
def test_the_double_refuses_what_ollamas_create_refuses(built, monkeypatch):
    """Ollama's own words: a level its create cannot make, and a source already quantized."""
    from ollama_double import OllamaDouble

    from harness.backends import OllamaBackend, ServeConfig
    from harness.errors import ForgebenchError
    from harness.sources import gguf as gguf_meta

    loaded, _, store, _ = built
    cells = {c.name: c for c in planning.plan(loaded)}
    f16 = store.path(cells["a-f16"].gguf) / "model.gguf"
    q4 = store.path(cells["a-q4_k_m"].gguf) / "model.gguf"
    template = gguf_meta.read(f16).chat_template
    with OllamaDouble() as double, OllamaBackend(double.host) as backend:
        for source, level, words in (
            (f16, "q2_k", f"unsupported quantization type Q2_K - supported types are {TYPES}"),
            (q4, "q8_0", "quantization is only supported for F16, BF16 and F32 models"),
        ):
            config = ServeConfig("forgebench/refused", template, quantize=level)
            with pytest.raises(ForgebenchError, match=re.escape(words)):
                backend.deploy(source, config)
        assert double.models == {}
