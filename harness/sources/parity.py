"""Export parity: where the prompt a server renders, or the tokenizer a GGUF carries,
parts from the HF tokenizer the model was trained with.

The HF tokenizer's side (`trained_tokenizer`: its EOS, BOS, add-BOS and the token that ends a
turn), the server's rendering as llama.cpp tokenizes it (`as_tokenized`), the first byte
where the two renderings differ (`first_difference`) and the GGUF's tokenizer metadata
linted against the tokenizer (`lint`). Apart from the check stage, which runs a deployment
and judges it, since these read only a tokenizer, GGUF metadata and text.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.sources import gguf as gguf_meta

TEMPLATE = "template:"
"""Every reason that is a template or tokenizer fault starts with this."""
TURN_PROBE = "forgebench-turn-probe"
"""Assistant text whose rendering shows what the template writes after a turn."""


@dataclass(frozen=True)
class TrainedTokenizer:
    """What the HF tokenizer says; the GGUF and the server must agree with it."""

    eos_id: int | None
    bos_id: int | None
    adds_bos: bool
    """Whether the tokenizer puts BOS before text it encodes."""
    turn_end_id: int | None
    """The special token the chat template writes right after an assistant turn."""
    tokens: dict[int, tuple[str, bool]]
    """id -> (text, is a special token) for the ids above."""
    chat_template: str | None


def reference_template(tokenizer, served_template: str) -> str | None:
    """The template the model was trained with: the tokenizer's own; the deployment's only
    when the tokenizer has none (then it is all anyone has said the model expects)."""
    return tokenizer.chat_template or served_template or None


def expected_prompt(tokenizer, messages: list[dict[str, str]], template: str | None) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def trained_tokenizer(tokenizer, template: str | None) -> TrainedTokenizer:
    import jinja2

    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    turn_end = None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except jinja2.TemplateError:  # a template that refuses this conversation shows nothing
        text = ""
    if TURN_PROBE in text:
        after = tokenizer(text.rpartition(TURN_PROBE)[2], add_special_tokens=False)["input_ids"]
        turn_end = after[0] if after and after[0] in special else None
    bos = tokenizer.bos_token_id
    encoded = tokenizer("a")["input_ids"]
    ids = {i for i in (tokenizer.eos_token_id, bos, turn_end) if i is not None}
    return TrainedTokenizer(
        eos_id=tokenizer.eos_token_id,
        bos_id=bos,
        adds_bos=bos is not None and encoded[:1] == [bos],
        turn_end_id=turn_end,
        tokens={i: (tokenizer.convert_ids_to_tokens(i), i in special) for i in ids},
        chat_template=tokenizer.chat_template,
    )


def as_tokenized(rendered: str, meta: gguf_meta.TokenizerMeta, engine: gguf_meta.EngineView) -> str:
    """The server's prompt text as its tokenizer reads it, BOS and EOS written out.

    llama.cpp adds BOS (and EOS) itself where the vocabulary says so, and therefore takes
    a leading BOS text out of the rendered prompt (common/chat.cpp), so that the prompt
    does not start with two; Ollama's templates never write it, for the same reason. The
    HF tokenizer's rendering is tokenized as it stands (apply_chat_template adds no
    special tokens), so the two compare as what the model is fed only with them put back.
    """
    bos = (meta.text(meta.bos_id) or "") if engine.add_bos else ""
    eos = (meta.text(meta.eos_id) or "") if engine.add_eos else ""
    return bos + rendered + eos


def first_difference(expected: str, served: str) -> str | None:
    """None when the two are equal byte for byte; otherwise where they part."""
    a, b = expected.encode(), served.encode()
    if a == b:
        return None
    pairs = enumerate(zip(a, b, strict=False))
    at = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))

    def near(data: bytes) -> str:
        return repr(data[at : at + 40].decode(errors="replace"))

    return (
        f"{TEMPLATE} the server's prompt differs from the tokenizer's chat template from byte "
        f"{at} (tokenizer {near(a)}, server {near(b)})"
    )


def lint(
    ref: TrainedTokenizer, meta: gguf_meta.TokenizerMeta, engine: gguf_meta.EngineView
) -> list[str]:
    """Where the GGUF's tokenizer disagrees with the HF tokenizer; empty when it agrees."""
    found = []

    def name(token_id: int | None) -> str:
        return "none" if token_id is None else f"{meta.text(token_id)!r} ({token_id})"

    if ref.eos_id is not None and meta.eos_id != ref.eos_id:
        found.append(
            f"{TEMPLATE} the GGUF's EOS (tokenizer.ggml.eos_token_id) is {name(meta.eos_id)}, "
            f"the tokenizer's is {ref.tokens[ref.eos_id][0]!r} ({ref.eos_id})"
        )
    if ref.turn_end_id is not None and ref.turn_end_id not in engine.end_of_generation:
        found.append(
            f"{TEMPLATE} the chat template ends a turn with {name(ref.turn_end_id)}, where "
            f"llama.cpp does not stop (GGUF EOS {name(meta.eos_id)}, EOT {name(meta.eot_id)}):"
            " the model would write on past its turn"
        )
    if engine.add_bos != ref.adds_bos:
        key = meta.add_bos_token
        said = "absent" if key is None else str(key).lower()
        found.append(
            f"{TEMPLATE} llama.cpp {'adds' if engine.add_bos else 'adds no'} BOS "
            f"(tokenizer.ggml.add_bos_token {said}), the tokenizer "
            f"{'adds' if ref.adds_bos else 'adds none'}"
        )
    if engine.add_bos and ref.bos_id is not None and meta.bos_id != ref.bos_id:
        found.append(
            f"{TEMPLATE} the GGUF's BOS is {name(meta.bos_id)}, the tokenizer's is "
            f"{ref.tokens[ref.bos_id][0]!r} ({ref.bos_id})"
        )
    for token_id, (text, special) in sorted(ref.tokens.items()):
        if meta.text(token_id) != text:
            found.append(
                f"{TEMPLATE} token {token_id} is {meta.text(token_id)!r} in the GGUF, "
                f"{text!r} in the tokenizer"
            )
        elif special and meta.token_types[token_id] != gguf_meta.CONTROL:
            found.append(
                f"{TEMPLATE} {text!r} ({token_id}) is a special token of the tokenizer but "
                f"{meta.type_name(token_id)} in the GGUF, not CONTROL: llama.cpp takes it "
                "for text"
            )
    if ref.chat_template and meta.chat_template != ref.chat_template:
        what = "another chat template than the tokenizer's" if meta.chat_template else "none"
        found.append(
            f"{TEMPLATE} the GGUF's own chat template (tokenizer.chat_template) is {what}: "
            "whatever serves the file with it (ollama create, llama-server without "
            "--chat-template-file) prompts the model otherwise"
        )
    return found
