"""Chat templates for models that have none: a small registry of families, and the one rule
for which template a run uses.

A pretrained base model (the usual start of a fine-tune) has no chat template, and a chat
model cannot be trained, served or checked without one. `serve.chat_template` names one:
a family (`harness.families`) or a Jinja file. The resolve stage writes it into the resolved model's
tokenizer, so training's loss mask, the merged model (and the GGUF converted from it), the
check, the PyTorch reference and both backends read the same text from one place.

The families themselves, in Jinja and in Go, are one table: `harness.families`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import InputError, StageError
from harness.families import FAMILIES
from harness.sources import gguf as gguf_meta
from harness.sources import kinds
from harness.spec import Spec

FILE = "chat_template.jinja"
"""Where the resolve stage writes the text that serves, beside the model folder."""

PROBE = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
"""A conversation every chat template must render, as training renders its examples."""
SYSTEM = {"role": "system", "content": "You answer briefly."}
"""Put before the probe when the spec sets a system prompt (some templates refuse one)."""


@dataclass(frozen=True)
class Template:
    text: str
    source: str
    """Where the text came from: "family chatml", "file /x/t.jinja", "the model's tokenizer"."""


def choices() -> str:
    return f"a Jinja file or one of: {', '.join(sorted(FAMILIES))}"


def resolve(value: str, where: str = "serve.chat_template") -> Template:
    """`serve.chat_template` (a family name, or a file path made absolute by spec.load) as
    text; InputError, one line starting with `where`, for a name that is neither."""
    if value in FAMILIES:
        return Template(FAMILIES[value], f"family {value}")
    path = Path(value)
    if not path.is_file():
        close = difflib.get_close_matches(path.name, FAMILIES, n=1)
        if close or not path.suffix:
            hint = f"; did you mean {close[0]}?" if close else ""
            raise InputError(
                f"{where}: {path.name!r} is no template family and no file{hint} (give {choices()})"
            )
        raise InputError(
            f"{where}: file not found: {path} (or name a family: {', '.join(sorted(FAMILIES))})"
        )
    try:
        return Template(path.read_text(encoding="utf-8"), f"file {path}")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: cannot read {path}: {exc}") from None


def given(spec: Spec) -> Template | None:
    """The template the spec names, or None when the model's own serves."""
    value = spec.serve.chat_template
    return None if value is None else resolve(value, spec.where("serve", "chat_template"))


def source(spec: Spec) -> str:
    """Where the template that serves came from, for the record (the file is not read)."""
    value = spec.serve.chat_template
    if value is None:
        return "the model's tokenizer"
    return f"family {value}" if value in FAMILIES else f"file {value}"


def missing(base: str, where: str = "base") -> str:
    """The one line that refuses a model with no template, naming the fix."""
    return (
        f"{where}: {base} has no chat template (a pretrained base model); "
        f"set serve.chat_template to {choices()}"
    )


def require(spec: Spec) -> None:
    """Refuse, before any work, a run that would have no chat template: the spec's renders
    the probe conversation as training renders it, else the base must carry its own.

    A base whose files are not at hand (an HF repo not yet downloaded) passes: the resolve
    stage refuses it with the same line before anything is trained."""
    template = given(spec)
    base = spec.base.model_dump(mode="json", exclude_none=True)
    if template is not None:
        where = spec.where("serve", "chat_template")
        _renders(template, bool(spec.serve.system or spec.data.system), where)
        vocab = vocabulary(base)
        wrong = vocab is not None and misfit(template, vocab, kinds.name(base))
        if wrong:
            raise InputError(f"{where}: {wrong}")
        return
    if own(base) is False:
        raise InputError(missing(kinds.name(base), spec.where("base")))


MARKER = re.compile(r"<\|[^|<>\s]+\|>|<(?:start|end)_of_[a-z_]+>")
"""A turn marker: `<|im_start|>`-style, and Gemma's `<start_of_turn>`-style."""


def markers(text: str) -> list[str]:
    """The turn markers a template writes, by one simple rule: every marker-shaped literal
    in its text, Jinja comments aside. A marker an expression builds (`bos_token`, pieces
    joined) is not seen; one the template only compares with is counted as written."""
    return list(dict.fromkeys(MARKER.findall(re.sub(r"\{#.*?#\}", "", text, flags=re.S))))


def misfit(template: Template, vocab: set[str], name: str) -> str | None:
    """Why `template` does not fit a model whose vocabulary is `vocab`, or None.

    A marker that is not one token is split into text pieces the model never learned as a
    turn: training and serving go on, and the model does not stop at the end of its turn."""
    absent = [marker for marker in markers(template.text) if marker not in vocab]
    if not absent:
        return None
    fit = [f for f, text in FAMILIES.items() if all(m in vocab for m in markers(text))]
    pick = f"the template family of the model ({', '.join(fit)}) or " if fit else ""
    return (
        f"{template.source} writes {', '.join(absent)}, not tokens of {name}'s vocabulary, so "
        f"the model would read them as text it never learned and not stop; pick {pick}"
        "a template file whose markers are its tokens"
    )


