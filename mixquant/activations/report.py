"""The activation page: `actquant.html` (+ `actquant.json`, `plots/act_*.png`) from an
`ActQuantResult`, and `activation_section(result, plots)`, the same content as an HTML fragment
for `mixquant analyze --actquant` to put into report.html. Every finding is computed from the
numbers shown; the page reuses report.py's table, plot saving and style."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import MixquantError
from ..files import write_text
from ..report import _STYLE, _fmt, _pyplot, _save, _table
from . import schemes as sc
from .sensitivity import top_share
from .study import ActQuantResult

__all__ = ["activation_section", "write_actquant_report", "findings"]

_KIND_ORDER = ("attn_in", "attn_output_in", "ffn_in", "ffn_down_in")


def _block_kind(key: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", key)
    return (int(m.group(1)), m.group(2)) if m else None


def _rows_of(result: ActQuantResult, kind: str) -> list:
    return [r for r in result.rows if r.scheme.startswith(kind)]


# --------------------------------------------------------------------------------------------
# findings


def findings(result: ActQuantResult) -> list[str]:
    """Sentences computed from the result's numbers."""
    out: list[str] = []
    row = result.row
    base, tok, blk = row("minmax-sym"), row("per-token"), row("block32")
    if base:
        text = (f"Per-tensor static scales from the calibration min/max ({result.bits}-bit, symmetric) cost "
                f"{base.kld:.4g} nats/token of KLD (PPL {base.ppl:.3f} against {result.ppl_ref:.3f}, top-1 "
                f"{100 * base.top1:.1f}%)")
        if tok:
            text += f"; dynamic per-token scales {tok.kld:.4g} ({_ratio(base.kld, tok.kld)})"
        if blk:
            text += (f"; per-token scales over blocks of 32 channels, as llama.cpp's CPU backend uses, "
                     f"{blk.kld:.4g} ({_ratio(base.kld, blk.kld)})")
        out.append(text + ".")
    static = [r for r in result.rows if re.match(r"(minmax|percentile|mse)-", r.scheme)]
    clipped = [r for r in static if r.scheme.startswith("percentile")]
    if base and clipped and max(r.kld for r in clipped) > base.kld:
        worst = max(clipped, key=lambda r: r.kld)
        out.append(f"Clipping at a percentile is worse than min/max here, up to {worst.kld:.3g} ({worst.scheme}, "
                   f"{100 * (worst.outlier_fraction or 0):.2g}% of values clipped): the few outliers it cuts carry "
                   "information the model needs.")
    if len(static) > 1:
        best = min(static, key=lambda r: r.kld)
        out.append(f"Of the per-tensor static scales, {best.scheme} is best ({best.kld:.4g}, "
                   f"{_fmt(100 * (best.outlier_fraction or 0), '.3g')}% of values clipped)." if best.scheme != "minmax-sym" else
                   f"Of the per-tensor static scales, minmax-sym is best ({best.kld:.4g}): clipping does not pay here.")
    w = result.worst
    if w:
        absmax = np.asarray(w["channel_absmax"])
        top = int(np.argmax(absmax))
        amax = max(-w["min"], w["max"])
        step = amax / sc.qmax(result.bits)
        edges = np.asarray(w["hist_upper_edges"])
        counts = np.asarray(w["hist_negative"]) + np.asarray(w["hist_positive"])
        below = float(counts[edges <= step / 2].sum() / counts.sum()) if counts.sum() else float("nan")
        out.append(f"The widest input is {w['key']}: max |x| {amax:.4g} on channel {top}, against a median "
                   f"channel max of {float(np.median(absmax)):.3g}. A per-tensor {result.bits}-bit grid spanning it "
                   f"has a step of {step:.3g}: all but {100 * (1 - below):.2g}% of its values round to zero.")
    int8 = sorted(_rows_of(result, "llm.int8"), key=lambda r: sc.parse_scheme(r.scheme).threshold)
    if int8:
        d = next((r for r in int8 if r.scheme == f"llm.int8-{sc.LLM_INT8_THRESHOLD:g}"), int8[0])
        out.append(f"LLM.int8() at threshold {sc.parse_scheme(d.scheme).threshold:g} keeps "
                   f"{100 * (d.outlier_fraction or 0):.3g}% of the multiply-adds in float (its extra cost) and reaches "
                   f"KLD {d.kld:.4g}" + (f" ({_ratio(base.kld, d.kld)} against min/max int8)" if base else "")
                   + "; over the threshold sweep the KLD runs from " + ", ".join(
                       f"{r.kld:.3g} at {sc.parse_scheme(r.scheme).threshold:g} ({100 * (r.outlier_fraction or 0):.2g}% float)"
                       for r in int8) + ".")
    smooth = sorted((r for r in _rows_of(result, "smoothquant") if not r.scheme.endswith("per-token")),
                    key=lambda r: sc.parse_scheme(r.scheme).alpha)
    if smooth:
        best = min(smooth, key=lambda r: r.kld)
        text = (f"SmoothQuant (per-tensor static activations after smoothing, int8 weights) is best at alpha "
                f"{sc.parse_scheme(best.scheme).alpha:g} with KLD {best.kld:.4g}")
        if base:
            text += f" ({_ratio(base.kld, best.kld)} against min/max int8 without smoothing)"
        out.append(text + "; alpha " + ", ".join(f"{sc.parse_scheme(r.scheme).alpha:g}: {r.kld:.3g}" for r in smooth) + ".")
    if result.sensitivity:
        s = result.sensitivity
        out.append(f"One input at a time ({result.sensitivity_scheme}), {s[0].key} does the most damage "
                   f"({s[0].kld:.3g}, {100 * top_share(s):.0f}% of the summed single-input damage), then "
                   + ", ".join(f"{x.key} ({x.kld:.3g})" for x in s[1:3]) + ".")
        rho = {k: v for k, v in result.correlations.items() if v is not None}
        if rho:
            best_stat = max(rho, key=lambda k: abs(rho[k]))
            out.append("Rank correlation of the measured damage with the calibration statistics (Spearman): "
                       + ", ".join(f"{k.replace('_', ' ')} {v:+.2f}" for k, v in rho.items())
                       + f"; {best_stat.replace('_', ' ')} predicts it "
                       + ("well" if abs(rho[best_stat]) >= 0.8 else "fairly" if abs(rho[best_stat]) >= 0.5 else "poorly") + ".")
        if result.curve:
            all_q, none_q = result.curve[0], result.curve[-1]
            if result.chosen is None:
                out.append(f"No measured allocation reaches KLD {result.target_kld:g}: with every input quantized "
                           f"{all_q.kld:.3g}, with all {none_q.float_inputs} in float {none_q.kld:.3g}.")
            else:
                p = next(p for p in result.curve if p.float_inputs == result.chosen)
                out.append(f"Keeping the {result.chosen} most sensitive of {len(s)} inputs in full precision brings "
                           f"the KLD from {all_q.kld:.3g} to {p.kld:.3g}, under the target {result.target_kld:g}.")
    return out


