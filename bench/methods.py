"""Rounding methods at the same types: llama.cpp's imatrix quantizer against mixquant's GPTQ (and AWQ).

On a bundled test model (`--model`: smollm2, SmolLM2-135M, the default; or gemma3, Gemma 3 270M), for
each plan (default Q4_0, Q4_K_M, Q3_K_M, Q2_K):

1. one calibration on `--chunks` windows of 512 tokens of the calibration text: llama-imatrix on the
   F32 GGUF gives the imatrix, mixquant's calibrate gives the Hessians (sum x x^T of every linear
   input, the output layer's too) on the same windows;
2. llama-quantize --imatrix writes the preset (the baseline); `mixquant quantize --method M` for each
   of `--methods` (default gptq; also awq, awq+gptq) writes the same plan with the same imatrix and
   the Hessians: same types, so the files have the same bytes
   (checked); each run's wall time and peak RSS are measured (a subprocess each, same threads);
3. the referee is llama.cpp's own llama-perplexity --kl-divergence (bench/allocation.py's Referee)
   on `--referee-chunks` windows of the evaluation text, disjoint from the calibration text.

Prints a table (mean KLD, p99 KLD, top-1, PPL, file bytes, quantize seconds and peak MB, and the
KLD change) and writes results.json into `--out`. Tensor data bytes are equal (checked); the files
differ by llama-quantize's few metadata keys (quantize.imatrix.*).

Run: .venv/bin/python bench/methods.py [--model gemma3] [--plans Q4_0,Q4_K_M] [--methods gptq,awq,awq+gptq]
     [--chunks 32] [--referee-chunks 20] [--threads 2]
     [--gptq-variants "no refit=--no-gptq-refit;damp 0.1%=--gptq-damp 0.001"]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from allocation import Referee, log  # the referee, shared

PLANS = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")


def measured(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; (wall seconds, peak RSS in MB) of that process (GNU time)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd], capture_output=True, text=True,
                              check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr[-2000:]}")
        if "mixquant.cli" in cmd:  # its summary lines (what the method did), as the command printed them
            said = [ln for ln in done.stderr.splitlines() if ln.startswith(("awq:", "gptq:"))]
            log("\n".join([" ".join(cmd[2:]), *said, done.stdout.strip()]))
        return seconds, int(rss.read().split()[-1]) / 1024


def has_mean_abs(path: Path) -> bool:
    from mixquant.errors import MixquantError
    from mixquant.hessians import Hessians

    h = Hessians.load(path)
    try:
        h.mean_abs(next(iter(h.rows)))
    except MixquantError:
        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from mixquant.testdata import TEST_MODELS

    p.add_argument("--model", choices=tuple(TEST_MODELS), default="smollm2", help="the bundled test model")
    p.add_argument("--out", type=Path, default=None, help="default: <mixquant cache>/bench/methods "
                   "(methods-<model> for another model than smollm2)")
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--chunks", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--referee-chunks", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-gguf", action="store_true")
    p.add_argument("--methods", default="gptq", help="mixquant methods, each a row per plan (gptq, awq, awq+gptq)")
    p.add_argument("--awq-grid", type=int, default=20, help="quantize --awq-grid for the awq methods")
    p.add_argument("--gptq-variants", default="", metavar="LABEL=ARGS;...",
                   help='more gptq rows, each with extra quantize arguments, e.g. "refit=--gptq-refit;'
                        'damp 0.1%%=--gptq-damp 0.001"')
    p.add_argument("--variants-only", action="store_true", help="with --gptq-variants: skip the default gptq row")
    args = p.parse_args()
    if args.out is None:
        from mixquant.cache import cache_dir

        args.out = cache_dir() / "bench" / ("methods" if args.model == "smollm2" else f"methods-{args.model}")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    from gguf import GGUFReader

    torch.set_num_threads(args.threads)
    from mixquant.calibrate import calibrate
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan
    from mixquant.reference import llama_tool
    from mixquant.source import open_source
    from mixquant.testdata import build_test_text
    from mixquant.text import read_text

    folder = TEST_MODELS[args.model].build()
    calib, eval_text = build_test_text()
    source = open_source(folder)
    f32 = args.out / "F32.gguf"
    if not f32.is_file():
        write_gguf(source, preset_plan(source.model, "F32"), f32, progress=False, file_type="F32")
    imatrix = args.out / f"imatrix-{args.chunks}.gguf"
    if not imatrix.is_file():
        seconds, _ = measured([str(llama_tool("llama-imatrix")), "-m", str(f32), "-f", str(calib), "-c", "512",
                               "--chunks", str(args.chunks), "-t", str(args.threads), "-o", str(imatrix)])
        log(f"llama-imatrix: {args.chunks} chunks, {seconds:.0f} s")
    hessians = args.out / f"hessians-{args.chunks}.safetensors"
    if not hessians.is_file() or not has_mean_abs(hessians):  # awq needs mean |x| (files since awq have it)
        start = time.perf_counter()
        cal = calibrate(folder, read_text(calib), chunks=args.chunks, activations=False, output_importance=True,
                        hessians=True, dataset=str(calib))
        cal.hessians.save(hessians)
        log(f"mixquant calibrate with Hessians: {args.chunks} chunks, {time.perf_counter() - start:.0f} s")
    referee = Referee(args, source, eval_text)
    mixquant = [sys.executable, "-m", "mixquant.cli"]

    def quantize_cmd(out: Path, plan: str, method: str, extra: tuple[str, ...] = ()) -> list[str]:
        awq = ("--awq-grid", str(args.awq_grid)) if "awq" in method else ()
        return [*mixquant, "quantize", str(folder), str(out), plan, "--imatrix", str(imatrix), "--method", method,
                "--hessians", str(hessians), "--threads", str(args.threads), *awq, *extra]

    rows = []
    for plan in args.plans.split(","):
        files = {"llama.cpp imatrix": args.out / f"{plan}-llama.gguf"}
        cmds = {"llama.cpp imatrix": [str(llama_tool("llama-quantize")), "--imatrix", str(imatrix), str(f32),
                                      str(files["llama.cpp imatrix"]), plan, str(args.threads)]}
        for m in args.methods.split(","):
            files[f"mixquant {m}"] = args.out / f"{plan}-{m}.gguf"
            cmds[f"mixquant {m}"] = quantize_cmd(files[f"mixquant {m}"], plan, m)
        for variant in filter(None, args.gptq_variants.split(";")):
            label, _, extra = variant.partition("=")
            method = f"mixquant gptq {label.strip()}"
            files[method] = args.out / f"{plan}-gptq-{''.join(c if c.isalnum() else '_' for c in label)}.gguf"
            cmds[method] = quantize_cmd(files[method], plan, "gptq", tuple(extra.split()))
        if args.variants_only and args.gptq_variants:
            cmds.pop("mixquant gptq", None)
        for method, cmd in cmds.items():
            files[method].unlink(missing_ok=True)
            seconds, peak = measured(cmd)
            score = referee.score_file(files[method])
            rows.append({"plan": plan, "method": method, "seconds": seconds, "peak_mb": peak,
                         "file_bytes": files[method].stat().st_size,
                         "tensor_bytes": sum(int(t.n_bytes) for t in GGUFReader(files[method]).tensors), **score})
            log(f"{plan} {method}: KLD {score['kld_mean']:.5f}, {seconds:.1f} s, {peak:.0f} MB")
            if not args.keep_gguf:
                files[method].unlink()
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    print(f"\nreferee: llama-perplexity --kl-divergence, {args.referee_chunks} chunks of 512 of the evaluation text; "
          f"calibration: {args.chunks} chunks of 512; {args.threads} threads")
    print(f"{'plan':<8} {'method':<26} {'mean KLD':>9} {'p99 KLD':>8} {'top-1':>7} {'PPL':>8} {'file bytes':>12} "
          f"{'time s':>7} {'peak MB':>8} {'KLD change':>10}")
    for r in rows:
        base = next(b for b in rows if b["plan"] == r["plan"] and b["method"] == "llama.cpp imatrix")
        change = "" if r is base else f"{100 * (r['kld_mean'] / base['kld_mean'] - 1):+.1f}%"
        same = "" if r["tensor_bytes"] == base["tensor_bytes"] else " (tensor bytes differ!)"
        print(f"{r['plan']:<8} {r['method']:<26} {r['kld_mean']:9.5f} {r['kld_p99']:8.4f} {100 * r['top1']:6.2f}% "
              f"{r['ppl']:8.4f} {r['file_bytes']:12,d} {r['seconds']:7.1f} {r['peak_mb']:8.0f} {change:>10}{same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
