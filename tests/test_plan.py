"""preset_plan against llama.cpp's own type choice.

Oracles, strongest first:
  * `llama-quantize --dry-run` (the vendored build, when it is there) on sparse GGUF files that
    carry the full metadata and tensor list but no data: every tensor of every preset and option;
  * llama.cpp's snapshot tables, tests/snapshots/*.schema in the vendored tree (12 real models,
    33 ftypes each), the expectations of its test-quant-type-selection;
  * digests of the dry-run answers recorded below, so the synthetic models are checked without
    the binary too;
  * the file sizes llama-quantize wrote for the test model (SmolLM2-135M).
"""

import hashlib
import os
import re
import subprocess
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from mixquant.reference import llama_cpp_source, llama_tool
from mixquant.plan import (
    PRESETS,
    ModelInfo,
    Plan,
    TensorInfo,
    allows_quantization,
    default_type,
    fallback_type,
    preset_plan,
    tensor_bytes,
)



@pytest.fixture(scope="module")
def snapshots() -> Path:
    """llama.cpp's own per-model type tables, from the vendored source (fetched on first use)."""
    return llama_cpp_source() / "tests" / "snapshots"


@pytest.fixture(scope="module")
def llama_quantize() -> Path:
    """The real llama-quantize, built from the vendored source on first use (minutes)."""
    return llama_tool("llama-quantize")