def _ratio(a: float, b: float) -> str:
    if not (a > 0 and b > 0):
        return "–"
    return f"{a / b:.3g}x less" if a >= b else f"{b / a:.3g}x more"


# --------------------------------------------------------------------------------------------
# plots


def _layers_plot(result: ActQuantResult, plots: Path) -> str | None:
    by_kind: dict[str, list[tuple[int, object]]] = {}
    for i in result.inputs:
        bk = _block_kind(i.key)
        if bk:
            by_kind.setdefault(bk[1], []).append((bk[0], i))
    if not by_kind:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True)
    for n, kind in enumerate(k for k in _KIND_ORDER if k in by_kind):
        pts = sorted(by_kind[kind], key=lambda t: t[0])
        blocks = [b for b, _ in pts]
        color = f"C{n}"
        a1.plot(blocks, [i.absmax for _, i in pts], marker="o", ms=3, color=color, label=kind)
        a2.plot(blocks, [max(i.beyond_6sigma, 1e-7) for _, i in pts], marker="o", ms=3, color=color,
                label=f"{kind}: > 6σ")
        if any(i.float_columns for _, i in pts):
            a2.plot(blocks, [max(i.float_columns or 0, 1e-7) for _, i in pts], ls="--", lw=1, color=color,
                    label=f"{kind}: llm.int8 float share")
    a1.set_yscale("log")
    a1.set_ylabel("max |x| (calibration)")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_yscale("log")
    a2.set_ylabel("outlier fraction")
    a2.set_xlabel("block")
    a2.legend(fontsize=6, ncol=2)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plots / "act_layers.png")


