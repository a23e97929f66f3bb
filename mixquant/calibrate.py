"""The importance matrix ("imatrix"), computed and stored the way llama.cpp's llama-imatrix does.

    imatrix = compute_imatrix(hf_folder, read_text("calib.txt"), ctx=512, chunks=100)
    write_imatrix(imatrix, "imatrix.gguf")        # or "imatrix.dat": llama.cpp's legacy format
    imatrix.importance("blk.0.ffn_down.weight")   # what llama-quantize passes as quant_weights

Source of truth: llama.cpp 0c1e570, `tools/imatrix/imatrix.cpp` (`IMatrixCollector::collect_imatrix`,
`save_imatrix`, `save_imatrix_legacy`, `compute_imatrix`), `common/imatrix-loader.cpp` and
`tools/quantize/quantize.cpp` (`load_imatrix`). What llama-imatrix collects:

* for every `ggml_mul_mat` whose weight is named `blk.*` (so q/k/v/o, gate/up/down; never
  `token_embd`, and `output.weight` only with `--process-output`; a tied output layer multiplies
  by `token_embd.weight` and is never collected), per input column, the sum over activation rows
  of x^2, in float32, and the number of rows;
* over every token of every window (`mixquant.text.token_windows`): BOS included, all outputs are
  requested so the last layer sees every token too. The one exception: a physical micro-batch of
  fewer than 16 tokens is skipped (`src1->ne[1] < 16`). With the default `-b 2048 -ub 512`,
  `n_seq = 2048 // ctx` windows are decoded together as separate sequences and split into
  micro-batches of `512 // n_seq` tokens per sequence, so e.g. `-c 512 --chunks 3` loses the last
  2 tokens of each of the 3 windows (a 6-token micro-batch); `imatrix_token_mask` reproduces this.
* `imatrix.chunk_count` is `max(count) // chunk_size`, `imatrix.chunk_size` is the context size.

llama-quantize's quant_weights for a tensor: GGUF format `in_sum2 / counts` in float32 (all ones
where a count is 0); legacy format the stored values divided by ncall (`Imatrix.importance`).
"""

from __future__ import annotations

import math
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MixquantError
from .text import read_bytes

__all__ = [
    "Imatrix",
    "compute_imatrix",
    "imatrix_token_mask",
    "read_imatrix",
    "write_imatrix",
    "LEGACY_CHUNK_SIZE",
]

# llama-imatrix turns a legacy file's (mean * ncall) values back into sums with its own chunk size,
# n_ctx / n_parallel: 512 with the default -c 512 -b 2048. We do the same when reading a .dat.
LEGACY_CHUNK_SIZE = 512

# ggml refuses to collect from micro-batches smaller than this (imatrix.cpp: "src1->ne[1] < 16").
_MIN_UBATCH_TOKENS = 16


