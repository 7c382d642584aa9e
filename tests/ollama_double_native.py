"""What a real Ollama (0.30 and later, read from v0.33.0-rc2) decides that the double must too.

Kept apart from ollama_double.py, which serves HTTP and runs inference: here are what
Ollama reads from a GGUF (/api/show's details and model_info, the chat template), the rules
that decide which template serves a model (server/images.go), how its Jinja chat template
is rendered on llama-server's path (llm/llama_server.go), which names are valid
(types/model/name.go), how options are type-checked when a model loads (api/types.go
FromMap) and the default context length (server/routes.go Serve).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import jinja2
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

# api/types.go Options and Runner: the JSON kind FromMap wants for each option.
INTEGER = "num_ctx num_batch num_gpu main_gpu num_thread draft_num_predict num_keep seed"
INTEGER += " num_predict top_k repeat_last_n"
FLOAT = "top_p min_p typical_p temperature repeat_penalty presence_penalty frequency_penalty"
KINDS = dict.fromkeys(INTEGER.split(), "integer") | dict.fromkeys(FLOAT.split(), "float32")
KINDS |= {"use_mmap": "boolean", "stop": "array"}
CONTEXT_OVERFLOW = (
    "request ({n} tokens) exceeds the available context size ({ctx} tokens), try increasing it"
)
"""llama-server's error (tools/server/server-context.cpp) for a prompt that fills the slot."""


class Thought(str):
    """Generated text that is thinking (llama-server's reasoning_content), not the answer."""


def option_error(options: dict[str, Any]) -> str | None:
    """api/types.go Options.FromMap: the first option of the wrong JSON type, as Ollama says
    it; unknown options are only logged there, so they pass here. Run when a model loads
    (server/routes.go modelOptions, from scheduleRunner), never at create."""
    for key, value in options.items():
        kind = KINDS.get(key)
        ok = {
            None: True,
            "integer": isinstance(value, int | float) and not isinstance(value, bool),
            "float32": isinstance(value, int | float) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list),
        }[kind]
        if value is not None and not ok:
            return f"option {key!r} must be of type {kind}".replace("'", '"')
    return None


def valid_name(name: str) -> bool:
    """types/model/name.go ParseName + IsValid: [host/][namespace/]model[:tag], each part of
    ASCII letters, digits, `_`, `-`, `.` (none in a namespace), at most 80 characters (350
    for the host), starting with a letter, digit or `_`."""
    rest, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = rest.split("/")
    if len(parts) > 3 or (":" in name.rsplit("/", 1)[-1] and not tag):
        return False
    kinds = ["host", "namespace", "model"][-len(parts) :]
    checks = list(zip(kinds, parts, strict=True)) + ([("tag", tag)] if tag else [])
    return all(_valid_part(kind, part) for kind, part in checks)


def _valid_part(kind: str, part: str) -> bool:
    if not 1 <= len(part) <= (350 if kind == "host" else 80):
        return False
    allowed = r"[A-Za-z0-9_-]" if kind == "namespace" else r"[A-Za-z0-9_.-]"
    allowed = r"[A-Za-z0-9_.:-]" if kind == "host" else allowed
    return re.fullmatch(rf"[A-Za-z0-9_]{allowed}*", part) is not None


def default_num_ctx(vram_bytes: int) -> int:
    """server/routes.go Serve: the default context by the GPUs' total memory (47/23 GiB)."""
    gib = 2**30
    return 262144 if vram_bytes >= 47 * gib else 32768 if vram_bytes >= 23 * gib else 4096


# --- what Ollama reads from a GGUF ---------------------------------------------------------

# fs/ggml/type.go FileType.String(), indexed by general.file_type
QUANTS = "F32 F16 Q4_0 Q4_1 - - - Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S"
FILE_TYPES = dict(enumerate((QUANTS + " Q5_K_M Q6_K").split())) | {32: "BF16"}


