"""Qwen2 and Qwen3 (convert_hf_to_gguf's Qwen2Model / Qwen3Model): no q/k permutation (NeoX rope),
q/k/v biases (Qwen2), q/k RMS norms (Qwen3), GPT-2 BPE vocabulary."""

from __future__ import annotations

import gguf

from .base import Adapter, register


@register
class Qwen2(Adapter):
    hf_classes = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    block_tensors = Adapter.block_tensors + ("attn_q.bias", "attn_k.bias", "attn_v.bias")


@register
class Qwen3(Adapter):
    hf_classes = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    block_tensors = Adapter.block_tensors + ("attn_q_norm.weight", "attn_k_norm.weight")