# the presets the brief names: what mixquant's codecs cover
MAIN_PRESETS = [
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "F16", "BF16", "F32",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def dense(arch, n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, *, tied=False, n_expert=0, expert_ff=0, extra=()):
    """A llama-style tensor list (F16 weights, F32 norms); experts as 3-D ffn_*_exps tensors."""
    T = TensorInfo
    hd = n_embd // n_head
    ts = [T("token_embd.weight", (n_vocab, n_embd), "F16"), T("output_norm.weight", (n_embd,))]
    if not tied:
        ts.append(T("output.weight", (n_vocab, n_embd), "F16"))
    ts += [T(*e) for e in extra]
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [
            T(p + "attn_norm.weight", (n_embd,)),
            T(p + "attn_q.weight", (n_head * hd, n_embd), "F16"),
            T(p + "attn_k.weight", (n_head_kv * hd, n_embd), "F16"),
            T(p + "attn_v.weight", (n_head_kv * hd, n_embd), "F16"),
            T(p + "attn_output.weight", (n_embd, n_head * hd), "F16"),
            T(p + "ffn_norm.weight", (n_embd,)),
        ]
        if n_expert:
            ts += [
                T(p + "ffn_gate_inp.weight", (n_expert, n_embd)),
                T(p + "ffn_gate_exps.weight", (n_expert, expert_ff, n_embd), "F16"),
                T(p + "ffn_up_exps.weight", (n_expert, expert_ff, n_embd), "F16"),
                T(p + "ffn_down_exps.weight", (n_expert, n_embd, expert_ff), "F16"),
            ]
        else:
            ts += [
                T(p + "ffn_gate.weight", (n_ff, n_embd), "F16"),
                T(p + "ffn_up.weight", (n_ff, n_embd), "F16"),
                T(p + "ffn_down.weight", (n_embd, n_ff), "F16"),
            ]
    model = ModelInfo(
        arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_expert=n_expert, n_embd=n_embd, tensors=ts
    )
    return model, (expert_ff or n_ff), n_vocab


SMOLLM2 = dense("llama", 30, 576, 9, 3, 1536, 49152, tied=True)[0]

# name -> (ModelInfo, n_ff, n_vocab)
MODELS = {
    "smollm2-135m": dense("llama", 30, 576, 9, 3, 1536, 49152, tied=True),
    "llama-7b": dense("llama", 32, 4096, 32, 32, 11008, 32000),
    "llama-70b": dense("llama", 80, 8192, 64, 8, 28672, 128256, extra=[("rope_freqs.weight", (64,), "F32")]),
    "mixtral-8x7b": dense("llama", 32, 4096, 32, 8, 0, 32000, n_expert=8, expert_ff=14336),
    # rows of 320 (not a multiple of 256) and 336 (not even of 32: F16), gqa 5, 9 layers
    "llama-toy-odd": dense("llama", 9, 320, 5, 1, 336, 777),
    # qwen2 with 80 layers is also llama.cpp's "70B" (bigger attn_v); rows of 29568 fall back
    "qwen2-72b": dense("qwen2", 80, 8192, 64, 8, 29568, 152064),
    "moe4-tied": dense("llama", 12, 320, 5, 1, 0, 1000, tied=True, n_expert=4, expert_ff=200),
}


def digest(types: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n} {types[n]}\n" for n in sorted(types)).encode()).hexdigest()[:16]


# sha256 of the sorted "name type" lines that `llama-quantize --dry-run` printed (llama.cpp
# 0c1e570) for the sparse GGUF of each model above; "+imatrix": with an --imatrix file.
DRY_RUN_DIGESTS = {
    "smollm2-135m": {
        "Q2_K": "5e23cb37013d1e73", "Q2_K_S": "646fd13148f4bc79", "Q3_K_S": "5e23cb37013d1e73",
        "Q3_K_M": "32c95fb27517a19b", "Q3_K_L": "8212653e72f73901", "Q4_K_S": "b6bc4ed64b51957a",
        "Q4_K_M": "0e0c43721fb17988", "Q5_K_S": "0666ef3b5000dfb2", "Q5_K_M": "ecbd1e61d6cc0d47",
        "Q6_K": "f4b073ecd0bea4bc", "Q8_0": "ac77d22d3502c1ff", "Q4_0": "9f83007f83c061e3",
        "Q4_1": "9bc4ed303703eba2", "Q5_0": "2b7e76212dbea391", "Q5_1": "e756e12b302a8d41",
        "IQ4_NL": "3f3ec468d1234abe", "IQ4_XS": "c0505e289a7f4c78", "F16": "c690e190fb0d946b",
        "BF16": "f1a6bdb596539dc7", "F32": "be578d03bc308cff", "Q4_0+imatrix": "6dddff8013d306cd",
        "Q5_0+imatrix": "be44ad5d16540c52", "IQ4_NL+imatrix": "29fb6e20890e03d6", "IQ4_XS+imatrix": "de2d866d6931e15a",
    },
    "llama-7b": {
        "Q2_K": "3ecf9428047185f9", "Q2_K_S": "cfe5f2d4b4bc95f9", "Q3_K_S": "da5d235029484b11",
        "Q3_K_M": "e4158234a5c97533", "Q3_K_L": "075980fa6aa5a98b", "Q4_K_S": "ed6900373dd647ba",
        "Q4_K_M": "21d43253bc1c7ec7", "Q5_K_S": "9ebb774588bb68d4", "Q5_K_M": "df936ad9c2886461",
        "Q6_K": "8e575c2cfa2629a7", "Q8_0": "ba651bfca5d995da", "Q4_0": "a083404c02721512",
        "Q4_1": "66ed39bee8bde850", "Q5_0": "6d7ee17faefb73e2", "Q5_1": "04f14b21f051f333",
        "IQ4_NL": "3ef9af80c48bd1a9", "IQ4_XS": "81eb0e79c6d5a79a", "F16": "eb36e9da0d95caa0",
        "BF16": "8b6a7b800cc8a6dd", "F32": "e7e454044c78b1e7", "Q4_0+imatrix": "6a7dcc9b2d9d2baa",
        "Q5_0+imatrix": "07a4156a3ed96057", "IQ4_NL+imatrix": "7ba1ce6ac352c53b", "IQ4_XS+imatrix": "65f1cdbde572f464",
    },
    "llama-70b": {
        "Q2_K": "b8aaa1d70d78e40b", "Q2_K_S": "754ddfdb24c8a5cc", "Q3_K_S": "9584514897517b9c",
        "Q3_K_M": "e4f5b830de4e264e", "Q3_K_L": "ac5d94b1e9505cf0", "Q4_K_S": "273c56378840d68f",
        "Q4_K_M": "351016b144d3549c", "Q5_K_S": "69dd8c429c0aa97b", "Q5_K_M": "b6bccf929f3d9df7",
        "Q6_K": "0c4be8dd68d2d606", "Q8_0": "2815d2f881ca241c", "Q4_0": "1c3e229e70b3f550",
        "Q4_1": "1b64adbf2f2f8b52", "Q5_0": "4f019b508869c02c", "Q5_1": "6b1ff50328bc3c21",
        "IQ4_NL": "edb842b511dc34ad", "IQ4_XS": "c653435dd6db9aa1", "F16": "b98290a51d878b71",
        "BF16": "281d6ea16f4467f4", "F32": "60e0211da6e9fdd4", "Q4_0+imatrix": "ed9e77df43aa02f4",
        "Q5_0+imatrix": "d482451ad270e10e", "IQ4_NL+imatrix": "655ff86b25bceac1", "IQ4_XS+imatrix": "a1154483eeb7738d",
    },
    "mixtral-8x7b": {
        "Q2_K": "d5da69fa71a80900", "Q2_K_S": "7f1caaae6219cb37", "Q3_K_S": "e79fb1b9f82e90f7",
        "Q3_K_M": "e3c407f1f65bd8fe", "Q3_K_L": "4a1f9e3e72d34921", "Q4_K_S": "2431caacddcfa386",
        "Q4_K_M": "a396162b1b0ce941", "Q5_K_S": "bfdae0c0fa8044f0", "Q5_K_M": "591217dab53960d2",
        "Q6_K": "449c7ef395d2ee30", "Q8_0": "35a6c3ec28e914d4", "Q4_0": "9b4eed71029d6327",
        "Q4_1": "d4ae830f48282f91", "Q5_0": "be1ef025498b64c1", "Q5_1": "23e9223629105761",
        "IQ4_NL": "5d8a004f163c2938", "IQ4_XS": "17081331ae7071e0", "F16": "4678853b98b48882",
        "BF16": "bd8cfb9a09e73cd9", "F32": "bb2f7e7b3d476e4b", "Q4_0+imatrix": "2295ff596878ba78",
        "Q5_0+imatrix": "fbdb3e07145b7635", "IQ4_NL+imatrix": "2e5954f286dc7256", "IQ4_XS+imatrix": "cec544557184ab25",
    },
    "llama-toy-odd": {
        "Q2_K": "33181441fc1ab88d", "Q2_K_S": "33181441fc1ab88d", "Q3_K_S": "c3b203c081e6686e",
        "Q3_K_M": "5318eef37c6c4612", "Q3_K_L": "4477a7837dfed8aa", "Q4_K_S": "24f7009b7b796c5e",
        "Q4_K_M": "c960d3c0d9394243", "Q5_K_S": "7a574eb6553f15f6", "Q5_K_M": "47a83d93187d8d04",
        "Q6_K": "4f63951fdccb391f", "Q8_0": "4f63951fdccb391f", "Q4_0": "c3b203c081e6686e",
        "Q4_1": "f5e2df5bdb18de3b", "Q5_0": "6d54e84fd99d3e22", "Q5_1": "7a574eb6553f15f6",
        "IQ4_NL": "e8fd1b6ed5586b6e", "IQ4_XS": "e8fd1b6ed5586b6e", "F16": "c29492ad59a5c62c",
        "BF16": "2685d1eaeb06098d", "F32": "d1a845c8945b6bc9", "Q4_0+imatrix": "c3b203c081e6686e",
        "Q5_0+imatrix": "6d54e84fd99d3e22", "IQ4_NL+imatrix": "e8fd1b6ed5586b6e", "IQ4_XS+imatrix": "e8fd1b6ed5586b6e",
    },
    "qwen2-72b": {
        "Q2_K": "eace334f52b72259", "Q2_K_S": "0c66520e8e8e1372", "Q3_K_S": "d8df0aa3543a9830",
        "Q3_K_M": "45c1d5bb2312ad31", "Q3_K_L": "30f925e42307a5db", "Q4_K_S": "c83dfc83954590fd",
        "Q4_K_M": "ed16c212c89156ea", "Q5_K_S": "e864acf287722710", "Q5_K_M": "2658c32571ccf6d0",
        "Q6_K": "c8fa7bbca3f71759", "Q8_0": "6d3b14bf872ce5f5", "Q4_0": "6f59efe76a361193",
        "Q4_1": "6f1a79a5265add24", "Q5_0": "e2058ba43963097e", "Q5_1": "052a513b9ada22d4",
        "IQ4_NL": "c3b39023c3afb9d6", "IQ4_XS": "85aa62eaf744cfe9", "F16": "8497d736d970e992",
        "BF16": "7626161e461aae60", "F32": "7642d313c55b2819", "Q4_0+imatrix": "6ad4aa67a672aae9",
        "Q5_0+imatrix": "a3e67c9ecf6a4841", "IQ4_NL+imatrix": "ab3b256f08563648", "IQ4_XS+imatrix": "007cbc0d8dcb8ad1",
    },
}  # fmt: skip


@pytest.mark.parametrize("model_name", sorted(DRY_RUN_DIGESTS))
def test_matches_recorded_dry_run(model_name):
    model = MODELS[model_name][0]
    wrong = {}
    for key, expected in DRY_RUN_DIGESTS[model_name].items():
        preset, _, imatrix = key.partition("+")
        got = digest(preset_plan(model, preset, has_imatrix=bool(imatrix)).types)
        if got != expected:
            wrong[key] = got
    assert not wrong, f"{model_name}: plans differ from llama-quantize --dry-run for {sorted(wrong)}"


def _arch_model(arch, n_layer, n_head, n_head_kv, n_expert, n_embd, per_layer, glob):
    """F32-typed tensors (as llama.cpp's mock models); per_layer: list, or function of the layer."""
    ts = [TensorInfo(n, s) for n, s in glob]
    for i in range(n_layer):
        ts += [TensorInfo(f"blk.{i}.{n}", s) for n, s in (per_layer(i) if callable(per_layer) else per_layer)]
    return ModelInfo(arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_expert=n_expert, n_embd=n_embd,
                     tensors=ts)  # fmt: skip


def _deepseek2_lite_layer(i):
    attn = [("attn_q.weight", (3072, 2048)), ("attn_kv_a_mqa.weight", (576, 2048)), ("attn_kv_a_norm.weight", (512,)),
            ("attn_kv_b.weight", (4096, 512)), ("attn_output.weight", (2048, 2048))]  # fmt: skip
    if i == 0:
        return attn + [("ffn_gate.weight", (10944, 2048)), ("ffn_up.weight", (10944, 2048)), ("ffn_down.weight", (2048, 10944))]
    return attn + [
        ("ffn_gate_inp.weight", (64, 2048)), ("ffn_gate_exps.weight", (64, 1408, 2048)), ("ffn_up_exps.weight", (64, 1408, 2048)),
        ("ffn_down_exps.weight", (64, 2048, 1408)), ("ffn_gate_shexp.weight", (2816, 2048)), ("ffn_up_shexp.weight", (2816, 2048)),
        ("ffn_down_shexp.weight", (2048, 2816)),
    ]  # fmt: skip


_V = 1000
ARCH_MODELS = {
    # falcon: its own ffn_down / attn_output / output rules; attn_qkv (4544-wide rows fall back)
    "falcon-7b": _arch_model("falcon", 32, 71, 1, 0, 4544,
        [("attn_norm.weight", (4544,)), ("attn_norm.bias", (4544,)), ("attn_qkv.weight", (4672, 4544)),
         ("attn_output.weight", (4544, 4544)), ("ffn_up.weight", (18176, 4544)), ("ffn_down.weight", (4544, 18176))],
        [("token_embd.weight", (_V, 4544)), ("output.weight", (_V, 4544)), ("output_norm.weight", (4544,))]),
    "falcon-40b": _arch_model("falcon", 60, 128, 8, 0, 8192,
        [("attn_qkv.weight", (9216, 8192)), ("attn_output.weight", (8192, 8192)), ("ffn_up.weight", (32768, 8192)),
         ("ffn_down.weight", (8192, 32768))],
        [("token_embd.weight", (_V, 8192)), ("output.weight", (_V, 8192))]),
    # MLA: attn_kv_b counts as attn_v; dense first layer then experts + shared experts
    "deepseek2-lite": _arch_model("deepseek2", 27, 16, 16, 64, 2048, _deepseek2_lite_layer,
        [("token_embd.weight", (_V, 2048)), ("output.weight", (_V, 2048))]),
    "qwen2moe": _arch_model("qwen2moe", 24, 16, 16, 60, 2048,
        [("attn_q.weight", (2048, 2048)), ("attn_k.weight", (2048, 2048)), ("attn_v.weight", (2048, 2048)),
         ("attn_output.weight", (2048, 2048)), ("ffn_gate_inp.weight", (60, 2048)), ("ffn_gate_inp_shexp.weight", (1, 2048)),
         ("ffn_gate_exps.weight", (60, 1408, 2048)), ("ffn_up_exps.weight", (60, 1408, 2048)),
         ("ffn_down_exps.weight", (60, 2048, 1408)), ("ffn_gate_shexp.weight", (5632, 2048)),
         ("ffn_up_shexp.weight", (5632, 2048)), ("ffn_down_shexp.weight", (2048, 5632))],
        [("token_embd.weight", (_V, 2048)), ("output.weight", (_V, 2048))]),
    # glm5-next: tensors it keeps, and attn_q_a/attn_q_b/nextn.eh_proj never below Q8_0
    "glm5next": _arch_model("glm5-next", 6, 32, 32, 16, 1024,
        [("attn_q_a.weight", (512, 1024)), ("attn_q_b.weight", (4096, 512)), ("attn_kv_a_mqa.weight", (576, 1024)),
         ("attn_k_b.weight", (16, 512, 128)), ("attn_v_b.weight", (16, 128, 512)), ("hc_foo.weight", (64, 1024)),
         ("indexer.proj.weight", (64, 1024)), ("nextn.eh_proj.weight", (1024, 2048)), ("attn_output.weight", (1024, 4096)),
         ("ffn_down_exps.weight", (16, 1024, 512)), ("ffn_up_exps.weight", (16, 512, 1024))],
        [("token_embd.weight", (_V, 1024))]),
    # bailingmoe3: MXFP4_MOE only for the expert FFNs among the 3-D tensors
    "bailingmoe3": _arch_model("bailingmoe3", 8, 16, 4, 32, 1024,
        [("attn_qkv.weight", (1536, 1024)), ("attn_k_b.weight", (16, 512, 256)), ("attn_output.weight", (1024, 1024)),
         ("ffn_down_exps.weight", (32, 1024, 512)), ("ffn_up_exps.weight", (32, 512, 1024)),
         ("ffn_gate_exps.weight", (32, 512, 1024))],
        [("token_embd.weight", (_V, 1024)), ("output.weight", (_V, 1024))]),
    # gemma3n: per_layer_token_embd, altup/laurel/per_layer_model_proj kept, tied output
    "gemma3n": _arch_model("gemma3n", 6, 8, 2, 0, 2048,
        [("attn_q.weight", (2048, 2048)), ("attn_k.weight", (512, 2048)), ("attn_v.weight", (512, 2048)),
         ("attn_output.weight", (2048, 2048)), ("altup_proj.weight", (2048, 2048)), ("laurel_l.weight", (64, 2048)),
         ("per_layer_model_proj.weight", (256, 2048)), ("ffn_gate.weight", (8192, 2048)), ("ffn_up.weight", (8192, 2048)),
         ("ffn_down.weight", (2048, 8192)), ("inp_gate.weight", (256, 2048))],
        [("token_embd.weight", (_V, 2048)), ("per_layer_token_embd.weight", (_V, 7680)),
         ("position_embd.weight", (512, 2048)), ("token_types.weight", (2, 2048))]),
    "mixtral-tiny": _arch_model("llama", 16, 32, 8, 8, 4096,
        [("attn_q.weight", (4096, 4096)), ("attn_k.weight", (1024, 4096)), ("attn_v.weight", (1024, 4096)),
         ("attn_output.weight", (4096, 4096)), ("ffn_gate_inp.weight", (8, 4096)), ("ffn_gate_exps.weight", (8, 512, 4096)),
         ("ffn_up_exps.weight", (8, 512, 4096)), ("ffn_down_exps.weight", (8, 4096, 512))],
        [("token_embd.weight", (_V, 4096)), ("output.weight", (_V, 4096))]),
    "rwkv-ish": _arch_model("rwkv7", 4, 1, 1, 0, 512,
        [("time_mix_w1.weight", (64, 512)), ("time_mix_key.weight", (512, 512)), ("ssm_conv1d.weight", (4, 512)),
         ("channel_mix_key.weight", (2048, 512)), ("attn_rel_b.weight", (32, 8))],
        [("token_embd.weight", (_V, 512))]),
}  # fmt: skip

ARCH_OPTIONS = {
    "output_type": "Q5_K",
    "token_embedding_type": "Q4_0",
    "tensor_types": [("exps", "Q2_K"), ("attn_kv_b", "IQ4_NL"), ("per_layer", "Q8_0")],
}

# sha256 over every preset (sorted) of the sorted "preset name type" lines that llama.cpp's own
# llama_quant_compute_types (libllama, 0c1e570, through its llama-ext.h test API, on mock models
# like test-quant-type-selection's) gave: (plain, with ARCH_OPTIONS)
ARCH_DIGESTS = {
    "falcon-7b": ("e0e0c161749dbbb5", "088449a20ceef429"),
    "falcon-40b": ("30ac21d3b578f7d1", "9ff0c1c08dbde10a"),
    "deepseek2-lite": ("a5477264019da8e7", "0068596a14aa81dd"),
    "qwen2moe": ("56e0a7bcbb0106fd", "f5bede0ee8152a12"),
    "glm5next": ("44b2f60f2f5e3105", "443797461bd4aca2"),
    "bailingmoe3": ("013789e129161306", "544db6d468856d23"),
    "gemma3n": ("15d5237c242f3eef", "eb690dc6925253b7"),
    "mixtral-tiny": ("4682a27215aacc6f", "4f749f6dc8412991"),
    "rwkv-ish": ("f5adfd3385b30556", "14ba19fcd2b6c9d5"),
}


def all_presets_digest(model: ModelInfo, **options) -> str:
    lines = []
    for preset in sorted(PRESETS):
        try:
            types = preset_plan(model, preset, **options).types
        except ValueError:  # e.g. Q1_0 on rows that are not a multiple of 128: no fallback exists
            lines.append(f"{preset} ERROR\n")
            continue
        lines += [f"{preset} {n} {types[n]}\n" for n in sorted(types)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


@pytest.mark.parametrize("model_name", sorted(ARCH_DIGESTS))
def test_matches_llama_cpp_on_other_architectures(model_name):
    model = ARCH_MODELS[model_name]
    plain, with_options = ARCH_DIGESTS[model_name]
    assert all_presets_digest(model) == plain
    assert all_presets_digest(model, **ARCH_OPTIONS) == with_options


def test_architecture_rules():
    falcon = preset_plan(ARCH_MODELS["falcon-7b"], "Q4_K_M")
    assert falcon.types["output.weight"] == "Q8_0"  # falcon: output always Q8_0
    more = {i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2}
    # attn_qkv takes the attn_v rules; 4544-wide rows: Q6_K -> Q8_0, Q4_K -> Q5_0
    assert _layers(falcon, "attn_qkv", 32) == ["Q8_0" if i in more else "Q5_0" for i in range(32)]
    # falcon's ffn_down: Q6_K in the first 1/16, then Q5_K where use_more_bits, else Q4_K (18176 fits)
    assert _layers(falcon, "ffn_down", 32) == ["Q6_K"] * 2 + ["Q5_K" if i in more else "Q4_K" for i in range(2, 32)]
    glm = preset_plan(ARCH_MODELS["glm5next"], "Q4_K_M")
    assert glm.types["blk.0.attn_q_a.weight"] == "Q8_0" and glm.types["blk.0.nextn.eh_proj.weight"] == "Q8_0"
    assert glm.types["blk.0.attn_k_b.weight"] == "F32" and glm.types["blk.0.hc_foo.weight"] == "F32"
    bailing = preset_plan(ARCH_MODELS["bailingmoe3"], "MXFP4_MOE")
    assert bailing.types["blk.0.ffn_up_exps.weight"] == "MXFP4" and bailing.types["blk.0.attn_k_b.weight"] == "Q8_0"
    ds = preset_plan(ARCH_MODELS["deepseek2-lite"], "Q2_K")
    assert set(_layers(ds, "attn_kv_b", 27)) == {"Q3_K"}  # attn_v-like; gqa 1 -> Q3_K
    assert ds.types["blk.1.ffn_down_exps.weight"] == "Q4_0"  # Q3_K, but rows of 1408 -> Q4_0
    gemma = preset_plan(ARCH_MODELS["gemma3n"], "Q4_K_M")
    assert gemma.types["per_layer_token_embd.weight"] == "Q6_K"  # tied: both embeddings take the output rule
    assert gemma.types["blk.0.altup_proj.weight"] == "F32" and gemma.types["position_embd.weight"] == "F32"
    named = preset_plan(ARCH_MODELS["gemma3n"], "Q4_K_M", token_embedding_type="Q4_0", tensor_types=[("per_layer_tok", "Q8_0")])
    assert named.types["token_embd.weight"] == "Q4_0" and named.types["per_layer_token_embd.weight"] == "Q8_0"


# --------------------------------------------------------------------------------------------
# the test model: SmolLM2-135M, sizes of the files llama-quantize wrote
# --------------------------------------------------------------------------------------------

SMOLLM2_FILE_SIZES = {
    "Q8_0": 144_810_848,
    "Q6_K": 138_382_688,
    "Q5_K_M": 112_103_264,
    "Q4_K_M": 105_453_920,
    "Q3_K_M": 93_509_984,
    "Q4_0": 91_726_688,
    "Q2_K": 88_201_568,
}
# GGUF header + metadata (+ alignment) of those files: the same bytes whatever the preset
SMOLLM2_GGUF_OVERHEAD = 1_785_440


def test_smollm2_tensor_bytes_match_real_files():
    for preset, size in SMOLLM2_FILE_SIZES.items():
        plan = preset_plan(SMOLLM2, preset)
        assert size - plan.total_bytes == SMOLLM2_GGUF_OVERHEAD, preset
        # tied embeddings: token_embd is quantized like an output; 576 is not a multiple of 256
        assert plan.types["token_embd.weight"] == "Q8_0", preset


def test_smollm2_q4_k_m():
    plan = preset_plan(SMOLLM2, "Q4_K_M")
    assert len(plan.types) == 272
    assert len(plan.fallbacks) == 180  # "180 of 272 tensor(s) required fallback quantization"
    assert f"{plan.bits_per_weight:.2f}" == "6.17"  # "quant size = 98.87 MiB (6.17 BPW)"
    assert f"{plan.total_bytes / 2**20:.2f}" == "98.87"
    assert plan.type_counts() == {"F32": 61, "Q8_0": 1 + 14, "Q5_0": 5 * 30 + 16, "Q6_K": 14, "Q4_K": 16}
    # use_more_bits(i, 30): layers 0-2, 26-29 and every third one in between
    more = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    for i in range(30):
        assert plan.types[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more else "Q5_0")  # Q6_K / Q4_K fall back
        assert plan.types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")  # 1536 fits
        assert plan.fallbacks[f"blk.{i}.attn_q.weight"] == "Q4_K"
        assert plan.types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert "token_embd.weight" not in plan.fallbacks  # Q8_0 chosen directly (576 % 256), not a fallback


def test_smollm2_q4_0_output_rule_falls_back():
    plan = preset_plan(SMOLLM2, "Q4_0")
    # tied output -> Q6_K, which does not fit 576 -> Q8_0; that is the only fallback
    assert plan.fallbacks == {"token_embd.weight": "Q6_K"}
    assert plan.types["token_embd.weight"] == "Q8_0"


# --------------------------------------------------------------------------------------------
# llama.cpp's snapshot tables (tests/snapshots/*.schema)
# --------------------------------------------------------------------------------------------

# The tables list, per ftype, the tensors whose type differs from the default, for the tensor
# list of a real model. Only ne[0] (row length) and ne[2] (experts) matter to the choice; the
# names come from the tables themselves, the row lengths from the models' configurations
# (default: n_embd).
SNAPSHOT_MODELS = {
    "meta-llama-3.1-70b-instruct": ("llama", {"attn_output": 8192, "ffn_down": 28672}),
    "qwen3-0.6b": ("qwen3", {"attn_output": 2048, "ffn_down": 3072}),
    "qwen3-14b": ("qwen3", {"attn_output": 5120, "ffn_down": 17408}),
    "gemma-3-4b-it": ("gemma3", {"attn_output": 2048, "ffn_down": 10240}),
    "glm-4.6v": ("glm4moe", {"attn_output": 12288, "ffn_down": 10944, "ffn_down_exps": 1408, "ffn_down_shexp": 1408}),
    "gpt-oss-120b": ("gpt-oss", {"attn_output": 4096, "ffn_down_exps": 2880}),
    "deepseek-v3.1": (
        "deepseek2",
        {"attn_output": 16384, "ffn_down": 18432, "ffn_down_exps": 2048, "ffn_down_shexp": 2048, "attn_q_b": 1536, "attn_k_b": 128},
    ),
    "nvidia-nemotron-3-nano-30b-a3b": (
        "nemotron_h_moe",
        {"attn_output": 4096, "ffn_down_exps": 1856, "ffn_down_shexp": 3712, "ssm_out": 4096},
    ),
    "qwen3-coder-next": ("qwen3next", {"attn_output": 4096, "ffn_down_exps": 512, "ffn_down_shexp": 512, "ssm_out": 4096}),
    "qwen3.5-397b-a17b": ("qwen35moe", {"attn_output": 8192, "ffn_down_exps": 1024, "ffn_down_shexp": 1024, "ssm_out": 8192}),
    "qwen3.6-27b": ("qwen35", {"attn_output": 6144, "ffn_down": 17408, "ssm_out": 6144}),
    "step-3.5-flash": ("step35", {"attn_output": 4096, "ffn_down": 11264, "ffn_down_exps": 1280, "ffn_down_shexp": 1280}),
}
# 3-D tensors besides the experts: deepseek's per-head attn_k_b (ne = [128, 512, n_head])
SNAPSHOT_3D = {"attn_k_b": 128}


def parse_snapshot(path: Path):
    header, sections, cur = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("# n_embd"):
            header = {k: int(v) for k, v in (kv.split("=") for kv in line[2:].split(", "))}
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            ftype, dflt = line[1:].split("] ")
            cur = sections[ftype] = (dflt.upper(), {})
        else:
            name, typ = line.rsplit(" ", 1)
            cur[1][name] = typ.upper()
    return header, sections


def snapshot_model(snapshots: Path, name: str):
    header, sections = parse_snapshot(snapshots / f"{name}.schema")
    arch, row_lengths = SNAPSHOT_MODELS[name]
    names = sorted(set().union(*(ov for _, ov in sections.values())))
    n_embd, n_expert = header["n_embd"], header.get("n_expert", 0)
    tensors = []
    for n in names:
        kind = re.sub(r"^blk\.\d+\.", "", n).removesuffix(".weight")
        cols = row_lengths.get(kind, n_embd)
        lead = (n_expert,) if kind.endswith("_exps") else (SNAPSHOT_3D[kind],) if kind in SNAPSHOT_3D else ()
        tensors.append(TensorInfo(n, (*lead, 64, cols), "F16"))
    model = ModelInfo(
        arch=arch,
        n_layer=header["n_layer"],
        n_head=header["n_head"],
        n_head_kv=header["n_head_kv"],
        n_expert=n_expert,
        n_embd=n_embd,
        tensors=tensors,
    )
    return model, sections


@pytest.mark.parametrize("name", sorted(SNAPSHOT_MODELS))
def test_llama_cpp_snapshot(name, snapshots):
    model, sections = snapshot_model(snapshots, name)
    assert len(sections) == 33
    failures = []
    for ftype, (dflt, overrides) in sections.items():
        assert default_type(ftype) == dflt, ftype
        plan = preset_plan(model, ftype)
        for tensor, got in plan.types.items():
            expected = overrides.get(tensor, dflt)
            if got != expected:
                failures.append(f"[{ftype}] {tensor}: expected {expected}, got {got}")
    assert not failures, f"{len(failures)} mismatches, e.g. " + "; ".join(failures[:5])


# --------------------------------------------------------------------------------------------
# llama-quantize --dry-run, live
# --------------------------------------------------------------------------------------------

ALIGN = 32


def write_sparse_gguf(path: Path, model: ModelInfo, n_ff: int, n_vocab: int) -> None:
    """A GGUF with the model's metadata and tensor infos whose tensor data is a hole."""
    a = model.arch
    w = GGUFWriter(str(path), a)
    w.add_uint32(f"{a}.block_count", model.n_layer)
    w.add_uint32(f"{a}.context_length", 4096)
    w.add_uint32(f"{a}.embedding_length", model.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", n_ff)
    w.add_uint32(f"{a}.attention.head_count", model.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", model.n_head_kv)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{a}.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32(f"{a}.vocab_size", n_vocab)
    w.add_uint32("general.file_type", 1)
    if model.n_expert:
        w.add_uint32(f"{a}.expert_count", model.n_expert)
        w.add_uint32(f"{a}.expert_used_count", 2)
    data = 0
    for t in model.tensors:
        np_dtype = {"F32": np.float32, "F16": np.float16}[t.dtype]
        nbytes = tensor_bytes(t.dtype, t.shape)
        w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), nbytes, raw_dtype=GGMLQuantizationType[t.dtype])
        data += -(-nbytes // ALIGN) * ALIGN
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    meta = -(-path.stat().st_size // ALIGN) * ALIGN
    os.truncate(path, meta + data)


def write_dummy_imatrix(path: Path) -> None:
    """A one-entry legacy imatrix: enough for llama-quantize to run with has_imatrix."""
    name = b"blk.0.attn_q.weight"
    path.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<iif", 1, 1, 1.0))


_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =[^(]*(?:\((\S+)\))?\s*$")


def dry_run(llama_quantize: Path, gguf_path: Path, preset: str, options: dict, imatrix: Path) -> tuple[dict[str, str] | None, str]:
    cmd = [str(llama_quantize), "--dry-run"]
    if options.get("pure"):
        cmd.append("--pure")
    if options.get("leave_output"):
        cmd.append("--leave-output-tensor")
    if options.get("output_type"):
        cmd += ["--output-tensor-type", options["output_type"]]
    if options.get("token_embedding_type"):
        cmd += ["--token-embedding-type", options["token_embedding_type"]]
    for pattern, typ in options.get("tensor_types", ()):
        cmd += ["--tensor-type", f"{pattern}={typ}"]
    if options.get("has_imatrix"):
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(gguf_path), preset]
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode:
        return None, text
    types = {}
    for line in text.splitlines():
        if m := _LINE.match(line):
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return types, text


# (options, presets): every llama-quantize preset plain, with --pure and with an imatrix; the
# other options on a spread of presets
SOME_PRESETS = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "IQ2_M", "F16"]
DRY_RUN_OPTIONS = [
    ({}, list(PRESETS)),
    ({"pure": True}, list(PRESETS)),
    ({"has_imatrix": True}, list(PRESETS)),
    ({"output_type": "Q4_0"}, SOME_PRESETS),
    ({"output_type": "Q5_K"}, SOME_PRESETS),  # tied: token_embd takes it through the mixture, then falls back
    ({"token_embedding_type": "Q6_K"}, SOME_PRESETS),  # taken as is, no fallback
    ({"leave_output": True}, SOME_PRESETS),
    # regex search, lower-cased pattern, first match wins, fallback still applies
    ({"tensor_types": [("attn_v", "Q8_0"), ("BLK\\.1\\.", "q3_k"), ("ffn_down", "IQ4_NL"), ("attn_v", "Q2_K")]}, SOME_PRESETS),
]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_llama_quantize_dry_run(model_name, tmp_path, llama_quantize):
    model, n_ff, n_vocab = MODELS[model_name]
    path = tmp_path / f"{model_name}.gguf"
    write_sparse_gguf(path, model, n_ff, n_vocab)
    imatrix = tmp_path / "imatrix.dat"
    write_dummy_imatrix(imatrix)
    failures, n_checked = [], 0
    for options, presets in DRY_RUN_OPTIONS:
        for preset in presets:
            expected, log = dry_run(llama_quantize, path, preset, options, imatrix)
            try:
                plan = preset_plan(model, preset, **options)
            except ValueError as e:
                if expected is not None:
                    failures.append(f"{preset} {options}: ValueError {e}, llama-quantize succeeds")
                continue
            if expected is None:
                failures.append(f"{preset} {options}: planned, llama-quantize fails: {log[-200:]}")
                continue
            n_checked += 1
            diff = {n: (expected.get(n), plan.types.get(n)) for n in expected.keys() | plan.types.keys()}
            diff = {n: v for n, v in diff.items() if v[0] != v[1]}
            if diff:
                failures.append(f"{preset} {options}: {len(diff)} tensors differ, e.g. {sorted(diff.items())[:3]}")
                continue
            m = re.search(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback", log)
            if len(plan.fallbacks) != (int(m.group(1)) if m else 0):
                failures.append(f"{preset} {options}: {len(plan.fallbacks)} fallbacks, llama-quantize says {m}")
            needs = "will require an imatrix" in log
            if bool(plan.requires_imatrix) != needs and not options.get("has_imatrix"):
                failures.append(f"{preset} {options}: requires_imatrix={plan.requires_imatrix[:2]}, log says {needs}")
            m = re.search(r"quant size\s*=\s*([\d.]+) MiB", log)
            if m and all(_fits(t, plan.shapes[n]) for n, t in plan.types.items()):
                if f"{plan.total_bytes / 2**20:.2f}" != m.group(1):
                    failures.append(f"{preset} {options}: {plan.total_bytes / 2**20:.2f} MiB, llama-quantize {m.group(1)}")
    assert not failures, f"{len(failures)} of {n_checked} plans differ:\n" + "\n".join(failures[:10])
    assert n_checked >= 50


def _fits(type_name: str, shape) -> bool:
    return shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0] == 0


# --------------------------------------------------------------------------------------------
# readable spot checks of the rules
# --------------------------------------------------------------------------------------------


def _layers(plan: Plan, kind: str, n: int) -> list[str]:
    return [plan.types[f"blk.{i}.{kind}.weight"] for i in range(n)]


def test_70b_attn_v_gets_more_bits():
    model = MODELS["llama-70b"][0]
    assert model.is_70b and model.n_gqa == 8
    plan = preset_plan(model, "Q4_K_M")
    more = {i for i in range(80) if i < 10 or i >= 70 or (i - 10) % 3 == 2}
    # use_more_bits -> Q6_K; the rest would be Q4_K, which a 70B bumps to Q5_K
    assert _layers(plan, "attn_v", 80) == ["Q6_K" if i in more else "Q5_K" for i in range(80)]
    assert _layers(plan, "ffn_down", 80) == ["Q6_K" if i in more else "Q4_K" for i in range(80)]
    assert plan.types["output.weight"] == "Q6_K" and plan.types["token_embd.weight"] == "Q4_K"
    assert plan.types["rope_freqs.weight"] == "F32"
    # not a 70B when the heads are not shared (llama 65B)
    assert not ModelInfo(arch="llama", n_layer=80, n_head=64, n_head_kv=64, n_embd=8192).is_70b


def test_mixtral_rules():
    model = MODELS["mixtral-8x7b"][0]
    plan = preset_plan(model, "Q4_K_M")
    assert set(_layers(plan, "attn_v", 32)) == {"Q8_0"}  # 8 experts: attn_v and attn_k to Q8_0
    assert set(_layers(plan, "attn_k", 32)) == {"Q8_0"}
    assert set(_layers(plan, "attn_output", 32)) == {"Q5_K"}
    assert set(_layers(plan, "ffn_gate_inp", 32)) == {"F32"}  # the router is never quantized
    more = {i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2}
    assert _layers(plan, "ffn_down_exps", 32) == ["Q6_K" if i in more else "Q4_K" for i in range(32)]
    assert set(_layers(plan, "ffn_up_exps", 32)) == {"Q4_K"}
    # a 3-D expert tensor is sized as (n_expert * rows, cols)
    assert plan.tensor_bytes("blk.0.ffn_up_exps.weight") == 8 * 14336 * 4096 // 256 * 144
    q2 = preset_plan(model, "Q2_K")
    assert set(_layers(q2, "attn_output", 32)) == {"Q5_K"}


def test_q3_k_m_and_q4_k_s_counters():
    model = MODELS["llama-7b"][0]
    q3 = preset_plan(model, "Q3_K_M")
    assert _layers(q3, "attn_v", 32) == ["Q5_K"] * 2 + ["Q4_K"] * 30
    assert _layers(q3, "ffn_down", 32) == ["Q5_K"] * 2 + ["Q4_K"] * 30
    assert set(_layers(q3, "attn_output", 32)) == {"Q4_K"}
    q4s = preset_plan(model, "Q4_K_S")
    assert _layers(q4s, "attn_v", 32) == ["Q5_K"] * 4 + ["Q4_K"] * 28
    assert _layers(q4s, "ffn_down", 32) == ["Q5_K"] * 4 + ["Q4_K"] * 28
    q2 = preset_plan(model, "Q2_K")  # gqa 1: attn_v Q3_K, not Q4_K
    assert set(_layers(q2, "attn_v", 32)) == {"Q3_K"}
    assert preset_plan(model, "Q4_K").types == preset_plan(model, "q4_k_m").types  # alias, case-insensitive


def test_imatrix_choices():
    model = MODELS["llama-7b"][0]
    for preset, bumped in (("Q4_0", "Q4_1"), ("Q5_0", "Q5_1")):
        assert set(_layers(preset_plan(model, preset), "ffn_down", 32)) == {preset}
        with_im = preset_plan(model, preset, has_imatrix=True)
        assert _layers(with_im, "ffn_down", 32) == [bumped] * 4 + [preset] * 28
    iq4 = preset_plan(model, "IQ4_XS")
    assert _layers(iq4, "ffn_down", 32) == ["Q5_K"] * 4 + ["IQ4_XS"] * 28
    assert set(_layers(preset_plan(model, "IQ4_XS", has_imatrix=True), "ffn_down", 32)) == {"IQ4_XS"}
    # Q2_K_S's Q2_K tensors are the ones llama-quantize refuses without an imatrix
    q2s = preset_plan(model, "Q2_K_S")
    assert "blk.10.ffn_up.weight" in q2s.requires_imatrix and "token_embd.weight" not in q2s.requires_imatrix
    assert not preset_plan(model, "Q2_K").requires_imatrix


def test_options():
    model = MODELS["llama-7b"][0]
    pure = preset_plan(model, "Q4_K_M", pure=True)
    quantized = [n for n, t in pure.types.items() if t != "F32"]
    assert {pure.types[n] for n in quantized} == {"Q4_K"}  # output and token_embd too
    plan = preset_plan(
        model,
        "Q4_K_M",
        output_type="q8_0",
        token_embedding_type="Q3_K",
        tensor_types=["ATTN_V=q8_0", ("blk\\.3\\.", "Q2_K"), ("attn_v", "Q6_K")],
    )
    assert plan.types["output.weight"] == "Q8_0" and plan.types["token_embd.weight"] == "Q3_K"
    assert set(_layers(plan, "attn_v", 32)) == {"Q8_0"}  # first matching pattern wins
    assert plan.types["blk.3.ffn_up.weight"] == "Q2_K"
    assert plan.types["blk.3.attn_norm.weight"] == "F32"  # patterns only touch quantizable tensors
    # no override for F16/F32 presets (default type not quantized), but the output/embd options apply
    f16 = preset_plan(model, "F16", tensor_types=[("attn_v", "Q8_0")], output_type="Q6_K")
    assert f16.types["blk.0.attn_v.weight"] == "F16" and f16.types["output.weight"] == "Q6_K"
    left = preset_plan(model, "Q4_K_M", leave_output=True)
    assert left.types["output.weight"] == "F16"  # keeps its input type
    assert left.types["token_embd.weight"] == "Q4_K"  # still not tied: output.weight exists


def test_fallbacks():
    assert fallback_type("Q4_K", 576) == "Q5_0"
    assert fallback_type("Q5_K", 576) == "Q5_1"
    assert fallback_type("Q6_K", 576) == "Q8_0"
    assert fallback_type("Q2_K", 576) == fallback_type("Q3_K", 576) == "Q4_0"
    assert fallback_type("IQ4_XS", 576) == "IQ4_NL"
    assert fallback_type("Q4_K", 336) == "F16"  # 336 is not a multiple of 32 either
    assert fallback_type("Q8_0", 336) == "F16"
    assert fallback_type("Q4_K", 4096) == "Q4_K"
    with pytest.raises(ValueError, match="no tensor type fallback"):
        fallback_type("Q1_0", 576)
    odd = MODELS["llama-toy-odd"][0]
    plan = preset_plan(odd, "Q4_K_M")
    assert set(_layers(plan, "ffn_down", 9)) == {"F16"}
    assert set(_layers(plan, "attn_q", 9)) == {"Q5_0"}


def test_which_tensors_are_quantized():
    def ok(name, shape):
        return allows_quantization(TensorInfo(name, shape), "llama")

    assert ok("blk.0.attn_q.weight", (64, 64))
    assert ok("blk.0.ffn_down_exps.weight", (8, 64, 64))
    assert not ok("output_norm.weight", (64,))
    assert not ok("blk.0.attn_q_norm.weight", (64, 64))  # *_norm.weight, whatever the shape
    assert not ok("blk.0.ffn_gate_inp.weight", (8, 64))
    assert not ok("blk.0.attn_q.bias", (64, 64))
    assert not ok("blk.0.attn_q.weight", (1, 64))  # ggml_n_dims == 1
    assert not ok("position_embd.weight", (64, 64))
    assert ok("blk.0.ssm_in.weight", (64, 64)) and not ok("blk.0.ssm_conv1d.weight", (64, 4))


def test_errors_and_contract():
    model = MODELS["llama-7b"][0]
    with pytest.raises(ValueError, match="valid presets: .*Q4_K_M"):
        preset_plan(model, "Q4_K_XL")
    with pytest.raises(ValueError, match="unknown tensor type"):
        preset_plan(model, "Q4_K_M", output_type="Q9_K")
    with pytest.raises(ValueError, match="PATTERN=TYPE"):
        preset_plan(model, "Q4_K_M", tensor_types=["attn_v"])
    with pytest.raises(ValueError, match="tied_output"):
        ModelInfo(arch="llama", n_layer=1, n_head=1, n_head_kv=1, n_embd=64, tied_output=True,
                  tensors=[TensorInfo("output.weight", (10, 64))])  # fmt: skip
    assert MODELS["smollm2-135m"][0].tied_output and not model.tied_output
    assert default_type("Q4_K_M") == "Q4_K" and default_type("IQ2_M") == "IQ2_S"
    assert {"Q4_K_M", "Q8_0", "IQ4_XS", "F16", "BF16", "F32"} <= set(PRESETS)


def test_plan_helpers():
    plan = preset_plan(SMOLLM2, "Q8_0")
    assert plan.tensor_bytes("blk.0.attn_q.weight") == 576 * 576 // 32 * 34
    assert plan.tensor_bytes("output_norm.weight") == 576 * 4
    assert plan.n_elements == 134_515_008
    table = plan.table()
    assert "blk.0.attn_q.weight" in table and "Q8_0" in table and f"{plan.total_bytes:,}" in table
    assert str(plan) == table
    bare = Plan(types={"a.weight": "Q4_0"}, shapes={"a.weight": (2, 64)})
    assert bare.total_bytes == 2 * 2 * 18 and bare.bits_per_weight == 4.5


def test_from_gguf(tmp_path):
    model, n_ff, n_vocab = MODELS["moe4-tied"]
    path = tmp_path / "m.gguf"
    write_sparse_gguf(path, model, n_ff, n_vocab)
    read = ModelInfo.from_gguf(path)
    assert read == model
    assert preset_plan(read, "Q4_K_M").types == preset_plan(model, "Q4_K_M").types
