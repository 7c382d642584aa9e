"""Ollama 0.34.1 took two things out of its create that forgebench can ask for: an ADAPTER
(the adapter route) and quantizing a GGUF (a recipe `by: ollama`). A spec that needs
either from such a server is refused in one line naming the version, before anything is
built, by `validate` and `run` alike; an older server (the double's 0.33) is asked."""

from __future__ import annotations

import pytest
from ollama_double import OllamaDouble
from test_bad_inputs import assert_refused
from typer.testing import CliRunner

from harness.backends import ollama_versions
from harness.cli import app

SPEC = """\
name: versions
base: {{model: smollm2-135m}}
data: {{task: arithmetic, n_train: 16}}
lora:
  - {{name: a, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}}
quant: [f16, q4_k_m{recipe}]
route: [{route}]
serve: {{backend: ollama}}
"""
ADAPTERS = "no longer takes LoRA adapters (removed in 0.34.1, ollama PR #14969)"
BY_OLLAMA = ", {level: q4_k_m, by: ollama}"
QUANTIZE = "does not quantize GGUF models during import (since 0.34.1"


def test_release_numbers_as_ollama_reports_them():
    assert ollama_versions.release("0.34.2") == (0, 34, 2)
    assert ollama_versions.release("0.33.0-rc2") == (0, 33, 0)
    assert ollama_versions.release("0.0.0") is None, "a development build: not known"
    assert ollama_versions.takes_adapters("0.33.3") and not ollama_versions.takes_adapters("0.34.1")
    assert ollama_versions.quantizes_gguf("0.0.0") and not ollama_versions.quantizes_gguf("1.0.0")


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize(
    ("route", "recipe", "words"),
    [
        ("adapter", "", f"route: Ollama 0.34.1 at {{host}} {ADAPTERS}"),
        ("merge", BY_OLLAMA, f"quant[2]: Ollama 0.34.1 at {{host}} {QUANTIZE}"),
    ],
    ids=["adapter-route", "quantize-by-ollama"],
)
def test_what_ollama_0341_cannot_do_is_refused_before_anything(
    command, route, recipe, words, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path, store = tmp_path / "spec.yaml", tmp_path / "store"
    path.write_text(SPEC.format(route=route, recipe=recipe))
    with OllamaDouble(version="0.34.1") as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        result = CliRunner().invoke(app, [command, str(path), "--store", str(store)])
        host = f"http://{double.host}"
    assert_refused(result, words.format(host=host), tmp_path, store)
    assert f"{path.name}:" in result.output, "the line names the spec's line"


def test_an_ollama_that_takes_them_is_asked(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(route="merge, adapter", recipe=BY_OLLAMA))
    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        result = CliRunner().invoke(app, ["validate", str(path), "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output


def test_a_release_to_ollama_0341_refuses_the_adapter_route_it_measured_elsewhere(
    tmp_path, monkeypatch
):
    """Measured on llama-server, the adapter route plans fine; the release creates the pick
    in Ollama, which 0.34.1 would refuse, so the release says so before running anything."""
    monkeypatch.chdir(tmp_path)
    path, store = tmp_path / "spec.yaml", tmp_path / "store"
    text = SPEC.format(route="adapter", recipe="").replace("backend: ollama", "backend: llamacpp")
    path.write_text(text)
    with OllamaDouble(version="0.34.1") as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        command = ["release", str(path), "--model", "versions", "--store", str(store)]
        result = CliRunner().invoke(app, command)
        host = f"http://{double.host}"
    assert_refused(result, f"route: Ollama 0.34.1 at {host} {ADAPTERS}", tmp_path, store)