@dataclass
class Imatrix:
    """Per-tensor sums of squared activations, keyed by GGUF weight name.

    sums: name -> float32 vector, one entry per input column (a weight's `ne[0]`), the sum over all
        collected activation rows of x^2 (what a GGUF imatrix stores as `<name>.in_sum2`).
    counts: name -> number of activation rows (tokens) accumulated (`<name>.counts`).
    chunks: `imatrix.chunk_count`; chunk_size: `imatrix.chunk_size` (the context size);
    datasets: `imatrix.datasets` (the calibration file names).
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    chunks: int
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = LEGACY_CHUNK_SIZE

    def __post_init__(self) -> None:
        missing = set(self.sums) ^ set(self.counts)
        if missing:
            raise ValueError(f"imatrix sums and counts name different tensors, e.g. {sorted(missing)[0]}")
        self.sums = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in self.sums.items()}
        self.counts = {k: int(v) for k, v in self.counts.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self, name: str) -> np.ndarray | None:
        """The float32 vector llama-quantize passes as quant_weights for tensor `name`, or None if
        the imatrix has no entry for it: `in_sum2 / (float) count` in float32, all ones when the
        count is 0 (quantize.cpp load_imatrix)."""
        sums = self.sums.get(name)
        if sums is None:
            return None
        count = np.float32(self.counts[name])
        if count > 0:
            return sums / count  # float32 / float32: correctly rounded, as in C
        return np.ones_like(sums)

    def as_dict(self) -> dict[str, np.ndarray]:
        """{name: importance(name)} for every entry, e.g. for `export.write_gguf(importance=...)`."""
        return {name: self.importance(name) for name in self.names}

    def __repr__(self) -> str:
        return (f"<Imatrix {len(self.sums)} tensors, {self.chunks} chunks of {self.chunk_size}, "
                f"datasets={self.datasets}>")


# --------------------------------------------------------------------------------------------
# which tokens llama-imatrix collects


def imatrix_token_mask(n_chunk: int, ctx: int, n_batch: int = 2048, n_ubatch: int = 512) -> np.ndarray:
    """(n_chunk, ctx) booleans: which tokens of each window llama-imatrix accumulates with
    `-c ctx -b n_batch -ub n_ubatch` (its defaults: 2048 and 512).

    main(): n_seq = max(1, n_batch / ctx) windows are decoded per llama_decode call as separate
    sequences, n_batch becomes min(n_batch, n_seq * ctx), and a window longer than n_batch takes
    ceil(ctx / n_batch) calls. llama_context caps n_ubatch at n_batch. The KV cache has one stream
    per sequence (not unified), so a call holding several sequences is cut by `split_equal`: each
    micro-batch takes the same number of tokens, max(1, n_ubatch // n_seqs), from every sequence;
    with one sequence `split_simple` cuts consecutive n_ubatch-token slices. Micro-batches with
    fewer than 16 tokens are not collected.
    """
    mask = np.ones((n_chunk, ctx), dtype=bool)
    n_seq = max(1, n_batch // ctx)
    n_batch = min(n_batch, n_seq * ctx)
    n_ubatch = min(n_ubatch, n_batch)
    for first in range(0, n_chunk, n_seq):
        n_seqs = min(n_seq, n_chunk - first)
        rows = slice(first, first + n_seqs)
        for start in range(0, ctx, n_batch):
            end = min(ctx, start + n_batch)
            if n_seq == 1:
                step = n_ubatch  # split_simple: consecutive slices of one sequence
            else:
                step = max(1, n_ubatch // n_seqs)  # split_equal: `step` tokens from each sequence
            for pos in range(start, end, step):
                take = min(step, end - pos)
                if take * n_seqs < _MIN_UBATCH_TOKENS:
                    mask[rows, pos:pos + take] = False
    return mask


# --------------------------------------------------------------------------------------------
# computing it with transformers


def _gguf_names(model, arch: str, n_layer: int) -> dict[str, str]:
    """nn.Linear module name -> GGUF weight name, the mapping convert_hf_to_gguf.py applies."""
    import gguf
    import torch

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise MixquantError(f"unsupported architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(by_name[arch], n_layer)
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hf_name = module_name.replace("language_model.", "") + ".weight"
        gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            out[module_name] = gguf_name
    return out


_F16_KV = "mixquant_sdpa_f16_kv"


def _f16_kv_attention() -> str:
    """Register (once) an attention implementation: PyTorch SDPA on float16-rounded keys and values,
    the values llama.cpp keeps in its F16 KV cache; returns its name for `attn_implementation`."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def attention(module, query, key, value, *args, **kwargs):
        key = key.to(torch.float16).to(query.dtype)
        value = value.to(torch.float16).to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    if _F16_KV not in AttentionInterface._global_mapping:
        AttentionInterface.register(_F16_KV, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_F16_KV, sdpa_mask)  # the same (causal) masks as "sdpa"
    return _F16_KV


def compute_imatrix(hf_folder: str | Path, text: str, ctx: int = 512, chunks: int | None = None,
                    progress: bool = True, *, dataset: str | None = None, process_output: bool = False,
                    add_bos: bool | None = None, kv_f16: bool = True, n_batch: int = 2048,
                    n_ubatch: int = 512) -> Imatrix:
    """The imatrix llama-imatrix computes with `-f <text> -c ctx --chunks chunks`, from the Hugging
    Face model in float32 (transformers), one window at a time.

    text: the calibration text itself (`mixquant.text.read_text(path)` reads a file as `-f` does).
    dataset: recorded in `imatrix.datasets` (llama-imatrix records the `-f` file name).
    process_output: also collect `output.weight` (`--process-output`); a tied output layer is
        never collected, as in llama.cpp.
    add_bos: override the tokenizer's BOS behaviour (see `mixquant.text.token_windows`).
    kv_f16: round keys (after RoPE) and values to float16 before attention, as llama.cpp's default
        F16 KV cache (`-ctk f16 -ctv f16`) does; this brings the result about 3x closer to
        llama-imatrix's (SmolLM2-135M, 4 x 512 tokens: median relative difference per column
        1.2e-5 instead of 3.2e-5, max 1.6e-3 instead of 1.9e-3).
    n_batch, n_ubatch: llama-imatrix's `-b`/`-ub`; they only decide which few tokens fall in
        micro-batches too small to be collected (`imatrix_token_mask`).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .source import open_source
    from .text import token_windows

    hf_folder = Path(hf_folder)
    source = open_source(hf_folder)
    if source.kind != "hf":
        raise MixquantError(f"{hf_folder}: compute_imatrix needs a Hugging Face model folder")
    info = source.model
    source.close()

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
        raise MixquantError(f"{hf_folder}: cannot load the tokenizer: {exc}") from None
    try:
        windows = token_windows(tokenizer, text, ctx, chunks, add_bos=add_bos)
    except MixquantError as exc:
        raise MixquantError(f"{dataset}: {exc}" if dataset else str(exc)) from None
    n_chunk = windows.shape[0]
    mask = imatrix_token_mask(n_chunk, ctx, n_batch, n_ubatch)

    try:
        extra = {"attn_implementation": _f16_kv_attention()} if kv_f16 else {}
        model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, local_files_only=True, **extra)
    except Exception as exc:  # noqa: BLE001
        raise MixquantError(f"{hf_folder}: transformers cannot load the model: {exc}") from None
    model.eval()
    names = _gguf_names(model, info.arch, info.n_layer)
    collect = {m: n for m, n in names.items() if n.startswith("blk.")}
    want_output = process_output and not info.tied_output
    modules = dict(model.named_modules())

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state = {"rows": None}  # the token mask of the window being run, as a torch bool tensor

    def make_hook(gguf_name: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            rows = state["rows"]
            if rows is not None:
                x = x[rows]
            # x*x rounded to float32 as llama.cpp does, summed in float64 (llama.cpp sums in float32;
            # the difference, ~1e-6 relative over 2048 rows, is far below the activations' own)
            x2 = torch.sum(x * x, dim=0, dtype=torch.float64)
            if gguf_name in sums:
                sums[gguf_name] += x2
            else:
                sums[gguf_name] = x2
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
        return hook

    hooks = [modules[m].register_forward_pre_hook(make_hook(n)) for m, n in collect.items()]
    if want_output:
        head = [m for m, n in names.items() if n == "output.weight"]
        hooks += [modules[m].register_forward_pre_hook(make_hook("output.weight")) for m in head]
    # Without the output layer the logits are not needed: run the decoder stack only.
    runner = model if want_output else model.get_decoder()

    start = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(range(n_chunk), desc="imatrix", unit="chunk", disable=not progress)
            for i in bar:
                row_mask = torch.from_numpy(mask[i])
                state["rows"] = None if bool(row_mask.all()) else row_mask
                runner(input_ids=windows[i : i + 1], use_cache=False)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{(i + 1) * ctx / elapsed:.0f} tokens/s")
    finally:
        for h in hooks:
            h.remove()
    elapsed = time.perf_counter() - start
    if progress:
        print(f"imatrix: {n_chunk} chunks x {ctx} tokens, {len(sums)} tensors, {elapsed:.1f} s "
              f"({n_chunk * ctx / max(elapsed, 1e-9):.0f} tokens/s)", file=sys.stderr)
    if n_chunk and not sums:
        raise MixquantError(f"{hf_folder}: no linear layer of the model maps to a GGUF blk.* weight")

    out_sums = {}
    for name, s in sums.items():
        v = s.numpy().astype(np.float32)
        if not np.isfinite(v).all():
            raise MixquantError(f"{hf_folder}: non-finite activations entering {name}")
        out_sums[name] = v
    max_count = max(counts.values(), default=0)
    return Imatrix(sums=out_sums, counts=counts, chunks=max_count // ctx,
                   datasets=[dataset] if dataset else [], chunk_size=ctx)


# --------------------------------------------------------------------------------------------
# files


_GGUF_MAGIC = b"GGUF"
_GGUF_VERSION = 3
_GGUF_ALIGNMENT = 32
_GGML_TYPE_F32 = 0
# GGUF value types: id -> struct format for the scalar ones
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR = {_UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i", _FLOAT32: "f",
           _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d"}


def write_imatrix(imatrix: Imatrix, path: str | Path) -> Path:
    """Write `imatrix` as llama-imatrix would: legacy binary when the name ends in `.dat`, else GGUF.

    The file is written under a temporary name and renamed into place.
    """
    path = Path(path)
    data = _legacy_bytes(imatrix) if path.suffix.lower() == ".dat" else _gguf_bytes(imatrix)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MixquantError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path


def _gguf_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int) -> int:
    return (n + _GGUF_ALIGNMENT - 1) // _GGUF_ALIGNMENT * _GGUF_ALIGNMENT


def _gguf_bytes(imatrix: Imatrix) -> bytes:
    """IMatrixCollector::save_imatrix, byte for byte: keys general.type, imatrix.datasets,
    imatrix.chunk_count, imatrix.chunk_size; for each name in sorted order the F32 tensors
    `<name>.in_sum2` (ne = [n_cols, 1]) and `<name>.counts` (ne = [1, 1])."""
    kv = [
        _gguf_string("general.type") + struct.pack("<I", _STRING) + _gguf_string("imatrix"),
        _gguf_string("imatrix.datasets") + struct.pack("<IIQ", _ARRAY, _STRING, len(imatrix.datasets))
        + b"".join(_gguf_string(d) for d in imatrix.datasets),
        _gguf_string("imatrix.chunk_count") + struct.pack("<II", _UINT32, imatrix.chunks),
        _gguf_string("imatrix.chunk_size") + struct.pack("<II", _UINT32, imatrix.chunk_size),
    ]
    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(imatrix.sums):
        sums = imatrix.sums[name]
        if sums.size == 0:
            continue
        tensors.append((f"{name}.in_sum2", sums))
        tensors.append((f"{name}.counts", np.array([imatrix.counts[name]], dtype=np.float32)))
    infos, blobs, offset = [], [], 0
    for tname, arr in tensors:
        # ggml_n_dims: trailing dimensions of 1 are not written, so both are 1-D here
        infos.append(_gguf_string(tname) + struct.pack("<IqIQ", 1, arr.size, _GGML_TYPE_F32, offset))
        blob = arr.astype("<f4").tobytes()
        blob += bytes(_pad(len(blob)) - len(blob))
        blobs.append(blob)
        offset += len(blob)
    head = _GGUF_MAGIC + struct.pack("<IqQ", _GGUF_VERSION, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    head += bytes(_pad(len(head)) - len(head))
    return head + b"".join(blobs)


def _legacy_bytes(imatrix: Imatrix) -> bytes:
    """IMatrixCollector::save_imatrix_legacy: entries with a zero count are skipped; each stores
    ncall = ceil(count / chunk_size) and the values (sum / count) * ncall in float32; then the
    chunk count and the (last) dataset name."""
    chunk_size = imatrix.chunk_size if imatrix.chunk_size > 0 else LEGACY_CHUNK_SIZE
    names = [n for n in sorted(imatrix.sums) if imatrix.counts[n] > 0]
    out = [struct.pack("<i", len(names))]
    for name in names:
        raw = name.encode("utf-8")
        count = imatrix.counts[name]
        ncall = (count + chunk_size - 1) // chunk_size
        values = (imatrix.sums[name] / np.float32(count)) * np.float32(ncall)
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
        out.append(values.astype("<f4").tobytes())
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode("utf-8")
    out.append(struct.pack("<ii", imatrix.chunks, len(dataset)) + dataset)
    return b"".join(out)


class _Bad(Exception):
    """A parse failure; read_imatrix turns it into a one-line MixquantError naming the file."""


class _Cursor:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Bad(f"truncated file (reading {what} at byte {self.pos}, file has {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not UTF-8") from None

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix (magic "GGUF") or a legacy .dat one, as llama.cpp's loader does.

    Legacy entries are turned into sums/counts the way `llama-imatrix --in-file x.dat` does, with a
    chunk size of 512 (exact: importance() then gives what llama-quantize computes from the .dat).
    Raises a one-line MixquantError for a missing, truncated, non-imatrix or non-finite file.
    """
    path = Path(path)
    data = read_bytes(path)
    try:
        if data[:4] == _GGUF_MAGIC:
            imatrix = _parse_gguf(data)
        else:
            imatrix = _parse_legacy(data)
        _validate(imatrix)
    except _Bad as exc:
        raise MixquantError(f"{path}: {exc}") from None
    return imatrix


def _read_value(cur: _Cursor, vtype: int, what: str):
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype], what)
    if vtype == _STRING:
        return cur.string(what)
    if vtype == _ARRAY:
        sub, n = cur.unpack("IQ", what)
        if sub == _ARRAY:
            raise _Bad(f"nested array in {what}")
        if n > cur.left:
            raise _Bad(f"truncated file (array {what} claims {n} items)")
        return [_read_value(cur, sub, what) for _ in range(n)]
    raise _Bad(f"not a GGUF imatrix: unknown value type {vtype} for {what}")


