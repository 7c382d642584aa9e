"""Cache keys: what a spec edit invalidates, decided without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import spec
from harness.plan import cells as planning
from harness.plan.store import StageCall, Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def quickstart() -> spec.Spec:
    """The quickstart with its untuned control cells, so keys shared with them show."""
    return spec.load(ROOT / "experiments" / "quickstart.yaml").model_copy(update={"control": True})


def keys(s: spec.Spec) -> dict[tuple[str, str], str]:
    return {(c.name, stage): call.key for c in planning.plan(s) for stage, call in c.calls.items()}


def edit_lora(s: spec.Spec, index: int, **changes) -> spec.Spec:
    loras = list(s.lora)
    loras[index] = loras[index].model_copy(update=changes)
    return s.model_copy(update={"lora": loras})


def test_cells_share_stages(quickstart):
    cells = planning.plan(quickstart)
    by_adapter = {}
    for cell in cells:
        by_adapter.setdefault(cell.adapter, set()).add(cell.calls["convert"].key)
    assert {a: len(k) for a, k in by_adapter.items()} == {
        "base": 1,
        "r16-qkvo": 1,
        "r16-qkvo-replay": 1,
    }
    assert len({c.calls["resolve"].key for c in cells}) == 1
    assert all("train" not in c.calls for c in cells if c.adapter == "base")
    assert all("quantize" not in c.calls for c in cells if c.quant == "f16")


def test_editing_one_lora_changes_only_its_cells(quickstart):
    before, after = keys(quickstart), keys(edit_lora(quickstart, 0, r=4))
    changed = {cell for (cell, _), key in before.items() if after[(cell, _)] != key}
    assert changed == {f"r16-qkvo-{q}" for q in quickstart.quant}
    assert before[("r16-qkvo-f16", "resolve")] == after[("r16-qkvo-f16", "resolve")]


def test_renaming_a_lora_keeps_its_keys(quickstart):
    renamed = edit_lora(quickstart, 0, name="renamed")

    def adapter_keys(s: spec.Spec, adapter: str) -> set[str]:
        return {
            call.key for c in planning.plan(s) if c.adapter == adapter for call in c.calls.values()
        }

    assert adapter_keys(quickstart, "r16-qkvo") == adapter_keys(renamed, "renamed")


def test_adding_a_quant_level_adds_only_quantizations(quickstart):
    more = quickstart.model_copy(update={"quant": [*quickstart.quant, "q6_k"]})
    before, after = set(keys(quickstart).values()), set(keys(more).values())
    assert before <= after
    new_stages = {stage for (cell, stage), k in keys(more).items() if k not in before}
    # the new cells are measured too, but nothing upstream of quantize is redone
    assert new_stages == {"quantize", *quickstart.measure}


def test_keeping_deployments_changes_no_key(quickstart):
    """serve.keep acts after measuring: turning it on must not redo any measurement."""
    kept = quickstart.model_copy(
        update={"serve": quickstart.serve.model_copy(update={"keep": True})}
    )
    assert keys(kept) == keys(quickstart)


def test_training_settings_reach_the_key(quickstart):
    slower = quickstart.model_copy(
        update={"train": quickstart.train.model_copy(update={"lr": 1e-4})}
    )
    assert keys(slower)[("r16-qkvo-f16", "train")] != keys(quickstart)[("r16-qkvo-f16", "train")]
    assert keys(slower)[("base-f16", "convert")] == keys(quickstart)[("base-f16", "convert")]


def test_store_keeps_nothing_from_a_failed_build(tmp_path):
    store = Store(tmp_path)
    call = StageCall("demo", {"x": 1})
    with pytest.raises(RuntimeError), store.building(call) as out:
        (out / "half.bin").write_bytes(b"partial")
        raise RuntimeError("killed halfway")
    assert not store.has(call)
    assert list((tmp_path / "demo").iterdir()) == []


def test_store_manifest_records_outputs(tmp_path):
    store = Store(tmp_path)
    call = StageCall("demo", {"x": 1}, versions={"tool": "1.0"})
    with store.building(call) as out:
        (out / "model.gguf").write_bytes(b"GGUF")
    manifest = store.manifest(call)
    assert store.has(call)
    assert manifest["outputs"]["model.gguf"].startswith("b836")  # sha256(b"GGUF")
    assert manifest["versions"] == {"tool": "1.0"}
    assert manifest["key"] == call.key
