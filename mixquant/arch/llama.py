"""Llama and Mistral (convert_hf_to_gguf's LlamaModel): q/k rows permuted for ggml's rope,
llama3 rope scaling as a rope_freqs tensor, the llama-hf (SentencePiece-like) vocabulary when
the tokenizer is one, else GPT-2 BPE."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np

from .base import Adapter, register

if TYPE_CHECKING:
    from gguf import GGUFWriter

    from ..source import HFSource


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray | None:
    """LlamaModel.generate_extra_tensors' rope_freqs for llama3 rope scaling (None: not llama3)."""
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    import torch  # the same float32 arithmetic as the converter

    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:  # dim/2 values: a loop as in the converter, for its exact arithmetic
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


@register
class Llama(Adapter):
    hf_classes = ("LlamaForCausalLM", "MistralForCausalLM")
    model_types = ("llama", "mistral")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    permutes_qk = True
    derived = frozenset({"rope_freqs.weight"})

    def derived_tensors(self, src: HFSource) -> dict[str, Callable[[], np.ndarray]]:
        from ..source import _rope_parameters

        rope = _rope_parameters(src.config)
        dim = src.config.get("head_dim") or src.n_embd // src.n_head
        factors = llama3_rope_factors(rope.get("full_attention", rope), dim)
        return {} if factors is None else {"rope_freqs.weight": factors.copy}

    def add_hparams(self, w: GGUFWriter, hp: dict[str, Any], src: HFSource) -> None:
        w.add_vocab_size(src.vocab_size)
        w.add_rope_dimension_count(hp.get("head_dim") or src.n_embd // src.n_head)

    def add_vocab(self, w: GGUFWriter, src: HFSource, tokenizer_config: dict[str, Any]) -> None:
        if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(add_prefix_space)
        self._add_vocab_spm_or_gpt2(w, src)
        if src.vocab_size == 49152:  # convert_hf_to_gguf: granite/SmolLM small vocab
            w.add_add_bos_token(False)
