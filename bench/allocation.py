"""mixquant's allocation against llama.cpp's presets, at exactly the presets' sizes.

On a bundled test model (`--model`: smollm2, SmolLM2-135M, the default; or gemma3, Gemma 3 270M):

1. `mixquant analyze` (calibrate -> sensitivity, defaults: 64 calibration windows of 512 tokens,
   damage measured on windows held out from the end of the calibration text, Fisher basis) writes
   imatrix.gguf and sensitivity.json into `--analysis` (computed once; reuse a folder from
   `bench/analyze.py --out`). Its imatrix also holds the tied output/token embedding's importance
   (the final hidden state's mean square), which llama-imatrix never collects;
2. for each preset (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K; `plan.preset_plan` reproduces
   llama-quantize's choice), its tensor bytes are the budget of `allocate.allocate`;
3. the preset without and with the imatrix (llama-imatrix's part of it: every entry but the tied
   embedding's, so the preset gets exactly what llama-imatrix would give it) and mixquant's plan
   (with the whole imatrix) are evaluated by mixquant.evaluate on the held-out evaluation text
   (`--eval-chunks` windows of 512, the second half of each scored, as llama-perplexity);
4. with `--referee`, each plan is also written as a GGUF (export.write_gguf) and scored by
   llama.cpp's own llama-perplexity --kl-divergence against the F32 GGUF (`--referee-chunks`).

`--method gptq` (or `rtn,gptq` for both side by side): mixquant's plans are analysed with
`mixquant analyze --method gptq` (every candidate's damage measured with GPTQ's rounding, in
`<analysis>-gptq`) and written with it (`quantize --method gptq`, the analysis's Hessians and the
GPTQ options its sensitivity records); such a plan is evaluated from its written GGUF. The presets
stay llama.cpp's (llama-imatrix's imatrix).
`--method awq+gptq`: the plan allocated on that gptq analysis, then AWQ's scales searched for it and
the plan written with awq+gptq (as `quantize --target-* --method awq+gptq`).
`--analyze-args "--chunks 32"` passes settings to the analyses this bench runs.

Prints a table (size, bpw, PPL, mean/p99 KLD, top-1, and mixquant's KLD relative to the preset
with imatrix), writes results.json, the chosen plans, and kld_vs_bpw.png into `--out`.

Run: .venv/bin/python bench/allocation.py [--model gemma3] [--out bench-out] [--analysis DIR] [--threads 2] [--referee]
         [--method rtn,gptq] [--analyze-args "--chunks 32 --sweep-types ''"]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

PRESETS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")
# mixquant's method -> the analysis its allocation is made on (AWQ's scales depend on the plan: they
# are searched for the plan allocated on gptq's damages)
ANALYSED_WITH = {"rtn": "rtn", "gptq": "gptq", "awq+gptq": "gptq"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def analysis_folder(args, method: str) -> Path:
    return args.analysis if method == "rtn" else args.analysis.with_name(f"{args.analysis.name}-{method}")


def get_analysis(args, folder: Path, calib: Path, method: str = "rtn"):
    """(imatrix, sensitivity) from `mixquant analyze --method METHOD` in its analysis folder, run
    there first if missing."""
    import shlex

    from mixquant.analyze import Sensitivity
    from mixquant.calibrate import read_imatrix

    where = analysis_folder(args, method)
    if not (where / "sensitivity.json").is_file():
        start = time.perf_counter()
        # this checkout's mixquant (python -m), not whichever the console script points at
        subprocess.run([sys.executable, "-m", "mixquant.cli", "analyze", str(folder), "--text", str(calib),
                        "-o", str(where), "--method", method, *shlex.split(args.analyze_args),
                        *(["--threads", str(args.threads)] if args.threads else [])], check=True)
        log(f"analysis: {time.perf_counter() - start:.0f} s -> {where}")
    imatrix = read_imatrix(where / "imatrix.gguf")
    sens = Sensitivity.load(where / "sensitivity.json")
    measured = sens.settings.get("method", "rtn")
    if measured != method:
        raise SystemExit(f"{where}: analysed with --method {measured}, not {method}")
    log(f"analysis: {where} (imatrix {imatrix.chunks} chunks; {sens.settings['measured_pairs']} pairs "
        f"measured on {sens.settings['tokens']} tokens, basis {sens.basis}, {method} rounding)")
    return imatrix, sens


# ------------------------------------------------------------------------------------------------
# the referee: llama-perplexity --kl-divergence on written GGUF files


def _parse_perplexity(text: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else float("nan")

    return {
        "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"),
        "ppl_ref": grab(r"Mean PPL\(base\)\s*:\s*([0-9.]+)"),
        "kld_mean": grab(r"Mean\s+KLD:\s*([0-9.eE+-]+)"),
        "kld_p99": grab(r"99\.0%\s+KLD:\s*([0-9.eE+-]+)"),
        "top1": grab(r"Same top p:\s*([0-9.]+)") / 100.0,
    }


def write_plan(source, folder: Path, label: str, plan, imatrix, quantizer=None):
    """(path, WriteResult): the plan written as a GGUF (with `quantizer`'s rounding, e.g. gptq)."""
    from mixquant.export import write_gguf

    path = folder / (re.sub(r"[^A-Za-z0-9_.+-]+", "_", label) + ".gguf")
    if imatrix is not None and hasattr(imatrix, "as_dict"):
        imatrix = imatrix.as_dict()
    return path, write_gguf(source, plan, path, importance=imatrix, progress=False, quantizer=quantizer)


class Referee:
    def __init__(self, args, source, eval_text: Path):
        from mixquant.export import write_gguf
        from mixquant.plan import preset_plan
        from mixquant.reference import llama_tool

        self.args, self.source, self.text = args, source, eval_text
        self.exe = llama_tool("llama-perplexity")
        self.dir = args.out / "gguf"
        self.dir.mkdir(exist_ok=True)
        self.base = self.dir / f"f32-c512-chunks{args.referee_chunks}.kld"
        if not self.base.is_file():
            f32 = self.dir / "F32.gguf"
            write_gguf(source, preset_plan(source.model, "F32"), f32, progress=False, file_type="F32")
            self._run(["-m", str(f32), "--kl-divergence-base", str(self.base)])
            f32.unlink()
            log(f"referee: base logits {self.base}")

    def _run(self, extra: list[str]) -> str:
        cmd = [str(self.exe), "-f", str(self.text), "-c", "512", "--chunks", str(self.args.referee_chunks),
               "-t", str(self.args.threads or 2), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed: {done.stderr[-2000:]}")
        return done.stdout + done.stderr

    def score(self, label: str, plan, imatrix, quantizer=None) -> dict:
        path, res = write_plan(self.source, self.dir, label, plan, imatrix, quantizer)
        out = self.score_file(path)
        out.update(file_bytes=res.bytes, tensor_bytes=res.tensor_bytes)
        if not self.args.keep_gguf:
            path.unlink()
        return out

    def score_file(self, path: Path) -> dict:
        """llama-perplexity --kl-divergence of a written GGUF against the F32 base logits."""
        return _parse_perplexity(self._run(["-m", str(path), "--kl-divergence-base", str(self.base),
                                            "--kl-divergence"]))


# ------------------------------------------------------------------------------------------------


def plot(rows: list[dict], out: Path, with_referee: bool, model_name: str) -> Path:
    """Mean KLD (log) against bits per weight: one line per method, presets labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styles = {"preset": ("tab:gray", "s", "llama.cpp preset"),
              "preset+imatrix": ("tab:orange", "o", "llama.cpp preset + imatrix"),
              "mixquant": ("tab:blue", "D", "mixquant (same tensor bytes)"),
              "mixquant-gptq": ("tab:green", "^", "mixquant, gptq (same tensor bytes)"),
              "mixquant-awq+gptq": ("tab:purple", "v", "mixquant, awq+gptq (same tensor bytes)")}
    for kind, (color, marker, label) in styles.items():
        pts = sorted((r["bits_per_weight"], r["kld_mean"], r["preset"]) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
        if with_referee:
            ref = sorted((r["bits_per_weight"], r["referee"]["kld_mean"]) for r in rows if r["kind"] == kind)
            ax.plot([p[0] for p in ref], [p[1] for p in ref], marker=marker, color=color, ls=":", alpha=0.6,
                    label=f"{label}, llama-perplexity")
        if kind == "preset+imatrix":
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor data)")
    ax.set_ylabel("mean KL divergence vs float32")
    ax.set_title(f"{model_name}: mixquant allocation vs llama.cpp presets", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    from mixquant.testdata import TEST_MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(TEST_MODELS), default="smollm2", help="the bundled test model")
    p.add_argument("--out", type=Path, default=None, help="folder for the cached imatrix, sensitivity, "
                   "plans, results and plot (default: <mixquant cache>/bench/allocation, "
                   "allocation-<model> for another model than smollm2)")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--analysis", type=Path, help="a `mixquant analyze` output folder (default: <out>/analysis, "
                   "analysed there first if missing)")
    p.add_argument("--eval-chunks", type=int, default=8, help="evaluation windows of 512 tokens (default 8)")
    p.add_argument("--no-plain", action="store_true", help="skip the presets without imatrix")
    p.add_argument("--threads", type=int, default=None, help="torch/quantization threads (default: torch's)")
    p.add_argument("--referee", action="store_true", help="also score GGUF files with llama-perplexity")
    p.add_argument("--referee-chunks", type=int, default=40)
    p.add_argument("--keep-gguf", action="store_true")
    p.add_argument("--method", default="rtn", help="mixquant's rounding, analysed and written: rtn (default), gptq, "
                   "or rtn,gptq for both")
    p.add_argument("--analyze-args", default="", help="extra arguments for the `mixquant analyze` runs, e.g. "
                   "\"--chunks 32 --sweep-types ''\"")
    args = p.parse_args()
    if args.out is None:
        from mixquant.cache import cache_dir

        args.out = cache_dir() / "bench" / ("allocation" if args.model == "smollm2" else f"allocation-{args.model}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.analysis = args.analysis or args.out / "analysis"

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from mixquant.allocate import allocate
    from mixquant.evaluate import Evaluator, format_table
    from mixquant.plan import preset_plan
    from mixquant.source import open_source
    from mixquant.testdata import build_test_text

    bundled = TEST_MODELS[args.model]
    folder = bundled.build()
    calib, eval_text = build_test_text()
    source = open_source(folder)
    info = source.model

    mix_methods = args.method.split(",")
    if not set(mix_methods) <= set(ANALYSED_WITH):
        p.error(f"--method: a comma-separated list of {', '.join(ANALYSED_WITH)}, not {args.method}")
    analyses = {m: get_analysis(args, folder, calib, m) for m in dict.fromkeys(ANALYSED_WITH[m] for m in mix_methods)}
    imatrix, sens = analyses[ANALYSED_WITH[mix_methods[0]]]
    # what llama-imatrix collects of it (blk.* only): the presets get exactly that
    llama_imatrix = {name: v for name, v in imatrix.as_dict().items() if name.startswith("blk.")}
    fit = sens.fit_report()
    if fit.get("pairs"):
        log(f"fit check, {fit['pairs']} pairs on {fit['tensors']} tensors measured at 2+ types, each type predicted "
            f"from the first probe (type factors leave the tensor out): median "
            f"|log(fitted/measured)| {fit['median_abs_log_ratio']:.3f}, {100 * fit['within_factor_2']:.0f}% within "
            f"a factor 2 (scale only: {fit['median_abs_log_ratio_without_type_factors']:.3f}, "
            f"{100 * fit['within_factor_2_without_type_factors']:.0f}%)")
    # (kind, label prefix, sensitivity, importance, quantizer): what mixquant is run with
    methods = []
    gptq_options = {}  # kind -> GPTQ's options its analysis recorded: the bytes written are those measured
    for m in mix_methods:
        kind = "mixquant" if m == "rtn" else f"mixquant-{m}"
        imp, sn = analyses[ANALYSED_WITH[m]]
        # the quantizer: None (rtn), gptq's, or for awq+gptq the Hessians its scales are searched with
        quantizer = None
        if m != "rtn":
            from dataclasses import asdict

            from mixquant.hessians import Hessians
            from mixquant.quantize import GptqOptions, HessianQuantizer

            gptq_options[kind] = asdict(GptqOptions.recorded(sn.settings))
            quantizer = Hessians.load(analysis_folder(args, ANALYSED_WITH[m]) / "hessians.safetensors")
            if m == "gptq":
                quantizer = HessianQuantizer(quantizer, info, **gptq_options[kind], threads=args.threads or 1)
        methods.append((kind, kind, sn, imp, quantizer))

    referee = Referee(args, source, eval_text) if args.referee else None
    rows = []
    results = []
    presets = args.presets.split(",")
    with Evaluator(folder, eval_text, ctx=512, chunks=args.eval_chunks, threads=args.threads,
                   progress=False) as ev:
        ref = ev.reference()
        log(f"reference: PPL {ref.ppl:.4f} on {ev.n_chunks} chunks")
        for preset in presets:
            plan = preset_plan(info, preset, has_imatrix=True)
            budget = plan.total_bytes
            entries = []
            if not args.no_plain:
                entries.append((preset, "preset", plan, None, None, None))
            entries.append((f"{preset} +imatrix", "preset+imatrix", plan, llama_imatrix, None, None))
            for kind, prefix, sn, imp, quantizer in methods:
                alloc = allocate(sn, max_bytes=budget)
                log(f"{preset}: {budget:,} tensor bytes; {kind}: {alloc}")
                (args.out / f"plan-{kind}-{preset}.json").write_text(json.dumps(alloc.plan.types, indent=1))
                entries.append((f"{prefix}@{preset}", kind, alloc.plan, imp, alloc, quantizer))
            for label, kind, pl, im, alloc, quantizer in entries:
                if quantizer is None:
                    r = ev.evaluate_plan(pl, imatrix=im, label=label)
                    referee_row = None if referee is None else referee.score(label, pl, im)
                else:  # the in-memory evaluator rounds to nearest: evaluate the written file instead
                    tq = time.perf_counter()
                    written = source
                    if kind == "mixquant-awq+gptq":  # the scales searched for the allocated plan
                        from mixquant.quantize.awq import prepare

                        awq = prepare(source, dict(pl.types), quantizer, im.as_dict(), "awq+gptq",
                                      threads=args.threads or 2, gptq_options=gptq_options[kind])
                        log(f"  {label}: {awq.scales.summary()}")
                        written, im, quantizer = awq.source, awq.importance, awq.quantizer
                    path, res = write_plan(written, args.out, label, pl, im, quantizer)
                    log(f"  {label}: written with {kind} in {time.perf_counter() - tq:.0f} s")
                    r = ev.evaluate_gguf(path, label=label)
                    referee_row = None
                    if referee is not None:
                        referee_row = {**referee.score_file(path), "file_bytes": res.bytes,
                                       "tensor_bytes": res.tensor_bytes}
                    if not args.keep_gguf:
                        path.unlink()
                row = {**r.to_dict(), "preset": preset, "kind": kind}
                if alloc is not None:
                    row.update(predicted_damage=alloc.damage, lower_bound=alloc.lower_bound, method=alloc.method,
                               token_embd=pl.types.get("token_embd.weight"))
                if referee_row is not None:
                    row["referee"] = referee_row
                log(f"  {label:22s} {r.bytes:>12,} B {r.bits_per_weight:6.3f} bpw  PPL {r.ppl:8.4f}  "
                    f"KLD {r.kld_mean:.5f} (p99 {r.kld_p99:.4f})  top-1 {100 * r.top1:.2f}%"
                    + (f"  | llama-perplexity KLD {row['referee']['kld_mean']:.5f}" if referee else ""))
                rows.append(row)
                results.append(r)
            (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    print(format_table(results))
    by = {(r["preset"], r["kind"]): r for r in rows}
    for source_name, key in (("mixquant.evaluate", None), ("llama-perplexity", "referee")):
        if key and referee is None:
            continue
        print(f"\nmean KLD by {source_name} ({'%d chunks' % args.eval_chunks if key is None else '%d chunks' % args.referee_chunks}"
              " of 512), same tensor bytes:")
        head = f"{'preset':8} {'tensor bytes':>13} {'bpw':>6} {'preset+imatrix':>15}"
        for kind, *_ in methods:
            head += f" {kind:>12} {'change':>8}"
        print(head)
        for preset in presets:
            a = by[(preset, "preset+imatrix")]
            ka = a[key]["kld_mean"] if key else a["kld_mean"]
            line = f"{preset:8} {a['bytes']:>13,} {a['bits_per_weight']:6.3f} {ka:15.5f}"
            for kind, *_ in methods:
                b = by[(preset, kind)]
                kb = b[key]["kld_mean"] if key else b["kld_mean"]
                line += f" {kb:12.5f} {100 * (kb / ka - 1):+7.1f}%"
            print(line)
    png = plot(rows, args.out / "kld_vs_bpw.png", referee is not None, bundled.folder_name)
    log(f"plot: {png}; results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
