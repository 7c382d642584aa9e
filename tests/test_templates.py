"""Chat templates for models without one: the families render as their models expect, a
name that is none of them is refused with a suggestion, a base with no template is refused
by `validate` before anything is written, and the resolve stage puts the spec's template
into the model folder's tokenizer, the one place every later stage reads it from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import smollm2_gguf_with_template
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template
from typer.testing import CliRunner

from harness import spec
from harness.backends.ollama_modelfile import go_template
from harness.cli import app
from harness.errors import InputError, StageError
from harness.plan import cells as planning
from harness.run import outcomes
from harness.sources import templates
from harness.stages import resolve

pytestmark = pytest.mark.usefixtures("room_on_disk")


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<BOS><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    # Gemma has no system turn: the system prompt opens the first user turn
    "gemma": "<BOS><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n"
    "<start_of_turn>model\n",
}


def render(template: str, messages: list[dict[str, str]], prompt: bool = True) -> str:
    rendered, _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=prompt, bos_token="<BOS>"
    )
    return rendered[0]


@pytest.mark.parametrize("family", sorted(templates.FAMILIES))
def test_each_family_renders_a_conversation_as_its_models_do(family):
    assert sorted(templates.FAMILIES) == sorted(EXPECTED)
    text = templates.FAMILIES[family]
    assert render(text, CONVERSATION) == EXPECTED[family]
    # training masks the loss to what follows the prompt: it must be a prefix of the whole
    answered = [*CONVERSATION, {"role": "assistant", "content": "4"}]
    assert render(text, answered, prompt=False).startswith(render(text, CONVERSATION))
    go_template(text)  # and the Ollama backend can serve it (ValueError otherwise)


def test_a_family_name_with_a_typo_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(InputError) as caught:
        templates.resolve(str(tmp_path / "chatlm"))
    message = str(caught.value)
    assert "'chatlm'" in message and "did you mean chatml?" in message
    assert "one of: chatml, gemma, llama3" in message and "\n" not in message
    with pytest.raises(InputError, match=r"file not found: .*missing\.jinja"):
        templates.resolve(str(tmp_path / "missing.jinja"))
    path = write_spec(tmp_path, "{model: smollm2-135m}", "llama-3")
    result = invoke(["validate", str(path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: {path}:7: serve.chat_template: 'llama-3' is no ")
    assert "did you mean llama3?" in result.output


def test_a_spec_names_a_family_or_a_file_relative_to_itself(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "mine.jinja").write_text(templates.FAMILIES["chatml"])
    path = tmp_path / "spec.yaml"
    for value, expected in (("gemma", "gemma"), ("t/mine.jinja", str(tmp_path / "t/mine.jinja"))):
        path.write_text(SPEC.format(base="{model: smollm2-135m}", template=value))
        loaded = spec.load(path)
        assert loaded.serve.chat_template == expected
    assert templates.given(loaded).source == f"file {tmp_path / 't' / 'mine.jinja'}"


SPEC = """\
name: base
base: {base}
data: {{task: arithmetic, n_train: 16}}
lora:
  - {{name: a, r: 4, alpha: 8, target_modules: [q_proj]}}
quant: [f16]
serve: {{backend: llamacpp, chat_template: {template}}}
tracking: {{uri: "sqlite:///{{}}"}}
"""


def write_spec(folder: Path, base: str, template: str | None) -> Path:
    text = SPEC.format(base=base, template=template or "null")
    text = text.replace("sqlite:///{}", f"sqlite:///{folder / 'mlflow.db'}")
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def templateless_gguf(path: Path) -> Path:
    """The bundled SmolLM2 without tokenizer.chat_template: what a pretrained base's GGUF
    looks like."""
    return smollm2_gguf_with_template(path, None)


def tokenizer_folder(folder: Path, template: str | None = None, family: str | None = None) -> Path:
    """A Hugging Face model folder with a small tokenizer (no weights: nothing loads them),
    with the turn markers of a template family as its special tokens when one is named."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if family:
        extra = templates.markers(templates.FAMILIES[family])
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_a_base_without_a_template_is_refused_by_validate_in_one_line(tmp_path):
    gguf_base = templateless_gguf(tmp_path / "base.gguf")
    hf_base = tokenizer_folder(tmp_path / "hf-base")
    for base, name in ((f"{{gguf: {gguf_base}}}", gguf_base), (f"{{path: {hf_base}}}", hf_base)):
        path = write_spec(tmp_path, base, None)
        before = sorted(tmp_path.rglob("*"))
        result = invoke(["validate", str(path)])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            f"error: {path}:2: base: {name} has no chat template (a pretrained base model); set "
            "serve.chat_template to a Jinja file or one of: chatml, gemma, llama3"
        )
        assert sorted(tmp_path.rglob("*")) == before  # nothing written, no MLflow database
    write_spec(tmp_path, f"{{gguf: {gguf_base}}}", "chatml")
    assert invoke(["validate", str(path)]).exit_code == 0


