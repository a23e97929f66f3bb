"""Per-tensor type plans, starting from llama-quantize's own presets.

`preset_plan(model, "Q4_K_M")` answers, for every tensor of a model, the GGUF type that
`llama-quantize model.gguf Q4_K_M` would give it: the same tensors kept as they are (norms, 1-D
tensors, expert routers, ...), the same per-category bumps (attn_v, ffn_down, attn_output,
output/token_embd, ...), the same layer counters and `use_more_bits` pattern, the same shape
fallbacks (Q4_K -> Q5_0 when a row is not a multiple of 256, ...), and the command line's
`--pure`, `--output-tensor-type`, `--token-embedding-type`, `--tensor-type`, `--leave-output-tensor`
and `--imatrix` effects.

Source of truth: llama.cpp 0c1e570, `src/llama-quant.cpp` (`llama_tensor_get_type` and
`llama_tensor_get_type_impl`, `tensor_allows_quantization`, `tensor_type_fallback`,
`llama_ftype_get_default_type`, `tensor_requires_imatrix`) and `tools/quantize/quantize.cpp`
(preset names, option parsing). The tests check it against llama.cpp's own snapshot tables
(`tests/snapshots/*.schema`) and against `llama-quantize --dry-run`.

Shapes are numpy order: `(rows, cols)`, `cols` being the row length (ggml's `ne[0]`); an expert
tensor is `(n_expert, rows, cols)`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from math import prod
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import MixquantError

__all__ = [
    "TensorInfo",
    "ModelInfo",
    "Plan",
    "PRESETS",
    "PRESET_ALIASES",
    "preset_plan",
    "default_type",
    "allows_quantization",
    "layer_of",
    "requires_imatrix",
    "category",
    "fallback_type",
    "block_size",
    "tensor_bytes",
]


# --------------------------------------------------------------------------------------------
# the model, as llama-quantize sees it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the input model.

    `dtype` is the type it has in the input (what it keeps when llama-quantize leaves it alone,
    e.g. the F32 norms); F32 unless said otherwise.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", str(self.dtype).upper())
        if not self.shape or any(s < 0 for s in self.shape):
            raise MixquantError(f"{self.name}: bad shape {self.shape}")

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml's order: ne[0] is the row length."""
        return tuple(reversed(self.shape))

    @property
    def n_dims(self) -> int:
        """`ggml_n_dims`: trailing ggml dimensions of size 1 do not count; at least 1."""
        ne = self.ne
        for i in range(len(ne) - 1, 0, -1):
            if ne[i] > 1:
                return i + 1
        return 1

    @property
    def rows_cols(self) -> tuple[int, int]:
        """(product of the leading dims, row length)."""
        return prod(self.shape[:-1]), self.shape[-1]

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the type choice depends on: architecture, a few hyper-parameters and the tensor list.

    `n_layer` is the GGUF `block_count`, `n_head`/`n_head_kv` those of layer 0 (gqa = n_head //
    n_head_kv, as `llama_hparams::n_gqa`). `tied_output` says that the output projection shares
    the token embedding; llama.cpp decides it from the absence of an `output.weight` tensor, so
    it is derived from `tensors` when left out, and must agree with them when given.
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    n_embd: int
    tied_output: bool | None = None
    tensors: tuple[TensorInfo, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n, c in Counter(names).items() if c > 1)
            raise MixquantError(f"tensor {dup!r} listed twice")
        if self.n_layer <= 0:
            raise MixquantError(f"n_layer must be positive, got {self.n_layer}")
        if self.tensors:
            derived = OUTPUT not in names
            if self.tied_output is None:
                object.__setattr__(self, "tied_output", derived)
            elif bool(self.tied_output) != derived:
                raise MixquantError(
                    f"tied_output={self.tied_output} but {OUTPUT} is {'absent' if derived else 'present'}; "
                    "llama.cpp treats the output as tied exactly when there is no output.weight"
                )
        elif self.tied_output is None:
            object.__setattr__(self, "tied_output", False)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's `LLM_TYPE_70B`, the only model size the type choice looks at."""
        rule = _SEVENTY_B.get(self.arch)
        return bool(rule and rule(self))

    @classmethod
    def from_gguf(cls, path: str | Path) -> ModelInfo:
        """Read the architecture, hyper-parameters and tensor list of a GGUF file (no tensor data)."""
        from .files import open_gguf

        reader = open_gguf(path)

        def get(key: str, default=None):
            f = reader.fields.get(key)
            if f is None:
                return default
            value = f.contents()
            if isinstance(value, list):  # per-layer arrays: llama.cpp's n_head() etc. mean layer 0
                value = value[0] if value else default
            return value

        arch = get("general.architecture")
        if not isinstance(arch, str):
            raise MixquantError(f"{path}: malformed GGUF: no general.architecture")
        tensors = tuple(
            TensorInfo(t.name, tuple(int(s) for s in reversed(t.shape.tolist())), t.tensor_type.name)
            for t in reader.tensors
        )
        try:
            n_head = int(get(f"{arch}.attention.head_count", 0))
            return cls(
                arch=arch,
                n_layer=int(get(f"{arch}.block_count")),
                n_head=n_head,
                n_head_kv=int(get(f"{arch}.attention.head_count_kv", n_head)),
                n_expert=int(get(f"{arch}.expert_count", 0)),
                n_embd=int(get(f"{arch}.embedding_length", 0)),
                tensors=tensors,
            )
        except (TypeError, ValueError) as exc:  # a missing or non-numeric hyper-parameter
            raise MixquantError(f"{path}: malformed GGUF hyper-parameters: {exc}") from None


