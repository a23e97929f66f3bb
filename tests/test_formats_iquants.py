"""IQ4_NL and IQ4_XS: byte-identical to ggml's quantize_iq4_nl / quantize_iq4_xs, bit-identical to_float."""

import numpy as np
import pytest

from conftest import importance_cases, tensor_cases
from mixquant import formats
from mixquant.formats.iquants import KVALUES_IQ4NL, _VALUES, _best_index_int8

TYPES = ("IQ4_NL", "IQ4_XS")
COLS = (512, 1024)

CASES = [
    pytest.param(cols, case, imp, id=f"{cols}-{case}-{imp}")
    for cols in COLS
    for case in tensor_cases(cols)
    for imp in importance_cases(cols)
]


def _check(ggml, type_name: str, x: np.ndarray, importance: np.ndarray | None) -> None:
    codec = formats.get(type_name)
    ours = codec.quantize_rows(x, importance)
    assert ours.shape == (x.shape[0], codec.row_bytes(x.shape[1]))
    ref = ggml.quantize(x, type_name, importance)
    mine = ours.tobytes()
    if mine != ref:
        a, b = np.frombuffer(mine, np.uint8), np.frombuffer(ref, np.uint8)
        first = int(np.flatnonzero(a != b)[0])
        pytest.fail(f"{type_name}: {int((a != b).sum())} bytes differ from ggml, first at byte {first} "
                    f"(row {first // ours.shape[1]}, block {first % ours.shape[1] // codec.type_size})")
    theirs = ggml.dequantize(ref, type_name, x.shape)
    back = formats.dequantize(ref, type_name, x.shape)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(back.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("cols,case,imp", CASES)
def test_matches_ggml(ggml, type_name, cols, case, imp):
    _check(ggml, type_name, tensor_cases(cols)[case], importance_cases(cols)[imp])


def _awkward(cols: int = 512, rows: int = 8) -> np.ndarray:
    """Sub-blocks of wildly different magnitude inside one super-block, and blocks at GROUP_MAX_EPS."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= (10.0 ** rng.integers(-6, 5, (rows, cols // 32))).repeat(32, axis=1).astype(np.float32)
    x[0, :32] = 0.0
    x[0, 5] = np.float32(1e-15)  # amax == GROUP_MAX_EPS: quantized
    x[0, 32:64] = 0.0
    x[0, 40] = np.nextafter(np.float32(1e-15), np.float32(0))  # just below: scale 0
    x[1, :] = -x[1, :]
    x[2, :256] = 0.0
    x[2, 256 + 7] = -3.0  # a super-block with one non-zero value
    x[3] = np.round(x[3] * 4) / 4  # many exact ties
    x[4, :] = np.float32(-1.0)
    x[5, ::2] = 0.0
    # Sub-blocks that are exact power-of-two multiples of a super-block's largest one have exactly
    # proportional scales, so IQ4_XS's nearest_int(id*scales[ib]) meets its ties at +-0.5 (half to even).
    for r in (6, 7):
        for sb in range(cols // 256):
            a = x[r, sb * 256 : sb * 256 + 32] / np.abs(x[r, sb * 256 : sb * 256 + 32]).max()
            for ib, f in enumerate((1, -1 / 64, 1 / 64, -1 / 32, 1 / 128, -3 / 64, 1 / 2, -1 / 64)):
                x[r, sb * 256 + ib * 32 : sb * 256 + (ib + 1) * 32] = a * np.float32(f * (r - 5))
    return x


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("imp", ["none", "lognormal", "with_zeros", "all_zero"])
def test_awkward_blocks(ggml, type_name, imp):
    importance = np.zeros(512, np.float32) if imp == "all_zero" else importance_cases(512)[imp]
    _check(ggml, type_name, _awkward(), importance)


def _best_index_c(values, x: float) -> int:
    """best_index_int8 transcribed from ggml-quants.c (bisection), with float32 arithmetic."""
    x = np.float32(x)
    if x <= values[0]:
        return 0
    if x >= values[-1]:
        return len(values) - 1
    ml, mu = 0, len(values) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < values[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - values[mu - 1] < values[mu] - x else mu


def test_best_index_matches_bisection():
    """The branch-free search picks what ggml's bisection picks, at and around every table value and midpoint."""
    values = KVALUES_IQ4NL.astype(np.float32)
    points = np.concatenate([values, (values[:-1] + values[1:]) / np.float32(2), [-1e30, 1e30, 0.0, -0.0, np.inf,
                                                                                    -np.inf, np.nan]]).astype(np.float32)
    near = [np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(-np.inf)), points]
    xs = np.concatenate(near + [np.linspace(-140, 140, 20001, dtype=np.float32)])
    for x in xs:
        assert _best_index_int8(_VALUES, x) == _best_index_c(values, x), x
