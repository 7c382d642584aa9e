"""Where a base model comes from: the kinds of base a spec names (`kinds`), the bundled
ones (`bases`), Ollama's models (`ollama`), their mapping to HF bases (`model_map`,
`resolve`), the HF cache and hub (`hub`), what `forgebench models` lists (`listing`), the
facts a GGUF holds (`gguf`), the chat template a run uses (`templates`), the tokenizer
against the GGUF (`parity`), and peft adapter folders trained elsewhere (`adapters`)."""

from harness.sources.bases import BUNDLED, Bundled, bundled_gguf
from harness.sources.kinds import identity, materialize

__all__ = ["BUNDLED", "Bundled", "bundled_gguf", "identity", "materialize"]