# llama.cpp sets LLM_TYPE_70B in these architectures' load_hparams (src/models/*.cpp)
_SEVENTY_B: dict[str, Callable[[ModelInfo], bool]] = {
    "llama": lambda m: m.n_expert != 8 and m.n_layer == 80 and m.n_head != m.n_head_kv,
    "qwen2": lambda m: m.n_layer == 80,
    "deci": lambda m: m.n_layer == 80,
    "olmo": lambda m: m.n_layer == 80,
    "jais2": lambda m: m.n_layer == 68,
}


# --------------------------------------------------------------------------------------------
# type geometry
# --------------------------------------------------------------------------------------------


def _ggml_type(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[str(name).upper()]
    except KeyError:
        raise MixquantError(
            f"unknown tensor type {name!r}; known types: {', '.join(t.name for t in GGMLQuantizationType)}"
        ) from None


def _codec(name: str):
    """mixquant's codec for this type, or None while it is not registered (or importable)."""
    try:
        from . import formats
    except Exception:  # a format family still being written must not break planning
        return None
    try:
        return formats.get(name)
    except ValueError:
        return None


def block_size(type_name: str) -> int:
    """Elements per block (ggml_blck_size)."""
    codec = _codec(type_name)
    if codec is not None:
        return codec.block_size
    return GGML_QUANT_SIZES[_ggml_type(type_name)][0]


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this shape in this type (rows = product of the leading dims)."""
    shape = tuple(int(s) for s in shape)
    rows, cols = prod(shape[:-1]), shape[-1]
    codec = _codec(type_name)
    if codec is not None:
        from .formats import quantized_size

        return quantized_size(codec.name, (rows, cols))
    bs, ts = GGML_QUANT_SIZES[_ggml_type(type_name)]
    if cols % bs:
        raise MixquantError(f"{type_name} needs rows whose length is a multiple of {bs}; got {cols}")
    return rows * (cols // bs) * ts


_NOT_QUANTIZED = frozenset({"F32", "F16", "BF16"})  # ggml_is_quantized() is false (of the float types)


# --------------------------------------------------------------------------------------------
# presets (llama_ftype)
# --------------------------------------------------------------------------------------------

# llama-quantize's QUANT_OPTIONS names -> llama_ftype_get_default_type. Q2_0 is left out: the
# gguf package this project pins has no such tensor type. NVFP4 has no default type (llama.cpp
# rejects it as an output file type) and COPY is not a quantization.
PRESETS: dict[str, str] = {
    "Q1_0": "Q1_0",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "MXFP4_MOE": "MXFP4",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "IQ2_XXS": "IQ2_XXS",
    "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S",
    "IQ1_S": "IQ1_S",
    "IQ1_M": "IQ1_M",
    "TQ1_0": "TQ1_0",
    "TQ2_0": "TQ2_0",
    "Q2_K": "Q2_K",
    "Q2_K_S": "Q2_K",
    "IQ3_XXS": "IQ3_XXS",
    "IQ3_S": "IQ3_S",
    "IQ3_M": "IQ3_S",
    "IQ3_XS": "IQ3_S",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "Q8_0": "Q8_0",
    "F16": "F16",
    "BF16": "BF16",
    "F32": "F32",
}

# llama-quantize accepts these as names of the medium mixes (QUANT_OPTIONS "alias for Q4_K_M"...).
PRESET_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def default_type(preset: str) -> str:
    """The type most tensors get under this preset (llama_ftype_get_default_type)."""
    return _resolve(preset)[1]


def _resolve(preset: str) -> tuple[str | None, str]:
    """(ftype name or None for a single type, default tensor type)."""
    key = str(preset).strip().upper()
    key = PRESET_ALIASES.get(key, key)
    if key in PRESETS:
        return key, PRESETS[key]
    # not a llama-quantize ftype: a single type mixquant can write, applied like --pure
    if _codec(key) is not None:
        return None, _codec(key).name
    names = sorted(PRESETS) + sorted(PRESET_ALIASES)
    raise MixquantError(
        f"unknown preset {preset!r}; valid presets: {', '.join(names)} "
        "(or a single tensor type that mixquant.formats can write)"
    )


# --------------------------------------------------------------------------------------------
# tensor categories (tensor_get_category) and which tensors are quantized at all
# --------------------------------------------------------------------------------------------

OUTPUT = "output.weight"
_TOKEN_EMBD_NAMES = frozenset({"token_embd.weight", "per_layer_token_embd.weight"})


class Cat(Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


# first substring found wins, in llama.cpp's order
_CATEGORY_SUBSTRINGS: tuple[tuple[str, Cat], ...] = (
    ("attn_qkv.weight", Cat.ATTN_QKV),
    ("attn_kv_b.weight", Cat.ATTN_KV_B),
    ("attn_v.weight", Cat.ATTN_V),
    ("attn_k.weight", Cat.ATTN_K),
    ("attn_q.weight", Cat.ATTN_Q),
    ("attn_output.weight", Cat.ATTN_OUTPUT),
    ("ffn_up", Cat.FFN_UP),
    ("ffn_gate", Cat.FFN_GATE),
    ("ffn_down", Cat.FFN_DOWN),
)
_ATTN_V_LIKE = frozenset({Cat.ATTN_V, Cat.ATTN_QKV, Cat.ATTN_KV_B})  # category_is_attn_v


def category(name: str) -> Cat:
    if name == OUTPUT:
        return Cat.OUTPUT
    if name in _TOKEN_EMBD_NAMES:
        return Cat.TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return Cat.OTHER


# tensor_allows_quantization: names containing any of these stay as they are
_KEEP_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEEP_NAMES = frozenset({"position_embd.weight", "token_types.weight"})
_KEEP_SUBSTRINGS_BY_ARCH = {
    "glm5-next": (
        "hc_",
        "indexer.attn_q_b",
        "indexer.attn_k",
        "indexer.proj",
        "indexer_compressor_gate",
        "indexer_compressor_ape",
        "ssm_f_a.weight",
        "ssm_f_b.weight",
        "ssm_g_a.weight",
        "ssm_g_b.weight",
        "ssm_beta.weight",
        "attn_kv_a_mqa.weight",
        "attn_k_b.weight",
        "attn_v_b.weight",
    ),
}


def allows_quantization(t: TensorInfo, arch: str, *, leave_output: bool = False) -> bool:
    """Whether llama-quantize converts this tensor at all (tensor_allows_quantization)."""
    if t.n_dims < 2:  # only 2-D and 3-D (expert) tensors
        return False
    name = t.name
    if not name.endswith("weight"):
        return False
    if leave_output and name == OUTPUT:
        return False
    if name in _KEEP_NAMES:
        return False
    subs = _KEEP_SUBSTRINGS + _KEEP_SUBSTRINGS_BY_ARCH.get(arch, ())
    return not any(s in name for s in subs)


# --------------------------------------------------------------------------------------------
# the mixture rules (llama_tensor_get_type_impl), as tables
# --------------------------------------------------------------------------------------------

# ftypes whose output/tied-embedding gets Q5_K and that take their own low-bit branch
_IQ_OUTPUT_Q5K = frozenset({"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
_IQ_LOW = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
_IQ2_SM = frozenset({"IQ2_S", "IQ2_M"})


@dataclass
class _Ctx:
    """What a rule can look at: the model, the ftype, the tensor and the position counters."""

    model: ModelInfo
    ftype: str
    has_imatrix: bool
    tensor: TensorInfo
    i: int = 0  # layer index (ffn_*) or attn_v counter (attn_v)
    n: int = 0  # n_layer (ffn_*) or number of attn_v-like tensors (attn_v)

    @property
    def gqa(self) -> int:
        return self.model.n_gqa

    @property
    def n_expert(self) -> int:
        return self.model.n_expert

    @property
    def falcon(self) -> bool:
        return self.model.arch == "falcon"

    @property
    def first_eighth(self) -> bool:
        return self.i < self.n // 8

    @property
    def more_bits(self) -> bool:
        """use_more_bits: the first and last eighth of the layers, and every third in between."""
        i, n = self.i, self.n
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# a rule: a type, or a function of the context giving a type (None: keep the default)
Rule = str | Callable[[_Ctx], str | None]


def _apply(rules: Mapping[str, Rule], ctx: _Ctx, current: str) -> str:
    rule = rules.get(ctx.ftype)
    if rule is None:
        return current
    out = rule(ctx) if callable(rule) else rule
    return current if out is None else out


_TOKEN_EMBD: dict[str, Rule] = {
    **dict.fromkeys(("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), "Q2_K"),
    **dict.fromkeys(("IQ2_S", "IQ2_M", "IQ3_XXS"), "IQ3_S"),
    **dict.fromkeys(("TQ1_0", "TQ2_0", "Q2_0"), "Q4_K"),
}

_ATTN_V: dict[str, Rule] = {
    "Q2_K": lambda c: "Q4_K" if c.gqa >= 4 else "Q3_K",
    "Q2_K_S": lambda c: "Q4_K" if c.gqa >= 4 else None,
    "IQ3_XXS": lambda c: "Q4_K" if c.gqa >= 4 else ("IQ3_XXS" if c.has_imatrix else "IQ3_S"),
    "IQ3_XS": lambda c: "Q4_K" if c.gqa >= 4 else None,
    "IQ3_S": lambda c: "Q4_K" if c.gqa >= 4 else None,
    "IQ3_M": "Q4_K",
    "Q3_K_M": lambda c: "Q5_K" if c.i < 2 else "Q4_K",
    "Q3_K_L": "Q5_K",
    "IQ4_NL": lambda c: "Q5_K" if c.gqa >= 4 else None,
    "IQ4_XS": lambda c: "Q5_K" if c.gqa >= 4 else None,
    "Q4_K_M": lambda c: "Q6_K" if c.more_bits else None,
    "Q5_K_M": lambda c: "Q6_K" if c.more_bits else None,
    "Q4_K_S": lambda c: "Q5_K" if c.i < 4 else None,
}

_ATTN_K: dict[str, Rule] = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}
_ATTN_Q: dict[str, Rule] = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}

_FFN_DOWN: dict[str, Rule] = {
    "Q2_K": "Q3_K",
    "Q2_K_S": lambda c: "Q4_K" if c.first_eighth else None,
    "IQ3_XXS": lambda c: None if c.has_imatrix else ("Q4_K" if c.first_eighth else "Q3_K"),
    "Q3_K_M": lambda c: (
        "Q5_K" if c.i < c.n // 16 else "Q4_K" if (not c.falcon or c.more_bits) else "Q3_K"
    ),
    "IQ3_M": lambda c: "Q4_K" if c.first_eighth or (c.n_expert == 8 and c.more_bits) else None,
    "Q3_K_L": lambda c: "Q4_K" if c.falcon else "Q5_K",
    "Q4_K_M": lambda c: (
        ("Q6_K" if c.i < c.n // 16 else "Q5_K" if c.more_bits else "Q4_K")
        if c.falcon
        else ("Q6_K" if c.more_bits else None)
    ),
    "IQ4_NL": lambda c: "Q5_K" if c.first_eighth and not c.has_imatrix else None,
    "IQ4_XS": lambda c: "Q5_K" if c.first_eighth and not c.has_imatrix else None,
    "Q5_K_M": lambda c: "Q6_K" if c.more_bits else None,
    "Q4_K_S": lambda c: "Q5_K" if not c.falcon and c.first_eighth else None,
    # with an imatrix only: guard the first ffn_down layers of Q4_0/Q5_0
    "Q4_0": lambda c: "Q4_1" if c.has_imatrix and c.first_eighth else None,
    "Q5_0": lambda c: "Q5_1" if c.has_imatrix and c.first_eighth else None,
}

_ATTN_OUTPUT_MOE8 = dict.fromkeys(
    ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"),
    "Q5_K",
)
_ATTN_OUTPUT: dict[str, Rule] = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}
_ATTN_OUTPUT_FALCON: dict[str, Rule] = {"Q3_K_L": "Q4_K"}

# (llama.cpp also has an attn_qkv branch after the attn_v one; it is unreachable, since attn_qkv
# is attn_v-like and takes the attn_v rules, so it is not reproduced here)

_FFN_GATE_UP: dict[str, Rule] = {"IQ3_XS": lambda c: "IQ3_XXS" if c.n // 8 <= c.i < 7 * c.n // 8 else None}

# the low-bit IQ ftypes' own branch
_IQ_LOW_ATTN_OUTPUT: dict[str, Rule] = {
    **dict.fromkeys(("IQ1_S", "IQ1_M"), "IQ2_XXS"),
    **dict.fromkeys(("IQ2_S", "IQ2_M"), "IQ3_S"),
}


@dataclass
class _Counters:
    """quantize_state_impl's running positions, advanced only where llama.cpp advances them."""

    n_attention_wv: int
    n_layer: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &il): the leading integer after "blk.", else None."""
    m = re.match(r"blk\.\s*([+-]?\d+)", name)
    return int(m.group(1)) if m else None


def _layer_info(model: ModelInfo, counter: int, name: str) -> tuple[int, int]:
    """(i_layer, n_layer): the running counter, or for MoE models the layer in the tensor's name."""
    if max(1, model.n_expert) > 1:
        il = layer_of(name)
        if il is None:
            raise MixquantError(f"Failed to determine layer for tensor {name}")
        if not 0 <= il < model.n_layer:
            raise MixquantError(f"Bad layer {il} for tensor {name}. Must be in [0, {model.n_layer})")
        return il, model.n_layer
    return counter, model.n_layer


