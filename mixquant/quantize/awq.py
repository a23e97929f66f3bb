"""AWQ inside GGUF: per-channel scales found on calibration statistics, folded exactly into the model.

For each `Adapter.folds` rescaling of a block (attn_norm -> q/k/v, ffn_norm -> gate/up, v -> o,
up -> down) the targets' input columns are multiplied by s and the feeder's output channels divided
by s: the float model computes the same function, but the quantizer sees weights whose important
input channels (large mean |x|) are larger, so they round with a smaller relative error. The
written GGUF is ordinary: only the norm weights (F32) and the linear weights differ.

The scale search (`search_scales`): s = m^alpha with m = mean |x| per channel (`Hessians.mean_abs`;
under grouped-query attention, the mean over the query heads reading a value channel), normalised
by sqrt(max(s) min(s)) as AutoAWQ does, for alpha on a grid of [0, 1). Each candidate is scored
without a forward pass and exactly per linear: quantize W diag(s) with the plan's type by ggml's
rounding (the imatrix / s^2, which is the imatrix of the inputs x / s the scaled weights see),
unscale, and sum tr((W - Q) H (W - Q)^T) over the fold's targets (`gptq.output_error`, in the
output's original scale). alpha = 0 is s = 1, today's bytes: the search keeps it unless a scale
strictly lowers the objective, so it never raises its own objective.

The transform (`AwqScales`) then applies tensor by tensor as export reads them (`ScaledSource`):
no second copy of the model. `awq+gptq` runs GPTQ on the scaled weights with H transformed to
diag(1/s) H diag(1/s) and the imatrix to imatrix / s^2 (`ScaledHessians`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import formats
from ..arch import Fold
from ..errors import MixquantError

METHODS = ("awq", "awq+gptq")
DEFAULT_GRID = 20  # alphas 0, 1/20, ..., 19/20 (AutoAWQ's grid)


@dataclass
class AwqScales:
    """The scale chosen for every fold (None: alpha = 0, left as it is) and its alpha."""

    folds: list[Fold]
    scales: list[np.ndarray | None]
    alphas: list[float]
    _columns: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # tensor or input key -> column scale
    _rows: dict[str, list[tuple[slice, np.ndarray]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for fold, s in zip(self.folds, self.scales):
            if s is None:
                continue
            col = s if fold.column_channel is None else s[fold.column_channel]
            for key in (*fold.targets, fold.input_key):
                if key in self._columns:  # two folds into one input would not be exact one by one
                    raise MixquantError(f"AWQ: {key} is the target of two folds")
                self._columns[key] = col
            for name in (fold.feeder, fold.bias):
                if name is not None:
                    self._rows.setdefault(name, []).append((fold.rows, s))

    @property
    def scaled(self) -> int:
        """How many folds got a scale other than 1."""
        return sum(s is not None for s in self.scales)

    def changes(self, name: str) -> bool:
        return name in self._columns or name in self._rows

    def weight(self, name: str, x: np.ndarray) -> np.ndarray:
        """The GGUF tensor `name` (float32, GGUF layout) after every fold it takes part in."""
        if not self.changes(name):
            return x
        x = np.array(x, dtype=np.float32)
        if name in self._columns:
            x *= self._columns[name].astype(np.float32)
        for rows, s in self._rows.get(name, ()):
            s = s.astype(np.float32)
            x[rows] /= s if x.ndim == 1 else s[:, None]
        return x

    def importance(self, name: str, v: np.ndarray | None) -> np.ndarray | None:
        """The imatrix entry of the scaled weight: its inputs are x / s, so E[x^2] / s^2."""
        if v is None or name not in self._columns:
            return v
        return (np.asarray(v, dtype=np.float64) / self._columns[name].astype(np.float64) ** 2).astype(np.float32)

    def hessian(self, key: str, h: np.ndarray) -> np.ndarray:
        """H of the scaled input x / s: diag(1/s) H diag(1/s)."""
        if key not in self._columns:
            return h
        inv = 1.0 / self._columns[key].astype(np.float64)
        return h * inv[:, None] * inv[None, :]

    def summary(self) -> str:
        if not self.folds:
            return "awq: no folds"
        alphas = np.array(self.alphas)
        return (f"awq: {self.scaled} of {len(self.folds)} folds scaled (alpha median {np.median(alphas):.2f}, "
                f"range {alphas.min():.2f}..{alphas.max():.2f})")


class ScaledSource:
    """A source whose tensors come out with the AWQ scales folded in (what `export.write_gguf` reads);
    everything else is the wrapped source's."""

    def __init__(self, source: Any, scales: AwqScales):
        self._source = source
        self.scales = scales

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def tensor(self, name: str) -> np.ndarray:
        return self.scales.weight(name, self._source.tensor(name))

    def raw_data(self, name: str, type_name: str) -> np.ndarray | None:
        return None if self.scales.changes(name) else self._source.raw_data(name, type_name)