def _parse_gguf(data: bytes) -> Imatrix:
    cur = _Cursor(data)
    cur.take(4, "magic")
    version, n_tensors, n_kv = cur.unpack("Iqq", "GGUF header")
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version}")
    if n_tensors < 0 or n_kv < 0 or n_tensors > len(data) or n_kv > len(data):
        raise _Bad("corrupt GGUF header")
    kv = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        kv[key] = _read_value(cur, cur.unpack("I", key), key)
    alignment = kv.get("general.alignment", _GGUF_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Bad(f"bad general.alignment {alignment!r}")
    infos = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.unpack("I", name)
        if n_dims > 4:
            raise _Bad(f"tensor {name} has {n_dims} dimensions")
        ne = [cur.unpack("q", name) for _ in range(n_dims)]
        ttype, offset = cur.unpack("IQ", name)
        infos.append((name, ne, ttype, offset))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, ne, ttype, offset in infos:
        if ttype != _GGML_TYPE_F32:
            if name.endswith((".in_sum2", ".counts")):
                raise _Bad(f"tensor {name} must be F32 (ggml type {ttype})")
            continue
        n = math.prod(ne)
        begin = data_start + offset
        if n < 0 or begin + 4 * n > len(data):
            raise _Bad(f"truncated file (tensor {name} ends past the end of the file)")
        tensors[name] = np.frombuffer(data, dtype="<f4", count=n, offset=begin).astype(np.float32)

    sums, counts = {}, {}
    for tname, arr in tensors.items():
        if tname.endswith(".in_sum2"):
            name = tname[: -len(".in_sum2")]
            if f"{name}.counts" not in tensors:
                raise _Bad(f"tensor {tname} has no matching {name}.counts")
            cnt = tensors[f"{name}.counts"]
            if cnt.size == 0 or arr.size % cnt.size:
                raise _Bad(f"{name}: {arr.size} sums do not split into {cnt.size} counts")
            if not np.isfinite(cnt).all():
                raise _Bad(f"NaN/Inf count in {name}.counts")
            # common_imatrix_load: std::lround of each float count
            rounded = {int(math.floor(abs(float(c)) + 0.5)) * (1 if c >= 0 else -1) for c in cnt}
            if len(rounded) > 1:
                raise _Bad(f"{name}: per-expert counts differ ({cnt.size} experts); MoE imatrices are not supported")
            sums[name] = arr
            counts[name] = rounded.pop()
        elif tname.endswith(".counts") and f"{tname[: -len('.counts')]}.in_sum2" not in tensors:
            raise _Bad(f"tensor {tname} has no matching in_sum2")
    if not sums:
        raise _Bad("not an imatrix (a GGUF file without <name>.in_sum2 / <name>.counts tensors)")
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in kv]
    if missing:
        raise _Bad(f"missing imatrix metadata {', '.join(missing)} (llama-quantize refuses such a file)")
    datasets = kv["imatrix.datasets"]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise _Bad("imatrix.datasets is not an array of strings")
    return Imatrix(sums=sums, counts=counts, chunks=int(kv["imatrix.chunk_count"]), datasets=list(datasets),
                   chunk_size=int(kv["imatrix.chunk_size"]))


