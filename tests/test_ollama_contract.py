"""What a real Ollama (0.30 and later) does that forgebench must live with, as contract tests:
each runs on the Ollama double and, when OLLAMA_HOST is set and a server answers, on that
server too, so the double is held to what Ollama does (read from ollama/ollama v0.33.0-rc2).

- which template serves: a GGUF whose own chat template mentions tools or <think> is served
  by that Jinja template, not the Go template it was given (server/images.go
  PreferChatTemplate), and `_debug_render_only` shows that template's rendering;
- prompt token counts on a warm prompt cache (0.30 leaves cached tokens out, 0.31+ not);
- the context: its default, /api/ps `context_length`, and a prompt that overflows it;
- names over 80 characters a part, option types checked only at load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import ollama
import pytest
from conftest import smollm2_gguf_with_template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from ollama_double import OllamaDouble

from harness import sources
from harness.backends import Chunk, ServeConfig, ollama_answers
from harness.backends.ollama import OllamaBackend
from harness.backends.ollama_modelfile import GGUF_TEMPLATE, GO_TEMPLATE
from harness.env import ollama_host
from harness.errors import ForgebenchError

GGUF = sources.bundled_gguf("smollm2-135m")
PARAMETERS = {"temperature": 0, "num_ctx": 512, "seed": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The structure of Qwen2.5-Instruct's template: ChatML, a default system prompt, a tools
# section and tool results read back (so Ollama also sees a tool round trip).
TOOLS_JINJA = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The structure of Qwen3's: earlier thinking cut from assistant turns, and an empty think
# block opened for the answer when thinking is switched off.
THINK_JINJA = (
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def with_template(path: Path, template: str) -> Path:
    """The bundled SmolLM2 with another tokenizer.chat_template, its tensors as they are."""
    return smollm2_gguf_with_template(path, template)


def hf_rendering(template: str, messages: list[dict], **kwargs) -> str:
    """As transformers' apply_chat_template renders it (its environment and options)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token="", **kwargs
    )


@pytest.fixture(scope="module", params=["double", "real"])
def host(request) -> Iterator[str]:
    if request.param == "double":
        with OllamaDouble() as double:
            yield double.host
    elif os.environ.get("OLLAMA_HOST") and ollama_answers():
        yield ollama_host()
    else:
        pytest.skip("contract tests need a real Ollama: set OLLAMA_HOST to a running server")


@pytest.fixture(scope="module")
def backend(host) -> Iterator[OllamaBackend]:
    with OllamaBackend(host) as backend:
        yield backend


@pytest.fixture(scope="module")
def version(backend) -> tuple[int, int]:
    reported = backend._raw("GET", "/api/version").json()["version"]
    return tuple(int(part) for part in reported.split(".")[:2])


@pytest.fixture(scope="module")
def vocab() -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    """GGUF copies by embedded template, each written once."""
    folder, made = tmp_path_factory.mktemp("ggufs"), {}
    for name, template in (("tools", TOOLS_JINJA), ("think", THINK_JINJA)):
        made[template] = with_template(folder / f"{name}.gguf", template)
    return made


@pytest.fixture
def deploy(backend, ggufs, vocab):
    """Deploy a GGUF (the bundled one, or one with `template` embedded) and remove it after."""
    made = []

    def deploy_(name: str, template: str | None = None, **parameters):
        path = ggufs[template] if template else GGUF
        jinja = template or vocab.metadata["tokenizer.chat_template"]
        given = {k: v for k, v in (PARAMETERS | parameters).items() if v is not None}
        config = ServeConfig(f"forgebench-test/{name}", jinja, parameters=given)
        made.append(backend.deploy(path, config))
        return made[-1]

    yield deploy_
    for deployment in made:
        backend.remove(deployment)


def chat(backend, deployment, messages, **request) -> dict:
    """One unstreamed /api/chat, the server's own answer."""
    body = {"model": deployment.model_name, "messages": messages, "stream": False} | request
    body["options"] = {"num_predict": 8} | request.get("options", {})
    return backend._raw("POST", "/api/chat", json=body).json()


# --- which template serves ----------------------------------------------------------------


def test_a_template_without_tools_or_thinking_keeps_the_go_template(backend, deploy, vocab):
    deployment = deploy("plain")
    assert deployment.details["template_source"] == GO_TEMPLATE
    assert "thinking" not in deployment.details["capabilities"]
    jinja = vocab.metadata["tokenizer.chat_template"]
    assert backend.render_prompt(deployment, QUESTION) == hf_rendering(jinja, QUESTION)


