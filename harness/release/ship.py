"""A chosen cell shipped to Ollama under a stable name (`NAME:latest`, as a nightly job
serves it), replacing what serves there only once the new model has passed the chat check.

The cell is created under `NAME:candidate` first and checked there (template, stops, export
parity: `harness.stages.check`); only then is it copied over `NAME:latest` (Ollama's copy
moves a name, the layers are already there) and the candidate name removed. A model that
fails the check never replaces the one users are served, and a kill at any point leaves
`NAME:latest` either the old model or the new one, never a half-made one.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.backends import OllamaBackend
from harness.errors import ForgebenchError
from harness.plan.cells import Cell
from harness.plan.store import Store
from harness.run.deployment import lora_gguf, serve_config, with_setting
from harness.spec import Spec, serving
from harness.stages import check

STABLE, CANDIDATE = "latest", "candidate"
"""The tag users are served under, and the one a new build is checked under before it
takes the stable one."""


class NotShipped(ForgebenchError):
    """The candidate failed the chat check on Ollama; what serves was left as it was."""


@dataclass(frozen=True)
class Shipped:
    name: str
    digest: str | None
    replaced: str | None
    """The digest that served under the name before, None when nothing did."""


def ship(spec: Spec, cell: Cell, store: Store, model: str, host: str | None = None) -> Shipped:
    """Deploy `cell` to the Ollama at `host` (OLLAMA_HOST by default) as `MODEL:latest`."""
    stable, candidate = f"{model}:{STABLE}", f"{model}:{CANDIDATE}"
    gguf = store.path(cell.gguf) / "model.gguf"
    if cell.setting is not None:  # a serving setting ships as the model's own parameters
        wide = [k for k in cell.setting.as_dict() if k in serving.SERVER_WIDE]
        if wide:
            raise ForgebenchError(
                f"{cell.name} is served with {', '.join(wide)} other than the spec's own, "
                "which Ollama sets for the whole server ("
                + ", ".join(serving.SERVER_WIDE_ENV[k] for k in wide)
                + f"), not per model: set that on the server and ship {cell.line}-{cell.level}"
            )
    config, tokenizer = serve_config(spec, cell, store, candidate, lora_gguf(cell, store))
    if cell.setting is not None:
        config = with_setting(config, cell.setting.as_dict())
    with OllamaBackend(host) as ollama:
        before = ollama.digest(stable)
        deployment = ollama.deploy(gguf, config)
        try:
            template, _ = check.served_template(deployment, config.chat_template)
            exchange = check.run_check(
                ollama, deployment, tokenizer, gguf, template, spec.serve.system
            )
            if not exchange.ok:
                raise NotShipped(
                    f"{cell.name} failed the chat check on Ollama as {candidate}: "
                    + "; ".join(exchange.reasons)
                    + f"; {stable} is left as it was"
                )
            ollama.copy(candidate, stable)
        finally:
            ollama.remove(deployment)
        return Shipped(stable, ollama.digest(stable), before)