@dataclass(frozen=True)
class GgufChat:
    """What llama-server's Jinja path reads from the GGUF."""

    template: str
    bos: str
    eos: str
    train_ctx: int


@functools.cache
def gguf_chat(path: Path) -> GgufChat:
    """Read through llama.cpp's own loader (vocabulary only), as quick as the server's."""
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    meta = vocab.metadata

    def text(key: str) -> str:
        found = meta.get(f"tokenizer.ggml.{key}_token_id")
        return vocab.detokenize([int(found)], special=True).decode() if found else ""

    trained = meta.get(f"{meta.get('general.architecture', '')}.context_length", "0")
    template, bos, eos = meta.get("tokenizer.chat_template", ""), text("bos"), text("eos")
    vocab.close()
    return GgufChat(template, bos, eos, int(trained))


def human_number(n: int) -> str:
    """format.HumanNumber, as /api/show's parameter_size."""
    for size, unit, decimals in ((10**9, "B", 1), (10**6, "M", 2), (10**3, "K", 0)):
        if n >= size:
            return f"{n / size:.{0 if n % size == 0 else decimals}f}{unit}"
    return str(n)


def gguf_kind(path: Path) -> str:
    """general.type of a GGUF ("model", "adapter"), as ggml's KV().Kind() reads it."""
    return _metadata(path)[0].get("general.type", "model")


def describe(path: Path) -> tuple[dict, dict]:
    """`details` and `model_info` as Ollama reads them from a GGUF (arrays over 5 emptied)."""
    fields, count = _metadata(path)
    info = {k: v for k, v in fields.items() if k not in ("general.name", "tokenizer.chat_template")}
    info["general.parameter_count"] = count
    family = info.get("general.architecture", "")
    details = {"parent_model": "", "format": "gguf", "family": family, "families": [family]}
    quant = FILE_TYPES.get(info.get("general.file_type", -1), "unknown")
    return details | {"parameter_size": human_number(count), "quantization_level": quant}, info


@functools.cache
def _metadata(path: Path) -> tuple[dict[str, Any], int]:
    """A GGUF's fields (arrays over 5 emptied) and parameter count, parsed once per path:
    the double's blobs are named by their sha256, so a path's content never changes, and
    GGUFReader takes seconds on a large vocabulary (12 s on Gemma's), on every create,
    show, list and ps."""
    reader = gguf.GGUFReader(path)
    fields: dict[str, Any] = {}
    for key, item in reader.fields.items():
        if not key.startswith("GGUF."):
            big = item.types[0] == gguf.GGUFValueType.ARRAY and len(item.data) > 5
            fields[key] = [] if big else item.contents()
    return fields, sum(int(t.n_elements) for t in reader.tensors)


@functools.cache
def tensors(path: Path) -> list[dict]:
    """/api/show verbose's `tensors`: each tensor's name, ggml type name and shape as the
    file stores them (server/routes.go GetModelInfo)."""
    return [
        {"name": t.name, "type": t.tensor_type.name, "shape": [int(n) for n in t.shape]}
        for t in gguf.GGUFReader(path).tensors
    ]


def kv_cache_bytes(info: dict, num_ctx: int) -> int:
    """F16 K and V for every layer and context slot, which /api/ps adds to the weights."""
    arch = info["general.architecture"]
    heads = info[f"{arch}.attention.head_count"]
    kv_heads = info.get(f"{arch}.attention.head_count_kv", heads)
    width = info[f"{arch}.embedding_length"] // heads * kv_heads
    return 2 * 2 * info[f"{arch}.block_count"] * num_ctx * width


# --- which template serves: server/images.go ----------------------------------------------


def chat_template_capabilities(chat_template: str) -> list[str]:
    """chatTemplateCapabilities: tools and thinking, read from the GGUF's Jinja text."""
    found = []
    if "tools" in chat_template or "tool_call" in chat_template:
        found.append("tools")
    split = "content.split('</think>')" in chat_template or 'content.split("</think>")' in (
        chat_template
    )
    if ("<think>" in chat_template and "</think>" in chat_template) or (
        split and "reasoning_content" not in chat_template
    ):
        found.append("thinking")
    return found


