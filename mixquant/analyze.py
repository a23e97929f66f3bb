"""Sensitivity analysis: what storing each tensor in each type costs, in bytes and in damage.

    sens = analyze(source, imatrix, text="calib.txt")     # a few minutes on the 135M test model
    sens.save("sensitivity.json")
    sens = Sensitivity.load("sensitivity.json")
    sens.damage("blk.3.ffn_down.weight", "Q4_K")           # expected KLD (nats/token) from that one tensor

For every tensor that llama-quantize would quantize (`plan.allows_quantization`) and every type
mixquant can write whose block divides its row length, two numbers:

* **predicted error**: the importance-weighted squared quantization error, normalised by the
  weighted energy of the tensor,

      predicted(t, type) = sum_ij imp_j (w_ij - q(w)_ij)^2  /  sum_ij imp_j w_ij^2

  where `imp` is the tensor's importance vector (the imatrix's mean squared activation per input
  column; all ones for a tensor the imatrix does not cover, e.g. the token embedding) and `q(w)`
  is `dequantize(quantize(w, type, imp))`, exactly the values `export.write_gguf` would write.
  Cheap: one quantization per pair, no forward pass.

* **measured damage**: the KL divergence (nats per token, mean over scored tokens) of the model's
  next-token distribution when *only that tensor* is quantized to that type, everything else in
  float32, on windows held out from the calibration text (by default its last windows: an
  imatrix is normally computed on the first chunks). Computed incrementally: the float32 model
  runs once over all windows (batched), caching the hidden state entering every block and the
  reference logits of the scored positions; a candidate swaps its one weight in place, reruns
  only from its block onward (the token embedding, tied to the output, reruns everything),
  computes the KLD against the cache and puts the weight back.

Budget: on 2 CPU cores a rerun costs ~1-3 s for 512 tokens (blocks l..L-1 plus the 49152-word
output layer), so measuring all ~1900 (tensor, type) pairs of the test model would take about an
hour. The default (`measure="probe"`) therefore measures a calibrating subset and fits a model
of the rest:

    damage(t, type) = scale_t * factor(category(t), type) * basis(t, type)

where the basis is the Fisher estimate below when it was computed (`fisher=True`), else the
predicted error (`Sensitivity.basis`):

* every tensor is measured at two *probe* types, Q4_0 and Q5_1 (both fit every row length; one
  at the cheap end of the range allocations use, one in the middle), which fixes `scale_t`, how
  much the rest of the network amplifies that tensor's error: to second order the KLD is
  proportional to the error, with a tensor-specific factor the imatrix cannot know;
* a validation subset (`validate`; by default token_embd/output and all tensors of blocks n/2 and
  n-1) is measured at every quantized type. Per category (attn_v, ffn_down, ...), how much more or
  less damage each type does than the first probe per unit of predicted error, averaged over the
  tensors measured at both and shrunk towards 1 when they disagree, is `factor`. It matters: on
  the test model Q4_1/Q5_1 do 3-4x less damage to attn_v than their weighted squared error
  suggests next to Q4_0/Q5_0;
* measured pairs are used as measured. `Sensitivity.fit_report()` checks the model on the
  validation tensors, each one left out of the factors it is checked against.

`measure="all"` measures every pair; `measure="none"` only predicts (the damage is then the
predicted error itself, in its own units). A full probe analysis of the 135M test model (2
windows of 256 tokens, 446 scored) takes about 10 minutes on one busy CPU core.

Weights are quantized in GGUF orientation (`source.tensor`) and mapped to the transformers layout
for the forward pass (llama's q/k rows un-permuted), so the measured variant is bit for bit the
tensor a GGUF written with the same types and importance would hold.

Optional extras, each a stage of its own (timed in `settings["seconds_*"]`):

* **Fisher estimate** (`fisher=True`): the empirical Fisher diagonal F from one backward pass per
  held-out window, and per (tensor, type) the second-order estimate of the loss increase

      fisher(t, type) = 0.5 * sum_ij F_ij (w_ij - q(w)_ij)^2           (nats/token, like the KLD)

  F_ij = T * mean over windows of (dL/dw_ij)^2, with L the mean next-token cross-entropy over the
  window's T scored tokens: the squared gradient of a mean of T terms is ~1/T of the per-token
  squared gradient (the Fisher the KLD's second-order expansion uses) when the tokens' gradients
  are uncorrelated, so the factor T puts the estimate in per-token units (on the test model, on
  the windows the KLD is measured on, it is a median 1.3x the KLD, Spearman 0.97 within a type). 9 s on the test model
  with the default windows, one thread.
* **layer sweep** (`layer_sweep_types`, e.g. `DEFAULT_SWEEP_TYPES`): every quantizable tensor of
  one block quantized to a type (llama.cpp's shape fallback where its block does not fit the row),
  everything else float32; the KLD and the perplexity of each (block, type), against the float32
  reference perplexity. 77 s for 30 blocks x 2 types on the test model, one thread.

`rank_correlation(sens, kind)` says how well a cheap score (predicted error, Fisher) ranks the
measured KLDs (Spearman's rho).

The file (`Sensitivity.save`, schema "mixquant.sensitivity/2"), JSON:

    {
      "schema": "mixquant.sensitivity/2",
      "model": {"arch": "llama", "n_layer": 30, "n_elements": 134515008, "source": "<path>"},
      "settings": {...how it was measured: windows, ctx, score_from, tokens, imatrix, probe
                   types, validate, threads, seconds per stage, fit (fit_report())...},
      "reference": {"nll": 2.71, "ppl": 15.0} | null,   # float32 model on the scored tokens
      "type_factors": {"attn_v": {"Q4_0": 1.0, "Q5_1": 0.31, ...}, ...},   # per category
      "tensors": {
        "<gguf tensor name>": {
          "shape": [rows, cols],              # numpy order, as plan.TensorInfo.shape
          "fixed": false,                      # true: not quantizable, kept in its only type
          "scale": 1.23e-2 | null,             # fitted scale_t (null: nothing measured)
          "types": {
            "<type>": {"bytes": 123456,        # tensor data bytes in this type
                       "predicted": 1.5e-3,    # normalised importance-weighted squared error
                       "measured": 2.0e-5 | null,   # KLD nats/token, null when not measured
                       "fisher": 1.8e-5 | null}     # Fisher estimate, null when not computed
          },
          "weights": {"count", "absmax", "mean", "std", "kurtosis", "outlier_fraction",
                      "hist_edges", "hist_counts"} | null   # calibrate.Distribution of its values
        }, ...
      },
      "layer_sweep": [                         # empty when not run
        {"layer": 0, "type": "Q4_0", "kld": 0.012, "ppl": 15.2,
         "delta_ppl": 0.013,                   # ppl / reference ppl - 1
         "types_used": {"blk.0.attn_q.weight": "Q4_0", ...}}, ...
      ]
    }

A reader must reject another schema string; later versions of this schema add fields only under
a new name. Files of "mixquant.sensitivity/1" (the same without "fisher", "reference" and
"layer_sweep") are still read.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .calibrate import Distribution, weight_distribution
from .errors import MixquantError
from .plan import layer_of

__all__ = [
    "SCHEMA",
    "TypeCost",
    "TensorSensitivity",
    "LayerResult",
    "Sensitivity",
    "analyze",
    "candidate_types",
    "predicted_error",
    "rank_correlation",
    "scored_pairs",
    "DEFAULT_WINDOWS",
    "DEFAULT_CTX",
    "DEFAULT_PROBES",
    "DEFAULT_SWEEP_TYPES",
]

SCHEMA = "mixquant.sensitivity/2"
_READABLE = (SCHEMA, "mixquant.sensitivity/1")  # /1: the same without fisher, reference, layer_sweep

# held-out windows x tokens: 2 x 256 tokens (446 scored) keep a full analysis of the 135M test
# model near 10 minutes on one CPU core
DEFAULT_WINDOWS = 2
DEFAULT_CTX = 256
DEFAULT_PROBES = ("Q4_0", "Q5_1")
# the layer sweep's classic pair: a legacy 4-bit type and the coarsest k-quant (Q4_0 where 256 does
# not divide the row, as in llama.cpp)
DEFAULT_SWEEP_TYPES = ("Q4_0", "Q2_K")
# llama's q/k rows are permuted by convert_hf_to_gguf.py (source.py and evaluate.py agree)
_PERMUTE_QK = {"llama"}
_DERIVED = {"rope_freqs.weight"}  # GGUF tensors computed from config.json, no transformers parameter


# --------------------------------------------------------------------------------------------
# data


@dataclass
class TypeCost:
    """One (tensor, type) pair: its bytes, predicted error, and (maybe) measured KLD and Fisher
    estimate (both nats/token)."""

    bytes: int
    predicted: float
    measured: float | None = None
    fisher: float | None = None


@dataclass
class TensorSensitivity:
    """Every type one tensor could be stored in. `fixed`: the tensor is not quantized (norms,
    1-D tensors, ...) and its one entry is the type it keeps."""

    name: str
    shape: tuple[int, ...]
    types: dict[str, TypeCost]
    fixed: bool = False
    scale: float | None = None
    weights: Distribution | None = None  # the statistics of its values (quantizable tensors)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _check_costs(t: TensorSensitivity) -> None:
    """A tensor read from a file: each type's bytes are what its shape takes in that type, and its
    damages are finite and not negative (the allocator trusts both)."""
    from . import formats

    if not t.shape or any(d <= 0 for d in t.shape) or len(t.shape) > 4:
        raise ValueError(f"tensor {t.name}: bad shape {list(t.shape)}")
    rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
    for typ, c in t.types.items():
        try:
            expected = formats.quantized_size(typ, (rows, cols))
        except ValueError as exc:
            raise ValueError(f"tensor {t.name} type {typ}: {exc}") from None
        if c.bytes != expected:
            raise ValueError(f"tensor {t.name} {list(t.shape)} takes {expected} bytes in {typ}, "
                             f"the file says {c.bytes}")
        for what in ("predicted", "measured", "fisher"):
            v = getattr(c, what)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"tensor {t.name} type {typ}: {what} damage {v} is not a finite number >= 0")



@dataclass
class LayerResult:
    """One entry of the layer sweep: every quantizable tensor of block `layer` stored as `type`
    (`types_used`: tensor -> the type it got after the shape fallback), all else float32."""

    layer: int
    type: str
    kld: float  # mean KLD against float32, nats/token
    ppl: float  # perplexity on the scored tokens
    delta_ppl: float  # ppl / reference ppl - 1
    types_used: dict[str, str]


@dataclass
class Sensitivity:
    """Per-tensor, per-type bytes, predicted error and measured KLD (see the module docstring).

    `damage(name, type)` is what the allocator minimises: the measured KLD where there is one,
    else `scale * type_factor * predicted` (`fit()`: the tensor's scale, or its category's
    median scale when it has no measurement; the category's factor for that type), else (nothing
    measured at all) the predicted error.

    `reference`: the float32 model's {"nll", "ppl"} on the scored tokens (None when the model was
    not run); `layer_sweep`: the one-block-at-a-time results (empty when not run).
    """

    tensors: dict[str, TensorSensitivity]
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    type_factors: dict[str, dict[str, float]] = field(default_factory=dict)
    reference: dict[str, float] | None = None
    layer_sweep: list[LayerResult] = field(default_factory=list)
    _basis: str | None = field(default=None, init=False, repr=False, compare=False)

    # -- damage ------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorSensitivity:
        try:
            return self.tensors[name]
        except KeyError:
            raise MixquantError(f"the sensitivity has no tensor {name!r}") from None

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self.tensors.items()}

    def fitted_scale(self, name: str) -> float | None:
        """The tensor's own scale, else its category's median, else the global median, else None."""
        t = self[name]
        if t.scale is not None:
            return t.scale
        scales = self._category_scales()
        return scales.get(_category(name), scales.get("*"))

    def _category_scales(self) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for n, t in self.tensors.items():
            if t.scale is not None and t.scale > 0:
                groups.setdefault(_category(n), []).append(t.scale)
                groups.setdefault("*", []).append(t.scale)
        return {k: float(np.median(v)) for k, v in groups.items()}

    def type_factor(self, name: str, type_name: str) -> float:
        """The fitted correction of `type_name` for tensors of this tensor's category (1 if none)."""
        return float(self.type_factors.get(_category(name), {}).get(type_name, 1.0))

    def damage(self, name: str, type_name: str, how: str = "auto") -> float:
        """Damage of storing `name` as `type_name`.

        how: "auto" (measured, else fitted), "measured" (NaN when not measured), "fitted"
        (scale x type factor x basis, the basis being the Fisher estimate when there is one for
        every pair, else the predicted error; the basis itself when nothing was measured),
        "predicted".
        """
        t = self[name]
        cost = t.types.get(type_name)
        if cost is None:
            raise MixquantError(f"tensor {name}: type {type_name} was not analysed "
                                f"(analysed: {', '.join(t.types)})")
        if how == "predicted":
            return cost.predicted
        if how == "measured":
            return float("nan") if cost.measured is None else cost.measured
        if how not in ("auto", "fitted"):
            raise MixquantError(f"unknown damage kind {how!r}: auto, measured, fitted or predicted")
        if how == "auto" and cost.measured is not None:
            return max(cost.measured, 0.0)
        basis = self._basis_of(cost)
        if basis == 0.0:
            return 0.0
        scale = self.fitted_scale(name)
        if scale is None:
            return basis
        return scale * self.type_factor(name, type_name) * basis

    @property
    def basis(self) -> str:
        """What the fitted damage scales: "fisher" when every quantized pair has a Fisher estimate
        (it ranks tensors and types far better than the predicted error: on the test model its
        fitted damages are within a factor 2 of held-out measurements for 98% of the validation
        pairs, against 92%), else "predicted"."""
        if self._basis is None:
            costs = [c for t in self.tensors.values() if not t.fixed for typ, c in t.types.items()
                     if typ not in ("F32", "F16", "BF16")]
            self._basis = "fisher" if costs and all(c.fisher is not None for c in costs) else "predicted"
        return self._basis

    def _basis_of(self, cost: TypeCost) -> float:
        return cost.fisher if self.basis == "fisher" and cost.fisher is not None else cost.predicted

    def options(self, name: str, how: str = "auto") -> list[tuple[str, int, float]]:
        """(type, bytes, damage) for every analysed type of a tensor, cheapest first."""
        t = self[name]
        out = [(typ, c.bytes, self.damage(name, typ, how)) for typ, c in t.types.items()]
        return sorted(out, key=lambda o: (o[1], o[2]))

    # -- fitting -----------------------------------------------------------------------------

    def _log_ratios(self) -> dict[str, dict[str, float]]:
        """log(measured / basis) of every pair where both are positive (quantizable tensors)."""
        out = {}
        for n, t in self.tensors.items():
            if t.fixed:
                continue
            out[n] = {typ: math.log(c.measured / self._basis_of(c)) for typ, c in t.types.items()
                      if c.measured is not None and c.measured > 0 and self._basis_of(c) > 0}
        return out

    @staticmethod
    def _factors(r: dict[str, dict[str, float]], names: list[str]) -> tuple[str | None, dict[str, float]]:
        """A category's reference type (the one measured most often) and per type the log of its
        factor: log(ratio_type / ratio_reference) over the tensors measured at both, averaged."""
        counts: dict[str, int] = {}
        for n in names:
            for typ in r.get(n, {}):
                counts[typ] = counts.get(typ, 0) + 1
        if not counts:
            return None, {}
        ref = max(sorted(counts), key=lambda typ: counts[typ])
        diffs: dict[str, list[float]] = {}
        for n in names:
            rn = r.get(n, {})
            if ref in rn and len(rn) >= 2:
                for typ, v in rn.items():
                    diffs.setdefault(typ, []).append(v - rn[ref])
        # per type the mean log ratio, shrunk towards 0 by how unsure it is (positive-part
        # James-Stein: the mean survives in full only when it is large next to its standard
        # error); a type seen on a single tensor gets no factor
        out = {}
        for typ, v in diffs.items():
            a = np.asarray(v, dtype=np.float64)
            if typ == ref or a.size < 2:
                out[typ] = 0.0
                continue
            m = float(a.mean())
            se2 = float(a.var(ddof=1)) / a.size
            out[typ] = m * max(0.0, 1.0 - se2 / (m * m)) if m != 0.0 else 0.0
        return ref, out

    def _by_category(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n, t in self.tensors.items():
            if not t.fixed:
                out.setdefault(_category(n), []).append(n)
        return out

    def fit(self) -> "Sensitivity":
        """Fit the damage model  measured ~ scale_t x factor(category, type) x basis
        (`basis`: the Fisher estimate, or the predicted error).

        factor: per category (attn_v, ffn_down, ...), the geometric mean over the tensors measured
        at several types of how much more (or less) damage a type does, per unit of predicted
        error, than the category's reference type (the first probe), shrunk towards 1 when the
        tensors disagree; 1 for the reference and for types measured on fewer than two tensors.
        scale_t: the geometric mean of measured / (factor x basis) over the tensor's
        measured types; None when it has none (it then borrows its category's median)."""
        r = self._log_ratios()
        factors: dict[str, dict[str, float]] = {}
        for cat, names in self._by_category().items():
            _, logf = self._factors(r, names)
            if any(abs(v) > 0 for v in logf.values()):
                factors[cat] = {typ: float(math.exp(v)) for typ, v in sorted(logf.items(), key=lambda kv: kv[0])}
        self.type_factors = factors
        for n, t in self.tensors.items():
            rn = r.get(n)
            if not rn:
                t.scale = None
                continue
            cat = factors.get(_category(n), {})
            a = [v - math.log(cat.get(typ, 1.0)) for typ, v in rn.items()]
            t.scale = float(math.exp(float(np.mean(a))))
        return self

    def fit_report(self) -> dict[str, Any]:
        """How well the damage model predicts measurements it was not fitted on.

        For each tensor measured at several types: its other types predicted from its reference
        (probe) type alone, with the type factors fitted on the *other* tensors of its category
        (leave one tensor out). Returns the number of such predictions, the median and 90th
        percentile of |log(predicted / measured)|, the fraction within a factor 2, the same
        median without type factors (scale only), and the type factors themselves."""
        r = self._log_ratios()
        errs: list[float] = []
        plain: list[float] = []
        n_tensors = 0
        for cat, names in self._by_category().items():
            ref, _ = self._factors(r, names)
            for n in names:
                rn = r.get(n, {})
                if ref not in rn or len(rn) < 2:
                    continue
                n_tensors += 1
                _, logf = self._factors(r, [m for m in names if m != n])
                for typ, v in rn.items():
                    if typ == ref:
                        continue
                    errs.append(abs(rn[ref] + logf.get(typ, 0.0) - v))
                    plain.append(abs(rn[ref] - v))
        if not errs:
            return {"pairs": 0}
        a = np.array(errs)
        return {
            "pairs": int(a.size),
            "tensors": n_tensors,
            "median_abs_log_ratio": float(np.median(a)),
            "p90_abs_log_ratio": float(np.percentile(a, 90)),
            "within_factor_2": float(np.mean(a <= math.log(2))),
            "median_abs_log_ratio_without_type_factors": float(np.median(plain)),
            "within_factor_2_without_type_factors": float(np.mean(np.array(plain) <= math.log(2))),
            "type_factors": {c: {t: round(f, 4) for t, f in d.items()} for c, d in self.type_factors.items()},
        }

    # -- files -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": dict(self.model),
            "settings": dict(self.settings),
            "reference": None if self.reference is None else dict(self.reference),
            "type_factors": {c: dict(f) for c, f in self.type_factors.items()},
            "tensors": {
                n: {
                    "shape": list(t.shape),
                    "fixed": t.fixed,
                    "scale": t.scale,
                    "types": {typ: {"bytes": c.bytes, "predicted": c.predicted, "measured": c.measured,
                                    "fisher": c.fisher}
                              for typ, c in t.types.items()},
                    "weights": None if t.weights is None else asdict(t.weights),
                }
                for n, t in self.tensors.items()
            },
            "layer_sweep": [asdict(r) for r in self.layer_sweep],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "sensitivity") -> "Sensitivity":
        if not isinstance(d, dict):
            raise MixquantError(f"{where}: not a sensitivity file (expected a JSON object)")
        schema = d.get("schema")
        if schema not in _READABLE:
            raise MixquantError(f"{where}: schema {schema!r} is not supported; this mixquant reads "
                                f"{' and '.join(map(repr, _READABLE))}")
        try:
            tensors = {}
            for name, t in d["tensors"].items():
                types = {}
                for typ, c in t["types"].items():
                    types[str(typ)] = TypeCost(bytes=int(c["bytes"]), predicted=float(c["predicted"]),
                                               measured=_opt_float(c.get("measured")),
                                               fisher=_opt_float(c.get("fisher")))
                scale = t.get("scale")
                tensors[str(name)] = TensorSensitivity(
                    name=str(name), shape=tuple(int(s) for s in t["shape"]), types=types,
                    fixed=bool(t.get("fixed", False)), scale=None if scale is None else float(scale),
                    weights=None if t.get("weights") is None else Distribution.from_dict(t["weights"]))
                if not types:
                    raise ValueError(f"tensor {name} has no types")
                _check_costs(tensors[str(name)])
            factors = {str(c): {str(t): float(v) for t, v in f.items()}
                       for c, f in (d.get("type_factors") or {}).items()}
            ref = d.get("reference")
            reference = None if ref is None else {str(k): float(v) for k, v in ref.items()}
            sweep = [LayerResult(layer=int(r["layer"]), type=str(r["type"]), kld=float(r["kld"]),
                                 ppl=float(r["ppl"]), delta_ppl=float(r["delta_ppl"]),
                                 types_used={str(k): str(v) for k, v in r["types_used"].items()})
                     for r in d.get("layer_sweep") or []]
            model, settings = dict(d.get("model") or {}), dict(d.get("settings") or {})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MixquantError(f"{where}: malformed sensitivity data: {exc}") from None
        return cls(tensors=tensors, model=model, settings=settings,
                   type_factors=factors, reference=reference, layer_sweep=sweep)

    def check_model(self, model: Any, where: str = "sensitivity") -> None:
        """A one-line MixquantError unless this sensitivity was measured on `model` (a ModelInfo):
        the same tensors with the same shapes."""
        shapes = {t.name: tuple(t.shape) for t in model.tensors}
        for name, t in self.tensors.items():
            if name not in shapes:
                raise MixquantError(f"{where}: measured on another model: it has tensor {name}, this model does not")
            if tuple(t.shape) != shapes[name]:
                raise MixquantError(f"{where}: measured on another model: tensor {name} has shape {list(t.shape)} "
                                    f"there, {list(shapes[name])} here")
        missing = [n for n in shapes if n not in self.tensors]
        if missing:
            raise MixquantError(f"{where}: measured on another model: it lacks {len(missing)} of this model's "
                                f"tensors, e.g. {missing[0]}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON (atomically: a temporary file renamed into place)."""
        from .text import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Sensitivity":
        from .text import read_json

        return cls.from_dict(read_json(path), str(Path(path).expanduser()))

    def table(self, types: Iterable[str] | None = None, how: str = "auto") -> str:
        """One line per quantizable tensor: its scale and damage per type (for reading)."""
        names = [n for n, t in self.tensors.items() if not t.fixed]
        types = list(types) if types is not None else sorted(
            {typ for n in names for typ in self.tensors[n].types}, key=_type_order)
        w = max([len(n) for n in names] + [6])
        lines = [f"{'tensor':<{w}}  {'scale':>9}  " + "  ".join(f"{t:>9}" for t in types)]
        for n in names:
            t = self.tensors[n]
            cells = []
            for typ in types:
                if typ not in t.types:
                    cells.append(f"{'-':>9}")
                else:
                    mark = "*" if t.types[typ].measured is not None else " "
                    cells.append(f"{self.damage(n, typ, how):8.2e}{mark}")
            scale = f"{t.scale:9.3g}" if t.scale is not None else f"{'-':>9}"
            lines.append(f"{n:<{w}}  {scale}  " + "  ".join(cells))
        lines.append(f"(* measured; others scale x type factor x {self.basis})")
        return "\n".join(lines)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _category(name: str) -> str:
    from .plan import category

    return category(name).value


def _type_order(t: str) -> tuple[float, str]:
    from . import formats

    try:
        return formats.get(t).bits_per_weight, t
    except ValueError:
        return 99.0, t


# --------------------------------------------------------------------------------------------
# predicted error


def candidate_types(shape: tuple[int, ...], types: Iterable[str] | None = None) -> list[str]:
    """The types (of `types`, default every mixquant format) whose block divides the row length."""
    from . import formats

    names = list(formats.FORMATS) if types is None else [formats.get(t).name for t in types]
    cols = int(shape[-1])
    return [t for t in dict.fromkeys(names) if cols % formats.get(t).block_size == 0]


def predicted_error(w: np.ndarray, q: np.ndarray, importance: np.ndarray | None) -> float:
    """sum_ij imp_j (w_ij - q_ij)^2 / sum_ij imp_j w_ij^2 (imp all ones when None), in float64."""
    w64 = w.astype(np.float64, copy=False)
    diff = (q.astype(np.float64, copy=False) - w64)
    err = np.einsum("ij,ij->j", diff, diff)
    ref = np.einsum("ij,ij->j", w64, w64)
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float64)
        err, ref = err @ imp, ref @ imp
    else:
        err, ref = err.sum(), ref.sum()
    return float(err / ref) if ref > 0 else 0.0