def _mixture_type(
    ctx: _Ctx, cat: Cat, cur: str, st: _Counters, output_type: str | None, tied: bool
) -> str:
    """llama_tensor_get_type_impl: the preset's choice for one tensor (before the shape fallback)."""
    m, ftype, t = ctx.model, ctx.ftype, ctx.tensor

    # glm5-next: these never go below Q8_0
    if m.arch == "glm5-next" and any(s in t.name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if cur not in _NOT_QUANTIZED:
            return "Q8_0"

    if cat is Cat.OUTPUT or (tied and cat is Cat.TOKEN_EMBD):
        if output_type is not None:
            return output_type
        if ftype == "MXFP4_MOE" or m.arch == "falcon" or t.ne[0] % block_size(cur):
            return "Q8_0"
        if ftype in _IQ_OUTPUT_Q5K:
            return "Q5_K"
        return cur if cur == "Q8_0" else "Q6_K"

    if ftype == "MXFP4_MOE":  # experts -> MXFP4, everything else -> Q8_0
        is_expert = len(t.ne) > 2 and t.ne[2] > 1
        if m.arch == "bailingmoe3":
            is_expert = is_expert and cat in (Cat.FFN_UP, Cat.FFN_GATE, Cat.FFN_DOWN)
        return "MXFP4" if is_expert else "Q8_0"

    if cat is Cat.TOKEN_EMBD:
        return _apply(_TOKEN_EMBD, ctx, cur)

    if ftype in _IQ_LOW:
        if cat in _ATTN_V_LIKE:
            st.i_attention_wv += 1
            if m.n_gqa >= 4 or m.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if ftype in _IQ2_SM else "Q2_K"
        if m.n_expert == 8 and cat is Cat.ATTN_K:
            return "Q4_K"
        if cat is Cat.FFN_DOWN:
            low = st.i_ffn_down < st.n_layer // 8  # the raw counter, even for MoE models
            st.i_ffn_down += 1
            if low:
                return "IQ3_S" if ftype in _IQ2_SM else "Q2_K"
            return cur
        if cat is Cat.ATTN_OUTPUT:
            return "Q5_K" if m.n_expert == 8 else _apply(_IQ_LOW_ATTN_OUTPUT, ctx, cur)
        return cur

    if cat in _ATTN_V_LIKE:
        ctx.i, ctx.n = st.i_attention_wv, st.n_attention_wv
        new = _apply(_ATTN_V, ctx, cur)
        if m.is_70b and new in ("Q3_K", "Q4_K"):  # 8 heads share attn_v: cheap to give it more bits
            new = "Q5_K"
        if m.n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
        return new

    if cat is Cat.ATTN_K:
        return "Q8_0" if m.n_expert == 8 else _apply(_ATTN_K, ctx, cur)

    if cat is Cat.ATTN_Q:
        return _apply(_ATTN_Q, ctx, cur)

    if cat is Cat.FFN_DOWN:
        ctx.i, ctx.n = _layer_info(m, st.i_ffn_down, t.name)
        st.i_ffn_down += 1
        return _apply(_FFN_DOWN, ctx, cur)

    if cat is Cat.ATTN_OUTPUT:
        if ctx.falcon:
            return _apply(_ATTN_OUTPUT_FALCON, ctx, cur)
        return _apply(_ATTN_OUTPUT_MOE8 if m.n_expert == 8 else _ATTN_OUTPUT, ctx, cur)

    if cat in (Cat.FFN_GATE, Cat.FFN_UP):
        attr = "i_ffn_gate" if cat is Cat.FFN_GATE else "i_ffn_up"
        ctx.i, ctx.n = _layer_info(m, getattr(st, attr), t.name)
        setattr(st, attr, getattr(st, attr) + 1)
        return _apply(_FFN_GATE_UP, ctx, cur)

    return cur


# tensor_type_fallback: what a type becomes when the row length is not a multiple of its block
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def fallback_type(type_name: str, ncols: int) -> str:
    """The type llama.cpp uses instead when `ncols` is not a multiple of the type's block size."""
    bs = block_size(type_name)
    if ncols % bs == 0:
        return type_name
    out = _FALLBACK.get(type_name)
    if out is None:
        if bs > 32:
            raise MixquantError(f"no tensor type fallback is defined for type {type_name}")
        out = type_name  # already a 32-block type: nothing smaller, so F16 below
    if ncols % block_size(out):
        out = "F16"
    return out


# tensor_requires_imatrix: types llama-quantize refuses to produce without an importance matrix
_NEEDS_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})


