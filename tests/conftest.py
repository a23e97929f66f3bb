"""Shared fixtures: the reference ggml oracle and the tensor distributions every codec is checked on."""

import numpy as np
import pytest

from mixquant.reference import ggml as _ggml


@pytest.fixture(scope="session")
def ggml():
    """ggml-base from the vendored llama.cpp, called through ctypes."""
    return _ggml()


def tensor_cases(cols: int = 512, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random (rows, cols) float32 matrices of the shapes of trouble ggml meets in real models."""
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((rows, cols))
    heavy = rng.standard_t(2, (rows, cols))
    outliers = gauss.copy()
    outliers.flat[rng.choice(outliers.size, outliers.size // 100, replace=False)] *= 50
    blocks = gauss.copy()
    blocks[:, :64] = 0.0  # all-zero blocks
    blocks[:, 64:128] = 0.37  # constant blocks
    blocks[:, 128:160] = -2.5
    blocks[1] = 0.0  # an all-zero row
    mixed_sign = np.abs(gauss) * (rng.random((rows, cols)) < 0.5)  # non-negative, many exact zeros
    cases = {
        "gaussian": gauss,
        "heavy_tailed": heavy,
        "outliers": outliers,
        "zero_and_constant_blocks": blocks,
        "non_negative_sparse": mixed_sign,
        "tiny": gauss * 1e-6,
        "huge": gauss * 1e4,
        "uniform": rng.uniform(-1, 1, (rows, cols)),
    }
    return {name: np.ascontiguousarray(x, dtype=np.float32) for name, x in cases.items()}


def importance_cases(cols: int = 512, seed: int = 1) -> dict[str, np.ndarray | None]:
    """Importance vectors like llama-imatrix produces: positive, spread over orders of magnitude."""
    rng = np.random.default_rng(seed)
    return {
        "none": None,
        "lognormal": np.exp(rng.normal(0, 2, cols)).astype(np.float32),
        "with_zeros": np.where(rng.random(cols) < 0.2, 0, rng.random(cols)).astype(np.float32),
    }