def scored_pairs(sens: Sensitivity, kind: str = "predicted") -> list[tuple[str, float, float]]:
    """(type, score, measured KLD) of every measured (tensor, type) pair of a quantizable tensor
    that has the score `kind` ("predicted": the importance-weighted error; "fisher": the Fisher
    estimate); F32 left out (both are 0 by construction)."""
    if kind not in ("predicted", "fisher"):
        raise MixquantError(f"unknown score {kind!r}: predicted or fisher")
    out = []
    for t in sens.tensors.values():
        if t.fixed:
            continue
        for typ, c in t.types.items():
            score = c.predicted if kind == "predicted" else c.fisher
            if typ != "F32" and c.measured is not None and score is not None:
                out.append((typ, score, c.measured))
    return out


def rank_correlation(sens: Sensitivity, kind: str = "predicted",
                     types: Iterable[str] | None = None) -> dict[str, Any]:
    """How well a cheap score ranks the measured KLD: Spearman's rho between `kind` and the
    measured KLD over `scored_pairs`, optionally only the pairs of `types`.

    Returns {"kind", "pairs", "rho", "per_type": {type: {"pairs", "rho"}}}: "rho" over all pairs
    (which mixes types, so it mostly says the score orders bit widths) and per type across tensors
    (the choice the allocator makes). rho is None where it is undefined (under 2 pairs, or one
    side constant)."""
    wanted = None if types is None else set(types)
    pairs: dict[str, list[tuple[float, float]]] = {}
    for typ, score, measured in scored_pairs(sens, kind):
        if wanted is None or typ in wanted:
            pairs.setdefault(typ, []).append((score, measured))
    everything = [xy for v in pairs.values() for xy in v]
    return {"kind": kind, "pairs": len(everything), "rho": _spearman(everything),
            "per_type": {typ: {"pairs": len(v), "rho": _spearman(v)}
                         for typ, v in sorted(pairs.items(), key=lambda kv: _type_order(kv[0]))}}


