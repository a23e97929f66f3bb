"""Qwen2 and Qwen3 (convert_hf_to_gguf's Qwen2Model / Qwen3Model): no q/k permutation (NeoX rope),
q/k/v biases (Qwen2), q/k RMS norms (Qwen3), GPT-2 BPE vocabulary; Qwen3-MoE (Qwen3MoeModel):
every FFN a mixture of experts, stacked per layer into 3-D ffn_{gate,up,down}_exps with the router
ffn_gate_inp."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import gguf

from .base import Adapter, register

if TYPE_CHECKING:
    import torch
    from gguf import GGUFWriter

    from ..source import HFSource

logger = logging.getLogger(__name__)


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


@register
class Qwen3Moe(Adapter):
    hf_classes = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    block_tensors = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                     "attn_q_norm.weight", "attn_k_norm.weight", "ffn_norm.weight", "ffn_gate_inp.weight",
                     "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
    norm_feeds = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "attn_v": ("attn_output",),
                  "ffn_norm": ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps"), "ffn_up_exps": ("ffn_down_exps",)}
    input_norms = {"attn_in": "input_layernorm"}  # ffn_norm also feeds the experts, which are no nn.Linear

    def add_hparams(self, w: GGUFWriter, hp: dict[str, Any], src: HFSource) -> None:
        """Qwen2MoeModel.set_gguf_parameters' additions."""
        if hp.get("norm_topk_prob") is False:
            logger.warning("%s: norm_topk_prob is false, but llama.cpp's qwen3moe always renormalises the "
                           "selected experts' weights: the GGUF will not compute what transformers does", src.path)
        if (n_ff_exp := hp.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff_exp)
        if (n_ff_shexp := hp.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff_shexp)

    def split_parameter(self, hf_name: str, p: torch.nn.Parameter) -> list[tuple[str, torch.Tensor]]:
        """transformers keeps each layer's experts as 3-D parameters, gate and up fused
        (n_expert, 2 n_ff, n_embd): GGUF's ffn_gate_exps and ffn_up_exps are its two halves."""
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            base, n_ff = hf_name.removesuffix("gate_up_proj"), p.shape[-2] // 2
            return [(f"{base}gate_proj.weight", p[:, :n_ff]), (f"{base}up_proj.weight", p[:, n_ff:])]
        if hf_name.endswith("mlp.experts.down_proj"):
            return [(f"{hf_name}.weight", p)]
        return [(hf_name, p)]

    def linear_modules(self, model: torch.nn.Module, n_layer: int) -> dict[str, str]:
        """The nn.Linear layers, and each MoE layer's router (`mlp.gate`, a module of its own that
        multiplies its input by ffn_gate_inp: a plain matrix product for llama-imatrix too)."""
        tmap = self.tensor_map(n_layer)
        out = super().linear_modules(model, n_layer)
        for module_name, _ in model.named_modules():
            if module_name.endswith(".mlp.gate") and module_name not in out:
                name = self.gguf_name(module_name + ".weight", tmap)
                if name is not None:
                    out[module_name] = name
        return out

    def expert_modules(self, model: torch.nn.Module, n_layer: int) -> dict[str, int]:
        """Qwen3MoeExperts (`mlp.experts`): called with (tokens, top-k expert indices, weights)."""
        out = {}
        for module_name, module in model.named_modules():
            m = re.search(r"layers\.(\d+)\.mlp\.experts$", module_name)
            if m and hasattr(module, "gate_up_proj"):
                out[module_name] = int(m.group(1))
        return out

    def routed_tokens(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        names = ("hidden_states", "top_k_index")
        x, top_k = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        return x.reshape(-1, x.shape[-1]), top_k.reshape(-1, top_k.shape[-1])

    def expert_hidden(self, module: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """act(x gate^T) * (x up^T), as Qwen3MoeExperts computes it (gate and up fused in gate_up_proj)."""
        import torch.nn.functional as F

        gate, up = F.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
        return module.act_fn(gate) * up
