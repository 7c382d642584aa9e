"""check: is the served model a working chat model, prompted as its tokenizer prompts it?

A wrong or missing chat template is the most common reason an exported model
"talks to itself": it never emits its end-of-turn token, or writes the next
role header and answers its own question. Before anything is scored, a fixed
short conversation is sent to the deployment, and the cell is "broken" unless
the model stops by itself (not at max tokens), writes no role header or second
turn, and the server's prompt token count equals what the model's own
tokenizer and chat template give for the same conversation.

Export parity, the subtler half: a template that is only slightly off (another
default system prompt, a lost newline) still stops and still looks fine, and is
scored on prompts the model never saw. So the prompt the server builds for the
conversation (llama-server's /apply-template, Ollama's render-only chat) must
equal, byte for byte, the HF tokenizer's `apply_chat_template` text, and the
GGUF's tokenizer metadata (EOS, end of turn, BOS and add-BOS, special-token
types, its own chat template) must agree with the tokenizer.

On the adapter route, a LoRA the server loaded but does not apply (a wrong tensor
name, a zeroed adapter) passes all of that: the base answers. So a few fixed prompts are
answered greedily with the adapter at scale 0 and at scale 1, and if no answer differs the
cell is `broken (adapter not applied)`. Reasons of this
kind start with "template:", the verdict's `broken (template)`; the renderings,
their diff and the findings are written to parity_diff.txt.

What is judged is what serves: Ollama 0.30+ may keep the GGUF's own Jinja template
instead of the Go template it was given (`template_source` in the deployment), and then
that Jinja text is the served template. A thinking model answers apart from its
thinking (Ollama's default think=true, as users run it): only the answer is judged, the
thinking is recorded, and it gets THINKING_TOKENS more to finish. The token comparison
reads the first chat after the deploy, on a cold prompt cache, where every server
version counts the whole prompt (see harness/backends/ollama_stream.py `chunk_from`).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.backends import Backend, Deployment, ollama_modelfile
from harness.sources import gguf as gguf_meta
from harness.sources.parity import (
    TEMPLATE,
    as_tokenized,
    expected_prompt,
    first_difference,
    lint,
    reference_template,
    trained_tokenizer,
)

VERSION = 4  # bump when this stage's outputs change: tests/test_keys.py checks it

# A question every sane chat model ends quickly: on SmolLM2-135M and its arithmetic
# adapters, at every level from f16 to q2_k, it stops by itself, where "say hello"
# sends some of them into an endless run of emoji, a quality problem, not a template one.
CONVERSATION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
MAX_TOKENS = 96
THINKING_TOKENS = 512
"""Extra tokens for a model whose server says it thinks ("thinking" in its capabilities)."""
ROLE_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|start_header_id\|>|<\|eot_id\|>|<start_of_turn>|"
    r"<end_of_turn>|^\s*(user|assistant|system)\s*[:\n]",
    re.IGNORECASE | re.MULTILINE,
)
DIFF_FILE = "parity_diff.txt"
SERVED_MODEL = "served_model.json"
"""Where Ollama quantized the F16 itself (a recipe `by: ollama`): the tensor types and size
of the file it made, which stays on the server."""
ADAPTER_PROBES = (
    CONVERSATION,
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
)
"""Asked greedily with the adapter at scale 0 and at scale 1 (the adapter route): a LoRA
that changes none of the answers was not applied, or learned nothing."""
ADAPTER_PROBE_TOKENS = 24
NOT_APPLIED = "adapter not applied:"
"""The reason, and the verdict's `broken (adapter not applied)`."""


@dataclass
class Parity:
    ok: bool
    reasons: list[str]
    by_text: bool
    """Compared as text; False where the server cannot show its prompt (token counts only)."""
    tokenizer_prompt: str
    server_prompt: str | None
    """As the server's tokenizer reads it (see `as_tokenized`)."""


@dataclass
class Exchange:
    """One chat with the deployed model and what it showed: whether the setup is sound, and
    why not."""

    ok: bool
    reasons: list[str]
    response: str
    done_reason: str | None
    server_prompt_tokens: int | None
    template_prompt_tokens: int
    parity: Parity
    thinking: str = ""
    """What the model thought before answering (not judged); empty for other models."""
    template_served: str = ""
    """Which template the server renders with: "<backend> <source>", the source
    `go_template` or `gguf_chat_template` (Ollama's words) or `chat_template_file`."""
    served_num_ctx: int | None = None
    """The num_ctx the server loaded the model with (Ollama's /api/ps); without a
    serve.parameters.num_ctx, Ollama's own, set by its GPU memory."""

    @property
    def template_ok(self) -> bool:
        return not any(r.startswith(TEMPLATE) for r in self.reasons)


