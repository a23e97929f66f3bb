"""Phi-3 (convert_hf_to_gguf's Phi3MiniModel): q/k/v in one fused attn_qkv and gate/up in one
fused ffn_up, kept fused in GGUF as the converter keeps them; NeoX rope (no permutation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from ..errors import MixquantError
from .base import Adapter, register

if TYPE_CHECKING:
    from gguf import GGUFWriter

    from ..plan import ModelInfo
    from ..source import HFSource


@register
class Phi3(Adapter):
    hf_classes = ("Phi3ForCausalLM",)
    model_types = ("phi3",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    block_tensors = ("attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight",
                     "ffn_up.weight", "ffn_down.weight")
    # attn_qkv's V rows feed attn_output, ffn_up's up half (its second half) feeds ffn_down
    norm_feeds = {"attn_norm": ("attn_qkv",), "ffn_norm": ("ffn_up",), "attn_qkv": ("attn_output",),
                  "ffn_up": ("ffn_down",)}

    def fold_channels(self, kind: str, feeder_shape: tuple[int, ...], cols: int, info: ModelInfo
                      ) -> tuple[slice, np.ndarray | None]:
        """The fused feeders' parts: attn_qkv's last kv rows (V), ffn_up's second half (up)."""
        rows = feeder_shape[0]
        if kind == "ffn_up" and len(feeder_shape) == 2:
            if rows != 2 * cols:
                raise MixquantError(f"{self.name}: fused ffn_up has {rows} rows, expected 2 x {cols}")
            return slice(cols, rows), None
        if kind == "attn_qkv" and len(feeder_shape) == 2:
            kv_rows = (rows - cols) // 2  # q has n_head x head_dim = attn_output's columns
            v = slice(rows - kv_rows, rows)
            return v, (None if kv_rows == cols else self._kv_columns(kind, kv_rows, cols, info))
        return super().fold_channels(kind, feeder_shape, cols, info)

    def expected_shapes(self, n_embd: int, q_rows: int, kv_rows: int, head_dim: int, n_ff: int | None,
                        n_vocab: int) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(n_embd, q_rows, kv_rows, head_dim, n_ff, n_vocab)
        shapes["attn_qkv.weight"] = (q_rows + 2 * kv_rows, n_embd)
        shapes["ffn_up.weight"] = (None if n_ff is None else 2 * n_ff, n_embd)  # gate and up, fused
        return shapes

    def add_hparams(self, w: GGUFWriter, hp: dict[str, Any], src: HFSource) -> None:
        """Phi3MiniModel.set_gguf_parameters (its keys over TextModel's)."""
        from ..source import _find_hparam, _rope_parameters

        rope = _rope_parameters(hp)
        if rope.get("long_factor"):
            raise MixquantError(f"{src.path}: Phi-3 long-context rope (rope_factors_long/short) is not supported")
        n_embd, n_head = src.n_embd, src.n_head
        w.add_context_length(_find_hparam(hp, ["n_positions", "max_position_embeddings"]))
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_head_count_kv(src.n_head_kv)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
        w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
        w.add_sliding_window(hp.get("sliding_window") or 0)

    def add_vocab(self, w: GGUFWriter, src: HFSource, tokenizer_config: dict[str, Any]) -> None:
        if tokenizer_config.get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4
            src._add_vocab_gpt2(w)
        else:
            self._add_vocab_spm_or_gpt2(w, src)
