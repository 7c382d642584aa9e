"""forgebench: one experiment spec -> LoRA configs x quant levels -> measured GGUF models."""

__version__ = "0.1.0"
