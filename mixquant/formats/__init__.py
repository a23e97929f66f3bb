"""GGUF block formats, byte-identical to ggml's `ggml_quantize_chunk` and `to_float`.

    quantize(x, "Q4_K", importance)  -> bytes   (rows concatenated, as ggml stores them)
    dequantize(data, "Q4_K", shape)  -> float32 array

Each format family lives in its own module and registers its codecs on import.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import MixquantError


def _drop_stale_kernel_cache() -> None:
    """numba's on-disk cache only tracks the file of the cached function itself, not the helpers
    it inlines from common.py/search.py: drop every cached kernel when any codec source changed."""
    here = Path(__file__).parent
    stamp = here / "__pycache__" / "kernels.stamp"
    current = str(max(p.stat().st_mtime_ns for p in here.glob("*.py")))
    try:
        if stamp.exists() and stamp.read_text() == current:
            return
        for cached in stamp.parent.glob("*.nb[ic]"):
            cached.unlink(missing_ok=True)
        stamp.write_text(current)
    except OSError:  # no cache folder yet, or read-only install: numba copes on its own
        pass


_drop_stale_kernel_cache()

from . import floats, iquants, kquants, legacy  # noqa: E402, F401  (registration)
from .base import REGISTRY, Codec  # noqa: E402

__all__ = ["Codec", "FORMATS", "get", "quantize", "dequantize", "quantized_size"]

FORMATS: tuple[str, ...] = tuple(REGISTRY)

# Rows per work item when quantizing on several threads (kernels release the GIL).
_CHUNK_ROWS = 64


def get(type_name: str) -> Codec:
    """The codec for a GGUF type name such as "Q4_K" (case-insensitive)."""
    codec = REGISTRY.get(str(type_name).upper())
    if codec is None:
        raise MixquantError(f"unknown tensor type {type_name!r}; known types: {', '.join(FORMATS)}")
    return codec


def _check_matrix(x: np.ndarray, codec: Codec) -> None:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"expected float32 weights, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, cols) array, got shape {x.shape}")
    if x.shape[1] % codec.block_size:
        raise ValueError(
            f"{codec.name} needs rows whose length is a multiple of {codec.block_size}; got {x.shape[1]}"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"weights contain {int(bad.sum())} NaN/Inf values (first at row {row}, column {col})")


def _check_importance(importance: np.ndarray | None, cols: int, rows: int = 1) -> np.ndarray | None:
    """A (groups, cols) float32 array: one vector per column, or one per equal group of rows."""
    if importance is None:
        return None
    importance = np.asarray(importance)
    groups = importance.size // cols if cols else 0
    if importance.ndim != 1 or groups < 1 or importance.size != groups * cols or rows % groups:
        raise ValueError(f"importance must be a vector of length {cols} (one per column), or of n * {cols} for a "
                         f"stack of n matrices splitting the {rows} rows, got shape {importance.shape}")
    importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(groups, cols)
    if not np.isfinite(importance).all() or (importance < 0).any():
        raise ValueError("importance must be finite and non-negative")
    return importance


def quantize(x: np.ndarray, type_name: str, importance: np.ndarray | None = None, threads: int = 1) -> bytes:
    """Quantize a (rows, cols) float32 matrix to the exact bytes ggml stores for it.

    `importance` is the per-column importance-matrix vector (ggml's `quant_weights`), or for a
    stack of n matrices (a mixture-of-experts' experts, rows matrix after matrix) n such vectors
    one after the other, each used for its matrix's rows, as llama-quantize slices its imatrix.
    """
    codec = get(type_name)
    _check_matrix(x, codec)
    x = np.ascontiguousarray(x)
    rows = x.shape[0]
    groups = _check_importance(importance, x.shape[1], rows) if codec.uses_importance else None
    group_rows = max(1, rows // len(groups) if groups is not None else rows)
    if threads <= 1 or rows <= _CHUNK_ROWS:
        if groups is None or len(groups) == 1:
            return codec.quantize_rows(x, None if groups is None else groups[0]).tobytes()
    out = np.empty((rows, codec.row_bytes(x.shape[1])), dtype=np.uint8)

    def work(start: int) -> None:
        # chunks never cross a matrix boundary: each has one importance vector
        stop = min(start + _CHUNK_ROWS, (start // group_rows + 1) * group_rows)
        imp = None if groups is None else groups[start // group_rows]
        out[start:stop] = codec.quantize_rows(x[start:stop], imp)

    starts = [s for g in range(0, rows, group_rows) for s in range(g, min(g + group_rows, rows), _CHUNK_ROWS)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(work, starts))
    return out.tobytes()


def quantized_size(type_name: str, shape: tuple[int, int]) -> int:
    """Bytes that a (rows, cols) tensor takes in the given type."""
    codec = get(type_name)
    rows, cols = shape
    if cols % codec.block_size:
        raise MixquantError(f"{codec.name} needs rows whose length is a multiple of {codec.block_size}; got {cols}")
    return rows * codec.row_bytes(cols)


def dequantize(data: bytes | np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode ggml bytes of a (rows, cols) tensor back to float32, exactly as ggml's `to_float`."""
    codec = get(type_name)
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D (rows, cols) shape, got {shape}")
    rows, cols = (int(s) for s in shape)
    expected = quantized_size(codec.name, (rows, cols))
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data.view(np.uint8).reshape(-1)
    if raw.size != expected:
        raise MixquantError(f"{codec.name} data for shape {(rows, cols)} must be {expected} bytes, got {raw.size}")
    return codec.dequantize_rows(raw.reshape(rows, codec.row_bytes(cols)))
