"""The sensitivity data (schema "mixquant.sensitivity/2", see `mixquant.analyze`), the fitted
damage model and the rank correlations of cheap scores with measured damage."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..calibrate import Distribution
from ..errors import MixquantError

if TYPE_CHECKING:
    from ..plan import ModelInfo

SCHEMA = "mixquant.sensitivity/2"
_READABLE = (SCHEMA, "mixquant.sensitivity/1")  # /1: the same without fisher, reference, layer_sweep

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
    from .. import formats

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
        for names in self._by_category().values():
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

    def check_model(self, model: ModelInfo, where: str = "sensitivity") -> None:
        """A one-line MixquantError unless this sensitivity was measured on `model`: the same
        tensors with the same shapes."""
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
        from ..text import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Sensitivity":
        from ..text import read_json

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
    from ..plan import category

    return category(name).value


def _type_order(t: str) -> tuple[float, str]:
    from .. import formats

    try:
        return formats.get(t).bits_per_weight, t
    except ValueError:
        return 99.0, t


# --------------------------------------------------------------------------------------------
# predicted error


def candidate_types(shape: tuple[int, ...], types: Iterable[str] | None = None) -> list[str]:
    """The types (of `types`, default every mixquant format) whose block divides the row length."""
    from .. import formats

    names = list(formats.FORMATS) if types is None else [formats.get(t).name for t in types]
    cols = int(shape[-1])
    return [t for t in dict.fromkeys(names) if cols % formats.get(t).block_size == 0]


class ErrorSums:
    """The sums behind `predicted_error`, added a slice of rows at a time, in float64: per input
    column (and per expert of a stack) sum (w - q)^2 and sum w^2; or, with the input's Hessian,
    tr(D H D^T) and tr(W H W^T). Slices that are whole multiples of `step` rows give the same sums,
    bit for bit, as the whole tensor at once."""

    def __init__(self, cols: int, groups: int = 1, hessian: np.ndarray | None = None):
        self.cols, self.groups = cols, groups
        self.hessian = None if hessian is None else np.asarray(hessian, dtype=np.float64)
        shape = () if hessian is not None else (groups, cols)
        self.err, self.ref = np.zeros(shape), np.zeros(shape)
        self.step = max(1, (1 << 20) // (groups * cols))  # about 8 MB of float64 per slice

    def add(self, w: np.ndarray, q: np.ndarray) -> None:
        w3 = w.reshape(self.groups, -1, self.cols)
        q3 = q.reshape(w3.shape)
        for s in range(0, w3.shape[1], self.step):
            a = w3[:, s:s + self.step].astype(np.float64)
            d = q3[:, s:s + self.step].astype(np.float64) - a
            if self.hessian is None:
                self.err += np.einsum("gij,gij->gj", d, d)
                self.ref += np.einsum("gij,gij->gj", a, a)
            else:
                self.err += float(np.einsum("gij,gij->", d @ self.hessian, d))
                self.ref += float(np.einsum("gij,gij->", a @ self.hessian, a))

    def value(self, importance: np.ndarray | None) -> float:
        if self.hessian is not None:
            err, ref = float(self.err), float(self.ref)
        elif importance is not None:
            imp = np.asarray(importance, dtype=np.float64).reshape(-1)
            err, ref = self.err.reshape(-1) @ imp, self.ref.reshape(-1) @ imp
        else:
            err, ref = self.err.sum(), self.ref.sum()
        return float(err / ref) if ref > 0 else 0.0


def predicted_error(w: np.ndarray, q: np.ndarray, importance: np.ndarray | None,
                    hessian: np.ndarray | None = None) -> float:
    """sum_ij imp_j (w_ij - q_ij)^2 / sum_ij imp_j w_ij^2 (imp all ones when None), in float64;
    an importance of n vectors (a stack of n experts) weighs each expert's rows with its own.
    Summed over slices of rows, so the float64 temporaries stay small next to a large tensor.

    With `hessian` (the input's H = sum x x^T, (cols, cols)), the H-weighted error instead:
    tr((W - Q) H (W - Q)^T) / tr(W H W^T), the output error relative to the output's energy. It
    is the same number for a diagonal H = rows x imatrix, and the one GPTQ's rounding lowers (its
    errors are correlated across columns, which the diagonal cannot see)."""
    groups = 1 if importance is None or hessian is not None else max(1, np.size(importance) // w.shape[-1])
    sums = ErrorSums(w.shape[-1], groups, hessian)
    sums.add(w, q)
    return sums.value(importance)


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
    return {"kind": kind, "pairs": len(everything), "rho": spearman(everything),
            "per_type": {typ: {"pairs": len(v), "rho": spearman(v)}
                         for typ, v in sorted(pairs.items(), key=lambda kv: _type_order(kv[0]))}}


def spearman(xy: list[tuple[float, float]]) -> float | None:
    """Spearman rank correlation of (x, y) pairs (ties share their mean rank); None for under 2."""
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

