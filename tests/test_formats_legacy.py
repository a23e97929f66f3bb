"""Float types (F32, F16, BF16) and legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

Every case is checked against the reference ggml: the quantized bytes must be identical and the
dequantized floats identical bit for bit. The search routines of mixquant.formats.search that the
legacy formats use with an importance vector (make_qx_quants: Q4_0/Q5_0, make_qkx3_quants:
Q4_1/Q5_1) are exercised here too, including their all-zero and constant-block early exits.
"""

import numpy as np
import pytest

from mixquant import formats

from conftest import importance_cases, tensor_cases

FLOATS = ("F32", "F16", "BF16")
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
ALL = FLOATS + LEGACY

# (cols, rows): the standard shape and a wide one with few rows
SHAPES = [(512, 8), (2048, 3)]


def _u32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _oracle_dequantize(ggml, data: bytes, name: str, shape) -> np.ndarray:
    if name == "F32":  # ggml has no to_float for F32: the data is the floats
        return np.frombuffer(data, dtype=np.float32).reshape(shape)
    return ggml.dequantize(data, name, shape)


def _check(ggml, x: np.ndarray, name: str, importance) -> None:
    expected = ggml.quantize(x, name, importance)
    got = formats.quantize(x, name, importance)
    if got != expected:
        a = np.frombuffer(expected, np.uint8)
        b = np.frombuffer(got, np.uint8)
        bad = np.flatnonzero(a != b)
        block = bad[0] // formats.get(name).type_size
        pytest.fail(f"{name}: {bad.size} bytes differ from ggml, first in block {block}")
    want = _oracle_dequantize(ggml, expected, name, x.shape)
    have = formats.dequantize(got, name, x.shape)
    assert have.dtype == np.float32 and have.shape == x.shape
    np.testing.assert_array_equal(_u32(have), _u32(want))


def _cases(cols, rows):
    return [(cols, rows, t, i) for t in tensor_cases(cols, rows) for i in importance_cases(cols)]


@pytest.fixture(scope="module")
def tensors():
    return {(cols, rows): tensor_cases(cols, rows) for cols, rows in SHAPES}


@pytest.fixture(scope="module")
def importances():
    return {cols: importance_cases(cols) for cols, _ in SHAPES}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("cols, rows, tensor, importance", [c for s in SHAPES for c in _cases(*s)])
def test_matches_ggml(ggml, tensors, importances, name, cols, rows, tensor, importance):
    x = tensors[(cols, rows)][tensor]
    _check(ggml, x, name, importances[cols][importance])


@pytest.mark.parametrize("name", LEGACY)
def test_many_blocks_match_ggml(ggml, name):
    """A larger sample (8192 blocks) for the rarer branches of the scale searches."""
    rng = np.random.default_rng(13)
    x = (rng.standard_t(4, (64, 4096)) * np.exp(rng.normal(0, 1, (64, 1)))).astype(np.float32)
    importance = np.exp(rng.normal(0, 2, 4096)).astype(np.float32)
    _check(ggml, x, name, importance)
    _check(ggml, x, name, None)


# ---- edge cases: the early exits and corner arithmetic of the _ref code and the scale searches

def _edge_tensors(cols: int = 256, rows: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    g = rng.standard_normal((rows, cols)).astype(np.float32)
    cases = {
        "all_zero": np.zeros((rows, cols)),
        "positive_constant": np.full((rows, cols), 2.0),
        "negative_constant": np.full((rows, cols), -1.0),
        # one block of each: zero, constant, a single nonzero value, two values, a ramp
        "block_mix": np.concatenate([np.zeros(32), np.full(32, 0.25), np.eye(1, 32, 5)[0] * -3.0,
                                     np.tile([1.0, -1.0], 16), np.linspace(-1, 1, 32),
                                     np.linspace(0, 1, 32), np.linspace(-2, 0, 32), np.full(32, 1e-16)])[None].repeat(rows, 0),
        "one_hot": np.eye(rows, cols) * 3.0,
        "small_integers": rng.integers(-8, 8, (rows, cols)),  # exact ties of the rounding
        "halves": rng.integers(-16, 16, (rows, cols)) * 0.5,
        "below_group_max_eps": g * 1e-16,
        "subnormal": g * 1e-39,  # 1/d overflows to inf in the _ref code
        "fp16_overflow": g * 1e6,  # scales beyond the fp16 range
        "near_float_max": g * 1e38,  # x*x overflows in sigma2 and the searches
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in cases.items()}


def _edge_importances(cols: int = 256) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(8)
    return {
        "none": None,
        "ones": np.ones(cols, np.float32),
        "all_zero": np.zeros(cols, np.float32),
        "mostly_zero": np.where(rng.random(cols) < 0.9, 0, 1).astype(np.float32),
        "huge": np.full(cols, 1e30, np.float32),
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("importance", list(_edge_importances()))
@pytest.mark.parametrize("tensor", list(_edge_tensors()))
def test_edge_cases_match_ggml(ggml, name, tensor, importance):
    _check(ggml, _edge_tensors()[tensor], name, _edge_importances()[importance])


@pytest.mark.parametrize("name", ALL)
def test_non_finite_values_match_ggml(ggml, name):
    """The public API rejects NaN/Inf, but the kernels treat them as ggml does (no importance)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 40] = np.inf
    x[2, 70] = -np.inf
    x[3, ::7] = np.float32(-np.nan)
    codec = formats.get(name)
    got = codec.quantize_rows(x, None)
    assert got.tobytes() == ggml.quantize(x, name)


@pytest.mark.parametrize("name", ("F16", "BF16"))
def test_every_16_bit_pattern_decodes_like_ggml(ggml, name):
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # NaNs, infinities, subnormals included
    shape = (1, 1 << 16)
    got = formats.dequantize(raw, name, shape)
    np.testing.assert_array_equal(_u32(got), _u32(ggml.dequantize(raw.tobytes(), name, shape)))


@pytest.mark.parametrize("name", ("F16", "BF16"))
def test_random_float_bits_encode_like_ggml(ggml, name):
    rng = np.random.default_rng(10)
    bits = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    bits[:8] = [0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x00000001]
    x = bits.view(np.float32).reshape(1, -1)
    assert formats.get(name).quantize_rows(x, None).tobytes() == ggml.quantize(x, name)


@pytest.mark.parametrize("name", LEGACY)
def test_random_blocks_decode_like_ggml(ggml, name):
    """Arbitrary bytes, including NaN/inf/subnormal fp16 scales, decode bit-exactly."""
    codec = formats.get(name)
    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, (8, 64 * codec.type_size), dtype=np.uint8)
    shape = (8, 64 * codec.block_size)
    got = formats.dequantize(raw.tobytes(), name, shape)
    np.testing.assert_array_equal(_u32(got), _u32(ggml.dequantize(raw.tobytes(), name, shape)))


@pytest.mark.parametrize("name", LEGACY + ("F16",))
def test_threads_give_the_same_bytes(name):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((150, 256)).astype(np.float32)
    importance = rng.random(256).astype(np.float32)
    assert formats.quantize(x, name, importance, threads=3) == formats.quantize(x, name, importance)


@pytest.mark.parametrize("name", ALL)
def test_codec_flags(name):
    codec = formats.get(name)
    assert codec.uses_importance == (name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"))
