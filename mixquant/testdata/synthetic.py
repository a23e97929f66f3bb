"""Synthetic Llama models of any size: random weights in a real Hugging Face layout, for scale benchmarks.

    build_synthetic_llama(folder, hidden=512, n_layer=8, ff=1536, n_head=8, n_head_kv=2)  -> folder
    synthetic_shape(3.0)          -> SyntheticShape for about 3 GB of float32 weights
    synthetic_model(3.0)          -> cache_dir() / "synthetic-llama-..."  (built once, keyed by shape)

The folder is what a Hugging Face checkpoint of a LlamaForCausalLM looks like: config.json (the
bundled test model's, resized, untied output head), its tokenizer (SmolLM2's 49,152 tokens, so the
bundled calibration and evaluation text work), sharded `model-0000k-of-0000n.safetensors` in bf16
(by default) and `model.safetensors.index.json`. The weights are random but give a sane forward
pass: every linear normal(0, 1/sqrt(fan_in)), the two that write into the residual stream
(o_proj, down_proj) further scaled by 1/sqrt(2 n_layer) so the stream stays O(1) through the
blocks, norms near 1, embedding rows of unit variance; the logits then have about unit spread and
the loss sits near ln(vocab). Each tensor has its own generator, seeded from (seed, its name): the
same arguments give the same bytes.

Written tensor by tensor, a few MB of rows at a time: the builder never holds a whole tensor, let
alone the model; its peak RSS is that of Python and its imports (measured: 185 MB building the
1.5 GB and the 2.9 GB models, 11 s and 21 s on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .fixture import build_folder, write_atomic

# bumped whenever the bytes written for a given shape would change
RECIPE = 1
DEFAULT_SHARD_BYTES = 500_000_000
# a rows-at-a-time slab of float32 values: bounds the builder's working memory (16 MB)
_SLAB_VALUES = 4 << 20
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # torch dtype name -> safetensors / GGML name
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
# files copied from the bundled test model: its tokenizer, so the bundled text tokenizes as it does there
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_HEAD_DIM = 64
# what a complete cache folder has (besides the stamp, written last)
_CACHED_FILES = ("config.json", "tokenizer.json", "model.safetensors.index.json")
# row lengths (hidden, ff) are multiples of this, so every k-quant's 256-wide block fits
_ROW_MULTIPLE = 256


@dataclass(frozen=True)
class SyntheticShape:
    """The sizes of a synthetic Llama (the vocabulary is the test model's)."""

    hidden: int
    n_layer: int
    ff: int
    n_head: int
    n_head_kv: int
    vocab: int = 49152

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of every weight, in the order a LlamaForCausalLM state dict lists them."""
        h, kv = self.hidden, self.n_head_kv * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (self.ff, h)), (p + "mlp.up_proj.weight", (self.ff, h)),
                    (p + "mlp.down_proj.weight", (h, self.ff)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    @property
    def block_parameters(self) -> int:
        """Parameters of one decoder block."""
        one_block = replace(self, n_layer=1).tensors()
        return sum(math.prod(shape) for name, shape in one_block if name.startswith("model.layers.0."))

    @property
    def float32_bytes(self) -> int:
        return 4 * self.parameters


def synthetic_shape(float32_gb: float, min_layers: int = 8) -> SyntheticShape:
    """A shape of about `float32_gb` GB (1e9 bytes) of float32 weights: the widest hidden size (a multiple
    of 256, up to 8192) that still leaves room for at least `min_layers` blocks besides the embedding
    and the output head, as many blocks as come nearest the size, FFN 8/3 x hidden (rounded up to 256),
    heads of 64, 4 query heads per KV head (grouped-query attention, as Llama 3)."""
    target = float32_gb * 1e9 / 4
    best = None
    for hidden in range(_ROW_MULTIPLE * 2, 8192 + 1, _ROW_MULTIPLE):
        n_head = hidden // _HEAD_DIM
        ff = -(-8 * hidden // 3 // _ROW_MULTIPLE) * _ROW_MULTIPLE
        no_blocks = SyntheticShape(hidden, 0, ff, n_head, max(1, n_head // 4))
        n_layer = round((target - no_blocks.parameters) / no_blocks.block_parameters)
        if n_layer < min_layers:
            break
        best = replace(no_blocks, n_layer=n_layer)
    if best is None:
        raise ValueError(f"{float32_gb} GB is too small for a synthetic Llama of {min_layers} blocks")
    return best


# --------------------------------------------------------------------------------------------------
# The weights


def _std(name: str, shape: tuple[int, int], n_layer: int) -> float:
    """Of a matrix: unit-variance embedding rows, 1/sqrt(fan_in) for the linears, less for the residual writers."""
    if name == "model.embed_tokens.weight":
        return 1.0
    residual = name.endswith(("o_proj.weight", "down_proj.weight"))
    return (1.0 / math.sqrt(shape[1])) / (math.sqrt(2 * n_layer) if residual else 1.0)


def _slabs(name: str, shape: tuple[int, ...], n_layer: int, seed: int) -> Iterator[np.ndarray]:
    """The tensor's float32 values, a few MB of rows at a time, from its own generator."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows = shape[0] if len(shape) == 2 else 1
    cols = shape[-1]
    std = np.float32(_std(name, shape, n_layer)) if len(shape) == 2 else None
    step = max(1, _SLAB_VALUES // cols)
    for start in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        if len(shape) == 1:  # a norm: 1 +- 2%
            x *= np.float32(0.02)
            x += np.float32(1.0)
        else:
            x *= std
        yield x


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], type_name: str, n_layer: int,
                 seed: int) -> None:
    """One safetensors file, written tensor by tensor.

    Hand-written header (the format is 8 bytes of header length, the JSON header, then the data)
    because safetensors' own writers need every tensor of the file in memory at once."""
    from .. import formats

    itemsize = _ITEMSIZE[type_name]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
    offset = 0
    for name, shape in tensors:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": type_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(encoded)))
            fh.write(encoded)
            for name, shape in tensors:
                for slab in _slabs(name, shape, n_layer, seed):
                    fh.write(formats.quantize(slab, type_name))  # round to nearest even, as torch's .to(bfloat16)

    write_atomic(path, write)


