"""A served cell's lifecycle: its model deployed on the cell's backend the first time a
served stage (check, evaluate, bench) has work to do, shared by all of them, and
removed when the cell is done (unless serve.keep leaves it in Ollama). On the adapter
route a level's cells may share one llama-server, which `Sharing` owns and stops, not
the cell.

`Sharing`: one llama-server per base level for the adapter route's cells.

The adapter route ships one base file per level and one small LoRA GGUF per adapter;
deployed cell by cell, as the merge route is, a level with N adapters would still load its
base N times. The serial executor instead gives the adapter cells of one base level one
llama-server with all of their LoRA GGUFs loaded at scale 0 (`--lora` each,
`--lora-init-without-apply`), and every request of a cell picks its own adapter at scale 1
through the per-request `lora` field (`Deployment.request_fields`).

llama.cpp never applies an adapter at scale 0 (`llama_context::set_adapters_lora` leaves
it out), so a cell's answers are those of a server with its adapter alone: that is why the
served stages' keys name only the cell's own LoRA GGUF, and why the cells can share. The
bench still deploys each cell by itself: its memory and speed are those of the one
adapter a user ships.

No request on a shared server reuses a cached prompt (`cache_prompt: false`, and
`--cache-ram 0`): llama-server matches its prompt cache by tokens alone, not by adapter,
and the cells of a level ask the same items. With the cache on, the second adapter's
F16 evaluation on experiments/quickstart-routes.yaml answered 11 of 100 arithmetic
items unlike the same adapter served alone; with it off, none. (At quantized levels,
4 requests in flight answer a few items differently from run to run on any server, as
the batches they share vary; one at a time, shared and alone agree on every item.)
A shared server that will not start leaves each of its cells to
deploy alone; one that dies is started again for the next cell.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness import backends
from harness.backends import Backend, Deployment
from harness.errors import ForgebenchError
from harness.plan.cells import Cell
from harness.plan.store import Store
from harness.spec import Spec

log = logging.getLogger(__name__)

SHARED_NAME = "adapters"
"""The shared server's model name: forgebench/<experiment>-adapters-<level>."""


@dataclass
class _Server:
    backend: Backend
    deployment: Deployment
    loras: list[Path]
    """Its --lora files in order: a request's `lora` id indexes this list."""


class Sharing:
    """The shared servers of a run: started by the first cell of a level that deploys,
    stopped when the last of that level's cells is done (`done`) or the run ends."""

    def __init__(self, spec: Spec, cells: list[Cell], store: Store) -> None:
        self.spec, self.store = spec, store
        groups: dict[str, list[Cell]] = {}
        for cell in cells:
            if cell.lora_gguf is not None and cell.backend == "llamacpp" and not cell.setting:
                groups.setdefault(cell.gguf.key, []).append(cell)
        self.groups = {key: group for key, group in groups.items() if len(group) > 1}
        """The base level's key -> its adapter cells, where more than one shares it."""
        self._left = {key: len(group) for key, group in self.groups.items()}
        self._live: dict[str, _Server | None] = {}
        """The level's server; None once it failed to start (its cells deploy alone)."""

    def group(self, cell: Cell) -> list[Cell]:
        """The cells that share `cell`'s server, itself included; [cell] if it serves alone."""
        return self.groups.get(cell.gguf.key, [cell]) if cell.lora_gguf else [cell]

    def batches(self, cells: list[Cell]) -> Iterator[list[Cell]]:
        """`cells` in plan order, a shared level's cells together where its first comes:
        a level's server is up only while its cells run."""
        seen: set[str] = set()
        for cell in cells:
            if cell.name not in seen:
                batch = self.group(cell)
                seen.update(c.name for c in batch)
                yield batch

    def deploy(self, served: Served) -> tuple[Backend, Deployment] | None:
        """The shared server's backend and a deployment that applies `served`'s adapter;
        None when the cell serves alone (no group, or its server would not start)."""
        key = served.cell.gguf.key
        if key not in self.groups or served.adapter is None:
            return None
        server = self._live.get(key)
        if server is not None and server.backend.stopped(server.deployment) is not None:
            log.warning("the shared llama-server of %s stopped; starting it again", key[:12])
            server.backend.close()
            server = self._live[key] = self._start(key, served)
        elif key not in self._live:
            server = self._live[key] = self._start(key, served)
        if server is None or served.adapter not in server.loras:
            return None
        shared = server.deployment
        return server.backend, dataclasses.replace(
            shared,
            details={**shared.details, "adapters_loaded": len(server.loras)},
            request_fields={
                "lora": [{"id": server.loras.index(served.adapter), "scale": 1.0}],
                "cache_prompt": False,  # see the module's docstring
            },
        )

    def _start(self, key: str, served: Served) -> _Server | None:
        loras = list(  # two LoRA configs alike but in name share one file
            dict.fromkeys(
                self.store.path(cell.lora_gguf) / "adapter.gguf"
                for cell in self.groups[key]
                if self.store.has(cell.lora_gguf)
            )
        )
        name = backends.model_name(
            self.spec.name, SHARED_NAME, served.cell.quant, self.spec.base.ollama
        )
        config = dataclasses.replace(
            served.config, model_name=name, adapter=None, adapters=tuple(loras)
        )
        backend = backends.get("llamacpp")
        try:
            deployment = backend.deploy(served.gguf, config)
        except ForgebenchError as exc:
            backend.close()
            log.warning("%s: %s; its %d cells deploy one by one", name, exc, len(loras))
            return None
        log.info("%s: %d adapters on one server", name, len(loras))
        return _Server(backend, deployment, loras)

    def done(self, cell: Cell) -> None:
        """`cell` is finished; after the last cell of its level, its server stops."""
        key = cell.gguf.key
        if cell.lora_gguf is None or key not in self._left:
            return
        self._left[key] -= 1
        if self._left[key] == 0 and (server := self._live.pop(key, None)):
            server.backend.close()

    def close(self) -> None:
        for server in self._live.values():
            if server is not None:
                server.backend.close()
        self._live.clear()


