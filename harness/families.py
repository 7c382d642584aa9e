"""Chat-template families: the turn formats forgebench can write for a model that has none
(`serve.chat_template: chatml`) and recognise in a model that has one, each in Jinja (what
the tokenizer, training, llama-server and the check render) and in Go (what Ollama
renders), with its stop strings. One row a family, so the two forms never drift apart;
tests/test_go_template.py renders both and compares the bytes.

Each Jinja form is written in the standard form of its models, without the `| trim` some
of them apply to message contents, so that it renders the same bytes as the Go form. Llama
3 and Gemma start with `bos_token`, as their models' own templates do (their GGUFs add BOS,
and llama.cpp takes a leading BOS text out of a rendered prompt); ChatML writes none. The
Go forms write no BOS (llama.cpp adds it when the GGUF asks), so compare a Go rendering
with a Jinja one rendered with `bos_token=""`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    marker: str
    """The turn marker that identifies a template of this family."""
    jinja: str
    go: str
    """As Ollama's own templates write it (template/chatml.gotmpl, llama3-instruct.gotmpl,
    gemma3-instruct.gotmpl)."""
    stops: tuple[str, ...]


_CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_LLAMA3_JINJA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
_GEMMA_JINJA = (
    "{{- bos_token }}"
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages if message['role'] == 'system' %}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<start_of_turn>user\\n' + (ns.system + '\\n\\n' if ns.system else '') }}"
    "{%- set ns.system = '' %}"
    "{{- message['content'] + '<end_of_turn>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

_CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
_LLAMA3_GO = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Gemma has no system turn: its template puts the system prompt at the top of the first
# user turn, followed by a blank line.
_GEMMA_GO = (
    "{{- $system := .System }}{{- range .Messages }}"
    '{{- if eq .Role "user" }}<start_of_turn>user\n'
    "{{ if $system }}{{ $system }}\n\n{{ end }}"
    '{{ $system = "" }}{{ .Content }}<end_of_turn>\n'
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
    "{{ end }}{{- end }}<start_of_turn>model\n"
)


TABLE = (
    Family("chatml", "<|im_start|>", _CHATML_JINJA, _CHATML_GO, ("<|im_start|>", "<|im_end|>")),
    Family(
        "llama3",
        "<|start_header_id|>",
        _LLAMA3_JINJA,
        _LLAMA3_GO,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    Family(
        "gemma", "<start_of_turn>", _GEMMA_JINJA, _GEMMA_GO, ("<start_of_turn>", "<end_of_turn>")
    ),
)
"""The families, in the order a template is tested against their markers."""
BY_NAME = {family.name: family for family in TABLE}
FAMILIES: dict[str, str] = {family.name: family.jinja for family in TABLE}
"""Family name -> Jinja chat template: what `serve.chat_template` may name."""


def recognise(template: str) -> Family | None:
    """The family whose turn marker a chat template (Jinja, as a model ships it) uses."""
    return next((family for family in TABLE if family.marker in template), None)
