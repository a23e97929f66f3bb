"""report.html: the analysis as a person reads it, with PNG plots beside it.

    write_report("analysis", sens, activations=acts, source=src, timings=stage_seconds)

Reads only the typed results of the earlier stages (`analyze.Sensitivity`, whose tensors carry
their weight statistics, and `calibrate.ActivationStats`) and, for the weight
histograms of the most and least sensitive tensors, their values from the source. Writes
`report.html` and `plots/*.png` into the output folder, each through a temporary file renamed into
place. Every sentence of findings in the report is computed from the numbers it shows.
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import MixquantError
from .files import atomic_output, write_text

__all__ = ["write_report", "KINDS"]

# the columns of the heat maps: the linear layers of a transformer block, in execution order
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_FLOAT_TYPES = ("F32", "F16", "BF16")
_TOP = 12  # rows in the ranking tables
_MIN_RANKED = 5  # a rank correlation over fewer pairs says nothing


def _layer_kind(name: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    return (int(m.group(1)), m.group(2)) if m and m.group(2) in KINDS else None


def _type_order(types: Iterable[str]) -> list[str]:
    from . import formats

    return sorted(set(types), key=lambda t: (formats.get(t).bits_per_weight, t))


def _quant_types(sens) -> list[str]:
    return _type_order({typ for t in sens.tensors.values() if not t.fixed for typ in t.types
                        if typ not in _FLOAT_TYPES})


# --------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    plt = _pyplot()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return f"plots/{path.name}"


def _heatmaps(sens, plots: Path) -> str | None:
    """log10 damage of quantizing one tensor, blocks x kinds, one panel per type; types that fit
    only some kinds (256-blocks on rows that are not multiples of 256) share one panel per set of
    kinds, with the types as columns. Dots mark measured cells."""
    from matplotlib.colors import Normalize

    plt = _pyplot()
    n_layer = int(sens.model.get("n_layer") or 0)
    if not n_layer:
        return None
    cells: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # type -> kind -> (log damage, measured)
    for typ in _quant_types(sens):
        for name, t in sens.tensors.items():
            lk = _layer_kind(name)
            if lk is None or t.fixed or typ not in t.types or lk[0] >= n_layer:
                continue
            col = cells.setdefault(typ, {}).setdefault(lk[1], (np.full(n_layer, np.nan), np.zeros(n_layer, bool)))
            col[0][lk[0]] = math.log10(max(sens.damage(name, typ), 1e-9))
            col[1][lk[0]] = t.types[typ].measured is not None
    if not cells:
        return None
    panels: list[tuple[str, list[str], list[tuple[np.ndarray, np.ndarray]]]] = []  # title, column labels, columns
    partial: dict[tuple[str, ...], list[str]] = {}
    for typ, by_kind in cells.items():
        kinds = tuple(k for k in KINDS if k in by_kind)
        if len(kinds) == len(KINDS):
            panels.append((typ, [k.replace("attn_", "a.").replace("ffn_", "f.") for k in KINDS],
                           [by_kind[k] for k in KINDS]))
        else:
            partial.setdefault(kinds, []).append(typ)
    for kinds, typs in partial.items():
        panels.append((" + ".join(kinds) + " only", [f"{t} {k}" if len(kinds) > 1 else t for t in typs for k in kinds],
                       [cells[t][k] for t in typs for k in kinds]))
    values = np.concatenate([c[0][np.isfinite(c[0])] for _, _, cols in panels for c in cols])
    norm = Normalize(vmin=float(np.percentile(values, 1)), vmax=float(values.max()))
    n_cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols + 1, 0.15 * n_layer * n_rows + 1.4), dpi=110,
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("magma_r")
    image = None
    for ax, (title, labels, cols) in zip(axes.flat, panels):
        grid = np.stack([c[0] for c in cols], axis=1)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ys, xs = np.nonzero(np.stack([c[1] for c in cols], axis=1))
        ax.scatter(xs, ys, s=3, c="cyan", marker="o", linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_yticks(range(0, n_layer, max(1, n_layer // 10)))
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("block", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="log10 damage (KLD nats/token)")
    fig.suptitle("Damage of quantizing one tensor to each type (cyan dot: measured, else fitted)", fontsize=10)
    return _save(fig, plots / "heatmap.png")


def _scatter(sens, plots: Path) -> str | None:
    """Cheap scores (predicted error; Fisher when computed) against measured KLD, log-log."""
    plt = _pyplot()
    kinds = [k for k in ("predicted", "fisher") if _pairs(sens, k)[0].size]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), dpi=110, squeeze=False)
    types = _quant_types(sens)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes.flat, kinds):
        x, y, typs = _pairs(sens, kind)
        for i, typ in enumerate(types):
            sel = typs == typ
            if sel.any():
                ax.scatter(x[sel], y[sel], s=7, alpha=0.7, color=cmap(i / max(1, len(types) - 1)), label=typ)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("importance-weighted relative error" if kind == "predicted" else
                      "Fisher estimate 0.5 sum F (w-q)^2 (nats/token)")
        ax.set_ylabel("measured KLD (nats/token)")
        if kind == "fisher":
            lo, hi = max(min(x.min(), y.min()), 1e-9), max(x.max(), y.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, ncol=2, markerscale=2)
    fig.suptitle("Predicted versus measured damage, one point per measured (tensor, type)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plots / "predicted_vs_measured.png")


def _layer_sweep_plot(sens, plots: Path) -> str | None:
    sweep = list(getattr(sens, "layer_sweep", None) or [])
    if not sweep:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for typ in dict.fromkeys(r.type for r in sweep):
        rs = sorted((r for r in sweep if r.type == typ), key=lambda r: r.layer)
        axes[0].plot([r.layer for r in rs], [100 * r.delta_ppl for r in rs], marker="o", ms=3, label=typ)
        axes[1].plot([r.layer for r in rs], [r.kld for r in rs], marker="o", ms=3, label=typ)
    axes[0].set_ylabel("perplexity increase (%)")
    axes[1].set_ylabel("mean KLD (nats/token)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("block quantized (all others float32)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Layer-by-layer sweep: one block at a time", fontsize=10)
    fig.tight_layout()
    return _save(fig, plots / "layer_sweep.png")


def _residual_plot(activations, plots: Path) -> str | None:
    rows = _residual_rows(activations)
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), dpi=110)
    layers = [layer for layer, _ in rows]
    for ax, (label, get) in zip(axes, (("max |x|", lambda s: s.dist.absmax),
                                       ("kurtosis", lambda s: s.dist.kurtosis),
                                       ("dynamic range (max / median channel absmax)", lambda s: s.dynamic_range))):
        ax.plot(layers, [get(s) for _, s in rows], marker="o", ms=3)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Residual stream leaving each block", fontsize=10)
    fig.tight_layout()
    return _save(fig, plots / "residual_stream.png")


def _histograms(sens, activations, source, extremes: list[tuple[str, str]], plots: Path) -> str | None:
    """Weight values and input activations of the most and least sensitive tensors (log counts)."""
    from .calibrate import input_of

    panels = []
    for label, name in extremes:
        act = None
        if activations is not None:
            act = activations.stats.get(input_of(name, bool(sens.model.get("tied_output"))))
        w = None
        if source is not None:
            w = np.asarray(source.tensor(name), dtype=np.float32).ravel()
        panels.append((label, name, w, act))
    if not any(w is not None or a is not None for _, _, w, a in panels):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 2.4 * len(panels)), dpi=110, squeeze=False)
    for (label, name, w, act), (axw, axa) in zip(panels, axes):
        if w is not None:
            axw.hist(w, bins=200, color="tab:blue", log=True)
            sd = float(w.std())
            axw.axvline(6 * sd, color="r", lw=0.7)
            axw.axvline(-6 * sd, color="r", lw=0.7)
        axw.set_title(f"{label}: {name} weights (red: ±6σ)", fontsize=8)
        if act is not None:
            edges = np.asarray(act.dist.hist_edges, dtype=np.float64)
            counts = np.asarray(act.dist.hist_counts, dtype=np.float64)
            n = min(len(edges) - 1, len(counts))
            axa.stairs(np.maximum(counts[:n], 0.5), edges[: n + 1], fill=True, color="tab:orange")
            axa.set_yscale("log")
            axa.axvline(act.dist.mean + 6 * act.dist.std, color="r", lw=0.7)
            axa.axvline(act.dist.mean - 6 * act.dist.std, color="r", lw=0.7)
            axa.set_title("input activations (red: ±6σ)", fontsize=8)
        else:
            axa.axis("off")
    fig.tight_layout()
    return _save(fig, plots / "histograms.png")


# --------------------------------------------------------------------------------------------
# numbers


def _pairs(sens, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, measured, type) arrays of `analyze.scored_pairs`, positive ones only (log axes)."""
    from .analyze import scored_pairs

    kept = [(score, measured, typ) for typ, score, measured in scored_pairs(sens, kind) if score > 0 and measured > 0]
    xs, ys, ts = zip(*kept) if kept else ((), (), ())
    return np.array(xs), np.array(ys), np.array(ts, dtype=object)


