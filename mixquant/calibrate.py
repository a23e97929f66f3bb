"""Calibration: one forward pass over the calibration windows gives the importance matrix
("imatrix"), computed and stored the way llama.cpp's llama-imatrix does, and activation statistics.

    cal = calibrate(hf_folder, read_text("calib.txt"), ctx=512, chunks=100)
    write_imatrix(cal.imatrix, "imatrix.gguf")    # or "imatrix.dat": llama.cpp's legacy format
    cal.imatrix.importance("blk.0.ffn_down.weight")   # what llama-quantize passes as quant_weights
    cal.activations.save("activations.json")      # ActivationStats, schema "mixquant.activations/1"
    cal.activations.stats[input_of("blk.0.ffn_down.weight")].dynamic_range

`compute_imatrix(...)` is the same pass without the statistics, returning only the imatrix.

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
* for a mixture-of-experts layer's stacked experts (`ffn_{gate,up,down}_exps`, ggml_mul_mat_id),
  per expert, the sum of x^2 over the tokens routed to it and their number (`Imatrix.expert_counts`;
  in_sum2 [n_cols, n_expert], counts [1, n_expert]); gate and up see the layer's input, down each
  expert's own act(gate) * up. These are collected over every token: the 16-token minimum does not
  apply to them. The router (`ffn_gate_inp`) is a plain product.
* `imatrix.chunk_count` is `max(count) // chunk_size`, `imatrix.chunk_size` is the context size.

llama-quantize's quant_weights for a tensor: GGUF format `in_sum2 / counts` in float32 (all ones
where a count is 0), per expert for a stack of experts (each expert's rows quantized with its own
slice); legacy format the stored values divided by ncall (`Imatrix.importance`).

One departure, off by default: `calibrate(..., output_importance=True)` also collects the output
layer's input (the final normed hidden state) when the output is tied, and stores it under
`token_embd.weight`, the tensor that layer multiplies by (untied: under `output.weight`, as
`--process-output`). llama-imatrix never collects a tied output, so llama-quantize quantizes that
tensor blind; llama-quantize looks entries up by tensor name, so with this entry it and mixquant
both use it. The file is then no longer what llama-imatrix would write from the same text.

Activation statistics (`ActivationStats`, keys from `input_of`): per distinct linear input of each
block (q/k/v share `blk.N.attn_in`; then `attn_output_in`, `ffn_in` for gate/up, `ffn_down_in`),
the residual stream leaving each block (`blk.N.residual`) and the output layer's input
(`output_in`), over every token of every window (the imatrix's token mask does not apply); in a
mixture-of-experts layer `ffn_down_in` has one row per routed (token, expert) pair. Each is
summarised by a `Distribution`, the same summary `weight_distribution` gives for a weight tensor.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .arch import BLOCK_INPUTS, for_gguf_arch
from .errors import MixquantError
from .hessians import DEFAULT_BUDGET_BYTES, Hessians, check_budget, hessian_bytes, model_shape
from .text import read_bytes, read_json, write_json

if TYPE_CHECKING:
    from .arch import Adapter

__all__ = [
    "ACTIVATIONS_SCHEMA",
    "ActivationStat",
    "ActivationStats",
    "Calibration",
    "Distribution",
    "Imatrix",
    "OutlierChannel",
    "StreamingStats",
    "calibrate",
    "compute_imatrix",
    "imatrix_token_mask",
    "input_of",
    "read_imatrix",
    "weight_distribution",
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
        collected activation rows of x^2 (what a GGUF imatrix stores as `<name>.in_sum2`); for a
        stack of matrices (a mixture-of-experts' `ffn_*_exps`), one such vector per matrix, expert
        after expert (n_expert * n_cols values).
    counts: name -> number of activation rows (tokens) accumulated (`<name>.counts`); for an entry
        with `expert_counts`, their maximum.
    expert_counts: name -> int64 vector, one count per matrix of a stack (llama-imatrix's MUL_MAT_ID
        entries: the tokens routed to each expert), stored as `<name>.counts` of shape [1, n_expert];
        entries without one have a single count.
    chunks: `imatrix.chunk_count`; chunk_size: `imatrix.chunk_size` (the context size);
    datasets: `imatrix.datasets` (the calibration file names).
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    chunks: int
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = LEGACY_CHUNK_SIZE
    expert_counts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(self.sums) ^ set(self.counts)
        if missing:
            raise ValueError(f"imatrix sums and counts name different tensors, e.g. {sorted(missing)[0]}")
        self.sums = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in self.sums.items()}
        self.counts = {k: int(v) for k, v in self.counts.items()}
        self.expert_counts = {k: np.asarray(v, dtype=np.int64).reshape(-1) for k, v in self.expert_counts.items()}
        for name, per_expert in self.expert_counts.items():
            if name not in self.sums or per_expert.size == 0 or self.sums[name].size % per_expert.size:
                raise ValueError(f"imatrix entry {name}: {self.sums.get(name, np.empty(0)).size} sums do not "
                                 f"split into {per_expert.size} experts")
            self.counts[name] = int(per_expert.max())

    def matrix_counts(self, name: str) -> np.ndarray:
        """The count of each matrix of entry `name`: its per-expert counts, or its one count."""
        per_expert = self.expert_counts.get(name)
        return per_expert if per_expert is not None else np.array([self.counts[name]], dtype=np.int64)

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self, name: str) -> np.ndarray | None:
        """The float32 vector llama-quantize passes as quant_weights for tensor `name`, or None if
        the imatrix has no entry for it: `in_sum2 / (float) count` in float32, all ones when the
        count is 0 (quantize.cpp load_imatrix); per expert for a stack of experts, whose vector
        then holds one slice of n_cols values per expert (the slice llama-quantize uses for the
        rows of that expert)."""
        sums = self.sums.get(name)
        if sums is None:
            return None
        counts = self.matrix_counts(name).astype(np.float32)
        per_matrix = sums.reshape(counts.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = per_matrix / counts[:, None]  # float32 / float32: correctly rounded, as in C
        out[counts == 0] = 1
        return out.reshape(-1)

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
# distributions of weights and activations

ACTIVATIONS_SCHEMA = "mixquant.activations/1"
OUTLIER_SIGMAS = 6.0  # an outlier: |x - mean| > 6 std
HIST_SIGMAS = 8.0  # the histogram spans mean +- 8 std ...
HIST_BINS = 64  # ... in 64 bins (0.25 std wide), plus an underflow and an overflow bin
TOP_CHANNELS = 8
_BLOCK = 1 << 17  # values per vectorised step: temporaries stay small and cache-sized ...
_BLOCK_ROWS = 256  # ... and float32 partial sums run over few rows (float64 from there on)


def input_of(tensor_name: str, tied_output: bool = False, adapter: Adapter | None = None) -> str | None:
    """The `ActivationStats` key of the activation GGUF weight `tensor_name` multiplies:
    "blk.3.attn_in" for blk.3.attn_q/k/v.weight, "blk.3.attn_output_in", "blk.3.ffn_in" (gate, up),
    "blk.3.ffn_down_in"; "output_in" for output.weight and, when the output is tied, for
    token_embd.weight. None for tensors that multiply no activation (norms, an untied token_embd).
    Which weights share an input is the architecture's (`Adapter.input_groups`; default llama's)."""
    return (adapter or for_gguf_arch("llama")).input_of(tensor_name, tied_output)


def _key_order(key: str) -> tuple[int, int]:
    """Blocks in order, each as arch.BLOCK_INPUTS; output_in last."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", key)
    return (int(m.group(1)), BLOCK_INPUTS.index(m.group(2))) if m else (sys.maxsize, 0)


