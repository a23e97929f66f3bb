"""`mixquant analyze` on the test model: time of each stage and peak memory, against the issue's
bounds (15 minutes, 6 GB on 2 cores) and, for the imatrix stage, against llama-imatrix on the
same text, chunks and threads (run here too, on the F32 GGUF mixquant exports).

Run: .venv/bin/python bench/analyze.py [--chunks 64] [--threads 2] [--types Q2_K,...,Q8_0] [--out DIR]

The candidate types default to every quantized type mixquant writes (Q2_K..Q8_0 with IQ4_NL and
IQ4_XS, and F16/BF16): the set the allocator chooses from.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantize import RSS_WRAPPER

from mixquant.reference import llama_tool
from mixquant.testdata import build_test_model, build_test_text

CALIBRATION = "calibration (imatrix, activations)"
STAGE = re.compile(r"^  (\S.*?)\s+([0-9.]+) s$")  # the stage table `mixquant analyze` prints last


def run(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of one child process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
    *out, rss = done.stdout.strip().splitlines()
    return seconds, int(rss) / 1024, "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64, help="calibration windows of --ctx tokens")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", help="candidate types, comma-separated (default: all)")
    parser.add_argument("--out", help="keep the analysis here (default: a temporary folder)")
    args = parser.parse_args()

    model = build_test_model()
    calib, _ = build_test_text()
    mixquant = str(Path(sys.executable).with_name("mixquant"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = Path(args.out) if args.out else tmp / "analysis"
        seconds, rss, stdout = run([mixquant, "analyze", str(model), "--text", str(calib), "-o", str(out),
                                    "--chunks", str(args.chunks), "--ctx", str(args.ctx), "--threads", str(args.threads),
                                    *(["--types", args.types] if args.types else [])])
        stages = [(m.group(1), float(m.group(2))) for m in map(STAGE.match, stdout.splitlines()) if m]

        f32 = tmp / "f32.gguf"
        subprocess.run([mixquant, "quantize", str(model), str(f32), "F32"], check=True, capture_output=True)
        ref_seconds, ref_rss, _ = run([str(llama_tool("llama-imatrix")), "-m", str(f32), "-f", str(calib),
                                       "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads),
                                       "-o", str(tmp / "llama-imatrix.gguf"), "--no-ppl"])

    print(f"mixquant analyze: test model, {args.chunks} windows of {args.ctx} tokens, types {args.types or 'all'}, "
          f"{args.threads} threads")
    print(f"{'stage':40} {'seconds':>8}")
    for name, s in stages:
        print(f"{name:40} {s:8.1f}")
    print(f"{'total (wall, whole process)':40} {seconds:8.1f}   peak RSS {rss:.0f} MB")
    calibration = dict(stages).get(CALIBRATION)
    if calibration:
        print(f"calibration (imatrix + activation statistics) vs llama-imatrix (imatrix only; same chunks and threads, "
              f"F32 GGUF): {calibration:.1f} s vs {ref_seconds:.1f} s, ratio {calibration / ref_seconds:.2f} "
              f"(llama-imatrix peak RSS {ref_rss:.0f} MB)")
    print(f"bounds: 15 min -> {'within' if seconds <= 900 else 'OVER'} ({seconds / 900:.2f} of it); "
          f"6 GB -> {'within' if rss <= 6144 else 'OVER'} ({rss / 6144:.2f} of it)")


if __name__ == "__main__":
    main()