class ScaledHessians:
    """Hessians of the scaled inputs (for GPTQ after AWQ): diag(1/s) H diag(1/s)."""

    def __init__(self, hessians: Any, scales: AwqScales):
        self._hessians = hessians
        self.scales = scales

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hessians, name)

    def __contains__(self, key: str) -> bool:
        return key in self._hessians

    def matrix(self, key: str) -> np.ndarray:
        return self.scales.hessian(key, self._hessians.matrix(key))


def _channel_magnitude(fold: Fold, mean_abs: np.ndarray) -> np.ndarray:
    """mean |x| per channel of the fold: under grouped-query attention a value channel is read by
    several attn_output columns (one per query head of its group): their mean."""
    m = np.asarray(mean_abs, dtype=np.float64)
    if fold.column_channel is not None:
        m = np.bincount(fold.column_channel, weights=m, minlength=fold.channels) / \
            np.bincount(fold.column_channel, minlength=fold.channels)
    live = m > 0
    if not live.any():
        return np.ones_like(m)
    return np.where(live, m, np.median(m[live]))  # a dead channel (no input) gets a neutral magnitude


def candidate_scale(magnitude: np.ndarray, alpha: float) -> np.ndarray:
    """s = m^alpha normalised by sqrt(max(s) min(s)) (AutoAWQ's normalisation); alpha = 0 gives 1."""
    s = magnitude ** alpha
    return s / math.sqrt(s.max() * s.min())


class _Target:
    """One target linear of a fold, ready to score: its weight as written before this fold (with the
    row scales of folds already chosen), its type, imatrix entry, and H."""

    def __init__(self, w: np.ndarray, row_scale: np.ndarray | None, type_name: str, importance: np.ndarray | None,
                 h: np.ndarray):
        self.w, self.type_name, self.importance = w, type_name, importance
        self.row_weight = None if row_scale is None else row_scale.astype(np.float64) ** 2
        import torch

        self.h = torch.from_numpy(np.asarray(h, dtype=np.float32))

    def error(self, col: np.ndarray | None, threads: int) -> float:
        """tr((W - Q) H (W - Q)^T) of W quantized with its columns scaled by `col`, measured in the
        original output scale (a row divided by r has its error counted r^2 times)."""
        import torch

        w = self.w
        if col is None:
            q = formats.dequantize(formats.quantize(w, self.type_name, self.importance, threads=threads),
                                   self.type_name, w.shape)
        else:
            imp = None if self.importance is None else \
                (self.importance.astype(np.float64) / col.astype(np.float64) ** 2).astype(np.float32)
            scaled = w * col.astype(np.float32)
            q = formats.dequantize(formats.quantize(scaled, self.type_name, imp, threads=threads),
                                   self.type_name, w.shape) / col.astype(np.float32)
        d = torch.from_numpy(np.ascontiguousarray(w - q, dtype=np.float32))
        per_row = ((d @ self.h) * d).sum(1, dtype=torch.float64).numpy()
        return float(per_row.sum() if self.row_weight is None else per_row @ self.row_weight)