@dataclass
class Distribution:
    """A summary of many values: a weight tensor, or one activation input over all tokens.

    count: number of values; absmax: max |x|; mean; std (population); kurtosis: Pearson's (3 for a
    Gaussian; 0 where undefined, std = 0); outlier_fraction: fraction of values with
    |x - mean| > 6 std. Histogram: hist_counts[0] counts values below hist_edges[0], hist_counts[-1]
    those at or above hist_edges[-1], hist_counts[i] those in [hist_edges[i-1], hist_edges[i]);
    the 64 bins span mean +- 8 std.

    Of a stream (`StreamingStats`, activations), count, absmax and the moments cover the whole
    stream, but the mean and std in the outlier test and the histogram edges are the first chunk's
    (the final ones are known only at the end); values past the edges land in the under/overflow
    bins.
    """

    count: int
    absmax: float
    mean: float
    std: float
    kurtosis: float
    outlier_fraction: float
    hist_edges: list[float]
    hist_counts: list[int]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Distribution:
        out = cls(count=int(d["count"]), absmax=float(d["absmax"]), mean=float(d["mean"]), std=float(d["std"]),
                  kurtosis=float(d["kurtosis"]), outlier_fraction=float(d["outlier_fraction"]),
                  hist_edges=[float(e) for e in d["hist_edges"]], hist_counts=[int(c) for c in d["hist_counts"]])
        if len(out.hist_counts) != len(out.hist_edges) + 1:
            raise ValueError(f"{len(out.hist_counts)} histogram counts for {len(out.hist_edges)} edges")
        return out


@dataclass
class OutlierChannel:
    """A channel of an activation input: its max |x| and its fire rate, the fraction of tokens
    where it is an outlier of the whole input (the `Distribution` outlier test)."""

    channel: int
    absmax: float
    fire_rate: float


@dataclass
class ActivationStat:
    """One activation input (rows: tokens, columns: channels) over the calibration tokens.

    dist: the `Distribution` of all its values; dynamic_range: the largest per-channel max |x|
    over the median one (how far one channel outgrows a typical one, e.g. in an 8-bit block of
    activations that shares one scale); top_channels: the TOP_CHANNELS channels with the largest
    max |x|, largest first.
    """

    dist: Distribution
    n_tokens: int
    n_channels: int
    dynamic_range: float
    top_channels: list[OutlierChannel]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActivationStat:
        return cls(dist=Distribution.from_dict(d["dist"]), n_tokens=int(d["n_tokens"]),
                   n_channels=int(d["n_channels"]), dynamic_range=float(d["dynamic_range"]),
                   top_channels=[OutlierChannel(channel=int(c["channel"]), absmax=float(c["absmax"]),
                                                fire_rate=float(c["fire_rate"])) for c in d["top_channels"]])