def _worst_plot(result: ActQuantResult, plots: Path) -> str | None:
    w = result.worst
    if not w:
        return None
    absmax = np.asarray(w["channel_absmax"])
    amax = max(-w["min"], w["max"])
    step = amax / sc.qmax(result.bits)
    thr = 6 * float(np.median(absmax))
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    outl = absmax > thr
    a1.scatter(np.flatnonzero(~outl), absmax[~outl], s=4, c="tab:blue", label="bulk channels")
    a1.scatter(np.flatnonzero(outl), absmax[outl], s=14, c="tab:red", label="outlier channels (> 6x median)")
    a1.axhline(step, color="k", ls=":", lw=1, label=f"int8 step of per-tensor min/max ({step:.3g})")
    a1.set_yscale("log")
    a1.set_xlabel("channel")
    a1.set_ylabel("max |x| per channel")
    a1.set_title(f"{w['key']}: channels", fontsize=9)
    a1.legend(fontsize=7)
    edges = np.asarray(w["hist_upper_edges"])
    counts = np.asarray(w["hist_negative"]) + np.asarray(w["hist_positive"])
    keep = counts > 0
    a2.step(edges[keep], counts[keep] / counts.sum(), where="pre", lw=1, label="|x| (calibration)")
    for k in range(1, 4):
        a2.axvline(k * step - step / 2 if k == 1 else k * step, color="k", ls=":", lw=0.8)
    a2.axvline(amax, color="tab:red", lw=1, label=f"max |x| {amax:.4g}")
    a2.axvline(step / 2, color="k", ls=":", lw=0.8, label="rounds to 0 below; grid levels 2, 3 x step")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("|x|")
    a2.set_ylabel("share of values per bin")
    a2.set_title("values against the per-tensor int8 grid", fontsize=9)
    a2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plots / "act_worst_input.png")


def _sweeps_plot(result: ActQuantResult, plots: Path) -> str | None:
    int8 = sorted(_rows_of(result, "llm.int8"), key=lambda r: sc.parse_scheme(r.scheme).threshold)
    smooth = sorted((r for r in _rows_of(result, "smoothquant") if not r.scheme.endswith("per-token")),
                    key=lambda r: sc.parse_scheme(r.scheme).alpha)
    if len(int8) < 2 and len(smooth) < 2:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    base = result.row("minmax-sym")
    if len(int8) >= 2:
        t = [sc.parse_scheme(r.scheme).threshold for r in int8]
        a1.plot(t, [r.kld for r in int8], marker="o", label="mean KLD")
        a1.set_xscale("log")
        a1.set_yscale("log")
        a1.set_xlabel("LLM.int8() threshold")
        a1.set_ylabel("mean KLD")
        tw = a1.twinx()
        tw.plot(t, [100 * (r.outlier_fraction or 0) for r in int8], color="tab:orange", marker="s", ms=3)
        tw.set_ylabel("multiply-adds in float (%)", color="tab:orange")
        if base:
            a1.axhline(base.kld, color="k", ls=":", lw=1, label="minmax-sym")
        a1.legend(fontsize=7)
        a1.set_title("LLM.int8() threshold sweep", fontsize=9)
    if len(smooth) >= 2:
        a = [sc.parse_scheme(r.scheme).alpha for r in smooth]
        a2.plot(a, [r.kld for r in smooth], marker="o", label="SmoothQuant (per-tensor static)")
        if base:
            a2.axhline(base.kld, color="k", ls=":", lw=1, label="minmax-sym, no smoothing")
        a2.set_yscale("log")
        a2.set_xlabel("alpha")
        a2.set_ylabel("mean KLD")
        a2.legend(fontsize=7)
        a2.set_title("SmoothQuant alpha sweep", fontsize=9)
    fig.tight_layout()
    return _save(fig, plots / "act_sweeps.png")