def search_scales(source: Any, types: dict[str, str], hessians: Any, importance: dict[str, np.ndarray] | None = None,
                  *, grid: int = DEFAULT_GRID, threads: int = 2, progress: bool = False) -> AwqScales:
    """The AWQ scale of every fold of `source`'s model for the plan `types` (tensor -> GGUF type),
    from `hessians` (H and mean |x| of every fold's input) and the imatrix `importance`.

    Block by block: each block's linear feeders (v -> o, up -> down) first, their row scales then
    counted in the norms' folds (q/k/v, gate/up are scored as they will be written). Reads one
    block's weights at a time.
    """
    from tqdm import tqdm

    from ..hessians import model_shape

    if grid < 1:
        raise MixquantError(f"AWQ grid must have at least 1 point, got {grid}")
    adapter, info = source.adapter, source.model
    folds = adapter.folds(info)
    if not folds:
        raise MixquantError(f"{source.path}: AWQ needs the architecture's norm -> linear mapping, and "
                            f"{adapter.name} has none")
    where = str(hessians.path or "Hessians")
    hessians.check_model(model_shape(info), where)
    for fold in folds:  # before any work: every input the search reads
        if fold.input_key not in hessians:
            raise MixquantError(f"{where}: no Hessian for {fold.input_key} (AWQ scores {', '.join(fold.targets)} "
                                "with it)")
        cols = source.shape(fold.targets[0])[-1]
        if hessians.cols(fold.input_key) != cols:
            raise MixquantError(f"{where}: Hessians are for another model ({fold.input_key} has "
                                f"{hessians.cols(fold.input_key)} columns, {fold.targets[0]} has {cols})")
        hessians.mean_abs(fold.input_key)
    alphas = [i / grid for i in range(grid)]
    rows_done: dict[str, tuple[slice, np.ndarray]] = {}  # feeder -> (rows, s) of the folds chosen so far
    scales, chosen = [], []
    for fold in tqdm(folds, desc="awq search", unit="fold", disable=not progress, leave=False):
        h = hessians.matrix(fold.input_key)
        magnitude = _channel_magnitude(fold, hessians.mean_abs(fold.input_key))
        targets = []
        for name in fold.targets:
            if formats.get(types[name]).name in ("F32",):
                continue  # no rounding, no error
            w = source.tensor(name).astype(np.float32)
            row_scale = None
            if name in rows_done:
                rows, s = rows_done[name]
                row_scale = np.ones(w.shape[0])
                row_scale[rows] = s
                w = w / row_scale[:, None].astype(np.float32)
            imp = None if importance is None else importance.get(name)
            targets.append(_Target(w, row_scale, types[name], imp, h))
        best, best_alpha, best_error = None, 0.0, sum(t.error(None, threads) for t in targets)
        for alpha in alphas[1:]:
            s = candidate_scale(magnitude, alpha)
            col = s if fold.column_channel is None else s[fold.column_channel]
            err = sum(t.error(col, threads) for t in targets)
            if err < best_error:
                best, best_alpha, best_error = s, alpha, err
        del targets, h
        scales.append(best)
        chosen.append(best_alpha)
        if best is not None and len(source.shape(fold.feeder)) == 2:
            rows_done[fold.feeder] = (fold.rows, best)
    return AwqScales(folds, scales, chosen)


@dataclass
class AwqWrite:
    """What export.write_gguf takes to write a plan with AWQ: the source with the scales folded in,
    the imatrix they imply, and the quantizer (GPTQ on the scaled Hessians for awq+gptq, else None)."""

    scales: AwqScales
    source: ScaledSource
    importance: dict[str, np.ndarray] | None
    quantizer: Any


def prepare(source: Any, types: dict[str, str], hessians: Any, importance: dict[str, np.ndarray] | None,
            method: str, *, grid: int = DEFAULT_GRID, threads: int = 2, progress: bool = False,
            gptq_options: dict[str, Any] | None = None) -> AwqWrite:
    """`method` (awq or awq+gptq) for the plan `types`: the scales searched for it, and what writing
    it needs."""
    from .gptq import HessianQuantizer

    if method not in METHODS:
        raise MixquantError(f"AWQ method must be one of {', '.join(METHODS)}, got {method!r}")
    scales = search_scales(source, types, hessians, importance, grid=grid, threads=threads, progress=progress)
    if importance is not None:
        importance = {name: scales.importance(name, v) for name, v in importance.items()}
    quantizer = None
    if method == "awq+gptq":
        quantizer = HessianQuantizer(ScaledHessians(hessians, scales), source.model, **(gptq_options or {}),
                                     threads=threads)
    return AwqWrite(scales, ScaledSource(source, scales), importance, quantizer)