class StreamingStats:
    """Accumulates chunks of (rows, channels) values into a `Distribution` and, per channel, the
    max |x| and the number of outlier rows; `activation_stat()` sums it up per input.

    The moments come from per-channel sums of d, d^2, d^3, d^4 with d = x - the first chunk's
    mean (the shift keeps the central moments free of cancellation), float32 within a block of at
    most 256 rows and float64 from there on, so they do not drift however long the stream (about
    1e-7 relative). The outlier threshold (6 std) and the histogram edges (mean +- 8 std) are fixed
    from the first chunk's mean and std: the final ones are unknown until the end. Bins are found
    in float32, so a value within ~1e-6 of a bin width of an edge may land in the next bin.

    Cost: about a dozen vectorised passes over each chunk (~3 ns a value); on SmolLM2-135M with
    1 thread the statistics add ~15% to the forward pass.
    """

    def __init__(self, what: str = "values") -> None:
        self.what = what  # names the data in errors
        self.rows = 0
        self.sums = np.zeros((4, 0))  # per channel: sums of d, d^2, d^3, d^4
        self.hist = np.zeros(HIST_BINS + 2, dtype=np.int64)
        self.absmax = np.zeros(0)  # per channel
        self.fires = np.zeros(0, dtype=np.int64)  # per channel: rows where it is an outlier
        self.center = self.limit2 = self.lo = self.scale = 0.0

    @staticmethod
    def _blocks(x: np.ndarray):
        step = max(1, min(_BLOCK // x.shape[1], _BLOCK_ROWS))
        return (x[i : i + step] for i in range(0, x.shape[0], step))

    def _start(self, x: np.ndarray) -> None:
        center = float(np.float32(x.mean(dtype=np.float64)))  # d is taken in float32 from this one
        std = math.sqrt(sum(float(np.square(np.subtract(b, center, dtype=np.float64)).sum())
                            for b in self._blocks(x)) / x.size)
        self.start(center, std, x.shape[1])

    def start(self, center: float, std: float, channels: int) -> None:
        """Fix the center (of d = x - center), the outlier limit and the histogram from a known mean
        and std, before the first `add` (otherwise the first chunk's are used)."""
        half = HIST_SIGMAS * std or 1.0  # constant values: any width will do
        self.center, self.limit2 = center, (OUTLIER_SIGMAS * std) ** 2
        self.lo, self.scale = center - half, HIST_BINS / (2 * half)
        self.sums = np.zeros((4, channels))
        self.absmax = np.zeros(channels)
        self.fires = np.zeros(channels, dtype=np.int64)

    def add(self, x: np.ndarray) -> None:
        """Add a (rows, channels) chunk: rows are tokens (for a weight, its rows)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.size == 0 or (self.absmax.size and x.shape[1] != self.absmax.size):
            raise ValueError(f"{self.what}: expected a non-empty (rows, {self.absmax.size or 'channels'}) chunk, "
                             f"got shape {x.shape}")
        if not self.absmax.size:
            self._start(x)
        import torch  # its bincount is 2-3x faster than numpy's

        for b in self._blocks(x):
            # float32 elementwise: fresh float64 temporaries cost more in page faults than the arithmetic
            d = b - np.float32(self.center)
            d2 = d * d
            s = np.stack((d.sum(axis=0), d2.sum(axis=0), np.einsum("ij,ij->j", d2, d), np.einsum("ij,ij->j", d2, d2)))
            if not np.isfinite(s[3]).all():  # NaN or Inf anywhere shows here
                raise MixquantError(f"{self.what}: non-finite values")
            self.sums += s
            self.fires += (d2 > np.float32(self.limit2)).sum(axis=0, dtype=np.int32)
            np.maximum(self.absmax, np.abs(b, out=d2).max(axis=0), out=self.absmax)
            # histogram bin + 1 (bin 0 is the underflow): (x - lo) * scale + 1 = d * scale + bins/2 + 1;
            # out-of-range values are clipped into the under/overflow bins, so truncation is floor
            d *= np.float32(self.scale)
            d += np.float32(HIST_BINS / 2 + 1)
            np.clip(d, 0, HIST_BINS + 1, out=d)
            self.hist += torch.bincount(torch.from_numpy(d.astype(np.uint8).ravel()), minlength=HIST_BINS + 2).numpy()
        self.rows += x.shape[0]

    def distribution(self) -> Distribution:
        if not self.rows:
            raise ValueError(f"{self.what}: no values")
        n = self.rows * self.absmax.size
        m1, m2, m3, m4 = (float(s) / n for s in self.sums.sum(axis=1))  # raw moments of d
        var = max(m2 - m1 * m1, 0.0)
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        edges = self.lo + np.arange(HIST_BINS + 1) / self.scale
        return Distribution(count=n, absmax=float(self.absmax.max()), mean=self.center + m1, std=math.sqrt(var),
                            kurtosis=c4 / (var * var) if var > 0 else 0.0,
                            outlier_fraction=int(self.fires.sum()) / n, hist_edges=edges.tolist(),
                            hist_counts=self.hist.tolist())

    def activation_stat(self, top: int = TOP_CHANNELS) -> ActivationStat:
        # a median of 0 (most channels dead) counts as the smallest normal float32, keeping it finite
        median = max(float(np.median(self.absmax)), float(np.finfo(np.float32).tiny))
        order = np.argsort(-self.absmax, kind="stable")[:top]
        return ActivationStat(dist=self.distribution(), n_tokens=self.rows, n_channels=self.absmax.size,
                              dynamic_range=float(self.absmax.max()) / median,
                              top_channels=[OutlierChannel(channel=int(c), absmax=float(self.absmax[c]),
                                                           fire_rate=int(self.fires[c]) / self.rows) for c in order])


def weight_distribution(w: np.ndarray) -> Distribution:
    """The `Distribution` of all values of a weight tensor (any shape). Exact: the tensor is one
    chunk, so the outlier test and the histogram use its own mean and std."""
    stats = StreamingStats("weights")
    stats.add(np.asarray(w, dtype=np.float32).reshape(-1, np.shape(w)[-1] if np.ndim(w) else 1))  # rows
    return stats.distribution()


def weight_distribution_rows(rows: Callable[[int, int], np.ndarray], n_rows: int, step: int) -> Distribution:
    """`weight_distribution` of a 2-D tensor read `step` rows at a time (`rows(start, stop)`), so
    that no copy of a large one is held: a first pass finds its mean and std, a second adds the
    slices. The same as the whole tensor's up to the float64 rounding of those two sums."""
    total = squares = 0.0
    count = cols = 0
    for r in range(0, n_rows, step):
        x = rows(r, min(r + step, n_rows))
        total += float(x.sum(dtype=np.float64))
        count, cols = count + x.size, x.shape[1]
    center = float(np.float32(total / count))
    for r in range(0, n_rows, step):
        squares += float(np.square(np.subtract(rows(r, min(r + step, n_rows)), center, dtype=np.float64)).sum())
    stats = StreamingStats("weights")
    stats.start(center, math.sqrt(squares / count), cols)
    for r in range(0, n_rows, step):
        stats.add(rows(r, min(r + step, n_rows)))
    return stats.distribution()


@dataclass
class ActivationStats:
    """Activation statistics of a calibration pass over `chunks` windows of `ctx` tokens (`tokens`
    in all), by key: see `input_of`, plus "blk.N.residual", the residual stream leaving block N.

    File (`save`; `load` rejects any other schema), JSON: {"schema": "mixquant.activations/1",
    "chunks", "ctx", "tokens", "stats": {key: {"dist": {the Distribution fields},
    "n_tokens", "n_channels", "dynamic_range", "top_channels": [{"channel", "absmax",
    "fire_rate"}, ...]}}}.
    """

    stats: dict[str, ActivationStat]
    chunks: int
    ctx: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"schema": ACTIVATIONS_SCHEMA, "chunks": self.chunks, "ctx": self.ctx, "tokens": self.tokens,
                "stats": {k: asdict(v) for k, v in self.stats.items()}}

    @classmethod
    def from_dict(cls, d: Any, where: str = "activations") -> ActivationStats:
        if not isinstance(d, dict):
            raise MixquantError(f"{where}: not an activation statistics file (expected a JSON object)")
        schema = d.get("schema")
        if schema != ACTIVATIONS_SCHEMA:
            raise MixquantError(f"{where}: schema {schema!r} is not supported; this mixquant reads "
                                f"{ACTIVATIONS_SCHEMA!r}")
        try:
            return cls(stats={str(k): ActivationStat.from_dict(v) for k, v in d["stats"].items()},
                       chunks=int(d["chunks"]), ctx=int(d["ctx"]), tokens=int(d["tokens"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MixquantError(f"{where}: malformed activation statistics: {exc!r}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON (atomically: a temporary file renamed into place)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationStats:
        return cls.from_dict(read_json(path), str(Path(path).expanduser()))


# --------------------------------------------------------------------------------------------
# computing it with transformers


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


@dataclass
class Calibration:
    """What a calibration pass gives: the imatrix, and the activation statistics (None when not
    asked for)."""

    imatrix: Imatrix
    activations: ActivationStats | None = None
    hessians: Hessians | None = None


def calibrate(hf_folder: str | Path, text: str, ctx: int = 512, chunks: int | None = None, *,
              progress: bool = True, dataset: str | None = None, process_output: bool = False,
              activations: bool = True, output_importance: bool = False, add_bos: bool | None = None,
              kv_f16: bool = True, n_batch: int = 2048, n_ubatch: int = 512, hessians: bool = False,
              hessian_budget: int = DEFAULT_BUDGET_BYTES, max_memory: int | str | None = None,
              device: str | None = "cpu", dtype: str | None = "float32") -> Calibration:
    """One pass of the Hugging Face model (transformers, float32 by default) over the calibration
    windows: the imatrix llama-imatrix computes with `-f <text> -c ctx --chunks chunks` and, with
    `activations`, the activation statistics (see the module docstring).

    The pass runs block by block through `mixquant.runtime.StreamedModel`: all windows are embedded,
    then each decoder block is loaded once and runs every window (as many per call as the budget's
    working memory holds), the hidden states between blocks kept in a `HiddenStates` (spilled to a
    temporary file beyond their share of the budget); the final norm gives the output layer's input.
    The hooks see one window at a time, in window order, so the sums, statistics and Hessians are
    those of a window-by-window pass of the whole model.

    text: the calibration text itself (`mixquant.text.read_text(path)` reads a file as `-f` does).
    dataset: recorded in `imatrix.datasets` (llama-imatrix records the `-f` file name).
    process_output: also collect `output.weight` (`--process-output`); a tied output layer is
        never collected, as in llama.cpp.
    output_importance: collect the output layer's input even when it is tied, under
        `token_embd.weight` (untied: `output.weight`); not what llama-imatrix does.
    add_bos: override the tokenizer's BOS behaviour (see `mixquant.text.token_windows`).
    kv_f16: round keys (after RoPE) and values to float16 before attention, as llama.cpp's default
        F16 KV cache (`-ctk f16 -ctv f16`) does; this brings the imatrix about 3x closer to
        llama-imatrix's (SmolLM2-135M, 4 x 512 tokens: median relative difference per column
        1.2e-5 instead of 3.2e-5, max 1.6e-3 instead of 1.9e-3).
    n_batch, n_ubatch: llama-imatrix's `-b`/`-ub`; they only decide which few tokens fall in
        micro-batches too small to be collected (`imatrix_token_mask`).
    hessians: also accumulate H = sum x x^T (float64) per distinct linear input over the imatrix's
        tokens (`mixquant.hessians`); refused, naming the size, above `hessian_budget` bytes.
    max_memory, device, dtype: the runtime's budget (bytes or a size string; None: what the machine
        has free), where and in which precision the forward pass runs (`StreamedModel`); a budget
        smaller than one unit of the model needs is refused, naming the minimum.
    """
    from .runtime import StreamedModel
    from .source import open_source

    hf_folder = Path(hf_folder)
    source = open_source(hf_folder)
    try:
        if source.kind != "hf":
            raise MixquantError(f"{hf_folder}: calibration needs a Hugging Face model folder")
        with StreamedModel(source, device=device, dtype=dtype, max_memory=max_memory) as sm:
            return _calibrate(sm, text, ctx, chunks, progress=progress, dataset=dataset, process_output=process_output,
                              activations=activations, output_importance=output_importance, add_bos=add_bos,
                              kv_f16=kv_f16, n_batch=n_batch, n_ubatch=n_ubatch, hessians=hessians,
                              hessian_budget=hessian_budget)
    finally:
        source.close()


def _calibrate(sm: Any, text: str, ctx: int, chunks: int | None, *, progress: bool, dataset: str | None,
               process_output: bool, activations: bool, output_importance: bool, add_bos: bool | None,
               kv_f16: bool, n_batch: int, n_ubatch: int, hessians: bool, hessian_budget: int) -> Calibration:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from .runtime import HiddenStates, format_size
    from .text import token_windows

    hf_folder, info, adapter, model = sm.source.hf_folder, sm.info, sm.adapter, sm.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
        raise MixquantError(f"{hf_folder}: cannot load the tokenizer: {exc}") from None
    try:
        windows = token_windows(tokenizer, text, ctx, chunks, add_bos=add_bos)
    except MixquantError as exc:
        raise MixquantError(f"{dataset}: {exc}" if dataset else str(exc)) from None
    n_chunk = windows.shape[0]
    mask = torch.from_numpy(imatrix_token_mask(n_chunk, ctx, n_batch, n_ubatch)).to(sm.device)
    if kv_f16:
        model.set_attn_implementation(_f16_kv_attention())

    names = adapter.linear_modules(model, info.n_layer)
    shapes = {t.name: t.shape for t in info.tensors}
    collect = {m: n for m, n in names.items() if n.startswith("blk.")}
    output_name = None  # the imatrix entry for the output layer's input, if any
    if output_importance or (process_output and not info.tied_output):
        output_name = "token_embd.weight" if info.tied_output else "output.weight"
    modules = dict(model.named_modules())

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    expert_counts: dict[str, torch.Tensor] = {}
    # the windows of the block call being run: their number and, per window, its token mask (None: all)
    state: dict[str, Any] = {"windows": 1, "rows": [None]}
    # input key -> (first module reading it, columns): q/k/v (gate/up) share one input, summed once
    hess_inputs: dict[str, tuple[str, int]] = {}
    if hessians:
        for m, n in names.items():
            key = input_of(n) if n.startswith("blk.") else None
            if key is not None and key not in hess_inputs:
                hess_inputs[key] = (n, modules[m].in_features)
        if output_name:
            hess_inputs["output_in"] = (output_name, info.n_embd)
        check_budget({k: c for k, (_, c) in hess_inputs.items()}, hessian_budget, str(hf_folder))
    hess_of = {n: k for k, (n, _) in hess_inputs.items()}  # GGUF name -> the key it accumulates
    hess_sums: dict[str, torch.Tensor] = {}
    hess_rows: dict[str, int] = {}
    hess_abs: dict[str, torch.Tensor] = {}  # sum of |x| per channel, AWQ's activation magnitude
    streams: dict[str, StreamingStats] = {}

    def per_window(x: torch.Tensor) -> list[torch.Tensor]:
        """A block call's activation (windows x tokens, ...) as one float32 (tokens, cols) tensor per
        window, on a device with float64 (the sums' precision)."""
        x = x.reshape(state["windows"], -1, x.shape[-1])
        return list((x if x.device.type in ("cpu", "cuda") else x.cpu()).float().unbind(0))

    def accumulate(gguf_name: str, x: torch.Tensor, rows: torch.Tensor | None) -> None:
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
        key = hess_of.get(gguf_name)
        if key is not None:
            # one window's x^T x in float32 (512 products per entry: 1e-6 relative, half the time of
            # float64), summed over windows in float64
            xx = (x.T @ x).to(torch.float64)
            xa = torch.sum(x.abs(), dim=0, dtype=torch.float64)
            if key in hess_sums:
                hess_sums[key] += xx
                hess_abs[key] += xa
            else:
                hess_sums[key], hess_abs[key] = xx, xa
            hess_rows[key] = hess_rows.get(key, 0) + x.shape[0]

    def observe(key: str | None, x: torch.Tensor) -> None:
        if key is not None:  # all tokens: the statistics ignore the imatrix's token mask
            streams[key].add(x.reshape(-1, x.shape[-1]).cpu().numpy())

    def stream(key: str | None) -> str | None:
        """`key` if it is new (q/k/v, gate/up read one tensor: observe it once), else None."""
        if not activations or key is None or key in streams:
            return None
        streams[key] = StreamingStats(f"{hf_folder}: activations {key}")
        return key

    def linear_hook(gguf_name: str):
        key = stream(adapter.input_of(gguf_name))

        def hook(_module, args):
            for x, rows in zip(per_window(args[0]), state["rows"]):
                observe(key, x)
                accumulate(gguf_name, x, rows)
        return hook

    def expert_hook(layer: int):
        """llama-imatrix's MUL_MAT_ID: per expert, the sum of x^2 over the tokens routed to it and
        their number, over every token (its 16-token minimum applies to plain products only)."""
        gate_up = [f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight"]
        down = f"blk.{layer}.ffn_down_exps.weight"
        n_expert = shapes[down][0]
        key = stream(adapter.input_of(down))

        def add(name: str, x2: torch.Tensor, count: torch.Tensor) -> None:
            if name in sums:
                sums[name] += x2
                expert_counts[name] += count
            else:
                sums[name], expert_counts[name] = x2, count.clone()

        def window(module, x: torch.Tensor, top_k: torch.Tensor) -> None:
            experts = top_k.reshape(-1)  # the expert of each (token, slot) pair, token-major
            token = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k.shape[1])
            count = torch.bincount(experts, minlength=n_expert)
            x2 = torch.zeros(n_expert, x.shape[1], dtype=torch.float64, device=x.device)
            x_sq = (x * x).to(torch.float64)
            for slot in range(top_k.shape[1]):  # each token's k-th expert: no (tokens x k, n_embd) copy
                x2.index_add_(0, top_k[:, slot], x_sq)
            for name in gate_up:
                add(name, x2.clone(), count)
            h2 = torch.zeros(n_expert, shapes[down][-1], dtype=torch.float64, device=x.device)
            for e in torch.nonzero(count).reshape(-1).tolist():
                h = adapter.expert_hidden(module, e, x[token[experts == e]].to(sm.dtype)).float()
                observe(key, h)
                h2[e] = torch.sum(h * h, dim=0, dtype=torch.float64)
            add(down, h2, count)

        def hook(module, args, kwargs):
            x, top_k = adapter.routed_tokens(module, args, kwargs)
            for xw, top_w in zip(per_window(x), top_k.to(x.device).reshape(state["windows"], -1, top_k.shape[-1])):
                window(module, xw, top_w)
        return hook

    def residual_hook(key: str | None):
        def hook(_module, _args, out):
            for x in per_window(out[0] if isinstance(out, tuple) else out):
                observe(key, x)
        return hook

    hooks = [modules[m].register_forward_pre_hook(linear_hook(n)) for m, n in collect.items()]
    hooks += [modules[m].register_forward_pre_hook(expert_hook(layer), with_kwargs=True)
              for m, layer in adapter.expert_modules(model, info.n_layer).items()]
    hooks += [layer.register_forward_hook(residual_hook(stream(f"blk.{i}.residual")))
              for i, layer in enumerate(sm.layers)] if activations else []
    output_key = stream("output_in")

    # The budget: the weights held (all when resident, else the largest unit) and the Hessians'
    # sums; of the rest, half may hold the hidden states in RAM, the rest is the blocks' working memory.
    held = sm.weight_bytes if sm.resident else max(sm.unit_bytes.values())
    free = max(0, sm.budget - held - hessian_bytes({k: c for k, (_, c) in hess_inputs.items()}))
    states = HiddenStates((n_chunk, ctx, info.n_embd), allowance=free // 2)
    step = min(n_chunk, sm.windows_per_pass(ctx, free - (0 if states.spilled else states.nbytes)))
    groups = [slice(i, min(i + step, n_chunk)) for i in range(0, n_chunk, step)]
    position_ids = torch.arange(ctx, device=sm.device)[None]
    block_kwargs: dict[int, list[dict[str, Any]]] = {}  # per number of windows in a call

    def run(rows: slice) -> torch.Tensor:
        """Set the hooks' windows to `rows` and return their hidden states, ready for a unit."""
        state["windows"] = rows.stop - rows.start
        state["rows"] = [None if bool(m.all()) else m for m in mask[rows]]
        return states.get(rows).to(sm.device, sm.dtype)

    label = "calibrate" if activations else "imatrix"
    units = sm.units if activations or output_name else sm.units[:-1]  # the head: the output layer's input
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(units, desc=label, unit="block", disable=not progress)
            for unit in bar:
                with sm.loaded(unit) as parts:
                    for rows in groups:
                        if unit == "embed":
                            states.set(rows, parts[0](windows[rows].to(sm.device)))
                        elif unit == "head":  # the final norm's output is the output layer's input
                            h = sm.modules_of("head")[0](run(rows))
                            for x, mask_rows in zip(per_window(h), state["rows"]):
                                observe(output_key, x)
                                if output_name:
                                    accumulate(output_name, x, mask_rows)
                        else:
                            i = int(unit.removeprefix("blk."))
                            h = run(rows)
                            if h.shape[0] not in block_kwargs:
                                block_kwargs[h.shape[0]] = sm.block_kwargs(h, position_ids)
                            states.set(rows, sm.layer(i, h, block_kwargs[h.shape[0]][i]))
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{n_chunk * ctx * (bar.n + 1) / len(units) / elapsed:.0f} tokens/s")
    finally:
        for h in hooks:
            h.remove()
        states.close()
    elapsed = time.perf_counter() - start
    if progress:
        where = "" if sm.resident else f", streamed within {format_size(sm.budget)}"
        print(f"{label}: {n_chunk} chunks x {ctx} tokens, {len(sums)} tensors, {elapsed:.1f} s "
              f"({n_chunk * ctx / max(elapsed, 1e-9):.0f} tokens/s{where})", file=sys.stderr)
    if n_chunk and not sums:
        raise MixquantError(f"{hf_folder}: no linear layer of the model maps to a GGUF blk.* weight")

    out_sums = {}
    for name, s in sums.items():
        v = s.cpu().numpy().astype(np.float32)
        if not np.isfinite(v).all():
            raise MixquantError(f"{hf_folder}: non-finite activations entering {name}")
        out_sums[name] = v
    per_expert = {name: c.cpu().numpy() for name, c in expert_counts.items()}
    counts.update({name: int(c.max()) for name, c in per_expert.items()})
    max_count = max(counts.values(), default=0)
    imatrix = Imatrix(sums=out_sums, counts=counts, chunks=max_count // ctx,
                      datasets=[dataset] if dataset else [], chunk_size=ctx, expert_counts=per_expert)
    stats = None
    if activations:
        stats = ActivationStats(stats={k: streams[k].activation_stat() for k in sorted(streams, key=_key_order)
                                       if streams[k].rows}, chunks=n_chunk, ctx=ctx, tokens=n_chunk * ctx)
    hess = None
    if hessians:
        hess = Hessians(model=model_shape(info), rows=hess_rows, sums={k: v.cpu().numpy() for k, v in hess_sums.items()},
                        abs_sums={k: v.cpu().numpy() for k, v in hess_abs.items()})
    return Calibration(imatrix=imatrix, activations=stats, hessians=hess)


def compute_imatrix(hf_folder: str | Path, text: str, ctx: int = 512, chunks: int | None = None,
                    progress: bool = True, *, dataset: str | None = None, process_output: bool = False,
                    add_bos: bool | None = None, kv_f16: bool = True, n_batch: int = 2048,
                    n_ubatch: int = 512, max_memory: int | str | None = None, device: str | None = "cpu",
                    dtype: str | None = "float32") -> Imatrix:
    """The imatrix alone: `calibrate(...)` without the activation statistics (see there)."""
    return calibrate(hf_folder, text, ctx, chunks, progress=progress, dataset=dataset,
                     process_output=process_output, activations=False, add_bos=add_bos, kv_f16=kv_f16,
                     n_batch=n_batch, n_ubatch=n_ubatch, max_memory=max_memory, device=device, dtype=dtype).imatrix


# --------------------------------------------------------------------------------------------
# files


_GGUF_MAGIC = b"GGUF"
_GGUF_VERSION = 3
_GGUF_ALIGNMENT = 32
_GGML_TYPE_F32 = 0
# GGUF value types (what llama-imatrix's header uses)
_UINT32, _STRING, _ARRAY = 4, 8, 9


def write_imatrix(imatrix: Imatrix, path: str | Path) -> Path:
    """Write `imatrix` as llama-imatrix would: legacy binary when the name ends in `.dat`, else GGUF.

    The file is written atomically and never over an input (mixquant.files).
    """
    from .files import write_bytes

    path = Path(path).expanduser()
    data = _legacy_bytes(imatrix) if path.suffix.lower() == ".dat" else _gguf_bytes(imatrix)
    return write_bytes(path, data)


def _gguf_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int) -> int:
    return (n + _GGUF_ALIGNMENT - 1) // _GGUF_ALIGNMENT * _GGUF_ALIGNMENT


def _gguf_bytes(imatrix: Imatrix) -> bytes:
    """IMatrixCollector::save_imatrix, byte for byte (by hand: gguf's writer adds
    general.architecture and cannot write the empty imatrix.datasets array llama-imatrix can):
    keys general.type, imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size; for each name in sorted order the F32 tensors
    `<name>.in_sum2` (ne = [n_cols, n_mat]) and `<name>.counts` (ne = [1, n_mat]), n_mat the number
    of counts (1, or the experts of a MoE stack)."""
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
        counts = imatrix.matrix_counts(name).astype(np.float32)
        tensors.append((f"{name}.in_sum2", sums.reshape(counts.size, -1)))
        tensors.append((f"{name}.counts", counts.reshape(counts.size, 1)))
    infos, blobs, offset = [], [], 0
    for tname, arr in tensors:
        ne = arr.shape[::-1]  # ggml order; ggml_n_dims: trailing dimensions of 1 are not written
        ne = ne[:1] if ne[1] == 1 else ne
        infos.append(_gguf_string(tname) + struct.pack(f"<I{len(ne)}qIQ", len(ne), *ne, _GGML_TYPE_F32, offset))
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
    chunk count and the (last) dataset name. A stack of experts keeps one slice per expert, with
    its own count, and ncall from the largest; an expert without tokens stores 1 * ncall (the
    format has one count per entry, so its per-expert counts are lost)."""
    chunk_size = imatrix.chunk_size if imatrix.chunk_size > 0 else LEGACY_CHUNK_SIZE
    names = [n for n in sorted(imatrix.sums) if imatrix.counts[n] > 0]
    out = [struct.pack("<i", len(names))]
    for name in names:
        raw = name.encode("utf-8")
        counts = imatrix.matrix_counts(name)
        ncall = (int(counts.max()) + chunk_size - 1) // chunk_size
        per_matrix = imatrix.sums[name].reshape(counts.size, -1).copy()
        per_matrix[counts == 0] = 1
        counts = np.where(counts == 0, 1, counts).astype(np.float32)
        values = (per_matrix / counts[:, None]) * np.float32(ncall)
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
            imatrix = _parse_gguf(path)
        else:
            imatrix = _parse_legacy(data)
        _validate(imatrix)
    except _Bad as exc:
        raise MixquantError(f"{path}: {exc}") from None
    return imatrix


def _parse_gguf(path: Path) -> Imatrix:
    """A GGUF imatrix through gguf's reader (mixquant.files.open_gguf: bounded by the file's size)."""
    import gguf
    from gguf import GGUFValueType

    from .files import open_gguf

    reader = open_gguf(path)
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            if t.name.endswith((".in_sum2", ".counts")):
                raise _Bad(f"tensor {t.name} must be F32 (ggml type {int(t.tensor_type)})")
            continue
        tensors[t.name] = np.array(t.data, dtype=np.float32).reshape(-1)

    sums, counts, expert_counts = {}, {}, {}
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
            if (np.abs(cnt) >= 2.0**62).any():
                raise _Bad(f"count out of range in {name}.counts")
            # common_imatrix_load: std::lround of each float count
            rounded = (np.floor(np.abs(cnt.astype(np.float64)) + 0.5) * np.sign(cnt)).astype(np.int64)
            sums[name] = arr
            counts[name] = int(rounded.max())
            if rounded.size > 1:
                expert_counts[name] = rounded
        elif tname.endswith(".counts") and f"{tname[: -len('.counts')]}.in_sum2" not in tensors:
            raise _Bad(f"tensor {tname} has no matching in_sum2")
    if not sums:
        raise _Bad("not an imatrix (a GGUF file without <name>.in_sum2 / <name>.counts tensors)")
    fields = reader.fields
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in fields]
    if missing:
        raise _Bad(f"missing imatrix metadata {', '.join(missing)} (llama-quantize refuses such a file)")
    datasets = fields["imatrix.datasets"]
    if datasets.types != [GGUFValueType.ARRAY, GGUFValueType.STRING] and datasets.types != [GGUFValueType.ARRAY]:
        raise _Bad("imatrix.datasets is not an array of strings")
    try:
        names = [bytes(datasets.parts[i]).decode("utf-8") for i in datasets.data]
    except UnicodeDecodeError:
        raise _Bad("imatrix.datasets is not UTF-8") from None
    numbers = []
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        f = fields[key]
        if len(f.types) != 1 or f.types[0] in (GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.FLOAT32,
                                                GGUFValueType.FLOAT64, GGUFValueType.BOOL):
            raise _Bad(f"{key} is not an integer")
        numbers.append(int(f.contents()))
    return Imatrix(sums=sums, counts=counts, chunks=numbers[0], datasets=names, chunk_size=numbers[1],
                   expert_counts=expert_counts)


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
        with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused by _validate
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


def check_imatrix(imatrix: Imatrix, model: Any, where: str | os.PathLike[str] | None = None) -> None:
    """A one-line MixquantError unless `imatrix` was collected on `model` (a ModelInfo): every entry
    names one of its tensors and has one value per input column of it."""
    where = str(where or "imatrix")
    # a stack of experts (n_expert, rows, cols) has one slice of values per expert, as llama-quantize wants
    experts = {t.name: math.prod(t.shape[:-2]) for t in model.tensors}
    cols = {t.name: t.shape[-1] * experts[t.name] for t in model.tensors}
    unknown = [n for n in imatrix.names if n not in cols]
    if unknown:
        raise MixquantError(f"{where}: collected on another model: {len(unknown)} of its {len(imatrix.names)} "
                            f"entries name tensors this model does not have, e.g. {unknown[0]}")
    for name in imatrix.names:
        if imatrix.sums[name].size != cols[name]:
            raise MixquantError(f"{where}: collected on another model: {name} has {imatrix.sums[name].size} "
                                f"values, the tensor has {cols[name]} columns")
        per_expert = imatrix.expert_counts.get(name)
        if per_expert is not None and per_expert.size != experts[name]:
            raise MixquantError(f"{where}: collected on another model: {name} has counts for {per_expert.size} "
                                f"experts, the tensor has {experts[name]}")


def _validate(imatrix: Imatrix) -> None:
    for name in imatrix.names:
        sums = imatrix.sums[name]
        if not np.isfinite(sums).all():
            raise _Bad(f"NaN/Inf values in the entry for {name}")
        if (sums < 0).any():
            raise _Bad(f"negative sums of squares in the entry for {name}")
        if (imatrix.matrix_counts(name) < 0).any():
            raise _Bad(f"negative count in the entry for {name}")