def test_validate_renders_the_spec_template_once(tmp_path):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    path = write_spec(tmp_path, "{model: smollm2-135m}", "broken.jinja")
    result = invoke(["validate", str(path)])
    assert result.exit_code == 2
    assert "does not render a user/assistant conversation: TemplateSyntaxError" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_markers_of_a_template_are_its_special_token_literals():
    found = {family: templates.markers(text) for family, text in templates.FAMILIES.items()}
    assert found == {
        "chatml": ["<|im_start|>", "<|im_end|>"],
        "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "gemma": ["<start_of_turn>", "<end_of_turn>"],
    }
    text = "{# <|im_start|> in a comment #}<|begin_of_text|>{{ bos_token + '<start_of_image>' }}"
    assert templates.markers(text) == ["<|begin_of_text|>", "<start_of_image>"]


# A Llama 3 template on a ChatML model: its headers are no tokens of SmolLM2, so the model
# would read them as text and not stop (once only seen at the check, after training).
LLAMA3_FILE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_a_template_whose_markers_are_not_tokens_of_the_base_is_refused_by_validate(tmp_path):
    (tmp_path / "llama3.jinja").write_text(LLAMA3_FILE)
    for value, source in (("llama3", "family llama3"), ("llama3.jinja", "file")):
        path = write_spec(tmp_path, "{model: smollm2-135m}", value)
        before = sorted(tmp_path.rglob("*"))
        result = invoke(["validate", str(path)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {path}:7: serve.chat_template: {source}")
        assert result.output.strip().endswith(
            " writes <|start_header_id|>, <|end_header_id|>, <|eot_id|>, not tokens of "
            "smollm2-135m's vocabulary, so the model would read them as text it never learned "
            "and not stop; pick the template family of the model (chatml) or a template file "
            "whose markers are its tokens"
        )
        assert sorted(tmp_path.rglob("*")) == before  # nothing written, no MLflow database


def test_a_family_whose_markers_are_tokens_of_the_base_passes(tmp_path):
    path = write_spec(tmp_path, "{model: smollm2-135m}", "chatml")
    assert invoke(["validate", str(path)]).exit_code == 0
    # a folder's vocabulary: tokenizer.json's added tokens, here Gemma's turn markers
    folder = tokenizer_folder(tmp_path / "hf", family="gemma")
    path = write_spec(tmp_path, f"{{path: {folder}}}", "gemma")
    result = invoke(["validate", str(path)])
    assert result.exit_code == 0, result.output
    path = write_spec(tmp_path, f"{{path: {folder}}}", "chatml")
    result = invoke(["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "family chatml writes <|im_start|>, <|im_end|>, not tokens of" in result.output
    assert "pick the template family of the model (gemma) or" in result.output


def test_a_base_validate_cannot_read_is_refused_at_resolve_with_the_same_reason(tmp_path):
    base = tokenizer_folder(tmp_path / "base")  # no turn markers among its tokens
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError) as caught:
        resolve.run({"base": {"path": str(base)}, "chat_template": LLAMA3_FILE}, {}, out, quiet)
    assert str(caught.value) == (
        "serve.chat_template: the template writes <|start_header_id|>, <|end_header_id|>, "
        f"<|eot_id|>, not tokens of {base}'s vocabulary, so the model would read them as text "
        "it never learned and not stop; pick a template file whose markers are its tokens"
    )


def quiet(*_):
    pass


def test_resolve_writes_the_spec_template_into_the_tokenizer_and_not_into_the_base(tmp_path):
    base = tokenizer_folder(tmp_path / "base", family="llama3")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'own' }}"  # where older tokenizers keep it
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    own_files = {p.name: p.read_bytes() for p in base.iterdir()}
    text = templates.FAMILIES["llama3"]
    out = tmp_path / "out"
    out.mkdir()
    resolve.run({"base": {"path": str(base)}, "chat_template": text}, {}, out, quiet)
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == text
    assert (out / templates.FILE).read_text() == text
    # llama.cpp's converter prefers tokenizer_config.json's template to chat_template.jinja
    saved = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert saved.get("chat_template", text) == text
    assert {p.name: p.read_bytes() for p in base.iterdir()} == own_files  # links, not written

    kept = tmp_path / "kept"
    kept.mkdir()
    resolve.run({"base": {"path": str(base)}, "chat_template": None}, {}, kept, quiet)
    assert (kept / templates.FILE).read_text() == "{{ 'own' }}"


@pytest.mark.parametrize("own_config", [True, False], ids=["its-config", "no-config"])
def test_resolve_makes_the_model_stop_where_the_template_ends_a_turn(own_config, tmp_path):
    """A base model's eos is its end of text; with the llama3 family it must also stop at
    <|eot_id|>, as llama-server and Ollama do, or its PyTorch reference writes on past the
    reply. The base's own generation_config.json is left as it was."""
    base = tokenizer_folder(tmp_path / "base", family="llama3")
    if own_config:
        (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "top_k": 7}))
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    text = templates.FAMILIES["llama3"]
    resolve.run({"base": {"path": str(base)}, "chat_template": text}, {}, out, quiet)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert templates.end_of_turn(tokenizer) == eot
    saved = json.loads((out / "model" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [2, eot]
    assert saved.get("top_k") == (7 if own_config else None)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_resolve_refuses_a_model_with_no_template_and_none_given(tmp_path):
    base = tokenizer_folder(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match=f"base: {base} has no chat template"):
        resolve.run({"base": {"path": str(base)}, "chat_template": None}, {}, out, quiet)


def test_the_template_reaches_the_keys_by_its_text_not_its_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "same.jinja").write_text(templates.FAMILIES["chatml"])
    (tmp_path / "other.jinja").write_text(templates.FAMILIES["gemma"])

    def keys(template: str) -> dict[str, str]:
        path = write_spec(tmp_path, "{model: smollm2-135m}", template)
        cells = planning.plan(spec.load(path))
        return {f"{c.name}/{stage}": call.key for c in cells for stage, call in c.calls.items()}

    family, file = keys("chatml"), keys("a/same.jinja")
    assert family == file  # the same text by name or from a file: nothing re-runs
    other = keys("other.jinja")
    changed = {name.split("/")[1] for name in family if other[name] != family[name]}
    assert {"resolve", "train", "check"} <= changed


def test_mlflow_records_which_template_served_and_where_it_came_from(tmp_path):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    from harness import track

    (tmp_path / "mine.jinja").write_text(templates.FAMILIES["chatml"])
    path = write_spec(tmp_path, "{model: smollm2-135m}", "mine.jinja")
    loaded = spec.load(path)
    cell = planning.plan(loaded)[0]
    served = tmp_path / "resolved" / templates.FILE  # as the resolve stage writes it
    served.parent.mkdir()
    served.write_text(templates.FAMILIES["chatml"])
    result = outcomes.CellResult(cell.name, cell.adapter, cell.quant, "done", {})
    with track.Experiment(loaded, path) as experiment:
        run_id = experiment.log_cell(cell, result, {}, [], chat_template=served)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["forgebench.chat_template.source"] == f"file {tmp_path / 'mine.jinja'}"
    sha256 = hashlib.sha256(served.read_bytes()).hexdigest()
    assert tags["forgebench.chat_template.sha256"] == sha256
    kept = download_artifacts(
        run_id=run_id,
        artifact_path=f"serve/{templates.FILE}",
        tracking_uri=uri,
        dst_path=str(tmp_path / "got"),
    )
    assert Path(kept).read_text() == templates.FAMILIES["chatml"]