def test_a_gguf_template_with_tools_serves_instead_of_the_go_template(backend, deploy):
    deployment = deploy("tools", TOOLS_JINJA)
    assert deployment.details["template_source"] == GGUF_TEMPLATE
    assert deployment.details["template"] == TOOLS_JINJA  # /api/show: the Jinja text
    assert "tools" in deployment.details["capabilities"]
    conversation = [{"role": "system", "content": "Be brief."}, *QUESTION]
    for messages in (QUESTION, conversation):
        assert backend.render_prompt(deployment, messages) == hf_rendering(TOOLS_JINJA, messages)
    answer = chat(backend, deployment, QUESTION)
    assert answer["done"] and answer["message"]["role"] == "assistant"


def test_a_gguf_template_other_than_the_deployments_is_refused(backend, ggufs, vocab):
    """The Go template derived from one Jinja template, a GGUF holding another (with tools):
    Ollama serves the GGUF's, which is not what the model was given, so deploy refuses."""
    jinja = vocab.metadata["tokenizer.chat_template"]
    config = ServeConfig("forgebench-test/mismatch", jinja, parameters=PARAMETERS)
    try:
        with pytest.raises(ForgebenchError, match=r"kept another template .*\(the GGUF's own"):
            backend.deploy(ggufs[TOOLS_JINJA], config)
    finally:
        backend.delete(config.model_name)


def test_a_thinking_template_serves_and_thinks_by_default(backend, deploy):
    deployment = deploy("think", THINK_JINJA)
    assert deployment.details["template_source"] == GGUF_TEMPLATE
    assert "thinking" in deployment.details["capabilities"]
    rendered = backend.render_prompt(deployment, QUESTION)
    # think defaults to true: enable_thinking true renders as the template's default does
    assert rendered == hf_rendering(THINK_JINJA, QUESTION) == hf_rendering(
        THINK_JINJA, QUESTION, enable_thinking=True
    )
    body = {"model": deployment.model_name, "messages": QUESTION, "think": False}
    off = backend._raw("POST", "/api/chat", json=body | {"_debug_render_only": True}).json()
    assert off["_debug_info"]["rendered_template"] == hf_rendering(
        THINK_JINJA, QUESTION, enable_thinking=False
    )
    chunks = list(backend.chat(deployment, QUESTION, max_tokens=8))
    assert chunks[-1].done and all(hasattr(c, "thinking") for c in chunks)


def test_asking_a_model_without_thinking_to_think_is_refused(backend, deploy):
    deployment = deploy("nothink")
    with pytest.raises(ollama.ResponseError, match="does not support thinking") as raised:
        chat(backend, deployment, QUESTION, think=True)
    assert raised.value.status_code == 400


# --- prompt token counts and the prompt cache ------------------------------------------------


def test_the_first_chat_after_deploy_counts_the_whole_prompt(backend, deploy, vocab, version):
    """deploy loads without a prompt, so the check's chat finds the cache cold: its count is
    the prompt's length on every version; a warm cache makes 0.30 count less."""
    deployment = deploy("cache")
    rendered = backend.render_prompt(deployment, QUESTION)
    length = len(vocab.tokenize(rendered.encode(), add_bos=True, special=True))
    *_, cold = backend.chat(deployment, QUESTION, max_tokens=4)
    assert cold.prompt_tokens == length
    follow_up = [*QUESTION, {"role": "assistant", "content": "Paris."}, *QUESTION]
    rendered = backend.render_prompt(deployment, follow_up)
    length = len(vocab.tokenize(rendered.encode(), add_bos=True, special=True))
    *_, warm = backend.chat(deployment, follow_up, max_tokens=4)
    if version >= (0, 31):
        assert warm.prompt_tokens == length
    else:
        assert warm.prompt_tokens < length


def test_the_older_count_leaves_cached_tokens_out(vocab):
    """Ollama 0.30 (prompt_n alone), on the double, as the test above holds a 0.30 server to."""
    with OllamaDouble(version="0.30.9") as double, OllamaBackend(double.host) as backend:
        config = ServeConfig("forgebench-test/old", "<|im_start|>", parameters=PARAMETERS)
        deployment = backend.deploy(GGUF, config)
        *_, cold = backend.chat(deployment, QUESTION, max_tokens=4)
        *_, warm = backend.chat(deployment, QUESTION, max_tokens=4)
    assert warm.prompt_tokens < cold.prompt_tokens


# --- the context: its default, /api/ps, overflow ---------------------------------------------


def test_default_context_is_the_servers_and_ps_reports_it(backend, deploy, vocab):
    deployment = deploy("defaultctx", num_ctx=None)
    trained = int(vocab.metadata["llama.context_length"])
    # 4096, 32768 or 262144 by the server's GPU memory, capped at the trained context
    assert deployment.details["context_length"] in {min(n, trained) for n in (4096, 32768)}
    deployment = deploy("smallctx", num_ctx=96)
    assert deployment.details["context_length"] == 96


