"""Q2_K .. Q6_K: byte-identical quantization and bit-identical dequantization against ggml."""

import numpy as np
import pytest

from mixquant import formats

from conftest import importance_cases, tensor_cases

KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
COLS = (512, 1024)

TENSORS = {cols: tensor_cases(cols=cols, rows=8, seed=cols) for cols in COLS}
IMPORTANCE = {cols: importance_cases(cols) for cols in COLS}
CASES = [(cols, t, i) for cols in COLS for t in TENSORS[cols] for i in IMPORTANCE[cols]]


def _first_difference(ours: bytes, theirs: bytes, type_size: int) -> str:
    a = np.frombuffer(ours, np.uint8)
    b = np.frombuffer(theirs, np.uint8)
    k = int(np.flatnonzero(a != b)[0])
    return f"first differing byte {k} (block {k // type_size}, offset {k % type_size}): {a[k]} != {b[k]}"


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("cols, tensor, imp", CASES, ids=[f"{c}-{t}-{i}" for c, t, i in CASES])
def test_quantize_matches_ggml(ggml, name, cols, tensor, imp):
    x = TENSORS[cols][tensor]
    importance = IMPORTANCE[cols][imp]
    ours = formats.quantize(x, name, importance)
    theirs = ggml.quantize(x, name, importance)
    assert len(ours) == len(theirs)
    assert ours == theirs, _first_difference(ours, theirs, formats.get(name).type_size)


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("cols, tensor, imp", CASES, ids=[f"{c}-{t}-{i}" for c, t, i in CASES])
def test_dequantize_matches_ggml(ggml, name, cols, tensor, imp):
    """Decode ggml's own bytes (not ours), so this holds independently of the quantizer."""
    x = TENSORS[cols][tensor]
    data = ggml.quantize(x, name, IMPORTANCE[cols][imp])
    ours = formats.dequantize(data, name, x.shape)
    theirs = ggml.dequantize(data, name, x.shape)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("name", KQUANTS)
def test_dequantize_random_bytes_matches_ggml(ggml, name):
    """Arbitrary bit patterns (every scale/quant value, fp16 subnormals and odd signs) decode alike."""
    codec = formats.get(name)
    rng = np.random.default_rng(7)
    rows, cols = 16, 1024
    data = rng.integers(0, 256, rows * codec.row_bytes(cols), dtype=np.uint8)
    # keep d/dmin finite (NaN payloads are not worth comparing bit-for-bit): clear the fp16 exponent MSB
    blocks = data.reshape(-1, codec.type_size)
    for off in {"Q2_K": (81, 83), "Q3_K": (109,), "Q4_K": (1, 3), "Q5_K": (1, 3), "Q6_K": (209,)}[name]:
        blocks[:, off] &= 0xBF
    ours = formats.dequantize(data.tobytes(), name, (rows, cols))
    theirs = ggml.dequantize(data.tobytes(), name, (rows, cols))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("name", KQUANTS)
def test_row_independence_and_multi_row_chunks(ggml, name):
    """ggml quantizes the no-importance case as one long row; per-row kernels must agree."""
    x = np.random.default_rng(11).standard_normal((5, 768)).astype(np.float32)
    assert formats.quantize(x, name) == ggml.quantize(x, name)
    assert formats.quantize(x, name) == b"".join(formats.quantize(x[r:r + 1], name) for r in range(5))
