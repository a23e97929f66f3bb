"""Gemma 3, text only (convert_hf_to_gguf's Gemma3Model): RMS norms computing x * (1 + w) stored
as 1 + w, q/k norms, norms after attention and FFN ("sandwich"), sliding-window and global layers
with their own rope bases, the embedding scaled by sqrt(hidden) at run time (stored unscaled),
a tied output; the token embedding's rows beyond the tokenizer's vocabulary dropped."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import gguf

from ..errors import MixquantError
from .base import Adapter, register

if TYPE_CHECKING:
    import torch
    from gguf import GGUFWriter

    from ..source import HFSource

_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@register
class Gemma3(Adapter):
    hf_classes = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    norm_shift = 1.0
    input_norms = {}  # its norms multiply by (1 + w): a scale cannot fold into w by division
    block_tensors = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                     "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight", "ffn_norm.weight",
                     "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight")

    def add_hparams(self, w: GGUFWriter, hp: dict[str, Any], src: HFSource) -> None:
        """Gemma3Model.set_gguf_parameters: its defaults where config.json leaves a value out (the
        keys TextModel already wrote are rewritten, in place, as the converter does)."""
        rope = hp.get("rope_parameters") or {}
        w.add_context_length(hp.get("max_position_embeddings", 131072))
        w.add_head_count(hp.get("num_attention_heads", 8))
        w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
        w.add_key_length(hp.get("head_dim", 256))
        w.add_value_length(hp.get("head_dim", 256))
        w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
        if final := hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(final)
        if hp.get("sliding_window_pattern") != 1:
            w.add_sliding_window(hp["sliding_window"])
        w.add_head_count_kv(hp.get("num_key_value_heads", 4))

    def vocab_rows(self, src: HFSource, tokenizer: dict[str, Any]) -> int:
        """Gemma3Model.modify_tensors cuts the token embedding to the tokenizer's size (checkpoints
        with rows for tokens the tokenizer lacks, e.g. image tokens): from a tokenizer.json,
        len(model.vocab) + len(added_tokens) rows, which counts twice an added token that is also
        in the vocabulary (Gemma's own tokenizer.json lists them all there: no row is dropped);
        with a tokenizer.model, its SentencePiece list padded to vocab_size, so none either."""
        if (src.path / "tokenizer.model").is_file():
            return src.vocab_size
        vocab, added = tokenizer["model"]["vocab"], tokenizer.get("added_tokens", [])
        if not isinstance(vocab, (dict, list)) or not isinstance(added, list):
            raise MixquantError(f"{src.path / 'tokenizer.json'}: malformed tokenizer.json: model.vocab or "
                                "added_tokens has the wrong type")
        return min(src.vocab_size, len(vocab) + len(added))

    def add_vocab(self, w: GGUFWriter, src: HFSource, tokenizer_config: dict[str, Any]) -> None:
        """Gemma3Model.set_vocab reads tokenizer.model (SentencePiece); from a tokenizer.json that is
        SentencePiece's BPE (byte fallback), the same vocabulary: llama.cpp's "llama" tokenizer
        merges by score, and SentencePiece stores its pieces in score order, so a normal piece's
        score is minus its rank among the normal pieces (as in Google's own GGUF files); control
        and user-defined pieces -1000, bytes 0. Other tokenizers: GPT-2 BPE. On Gemma 3's
        vocabulary this gives the pieces and types of Google's GGUF exactly, and its scores in the
        same order (all llama.cpp compares). As many tokens as the embedding keeps rows (`vocab_rows`;
        the converter writes vocab_size tokens, which llama.cpp refuses when rows were dropped)."""
        from ..source import _read_json

        path = src.path / "tokenizer.json"
        tok = _read_json(path, "tokenizer.json")
        model = tok.get("model") or {}
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            src._add_vocab_gpt2(w)
            return
        vocab: dict[str, int] = model["vocab"]
        added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
        src.check_token_ids(max(max(vocab.values()), max(added, default=-1)))
        n = src.n_vocab
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [gguf.TokenType.UNUSED] * n
        scores = [-1000.0] * n
        for text, i in vocab.items():
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
        for i, t in added.items():
            tokens[i] = t["content"]
            types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
        # a SentencePiece model lists control and user-defined pieces first, then the 256 bytes,
        # then the normal pieces by score: a vocabulary entry before the bytes is user-defined
        # (Gemma's runs of spaces), stored with real spaces as SentencePiece writes them
        first_byte = min((i for t, i in vocab.items() if _BYTE.fullmatch(t)), default=n)
        rank = 0
        for i in range(n):
            if types[i] != gguf.TokenType.NORMAL:
                continue
            if _BYTE.fullmatch(tokens[i]):
                types[i], scores[i] = gguf.TokenType.BYTE, 0.0
            elif i < first_byte:
                types[i], tokens[i] = gguf.TokenType.USER_DEFINED, tokens[i].replace("\u2581", " ")
            else:
                scores[i], rank = float(-rank), rank + 1
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(src.path, n_vocab=n).add_to_gguf(w, quiet=True)
        w.add_add_space_prefix(False)

    def block_kwargs(self, decoder: torch.nn.Module, embeds: torch.Tensor,
                     position_ids: torch.Tensor) -> list[dict[str, Any]]:
        """Each layer gets the rotary embedding of its layer type (local base for sliding layers)."""
        kinds = decoder.config.layer_types
        rope = {k: decoder.rotary_emb(embeds, position_ids, k) for k in set(kinds)}
        masks = self._masks(decoder.config, embeds, position_ids, len(decoder.layers))
        return [{"attention_mask": m, "position_embeddings": rope[k], "position_ids": position_ids,
                 "use_cache": False} for m, k in zip(masks, kinds)]
