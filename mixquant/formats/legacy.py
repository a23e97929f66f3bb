"""The legacy 32-value block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, bit-exact with ggml.

One quantize kernel and one dequantize kernel serve all five; a format is just (bits, has_min):

    Q4_0 (4, False)   d            qs[16]      value = (q - 8) * d
    Q4_1 (4, True)    d, m         qs[16]      value = q * d + m
    Q5_0 (5, False)   d,    qh[4], qs[16]      value = (q - 16) * d
    Q5_1 (5, True)    d, m, qh[4], qs[16]      value = q * d + m
    Q8_0 (8, False)   d            qs[32]      value = (int8)q * d

Without importance, ggml uses the `quantize_row_*_ref` code (one scale from the block's extreme
value(s), truncating conversions). With importance (`quantize_row_*_impl`), each row gets
sigma2 = mean(x**2), each block the weights qw[j] * sqrtf(sigma2 + x[j]**2), and the scale comes
from make_qx_quants (symmetric, rmse_type 1) or make_qkx3_quants (with min: -0.9, 0.05, 36 steps).
Q8_0 always uses the _ref code (ggml ignores the importance).

The _ref code converts float -> int8_t/uint8_t by C casts; x86 truncates through a 32-bit
cvttss2si (out of range or NaN -> INT_MIN) and keeps the low byte, which `_cvt_i32`/`_s8` mirror
so that even blocks of subnormal values (where 1/d overflows to inf) match ggml byte for byte.
"""

import numpy as np
from numba import njit

from .base import BlockScales, Codec, CodeLayout, FrozenRounding, fp16_at, put_fp16_at, register
from .common import f32_to_bits, get_fp16, nearest_int, put_fp16
from .search import make_qkx3_quants, make_qx_quants

F32 = np.float32
QK = 32
_FLT_MAX = np.float32(3.4028234663852886e38)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _cvt_i32(f):
    """(int32) of a float32 as x86 cvttss2si: truncation; out of range / NaN -> INT32_MIN."""
    if f >= F32(-2147483648.0) and f < F32(2147483648.0):
        return np.int64(np.int32(f))
    return np.int64(-2147483648)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _s8(v):
    """(int8_t) of an int: the low byte, sign-extended."""
    return ((v & 0xFF) ^ 0x80) - 0x80


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _signbit(f):
    return (f32_to_bits(f) >> np.uint32(31)) != 0


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _roundf(f):
    """C roundf: nearest integer, halfway cases away from zero (exact for every float32)."""
    a = abs(f)
    if not a < F32(8388608.0):  # already integral (or inf/nan)
        return f
    t = F32(np.int32(a))
    if a - t >= F32(0.5):
        t += F32(1.0)
    return -t if _signbit(f) else t


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _add_first_nan(p, m):
    """`p + m` as x86 addss computes it in C: when both are NaN the result is p's NaN.

    LLVM may commute the operands of an fadd, which only changes which NaN payload (and sign)
    comes out when both d and m of a block are NaN; this keeps ggml's.
    """
    return p if p != p else p + m