def chat_template_round_trip(chat_template: str) -> bool:
    """chatTemplateHasToolRoundTrip: tool calls written and tool results read back."""
    if "tools" not in chat_template and "tool_call" not in chat_template:
        return False
    calls = "tool_calls" in chat_template or "assistant_tool_call" in chat_template
    results = ("tool_response", "tool_results", "ipython", "== 'tool'", '== "tool"')
    return calls and any(r in chat_template for r in results)


def go_template_capabilities(template: str) -> list[str]:
    """goTemplateCapabilities: `.Tools` makes tools (Vars), think tags thinking (InferTags,
    approximated by the template using `.Thinking` or `.Think`)."""
    found = ["tools"] if re.search(r"\.Tools\b", template) else []
    return found + (["thinking"] if re.search(r"\.(Thinking|Think)\b", template) else [])


def go_template_round_trip(template: str) -> bool:
    """goTemplateHasToolRoundTrip."""
    if not (re.search(r"\.Tools\b", template) and re.search(r"\.ToolCalls\b", template)):
        return False
    return any(s in template for s in ('eq .Role "tool"', "tool_response", "TOOL_RESULTS"))


def prefers_chat_template(chat_template: str, go_template: str) -> bool:
    """GetModel's PreferChatTemplate (shouldPreferChatTemplate), OLLAMA_GO_TEMPLATE unset:
    the GGUF's own template serves when it has more abilities than the Go TEMPLATE, or the
    same with tools where only it can read tool results back."""
    if not chat_template or not go_template:
        return False
    chat, go = chat_template_capabilities(chat_template), go_template_capabilities(go_template)
    if len(chat) > len(go):
        return not go_template_round_trip(go_template) or chat_template_round_trip(chat_template)
    if sorted(chat) != sorted(go) or "tools" not in chat:
        return False
    return chat_template_round_trip(chat_template) and not go_template_round_trip(go_template)


# --- llama-server's Jinja path: llm/llama_server.go ApplyChatTemplate and Chat ------------


def render_jinja(
    chat_template: str,
    messages: list[dict],
    bos: str,
    eos: str,
    adds_bos: bool,
    think: bool | None,
) -> str:
    """llama-server /apply-template: the GGUF's template with the generation prompt,
    `enable_thinking` from Ollama's chat_template_kwargs (llamaServerChatTemplateKwargs: only
    when think is set), and a leading BOS text taken out where the vocabulary adds BOS
    (common/chat.cpp), as the HF-style environment renders it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, **_: __import__("json").dumps(value)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals |= {"raise_exception": raise_exception}
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    kwargs = {} if think is None else {"enable_thinking": think}
    text = env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos, **kwargs
    )
    return text.removeprefix(bos) if adds_bos and bos else text


def split_thinking(parts, opened: bool):
    """llama-server's reasoning extraction (reasoning_format auto): text inside
    <think>...</think>, or after a generation prompt that opened <think>, becomes Thought,
    the rest content; the tags are not sent. Works on the streamed (text, final) parts."""
    thinking, pending = opened, ""
    for text, final in parts:
        pending += text
        while (at := pending.find(tag := "</think>" if thinking else "<think>")) >= 0:
            if at:
                yield _marked(pending[:at], thinking), None
            pending = pending[at + len(tag) :].lstrip("\n" if thinking else "")
            thinking = not thinking
        if final is not None:
            if pending:
                yield _marked(pending, thinking), None
            yield "", final
            return
        keep = max((k for k in range(1, len(tag)) if pending.endswith(tag[:k])), default=0)
        if out := pending[: len(pending) - keep]:
            yield _marked(out, thinking), None
        pending = pending[len(out) :]


def _marked(text: str, thinking: bool) -> str:
    return Thought(text) if thinking else text
