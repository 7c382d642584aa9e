"""A served cell's lifecycle: its model deployed on the cell's backend the first time a
served stage (check, evaluate, bench) has work to do, shared by all of them, and
removed when the cell is done (unless serve.keep leaves it in Ollama). On the adapter
route a level's cells may share one llama-server (harness/run/sharing.py), which the
`Sharing` owns and stops, not the cell."""

from __future__ import annotations

from harness import backends
from harness.errors import ForgebenchError
from harness.plan.cells import Cell
from harness.plan.store import Store
from harness.run.sharing import Sharing
from harness.spec.schema import Spec


class Served:
    """The cell's model on its backend, deployed only when a served stage has work to do."""

    def __init__(self, spec: Spec, cell: Cell, store: Store, sharing: Sharing | None = None):
        self.spec, self.cell, self.store, self.sharing = spec, cell, store, sharing
        self.gguf = store.path(cell.gguf) / "model.gguf"
        self.adapter = store.path(cell.lora_gguf) / "adapter.gguf" if cell.lora_gguf else None
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
        self.deployment = self._own.deploy(self.gguf, self.config)
        return self

    def _config(self) -> backends.ServeConfig:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            self.store.path(self.cell.model) / "model",
            trust_remote_code=self.spec.base.trust_remote_code,
        )
        return backends.ServeConfig(
            model_name=backends.model_name(
                self.spec.name,
                self.cell.line if self.cell.lora else None,
                self.cell.quant,
                self.spec.base.ollama,
            ),
            chat_template=self.tokenizer.chat_template,  # resolve saw to it that one is there
            system=self.spec.serve.system,
            parameters=dict(self.spec.serve.parameters),
            slots=self.spec.serve.slots,
            adapter=self.adapter,
        )

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