def _spearman(xy: list[tuple[float, float]]) -> float | None:
    if len(xy) < 2:
        return None
    a = np.asarray(xy, dtype=np.float64)
    rx, ry = _ranks(a[:, 0]), _ranks(a[:, 1])
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else None


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # np.unique sorts: value k spans ranks last[k]-counts[k]+1 .. last[k]
    return (last - (counts - 1) / 2.0)[inverse]


# --------------------------------------------------------------------------------------------
# measured damage: the incremental runner


class _Runner:
    """A transformers decoder-only model, run once in float32 over a batch of windows with the
    hidden state entering each block cached; `score(start)` reruns from block `start` (-1: from
    the embeddings) with whatever weights the model holds now and returns the mean KLD against the
    float32 logits of the scored positions and the mean NLL of their true next tokens (`ref_nll`:
    the float32 model's)."""

    def __init__(self, model, windows, score_from: int):
        import torch

        self.model = model
        inner = model.get_decoder()
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.embed = inner.embed_tokens
        self.head = model.get_output_embeddings()
        self.ids = windows
        b, t = windows.shape
        self.scored = slice(score_from, t - 1)  # position i predicts token i+1; the last one predicts nothing
        self.targets = windows[:, score_from + 1:].reshape(-1)
        with torch.inference_mode():
            emb = self.embed(windows)
            self.pos = torch.arange(t).unsqueeze(0).expand(b, -1)
            self.pos_emb = inner.rotary_emb(emb, position_ids=self.pos)
            self.masks = self._masks(model.config, emb)
            h = emb
            self.cache = []
            for i in range(len(self.layers)):
                self.cache.append(h)
                h = self._layer(i, h)
            self.cache.append(h)
            self.ref = self._logits(h)  # (n_scored, n_vocab) float32
            self.p = torch.softmax(self.ref.double(), dim=-1).float()
            self.ref_nll = float(self._nll(self.ref))
        self.n_scored = int(self.ref.shape[0])

    def _masks(self, config, emb) -> list:
        from transformers.masking_utils import create_causal_mask

        kinds = getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers)
        made = {}
        for kind in set(kinds):
            if kind == "full_attention":
                fn = create_causal_mask
            elif kind == "sliding_attention":
                from transformers.masking_utils import create_sliding_window_causal_mask as fn
            else:
                raise MixquantError(f"layer type {kind!r} is not supported by the sensitivity analysis")
            made[kind] = fn(config=config, inputs_embeds=emb, attention_mask=None, past_key_values=None,
                            position_ids=self.pos)
        return [made[k] for k in kinds]

    def _layer(self, i: int, h):
        out = self.layers[i](h, attention_mask=self.masks[i], position_embeddings=self.pos_emb,
                             position_ids=self.pos, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def _logits(self, h):
        h = self.norm(h[:, self.scored])
        return self.head(h).reshape(-1, self.head.weight.shape[0]).float()

    def _nll(self, logits, targets=None) -> Any:
        """Mean cross-entropy of the true next tokens (`targets`, default the scored ones) as a 0-d
        float64 tensor."""
        import torch

        targets = self.targets if targets is None else targets
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]
        return nll.double().mean()

    def score(self, start: int) -> tuple[float, float]:
        """(mean KLD, mean NLL) over the scored tokens. KL(p_ref || p_now) is computed without
        cancellation: with d = ref - now (logits) and c = E_p[d], KL = log1p(E_p[expm1(c - d)])."""
        import torch

        with torch.inference_mode():
            h = self.embed(self.ids) if start < 0 else self.cache[start]
            for i in range(max(start, 0), len(self.layers)):
                h = self._layer(i, h)
            d = self._logits(h)
            nll = float(self._nll(d))
            d.neg_().add_(self.ref)  # d = ref - now
            c = torch.einsum("nv,nv->n", self.p, d)
            d.neg_().add_(c[:, None]).expm1_()  # expm1(c - d)
            e = torch.einsum("nv,nv->n", self.p, d)
            kl = torch.log1p(e.double())
        return float(kl.clamp_min(0).mean()), nll

    def fisher(self, params: dict[str, Any], progress: bool = False) -> dict[str, np.ndarray]:
        """The empirical Fisher diagonal of `params` ({name: parameter}) in per-token units:
        T x the mean over windows of (dL/dw)^2, L the mean NLL of a window's T scored tokens (see
        the module docstring). Float32, in the parameters' (transformers) layout."""
        import torch
        from tqdm import tqdm

        if not params:
            return {}
        wanted = {id(p) for p in params.values()}
        for p in self.model.parameters():  # no gradients, and no memory for them, elsewhere
            p.requires_grad_(id(p) in wanted)
        acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        n, t = self.ids.shape
        n_tokens = t - 1 - self.scored.start
        try:
            for i in tqdm(range(n), desc="fisher", unit="window", disable=not progress, file=sys.stderr):
                self.model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    logits = self.model(input_ids=self.ids[i:i + 1], use_cache=False).logits[0, self.scored]
                    self._nll(logits, self.ids[i, self.scored.start + 1:]).backward()
                for name, p in params.items():
                    acc[name].addcmul_(p.grad, p.grad, value=n_tokens / n)
        finally:
            self.model.zero_grad(set_to_none=True)
            for p in self.model.parameters():
                p.requires_grad_(False)
        return {name: a.numpy() for name, a in acc.items()}


