"""Scale: wall time and peak RSS of calibration, analysis and evaluation against model size, with and
without `--max-memory`, on synthetic Llama models (random bf16 weights, built once into the cache by
mixquant.testdata.synthetic) and the bundled test model; then the cost per parameter and what an 8B
and a 70B model would need on one machine.

Run: .venv/bin/python bench/scale.py [--sizes 0.5,1.5,3] [--budget 1GB] [--stages imatrix,analyze,eval]
                                     [--chunks 2] [--ctx 128] [--threads 2] [--device cuda] [--dtype bfloat16]

Each command runs in its own child process (peak RSS from RUSAGE_CHILDREN, as bench/quantize.py).
`--max-memory`, `--device` and `--dtype` are passed only where asked for, and only to commands whose
--help lists them; a row whose flag a command lacks is printed as skipped. The defaults: 2 windows of
128 tokens; analyze with one candidate type, one held-out window of 256 tokens, no Fisher, no layer
sweep, no report. Measured without a budget on a shared 2-core machine (load average 5 to 9, so about
half the CPU): imatrix and eval of every model 5 minutes in all; analyze 17 minutes on the test model
(211 tensors over 30 blocks), 3.3, 5.9 and 8.3 minutes on the 0.5, 1.5 and 3 GB models; about 40
minutes per budget setting. `--stages imatrix,eval` is the 5-minute run.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from analyze import STAGE
from quantize import RSS_WRAPPER

from mixquant.runtime import parse_size
from mixquant.source import open_source
from mixquant.testdata import MODEL_DIR_NAME, build_test_model, build_test_text
from mixquant.cache import cache_dir
from mixquant.testdata.fixture import STAMP_FILE
from mixquant.testdata.synthetic import synthetic_folder_name, synthetic_shape

MIXQUANT = str(Path(sys.executable).with_name("mixquant"))
ANALYZE_FLAGS = "--types Q4_0 --windows 1 --sweep-types= --no-fisher --no-report --no-hessians"
EXTRAPOLATE = {"8B": 8.0e9, "70B": 70.6e9}


@dataclass
class Row:
    model: str
    params: int
    stage: str
    budget: str  # "-" for none
    seconds: float | None = None
    rss_mb: float | None = None
    note: str = ""
    detail: str = ""  # analyze: its own stage timings


@cache
def command_flags(command: str) -> str:
    """The --help text of `mixquant COMMAND` (to see which flags it has)."""
    return subprocess.run([MIXQUANT, command, "--help"], capture_output=True, text=True, check=True).stdout


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, str, str]:
    """(seconds, peak RSS in MB, stdout, error) of one child process; error is '' on success."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    *out, rss = done.stdout.strip().splitlines()
    error = ""
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        error = f"exit {done.returncode}: {lines[-1] if lines else '(no message)'}"
    return seconds, int(rss) / 1024, "\n".join(out), error


def parameters(folder: Path) -> int:
    """Weights in the folder's safetensors (headers only)."""
    with open_source(folder) as source:
        return sum(math.prod(t.shape) for t in source.model.tensors)


def build(size: float, env: dict[str, str]) -> tuple[Path, Row]:
    """The synthetic model of `size` GB (float32), built in a child process (its RSS is the builder's)."""
    shape = synthetic_shape(size)
    cached = (cache_dir() / synthetic_folder_name(shape) / STAMP_FILE).is_file()
    code = f"from mixquant.testdata.synthetic import synthetic_model; print(synthetic_model({size!r}, progress=False))"
    seconds, rss, out, error = measure([sys.executable, "-c", code], env)
    if error:
        raise SystemExit(f"building the {size} GB synthetic model failed: {error}")
    folder = Path(out.splitlines()[-1])
    label = f"synthetic h{shape.hidden} x{shape.n_layer}"
    return folder, Row(label, parameters(folder), "build", "-", seconds, rss, "(cached)" if cached else "")