@njit(cache=True, nogil=True, error_model="numpy")
def _block_bytes(bits, has_min):
    return 2 + (2 if has_min else 0) + (4 if bits == 5 else 0) + (QK if bits == 8 else QK // 2)


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_rows(x, qw, out, bits, has_min, sigma2_in=None, frozen=None):
    """Quantize each row of x into out (rows, nb * block_bytes); qw None selects the _ref code.

    For error-compensated rounding (not in C): sigma2_in (rows,) replaces each row's sigma2 (x may
    then be a slice of the row's blocks), and frozen (rows, nb, 2) receives per block the (scale,
    offset) that its final rounding step used (see `frozen_code`).
    """
    rows, cols = x.shape
    nb = cols // QK
    bsize = _block_bytes(bits, has_min)
    off_qh = 4 if has_min else 2
    off_qs = off_qh + (4 if bits == 5 else 0)
    half = np.int64(1) << (bits - 1)  # 8, 16 (symmetric offset) / 128
    qmax = (np.int64(1) << bits) - 1  # 15, 31
    L = np.zeros(QK, dtype=np.uint8)
    Laux = np.zeros(QK, dtype=np.uint8)
    weight = np.zeros(QK, dtype=np.float32)
    for r in range(rows):
        xr = x[r]
        orow = out[r]
        sigma2 = F32(0.0)
        if sigma2_in is not None:
            sigma2 = sigma2_in[r]
        elif qw is not None:
            if bits != 8:
                sum_x2 = F32(0.0)
                for j in range(cols):
                    sum_x2 += xr[j] * xr[j]
                sigma2 = sum_x2 / F32(cols)
        for ib in range(nb):
            x0 = ib * QK
            o = ib * bsize
            if bits == 8:  # quantize_row_q8_0_ref (importance never used)
                amax = F32(0.0)
                for j in range(QK):
                    av = abs(xr[x0 + j])
                    amax = amax if amax > av else av  # MAX(amax, fabsf(v))
                d = amax / F32(127.0)
                id_ = F32(1.0) / d if d != F32(0.0) else F32(0.0)
                if frozen is not None:
                    frozen[r, ib, 0] = id_
                    frozen[r, ib, 1] = F32(0.0)
                put_fp16(orow, o, d)
                for j in range(QK):
                    orow[o + 2 + j] = _cvt_i32(_roundf(xr[x0 + j] * id_)) & 0xFF
                continue
            if qw is None:  # quantize_row_q{4,5}_{0,1}_ref
                if has_min:
                    mn = _FLT_MAX
                    mx = -_FLT_MAX
                    for j in range(QK):
                        v = xr[x0 + j]
                        if v < mn:
                            mn = v
                        if v > mx:
                            mx = v
                    d = (mx - mn) / F32(qmax)
                    id_ = F32(1.0) / d if d != F32(0.0) else F32(0.0)
                    if frozen is not None:
                        frozen[r, ib, 0] = id_
                        frozen[r, ib, 1] = mn
                    put_fp16(orow, o, d)
                    put_fp16(orow, o + 2, mn)
                    for j in range(QK):
                        q = _cvt_i32((xr[x0 + j] - mn) * id_ + F32(0.5))
                        if bits == 4:  # MIN(15, (int8_t)(x0 + 0.5f))
                            q = min(qmax, _s8(q))
                        L[j] = q & 0xFF  # Q5_1: (uint8_t)(x0 + 0.5f)
                else:
                    amax = F32(0.0)
                    mx = F32(0.0)
                    for j in range(QK):
                        v = xr[x0 + j]
                        if amax < abs(v):
                            amax = abs(v)
                            mx = v
                    d = mx / F32(-half)
                    id_ = F32(1.0) / d if d != F32(0.0) else F32(0.0)
                    if frozen is not None:
                        frozen[r, ib, 0] = id_
                        frozen[r, ib, 1] = F32(0.0)
                    put_fp16(orow, o, d)
                    bias = F32(half) + F32(0.5)  # 8.5f / 16.5f
                    for j in range(QK):
                        q = min(qmax, _s8(_cvt_i32(xr[x0 + j] * id_ + bias)))  # MIN(15, (int8_t)(x0 + 8.5f))
                        L[j] = q & 0xFF
            else:  # quantize_row_q{4,5}_{0,1}_impl
                xb = xr[x0 : x0 + QK]
                for j in range(QK):
                    weight[j] = qw[x0 + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                fz = frozen[r, ib] if frozen is not None else None
                if has_min:
                    d, the_min = make_qkx3_quants(QK, qmax, xb, weight, L, Laux, F32(-0.9), F32(0.05), 36, False, fz)
                    put_fp16(orow, o, d)
                    put_fp16(orow, o + 2, -the_min)
                else:
                    d = make_qx_quants(QK, half, xb, L.view(np.int8), 1, weight, fz)
                    if fz is not None:
                        fz[1] = F32(0.0)
                    put_fp16(orow, o, d)
            # pack the 4 low bits (and for Q5 the 5th bit into qh)
            if bits == 4:
                for j in range(QK // 2):
                    orow[o + off_qs + j] = (np.int64(L[j]) | (np.int64(L[j + 16]) << 4)) & 0xFF
            else:
                qh = np.uint32(0)
                for j in range(QK // 2):
                    xi0 = np.uint32(L[j])
                    xi1 = np.uint32(L[j + 16])
                    orow[o + off_qs + j] = (xi0 & np.uint32(0x0F)) | ((xi1 & np.uint32(0x0F)) << np.uint32(4))
                    qh |= ((xi0 & np.uint32(0x10)) >> np.uint32(4)) << np.uint32(j)
                    qh |= ((xi1 & np.uint32(0x10)) >> np.uint32(4)) << np.uint32(j + 16)
                for k in range(4):
                    orow[o + off_qh + k] = (qh >> np.uint32(8 * k)) & np.uint32(0xFF)


@njit(cache=True, nogil=True, error_model="numpy")
def _dequantize_rows(data, out, bits, has_min):
    """dequantize_row_q{4,5}_{0,1} / dequantize_row_q8_0 for each row."""
    rows = data.shape[0]
    nb = out.shape[1] // QK
    bsize = _block_bytes(bits, has_min)
    off_qh = 4 if has_min else 2
    off_qs = off_qh + (4 if bits == 5 else 0)
    offset = 0 if has_min else (np.int64(1) << (bits - 1))
    for r in range(rows):
        row = data[r]
        srow = row.view(np.int8)
        yr = out[r]
        for ib in range(nb):
            o = ib * bsize
            y0 = ib * QK
            d = get_fp16(row, o)
            if bits == 8:
                for j in range(QK):
                    yr[y0 + j] = F32(srow[o + 2 + j]) * d
                continue
            m = get_fp16(row, o + 2) if has_min else F32(0.0)
            qh = np.uint32(0)
            if bits == 5:
                qh = (np.uint32(row[o + off_qh]) | (np.uint32(row[o + off_qh + 1]) << np.uint32(8))
                      | (np.uint32(row[o + off_qh + 2]) << np.uint32(16)) | (np.uint32(row[o + off_qh + 3]) << np.uint32(24)))
            for j in range(QK // 2):
                b = np.int64(row[o + off_qs + j])
                q0 = b & 0x0F
                q1 = b >> 4
                if bits == 5:
                    q0 |= np.int64(((qh >> np.uint32(j)) << np.uint32(4)) & np.uint32(0x10))
                    q1 |= np.int64((qh >> np.uint32(j + 12)) & np.uint32(0x10))
                if has_min:
                    yr[y0 + j] = _add_first_nan(F32(q0) * d, m)
                    yr[y0 + j + 16] = _add_first_nan(F32(q1) * d, m)
                else:
                    yr[y0 + j] = F32(q0 - offset) * d
                    yr[y0 + j + 16] = F32(q1 - offset) * d


@njit(cache=True, nogil=True, error_model="numpy")
def _row_sigma2(x, out):
    """sigma2 = sum(x**2) / cols of each row, summed in order as quantize_row_*_impl does."""
    rows, cols = x.shape
    for r in range(rows):
        sum_x2 = F32(0.0)
        for j in range(cols):
            sum_x2 += x[r, j] * x[r, j]
        out[r] = sum_x2 / F32(cols)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def frozen_code(x, scale, offset, p):
    """The final rounding step of each path above for one float32 weight x, given the (scale,
    offset) the block's fit froze; p = (bits, has_min, impl). -1: keep the fit's code.

    _ref: Q8_0 roundf(x * id); Q4_0/Q5_0 (int)(x * id + 8.5 / 16.5); Q4_1/Q5_1 (int)((x - min) *
    id + 0.5), truncating, where a value that is not finite converts to INT_MIN, whose low byte
    is 0. _impl: the search's nearest_int(iscale * x) (symmetric) or nearest_int(iscale * (x -
    min)), clamped. Weights moved out of the block's range by error feedback are clamped to the
    grid (inside it, the clamps and C's int8/uint8 conversions agree).
    """
    bits = p[0]
    half = np.int64(1) << (bits - 1)
    qmax = (np.int64(1) << bits) - 1
    if p[2]:  # _impl: make_qx_quants / make_qkx3_quants
        if scale != scale:
            return np.int64(-1)
        if p[1]:
            l = nearest_int(scale * (x - offset))
            return max(np.int64(0), min(qmax, l))
        l = nearest_int(scale * x)
        return max(-half, min(half - 1, l)) + half
    if bits == 8:
        t = _roundf(x * scale)
        if not (t >= F32(-2147483648.0) and t < F32(2147483648.0)):
            return np.int64(0)
        return max(np.int64(-128), min(np.int64(127), np.int64(t))) & 0xFF
    if p[1]:
        t = (x - offset) * scale + F32(0.5)
    else:
        t = x * scale + (F32(half) + F32(0.5))
    if not (t >= F32(-2147483648.0) and t < F32(2147483648.0)):
        return np.int64(0)
    return max(np.int64(0), min(qmax, np.int64(np.floor(t))))


def _layout(bits: int, has_min: bool) -> CodeLayout:
    """The code bits of a block as _quantize_rows packs them."""
    off_qh = 4 if has_min else 2
    off_qs = off_qh + (4 if bits == 5 else 0)
    if bits == 8:
        return CodeLayout(QK, [(j, 2 + j, 0, 0, 8) for j in range(QK)])
    fields = []
    for j in range(QK // 2):
        fields += [(j, off_qs + j, 0, 0, 4), (j + 16, off_qs + j, 4, 0, 4)]
        if bits == 5:
            fields += [(j, off_qh + j // 8, j % 8, 4, 1), (j + 16, off_qh + (j + 16) // 8, (j + 16) % 8, 4, 1)]
    return CodeLayout(QK, fields)


def _codec(name: str, bits: int, has_min: bool) -> Codec:
    type_size = int(_block_bytes(bits, has_min))
    uses_importance = bits != 8

    def quantize_rows(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // QK * type_size), dtype=np.uint8)
        qw = np.ascontiguousarray(importance, dtype=np.float32) if (importance is not None and uses_importance) else None
        _quantize_rows(x, qw, out, bits, has_min)
        return out

    def dequantize_rows(data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows, row_bytes = data.shape
        out = np.empty((rows, row_bytes // type_size * QK), dtype=np.float32)
        _dequantize_rows(data, out, bits, has_min)
        return out

    def row_sigma2(x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[0], dtype=np.float32)
        _row_sigma2(np.ascontiguousarray(x, dtype=np.float32), out)
        return out

    def fit(x: np.ndarray, importance: np.ndarray | None, sigma2: np.ndarray | None):
        """Blocks of x quantized as ggml does (with each row's sigma2 given), and per weight the
        (scale, offset) of the final rounding step."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // QK * type_size), dtype=np.uint8)
        frozen = np.empty((rows, cols // QK, 2), dtype=np.float32)
        impl = importance is not None and uses_importance
        qw = np.ascontiguousarray(importance, dtype=np.float32) if impl else None
        _quantize_rows(x, qw, out, bits, has_min, sigma2 if impl else None, frozen)
        return out, np.repeat(frozen[:, :, 0], QK, axis=1), np.repeat(frozen[:, :, 1], QK, axis=1)

    # value of code c: d * (c - half) (symmetric), d * c + m (with min), d * (int8)c (Q8_0)
    codes = np.arange(1 << bits)
    values = (codes.astype(np.uint8).view(np.int8) if bits == 8 else codes - (0 if has_min else 1 << (bits - 1)))
    probe = (0, 1) if bits == 8 or has_min else (1 << (bits - 1), (1 << (bits - 1)) + 1)

    def read_scales(data: np.ndarray):  # d @0 and (with min) m @2, no sub-block scales
        ones = np.ones((len(data), 1), dtype=np.int64)
        return fp16_at(data, 0), fp16_at(data, 2) if has_min else np.zeros(len(data), np.float32), ones, ones

    def write_scales(data: np.ndarray, d, dmin, _sc, _m):
        out = data.copy()
        put_fp16_at(out, 0, d)
        if has_min:
            put_fp16_at(out, 2, dmin)
        return out

    scales = BlockScales(QK, (1, 1), (1, 1) if has_min else None, 1.0, read_scales, write_scales)

    def frozen_rounding(importance_used: bool) -> FrozenRounding:
        return FrozenRounding(family=0, params=np.array([bits, has_min, importance_used], dtype=np.int64), fit=fit,
                              layout=_layout(bits, has_min), values=values.astype(np.float64), probe=probe,
                              row_context=row_sigma2, scales=scales)

    quantize_rows.__qualname__ = f"quantize_rows[{name}]"
    dequantize_rows.__qualname__ = f"dequantize_rows[{name}]"
    return register(Codec(name, quantize_rows, dequantize_rows, uses_importance=uses_importance,
                          frozen=frozen_rounding))


Q4_0 = _codec("Q4_0", 4, False)
Q4_1 = _codec("Q4_1", 4, True)
Q5_0 = _codec("Q5_0", 5, False)
Q5_1 = _codec("Q5_1", 5, True)
Q8_0 = _codec("Q8_0", 8, False)