def _curve_plot(result: ActQuantResult, plots: Path) -> str | None:
    if not result.curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ks = [p.float_inputs for p in result.curve]
    ax.plot(ks, [max(p.kld, 1e-9) for p in result.curve], marker="o")
    ax.axhline(result.target_kld, color="tab:red", ls=":", lw=1, label=f"target {result.target_kld:g}")
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("inputs kept in full precision (most sensitive first)")
    ax.set_ylabel("mean KLD")
    ax.set_title(f"{result.sensitivity_scheme} on the other inputs", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, plots / "act_curve.png")


# --------------------------------------------------------------------------------------------
# the section and the page


def activation_section(result: ActQuantResult, plots: Path) -> str:
    """The activation section as HTML (plots written into `plots`, referenced as plots/NAME)."""
    plots.mkdir(parents=True, exist_ok=True)
    parts = [(f"<h2>Activation quantization</h2><p>{html.escape(Path(result.model).name)}: every decoder linear's "
              f"input fake-quantized to {result.bits} bits in the forward pass; KLD against float32 on "
              f"{result.chunks} windows of {result.ctx} tokens of {html.escape(Path(result.text).name)} (PPL "
              f"{result.ppl_ref:.4f}); static ranges from {result.calib_chunks} windows of "
              f"{html.escape(Path(result.calib).name)}.</p>")]
    f = findings(result)
    if f:
        parts.append("<h3>Findings</h3><div class='finding'><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in f)
                     + "</ul></div>")
    rows = [[html.escape(r.scheme) + ("" if r.int8_gemm else " *"), str(r.bits), html.escape(r.weights),
             f"{r.ppl:.4f}", f"{r.kld:.5f}", f"{r.kld_p99:.4f}", f"{100 * r.top1:.2f}%",
             "" if r.outlier_fraction is None else f"{100 * r.outlier_fraction:.3g}%", f"{r.seconds:.1f}"]
            for r in result.rows]
    parts.append(_table(["scheme", "bits", "weights", "PPL", "mean KLD", "p99 KLD", "top-1", "outliers", "seconds"],
                        rows)
                 + "<p>outliers: for static scales the share of values clipped, for LLM.int8() the share of "
                   "multiply-adds left in float (its extra cost). * per-channel scales sit on the reduced axis: "
                   "a real int8 GEMM cannot apply them.</p>")
    for title, fn, alt in (("Per layer: max |x| and outlier fraction", _layers_plot, "layers"),
                           ("The widest input against the int8 grid", _worst_plot, "worst input"),
                           ("Threshold and alpha sweeps", _sweeps_plot, "sweeps"),
                           ("KLD against the number of full-precision inputs", _curve_plot, "curve")):
        img = fn(result, plots)
        if img:
            parts.append(f"<h3>{title}</h3><img src='{img}' alt='{alt}'>")
    if result.sensitivity:
        rows = [[html.escape(s.key), f"{s.kld:.4g}", _fmt(s.absmax), _fmt(s.kurtosis, ".1f"), _fmt(s.dynamic_range, ".1f")]
                for s in result.sensitivity[:12]]
        rho = [[k.replace("_", " "), _fmt(v, "+.2f")] for k, v in result.correlations.items()]
        parts.append(f"<h3>Most sensitive inputs</h3><p>{html.escape(str(result.sensitivity_scheme))} on one input at a "
                     f"time, {result.sensitivity_chunks} window(s).</p>"
                     + _table(["input", "KLD", "max |x|", "kurtosis", "dynamic range"], rows)
                     + "<p>Spearman rank correlation with the measured damage:</p>" + _table(["statistic", "ρ"], rho))
    return "\n".join(parts)


def write_actquant_report(outdir: str | os.PathLike[str], result: ActQuantResult) -> Path:
    """Write outdir/actquant.html, outdir/actquant.json and outdir/plots/act_*.png; return the page."""
    out = Path(outdir).expanduser()
    if not out.is_dir():
        raise MixquantError(f"{out}: output folder does not exist")
    body = activation_section(result, out / "plots")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixquant actquant</title>"
            f"<style>{_STYLE}</style></head><body><h1>mixquant actquant</h1>{body}</body></html>\n")
    for name, text in (("actquant.json", json.dumps(result.to_dict(), indent=1)), ("actquant.html", page)):
        write_text(out / name, text)
    return out / "actquant.html"