def requires_imatrix(name: str, type_name: str, ftype: str | None) -> bool:
    if name in _TOKEN_EMBD_NAMES or name == OUTPUT:
        return False
    return type_name in _NEEDS_IMATRIX or (type_name == "Q2_K" and ftype == "Q2_K_S")


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Tensor name -> GGUF type name, with the shapes to size it.

    `fallbacks` maps the tensors whose chosen type did not fit their row length to the type that
    was wanted; `requires_imatrix` lists the tensors whose type llama-quantize only produces with
    an importance matrix.
    """

    types: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    requires_imatrix: tuple[str, ...] = ()

    def _shape(self, name: str) -> tuple[int, ...]:
        try:
            return self.shapes[name]
        except KeyError:
            raise ValueError(f"plan has no shape for tensor {name!r}") from None

    def tensor_bytes(self, name: str) -> int:
        return tensor_bytes(self.types[name], self._shape(name))

    @property
    def total_bytes(self) -> int:
        """Tensor data bytes (no GGUF header, metadata or alignment padding)."""
        return sum(self.tensor_bytes(n) for n in self.types)

    @property
    def n_elements(self) -> int:
        return sum(prod(self._shape(n)) for n in self.types)

    @property
    def bits_per_weight(self) -> float:
        """Over all tensors, as llama-quantize's "quant size ... BPW" line."""
        n = self.n_elements
        return 8.0 * self.total_bytes / n if n else 0.0

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.types.values()))

    def table(self, damage: Mapping[str, float] | None = None) -> str:
        """One line per tensor and a total. `damage` ({tensor: predicted damage, NaN when unknown},
        e.g. `allocate.plan_damage`) adds a column of it, summed (known values) in the total."""

        def cell(x: float | str) -> str:
            if isinstance(x, float):
                x = "n/a" if x != x else "0" if x == 0 else f"{x:.3e}"
            return "" if damage is None else f"  {x:>9}"

        rows = [(n, "x".join(map(str, self._shape(n))), t, self.tensor_bytes(n)) for n, t in self.types.items()]
        w = max([len(r[0]) for r in rows] + [6])
        ws = max([len(r[1]) for r in rows] + [5])
        known = {} if damage is None else dict(damage)
        lines = [f"{'tensor':<{w}}  {'shape':>{ws}}  {'type':<7}  {'bytes':>12}{cell('damage')}"]
        for n, s, t, b in rows:
            note = f"  (wanted {self.fallbacks[n]})" if n in self.fallbacks else ""
            lines.append(f"{n:<{w}}  {s:>{ws}}  {t:<7}  {b:>12,}{cell(float(known.get(n, 'nan')))}{note}")
        total = float(sum(x for x in known.values() if x == x))
        lines.append(
            f"{'total':<{w}}  {'':>{ws}}  {'':<7}  {self.total_bytes:>12,}{cell(total)}"
            f"  ({self.bits_per_weight:.2f} bits per weight, {len(self.fallbacks)} fallbacks)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _loader_order(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    """llama_model_loader::weight_name_comparer: by block index (-1 outside blocks), then name."""

    def key(t: TensorInfo):
        il = layer_of(t.name)
        return (-1 if il is None else il, t.name.encode())

    return sorted(tensors, key=key)


def _check_type(name: str | None) -> str | None:
    return None if name is None else _ggml_type(name).name


def _parse_tensor_types(tensor_types: Iterable[tuple[str, str] | str]) -> list[tuple[re.Pattern, str]]:
    """--tensor-type options: (pattern, type) pairs or "pattern=type" strings."""
    out = []
    for item in tensor_types:
        if isinstance(item, str):
            pat, sep, typ = item.partition("=")
            if not sep:
                raise MixquantError(f"tensor_types: malformed {item!r}, expected PATTERN=TYPE")
        else:
            pat, typ = item
        if not pat:
            raise MixquantError("tensor_types: missing tensor name pattern")
        try:
            out.append((re.compile(str(pat).lower()), _ggml_type(typ).name))
        except re.error as e:
            raise MixquantError(f"tensor_types: bad pattern {pat!r}: {e}") from None
    return out


def preset_plan(
    model: ModelInfo,
    preset: str,
    *,
    pure: bool = False,
    output_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Iterable[tuple[str, str] | str] = (),
    has_imatrix: bool = False,
    leave_output: bool = False,
) -> Plan:
    """The types `llama-quantize [options] model.gguf PRESET` gives each tensor of `model`.

    preset: a llama-quantize type name (`PRESETS`, case-insensitive; Q3_K/Q4_K/Q5_K mean the _M
        mixes as in llama-quantize), or a single tensor type that mixquant can write and that is
        not a preset name, which is applied to every quantizable tensor as with `pure`.
    pure: --pure, no mixture: every quantizable tensor gets the default type (with fallbacks).
    output_type / token_embedding_type: --output-tensor-type / --token-embedding-type. Like
        llama-quantize these are taken as given, without the shape fallback (a type whose block
        does not divide the row length gives a plan that cannot be written: total_bytes raises);
        with tied embeddings and no token_embedding_type, token_embd follows output_type (with
        the fallback).
    tensor_types: --tensor-type PATTERN=TYPE, in order; the pattern is lower-cased as
        llama-quantize does, searched (ECMAScript-like regex) in the tensor name, first match wins;
        it applies only when the preset's default type is a quantized one.
    has_imatrix: --imatrix given (changes IQ3_XXS, IQ4_NL/IQ4_XS and Q4_0/Q5_0 ffn_down choices).
    leave_output: --leave-output-tensor.
    """
    ftype, dflt = _resolve(preset)
    if ftype is None:
        pure = True
    output_type = _check_type(output_type)
    token_embedding_type = _check_type(token_embedding_type)
    patterns = _parse_tensor_types(tensor_types)

    tensors = _loader_order(model.tensors)
    tied = all(t.name != OUTPUT for t in tensors)
    st = _Counters(
        n_attention_wv=sum(category(t.name) in _ATTN_V_LIKE for t in tensors),
        n_layer=model.n_layer,
    )
    plan = Plan(types={}, shapes={t.name: t.shape for t in tensors})
    needs_imatrix = []

    for t in tensors:
        name = t.name
        if not allows_quantization(t, model.arch, leave_output=leave_output):
            plan.types[name] = t.dtype
            continue
        cat = category(name)

        # --token-embedding-type / --output-tensor-type win outright (no shape fallback)
        if token_embedding_type is not None and cat is Cat.TOKEN_EMBD:
            named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in patterns)
            if not named:
                plan.types[name] = token_embedding_type
                continue
        if output_type is not None and cat is Cat.OUTPUT:
            plan.types[name] = output_type
            continue

        new = dflt
        if new not in _NOT_QUANTIZED:
            manual = False
            for pat, typ in patterns:
                if pat.search(name):
                    new, manual = typ, True
                    break
            if not manual and not pure:
                ctx = _Ctx(model=model, ftype=ftype, has_imatrix=has_imatrix, tensor=t)
                new = _mixture_type(ctx, cat, new, st, output_type, tied)
            fitted = fallback_type(new, t.ne[0])
            if fitted != new:
                plan.fallbacks[name] = new
            new = fitted
        plan.types[name] = new
        if requires_imatrix(name, new, ftype):
            needs_imatrix.append(name)

    plan.requires_imatrix = tuple(needs_imatrix)
    return plan
