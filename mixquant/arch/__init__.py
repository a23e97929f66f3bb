"""Architecture adapters, one module per model family, registered by Hugging Face class name.

    adapter = arch.for_config(config)        # config.json -> Adapter (arch.for_gguf_arch("llama"))
    adapter.name                             # "llama": the GGUF architecture
    adapter.to_gguf(name, x, info)           # checkpoint values -> GGUF values (q/k permutation, ...)

The contract is `base.Adapter`; `llama` (llama, mistral), `qwen` (qwen2, qwen3, qwen3moe), `gemma3`, `phi3`.
"""

from . import llama, qwen, gemma3, phi3  # noqa: F401, I001 - registers the adapters, in this order
from .base import (
    BLOCK_INPUTS,
    INPUT_GROUPS,
    Adapter,
    Fold,
    for_config,
    for_gguf_arch,
    for_model,
    hf_classes,
    permute_qk,
    register,
    unpermute_qk,
)

__all__ = ["Adapter", "Fold", "register", "for_config", "for_gguf_arch", "for_model", "hf_classes", "permute_qk",
           "unpermute_qk", "INPUT_GROUPS", "BLOCK_INPUTS"]
