"""Mixed precision for activations: which linear inputs does quantizing hurt, and how many must
stay in full precision for a target KLD.

Per input (q/k/v read one, gate/up another), only that input is quantized and the KLD against
float32 measured; the inputs are ranked by it. The allocation keeps the k worst inputs in full
precision and quantizes the rest, for a growing k, and measures the KLD of each (the curve); the
answer for a target is the smallest measured k whose KLD is at most the target. The measured
per-input damage is then ranked against the calibration statistics (kurtosis, dynamic range, max
|x|) with Spearman's rho, to say whether the cheap statistics predict it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..analyze import _spearman
from . import schemes as sc

__all__ = ["LayerSensitivity", "CurvePoint", "measure_sensitivity", "allocation_curve", "curve_counts",
           "correlations", "smallest_for"]


@dataclass
class LayerSensitivity:
    key: str
    kld: float
    kurtosis: float
    dynamic_range: float
    absmax: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CurvePoint:
    float_inputs: int  # the k worst inputs kept in full precision
    kld: float
    kld_p99: float
    ppl: float
    top1: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure_sensitivity(runner, scheme: sc.Scheme, weights: str, chunks: int | None,
                        progress=None) -> list[LayerSensitivity]:
    """Mean KLD with only one input quantized by `scheme`, for every input; worst first."""
    out = []
    for key in runner.keys:
        with runner.applied(scheme, weights, keys=[key]):
            r = runner.ev.score(f"{scheme.name} @ {key}", chunks=chunks)
        d = runner.stats[key].stream.activation_stat()
        out.append(LayerSensitivity(key, r.kld_mean, d.dist.kurtosis, d.dynamic_range, d.dist.absmax))
        if progress:
            progress(key, r.kld_mean)
    return sorted(out, key=lambda s: -s.kld)


def curve_counts(n: int) -> list[int]:
    """0, 1, 2, 4, 8, ... and n: the numbers of full-precision inputs the curve measures."""
    ks = [0] + [1 << i for i in range(n.bit_length()) if (1 << i) < n] + [n]
    return sorted(set(ks))


def allocation_curve(runner, scheme: sc.Scheme, weights: str, ranking: list[LayerSensitivity],
                     chunks: int | None, counts: list[int] | None = None) -> list[CurvePoint]:
    """KLD with the k worst inputs (by `ranking`) in full precision and the others quantized."""
    order = [s.key for s in ranking]
    points = []
    for k in counts or curve_counts(len(order)):
        with runner.applied(scheme, weights, keys=order[k:]):
            r = runner.ev.score(f"{scheme.name}, {k} float inputs", chunks=chunks)
        points.append(CurvePoint(k, r.kld_mean, r.kld_p99, r.ppl, r.top1))
    return points


def smallest_for(curve: list[CurvePoint], target: float) -> CurvePoint | None:
    """The measured point with the fewest full-precision inputs whose KLD is at most `target`."""
    ok = [p for p in curve if p.kld <= target]
    return min(ok, key=lambda p: p.float_inputs) if ok else None


def correlations(ranking: list[LayerSensitivity]) -> dict[str, float | None]:
    """Spearman's rho between the measured damage and each statistic."""
    kld = [s.kld for s in ranking]
    return {stat: _spearman(list(zip([getattr(s, stat) for s in ranking], kld)))
            for stat in ("kurtosis", "dynamic_range", "absmax")}


def top_share(ranking: list[LayerSensitivity], n: int = 1) -> float:
    """The share of the summed single-input damage that the n worst inputs carry."""
    total = float(np.sum([s.kld for s in ranking]))
    return float(np.sum([s.kld for s in ranking[:n]])) / total if total > 0 else float("nan")
