"""Chat templates for models that have none: a small registry of families, and the one rule
for which template a run uses.

A pretrained base model (the usual start of a fine-tune) has no chat template, and a chat
model cannot be trained, served or checked without one. `serve.chat_template` names one:
a family below or a Jinja file. The resolve stage writes it into the resolved model's
tokenizer, so training's loss mask, the merged model (and the GGUF converted from it), the
check, the PyTorch reference and both backends read the same text from one place.

Each family is written in the standard form of its models, without the `| trim` some of
them apply to message contents, so that it renders the same bytes as the Go template the
Ollama backend derives for it (`harness.backends.ollama.go_template`). Llama 3 and Gemma
start with `bos_token`, as their models' own templates do (their GGUFs add BOS, and
llama.cpp takes a leading BOS text out of a rendered prompt); ChatML writes none. Compared
with a Go rendering, which never writes BOS, render with `bos_token=""`.
"""

from __future__ import annotations

FAMILIES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{- message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    "gemma": (
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
    ),
}
"""Family name -> Jinja chat template; the families `go_template` recognises."""
