"""check: is the served model a working chat model? (template and stop check)

A wrong or missing chat template is the most common reason an exported model
"talks to itself": it never emits its end-of-turn token, or writes the next
role header and answers its own question. Before anything is scored, a fixed
short conversation is sent to the deployment, and the cell is "broken" unless
the model stops by itself (not at max tokens), writes no role header or second
turn, and the server's prompt token count equals what the model's own
tokenizer and chat template give for the same conversation.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.backends import Backend, Deployment

VERSION = 1  # bump when this stage's outputs change: tests/test_keys.py checks it

# A question every sane chat model ends quickly: on SmolLM2-135M and its arithmetic
# adapters, at every level from f16 to q2_k, it stops by itself, where "say hello"
# sends some of them into an endless run of emoji, a quality problem, not a template one.
CONVERSATION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
MAX_TOKENS = 96
ROLE_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|start_header_id\|>|<\|eot_id\|>|<start_of_turn>|"
    r"<end_of_turn>|^\s*(user|assistant|system)\s*[:\n]",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]
    response: str
    done_reason: str | None
    server_prompt_tokens: int | None
    template_prompt_tokens: int


def expected_prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    return len(ids)


def judge(
    response: str, done_reason: str | None, server_tokens: int | None, template_tokens: int
) -> list[str]:
    """Reasons the exchange shows a broken chat setup; empty when it is sound."""
    reasons = []
    if done_reason != "stop":
        reasons.append(
            f"did not stop by itself (done_reason={done_reason!r} after "
            f"{MAX_TOKENS} tokens max): end-of-turn token never produced"
        )
    if marker := ROLE_MARKERS.search(response):
        reasons.append(f"wrote a role header or second turn ({marker.group(0).strip()!r})")
    if server_tokens is not None and server_tokens != template_tokens:
        reasons.append(
            f"server rendered {server_tokens} prompt tokens, the model's chat "
            f"template gives {template_tokens}: the served template differs"
        )
    return reasons


def run_check(
    backend: Backend, deployment: Deployment, tokenizer, system: str | None = None
) -> Verdict:
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    text, final = "", None
    for chunk in backend.chat(deployment, messages, max_tokens=MAX_TOKENS):
        text += chunk.text
        if chunk.done:
            final = chunk
    done_reason = final.done_reason if final else None
    server_tokens = final.prompt_tokens if final else None
    template_tokens = expected_prompt_tokens(tokenizer, messages)
    reasons = judge(text, done_reason, server_tokens, template_tokens)
    return Verdict(not reasons, reasons, text, done_reason, server_tokens, template_tokens)


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress, served) -> dict:
    progress("template and stop check", None)
    served.deploy()
    verdict = run_check(
        served.backend, served.deployment, served.tokenizer, settings["serve"].get("system")
    )
    (out / "verdict.json").write_text(json.dumps(asdict(verdict), indent=2))
    if text := modelfile(served):
        (out / "Modelfile").write_text(text)
    return {"check_ok": int(verdict.ok), "check_reasons": "; ".join(verdict.reasons)}


def modelfile(served) -> str | None:
    """The deployment as a Modelfile a user can `ollama create -f` by hand, whichever backend
    served it; None when the template has no Ollama equivalent."""
    from harness.backends import ollama

    if text := served.deployment.details.get("modelfile"):
        return text
    try:
        template, stops = ollama.go_template(served.config.chat_template)
        parameters = ollama.create_parameters(served.config, stops)
        return ollama.modelfile(served.gguf, template, served.config.system, parameters)
    except ValueError:
        return None