def _ranking(sens, typ: str) -> list[tuple[str, float, bool]]:
    """(tensor, damage, measured?) for every tensor analysed at `typ`, most damaging first."""
    out = [(n, sens.damage(n, typ), t.types[typ].measured is not None)
           for n, t in sens.tensors.items() if not t.fixed and typ in t.types]
    return sorted(out, key=lambda r: -r[1])


def _residual_rows(activations) -> list[tuple[int, Any]]:
    if activations is None:
        return []
    rows = []
    for key, s in activations.stats.items():
        m = re.fullmatch(r"blk\.(\d+)\.residual", key)
        if m:
            rows.append((int(m.group(1)), s))
    return sorted(rows, key=lambda r: r[0])


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _act_rows(items: list[tuple[str, Any]]) -> list[list[str]]:
    rows = []
    for key, s in items:
        d = s.dist
        top = ", ".join(f"{c.channel}: {c.absmax:.3g} ({100 * c.fire_rate:.1f}%)" for c in s.top_channels[:4])
        rows.append([html.escape(key), _fmt(d.absmax), _fmt(d.mean), _fmt(d.std), _fmt(d.kurtosis, ".1f"),
                     _fmt(100 * d.outlier_fraction, ".2g") + "%", _fmt(s.dynamic_range, ".1f"), html.escape(top)])
    return rows


