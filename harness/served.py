"""A served cell's lifecycle: its model deployed on the cell's backend the first time a
served stage (check, evaluate, settle, bench) has work to do, shared by all of them, and
removed when the cell is done (unless serve.keep leaves it in Ollama)."""

from __future__ import annotations

from harness import backends
from harness.planning import Cell
from harness.spec import Spec
from harness.store import Store


class Served:
    """The cell's model on its backend, deployed only when a served stage has work to do."""

    def __init__(self, spec: Spec, cell: Cell, store: Store):
        self.spec, self.cell, self.store = spec, cell, store
        self.gguf = store.path(cell.gguf) / "model.gguf"
        self.adapter = store.path(cell.lora_gguf) / "adapter.gguf" if cell.lora_gguf else None
        """The LoRA GGUF served beside the base GGUF (the adapter route), else None."""
        self.config: backends.ServeConfig | None = None
        self.backend: backends.Backend | None = None
        self.deployment: backends.Deployment | None = None
        self.tokenizer = None

    def __enter__(self) -> Served:
        return self

    def deploy(self) -> Served:
        if self.deployment is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                self.store.path(self.cell.model) / "model",
                trust_remote_code=self.spec.base.trust_remote_code,
            )
            config = backends.ServeConfig(
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
            self.config = config
            self.backend = backends.get(self.cell.backend)
            self.deployment = self.backend.deploy(self.gguf, config)
        return self

    def __exit__(self, *exc) -> None:
        if self.backend is not None:
            try:
                if self.deployment is not None and not self.kept:
                    self.backend.remove(self.deployment)
            finally:
                self.backend.close()

    @property
    def kept(self) -> bool:
        """serve.keep leaves an Ollama model in place for `ollama run`; a llama-server
        cannot outlive the run."""
        return self.spec.serve.keep and self.cell.backend == "ollama"
