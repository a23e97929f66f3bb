"""`mixquant actquant`: the whole study on one model, as one typed result.

    result = actquant("model/", text="eval.txt", calib="calib.txt")
    print(format_table(result)); write_actquant_report("out/", result)

Steps: the float32 reference on the evaluation text (cached by the Evaluator); one calibration
pass on the calibration text (static ranges, statistics); with `weights` a plan, the plan's
weights in place (its own row); one row per scheme; then, unless turned off, the per-input
sensitivity, the allocation curve and their rank correlation with the statistics.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MixquantError
from . import schemes as sc
from . import sensitivity as sn
from .runner import WEIGHT_MODES, ActivationRunner

__all__ = ["Row", "InputSummary", "ActQuantResult", "actquant", "format_table", "DEFAULT_TARGET_KLD"]

DEFAULT_TARGET_KLD = 0.01
DEFAULT_CHUNKS = 2
DEFAULT_CALIB_CHUNKS = 8
DEFAULT_SENSITIVITY_CHUNKS = 1


@dataclass
class Row:
    """One scheme's result. outlier_fraction: for static scales the share of input values clipped,
    for LLM.int8() the share of multiply-adds whose input column stayed in float; None otherwise."""

    scheme: str
    bits: int
    weights: str
    ppl: float
    kld: float
    kld_p99: float
    top1: float
    seconds: float
    outlier_fraction: float | None = None
    int8_gemm: bool = True  # its scales factor out of an integer dot product

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["outlier_fraction"] is None:
            del d["outlier_fraction"]
        return d


@dataclass
class InputSummary:
    """Calibration statistics of one input, and what the default static and LLM.int8() rows did to it."""

    key: str
    absmax: float
    kurtosis: float
    dynamic_range: float
    beyond_6sigma: float
    top_channel: int
    top_channel_absmax: float
    clipped_static: float | None = None  # share of values percentile-99.99-sym (else minmax-sym) clipped
    float_columns: float | None = None  # LLM.int8() at its default threshold


@dataclass
class ActQuantResult:
    model: str
    text: str
    calib: str
    ctx: int
    chunks: int
    calib_chunks: int
    bits: int
    weights: str
    ppl_ref: float
    rows: list[Row]
    inputs: list[InputSummary]
    worst: dict[str, Any]  # the input with the largest max |x|: channel max |x|, histogram
    sensitivity: list[sn.LayerSensitivity] = field(default_factory=list)
    sensitivity_scheme: str | None = None
    sensitivity_chunks: int | None = None
    curve: list[sn.CurvePoint] = field(default_factory=list)
    target_kld: float | None = None
    chosen: int | None = None  # float inputs the target needs (None: no measured point reaches it)
    correlations: dict[str, float | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "text": self.text, "calib": self.calib, "ctx": self.ctx, "chunks": self.chunks,
                "calib_chunks": self.calib_chunks, "bits": self.bits, "weights": self.weights,
                "ppl_ref": self.ppl_ref, "rows": [r.to_dict() for r in self.rows],
                "inputs": [asdict(i) for i in self.inputs], "worst": self.worst,
                "sensitivity": [s.to_dict() for s in self.sensitivity],
                "sensitivity_scheme": self.sensitivity_scheme, "sensitivity_chunks": self.sensitivity_chunks,
                "curve": [p.to_dict() for p in self.curve], "target_kld": self.target_kld, "chosen": self.chosen,
                "correlations": self.correlations, "timings": self.timings}

    def row(self, scheme: str) -> Row | None:
        return next((r for r in self.rows if r.scheme == scheme), None)


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr)


def _check_texts(text: Path, calib: Path) -> None:
    for p, what in ((text, "--text"), (calib, "--calib")):
        if not p.is_file():
            raise MixquantError(f"{p}: no such text file ({what})")
    if text.resolve() == calib.resolve() or text.read_bytes() == calib.read_bytes():
        raise MixquantError(f"{calib}: the calibration text must differ from the evaluation text")


def actquant(src: Any, text: str | Path, calib: str | Path, *, schemes: list[str] | None = None,
             weights: str = "none", bits: int = 8, ctx: int = 512, chunks: int = DEFAULT_CHUNKS,
             calib_chunks: int = DEFAULT_CALIB_CHUNKS, sensitivity: bool = True,
             sensitivity_scheme: str = "minmax-sym", sensitivity_chunks: int = DEFAULT_SENSITIVITY_CHUNKS,
             target_kld: float = DEFAULT_TARGET_KLD, imatrix: Any = None, threads: int | None = None,
             progress: bool = True, cache: str | Path | None = None) -> ActQuantResult:
    """Evaluate every scheme (default `schemes.DEFAULT_SCHEMES`) on `text` against float32, with
    static ranges from `calib`; see the module docstring. weights: "none", "per-channel-int8",
    "Q8_0" (rounded in the forward pass), a plan (a preset or type, quantized in memory with the
    GGUF codecs and `imatrix`) or a GGUF file of the model."""
    from ..evaluate import Evaluator, check_items
    from ..text import read_text, token_windows

    plan_list = [sc.parse_scheme(s) for s in (schemes or sc.DEFAULT_SCHEMES)]  # unknown names fail here
    sc.qmax(bits)
    sens_scheme = sc.parse_scheme(sensitivity_scheme)
    if chunks < 1 or calib_chunks < 1 or sensitivity_chunks < 1:
        raise MixquantError("chunks, calibration chunks and sensitivity chunks must be at least 1")
    text, calib = Path(text).expanduser(), Path(calib).expanduser()
    _check_texts(text, calib)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with Evaluator(src, text, ctx=ctx, chunks=chunks, threads=threads, progress=progress, cache=cache) as ev:
        is_plan = weights not in WEIGHT_MODES
        if is_plan:
            check_items([weights], ev.source.model, imatrix)
        try:
            calib_windows = token_windows(ev.tokenizer, read_text(calib), ctx, calib_chunks, add_bos=ev.add_bos)
        except MixquantError as exc:
            raise MixquantError(f"{calib}: {exc}") from None
        ref = ev.reference()
        ppl_ref = float(math.exp(ref.nll.mean()))
        timings["reference"] = time.perf_counter() - t0

        runner = ActivationRunner(ev, bits)
        t = time.perf_counter()
        runner.calibrate(calib_windows, progress)
        timings["calibration"] = time.perf_counter() - t
        _log(progress, f"calibration: {calib_windows.shape[0]} chunks of {ctx} tokens, {len(runner.keys)} inputs, "
                       f"{timings['calibration']:.1f} s")

        rows: list[Row] = []
        run_weights = weights
        if is_plan:
            r = ev.evaluate_item(weights, imatrix=imatrix)  # leaves the plan's (file's) weights in the model
            rows.append(Row(f"weights only ({weights})", bits, weights, r.ppl, r.kld_mean, r.kld_p99, r.top1,
                            r.seconds))
            run_weights = "plan"
        else:  # the weights' own share of the damage (LLM.int8() and SmoothQuant bring int8 weights)
            alone = weights if weights != "none" else (
                "per-channel-int8" if any(s.int8_weights for s in plan_list) else None)
            if alone:
                t = time.perf_counter()
                with runner.applied(None, alone):
                    r = ev.score(f"weights only ({alone})")
                rows.append(Row(f"weights only ({alone})", bits, alone, r.ppl, r.kld_mean, r.kld_p99, r.top1,
                                time.perf_counter() - t))
        tallies = {}
        for scheme in plan_list:
            if is_plan and scheme.kind == "smoothquant":
                _log(progress, f"{scheme.name}: skipped (SmoothQuant rescales weights before quantizing them; "
                               "a GGUF plan's are already quantized)")
                continue
            t = time.perf_counter()
            with runner.applied(scheme, run_weights) as tally:
                r = ev.score(scheme.name)
            tallies[scheme.name] = tally
            w = weights if weights != "none" else ("per-channel-int8" if scheme.int8_weights else "none")
            rows.append(Row(scheme.name, bits, w, r.ppl, r.kld_mean, r.kld_p99, r.top1, time.perf_counter() - t,
                            tally.fraction, int8_gemm=scheme.kind != "per-channel"))
            _log(progress, f"{scheme.name}: PPL {r.ppl:.4f}, mean KLD {r.kld_mean:.5f} ({rows[-1].seconds:.1f} s)")
        timings["schemes"] = sum(r.seconds for r in rows)

        inputs = _summaries(runner, tallies)
        worst_key = max(runner.keys, key=lambda k: max(-runner.stats[k].min, runner.stats[k].max))
        ws = runner.stats[worst_key]
        worst = {"key": worst_key, "channel_absmax": ws.stream.absmax.tolist(),
                 "hist_upper_edges": ws.hist.upper_edges().tolist(), "hist_negative": ws.hist.negative.tolist(),
                 "hist_positive": ws.hist.positive.tolist(), "min": ws.min, "max": ws.max}
        result = ActQuantResult(model=str(ev.folder), text=str(text), calib=str(calib), ctx=ctx, chunks=ev.n_chunks,
                                calib_chunks=int(calib_windows.shape[0]), bits=bits, weights=weights, ppl_ref=ppl_ref,
                                rows=rows, inputs=inputs, worst=worst, timings=timings)
        if sensitivity:
            t = time.perf_counter()
            n = min(sensitivity_chunks, ev.n_chunks)
            base = sn.incremental(runner, run_weights, ev.windows[:n])
            ranking = sn.measure_sensitivity(runner, sens_scheme, run_weights, None, progress, base=base)
            timings["sensitivity"] = time.perf_counter() - t
            t = time.perf_counter()
            curve = sn.allocation_curve(runner, sens_scheme, run_weights, ranking, None, base=base)
            del base
            timings["allocation curve"] = time.perf_counter() - t
            best = sn.smallest_for(curve, target_kld)
            result.sensitivity, result.curve = ranking, curve
            result.sensitivity_scheme, result.sensitivity_chunks = sens_scheme.name, n
            result.target_kld, result.chosen = target_kld, (best.float_inputs if best else None)
            result.correlations = sn.correlations(ranking)
    timings["total"] = time.perf_counter() - t0
    return result


def _summaries(runner: ActivationRunner, tallies: dict) -> list[InputSummary]:
    clipped = tallies.get("percentile-99.99-sym") or tallies.get("minmax-sym")
    int8 = tallies.get(f"llm.int8-{sc.LLM_INT8_THRESHOLD:g}")

    def share(tally, key: str) -> float | None:
        hits, total = tally.per_key.get(key, (0.0, 0.0)) if tally is not None else (0.0, 0.0)
        return hits / total if total else None

    out = []
    for key in runner.keys:
        a = runner.stats[key].stream.activation_stat(top=1)
        top = a.top_channels[0]
        out.append(InputSummary(key, a.dist.absmax, a.dist.kurtosis, a.dynamic_range, a.dist.outlier_fraction,
                                top.channel, top.absmax, share(clipped, key), share(int8, key)))
    return out


def format_table(result: ActQuantResult) -> str:
    """The fixed-width table, then the allocation in one line."""
    w = max(26, *(len(r.scheme) + 2 for r in result.rows))
    head = (f"{'scheme':<{w}} {'bits':>4}  {'weights':<17} {'PPL':>9} {'mean KLD':>10} {'p99 KLD':>9} "
            f"{'top-1':>7} {'outliers':>9} {'seconds':>8}")
    lines = [(f"reference (float32): PPL {result.ppl_ref:.4f} on {result.chunks} chunks of {result.ctx} tokens; "
              f"static ranges from {result.calib_chunks} chunks of {Path(result.calib).name}"), head, "-" * len(head)]
    for r in result.rows:
        out = "" if r.outlier_fraction is None else f"{100 * r.outlier_fraction:.3g}%"
        mark = "" if r.int8_gemm else " *"
        lines.append(f"{r.scheme + mark:<{w}} {r.bits:>4}  {r.weights:<17} {r.ppl:9.4f} {r.kld:10.6f} {r.kld_p99:9.5f} "
                     f"{100 * r.top1:6.2f}% {out:>9} {r.seconds:8.1f}")
    lines.append("outliers: static scales: values clipped; llm.int8: multiply-adds left in float (the extra "
                  "cost)")
    if any(not r.int8_gemm for r in result.rows):
        lines.append("* per-channel scales sit on the reduced axis: a real int8 GEMM cannot apply them")
    if result.sensitivity:
        worst = ", ".join(f"{s.key} {s.kld:.4g}" for s in result.sensitivity[:3])
        rho = ", ".join(f"{k} {_rho(v)}" for k, v in result.correlations.items())
        lines.append(f"sensitivity ({result.sensitivity_scheme}, one input at a time, KLD against float activations, "
                     f"{result.sensitivity_chunks} chunk(s)): worst {worst}; Spearman rho with {rho}")
        curve = ", ".join(f"{p.float_inputs}: {p.kld:.4g}" for p in result.curve)
        lines.append(f"KLD with the k worst inputs in float: {curve}")
        if result.chosen is None:
            lines.append(f"target KLD {result.target_kld:g}: not reached even with every input in float")
        else:
            lines.append(f"target KLD {result.target_kld:g}: {result.chosen} of {len(result.sensitivity)} inputs "
                         "in float")
    return "\n".join(lines)


def _rho(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:+.2f}"
