"""What Ollama is asked to create for a deployment, and which template it keeps.

The Go template and stop strings derived from the model's own Jinja chat template, the
parameters with their stop strings merged, and the same deployment written as a Modelfile
for `ollama create -f` by hand; then, from what `/api/show` reads back, whether the given
Go template serves or the GGUF's own Jinja one. Apart from `ollama.OllamaBackend`, which
talks to the server, since the check stage writes a Modelfile whichever backend served.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness import families
from harness.backends.base import ServeConfig
from harness.sources import gguf as gguf_meta

# The default system turn goes before a first message that is not a system one, as the
# Jinja templates test messages[0]; not on `.System`, which an empty or later system
# message would get wrong (Go's rendering of both is checked in tests/test_go_template.py).
CHATML_DEFAULT_SYSTEM = (
    "{{- $first := true }}{{- range .Messages }}{{- if $first }}"
    '{{- if eq .Role "system" }}{{ else }}<|im_start|>system\n%s<|im_end|>\n{{ end }}'
    "{{- end }}{{- $first = false }}{{- end }}"
)
# A ChatML template's system turn written out as a literal, used when the conversation
# does not start with a system message (SmolLM2's "You are a helpful AI assistant named
# SmolLM", Qwen's "You are Qwen").
DEFAULT_SYSTEM = re.compile(r"""['"]<\|im_start\|>system(?:\n|\\n)([^'"{}]*?)<\|im_end\|>""")


def go_template(jinja_template: str) -> tuple[str, list[str]]:
    """The Ollama (Go) template and stop strings equivalent to a model's Jinja chat template.

    Recognises ChatML (SmolLM2, Qwen), Llama 3 and Gemma by their turn markers and raises
    ValueError for anything else: a guessed template would serve a model that looks fine
    and answers badly. The derived template renders the same prompt text as the Jinja one
    for system/user/assistant conversations (Llama 3.1's date preamble aside), so the
    prompt token count Ollama reports matches the tokenizer's.
    """
    if "<|im_start|>" in jinja_template:
        default = DEFAULT_SYSTEM.search(jinja_template)
        prefix = CHATML_DEFAULT_SYSTEM % default.group(1).replace("\\n", "\n") if default else ""
        chatml = families.BY_NAME["chatml"]
        return prefix + chatml.go, list(chatml.stops)
    family = families.recognise(jinja_template)
    if family is not None:
        return family.go, list(family.stops)
    raise ValueError(
        "unrecognised chat template: not ChatML (<|im_start|>), Llama 3 (<|start_header_id|>) "
        "or Gemma (<start_of_turn>); give the model a known template (serve.chat_template) "
        "or use serve.backend: llamacpp, which runs the Jinja template itself"
    )


def modelfile(
    gguf_path: Path,
    template: str,
    system: str | None,
    parameters: dict[str, Any],
    adapter: Path | None = None,
) -> str:
    """The deployment as a Modelfile, for `ollama create NAME -f Modelfile` by hand.

    Quoting follows Ollama's parser (parser/parser.go): TEMPLATE and SYSTEM go in triple
    quotes, string parameters (stop strings) in quotes, one PARAMETER line per list item.
    The parser has no escapes, so a value holding three quotes cannot be written.
    """
    lines = [f"FROM {_quoted(str(Path(gguf_path).resolve()), bare_ok=True)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_quoted(str(Path(adapter).resolve()), bare_ok=True)}")
    lines.append(f'TEMPLATE """{_checked(template)}"""')
    if system:
        lines.append(f'SYSTEM """{_checked(system)}"""')
    for name, value in parameters.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            lines.append(f"PARAMETER {name} {_parameter(item)}")
    return "\n".join(lines) + "\n"


def _checked(value: str) -> str:
    """Ollama's parser ends a triple-quoted value at the first three quotes and knows no
    escapes: a value holding three quotes, or ending in one (which would merge with the
    closing three), cannot be written without changing what it says."""
    if '"""' in value or value.endswith('"'):
        raise ValueError(f"a Modelfile cannot hold {value[:40]!r}: it would end the quotes early")
    return value


def _quoted(value: str, bare_ok: bool = False) -> str:
    if bare_ok and not re.search(r'[\s"]', value):
        return value
    return f'"{value}"' if '"' not in value else f'"""{_checked(value)}"""'


def _parameter(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return _quoted(value) if isinstance(value, str) else str(value)


def create_parameters(config: ServeConfig, stops: list[str]) -> dict[str, Any]:
    """The model's parameters: the config's, with the template's and config's stop strings."""
    given = config.parameters.get("stop") or []
    given = [given] if isinstance(given, str) else list(given)
    merged = list(dict.fromkeys([*stops, *config.stop, *given]))
    return {**config.parameters, **({"stop": merged} if merged else {})}


GO_TEMPLATE, GGUF_TEMPLATE = "go_template", "gguf_chat_template"
"""Which template serves, in Ollama's own words (server/images.go selectedTemplateSource)."""


def template_source(shown: str | None, go: str, jinja: str) -> str | None:
    """Which template Ollama serves, from what /api/show calls the template: the Go
    template it was given, or the GGUF's own (tokenizer.chat_template), which Ollama 0.30+
    prefers when that one mentions tools or <think> and the Go template lacks those
    abilities (server/images.go GetModel, shouldPreferChatTemplate: PreferChatTemplate);
    then chat runs llama-server's Jinja path and /api/show returns the Jinja text
    (server/routes.go selectedModelTemplate). That is accepted only when it is the
    deployment's own Jinja template (`jinja`, which the Go one was derived from); None
    for anything else."""
    if shown == go:
        return GO_TEMPLATE
    if shown == jinja:
        return GGUF_TEMPLATE
    return None


def kept_template(shown: str | None, go: str, config: ServeConfig, gguf_path: Path) -> str:
    """`template_source`; a ValueError saying why when the template Ollama kept is neither."""
    source = template_source(shown, go, config.chat_template)
    if source is not None:
        return source
    embedded = gguf_meta.read(gguf_path).chat_template
    kept = "the GGUF's own, " if embedded and shown == embedded else ""
    raise ValueError(
        f"kept another template for {config.model_name} ({kept}not the one it was given "
        "nor the deployment's chat template), so it would not render prompts as the model "
        "expects; start it with OLLAMA_GO_TEMPLATE=1 to serve the given one (server/routes.go "
        "shouldUseGoTemplate) or use serve.backend: llamacpp"
    )