def export_parity(
    tokenizer, messages: list[dict[str, str]], served_template: str, rendered: str | None, gguf
) -> Parity:
    """The server's rendering against the tokenizer's, and the GGUF's metadata linted."""
    template = reference_template(tokenizer, served_template)
    expected = expected_prompt(tokenizer, messages, template)
    ref = trained_tokenizer(tokenizer, template)
    meta = gguf_meta.read(gguf)
    engine = gguf_meta.engine_view(gguf, set(ref.tokens))
    reasons = lint(ref, meta, engine)
    served = None if rendered is None else as_tokenized(rendered, meta, engine)
    if served is not None and (difference := first_difference(expected, served)):
        if served_template != template:
            difference += ": the deployment was given another template than the tokenizer's"
        reasons.insert(0, f"{difference} (diff in {DIFF_FILE})")
    return Parity(not reasons, reasons, served is not None, expected, served)


def chat_faults(
    response: str,
    done_reason: str | None,
    server_tokens: int | None,
    template_tokens: int,
    by_text: bool = True,
    max_tokens: int = MAX_TOKENS,
) -> list[str]:
    """Reasons the exchange shows a broken chat setup; empty when it is sound. No reason
    holds "; ", which joins them in `check_reasons`."""
    reasons = []
    if done_reason != "stop":
        reasons.append(
            f"did not stop by itself (done_reason={done_reason!r} after "
            f"{max_tokens} tokens max): end-of-turn token never produced"
        )
    if marker := ROLE_MARKERS.search(response):
        reasons.append(f"wrote a role header or second turn ({marker.group(0).strip()!r})")
    if server_tokens is not None and server_tokens != template_tokens:
        reasons.append(
            f"{TEMPLATE} server rendered {server_tokens} prompt tokens, the model's chat "
            f"template gives {template_tokens}: the served template differs"
            + ("" if by_text else " (token counts only: the server cannot show its prompt)")
        )
    return reasons


def run_check(
    backend: Backend,
    deployment: Deployment,
    tokenizer,
    gguf: Path,
    served_template: str,
    system: str | None = None,
) -> Exchange:
    """Chat first, while the prompt cache is cold (see the module docstring), then render."""
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    thinks = "thinking" in deployment.details.get("capabilities", [])
    max_tokens = MAX_TOKENS + (THINKING_TOKENS if thinks else 0)
    text, thinking, final = "", "", None
    for chunk in backend.chat(deployment, messages, max_tokens=max_tokens):
        text += chunk.text
        thinking += getattr(chunk, "thinking", "")  # only Ollama's chunks carry it
        if chunk.done:
            final = chunk
    done_reason = final.done_reason if final else None
    server_tokens = final.prompt_tokens if final else None
    rendered = backend.render_prompt(deployment, messages)
    parity = export_parity(tokenizer, messages, served_template, rendered, gguf)
    template_tokens = len(tokenizer(parity.tokenizer_prompt, add_special_tokens=False).input_ids)
    if not parity.by_text:  # then the token count is all that was measured of the rendering
        parity.ok = parity.ok and server_tokens == template_tokens
        if server_tokens is None:
            parity.reasons.append(
                "export parity unmeasured: the server showed neither its prompt nor its "
                "prompt token count"
            )
    behaviour = chat_faults(
        text, done_reason, server_tokens, template_tokens, parity.by_text, max_tokens
    )
    reasons = [*parity.reasons, *behaviour]
    return Exchange(
        not reasons, reasons, text, done_reason, server_tokens, template_tokens, parity, thinking
    )


