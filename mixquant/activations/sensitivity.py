"""Mixed precision for activations: which linear inputs does quantizing hurt, and how many must
stay in full precision for a target KLD.

Per input (q/k/v read one, gate/up another), only that input is quantized and the KLD against
float32 measured (with analyze's incremental runner: only the blocks from that input's on are
rerun); the inputs are ranked by it. The allocation keeps the k worst inputs in full
precision and quantizes the rest, for a growing k, and measures the KLD of each (the curve); the
answer for a target is the smallest measured k whose KLD is at most the target. The measured
per-input damage is then ranked against the calibration statistics (kurtosis, dynamic range, max
|x|) with Spearman's rho, to say whether the cheap statistics predict it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..analyze import spearman
from . import schemes as sc

__all__ = ["LayerSensitivity", "CurvePoint", "incremental", "measure_sensitivity", "allocation_curve",
           "curve_counts", "correlations", "smallest_for", "top_share"]


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

    def to_dict(self) -> dict:
        return asdict(self)


def _block(key: str) -> int:
    return int(key.split(".")[1])


def incremental(runner, weights: str, windows):
    """analyze's incremental runner on `windows`: the model with float activations (and `weights`)
    run once with every block's input cached; a measurement reruns only from the first block whose
    input it quantizes. KLD is then against this model: the float32 one when weights are "none"."""
    from ..analyze import _Runner

    with runner.applied(None, weights):
        return _Runner(runner.ev.model, windows, runner.ev.first)


def measure_sensitivity(runner, scheme: sc.Scheme, weights: str, windows, progress: bool = False,
                        base=None) -> list[LayerSensitivity]:
    """Mean KLD with only one input quantized by `scheme`, for every input; worst first."""
    from tqdm import tqdm

    base = base or incremental(runner, weights, windows)
    out = []
    for key in tqdm(runner.keys, desc="sensitivity", unit="input", leave=False, disable=not progress):
        with runner.applied(scheme, weights, keys=[key]):
            kld, _ = base.score(_block(key))
        d = runner.stats[key].stream.activation_stat(top=1)
        out.append(LayerSensitivity(key, kld, d.dist.kurtosis, d.dynamic_range, d.dist.absmax))
    return sorted(out, key=lambda s: -s.kld)


def curve_counts(n: int) -> list[int]:
    """0, 1, 2, 4, 8, ... and n: the numbers of full-precision inputs the curve measures."""
    ks = [0] + [1 << i for i in range(n.bit_length()) if (1 << i) < n] + [n]
    return sorted(set(ks))


def allocation_curve(runner, scheme: sc.Scheme, weights: str, ranking: list[LayerSensitivity], windows,
                     counts: list[int] | None = None, base=None) -> list[CurvePoint]:
    """KLD with the k worst inputs (by `ranking`) in full precision and the others quantized."""
    base = base or incremental(runner, weights, windows)
    order = [s.key for s in ranking]
    points = []
    for k in counts or curve_counts(len(order)):
        quantized = order[k:]
        start = min((_block(key) for key in quantized), default=len(base.layers))
        with runner.applied(scheme, weights, keys=quantized):
            kld, _ = base.score(start)
        points.append(CurvePoint(k, kld))
    return points


def smallest_for(curve: list[CurvePoint], target: float) -> CurvePoint | None:
    """The measured point with the fewest full-precision inputs whose KLD is at most `target`."""
    ok = [p for p in curve if p.kld <= target]
    return min(ok, key=lambda p: p.float_inputs) if ok else None


def correlations(ranking: list[LayerSensitivity]) -> dict[str, float | None]:
    """Spearman's rho between the measured damage and each statistic."""
    return {stat: spearman([(getattr(s, stat), s.kld) for s in ranking])
            for stat in ("kurtosis", "dynamic_range", "absmax")}


def top_share(ranking: list[LayerSensitivity], n: int = 1) -> float:
    """The share of the summed single-input damage that the n worst inputs carry."""
    total = float(np.sum([s.kld for s in ranking]))
    return float(np.sum([s.kld for s in ranking[:n]])) / total if total > 0 else float("nan")
