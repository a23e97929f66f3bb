"""`mixquant actquant` on the test model: the time of each scheme against the float forward pass
run side by side (the same windows, the same Evaluator, no hooks), and the time of the whole
default table against the issue's bound (20 minutes on 2 cores).

Run: .venv/bin/python bench/actquant.py [--chunks 1] [--calib-chunks 4] [--threads 2] [--schemes a,b]
     [--no-sensitivity]

The float row scores the model with no hooks (what every scheme's time includes: the forward pass,
the log-softmax and KLD over the vocabulary); a scheme's ratio is its time over that one.
"""

import argparse
import time

from mixquant.activations import actquant, format_table
from mixquant.evaluate import Evaluator
from mixquant.testdata import build_test_model, build_test_text

LIMIT_S = 20 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--calib-chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", help="comma-separated (default: the whole default table)")
    parser.add_argument("--no-sensitivity", action="store_true")
    args = parser.parse_args()
    model = build_test_model()
    calib, text = build_test_text()

    with Evaluator(model, text, chunks=args.chunks, threads=args.threads, progress=False) as ev:
        ev.reference()
        start = time.perf_counter()
        ev.score("float")
        float_s = time.perf_counter() - start

    start = time.perf_counter()
    result = actquant(model, text, calib, schemes=args.schemes.split(",") if args.schemes else None,
                      chunks=args.chunks, calib_chunks=args.calib_chunks, threads=args.threads,
                      sensitivity=not args.no_sensitivity, progress=False)
    total = time.perf_counter() - start
    print(format_table(result))
    print()
    print(f"{'scheme':<26} {'seconds':>8} {'x float':>8}")
    print(f"{'float (no hooks)':<26} {float_s:8.1f} {1.0:8.2f}")
    for r in result.rows:
        print(f"{r.scheme:<26} {r.seconds:8.1f} {r.seconds / float_s:8.2f}")
    print()
    for stage, seconds in result.timings.items():
        print(f"{stage:<26} {seconds:8.1f}")
    print(f"whole run: {total:.0f} s ({total / 60:.1f} minutes; bound {LIMIT_S // 60} minutes: "
          f"{'within' if total <= LIMIT_S else 'OVER'})")


if __name__ == "__main__":
    main()