def adapter_effect(backend: Backend, deployment: Deployment) -> dict[str, Any]:
    """The probes answered greedily at adapter scale 0 and 1; `applied` when one differs."""
    answers = []
    for messages in ADAPTER_PROBES:
        pair = [
            "".join(
                chunk.text
                for chunk in backend.chat(
                    deployment, messages, max_tokens=ADAPTER_PROBE_TOKENS, adapter_scale=scale
                )
            )
            for scale in (0.0, 1.0)
        ]
        answers.append({"prompt": messages[-1]["content"], "scale_0": pair[0], "scale_1": pair[1]})
    return {"applied": any(a["scale_0"] != a["scale_1"] for a in answers), "answers": answers}


def served_template(deployment: Deployment, chat_template: str) -> tuple[str, str]:
    """(the Jinja template that serves, where it comes from): the deployment's own
    (`chat_template`) unless Ollama kept the GGUF's (harness/backends/ollama_modelfile.py
    `template_source`); llama-server always serves the deployment's, from
    --chat-template-file."""
    details = deployment.details
    source = details.get("template_source") or "chat_template_file"
    if source == "gguf_chat_template":
        return details["template"], source
    return chat_template, source


def parity_report(parity: Parity, backend: str) -> str:
    """parity_diff.txt: findings, both renderings as JSON strings (so that whitespace and
    control characters show), and their unified diff."""
    lines = [f"export parity: {'ok' if parity.ok else 'FAILED'}", "", "findings:"]
    lines += [f"  {r}" for r in parity.reasons] or ["  none"]
    if not parity.by_text:
        lines += ["", f"{backend} cannot show its rendered prompt: token counts only compared"]
    lines += ["", f"tokenizer: {json.dumps(parity.tokenizer_prompt)}"]
    lines += [f"server:    {json.dumps(parity.server_prompt)}", ""]
    diff = difflib.unified_diff(
        parity.tokenizer_prompt.splitlines(keepends=True),
        (parity.server_prompt or "").splitlines(keepends=True),
        "tokenizer (apply_chat_template)",
        f"server ({backend}, BOS/EOS it adds written out)",
    )
    return "\n".join(lines) + "".join(diff)


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress, served) -> dict:
    progress("template, stop and export parity check", None)
    served.deploy()
    template, source = served_template(served.deployment, served.config.chat_template)
    verdict = run_check(
        served.backend,
        served.deployment,
        served.tokenizer,
        served.gguf,
        template,
        settings["serve"].get("system"),
    )
    verdict.template_served = f"{served.backend.name} {source}"
    verdict.served_num_ctx = served.deployment.details.get("context_length")
    effect = {}
    if served.adapter is not None:
        effect = adapter_effect(served.backend, served.deployment)
        (out / "adapter_effect.json").write_text(json.dumps(effect, indent=2))
        if not effect["applied"]:
            verdict.ok = False
            verdict.reasons.append(
                f"{NOT_APPLIED} the greedy answers to {len(ADAPTER_PROBES)} prompts are the "
                "same with the LoRA at scale 1 as at scale 0 (see adapter_effect.json)"
            )
    (out / "verdict.json").write_text(json.dumps(asdict(verdict), indent=2))
    (out / DIFF_FILE).write_text(parity_report(verdict.parity, served.backend.name))
    if text := modelfile(served):
        (out / "Modelfile").write_text(text)
    made = {}
    if "tensor_types" in served.deployment.details:  # the server quantized what it was given
        made = {k: served.deployment.details[k] for k in ("tensor_types", "model_bytes")}
        (out / SERVED_MODEL).write_text(json.dumps(made, indent=2))
    return (
        {
            "check_ok": int(verdict.ok),
            "check_template_ok": int(verdict.template_ok),
            "parity_ok": int(verdict.parity.ok),
            "parity_by_text": int(verdict.parity.by_text),
            "check_reasons": "; ".join(verdict.reasons),
        }
        | ({"adapter_applied": int(effect["applied"])} if effect else {})
        | ({"served_model_bytes": made["model_bytes"]} if made.get("model_bytes") else {})
    )


def modelfile(served) -> str | None:
    """The deployment as a Modelfile a user can `ollama create -f` by hand, whichever backend
    served it; None when the template has no Ollama equivalent."""
    if text := served.deployment.details.get("modelfile"):
        return text
    try:
        template, stops = ollama_modelfile.go_template(served.config.chat_template)
        parameters = ollama_modelfile.create_parameters(served.config, stops)
        return ollama_modelfile.modelfile(
            served.gguf, template, served.config.system, parameters, served.adapter
        )
    except ValueError:
        return None