def _map_parameters(model, info) -> dict[str, Any]:
    """GGUF tensor name -> the transformers parameter holding it (a tied output appears once)."""
    import gguf

    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(info.arch)
    if arch is None:
        raise MixquantError(f"unsupported architecture {info.arch!r}")
    tmap = gguf.get_tensor_name_map(arch, info.n_layer)
    out = {}
    for hf_name, p in model.named_parameters():
        name = tmap.get_name(hf_name.replace("language_model.", ""), try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MixquantError(f"cannot map parameter {hf_name!r} to a GGUF tensor name")
        out[name] = p
    return out


@dataclass
class _Measurer:
    runner: _Runner
    params: dict[str, Any]
    info: Any

    def to_hf(self, name: str, x: np.ndarray) -> np.ndarray:
        from .evaluate import unpermute_qk

        if self.info.arch in _PERMUTE_QK and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.info.n_head if ".attn_q." in name else self.info.n_head_kv
            x = unpermute_qk(x, heads)
        return x

    def start_of(self, name: str) -> int:
        """The block a rerun starts from: the tensor's block; -1 (embeddings) for token_embd;
        past the last block for the output layer."""
        il = layer_of(name)
        if il is not None:
            return il
        if name.startswith("token_embd"):
            return -1
        if name.startswith("output"):
            return len(self.runner.layers)
        raise MixquantError(f"cannot tell where tensor {name} enters the model")

    def measure(self, swaps: dict[str, np.ndarray]) -> tuple[float, float]:
        """(KLD, NLL) with the weights `swaps` ({name: values in GGUF orientation}) in place of
        the float32 ones, rerunning from the first block any of them enters; then put back."""
        import torch

        saved = {}
        try:
            with torch.no_grad():
                for name, q in swaps.items():
                    p = self.params[name]
                    saved[name] = p.data.clone()
                    p.data.copy_(torch.from_numpy(np.ascontiguousarray(self.to_hf(name, q), dtype=np.float32))
                                 .reshape(p.shape))
            return self.runner.score(min(self.start_of(n) for n in swaps))
        finally:
            with torch.no_grad():
                for name, x in saved.items():
                    self.params[name].data.copy_(x)


# --------------------------------------------------------------------------------------------
# the analysis


def _importance(imatrix: Any, name: str) -> np.ndarray | None:
    if imatrix is None:
        return None
    if hasattr(imatrix, "importance"):
        return imatrix.importance(name)
    v = imatrix.get(name)
    return None if v is None else np.asarray(v, dtype=np.float32)


def _auto_validate(info) -> list[str]:
    """The token embedding and output projection, and every tensor of blocks n/2 and n-1."""
    names = [t.name for t in info.tensors]
    out = [n for n in ("token_embd.weight", "output.weight") if n in names]
    layers = sorted({info.n_layer // 2, info.n_layer - 1})
    out += [n for n in names if layer_of(n) in layers]
    return out


def _held_out_windows(tokenizer, text: str, ctx: int, n: int):
    from .text import adds_bos, token_windows

    windows = token_windows(tokenizer, text, ctx, None, add_bos=adds_bos(tokenizer))
    if windows.shape[0] < n:
        raise MixquantError(f"the calibration text has only {windows.shape[0]} windows of {ctx} tokens; "
                            f"{n} were asked for")
    return windows[-n:].clone()


def analyze(
    source: Any,
    imatrix: Any = None,
    *,
    text: str | os.PathLike[str] | None = None,
    windows: Any = None,
    n_windows: int = DEFAULT_WINDOWS,
    ctx: int = DEFAULT_CTX,
    score_from: int | None = None,
    types: Iterable[str] | None = None,
    measure: str = "probe",
    probe_types: Iterable[str] = DEFAULT_PROBES,
    validate: Iterable[str] | str = "auto",
    tensors: Iterable[str] | None = None,
    fisher: bool = False,
    layer_sweep_types: Iterable[str] = (),
    threads: int | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Sensitivity of every tensor of `source` (a Hugging Face folder, or a `Source`) to every type.

    imatrix: an `Imatrix` (or {name: vector}); its importance vectors go to the quantizer and weight
        the predicted error. None: quantize without, weight uniformly.
    text: the calibration text file; the measurement uses its last `n_windows` windows of `ctx`
        tokens (or pass `windows`, a (n, ctx) LongTensor of token ids). Needed unless measure="none".
    score_from: the first scored position of each window (default ctx // 8): positions
        score_from .. ctx-2 predict the next token.
    types: the candidate types (default every mixquant format); each tensor gets those its row
        length allows. F32 is always a candidate (damage 0).
    measure: "probe" (default: `probe_types` for every tensor, every type for `validate`), "all"
        (every pair; slow) or "none" (predicted error only).
    validate: tensor names measured at every quantized type under "probe" (they fit the type
        factors); "auto" (token_embd/output and every tensor of blocks n/2 and n-1) or an iterable
        (empty: none).
    tensors: analyse only these (default: all); the others are left out of the result.
    fisher: also compute the Fisher estimate of every analysed pair (`TypeCost.fisher`; one
        forward and backward pass per window, and the Fisher diagonal, 4 bytes per weight, held
        while the pairs are quantized).
    layer_sweep_types: for each block and each of these types, quantize all of the block's
        quantizable tensors (llama.cpp's shape fallback where the type's block does not fit a row)
        and measure KLD and perplexity (`Sensitivity.layer_sweep`); e.g. `DEFAULT_SWEEP_TYPES`.
        Covers every block, whatever `tensors` selects. Empty (default): skipped.
    threads: torch threads and quantization threads (default: torch's own setting). On a busy
        machine one thread can be much faster than oversubscribed ones.
    progress: tqdm bars on stderr for the long stages.
    """
    import torch
    from tqdm import tqdm

    from . import formats
    from .plan import allows_quantization
    from .source import Source, open_source

    started = time.perf_counter()
    if measure not in ("probe", "all", "none"):
        raise MixquantError(f"measure must be 'probe', 'all' or 'none', got {measure!r}")
    src = source if isinstance(source, Source) else open_source(source)
    info = src.model
    by_name = {t.name: t for t in info.tensors}
    if tensors is None:
        selected = [t.name for t in info.tensors]
    else:
        selected = list(dict.fromkeys(tensors))
        unknown = [n for n in selected if n not in by_name]
        if unknown:
            raise MixquantError(f"the model has no tensor {unknown[0]!r}")
    type_list = None if types is None else [formats.get(t).name for t in types]
    probes = [formats.get(t).name for t in probe_types]
    sweep_types = [formats.get(t).name for t in layer_sweep_types]
    if measure == "probe" and not probes:
        raise MixquantError("measure='probe' needs at least one probe type")
    if validate == "auto":
        validate_set = set(_auto_validate(info)) if measure == "probe" else set()
    else:
        validate_set = set(validate)
        unknown = [n for n in validate_set if n not in by_name]
        if unknown:
            raise MixquantError(f"validate: the model has no tensor {unknown[0]!r}")

    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    qthreads = max(1, int(threads or torch.get_num_threads()))
    measurer = None
    settings: dict[str, Any] = {"measure": measure, "types": type_list, "threads": threads, "fisher": fisher,
                                "layer_sweep_types": sweep_types}
    try:
        # -- the reference pass ---------------------------------------------------------------
        if measure != "none" or fisher or sweep_types:
            measurer = _setup_measurer(src, info, text, windows, n_windows, ctx, score_from, settings)
        settings["seconds_reference"] = round(time.perf_counter() - started, 2)

        # -- the work list --------------------------------------------------------------------
        plan: list[tuple[str, list[str], set[str]]] = []
        for name in selected:
            t = by_name[name]
            if name in _DERIVED or not allows_quantization(t, info.arch):
                plan.append((name, [], set()))
                continue
            cands = candidate_types(t.shape, type_list)
            if "F32" not in cands:
                cands = ["F32", *cands]
            if measure == "all":
                to_measure = {c for c in cands if c != "F32"}
            elif measure == "probe" and name in validate_set:  # float types: damage too small to matter
                to_measure = {c for c in cands if c not in ("F32", "F16", "BF16")}
            elif measure == "probe":
                avail = [p for p in probes if p in cands]
                if not avail:  # no probe fits: the cheapest quantized type that does
                    quant = sorted((c for c in cands if c not in ("F32", "F16", "BF16")),
                                   key=lambda c: formats.get(c).bits_per_weight)
                    avail = quant[:1]
                to_measure = set(avail)
            else:
                to_measure = set()
            if measurer is not None and name not in measurer.params:
                to_measure = set()  # not a model parameter (derived): nothing to swap
            plan.append((name, cands, to_measure))

        # -- the Fisher diagonal --------------------------------------------------------------
        tf = time.perf_counter()
        fisher_diag = None
        if fisher:
            fisher_diag = measurer.runner.fisher({n: measurer.params[n] for n, c, _ in plan
                                                  if c and n in measurer.params}, progress)
        settings["seconds_fisher"] = round(time.perf_counter() - tf, 2)

        n_quant = sum(len(c) for _, c, _ in plan)
        n_meas = sum(len(m) for _, _, m in plan)
        settings.update(candidates=n_quant, measured_pairs=n_meas)
        bar = tqdm(total=n_quant + 4 * n_meas, desc="sensitivity", unit="step", disable=not progress,
                   file=sys.stderr, smoothing=0.05)
        out: dict[str, TensorSensitivity] = {}
        seconds_quant = seconds_measure = 0.0
        try:
            for name, cands, to_measure in plan:
                t = by_name[name]
                f = None if fisher_diag is None else fisher_diag.pop(name, None)
                unchanged = None if fisher_diag is None else 0.0  # the Fisher estimate of a weight kept as is
                if not cands:
                    kept = TypeCost(bytes=_bytes(t.dtype, t.shape), predicted=0.0, measured=0.0, fisher=unchanged)
                    out[name] = TensorSensitivity(name=name, shape=t.shape, fixed=True, types={t.dtype: kept})
                    continue
                bar.set_postfix_str(name, refresh=False)
                rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
                w = np.ascontiguousarray(src.tensor(name), dtype=np.float32).reshape(rows, cols)
                imp = _importance(imatrix, name)
                costs: dict[str, TypeCost] = {}
                for typ in cands:
                    tq = time.perf_counter()
                    nbytes = formats.quantized_size(typ, (rows, cols))
                    if typ == "F32":
                        costs[typ] = TypeCost(bytes=nbytes, predicted=0.0, measured=0.0, fisher=unchanged)
                        bar.update(1)
                        continue
                    q = _roundtrip(w, typ, imp, qthreads)
                    cost = TypeCost(bytes=nbytes, predicted=predicted_error(w, q, imp))
                    if f is not None:
                        d = measurer.to_hf(name, w - q)  # a row permutation: exact on the difference
                        rows_sum = np.einsum("ij,ij->i", f.reshape(d.shape), d * d)  # float64 across rows
                        cost.fisher = 0.5 * float(rows_sum.sum(dtype=np.float64))
                    seconds_quant += time.perf_counter() - tq
                    bar.update(1)
                    if typ in to_measure:
                        tm = time.perf_counter()
                        cost.measured = measurer.measure({name: q.reshape(t.shape)})[0]
                        seconds_measure += time.perf_counter() - tm
                        bar.update(4)
                    costs[typ] = cost
                    del q
                out[name] = TensorSensitivity(name=name, shape=t.shape, types=costs, weights=weight_distribution(w))
        finally:
            bar.close()
        del fisher_diag

        # -- the layer sweep ------------------------------------------------------------------
        ts = time.perf_counter()
        sweep = _layer_sweep(src, info, measurer, imatrix, sweep_types, qthreads, progress) if sweep_types else []
        settings["seconds_layer_sweep"] = round(time.perf_counter() - ts, 2)
        reference = None if measurer is None else {"nll": measurer.runner.ref_nll,
                                                    "ppl": math.exp(measurer.runner.ref_nll)}
    finally:
        torch.set_num_threads(saved_threads)
        if measurer is not None:
            del measurer
    settings.update(
        validate=sorted(validate_set) if measure == "probe" else [],
        probe_types=probes if measure == "probe" else [],
        imatrix=_imatrix_note(imatrix),
        seconds_quantize=round(seconds_quant, 2),
        seconds_measure=round(seconds_measure, 2),
        seconds=round(time.perf_counter() - started, 2),
        torch=torch.__version__,
    )
    sens = Sensitivity(
        tensors=out,
        model={"arch": info.arch, "n_layer": info.n_layer, "n_elements": sum(t.n_elements for t in info.tensors),
               "n_tensors": len(info.tensors), "tied_output": bool(info.tied_output), "source": str(src.path)},
        settings=settings,
        reference=reference,
        layer_sweep=sweep,
    )
    sens.fit()
    if measure != "none":
        settings["fit"] = sens.fit_report()
    return sens


def _roundtrip(w: np.ndarray, type_name: str, importance: np.ndarray | None, threads: int) -> np.ndarray:
    """dequantize(quantize(w)): the values a GGUF would hold."""
    from . import formats

    return formats.dequantize(formats.quantize(w, type_name, importance=importance, threads=threads),
                              type_name, w.shape)


def _layer_sweep(src, info, measurer: _Measurer, imatrix: Any, types: list[str], qthreads: int,
                 progress: bool) -> list[LayerResult]:
    """Each block's quantizable tensors at each type (shape fallbacks as llama.cpp), all else float32."""
    from tqdm import tqdm

    from .plan import allows_quantization, fallback_type

    blocks: dict[int, list[Any]] = {}
    for t in info.tensors:
        il = layer_of(t.name)
        if il is not None and t.name in measurer.params and allows_quantization(t, info.arch):
            blocks.setdefault(il, []).append(t)
    out = []
    with tqdm(total=len(blocks) * len(types), desc="layer sweep", unit="rerun", disable=not progress,
              file=sys.stderr) as bar:
        for il in sorted(blocks):
            ws = {t.name: np.ascontiguousarray(src.tensor(t.name), dtype=np.float32).reshape(-1, t.shape[-1])
                  for t in blocks[il]}
            for typ in types:
                try:
                    used = {t.name: fallback_type(typ, t.shape[-1]) for t in blocks[il]}
                except ValueError as exc:
                    raise MixquantError(f"layer sweep: {exc}") from None
                swaps = {t.name: _roundtrip(ws[t.name], used[t.name], _importance(imatrix, t.name), qthreads)
                         .reshape(t.shape) for t in blocks[il]}
                kld, nll = measurer.measure(swaps)
                out.append(LayerResult(layer=il, type=typ, kld=kld, ppl=math.exp(nll),
                                       delta_ppl=math.expm1(nll - measurer.runner.ref_nll), types_used=used))
                bar.update(1)
    return out


def _bytes(type_name: str, shape: tuple[int, ...]) -> int:
    from .plan import tensor_bytes

    return tensor_bytes(type_name, shape)


def _imatrix_note(imatrix: Any) -> Any:
    if imatrix is None:
        return None
    if hasattr(imatrix, "chunks"):
        return {"chunks": getattr(imatrix, "chunks", None), "chunk_size": getattr(imatrix, "chunk_size", None),
                "datasets": list(getattr(imatrix, "datasets", []) or []), "tensors": len(getattr(imatrix, "sums", {}))}
    return {"tensors": len(imatrix)}



def _setup_measurer(src, info, text, windows, n_windows, ctx, score_from, settings) -> _Measurer:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .source import quiet_transformers
    from .text import read_text

    folder = getattr(src, "hf_folder", None)
    if folder is None:
        raise MixquantError(f"{src.path}: measuring damage needs the model's Hugging Face folder "
                            "(the float32 model runs in transformers); use measure='none' for a GGUF source")
    folder = Path(folder)
    if windows is None:
        if text is None:
            raise MixquantError("measuring damage needs the calibration text (text=...) or token windows")
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
            raise MixquantError(f"{folder}: cannot load the tokenizer: {exc}") from None
        windows = _held_out_windows(tokenizer, read_text(Path(text).expanduser()), ctx, n_windows)
        settings["text"] = str(text)
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < 8:
        raise MixquantError(f"windows must be (n, ctx) token ids with ctx >= 8, got shape {tuple(windows.shape)}")
    n, t = windows.shape
    first = t // 8 if score_from is None else int(score_from)
    if not 0 <= first < t - 1:
        raise MixquantError(f"score_from must be in [0, {t - 2}], got {first}")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                         use_safetensors=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise MixquantError(f"{folder}: transformers cannot load the model: {exc}") from None
    model.eval()
    runner = _Runner(model, windows, first)
    settings.update(windows=int(n), ctx=int(t), score_from=first, tokens=runner.n_scored)
    return _Measurer(runner=runner, params=_map_parameters(model, info), info=info)