def _shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int,
            shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into files of at most shard_bytes (a larger tensor gets a file of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def build_synthetic_llama(folder: str | Path, *, hidden: int, n_layer: int, ff: int, n_head: int, n_head_kv: int,
                          dtype: str = "bfloat16", seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
                          progress: bool = False) -> Path:
    """Write a random-weight LlamaForCausalLM Hugging Face folder into `folder` (created; files written
    under temporary names and renamed); return its path. `dtype`: bfloat16, float16 or float32."""
    from tqdm import tqdm

    from . import build_test_model

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if hidden % n_head or n_head % n_head_kv:
        raise ValueError(f"hidden {hidden} must divide into {n_head} heads, and those into {n_head_kv} KV groups")
    shape = SyntheticShape(hidden, n_layer, ff, n_head, n_head_kv)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    test_model = build_test_model()
    config = json.loads((test_model / "config.json").read_text())
    if config["vocab_size"] != shape.vocab:
        raise ValueError(f"the test model's vocabulary is {config['vocab_size']}, not {shape.vocab}")
    config.update(hidden_size=hidden, num_hidden_layers=n_layer, intermediate_size=ff, num_attention_heads=n_head,
                  num_key_value_heads=n_head_kv, head_dim=shape.head_dim, tie_word_embeddings=False, dtype=dtype)
    write_atomic(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    for name in _TOKENIZER_FILES:
        if (test_model / name).is_file():
            write_atomic(folder / name, lambda tmp, name=name: shutil.copyfile(test_model / name, tmp))

    type_name = _DTYPES[dtype]
    shards = _shards(shape.tensors(), _ITEMSIZE[type_name], shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, tensors in tqdm(list(zip(names, shards)), desc=f"synthetic llama {shape.parameters / 1e6:,.0f}M",
                              unit="shard", disable=not progress):
        _write_shard(folder / file, tensors, type_name, n_layer, seed)
    index = {"metadata": {"total_size": shape.parameters * _ITEMSIZE[type_name],
                          "total_parameters": shape.parameters},
             "weight_map": {name: file for file, tensors in zip(names, shards) for name, _ in tensors}}
    write_atomic(folder / "model.safetensors.index.json",
                 lambda tmp: tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
    return folder


def synthetic_folder_name(shape: SyntheticShape, dtype: str = "bfloat16", seed: int = 0) -> str:
    """The cache folder name of a synthetic model (cache_dir() / this)."""
    return (f"synthetic-llama-h{shape.hidden}-l{shape.n_layer}-ff{shape.ff}-a{shape.n_head}-kv{shape.n_head_kv}"
            f"-{dtype}-s{seed}")


def synthetic_model(size: float | SyntheticShape, *, dtype: str = "bfloat16", seed: int = 0,
                    shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """A synthetic Llama in the cache, built once per (shape, dtype, seed, shard size): `size` is a
    float32 size in GB (see `synthetic_shape`) or a shape."""
    shape = size if isinstance(size, SyntheticShape) else synthetic_shape(size)
    stamp = {"recipe": RECIPE, **asdict(shape), "dtype": dtype, "seed": seed, "shard_bytes": shard_bytes}
    return build_folder(synthetic_folder_name(shape, dtype, seed), stamp, _CACHED_FILES,
                        lambda tmp: build_synthetic_llama(tmp, hidden=shape.hidden, n_layer=shape.n_layer, ff=shape.ff,
                                                          n_head=shape.n_head, n_head_kv=shape.n_head_kv, dtype=dtype,
                                                          seed=seed, shard_bytes=shard_bytes, progress=progress))
