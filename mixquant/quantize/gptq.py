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

4. optionally (`refit`), with the codes fixed, refit each block's stored parameters (float16 d and
   dmin, integer sub-block scales and mins: the format's `BlockScales`) where that lowers
   tr(dW H dW^T), block by block with the gradient H dW of every other block's current error.

With a diagonal H no error moves anything, so the bytes are exactly round-to-nearest's
(`formats.quantize`) without the refit; tests/test_gptq.py checks this for every format.

The per-column work runs in numba over all rows; Python only loops over blocks.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
from numba import njit, prange

from .. import formats
from ..errors import MixquantError
from ..formats import iquants, kquants, legacy
from ..formats.base import Codec

METHODS = ("rtn", "gptq")
DEFAULT_DAMP = 0.01
DEFAULT_REFIT = True  # measured: lower mean and p99 KLD at Q3_K_M, Q2_K (README)
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


def dampened(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """A float64 copy of H with `damp` x its mean live diagonal added to the diagonal and dead
    columns (H_ii = 0) given a unit diagonal: the matrix the sweep and the refit minimise with."""
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
    return h


def inverse_hessian_factor(h: np.ndarray, damp: float = DEFAULT_DAMP, *, is_dampened: bool = False) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1, U^T U = H^-1 (float64), dead columns set to 1."""
    import torch

    h = h if is_dampened else dampened(h, damp)
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


# ---------------------------------------------------------------------------------------------
# the refit: with the codes fixed, each block's stored parameters moved where they lower
# tr(dW H dW^T), block by block (Gauss-Seidel), every change checked with the values as decoded
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _decoded(d, sc, dmin, m, min_sign, has_min, value):
    """The decoder's float32 value of one weight (`BlockScales`), in its order of operations."""
    y = np.float32(np.float32(d * np.float32(sc)) * np.float32(value))
    if has_min:
        y = np.float32(y + np.float32(min_sign) * np.float32(dmin * np.float32(m)))
    return y


@njit(cache=True, nogil=True, error_model="numpy")
def _block_values(d, dmin, sc, m, codes, values, sub, has_min, min_sign, out):
    rows, block = codes.shape
    for r in range(rows):
        for j in range(block):
            k = j // sub
            out[r, j] = _decoded(d[r], sc[r, k], dmin[r], m[r, k], min_sign, has_min, values[codes[r, j]])


@njit(cache=True, nogil=True, error_model="numpy")
def _refit_sub_blocks(v, g, h, codes, values, d, dmin, sc, m, sub, scale_range, min_range, has_min, min_sign):
    """Per row and sub-block k: try the integer scale (then min) nearest the least-squares optimum
    given everything else and its two neighbours; keep the best that lowers the error.

    v (rows, block): the decoded values; g = H_B,: dw (rows, block), the error's gradient in the
    block's values (up to -2); changing v_k by dv changes the error by -2 dv.g_k + dv H_kk dv,
    computed with the decoded values of the candidate. v, g, sc, m are updated in place."""
    rows, block = v.shape
    dv = np.empty(sub)
    u = np.empty(sub)
    for r in range(rows):
        for k in range(block // sub):
            j0 = k * sub
            for which in range(2):
                lo, hi = (scale_range[0], scale_range[1]) if which == 0 else (min_range[0], min_range[1])
                if lo == hi or (which == 1 and not has_min):
                    continue
                ints = sc if which == 0 else m
                for i in range(sub):  # the change of each value per unit of the integer
                    u[i] = np.float64(d[r]) * values[codes[r, j0 + i]] if which == 0 else min_sign * np.float64(dmin[r])
                num = 0.0
                den = 0.0
                for i in range(sub):
                    num += u[i] * g[r, j0 + i]
                    t = 0.0
                    for l in range(sub):
                        t += h[j0 + i, j0 + l] * u[l]
                    den += u[i] * t
                if not den > 0.0:
                    continue
                current = ints[r, k]
                step = num / den
                if not abs(step) < 1e6:
                    continue
                nearest = current + np.int64(np.round(step))
                best_gain = 0.0
                best = current
                for cand in (nearest, current - 1, current + 1):
                    cand = min(hi, max(lo, cand))
                    if cand == current:
                        continue
                    ints[r, k] = cand
                    for i in range(sub):
                        dv[i] = _decoded(d[r], sc[r, k], dmin[r], m[r, k], min_sign, has_min,
                                         values[codes[r, j0 + i]]) - v[r, j0 + i]
                    change = 0.0
                    for i in range(sub):
                        t = 0.0
                        for l in range(sub):
                            t += h[j0 + i, j0 + l] * dv[l]
                        change += dv[i] * (t - 2.0 * g[r, j0 + i])
                    if change < best_gain:
                        best_gain = change
                        best = cand
                ints[r, k] = best
                if best == current:
                    continue
                for i in range(sub):
                    dv[i] = _decoded(d[r], sc[r, k], dmin[r], m[r, k], min_sign, has_min,
                                     values[codes[r, j0 + i]]) - v[r, j0 + i]
                    v[r, j0 + i] += dv[i]
                for i in range(block):
                    t = 0.0
                    for l in range(sub):
                        t += h[i, j0 + l] * dv[l]
                    g[r, i] -= t


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64 by torch on the calling thread (numpy's BLAS threads spin on a loaded machine)."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _refit_super_scales(v, g, h, codes, values, d, dmin, sc, m, bs) -> None:
    """All rows at once: the float16 d (and dmin) nearest the least-squares optimum given the codes
    and the integer sub-block scales, kept in the rows where it lowers the error. In place."""
    sub, has_min = bs.sub_block, bs.min_range is not None
    per_weight = np.repeat(np.arange(sc.shape[1]), sub)
    a = sc[:, per_weight].astype(np.float64) * values[codes]  # dv per unit of d
    ha = _matmul(a, h)
    aa, ag = np.einsum("ij,ij->i", ha, a), np.einsum("ij,ij->i", a, g)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if has_min:
            b = bs.min_sign * m[:, per_weight].astype(np.float64)  # dv per unit of dmin
            hb = _matmul(b, h)
            ab, bb, bg = np.einsum("ij,ij->i", ha, b), np.einsum("ij,ij->i", hb, b), np.einsum("ij,ij->i", b, g)
            det = aa * bb - ab * ab
            joint = det > 1e-9 * aa * bb
            step_d = np.where(joint, (bb * ag - ab * bg) / det, ag / aa)
            step_m = np.where(joint, (aa * bg - ab * ag) / det, 0.0)
        else:
            step_d, step_m = ag / aa, np.zeros_like(ag)
        new_d = (d + step_d).astype(np.float16).astype(np.float32)
        new_dmin = (dmin + step_m).astype(np.float16).astype(np.float32) if has_min else dmin
    ok = np.isfinite(new_d) & np.isfinite(new_dmin)
    new_d, new_dmin = np.where(ok, new_d, d), np.where(ok, new_dmin, dmin)
    new_v = np.empty_like(v)
    _block_values(new_d, new_dmin, sc, m, codes, values, sub, has_min, bs.min_sign, new_v)
    dv = new_v - v
    hdv = _matmul(dv, h)
    keep = np.einsum("ij,ij->i", dv, hdv - 2 * g) < 0
    d[keep], dmin[keep], v[keep] = new_d[keep], new_dmin[keep], new_v[keep]
    g[keep] -= hdv[keep]


def refit_scales(w: np.ndarray, data: np.ndarray, codec: Codec, fr, h: np.ndarray, rounds: int = 2) -> np.ndarray:
    """`data` (rows, row_bytes) with each block's stored parameters refitted given its codes:
    block by block, the float16 d (and dmin) by least squares, then each integer sub-block scale
    and min to the best of the one nearest its least-squares optimum and its two neighbours;
    `rounds` times where there are sub-block scales (a second round lowers the error by another
    0.2 to 1% there, measured on real tensors; without them a second least-squares step changes
    nothing). A change is kept only where it lowers tr(dW H dW^T) as the decoder's values give it
    (float64 sums), so per row the error never goes up. The codes are unchanged."""
    import torch

    bs = fr.scales
    if bs.scale_range[0] == bs.scale_range[1] and (bs.min_range is None or bs.min_range[0] == bs.min_range[1]):
        rounds = 1
    size, tsize = codec.block_size, codec.type_size
    values = fr.values.astype(np.float32).astype(np.float64)
    scale_range = np.array(bs.scale_range, dtype=np.int64)
    min_range = np.array(bs.min_range or (0, 0), dtype=np.int64)
    out = data.copy()
    dw = w.astype(np.float64) - codec.dequantize_rows(out)
    with _torch_threads(1):
        for c0 in range(0, w.shape[1], size):
            nb = c0 // size * tsize
            block = out[:, nb:nb + tsize]
            g = (torch.from_numpy(dw) @ torch.from_numpy(h[:, c0:c0 + size])).numpy()  # H dw of each row, here
            h_block = np.ascontiguousarray(h[c0:c0 + size, c0:c0 + size])
            d, dmin, sc, m = bs.read(block)
            codes = fr.layout.unpack(block)
            v = np.empty(codes.shape)
            _block_values(d, dmin, sc, m, codes, values, bs.sub_block, bs.min_range is not None, bs.min_sign, v)
            for _ in range(rounds):
                _refit_super_scales(v, g, h_block, codes, values, d, dmin, sc, m, bs)
                _refit_sub_blocks(v, g, h_block, codes, values, d, dmin, sc, m, bs.sub_block, scale_range,
                                  min_range, bs.min_range is not None, bs.min_sign)
            out[:, nb:nb + tsize] = bs.write(block, d, dmin, sc, m)
            dw[:, c0:c0 + size] = w[:, c0:c0 + size] - v
    return out


def _row_errors(w: np.ndarray, data: np.ndarray, codec: Codec, h: np.ndarray) -> np.ndarray:
    """(W - Q) H (W - Q)^T's diagonal: each row's error, rows being independent."""
    import torch

    dw = w.astype(np.float64) - codec.dequantize_rows(data)
    with _torch_threads(1):
        return np.einsum("ij,ij->i", (torch.from_numpy(dw) @ torch.from_numpy(h)).numpy(), dw)


def _uniform_grid(fr) -> np.ndarray | None:
    """(lo, hi, shift) for the k-quants' rounding (`kquants.frozen_code`) where the code values are
    the consecutive integers lo .. hi (code = value + shift), else None (Q8_0's int8 bytes, IQ4)."""
    lo, hi = int(fr.values[0]), int(fr.values[-1])
    if not np.array_equal(fr.values, np.arange(lo, hi + 1)):
        return None
    return np.array([lo, hi, -lo], dtype=np.int64)


def _value_params(codec: Codec, fr, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (scale, offset) with value(code) = scale * values[code] + offset, from the decoder."""
    c0, c1 = fr.probe
    full = np.ones((data.shape[0], codec.block_size), dtype=np.int64)
    v0 = codec.dequantize_rows(fr.layout.pack(full * c0, data)).astype(np.float64)
    v1 = codec.dequantize_rows(fr.layout.pack(full * c1, data)).astype(np.float64)
    s = (v1 - v0) / (fr.values[c1] - fr.values[c0])
    return s, v0 - s * fr.values[c0]


@dataclass(frozen=True)
class GptqOptions:
    """GPTQ's options, the one place their names and defaults live: `HessianQuantizer(hessians,
    model, **asdict(options))`, `quantize --method gptq --gptq-*`, `analyze(..., gptq_options=)`
    (recorded in a sensitivity's settings under these names). Errors name the command-line flags."""

    damp: float = DEFAULT_DAMP
    act_order: bool = False
    refit: bool = DEFAULT_REFIT
    resweeps: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.damp < math.inf:  # NaN and inf fail too
            raise MixquantError(f"--gptq-damp must be a finite fraction >= 0, got {self.damp}")
        if self.resweeps and (self.resweeps < 0 or not self.refit):
            raise MixquantError(f"--gptq-resweeps takes a count >= 0 and the refit, got {self.resweeps}"
                                + ("" if self.refit else " with --no-gptq-refit"))

    @classmethod
    def recorded(cls, settings: Mapping[str, Any]) -> GptqOptions:
        """The options a sensitivity of method gptq was measured with (its `settings`). Files older
        than an option were measured without it (natural order, no resweeps); a file older than the
        refit records no "refit" and is read as today's default, which may not be what it measured."""
        recorded = {f.name: settings[f.name] for f in fields(cls) if f.name in settings}
        for name, value in recorded.items():
            kind = type(getattr(cls, name))  # the default's: float, bool or int
            valid = isinstance(value, bool) if kind is bool else \
                not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
            if not valid:
                what = {float: "a number", bool: "true or false", int: "a whole number"}[kind]
                raise MixquantError(f"settings.{name} is {value!r}, not {what}")
        return cls(**recorded)

    def flags(self) -> dict[str, str]:
        """Each option as its command-line flag: {"damp": "--gptq-damp 0.01", ...}."""
        return {"act_order": f"--gptq-order {'act' if self.act_order else 'natural'}",
                "refit": "--gptq-refit" if self.refit else "--no-gptq-refit",
                "damp": f"--gptq-damp {float(self.damp)!r}", "resweeps": f"--gptq-resweeps {self.resweeps}"}


@dataclass(frozen=True)
class Factor:
    """What the sweep needs of H: the column order (None: natural; act-order: by descending
    diag(H)) and U, the upper Cholesky factor of the dampened H^-1 in that order; and what the
    refit needs: the dampened H itself (natural order)."""

    u: np.ndarray
    order: np.ndarray | None = None
    h: np.ndarray | None = None


def factor(h: np.ndarray, damp: float = DEFAULT_DAMP, act_order: bool = False) -> Factor:
    hd = dampened(h, damp)
    if not act_order:
        return Factor(inverse_hessian_factor(hd, is_dampened=True), None, hd)
    order = np.argsort(-np.diagonal(np.asarray(h)), kind="stable")
    return Factor(inverse_hessian_factor(hd[np.ix_(order, order)], is_dampened=True), order, hd)


# rows x cols values above which a tensor is rounded a slice of rows at a time: the sweep and the
# refit each hold float64 copies of what they round (about 4 x 8 bytes a value)
_SLICE_VALUES = 1 << 23
# rows per thread below which HessianQuantizer rounds a tensor on one thread (the numba sweeps
# release the GIL; below this the threads' start-up outweighs the work)
_MIN_THREAD_ROWS = 64


def quantize(w: np.ndarray, type_name: str, H: np.ndarray | None = None, importance: np.ndarray | None = None,
             *, damp: float = DEFAULT_DAMP, act_order: bool = False, prepared: Factor | None = None,
             refit: bool = DEFAULT_REFIT, resweeps: int = 0) -> bytes:
    """The GGUF bytes of the (rows, cols) float32 matrix `w` in `type_name`, rounded with GPTQ's
    error feedback through H (cols, cols), the sum of x x^T of the input `w` multiplies.

    Without H this is `formats.quantize` (round-to-nearest, as llama-quantize). F32/F16/BF16 are
    unchanged. `importance` is the imatrix vector, used by ggml's scale search as llama-quantize
    uses it. act_order: static groups (every block fitted on the original weights first, then the
    columns swept by descending diag(H); GGUF has no column index, so codes go back in place).
    `prepared`: `factor(H, damp, act_order)` computed already (instead of H). refit: afterwards,
    each block's stored scales refitted given its codes (`refit_scales`). resweeps (with refit, in
    natural order, formats whose codes are consecutive integers): that many more sweeps with the
    refitted parameters frozen, each refitted again, a row kept only where its error went down.
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
    step = max(1, _SLICE_VALUES // cols)
    if rows > step:  # rows are rounded independently: slices bound the float64 copies (a large vocabulary)
        fac = factor(H, damp, act_order) if prepared is None else prepared
        return b"".join(quantize(w[r:r + step], codec.name, importance=importance, prepared=fac, refit=refit,
                                 resweeps=resweeps) for r in range(0, rows, step))
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
        sweep_natural = None
    else:
        def sweep_natural(fit, family, params):
            """The natural-order sweep, each block's parameters from fit(block weights, c0); into out."""
            work = w.astype(np.float64)
            codes = np.empty((rows, bsize), dtype=np.int64)
            for i1 in range(0, cols, lazy):
                i2 = min(cols, i1 + lazy)
                batch = np.ascontiguousarray(work[:, i1:i2])
                err = np.zeros_like(batch)
                u1 = np.ascontiguousarray(u[i1:i2, i1:i2])
                for b0 in range(0, i2 - i1, bsize):
                    c0 = i1 + b0
                    data, scale, offset, fit_codes, value_scale, value_offset = fit(batch[:, b0:b0 + bsize], c0)
                    _sweep_block(batch, err, u1, b0, scale, offset, fit_codes, family, params,
                                 value_scale, value_offset, fr.values, codes)
                    nb = c0 // bsize * codec.type_size
                    out[:, nb:nb + codec.type_size] = fr.layout.pack(codes, data)
                if i2 < cols:
                    with _torch_threads(1):
                        delta = (torch.from_numpy(err) @ torch.from_numpy(u[i1:i2, i2:])).numpy()
                    work[:, i2:] -= delta

        sweep_natural(fit, fr.family, fr.params)
        if refit:
            out = refit_scales(w, out, codec, fr, fac.h)
            grid = _uniform_grid(fr)
            for _ in range(resweeps if grid is not None else 0):
                stored = out.copy()

                def fit_stored(_block_w, c0, stored=stored):
                    data = stored[:, c0 // bsize * codec.type_size:(c0 // bsize + 1) * codec.type_size]
                    value_scale, value_offset = _value_params(codec, fr, data)
                    return (data, value_scale.astype(np.float32), value_offset.astype(np.float32),
                            fr.layout.unpack(data), value_scale, value_offset)

                sweep_natural(fit_stored, 1, grid)
                out = refit_scales(w, out, codec, fr, fac.h)
                better = _row_errors(w, out, codec, fac.h) < _row_errors(w, stored, codec, fac.h)
                out[~better] = stored[~better]  # alternating is not monotone: per row, keep the lower error
        return out.tobytes()
    for i1 in range(0, cols, lazy):
        i2 = min(cols, i1 + lazy)
        batch = np.ascontiguousarray(work[:, i1:i2])
        err = np.zeros_like(batch)
        u1 = np.ascontiguousarray(u[i1:i2, i1:i2])
        cols_here = fac.order[i1:i2]
        scale, offset, fit_codes, value_scale, value_offset = (a[:, cols_here] for a in per_col)
        part = np.empty((rows, i2 - i1), dtype=np.int64)
        _sweep_block(batch, err, u1, 0, scale, offset, fit_codes, fr.family, fr.params, value_scale,
                     value_offset, fr.values, part)
        codes[:, cols_here] = part
        if i2 < cols:
            with _torch_threads(1):
                delta = (torch.from_numpy(err) @ torch.from_numpy(u[i1:i2, i2:])).numpy()
            work[:, i2:] -= delta
    for b, c0 in enumerate(range(0, cols, bsize)):
        nb = b * codec.type_size
        out[:, nb:nb + codec.type_size] = fr.layout.pack(codes[:, c0:c0 + bsize], datas[b])
    if refit:
        del work, batch, err  # the sweep's float64 copies, before the refit makes its own
        out = refit_scales(w, out, codec, fr, fac.h)
    return out.tobytes()


class HessianQuantizer:
    """The per-tensor quantizer `export.write_gguf` takes for `--method gptq`: GPTQ for every tensor
    whose input has a Hessian, round-to-nearest for the rest (norms, an untied token embedding,
    inputs the Hessians leave out). The factor of H^-1 is computed once per input (q/k/v share it).
    """

    def __init__(self, hessians, model, damp: float = DEFAULT_DAMP, act_order: bool = False,
                 refit: bool = DEFAULT_REFIT, resweeps: int = 0, threads: int = 1,
                 keep_factors: bool = False):
        from ..calibrate import input_of
        from ..hessians import model_shape

        self.hessians = hessians
        self.damp = damp
        self.act_order = act_order
        self.refit = refit
        self.resweeps = resweeps
        hessians.check_model(model_shape(model), str(hessians.path or "Hessians"))
        self._key = {t.name: input_of(t.name, tied_output=bool(model.tied_output)) for t in model.tensors}
        for t in model.tensors:  # refuse Hessians of another shape before any work
            key = self._key[t.name]
            if key in hessians and len(t.shape) == 2 and hessians.cols(key) != t.shape[-1]:
                raise MixquantError(f"{hessians.path or 'Hessians'}: Hessians are for another model ({key} has "
                                    f"{hessians.cols(key)} columns, {t.name} has {t.shape[-1]})")
        self.threads = threads
        # export takes tensors block by block: one block's factors at a time (`_same_unit`); an
        # analysis work item goes back and forth between its units' inputs: all kept
        self.keep_factors = keep_factors
        self._factors: dict[str, Factor] = {}
        self._matrices: dict[str, np.ndarray] = {}
        self.gptq_tensors = 0

    def hessian(self, name: str) -> np.ndarray | None:
        """H of the input tensor `name` multiplies (None where it is rounded to nearest)."""
        key = self._key.get(name)
        if key not in self.hessians:
            return None
        if key not in self._matrices:
            if not self.keep_factors:
                self._matrices.clear()
            self._matrices[key] = self.hessians.matrix(key)
        return self._matrices[key]

    def __call__(self, name: str, w: np.ndarray, type_name: str, importance: np.ndarray | None) -> bytes:
        key = self._key.get(name)
        codec = formats.get(type_name)
        if key not in self.hessians or codec.frozen is None:
            return formats.quantize(w, type_name, importance, threads=self.threads)
        if key not in self._factors:
            if not self.keep_factors and not self._same_unit(key):
                self._factors.clear()
            self._factors[key] = factor(self.hessian(name), self.damp, self.act_order)
        self.gptq_tensors += 1
        rounded = functools.partial(quantize, type_name=type_name, importance=importance, prepared=self._factors[key],
                                    refit=self.refit, resweeps=self.resweeps)
        share = -(-w.shape[0] // max(1, self.threads))
        if self.threads <= 1 or share < _MIN_THREAD_ROWS:
            return rounded(w)
        # rows are rounded independently (as the row slices above): a share of rows per thread, the
        # same bytes; torch is held at one thread meanwhile, so no worker's setting races another's
        with _torch_threads(1), ThreadPoolExecutor(self.threads) as pool:
            return b"".join(pool.map(lambda r: rounded(w[r:r + share]), range(0, w.shape[0], share)))

    def _same_unit(self, key: str) -> bool:
        """Whether the factors kept are of `key`'s block: export visits a block's tensors in name
        order, which goes back and forth between its inputs (attn_k, attn_output, attn_q...), so a
        block's factors are kept together and dropped when the next block starts."""
        unit = key.rpartition(".")[0]
        return all(k.rpartition(".")[0] == unit for k in self._factors)