def test_an_overflowing_prompt_is_cut_on_the_go_path_and_refused_on_the_jinja_path(
    backend, deploy
):
    long = [{"role": "user", "content": "Paris is the capital of France. " * 40}]
    go = deploy("overflow-go", num_ctx=96)
    assert backend._running(go.model_name)["context_length"] == 96  # /api/ps
    answer = chat(backend, go, long)
    assert answer["done"] and answer["prompt_eval_count"] < 96  # context shift cut it
    jinja = deploy("overflow-jinja", TOOLS_JINJA, num_ctx=96)
    with pytest.raises(ollama.ResponseError, match="exceeds the available context") as raised:
        chat(backend, jinja, long)
    assert raised.value.status_code == 400
    # earlier messages are dropped until the prompt fits, on both paths
    history = [*long, {"role": "assistant", "content": "Yes."}, *QUESTION]
    for deployment in (go, jinja):
        assert chat(backend, deployment, history)["prompt_eval_count"] < 96


# --- names and options: refused late by Ollama (after the upload, at the load) --------------


def test_a_name_part_over_80_characters_is_refused(backend, host):
    name = "forgebench/" + "m" * 81
    client = ollama.Client(host)
    digest = client.create_blob(GGUF)
    with pytest.raises(ollama.ResponseError, match="invalid model name"):
        client.create(name, files={"model.gguf": digest}, template="{{ .Prompt }}")
    client.create(name[:-1], files={"model.gguf": digest}, template="{{ .Prompt }}")
    client.delete(name[:-1])
    with pytest.raises(ForgebenchError, match=r"could not create .*: invalid model name"):
        backend.deploy(GGUF, ServeConfig(name, "<|im_start|>"))


def test_an_option_of_the_wrong_type_fails_only_when_the_model_loads(backend, host):
    client = ollama.Client(host)
    digest = client.create_blob(GGUF)
    name = "forgebench-test/stringctx"
    client.create(name, files={"model.gguf": digest}, template="{{ .Prompt }}",
                  parameters={"num_ctx": "2048"})  # fmt: skip
    try:
        with pytest.raises(ollama.ResponseError, match='"num_ctx" must be of type integer'):
            client.generate(name, "")
    finally:
        client.delete(name)
    config = ServeConfig(name, "<|im_start|>", parameters={"num_ctx": "2048"})
    with pytest.raises(ForgebenchError, match=r"could not load .*must be of type integer"):
        backend.deploy(GGUF, config)
    backend.delete(name)


# --- the check judges what serves ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.mark.parametrize("template", [TOOLS_JINJA, THINK_JINJA], ids=["tools", "think"])
def test_the_check_passes_a_model_served_by_its_own_jinja_template(
    backend, deploy, ggufs, tokenizer, template
):
    """Qwen2.5/Qwen3-style templates: Ollama serves the GGUF's Jinja text, and the check
    compares the tokenizer's rendering with that one (byte for byte, and the prompt token
    count of the first, cold-cache chat) instead of refusing the deployment."""
    from harness.stages import check

    tokenizer.chat_template = template
    deployment = deploy("checked", template)
    jinja, source = check.served_template(deployment, template)
    assert (jinja, source) == (template, GGUF_TEMPLATE)
    verdict = check.run_check(backend, deployment, tokenizer, ggufs[template], jinja)
    assert verdict.parity.by_text and verdict.parity.ok, verdict.parity.reasons
    assert verdict.server_prompt_tokens == verdict.template_prompt_tokens
    assert verdict.template_ok, verdict.reasons


class CachingServer:
    """A backend as Ollama 0.31+ answers with a warm prompt cache: every request counts
    its whole prompt (100 tokens), but after the first only 10 of them are evaluated."""

    name = "ollama"

    def __init__(self) -> None:
        self.requests = 0

    def chat(self, deployment, messages, max_tokens=256, fixed_length=False):
        cold, self.requests = self.requests == 0, self.requests + 1
        yield Chunk("Paris")
        yield Chunk(
            ".",
            done=True,
            done_reason="stop",
            prompt_tokens=100,
            completion_tokens=2,
            prompt_seconds=1.0 if cold else 0.1,
            decode_seconds=0.1,
        )

    def memory_bytes(self, deployment):
        return None


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_prefill_is_read_from_the_cold_first_request(warmup):
    """100 tokens/s is the prefill; the warm requests' 1,000 would be the cache's doing."""
    from harness.backends import Deployment
    from harness.stages import bench

    settings = {"warmup": warmup, "repeats": 1, "max_tokens": 8}
    deployment = Deployment("ollama", "m", "http://x", 0.5)
    metrics, samples = bench.measure(CachingServer(), deployment, settings, lambda *a: None)
    assert metrics["prefill_tps_p50"] == metrics["prefill_tps_p5"] == 100.0
    assert len(samples) == len(bench.prompts())
