"""GPTQ inside GGUF blocks: round each weight with the error of the ones before it fed forward.

For one tensor W (rows = output channels; GGUF blocks run along the input columns, which is the
order GPTQ sweeps them in) and H = sum x x^T of its input:

1. dampen H (`damp` x mean of its diagonal on the diagonal); a dead column (H_ii = 0) gets 1 on
   the diagonal, and its weights are rounded as usual (their error reaches no output);
2. U = the upper Cholesky factor of H^-1, in float64;
3. sweep the columns in lazy batches of whole blocks (128 columns for 32-blocks, one 256
   super-block for k-quants and IQ4_XS). When the sweep reaches a block, fit its parameters with
   ggml's own search on the error-updated weights (importance: the imatrix, as llama-quantize
   would pass it), freeze them, then round the block column by column with ggml's own final
   rounding step, each column's error e = (w - q) / U_jj moving the columns after it by -e U_j,.

With a diagonal H no error moves anything, so the bytes are exactly round-to-nearest's
(`formats.quantize`); tests/test_gptq.py checks this for every format.

The per-column work runs in numba over all rows; Python only loops over blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .. import formats
from ..errors import MixquantError
from ..formats import iquants, kquants, legacy
from ..formats.base import Codec

METHODS = ("rtn", "gptq")
DEFAULT_DAMP = 0.01
_LAZY_COLUMNS = 128  # columns per lazy batch (rounded up to whole blocks)


@contextmanager
def _torch_threads(n: int):
    """torch with n threads meanwhile: small factorisations and products lose more to thread
    start-up and spinning than they gain (10x slower with 2 threads on a loaded 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T): the squared output error summed over H's inputs."""
    d = w.astype(np.float64) - q.astype(np.float64)
    return float(np.einsum("ij,ij->", d @ h, d))


