"""Fake quantizers for activations (and the int8 weights W8A8 schemes pair them with).

Fake quantization is a round trip through the integer grid: x -> clamp(round(x / d) [+ z]) -> back
to float, so the forward pass computes with exactly the values an integer kernel would see. Every
function here is a pure, vectorised torch function of a (..., channels) tensor.

Scheme names (`parse_scheme`), each a row of `mixquant actquant`'s table:

    minmax-sym, minmax-asym           per-tensor static scale from the calibration min/max
    percentile-P-sym, percentile-P-asym   ... from the P-th percentile of the calibration values
    mse-sym, mse-asym                 ... from the clipping range that minimises the expected error
    per-token                         dynamic: one scale per token (row), symmetric
    per-channel                       static: one scale per input channel (column), symmetric; a real
                                      int8 GEMM cannot use it (the scale sits on the reduced axis)
    block32                           dynamic, one scale per token and 32 consecutive channels with
                                      an fp16 scale: llama.cpp's CPU backend rounding activations to Q8_0
    llm.int8-T                        LLM.int8(): columns with |x| > T in any token of the batch stay
                                      float, the rest per-token int8; int8 weights per output channel
    smoothquant-A[-per-token]         SmoothQuant with alpha A: s_j = max|x_j|^A / max|w_j|^(1-A)
                                      moved from the activations into the weights, then per-tensor
                                      static (default) or per-token activations and int8 weights
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import MixquantError

__all__ = ["Scheme", "parse_scheme", "DEFAULT_SCHEMES", "LLM_INT8_SWEEP", "SMOOTHQUANT_SWEEP", "qmax",
           "symmetric", "asymmetric", "per_token", "per_block", "llm_int8", "per_channel_weights",
           "q8_0_weights", "default_schemes", "mse_clip", "mse_range"]

LLM_INT8_THRESHOLD = 6.0
SMOOTHQUANT_ALPHA = 0.5
PERCENTILES = (99.9, 99.99, 99.999)
BLOCK = 32  # ggml's Q8_0 block
LLM_INT8_SWEEP = (1.0, 2.0, 4.0, 6.0, 8.0, 16.0)
SMOOTHQUANT_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

_STATIC = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class Scheme:
    """One way of quantizing every linear input. kind: minmax | percentile | mse | per-token |
    per-channel | block32 | llm.int8 | smoothquant; symmetric (static kinds); percentile (for
    "percentile"); threshold (llm.int8); alpha and granularity ("per-tensor" or "per-token",
    smoothquant)."""

    name: str
    kind: str
    symmetric: bool = True
    percentile: float | None = None
    threshold: float | None = None
    alpha: float | None = None
    granularity: str = "per-tensor"

    @property
    def static(self) -> bool:
        """Its scales come from the calibration text (not from the tokens being run)."""
        return self.kind in _STATIC or self.kind == "per-channel" or (
            self.kind == "smoothquant" and self.granularity == "per-tensor")

    @property
    def int8_weights(self) -> bool:
        """The method quantizes the weights too (to int8 per output channel unless --weights says else)."""
        return self.kind in ("llm.int8", "smoothquant")


def _number(text: str, what: str, scheme: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise MixquantError(f"scheme {scheme!r}: {what} {text!r} is not a number") from None


def parse_scheme(name: str) -> Scheme:
    """A scheme name (see the module docstring) -> Scheme; MixquantError for anything else."""
    n = name.strip().lower()
    m = re.fullmatch(r"(minmax|mse)-(sym|asym)", n)
    if m:
        return Scheme(n, m.group(1), symmetric=m.group(2) == "sym")
    m = re.fullmatch(r"percentile-([^-]+)-(sym|asym)", n)
    if m:
        p = _number(m.group(1), "percentile", name)
        if not 0 < p <= 100:
            raise MixquantError(f"scheme {name!r}: a percentile must be in (0, 100], got {m.group(1)}")
        return Scheme(n, "percentile", symmetric=m.group(2) == "sym", percentile=p)
    if n in ("per-token", "per-channel", "block32"):
        return Scheme(n, n)
    m = re.fullmatch(r"llm\.int8(?:-(.+))?", n)
    if m:
        t = _number(m.group(1), "threshold", name) if m.group(1) else LLM_INT8_THRESHOLD
        if not t >= 0:
            raise MixquantError(f"scheme {name!r}: the threshold must be >= 0")
        return Scheme(f"llm.int8-{t:g}", "llm.int8", threshold=t)
    m = re.fullmatch(r"smoothquant(?:-([0-9.]+))?(-per-token)?", n)
    if m:
        a = _number(m.group(1), "alpha", name) if m.group(1) else SMOOTHQUANT_ALPHA
        if not 0 <= a <= 1:
            raise MixquantError(f"scheme {name!r}: alpha must be in [0, 1], got {a:g}")
        gran = "per-token" if m.group(2) else "per-tensor"
        return Scheme(f"smoothquant-{a:g}" + ("-per-token" if m.group(2) else ""), "smoothquant", alpha=a,
                      granularity=gran)
    raise MixquantError(f"unknown scheme {name!r} (known: minmax-sym|asym, percentile-P-sym|asym, mse-sym|asym, "
                        "per-token, per-channel, block32, llm.int8[-T], smoothquant[-A][-per-token])")


def default_schemes() -> list[Scheme]:
    """The default table: every static per-tensor variant, the finer granularities, LLM.int8() and
    SmoothQuant at their defaults, then the threshold and alpha sweeps."""
    names = ["minmax-sym", "minmax-asym"]
    names += [f"percentile-{p:g}-{s}" for p in PERCENTILES for s in ("sym", "asym")]
    names += ["mse-sym", "mse-asym", "per-token", "per-channel", "block32",
              f"llm.int8-{LLM_INT8_THRESHOLD:g}", f"smoothquant-{SMOOTHQUANT_ALPHA:g}",
              f"smoothquant-{SMOOTHQUANT_ALPHA:g}-per-token"]
    names += [f"llm.int8-{t:g}" for t in LLM_INT8_SWEEP if t != LLM_INT8_THRESHOLD]
    names += [f"smoothquant-{a:g}" for a in SMOOTHQUANT_SWEEP if a != SMOOTHQUANT_ALPHA]
    return [parse_scheme(n) for n in names]


DEFAULT_SCHEMES = tuple(s.name for s in default_schemes())


def qmax(bits: int) -> int:
    """The largest level of a symmetric signed grid: 127 for 8 bits, 7 for 4."""
    if bits not in (4, 8):
        raise MixquantError(f"bits must be 4 or 8, got {bits}")
    return (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------------------------
# the grids


def symmetric(x: torch.Tensor, amax: torch.Tensor, levels: int, fp16_scale: bool = False) -> torch.Tensor:
    """Round trip through the symmetric grid {-levels..levels} * d with d = amax / levels (amax
    broadcast against x); values beyond amax are clipped. fp16_scale: d stored as float16, as
    ggml's Q8_0 blocks do. Division tensor by tensor, as ggml's C (see evaluate.round_activations)."""
    amax = amax.to(x.dtype)
    c = torch.full_like(amax, float(levels))
    d = amax / c
    if fp16_scale:
        d = d.to(torch.float16).to(x.dtype)
    inv = torch.where(amax > 0, c / amax, torch.zeros_like(amax))
    return torch.clamp(torch.round(x * inv), -levels, levels) * d


def asymmetric(x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Round trip through the unsigned grid {0..2^bits-1} spanning [lo, hi] with an integer zero
    point (so 0 is exact): q = clamp(round(x / d) + z), x' = (q - z) d."""
    lo = torch.as_tensor(lo, dtype=x.dtype).clamp(max=0.0)
    hi = torch.as_tensor(hi, dtype=x.dtype).clamp(min=0.0)
    top = float((1 << bits) - 1)
    d = (hi - lo) / top
    d = torch.where(d > 0, d, torch.ones_like(d))
    z = torch.round(-lo / d)
    return (torch.clamp(torch.round(x / d) + z, 0.0, top) - z) * d