def stage_argv(stage: str, model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    calib, held_out = build_test_text()
    window = ["--ctx", str(args.ctx), "--chunks", str(args.chunks)]
    if stage == "imatrix":
        return [MIXQUANT, "imatrix", str(model), "--text", str(calib), "-o", str(out / "imatrix.gguf"), *window]
    if stage == "analyze":
        return [MIXQUANT, "analyze", str(model), "--text", str(calib), "-o", str(out / "analysis"), *window,
                "--threads", str(args.threads), *shlex.split(args.analyze_flags)]
    if stage == "eval":
        return [MIXQUANT, "eval", str(model), "--plan", args.eval_plan, "--text", str(held_out), *window,
                "--threads", str(args.threads)]
    raise SystemExit(f"unknown stage {stage!r} (imatrix, analyze, eval)")


def run_stage(name: str, params: int, stage: str, model: Path, budget: str | None, args: argparse.Namespace,
              env: dict[str, str]) -> Row:
    row = Row(name, params, stage, budget or "-")
    asked = {"--max-memory": budget, "--device": args.device, "--dtype": args.dtype}
    extra: list[str] = []
    for flag, value in asked.items():
        if value is None:
            continue
        if flag not in command_flags(stage):
            row.note = f"({flag} not available: skipped)"
            return row
        extra += [flag, value]
    with tempfile.TemporaryDirectory(prefix="mixquant-scale-") as tmp:
        row.seconds, row.rss_mb, out, row.note = measure([*stage_argv(stage, model, Path(tmp), args), *extra], env)
    if stage == "analyze":
        pairs = re.search(r"(\d+ of \d+ pairs measured on \d+ tokens)", out)
        row.detail = ", ".join(f"{m.group(1).removeprefix('sensitivity: ')} {float(m.group(2)):.0f} s"
                               for m in map(STAGE.match, out.splitlines()) if m and float(m.group(2)) >= 0.5)
        row.detail += f" ({pairs.group(1)})" if pairs else ""
    return row


def print_row(row: Row) -> None:
    f32_gb = row.params * 4 / 1e9
    cells = f"{row.model:24} {f32_gb:7.2f} {row.params / 1e6:8.0f} {row.stage:22} {row.budget:>7}"
    if row.seconds is None:
        print(f"{cells} {row.note}", flush=True)
        return
    per_billion = row.seconds / (row.params / 1e9)
    print(f"{cells} {row.seconds:8.1f} {row.rss_mb:8.0f} {per_billion:9.1f} {row.note}", flush=True)
    if row.detail:
        print(f"    {row.detail}", flush=True)


def summary(rows: list[Row], budget_mb: float) -> None:
    """Per stage and budget: seconds per parameter on the largest synthetic model measured (its fixed
    costs amortized the most; the test model if there is none), peak RSS as a line in the parameter
    count, and what 8B and 70B would take at that rate."""
    print("\nper-parameter cost (largest synthetic model measured) and extrapolation to one CPU machine "
          "(hours, peak RSS):")
    print(f"{'stage':22} {'budget':>7} {'s / B params':>12} {'peak RSS':>34}   "
          + "   ".join(f"{name:>17}" for name in EXTRAPOLATE))
    measured = [r for r in rows if r.seconds is not None and not r.note and r.stage != "build"]
    for stage, budget in dict.fromkeys((r.stage, r.budget) for r in measured):
        same = sorted((r for r in measured if (r.stage, r.budget) == (stage, budget)), key=lambda r: r.params)
        family = [r for r in same if r.model.startswith("synthetic")] or same
        largest = family[-1]
        rate = largest.seconds / largest.params  # seconds per parameter
        if budget != "-":  # streaming: the budget plus the largest overhead over it seen on any model
            a, b = max(r.rss_mb for r in same), 0.0
            fit = f"budget + {a - budget_mb:,.0f} MB"
        elif len(family) > 1:  # today: RSS grows with the model, MB = a + b x params through the smallest and largest
            b = (largest.rss_mb - family[0].rss_mb) / (largest.params - family[0].params)
            a = largest.rss_mb - b * largest.params
            fit = f"{a:,.0f} MB + {b * 1e9 / 1024:.2f} GB/B params"
        else:  # one size: through the origin, an upper bound
            a, b = 0.0, largest.rss_mb / largest.params
            fit = f"<= {b * 1e9 / 1024:.2f} GB/B params"
        cells = [f"{rate * p / 3600:6.1f} h {(a + b * p) / 1024:6.1f} GB" for p in EXTRAPOLATE.values()]
        print(f"{stage:22} {budget:>7} {rate * 1e9:12.1f} {fit:>34}   " + "   ".join(f"{c:>17}" for c in cells))
    print("(time = seconds per parameter x parameters at these settings; analyze's per-tensor pass costs tensors x "
          "remaining blocks, so it grows with depth too and its 8B/70B hours are a lower bound)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,1.5,3", help="synthetic models, float32 GB, comma-separated "
                        "('' for none)")
    parser.add_argument("--no-test-model", action="store_true", help="leave out the bundled test model")
    parser.add_argument("--budget", default="1GB", help="--max-memory for the budgeted runs ('' to skip them)")
    parser.add_argument("--stages", default="imatrix,analyze,eval")
    parser.add_argument("--chunks", type=int, default=2, help="calibration / evaluation windows")
    parser.add_argument("--ctx", type=int, default=128, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--analyze-flags", default=ANALYZE_FLAGS, help=f"(default: {ANALYZE_FLAGS!r})")
    parser.add_argument("--eval-plan", default="Q8_0", help="what eval quantizes in memory (default Q8_0)")
    parser.add_argument("--device", help="pass --device to every command (cpu, cuda, ...)")
    parser.add_argument("--dtype", help="pass --dtype to every command (float32, bfloat16, float16)")
    args = parser.parse_args()

    stages = [s for s in args.stages.split(",") if s]
    sizes = [float(s) for s in args.sizes.split(",") if s]
    budget_mb = parse_size(args.budget, "--budget") / 2**20 if args.budget else 0.0
    budgets = [None, args.budget] if args.budget else [None]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for stage in stages:
        stage_argv(stage, Path(), Path(), args)  # an unknown stage fails before the long work

    print(f"settings: {args.chunks} windows of {args.ctx} tokens, {args.threads} threads, analyze {args.analyze_flags!r}, "
          f"eval --plan {args.eval_plan}; synthetic shapes: "
          + ", ".join(f"{s} GB = {synthetic_shape(s)}" for s in sizes))
    print(f"{'model':24} {'f32 GB':>7} {'params M':>8} {'stage':22} {'budget':>7} {'wall s':>8} {'RSS MB':>8} "
          f"{'s/B par':>9}")
    rows: list[Row] = []
    models = [] if args.no_test_model else [(MODEL_DIR_NAME, build_test_model(), parameters(build_test_model()))]
    for size in sizes:
        folder, row = build(size, env)
        rows.append(row)
        print_row(row)
        models.append((row.model, folder, row.params))
    for name, folder, params in models:
        for stage in stages:
            for budget in budgets:
                rows.append(run_stage(name, params, stage, folder, budget, args, env))
                print_row(rows[-1])
    summary(rows, budget_mb)


if __name__ == "__main__":
    main()
