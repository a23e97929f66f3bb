"""The float types F32, F16 and BF16 (block size 1), as `ggml_quantize_chunk` writes them.

* F32: a plain copy (ggml memcpy's the rows).
* F16: `ggml_fp32_to_fp16_row`, i.e. `ggml_compute_fp32_to_fp16` per value (round to nearest
  even; NaN -> 0x7E00 | sign; overflow -> inf). Decoding mirrors `ggml_compute_fp16_to_fp32`
  operation by operation: a signaling-NaN half comes out as a *quiet* float NaN (the C multiplies
  it by 2**-112, which sets the quiet bit), which a plain bit-shuffling decoder would not do.
* BF16: `ggml_fp32_to_bf16_row_ref` (round to nearest even; NaN truncated and forced quiet with
  `| 64`); decoding is the 16-bit left shift.

None of them reads the importance vector.
"""

import numpy as np
from numba import njit

from .base import Codec, register
from .common import bits_to_f32, f32_to_bits, fp16_to_fp32, fp32_to_fp16

F32 = np.float32


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def ggml_fp32_to_bf16(s):
    """ggml_compute_fp32_to_bf16."""
    u = f32_to_bits(s)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # nan
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))  # force to quiet
    return np.uint16(((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFFFFFF)) >> np.uint32(16))


@njit(cache=True, nogil=True, error_model="numpy")
def _f32_to_f16_rows(x, out):
    rows, cols = x.shape
    for r in range(rows):
        for c in range(cols):
            out[r, c] = fp32_to_fp16(x[r, c])


@njit(cache=True, nogil=True, error_model="numpy")
def _f16_to_f32_rows(h, out):
    rows, cols = h.shape
    for r in range(rows):
        for c in range(cols):
            out[r, c] = fp16_to_fp32(h[r, c])


@njit(cache=True, nogil=True, error_model="numpy")
def _f32_to_bf16_rows(x, out):
    rows, cols = x.shape
    for r in range(rows):
        for c in range(cols):
            out[r, c] = ggml_fp32_to_bf16(x[r, c])


@njit(cache=True, nogil=True, error_model="numpy")
def _bf16_to_f32_rows(h, out):
    rows, cols = h.shape
    for r in range(rows):
        for c in range(cols):
            out[r, c] = bits_to_f32(np.uint32(h[r, c]) << np.uint32(16))


def _as_u16(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return data.view("<u2")


def _quantize_f32(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).copy()


def _dequantize_f32(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data, dtype=np.uint8).view("<f4").astype(np.float32, copy=True)


def _quantize_f16(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    out = np.empty(x.shape, dtype="<u2")
    _f32_to_f16_rows(np.ascontiguousarray(x, dtype=np.float32), out)
    return out.view(np.uint8)


def _dequantize_f16(data: np.ndarray) -> np.ndarray:
    h = _as_u16(data)
    out = np.empty(h.shape, dtype=np.float32)
    _f16_to_f32_rows(h, out)
    return out


def _quantize_bf16(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    out = np.empty(x.shape, dtype="<u2")
    _f32_to_bf16_rows(np.ascontiguousarray(x, dtype=np.float32), out)
    return out.view(np.uint8)


def _dequantize_bf16(data: np.ndarray) -> np.ndarray:
    h = _as_u16(data)
    out = np.empty(h.shape, dtype=np.float32)
    _bf16_to_f32_rows(h, out)
    return out


F32_CODEC = register(Codec("F32", _quantize_f32, _dequantize_f32, uses_importance=False))
F16_CODEC = register(Codec("F16", _quantize_f16, _dequantize_f16, uses_importance=False))
BF16_CODEC = register(Codec("BF16", _quantize_bf16, _dequantize_bf16, uses_importance=False))