def per_token(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Dynamic symmetric scales, one per token (the last axis shares one)."""
    return symmetric(x, x.abs().amax(dim=-1, keepdim=True), levels)


def per_block(x: torch.Tensor, levels: int, block: int = BLOCK) -> torch.Tensor:
    """Dynamic symmetric scales per token and `block` consecutive channels, the scale in float16:
    at 8 bits exactly what ggml-cpu's Q8_0 rounding of a matmul's activations gives
    (`evaluate.round_activations(x, "Q8_0")`; tests/test_actquant.py checks it)."""
    shape = x.shape
    if shape[-1] % block:
        raise MixquantError(f"activations of width {shape[-1]} cannot be split into blocks of {block}")
    b = x.reshape(-1, block)
    return symmetric(b, b.abs().amax(dim=-1, keepdim=True), levels, fp16_scale=True).reshape(shape)


def llm_int8(x: torch.Tensor, threshold: float, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s mixed decomposition of a batch (..., channels): the columns where any token has
    |x| > threshold stay as they are, the others are rounded per token (scale from those columns
    only). Returns (values, the boolean mask of float columns)."""
    flat = x.reshape(-1, x.shape[-1])
    outlier = (flat.abs() > threshold).any(dim=0)
    inliers = torch.where(outlier, torch.zeros_like(flat), flat)
    rounded = per_token(inliers, levels)
    return torch.where(outlier, flat, rounded).reshape(x.shape), outlier


def per_channel_weights(w: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """A weight (out, in) rounded symmetrically per output channel (row): the int8 weights of a
    W8A8 GEMM, whose scales factor out of the dot product."""
    return symmetric(w, w.abs().amax(dim=-1, keepdim=True), levels)


def q8_0_weights(w: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) on ggml's Q8_0 grid: blocks of 32 along each row, fp16 scale amax/127."""
    return per_block(w, 127)


# --------------------------------------------------------------------------------------------
# static ranges from the calibration histogram


def expected_error_symmetric(values: torch.Tensor, counts: torch.Tensor, clip: torch.Tensor,
                             levels: int) -> torch.Tensor:
    """Expected squared error per candidate clip (a vector) for |x| distributed as (values, counts):
    beyond the clip (|x| - clip)^2, below half a step x^2 (rounded to 0), else step^2 / 12."""
    v = values[None, :]
    c = clip[:, None]
    step = c / levels
    err = torch.where(v > c, (v - c) ** 2, torch.where(v < step / 2, v * v, step * step / 12))
    return (err * counts[None, :]).sum(dim=1)


def mse_clip(values: torch.Tensor, counts: torch.Tensor, amax: float, levels: int,
             candidates: int = 200) -> float:
    """The clip in (0, amax] minimising `expected_error_symmetric`, searched on a geometric grid
    from amax / 1000 (the error curve has one minimum in practice; a grid is robust where it doesn't)."""
    if amax <= 0:
        return 0.0
    values, counts = values[counts > 0], counts[counts > 0]  # most bins are empty
    clip = amax * torch.logspace(-3, 0, candidates, dtype=torch.float64)
    err = expected_error_symmetric(values, counts, clip, levels)
    return float(clip[int(torch.argmin(err))])


def mse_range(neg: tuple[torch.Tensor, torch.Tensor], pos: tuple[torch.Tensor, torch.Tensor], lo: float,
              hi: float, bits: int, candidates: int = 200) -> tuple[float, float]:
    """The asymmetric range (r lo, r hi) with r in (0, 1] minimising the expected squared error of
    the grid of 2^bits levels over the signed distribution (neg: |x| of the negative values,
    pos: the positive ones)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return lo, hi
    r = torch.logspace(-3, 0, candidates, dtype=torch.float64)
    step = r * (hi - lo) / ((1 << bits) - 1)
    total = torch.zeros_like(r)
    for (v, n), edge in ((neg, -lo), (pos, hi)):
        v, n = v[n > 0], n[n > 0]  # most bins are empty
        c = (r * edge)[:, None]
        s = step[:, None]
        vv = v[None, :]
        err = torch.where(vv > c, (vv - c) ** 2, torch.where(vv < s / 2, vv * vv, s * s / 12))
        total += (err * n[None, :]).sum(dim=1)
    best = float(r[int(torch.argmin(total))])
    return best * lo, best * hi