def inverse_hessian_factor(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1, U^T U = H^-1 (float64), dead columns set to 1."""
    import torch

    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise MixquantError(f"Hessian must be square, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise MixquantError("Hessian has NaN or infinite entries")
    diag = np.diagonal(h).copy()
    if (diag < 0).any():
        raise MixquantError("Hessian has a negative diagonal entry: not a sum of x x^T")
    dead = diag == 0
    h[dead, dead] = 1.0
    live = diag[~dead]
    h[np.diag_indices_from(h)] += damp * (live.mean() if live.size else 1.0)
    # With J the order-reversing permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J) and
    # J L^-1 J is upper triangular with a positive diagonal: it is U, for one factorisation and one
    # triangular inverse (a third of cholesky + cholesky_inverse + cholesky).
    with _torch_threads(1):
        rev = torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1]))
        chol, info = torch.linalg.cholesky_ex(rev)
        if int(info):
            raise MixquantError(f"Hessian is singular even with {damp:g} x mean diagonal damping "
                                "(not positive definite)")
        inv = torch.linalg.solve_triangular(chol, torch.eye(h.shape[0], dtype=torch.float64), upper=False)
    u = np.ascontiguousarray(inv.numpy()[::-1, ::-1])
    if not np.isfinite(u).all():
        raise MixquantError("Hessian is too ill-conditioned to invert in float64")
    return u


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _code(family, x, scale, offset, params):
    if family == 0:
        return legacy.frozen_code(x, scale, offset, params)
    if family == 1:
        return kquants.frozen_code(x, scale, offset, params)
    return iquants.frozen_code(x, scale, offset, params)


@njit(cache=True, nogil=True, error_model="numpy", parallel=False)
def _sweep_block(w, err, u, b0, scale, offset, fit_codes, family, params, value_scale, value_offset, values, codes):
    """Round columns b0 .. b0 + block of the lazy batch w (rows, n) float64 with the frozen block
    parameters, feeding each column's error into the later columns of the batch (rows independent)."""
    rows, n = w.shape
    block = scale.shape[1]
    for r in prange(rows):
        for jj in range(block):
            j = b0 + jj
            x = w[r, j]
            c = _code(family, np.float32(x), scale[r, jj], offset[r, jj], params)
            if c < 0:
                c = fit_codes[r, jj]
            codes[r, jj] = c
            e = (x - (value_scale[r, jj] * values[c] + value_offset[r, jj])) / u[j, j]
            err[r, j] = e
            for k in range(j + 1, n):
                d = e * u[j, k]
                if d != 0.0:  # an exact zero leaves w, and the sign of a zero weight, untouched
                    w[r, k] -= d


def _value_params(codec: Codec, fr, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (scale, offset) with value(code) = scale * values[code] + offset, from the decoder."""
    c0, c1 = fr.probe
    full = np.ones((data.shape[0], codec.block_size), dtype=np.int64)
    v0 = codec.dequantize_rows(fr.layout.pack(full * c0, data)).astype(np.float64)
    v1 = codec.dequantize_rows(fr.layout.pack(full * c1, data)).astype(np.float64)
    s = (v1 - v0) / (fr.values[c1] - fr.values[c0])
    return s, v0 - s * fr.values[c0]


@dataclass(frozen=True)
class Factor:
    """What the sweep needs of H: the column order (None: natural; act-order: by descending
    diag(H)) and U, the upper Cholesky factor of the dampened H^-1 in that order."""

    u: np.ndarray
    order: np.ndarray | None = None


def factor(h: np.ndarray, damp: float = DEFAULT_DAMP, act_order: bool = False) -> Factor:
    if not act_order:
        return Factor(inverse_hessian_factor(h, damp))
    order = np.argsort(-np.diagonal(np.asarray(h)), kind="stable")
    return Factor(inverse_hessian_factor(np.asarray(h)[np.ix_(order, order)], damp), order)


def quantize(w: np.ndarray, type_name: str, H: np.ndarray | None = None, importance: np.ndarray | None = None,
             *, damp: float = DEFAULT_DAMP, act_order: bool = False, prepared: Factor | None = None) -> bytes:
    """The GGUF bytes of the (rows, cols) float32 matrix `w` in `type_name`, rounded with GPTQ's
    error feedback through H (cols, cols), the sum of x x^T of the input `w` multiplies.

    Without H this is `formats.quantize` (round-to-nearest, as llama-quantize). F32/F16/BF16 are
    unchanged. `importance` is the imatrix vector, used by ggml's scale search as llama-quantize
    uses it. act_order: static groups (every block fitted on the original weights first, then the
    columns swept by descending diag(H); GGUF has no column index, so codes go back in place).
    `prepared`: `factor(H, damp, act_order)` computed already (instead of H).
    """
    import torch

    codec = formats.get(type_name)
    if (H is None and prepared is None) or codec.frozen is None:
        return formats.quantize(w, codec.name, importance)
    formats._check_matrix(w, codec)
    rows, cols = w.shape
    shape = np.shape(H) if prepared is None else prepared.u.shape
    if shape != (cols, cols):
        raise MixquantError(f"Hessian of shape {shape} does not fit a tensor with {cols} columns")
    used = codec.uses_importance and importance is not None
    imp = formats._check_importance(importance, cols, rows) if used else None
    if imp is not None and imp.shape[0] != 1:  # one H serves one matrix, not a stack of experts
        raise MixquantError(f"GPTQ takes one importance vector per matrix; got {imp.shape[0]} (a stack of experts)")
    imp = None if imp is None else imp[0]
    fr = codec.frozen(used)
    context = fr.row_context(w) if used and fr.row_context is not None else None
    fac = factor(H, damp, act_order) if prepared is None else prepared
    u = fac.u

    bsize = codec.block_size
    lazy = max(bsize, -(-_LAZY_COLUMNS // bsize) * bsize)
    out = np.empty((rows, codec.row_bytes(cols)), dtype=np.uint8)

    def fit(block_w: np.ndarray, c0: int):
        data, scale, offset = fr.fit(block_w.astype(np.float32), None if imp is None else imp[c0:c0 + bsize], context)
        return (data, scale, offset, fr.layout.unpack(data), *_value_params(codec, fr, data))

    if fac.order is not None:  # static groups: all fits first, then one sweep in the order of U
        # per weight, in compact types (a few bytes each): scale, offset, fit code, value scale and offset
        per_col = [np.empty((rows, cols), dtype=t) for t in (np.float32, np.float32, np.int16, np.float32, np.float32)]
        datas = []
        for c0 in range(0, cols, bsize):
            data, *params = fit(w[:, c0:c0 + bsize], c0)
            datas.append(data)
            for dst, src in zip(per_col, params):
                dst[:, c0:c0 + bsize] = src
        work = np.ascontiguousarray(w[:, fac.order], dtype=np.float64)
        codes = np.empty((rows, cols), dtype=np.int16)  # in place (natural column order)
    else:
        work = w.astype(np.float64)
        codes = np.empty((rows, bsize), dtype=np.int64)
    for i1 in range(0, cols, lazy):
        i2 = min(cols, i1 + lazy)
        batch = np.ascontiguousarray(work[:, i1:i2])
        err = np.zeros_like(batch)
        u1 = np.ascontiguousarray(u[i1:i2, i1:i2])
        if fac.order is not None:
            cols_here = fac.order[i1:i2]
            scale, offset, fit_codes, value_scale, value_offset = (a[:, cols_here] for a in per_col)
            part = np.empty((rows, i2 - i1), dtype=np.int64)
            _sweep_block(batch, err, u1, 0, scale, offset, fit_codes, fr.family, fr.params, value_scale,
                         value_offset, fr.values, part)
            codes[:, cols_here] = part
        else:
            for b0 in range(0, i2 - i1, bsize):
                c0 = i1 + b0
                data, scale, offset, fit_codes, value_scale, value_offset = fit(batch[:, b0:b0 + bsize], c0)
                _sweep_block(batch, err, u1, b0, scale, offset, fit_codes, fr.family, fr.params,
                             value_scale, value_offset, fr.values, codes)
                nb = c0 // bsize * codec.type_size
                out[:, nb:nb + codec.type_size] = fr.layout.pack(codes, data)
        if i2 < cols:
            with _torch_threads(1):
                delta = (torch.from_numpy(err) @ torch.from_numpy(u[i1:i2, i2:])).numpy()
            work[:, i2:] -= delta
    if fac.order is not None:
        for b, c0 in enumerate(range(0, cols, bsize)):
            nb = b * codec.type_size
            out[:, nb:nb + codec.type_size] = fr.layout.pack(codes[:, c0:c0 + bsize], datas[b])
    return out.tobytes()


class HessianQuantizer:
    """The per-tensor quantizer `export.write_gguf` takes for `--method gptq`: GPTQ for every tensor
    whose input has a Hessian, round-to-nearest for the rest (norms, an untied token embedding,
    inputs the Hessians leave out). The factor of H^-1 is computed once per input (q/k/v share it).
    """

    def __init__(self, hessians, model, damp: float = DEFAULT_DAMP, act_order: bool = False):
        from ..calibrate import input_of
        from ..hessians import model_shape

        self.hessians = hessians
        self.damp = damp
        self.act_order = act_order
        hessians.check_model(model_shape(model), str(hessians.path or "Hessians"))
        self._key = {t.name: input_of(t.name, tied_output=bool(model.tied_output)) for t in model.tensors}
        for t in model.tensors:  # refuse Hessians of another shape before any work
            key = self._key[t.name]
            if key in hessians and len(t.shape) == 2 and hessians.cols(key) != t.shape[-1]:
                raise MixquantError(f"{hessians.path or 'Hessians'}: Hessians are for another model ({key} has "
                                    f"{hessians.cols(key)} columns, {t.name} has {t.shape[-1]})")
        self._factors: dict[str, Factor] = {}
        self.gptq_tensors = 0

    def __call__(self, name: str, w: np.ndarray, type_name: str, importance: np.ndarray | None) -> bytes:
        key = self._key.get(name)
        codec = formats.get(type_name)
        if key not in self.hessians or codec.frozen is None:
            return formats.quantize(w, type_name, importance)
        if key not in self._factors:
            self._factors.clear()  # tensors come block by block: keep only the current input's factor
            self._factors[key] = factor(self.hessians.matrix(key), self.damp, self.act_order)
        self.gptq_tensors += 1
        return quantize(w, type_name, importance=importance, prepared=self._factors[key])