_ACT_HEADER = ["input", "max |x|", "mean", "std", "kurtosis", "> 6σ", "dynamic range",
               "top channels: absmax (fire rate > 6σ)"]


# --------------------------------------------------------------------------------------------
# the page


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } .finding { background: #f6f8fa; padding: 0.6em 1em; }
code { background: #f2f2f2; padding: 0 3px; } pre { font-size: 0.75em; overflow-x: auto; }
"""


def write_report(
    outdir: str | os.PathLike[str],
    sens: Any,
    *,
    activations: Any = None,
    source: Any = None,
    timings: Mapping[str, float] | None = None,
) -> Path:
    """Write `outdir/report.html` and its plots under `outdir/plots/`; return the report's path.

    sens: the `analyze.Sensitivity` (its tensors carry their weight statistics); activations:
    `calibrate.ActivationStats` or None; source: an open `source.Source` (for the weight
    histograms) or None; timings: {stage: seconds}, shown as given."""
    from .analyze import rank_correlation

    out = Path(outdir).expanduser()
    if not out.is_dir():
        raise MixquantError(f"{out}: output folder does not exist")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    types = _quant_types(sens)
    probe = next((t for t in sens.settings.get("probe_types") or [] if t in types), types[0] if types else None)
    parts: list[str] = []
    model = sens.model
    parts.append(f"<h1>mixquant analysis: {html.escape(Path(str(model.get('source', 'model'))).name)}</h1>")
    st = sens.settings
    parts.append(
        f"<p>{html.escape(str(model.get('arch', '?')))}, {model.get('n_layer', '?')} blocks, "
        f"{model.get('n_elements', 0):,} weights. Damage measured as the KL divergence of the next-token "
        f"distribution against float32 on {st.get('windows', '?')} held-out calibration windows of "
        f"{st.get('ctx', '?')} tokens ({st.get('tokens', '?')} scored tokens); "
        f"{st.get('measured_pairs', 0)} of {st.get('candidates', 0)} (tensor, type) pairs measured, "
        "the others fitted (see <code>sensitivity.json</code>).</p>")
    if timings:
        parts.append("<h2>Stage timings</h2>" + _table(["stage", "seconds"], [
            [html.escape(k), f"{v:.1f}"] for k, v in timings.items()]))

    # -- findings ----------------------------------------------------------------------------
    findings: list[str] = []
    corr = {k: rank_correlation(sens, kind=k) for k in ("predicted", "fisher")}
    for kind, label in (("predicted", "The cheap importance-weighted error"),
                        ("fisher", "The Fisher estimate (from gradients on the same held-out windows)")):
        c = corr[kind]
        if not c.get("pairs"):
            continue
        per_type = c.get("per_type") or {}
        within = [v["rho"] for v in per_type.values() if v.get("pairs", 0) >= _MIN_RANKED and v.get("rho") is not None]
        text = (f"{label} ranks the measured (tensor, type) pairs with Spearman ρ = {c['rho']:.3f} over "
                f"{c['pairs']} pairs")
        if within:
            text += (f"; across tensors within one type (the choice the allocator makes) ρ is "
                     f"{min(within):.2f} to {max(within):.2f} (median {float(np.median(within)):.2f}) over "
                     f"{len(within)} types")
        quality = c["rho"] if not within else float(np.median(within))
        text += ". It ranks tensors " + ("well" if quality >= 0.8 else "fairly" if quality >= 0.5 else "poorly") + "."
        findings.append(text)
    if any(c.get("pairs") for c in corr.values()):
        findings.append(f"The allocator uses the measured KLD where there is one and elsewhere the fitted "
                        f"scale x type factor x {'Fisher estimate' if sens.basis == 'fisher' else 'predicted error'}.")
    fit = st.get("fit") or {}
    if fit.get("pairs"):
        findings.append(
            f"The fitted damage model predicts {fit['pairs']} held-out measurements with a median error "
            f"of a factor {math.exp(fit['median_abs_log_ratio']):.2f} ({100 * fit['within_factor_2']:.0f}% "
            f"within a factor 2; without per-type factors {math.exp(fit['median_abs_log_ratio_without_type_factors']):.2f}).")
    ranking = _ranking(sens, probe) if probe else []
    if ranking:
        top = ", ".join(f"{html.escape(n)} ({d:.2g})" for n, d, _ in ranking[:5])
        findings.append(f"Most sensitive at {probe}: {top}.")
        by_kind: dict[str, list[float]] = {}
        for n, d, _ in ranking:
            lk = _layer_kind(n)
            if lk:
                by_kind.setdefault(lk[1], []).append(d)
        if by_kind:
            med = sorted(((float(np.median(v)), k) for k, v in by_kind.items()), reverse=True)
            findings.append(f"By kind (median damage at {probe}): " + ", ".join(f"{k} {v:.2g}" for v, k in med) + ".")
    sweep = list(getattr(sens, "layer_sweep", None) or [])
    for typ in dict.fromkeys(r.type for r in sweep):
        rs = sorted((r for r in sweep if r.type == typ), key=lambda r: -r.kld)
        top3 = [r.layer for r in rs[:3]]
        ends = {0, max(r.layer for r in rs)} & set(top3)
        ppl = [100 * r.delta_ppl for r in rs]
        findings.append(
            f"Layer sweep at {typ}: quantizing a single block costs {rs[-1].kld:.3g} to {rs[0].kld:.3g} nats/token "
            f"of KLD; the most sensitive blocks are {', '.join(map(str, top3))}"
            + (f" (block {' and '.join(map(str, sorted(ends)))} among them: the first and last blocks matter most, "
               "as on most models)" if ends else " (neither the first nor the last block, unlike most models)")
            + f". Perplexity moves by {min(ppl):+.2f}% to {max(ppl):+.2f}%; on {sens.settings.get('tokens', '?')} "
            "tokens that is noisier than the KLD.")
    res = _residual_rows(activations)
    if res:
        worst = max(res, key=lambda r: r[1].dist.absmax)
        findings.append(
            f"Residual stream: max |x| grows from {res[0][1].dist.absmax:.3g} after block {res[0][0]} to "
            f"{worst[1].dist.absmax:.3g} after block {worst[0]} (kurtosis {worst[1].dist.kurtosis:.0f}, "
            f"{100 * worst[1].dist.outlier_fraction:.2g}% of values beyond 6σ): the outlier channels that "
            "break per-tensor 8-bit activation scales.")
    if findings:
        parts.append("<h2>Findings</h2><div class='finding'><ul>" + "".join(f"<li>{f}</li>" for f in findings)
                     + "</ul></div>")

    # -- sensitivity ---------------------------------------------------------------------------
    img = _heatmaps(sens, plots)
    if img:
        parts.append(f"<h2>Sensitivity per tensor and type</h2><img src='{img}' alt='heat maps'>")
    img = _scatter(sens, plots)
    if img:
        rows = []
        for kind in ("predicted", "fisher"):
            c = corr[kind]
            if c.get("pairs"):
                per_type = c.get("per_type") or {}
                rows.append([kind, str(c["pairs"]), _fmt(c["rho"], ".3f")] + [
                    _fmt(per_type[t]["rho"], ".2f") if per_type.get(t, {}).get("pairs", 0) >= _MIN_RANKED else "–"
                    for t in types])
        parts.append("<h2>Predicted versus measured damage</h2><p>Spearman rank correlation with the measured KLD, "
                     f"over all measured pairs and per type (across tensors; – where fewer than {_MIN_RANKED} were measured):</p>"
                     + _table(["score", "pairs", "all"] + types, rows) + f"<img src='{img}' alt='scatter'>")
    if ranking:
        rows = [[html.escape(n), f"{d:.3g}" + ("" if m else " (fitted)")] for n, d, m in ranking[:_TOP]]
        rows += [["…", ""]] + [[html.escape(n), f"{d:.3g}" + ("" if m else " (fitted)")] for n, d, m in ranking[-4:]]
        parts.append(f"<h3>Most and least sensitive tensors at {probe}</h3>" + _table(["tensor", "KLD"], rows))
    img = _layer_sweep_plot(sens, plots)
    if img:
        ref = getattr(sens, "reference", None) or {}
        parts.append(f"<h2>Layer-by-layer sweep</h2><p>Float32 reference perplexity "
                     f"{_fmt(ref.get('ppl'), '.4f')} on the held-out windows.</p><img src='{img}' alt='sweep'>")

    # -- activations and weights ------------------------------------------------------------------
    if activations is not None:
        inputs = [(k, s) for k, s in activations.stats.items() if not k.endswith(".residual")]
        by_kurt = sorted(inputs, key=lambda kv: -kv[1].dist.kurtosis)[:_TOP]
        by_range = sorted(inputs, key=lambda kv: -kv[1].dynamic_range)[:_TOP]
        parts.append(f"<h2>Activation outliers</h2><p>{activations.chunks} calibration windows of "
                     f"{activations.ctx} tokens. Inputs of the linear layers, by kurtosis:</p>"
                     + _table(_ACT_HEADER, _act_rows(by_kurt))
                     + "<p>By dynamic range:</p>" + _table(_ACT_HEADER, _act_rows(by_range)))
        img = _residual_plot(activations, plots)
        if img:
            parts.append(f"<h3>Residual stream</h3><img src='{img}' alt='residual'>"
                         + _table(_ACT_HEADER, _act_rows([(f"blk.{i}.residual", s) for i, s in res])))
    weights = {n: t.weights for n, t in sens.tensors.items() if t.weights is not None}
    if weights:
        rows = [[html.escape(n), _fmt(d.absmax), _fmt(d.std), _fmt(d.kurtosis, ".1f"),
                 _fmt(100 * d.outlier_fraction, ".2g") + "%"]
                for n, d in sorted(weights.items(), key=lambda kv: -kv[1].kurtosis)[:_TOP]]
        parts.append("<h2>Weights</h2><p>Heaviest-tailed weight tensors (every tensor's statistics are in "
                     "<code>sensitivity.json</code>):</p>"
                     + _table(["tensor", "absmax", "std", "kurtosis", "> 6σ"], rows))
    if ranking:
        extremes = [("most sensitive", ranking[0][0]), ("least sensitive", ranking[-1][0])]
        img = _histograms(sens, activations, source, extremes, plots)
        if img:
            parts.append(f"<h3>Most and least sensitive tensors</h3><img src='{img}' alt='histograms'>")
    parts.append("<h2>All tensors</h2><details><summary>damage per tensor and type (* measured)</summary><pre>"
                 + html.escape(sens.table()) + "</pre></details>")

    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixquant analysis</title>"
            f"<style>{_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    return write_text(out / "report.html", page)
