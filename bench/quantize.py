"""Whole-model quantization: mixquant against llama-quantize on the same F32 GGUF, same threads.

Prints wall time and peak RSS of each (each run in its own child process), their ratios, the
memory bound the brief sets (largest tensor x 4 + 500 MB), and whether the tensor data agree.
Run: .venv/bin/python bench/quantize.py [--preset Q4_K_M] [--threads 2] [--source F32.gguf]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from mixquant.reference import llama_tool
from mixquant.testdata import build_test_model

# Runs argv as a grandchild and prints its peak RSS: RUSAGE_CHILDREN of this wrapper is that child's.
RSS_WRAPPER = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; " \
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)"


def measure(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one run."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{argv[0]} failed:\n{done.stderr[-2000:]}")
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024


def tensor_data(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8))) for t in GGUFReader(path).tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", help="F32 GGUF (default: the test model, exported by mixquant at F32)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest is reported")
    args = parser.parse_args()

    mixquant = [str(Path(sys.executable).with_name("mixquant")), "quantize"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(args.source) if args.source else tmp / "f32.gguf"
        if not args.source:
            subprocess.run([*mixquant, str(build_test_model()), str(source), "F32"], check=True, capture_output=True)
        largest = max(int(np.prod(t.shape)) * 4 for t in GGUFReader(source).tensors) / 1e6
        ours_out, theirs_out = tmp / "mixquant.gguf", tmp / "llama.gguf"
        runs = {
            "mixquant": [*mixquant, str(source), str(ours_out), args.preset, "--threads", str(args.threads)],
            "llama-quantize": [str(llama_tool("llama-quantize")), str(source), str(theirs_out), args.preset,
                               str(args.threads)],
        }
        results = {}
        for name, argv in runs.items():
            timings = [measure(argv) for _ in range(args.repeat)]
            results[name] = (min(t for t, _ in timings), max(m for _, m in timings))
        ours, theirs = tensor_data(ours_out), tensor_data(theirs_out)
        same = sum(ours[n] == theirs.get(n) for n in ours)
        print(f"source: {source.name} ({source.stat().st_size / 1e6:.0f} MB), preset {args.preset}, "
              f"{args.threads} threads, best of {args.repeat}")
        print(f"{'tool':16} {'seconds':>8} {'peak RSS MB':>12} {'output bytes':>14}")
        for name, out in (("mixquant", ours_out), ("llama-quantize", theirs_out)):
            print(f"{name:16} {results[name][0]:8.2f} {results[name][1]:12.0f} {out.stat().st_size:14,}")
        print(f"time ratio mixquant/llama-quantize: {results['mixquant'][0] / results['llama-quantize'][0]:.2f} (target <= 2)")
        bound = largest * 4 + 500
        print(f"peak RSS bound (largest tensor {largest:.0f} MB x 4 + 500 MB): {bound:.0f} MB; "
              f"mixquant {'within' if results['mixquant'][1] <= bound else 'OVER'}")
        print(f"tensors with identical type and bytes: {same} of {len(ours)}")


if __name__ == "__main__":
    main()
