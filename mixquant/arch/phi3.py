"""Phi-3 (convert_hf_to_gguf's Phi3MiniModel): q/k/v in one fused attn_qkv and gate/up in one
fused ffn_up, kept fused in GGUF as the converter keeps them; NeoX rope (no permutation);
long-context rope (LongRoPE: Phi-3-mini-128k, Phi-3.5-mini) as the rope_factors_long/short tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np

from ..errors import MixquantError
from .base import Adapter, register

if TYPE_CHECKING:
    from gguf import GGUFWriter

    from ..plan import ModelInfo
    from ..source import HFSource

_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class LongRope:
    """Phi3MiniModel.generate_extra_tensors' LongRoPE: per-frequency divisors of the rope
    frequencies for contexts longer than the original one (long) and up to it (short), which
    llama.cpp picks by its per-sequence context against rope.scaling.original_context_length (transformers by the
    sequence length), and the factor scaling cos and sin at every length."""

    long: np.ndarray
    short: np.ndarray
    attn_factor: float


def long_rope(src: HFSource) -> LongRope | None:
    """The checkpoint's LongRoPE (None: its rope_scaling has no "long_factor"), from the config as
    transformers loads it, as the converter reads it (transformers renames Phi-3's "su" and "yarn"
    to "longrope", and computes "yarn" as LongRoPE: the converter's other attn_factor for "yarn" is
    never reached)."""
    from ..source import _find_hparam, _rope_parameters

    if not _rope_parameters(src.config).get("long_factor"):  # the raw file: no transformers import for most
        return None
    hp, where = src.hparams, src.path / "config.json"
    rope = _rope_parameters(hp)
    rope_type = str(rope.get("rope_type", "")).lower()
    if rope_type not in ("su", "longrope"):
        raise MixquantError(f"{where}: Phi-3 rope_scaling type {rope_type!r} with long_factor is not supported "
                            "(expected 'longrope' or 'su')")
    orig_ctx, ctx = rope.get("original_max_position_embeddings"), _find_hparam(hp, ["n_positions", "max_position_embeddings"])
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (orig_ctx, ctx)):
        raise MixquantError(f"{where}: malformed config.json: LongRoPE needs positive original_max_position_embeddings "
                            f"and max_position_embeddings (got {orig_ctx!r}, {ctx!r})")
    half = int(rope.get("partial_rotary_factor", 1.0) * src.n_embd) // src.n_head // 2
    factors = []
    for key in ("long_factor", "short_factor"):
        values = rope.get(key)
        if not isinstance(values, list) or len(values) != half \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise MixquantError(f"{where}: malformed config.json: rope_scaling {key} must be {half} positive numbers "
                                "(one per rotated dimension pair)")
        factors.append(np.array(values, dtype=np.float32))
    scale = ctx / orig_ctx
    attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0
    return LongRope(factors[0], factors[1], attn_factor)


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
    derived = frozenset(_FACTOR_TENSORS)

    def derived_tensors(self, src: HFSource) -> dict[str, Callable[[], np.ndarray]]:
        rope = long_rope(src)
        return {} if rope is None else dict(zip(_FACTOR_TENSORS, (rope.long.copy, rope.short.copy)))

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
        if (longrope := long_rope(src)) is not None:
            w.add_rope_scaling_attn_factors(longrope.attn_factor)
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