def _parse_legacy(data: bytes) -> Imatrix:
    cur = _Cursor(data)
    try:
        n_entries = cur.unpack("i", "entry count")
    except _Bad:
        raise _Bad("not an imatrix file (too short for GGUF or legacy .dat)") from None
    if n_entries < 1 or n_entries * 12 > len(data):
        raise _Bad(f"not an imatrix file (neither GGUF nor legacy .dat: entry count {n_entries})")
    sums, counts = {}, {}
    for i in range(n_entries):
        length = cur.unpack("i", f"name length of entry {i + 1}")
        if length < 0 or length > cur.left:
            raise _Bad(f"not an imatrix file or truncated (entry {i + 1} name length {length})")
        try:
            name = cur.take(length, f"name of entry {i + 1}").decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"not an imatrix file (entry {i + 1} name is not UTF-8)") from None
        ncall, nval = cur.unpack("ii", f"entry {name}")
        if nval < 1 or 4 * nval > cur.left:
            raise _Bad(f"not an imatrix file or truncated (entry {name}: {nval} values, {cur.left} bytes left)")
        values = np.frombuffer(cur.take(4 * nval, f"values of {name}"), dtype="<f4").astype(np.float32)
        if name in sums:
            raise _Bad(f"entry {name} appears twice")
        # llama-quantize uses values / ncall (the values themselves when ncall is 0); llama-imatrix
        # reads them back as sums = values * chunk_size, counts = ncall * chunk_size. Scaling by a
        # power of two is exact, so importance() is unchanged.
        ncall = max(ncall, 1) if ncall >= 0 else ncall
        sums[name] = values * np.float32(LEGACY_CHUNK_SIZE)
        counts[name] = ncall * LEGACY_CHUNK_SIZE
    chunks, datasets = 0, []
    if cur.left:
        chunks = cur.unpack("i", "chunk count")
        length = cur.unpack("i", "dataset name length")
        if length > 0:
            try:
                datasets.append(cur.take(length, "dataset name").decode("utf-8"))
            except UnicodeDecodeError:
                raise _Bad("dataset name is not UTF-8") from None
        if cur.left:
            raise _Bad(f"not an imatrix file ({cur.left} unexpected bytes after the data)")
    return Imatrix(sums=sums, counts=counts, chunks=chunks, datasets=datasets, chunk_size=LEGACY_CHUNK_SIZE)


def _validate(imatrix: Imatrix) -> None:
    for name in imatrix.names:
        sums = imatrix.sums[name]
        if not np.isfinite(sums).all():
            raise _Bad(f"NaN/Inf values in the entry for {name}")
        if (sums < 0).any():
            raise _Bad(f"negative sums of squares in the entry for {name}")
        if imatrix.counts[name] < 0:
            raise _Bad(f"negative count in the entry for {name}")