class Served:
    """The cell's model on its backend, deployed only when a served stage has work to do."""

    def __init__(self, spec: Spec, cell: Cell, store: Store, sharing: Sharing | None = None):
        self.spec, self.cell, self.store, self.sharing = spec, cell, store, sharing
        self.gguf = store.path(cell.gguf) / "model.gguf"
        self.adapter = lora_gguf(cell, store)
        """The LoRA GGUF served beside the base GGUF (the adapter route), else None."""
        self.config: backends.ServeConfig | None = None
        """The cell's own deployment settings (a shared server's differ in name and LoRAs)."""
        self.backend: backends.Backend | None = None
        """The backend of `deployment`: the cell's own, or the shared server's."""
        self.deployment: backends.Deployment | None = None
        self.shared = False
        """Whether `deployment` is a shared server's, which the cell must not remove."""
        self.tokenizer = None
        self._own: backends.Backend | None = None
        self.left_behind: tuple[str, str] | None = None
        """(model, why) when removing the cell's own deployment failed (Ollama went away):
        it stays on the server, and `forgebench clean` lists it."""

    def __enter__(self) -> Served:
        return self

    def deploy(self, alone: bool = False) -> Served:
        """Deploy the cell unless it is; `alone`: deploy it anew and by itself, replacing
        what the earlier stages used (the bench's: its memory and speed then carry neither
        their requests' leftovers, such as llama-server's prompt cache, nor other adapters)."""
        if self.deployment is not None and not alone:
            return self
        if self.config is None:
            self.config = self._config()
        self._drop()
        shared = None if alone or self.sharing is None else self.sharing.deploy(self)
        if shared is not None:
            (self.backend, self.deployment), self.shared = shared, True
            return self
        if self._own is None:
            self._own = backends.get(self.cell.backend)
        self.backend = self._own
        setting = self.cell.setting
        # answers are scored at the part of a serving setting that can change them; speed
        # and memory are measured (alone) at all of it (harness.spec.serving)
        values = {} if setting is None else setting.as_dict() if alone else setting.answers()
        self.deployment = self._own.deploy(self.gguf, with_setting(self.config, values))
        return self

    def _config(self) -> backends.ServeConfig:
        name = backends.model_name(
            self.spec.name,
            self.cell.line if self.cell.lora else None,
            self.cell.quant,
            self.spec.base.ollama,
        )
        config, self.tokenizer = serve_config(self.spec, self.cell, self.store, name, self.adapter)
        return config

    def _drop(self) -> None:
        """Forget the current deployment: the cell's own is removed, a shared one is left."""
        deployment, self.deployment = self.deployment, None
        if deployment is not None and not self.shared:
            self._own.remove(deployment)
        self.shared = False

    def __exit__(self, *exc) -> None:
        if self._own is not None:
            try:
                if self.deployment is not None and not self.shared and not self.kept:
                    self._own.remove(self.deployment)
            except ForgebenchError as error:
                # the cell's measurements are done; a server that went away keeps the model
                self.left_behind = (self.deployment.model_name, str(error))
            finally:
                self._own.close()

    @property
    def kept(self) -> bool:
        """serve.keep leaves an Ollama model in place for `ollama run`; a llama-server
        cannot outlive the run."""
        return self.spec.serve.keep and self.cell.backend == "ollama"


def with_setting(config: backends.ServeConfig, values: dict) -> backends.ServeConfig:
    """`config` served at a serving setting's `values` (harness.spec.serving)."""
    parameters = dict(config.parameters)
    if "num_ctx" in values:
        parameters["num_ctx"] = values["num_ctx"]
    if "threads" in values:
        parameters["num_thread"] = values["threads"]
    return dataclasses.replace(
        config,
        parameters=parameters,
        slots=values.get("slots", config.slots),
        cache_type=values.get("kv_cache", config.cache_type),
        flash_attn=values.get("flash_attn", config.flash_attn),
    )


def lora_gguf(cell: Cell, store: Store) -> Path | None:
    """The LoRA GGUF the adapter route serves beside the base GGUF, else None."""
    return store.path(cell.lora_gguf) / "adapter.gguf" if cell.lora_gguf else None


def serve_config(spec: Spec, cell: Cell, store: Store, name: str, adapter: Path | None):
    """How the cell's model is deployed under `name` (its chat template from the tokenizer
    the chain built, the spec's system prompt and parameters, `adapter`: the LoRA GGUF on
    the adapter route), and that tokenizer: what the measured deployment and the release's
    share."""
    from transformers import AutoTokenizer  # heavy: only where a cell is deployed

    tokenizer = AutoTokenizer.from_pretrained(
        store.path(cell.model) / "model", trust_remote_code=spec.base.trust_remote_code
    )
    config = backends.ServeConfig(
        model_name=name,
        chat_template=tokenizer.chat_template,  # resolve saw to it that one is there
        system=spec.serve.system,
        parameters=dict(spec.serve.parameters),
        slots=spec.serve.slots,
        adapter=adapter,
        quantize=cell.server_quantize,
    )
    return config, tokenizer
