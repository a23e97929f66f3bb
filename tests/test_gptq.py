"""GPTQ inside GGUF blocks: exactly round-to-nearest when there is no error to feed back (a diagonal H),
lower output error than round-to-nearest on correlated inputs, clear errors on bad Hessians."""

import numpy as np
import pytest

from mixquant import formats
from mixquant.errors import MixquantError
from mixquant.quantize import output_error, quantize

from conftest import importance_cases, tensor_cases

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
COLS = 512


def _diagonal_hessian(seed: int, dead: bool) -> np.ndarray:
    d = np.exp(np.random.default_rng(seed).normal(0, 2, COLS))
    if dead:
        d[::7] = 0.0  # dead inputs
    return np.diag(d)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_diagonal_hessian_gives_the_round_to_nearest_bytes(type_name):
    """No off-diagonal H: no error moves, so every block's fit and every code are ggml's own."""
    for dead in (False, True):
        h = _diagonal_hessian(3, dead)
        for case, x in tensor_cases(COLS, 8).items():
            for imp_name, imp in importance_cases(COLS).items():
                ref = formats.quantize(x, type_name, imp)
                assert quantize(x, type_name, h, imp) == ref, (case, imp_name, dead)
                assert quantize(x, type_name, h, imp, act_order=True) == ref, (case, imp_name, dead, "act-order")


def _correlated(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mix = np.eye(COLS) + 2 * rng.standard_normal((COLS, COLS)) / np.sqrt(COLS)
    x = (rng.standard_normal((2048, COLS)) @ mix) * np.exp(rng.normal(0, 1, COLS))
    x[:, 5] = 0.0  # a dead input
    h = x.T @ x
    w = rng.standard_normal((rows, COLS)).astype(np.float32)
    return w, h, (np.diag(h) / len(x)).astype(np.float32)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_correlated_hessian_lowers_the_output_error(type_name):
    w, h, imp = _correlated(32)
    for importance in (None, imp):
        rtn = formats.dequantize(formats.quantize(w, type_name, importance), type_name, w.shape)
        data = quantize(w, type_name, h, importance)
        gptq = formats.dequantize(data, type_name, w.shape)  # ordinary blocks of the type
        ratio = output_error(w, gptq, h) / output_error(w, rtn, h)
        assert ratio < 0.85, (type_name, importance is not None, ratio)
        static = formats.dequantize(quantize(w, type_name, h, importance, act_order=True), type_name, w.shape)
        assert output_error(w, static, h) / output_error(w, rtn, h) < 0.85, (type_name, "act-order")


def test_float_types_and_no_hessian_are_round_to_nearest():
    w, h, imp = _correlated(4)
    for t in ("F32", "F16", "BF16", "Q4_K"):
        assert quantize(w, t, None, imp) == formats.quantize(w, t, imp)
    assert quantize(w, "F16", h, imp) == formats.quantize(w, "F16", imp)


def test_bad_hessians_are_clear_errors():
    w, h, imp = _correlated(4)
    with pytest.raises(MixquantError, match="does not fit a tensor with 512 columns"):
        quantize(w, "Q4_0", h[:256, :256], imp)
    bad = h.copy()
    bad[3, 4] = np.nan
    with pytest.raises(MixquantError, match="NaN or infinite"):
        quantize(w, "Q4_0", bad, imp)
    singular = np.ones((COLS, COLS))  # rank 1
    with pytest.raises(MixquantError, match="singular"):
        quantize(w, "Q4_0", singular, imp, damp=0.0)
    quantize(w, "Q4_0", singular, imp)  # the default damping makes it usable
