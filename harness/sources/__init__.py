"""Where a base model comes from: the kinds of base (`bases`), Ollama's models (`ollama`),
their mapping to HF bases (`model_map`, `resolve`), the HF cache and hub (`hub`), what
`forgebench models` lists (`listing`), the facts a GGUF holds (`gguf`) and the chat
template a run uses (`templates`)."""

from harness.sources.bases import BUNDLED, Bundled, bundled_gguf, identity, materialize

__all__ = ["BUNDLED", "Bundled", "bundled_gguf", "identity", "materialize"]
