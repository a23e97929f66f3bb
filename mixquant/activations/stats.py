"""Streaming statistics of one linear input over the calibration text, for static scales.

Nothing holds the activations: each forward pass adds its values to
- `calibrate.StreamingStats` (the moments, kurtosis, per-channel max |x| and dynamic range that
  `activations.json` reports, so the numbers agree with `mixquant analyze`), and
- a `LogHistogram` of the signed values in geometric bins 1.1% wide, from which the percentile and
  MSE-optimal clipping ranges are read: a percentile is the outer edge of the bin holding it (at
  most one bin, 1.1%, wider than the exact value); the MSE search evaluates the expected error at
  the bins' centres.
The exact min and max are kept as well (the `minmax` scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate import StreamingStats
from . import schemes as sc

__all__ = ["LogHistogram", "InputStats"]


class LogHistogram:
    """Counts of negative and positive values by magnitude: bin k >= 1 holds |x| in
    [2^(LO + (k-1)/PER_OCTAVE), 2^(LO + k/PER_OCTAVE)), bin 0 everything smaller (zeros), the last
    bin everything larger."""

    PER_OCTAVE = 64
    LO, HI = -24, 24
    BINS = (HI - LO) * PER_OCTAVE + 2

    def __init__(self) -> None:
        self.counts = torch.zeros(2 * self.BINS, dtype=torch.float64)  # negatives, then positives

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1)
        k = torch.floor((torch.log2(x.abs()) - self.LO) * self.PER_OCTAVE) + 1  # log2(0) = -inf -> bin 0
        k = k.clamp(0, self.BINS - 1).to(torch.int64) + self.BINS * (x >= 0)
        self.counts += torch.bincount(k, minlength=2 * self.BINS).to(torch.float64)

    def upper_edges(self) -> torch.Tensor:
        k = torch.arange(self.BINS, dtype=torch.float64)
        return torch.where(k > 0, torch.exp2(self.LO + k / self.PER_OCTAVE), torch.zeros_like(k))

    def centers(self) -> torch.Tensor:
        """Geometric bin centres (bin 0: 0)."""
        k = torch.arange(self.BINS, dtype=torch.float64)
        return torch.where(k > 0, torch.exp2(self.LO + (k - 0.5) / self.PER_OCTAVE), torch.zeros_like(k))

    @property
    def negative(self) -> torch.Tensor:
        return self.counts[: self.BINS]

    @property
    def positive(self) -> torch.Tensor:
        return self.counts[self.BINS:]

    def abs_percentile(self, p: float) -> float:
        """The p-th percentile of |x| (outer edge of its bin)."""
        cum = torch.cumsum(self.negative + self.positive, 0)
        k = int(torch.searchsorted(cum, cum[-1] * p / 100.0))
        return float(self.upper_edges()[min(k, self.BINS - 1)])

    def signed_percentile(self, p: float) -> float:
        """The p-th percentile of x (outer edge of its bin: away from zero)."""
        edges = self.upper_edges()
        values = torch.cat((-edges.flip(0), edges))  # increasing x: negatives largest-first, then positives
        counts = torch.cat((self.negative.flip(0), self.positive))
        cum = torch.cumsum(counts, 0)
        k = int(torch.searchsorted(cum, cum[-1] * p / 100.0))
        return float(values[min(k, values.numel() - 1)])


@dataclass
class Range:
    """A static quantization range: [lo, hi] (symmetric: lo = -hi) or, per channel, amax per column."""

    lo: float
    hi: float
    per_channel: torch.Tensor | None = None


class InputStats:
    """Everything the static schemes need about one linear input (see the module docstring)."""

    def __init__(self, what: str) -> None:
        self.stream = StreamingStats(what)
        self.hist = LogHistogram()
        self.min = float("inf")
        self.max = float("-inf")

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.stream.add(x.numpy())
        self.hist.add(x)
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    @property
    def channel_absmax(self) -> torch.Tensor:
        return torch.from_numpy(self.stream.absmax)

    def range(self, scheme: sc.Scheme, bits: int) -> Range:
        """The static range of a minmax/percentile/mse/per-channel scheme at `bits`."""
        amax = max(-self.min, self.max)
        if scheme.kind == "per-channel":
            return Range(-amax, amax, self.channel_absmax.float())
        if scheme.kind == "minmax":
            return Range(-amax, amax) if scheme.symmetric else Range(self.min, self.max)
        if scheme.kind == "percentile":
            p = float(scheme.percentile)
            if scheme.symmetric:
                a = min(self.hist.abs_percentile(p), amax)
                return Range(-a, a)
            return Range(max(self.hist.signed_percentile(100.0 - p), self.min),
                         min(self.hist.signed_percentile(p), self.max))
        if scheme.kind == "mse":
            values = self.hist.centers()
            if scheme.symmetric:
                a = sc.mse_clip(values, self.hist.negative + self.hist.positive, amax, sc.qmax(bits))
                return Range(-a, a)
            lo, hi = sc.mse_range((values, self.hist.negative), (values, self.hist.positive),
                                  self.min, self.max, bits)
            return Range(lo, hi)
        raise ValueError(f"{scheme.name} has no static range")