def _renders(template: Template, system: bool, where: str) -> None:
    """Render the probe the way training does: whole, and up to the generation prompt,
    which must be a prefix of the whole (the loss mask is the difference)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict[str, str]], prompt: bool) -> str:
        rendered, _ = render_jinja_template(
            [messages],
            chat_template=template.text,
            add_generation_prompt=prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
        return rendered[0]

    try:
        probe = [SYSTEM, *PROBE] if system else PROBE
        full, prompt = render(probe, False), render(probe[:-1], True)
    except Exception as exc:  # jinja2's syntax, undefined and raise_exception errors alike
        raise InputError(
            f"{where}: {template.source} does not render a "
            f"{'system/' if system else ''}user/assistant conversation: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if PROBE[-1]["content"] not in full or not full.startswith(prompt):
        raise InputError(
            f"{where}: {template.source} does not render the conversation with the "
            "generation prompt as a prefix of the whole, so training cannot mask its loss"
        )


def own(base: dict[str, Any]) -> bool | None:
    """Whether the base's files carry a chat template; None when they cannot be read yet."""
    at = kinds.kind(base).tokenizer_at(base)
    if at is None:
        return None
    if at.is_dir():
        return _folder_has_template(at)
    try:
        return bool(gguf_meta.header(at).fields.get("tokenizer.chat_template"))
    except (OSError, ValueError, struct.error):
        return None  # preflight's GGUF checks say what is wrong with the file


def vocabulary(base: dict[str, Any]) -> set[str] | None:
    """The base's tokens, read without loading a tokenizer: a GGUF's tokenizer.ggml.tokens,
    a folder's tokenizer.json (model vocabulary and added tokens) and tokenizer_config.json's
    added_tokens_decoder. None when they cannot be read yet (no tokenizer.json: a slow
    tokenizer's SentencePiece model); the resolve stage then checks the loaded tokenizer."""
    at = kinds.kind(base).tokenizer_at(base)
    if at is None:
        return None
    try:
        if not at.is_dir():
            tokens = gguf_meta.header(at, ("tokenizer.ggml.tokens",)).fields.get(
                "tokenizer.ggml.tokens"
            )
            return set(tokens) if isinstance(tokens, list) else None
        data = json.loads((at / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data["model"].get("vocab") or {}
        words = set(vocab) if isinstance(vocab, dict) else {piece for piece, _ in vocab}
        words |= {token["content"] for token in data.get("added_tokens") or []}
        config = at / "tokenizer_config.json"
        if config.is_file():
            added = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder")
            words |= {token["content"] for token in (added or {}).values()}
        return words
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None  # preflight's checks of the base say what is wrong with its files


def _folder_has_template(folder: Path) -> bool:
    """Where transformers finds a tokenizer's template: chat_template.jinja, the older
    chat_template.json, or `chat_template` in tokenizer_config.json."""
    if (folder / FILE).is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def apply(folder: Path, text: str | None, base: dict[str, Any]) -> str:
    """Make `text` the chat template of the tokenizer in `folder` (the resolved `base`) and
    return the template that now serves; StageError when there is none at all.

    The folder may hold links to the user's base or the HF cache: those are replaced by
    files, never written through. A template the base carries in another place (a
    chat_template.json, named templates) is taken out, so only `text` can be read back."""
    from transformers import AutoTokenizer

    trust_remote_code = bool(base.get("trust_remote_code"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if text is None:
        if not tokenizer.chat_template:
            raise StageError(missing(kinds.name(base)))
        return tokenizer.chat_template
    named = next((f"family {f}" for f, known in FAMILIES.items() if known == text), "the template")
    wrong = misfit(Template(text, named), set(tokenizer.get_vocab()), kinds.name(base))
    if wrong:  # a base validate could not read (an HF repo not downloaded then)
        raise StageError(f"serve.chat_template: {wrong}")
    tokenizer.chat_template = text
    for stale in (FILE, "chat_template.json", "additional_chat_templates"):
        target = folder / stale
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            target = folder / item.name
            if target.is_symlink() or target.is_file():
                target.unlink()
            os.replace(item, target)
    kept = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if kept.chat_template != text:
        raise StageError(f"the tokenizer in {folder} did not keep the spec's chat template")
    _stop_at_end_of_turn(folder, kept, trust_remote_code)
    return text


def end_of_turn(tokenizer) -> int | None:
    """The special token the tokenizer's template writes right after an assistant's reply
    (`<end_of_turn>` for the gemma family, `<|eot_id|>` for llama3), or None."""
    reply = "forgebench-reply"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
        tokenize=False,
    )
    after = tokenizer(rendered.split(reply, 1)[-1], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return after[0] if after and after[0] in special else None


def _stop_at_end_of_turn(folder: Path, tokenizer, trust_remote_code: bool) -> None:
    """Make the model folder's generation config stop at the template's end of turn. A
    base model's eos is its end of text, not a chat family's end of turn: llama-server and
    Ollama stop at the turn marker, and the PyTorch reference (lm-eval's `hf` model stops at
    generation_config's eos) would otherwise write on past the reply, and the export link
    would be blamed for a difference the export did not make."""
    from transformers import AutoConfig, GenerationConfig

    stop = end_of_turn(tokenizer)
    if stop is None:
        return
    target = folder / "generation_config.json"
    if target.is_file():  # edited as JSON: transformers refuses to save many shipped configs
        config = json.loads(target.read_text(encoding="utf-8"))
    else:  # what transformers derives from config.json when the file is missing
        model = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        config = GenerationConfig.from_model_config(model).to_diff_dict()
        config.pop("_from_model_config", None)  # or generate() derives it again, eos and all
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if stop in eos:
        return
    config["eos_token_id"] = [*eos, stop]
    if target.is_symlink():
        target.unlink()  # a link into the user's base or the HF cache: never written through
    target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
