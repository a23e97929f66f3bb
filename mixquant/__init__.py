"""mixquant: mixed-precision post-training quantization of LLMs to GGUF."""

__version__ = "0.1.0"
