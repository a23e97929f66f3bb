"""Codec speed: mixquant against ggml (the reference) and the gguf package's numpy quantizer.

Quantizes the same real tensors of the test model with each, on one core, and prints MB/s of
float32 input and the ratios. Run: .venv/bin/python bench/codecs.py [--types Q4_K,Q6_K] [--repeat 3]
"""

import argparse
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from mixquant import formats  # noqa: E402
from mixquant.reference import ggml  # noqa: E402
from mixquant.testdata import build_test_model  # noqa: E402

# One tensor of each shape the test model has (rows of 576 and of 1536 columns).
TENSORS = ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.mlp.gate_proj.weight",
           "model.layers.7.mlp.down_proj.weight")


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(formats.FORMATS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with safe_open(build_test_model() / "model.safetensors", "np") as f:
        tensors = [f.get_tensor(name) for name in TENSORS]
    reference = ggml()
    rng = np.random.default_rng(0)
    print(f"tensors: {', '.join(f'{t.shape[0]}x{t.shape[1]}' for t in tensors)}; one core; best of {args.repeat}")
    print("importance: a log-normal per-column vector (the shape of a real imatrix)\n")
    print(f"{'type':8} {'imatrix':7} {'MB':>6} {'mixquant MB/s':>14} {'ggml MB/s':>10} {'ratio':>6} "
          f"{'gguf-py MB/s':>13} {'vs gguf-py':>10}")
    for name in args.types.split(","):
        codec = formats.get(name)
        usable = [t for t in tensors if t.shape[1] % codec.block_size == 0]
        megabytes = sum(t.nbytes for t in usable) / 1e6
        for with_imatrix in (False, True) if codec.uses_importance else (False,):
            weights = [np.exp(rng.normal(0, 2, t.shape[1])).astype(np.float32) if with_imatrix else None for t in usable]
            for t, w in zip(usable, weights):  # identical bytes, and numba compiled before timing
                assert formats.quantize(t, name, w) == reference.quantize(t, name, w), f"{name} differs from ggml"
            # each lambda is timed at once, inside this iteration: the loop variables it reads are current
            ours = best_seconds(lambda: [formats.quantize(t, name, w) for t, w in zip(usable, weights)], args.repeat)  # noqa: B023
            theirs = best_seconds(lambda: [reference.quantize(t, name, w) for t, w in zip(usable, weights)], args.repeat)  # noqa: B023
            gguf_py = ""
            if not with_imatrix and name != "F32":  # gguf-py's F32 'quantizer' is the identity
                try:
                    secs = best_seconds(lambda: [gguf.quants.quantize(t, codec.ggml_type) for t in usable], 1)  # noqa: B023
                    gguf_py = f"{megabytes / secs:13.1f} {secs / ours:9.1f}x"
                except NotImplementedError:
                    gguf_py = f"{'-':>13} {'-':>10}"
            print(f"{name:8} {'yes' if with_imatrix else 'no':7} {megabytes:6.1f} {megabytes / ours:14.1f} "
                  f"{megabytes / theirs:10.1f} {theirs / ours:6.2f} {gguf_py}")


if __name__ == "__main__":
    main()
