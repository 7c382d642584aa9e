"""What a run would cost before it starts: the download of an uncached base (shown by
`plan`, confirmed by `run`), and the deploy names a user finds in Ollama afterwards.

The Hugging Face hub cannot be reached from these machines: the tests stand in for its
file metadata (`download_size`) and for an empty cache, nothing else."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from harness.backends import model_name
from harness.cli import app
from harness.sources import hub

ROOT = Path(__file__).resolve().parents[1]
SPEC = """\
name: fetch
base: {hf: HuggingFaceTB/SmolLM2-135M-Instruct}
data: {task: arithmetic, n_train: 16}
lora:
  - {name: a, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
quant: [f16]
measure: []
"""
SIZE = 269_060_552  # what the hub lists for that repo's files


@pytest.fixture
def uncached_online(monkeypatch, tmp_path):
    """An HF base that is not cached, with the hub reachable and listing SIZE bytes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub, "cached_snapshot", lambda repo, revision=None: None)
    monkeypatch.setattr(hub, "download_size", lambda repo, revision=None: SIZE)
    spec = tmp_path / "fetch.yaml"
    spec.write_text(SPEC)
    return spec


def test_plan_shows_the_download_size(uncached_online):
    result = CliRunner().invoke(app, ["plan", str(uncached_online), "--store", "store"])
    assert result.exit_code == 0, result.output
    assert (
        "downloads first: 269.1 MB from the Hugging Face hub "
        "(HuggingFaceTB/SmolLM2-135M-Instruct)" in result.output
    )


def test_plan_json_carries_the_download(uncached_online):
    import json

    result = CliRunner().invoke(app, ["plan", str(uncached_online), "--json"])
    assert json.loads(result.output)["download"] == {
        "repo": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bytes": SIZE,
    }


def test_an_unattended_run_does_not_download_without_yes(uncached_online, tmp_path):
    result = CliRunner().invoke(app, ["run", str(uncached_online), "--store", "store"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: this run would download 269.1 MB from the Hugging Face hub "
        "(HuggingFaceTB/SmolLM2-135M-Instruct): rerun with --yes"
    )
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_cached_base_needs_no_confirmation(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub, "cached_snapshot", lambda repo, revision=None: tmp_path)
    from harness import preflight, spec

    path = tmp_path / "fetch.yaml"
    path.write_text(SPEC)
    assert preflight.download(spec.load(path)) is None


def test_plan_shows_what_the_run_will_take(tmp_path):
    # an empty store of its own: the clone's may hold a quickstart run already
    quickstart = str(ROOT / "experiments" / "quickstart.yaml")
    result = CliRunner().invoke(app, ["plan", quickstart, "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert (
        "estimated: disk for the store about 2.4 GiB, memory for training about 4.6 GiB, "
        "memory for serving about 0.4 GiB" in result.output
    )


@pytest.mark.parametrize(
    ("experiment", "adapter", "quant", "source", "name"),
    [
        ("quickstart", "r8", "q4_k_m", None, "forgebench/quickstart-r8-q4_k_m"),
        ("quickstart", None, "f16", None, "forgebench/quickstart-base-f16"),
        ("x", "main", "q4_k_m", "qwen2.5-coder:7b", "forgebench/qwen2.5-coder-7b-ft-main-q4_k_m"),
        ("x", None, "q8_0", "qwen2.5-coder:7b", "forgebench/qwen2.5-coder-7b-q8_0"),
        (
            "x",
            "a",
            "f16",
            "hf.co/bartowski/Llama-3.2-1B:Q4_K_M",
            "forgebench/llama-3.2-1b-q4_k_m-ft-a-f16",
        ),
    ],
)
def test_deploy_names(experiment, adapter, quant, source, name):
    """After the source model when there is one (seed 000), else after the experiment."""
    assert model_name(experiment, adapter, quant, source) == name


def test_disk_counts_only_what_the_store_lacks(tmp_path):
    """A rerun over a full store needs no new disk; a fresh store needs every output."""
    from harness import preflight, spec
    from harness.plan import cells as planning
    from harness.plan.store import Store

    quickstart = spec.load(ROOT / "experiments" / "quickstart.yaml")
    store = Store(tmp_path / "store")
    shape, cells = preflight.examine(quickstart), planning.plan(quickstart)
    disk = {n.what: n.bytes for n in preflight.needs(quickstart, shape, cells, store)}
    fresh = disk["disk for the store"]
    for call in planning.unique_calls(cells).values():  # all built but the quantizations
        if call.stage != "quantize":
            (store.path(call)).mkdir(parents=True, exist_ok=True)
            (store.path(call) / "manifest.json").write_text("{}")
    left = {n.what: n.bytes for n in preflight.needs(quickstart, shape, cells, store)}
    params = 134_515_008
    levels = [q for q in quickstart.quant if q != "f16"]  # q8_0 and q2_k, for both adapters
    quants = sum(preflight.BYTES_PER_WEIGHT[q] for q in levels) * 2 * params
    assert left["disk for the store"] == pytest.approx(quants, rel=1e-6)
    assert fresh > 3 * left["disk for the store"]
