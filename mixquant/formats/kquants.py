"""The k-quants Q2_K .. Q6_K (super-blocks of QK_K = 256), byte-identical to ggml-quants.c.

Each format mirrors ggml's `quantize_qN_K`: without importance it is `quantize_row_qN_K_ref`,
with importance `quantize_row_qN_K_impl` (per row, with the block's sigma2 weights); decoding
mirrors `dequantize_row_qN_K`. The pieces the C shares between formats are shared here too:
the 6-bit scale/min packing of Q4_K/Q5_K (`get_scale_min_k4` and its inverse), the 6-bit
scales of Q3_K, the 2-bit packing of Q2_K/Q3_K, the nibble packing of Q4_K/Q5_K and the final
re-quantization of every weight against the stored (fp16-rounded) scales.

Block layouts (byte offsets inside one block, from ggml-common.h):

    Q2_K  (84): scales[16] @0, qs[64] @16, d @80, dmin @82
    Q3_K (110): hmask[32] @0, qs[64] @32, scales[12] @96, d @108
    Q4_K (144): d @0, dmin @2, scales[12] @4, qs[128] @16
    Q5_K (176): d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48
    Q6_K (210): ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208
"""

import numpy as np
from numba import njit

from .base import BlockScales, Codec, CodeLayout, FrozenRounding, fp16_at, put_fp16_at, register
from .common import get_fp16, nearest_int, put_fp16
from .search import GROUP_MAX_EPS, make_q3_quants, make_qkx2_quants, make_qkx3_quants, make_qp_quants, make_qx_quants

F32 = np.float32
QK_K = 256

Q2K_SCALES, Q2K_QS, Q2K_D, Q2K_DMIN, Q2K_SIZE = 0, 16, 80, 82, 84
Q3K_HMASK, Q3K_QS, Q3K_SCALES, Q3K_D, Q3K_SIZE = 0, 32, 96, 108, 110
Q4K_D, Q4K_DMIN, Q4K_SCALES, Q4K_QS, Q4K_SIZE = 0, 2, 4, 16, 144
Q5K_D, Q5K_DMIN, Q5K_SCALES, Q5K_QH, Q5K_QS, Q5K_SIZE = 0, 2, 4, 16, 48, 176
Q6K_QL, Q6K_QH, Q6K_SCALES, Q6K_D, Q6K_SIZE = 0, 128, 192, 208, 210

_NO_WEIGHTS = np.empty(0, dtype=np.float32)

# error_model="numpy": a float division by zero gives inf/NaN as in C instead of raising (it happens
# on extreme inputs, e.g. Q6_K's 1/iscale once a sub-block scale has overflowed to inf).
_kernel = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


# ---------------------------------------------------------------------------------------------
# scalar helpers
# ---------------------------------------------------------------------------------------------


@_inline
def _as_int8(v):
    """A C store into int8_t: the low 8 bits, read back signed."""
    v = v & 0xFF
    return v - 256 if v > 127 else v


# ---------------------------------------------------------------------------------------------
# scale packing shared between formats
# ---------------------------------------------------------------------------------------------


@_inline
def get_scale_min_k4(j, q, o):
    """ggml's get_scale_min_k4 on the 12 scale bytes at q[o:]: (scale, min) of sub-block j."""
    if j < 4:
        return np.int64(q[o + j]) & 63, np.int64(q[o + j + 4]) & 63
    hi = np.int64(q[o + j + 4])
    return (hi & 0xF) | ((np.int64(q[o + j - 4]) >> 6) << 4), (hi >> 4) | ((np.int64(q[o + j]) >> 6) << 4)


@_inline
def put_scale_min_k4(Ls, Lm, q, o):
    """The inverse of get_scale_min_k4 for the 8 sub-blocks, as the Q4_K/Q5_K quantizers write it."""
    for j in range(QK_K // 32):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if j < 4:
            q[o + j] = ls & 0xFF
            q[o + j + 4] = lm & 0xFF
        else:
            q[o + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            q[o + j - 4] = (q[o + j - 4] | ((ls >> 4) << 6)) & 0xFF
            q[o + j] = (q[o + j] | ((lm >> 4) << 6)) & 0xFF


@_inline
def get_q3_scale(j, q, o):
    """Q3_K's 6-bit scale of sub-block j (minus 32) from the 12 scale bytes at q[o:]."""
    lo = (np.int64(q[o + j]) & 0xF) if j < 8 else (np.int64(q[o + j - 8]) >> 4)
    return (lo | (((np.int64(q[o + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@_inline
def put_q3_scales(Ls, q, o):
    """Pack 16 6-bit values (0..63) into Q3_K's 12 scale bytes at q[o:] (memset + the C loop)."""
    for j in range(12):
        q[o + j] = 0
    for j in range(QK_K // 16):
        l = np.int64(Ls[j])
        if j < 8:
            q[o + j] = l & 0xF
        else:
            q[o + j - 8] = (q[o + j - 8] | ((l & 0xF) << 4)) & 0xFF
        l >>= 4
        q[o + j % 4 + 8] = (q[o + j % 4 + 8] | (l << (2 * (j // 4)))) & 0xFF


# ---------------------------------------------------------------------------------------------
# quant packing and the final re-quantization, shared between formats
# ---------------------------------------------------------------------------------------------


@_inline
def _pack_2bit(L, q, o):
    """Q2_K/Q3_K: four 2-bit quants 32 apart per byte, 128 weights per 32 bytes."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            q[o + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF


@_inline
def _pack_nibbles(L, q, o):
    """Q4_K/Q5_K: low nibbles of two quants 32 apart per byte, 64 weights per 32 bytes."""
    for j in range(0, QK_K, 64):
        for l in range(32):
            q[o + j // 2 + l] = (L[j + l] & 0xF) | ((L[j + l + 32] & 0xF) << 4)


# The two loops below are what ggml spends most of its non-search time in; written over slice
# views with ternary clamps (not min/max, which numba lowers to unpredictable branches) so that
# LLVM vectorizes them like gcc does the C. The arithmetic is unchanged.


@_inline
def _requant_affine(x, xo, L, lo, n, d, dm, nmax):
    """L[lo+i] = clamp(nearest_int((x + dm) / d), 0, nmax) (Q2_K, Q4_K, Q5_K)."""
    xs = x[xo:xo + n]
    Ls = L[lo:lo + n]
    for ii in range(xs.shape[0]):
        l = nearest_int((xs[ii] + dm) / d)
        l = l if l < nmax else nmax
        Ls[ii] = l if l > 0 else 0


@_inline
def _requant_symmetric(x, xo, L, lo, n, d, nmax):
    """L[lo+i] = clamp(nearest_int(x / d), -nmax, nmax - 1) + nmax (Q3_K, Q6_K)."""
    xs = x[xo:xo + n]
    Ls = L[lo:lo + n]
    for ii in range(xs.shape[0]):
        l = nearest_int(xs[ii] / d)
        l = l if l < nmax - 1 else nmax - 1
        l = l if l > -nmax else -nmax
        Ls[ii] = l + nmax


@_inline
def _requant_k4(x, xo, q, bo, L, nmax):
    """Q4_K/Q5_K: re-quantize against the stored d, dmin and 6-bit scales/mins."""
    d_all = get_fp16(q, bo + Q4K_D)
    dmin_all = get_fp16(q, bo + Q4K_DMIN)
    for j in range(QK_K // 32):
        sc, m = get_scale_min_k4(j, q, bo + Q4K_SCALES)
        d = d_all * F32(sc)
        if d == 0:
            continue
        dm = dmin_all * F32(m)
        _requant_affine(x, xo + 32 * j, L, 32 * j, 32, d, dm, nmax)


# ---------------------------------------------------------------------------------------------
# Q2_K
# ---------------------------------------------------------------------------------------------


@_inline
def _q2k_finish(x, xo, q, bo, L):
    """Re-quantize against the stored scales and pack (shared tail of _ref and _impl)."""
    d_all = get_fp16(q, bo + Q2K_D)
    dmin_all = get_fp16(q, bo + Q2K_DMIN)
    for j in range(QK_K // 16):
        sc = q[bo + Q2K_SCALES + j]
        d = d_all * F32(sc & 0xF)
        if d == 0:
            continue
        dm = dmin_all * F32(sc >> 4)
        _requant_affine(x, xo + 16 * j, L, 16 * j, 16, d, dm, 3)
    _pack_2bit(L, q, bo + Q2K_QS)


@_kernel
def _q2k_ref_block(x, xo, q, bo, L, Laux, weights, scales, mins):
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(QK_K // 16):
        s = xo + 16 * j
        for l in range(16):
            weights[l] = abs(x[s + l])
        scale, the_min = make_qkx2_quants(16, 3, x[s:s + 16], weights, L[16 * j:16 * j + 16], Laux,
                                          F32(-0.5), F32(0.1), 15, True)
        scales[j] = scale
        mins[j] = the_min
        if scale > max_scale:
            max_scale = scale
        if the_min > max_min:
            max_min = the_min
    q4scale = F32(15.0)
    if max_scale > 0:
        iscale = q4scale / max_scale
        for j in range(QK_K // 16):
            q[bo + Q2K_SCALES + j] = nearest_int(iscale * scales[j]) & 0xFF
        put_fp16(q, bo + Q2K_D, max_scale / q4scale)
    else:
        for j in range(QK_K // 16):
            q[bo + Q2K_SCALES + j] = 0
        put_fp16(q, bo + Q2K_D, F32(0.0))
    if max_min > 0:
        iscale = q4scale / max_min
        for j in range(QK_K // 16):
            l = nearest_int(iscale * mins[j])
            q[bo + Q2K_SCALES + j] = (q[bo + Q2K_SCALES + j] | (l << 4)) & 0xFF
        put_fp16(q, bo + Q2K_DMIN, max_min / q4scale)
    else:
        put_fp16(q, bo + Q2K_DMIN, F32(0.0))
    _q2k_finish(x, xo, q, bo, L)


@_kernel
def _q2k_impl_block(x, xo, qw, qo, q, bo, L, Laux, weight, scales, mins, sw, Ls, Lm):
    sumx2 = F32(0.0)
    for j in range(QK_K):
        sumx2 += x[xo + j] * x[xo + j]
    sigma2 = sumx2 / F32(QK_K)
    for j in range(QK_K // 16):
        s = xo + 16 * j
        for l in range(16):
            weight[l] = qw[qo + 16 * j + l] * np.sqrt(sigma2 + x[s + l] * x[s + l])
        acc = F32(0.0)
        for l in range(QK_K // 16):
            acc += weight[l]
        sw[j] = acc
        scale, the_min = make_qkx3_quants(16, 3, x[s:s + 16], weight, L[16 * j:16 * j + 16], Laux,
                                          F32(-0.9), F32(0.05), 36, False)
        scales[j] = scale
        mins[j] = the_min
    dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw)
    mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw)
    put_fp16(q, bo + Q2K_D, dm)
    put_fp16(q, bo + Q2K_DMIN, mm)
    for j in range(QK_K // 16):
        q[bo + Q2K_SCALES + j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    _q2k_finish(x, xo, q, bo, L)  # requantize = true


@_kernel
def _quantize_q2_k(x, qw, has_qw, out):
    rows, cols = x.shape
    L = np.zeros(QK_K, dtype=np.uint8)
    Laux = np.zeros(16, dtype=np.uint8)
    weights = np.zeros(16, dtype=np.float32)
    scales = np.zeros(QK_K // 16, dtype=np.float32)
    mins = np.zeros(QK_K // 16, dtype=np.float32)
    sw = np.zeros(QK_K // 16, dtype=np.float32)
    Ls = np.zeros(QK_K // 16, dtype=np.uint8)
    Lm = np.zeros(QK_K // 16, dtype=np.uint8)
    for r in range(rows):
        xr = x[r]
        q = out[r]
        for i in range(cols // QK_K):
            if has_qw:
                _q2k_impl_block(xr, i * QK_K, qw, i * QK_K, q, i * Q2K_SIZE, L, Laux, weights, scales, mins, sw, Ls, Lm)
            else:
                _q2k_ref_block(xr, i * QK_K, q, i * Q2K_SIZE, L, Laux, weights, scales, mins)
    return out


@_kernel
def _dequantize_q2_k(data, y):
    rows = data.shape[0]
    for r in range(rows):
        q = data[r]
        yr = y[r]
        for i in range(data.shape[1] // Q2K_SIZE):
            bo = i * Q2K_SIZE
            d = get_fp16(q, bo + Q2K_D)
            dmin = get_fp16(q, bo + Q2K_DMIN)
            k = i * QK_K
            is_ = 0
            for n in range(0, QK_K, 128):
                qo = bo + Q2K_QS + n // 4
                shift = 0
                for _j in range(4):
                    for half in range(2):
                        sc = q[bo + Q2K_SCALES + is_]
                        is_ += 1
                        dl = d * F32(sc & 0xF)
                        ml = dmin * F32(sc >> 4)
                        for l in range(16):
                            yr[k] = dl * F32((q[qo + 16 * half + l] >> shift) & 3) - ml
                            k += 1
                    shift += 2


# ---------------------------------------------------------------------------------------------
# Q3_K
# ---------------------------------------------------------------------------------------------


@_inline
def _q3k_finish(x, xo, q, bo, L):
    """Re-quantize against the stored scales, split off the high bit and pack."""
    d_all = get_fp16(q, bo + Q3K_D)
    for j in range(QK_K // 16):
        d = d_all * F32(get_q3_scale(j, q, bo + Q3K_SCALES))
        if d == 0:
            continue
        _requant_symmetric(x, xo + 16 * j, L, 16 * j, 16, d, 4)
    # the high bit of quant j goes into bit j/32 of hmask[j%32] (L > 3 -> set it and subtract 4)
    for m in range(QK_K // 8):
        hm = 0
        for b in range(8):
            v = np.int64(L[32 * b + m])
            hi = 1 if v > 3 else 0
            hm |= hi << b
            L[32 * b + m] = v - 4 * hi
        q[bo + Q3K_HMASK + m] = hm
    _pack_2bit(L, q, bo + Q3K_QS)


@_kernel
def _q3k_ref_block(x, xo, q, bo, L, scales, Ls):
    max_scale = F32(0.0)
    amax = F32(0.0)
    for j in range(QK_K // 16):
        s = xo + 16 * j
        scale = make_q3_quants(16, 4, x[s:s + 16], L[16 * j:16 * j + 16], True)
        scales[j] = scale
        a = abs(scale)
        if a > amax:
            amax = a
            max_scale = scale
    if max_scale != 0:
        iscale = F32(-32.0) / max_scale
        for j in range(QK_K // 16):
            l = _as_int8(nearest_int(iscale * scales[j]))  # int8_t l = nearest_int(...)
            Ls[j] = max(-32, min(31, l)) + 32
        put_q3_scales(Ls, q, bo + Q3K_SCALES)
        put_fp16(q, bo + Q3K_D, F32(1.0) / iscale)
    else:
        for j in range(12):
            q[bo + Q3K_SCALES + j] = 0
        put_fp16(q, bo + Q3K_D, F32(0.0))
    _q3k_finish(x, xo, q, bo, L)


@_kernel
def _q3k_impl_block(x, xo, qw, qo, q, bo, L, weight, scales, sw, Ls):
    sumx2 = F32(0.0)
    for j in range(QK_K):
        sumx2 += x[xo + j] * x[xo + j]
    sigma2 = F32(2.0) * sumx2 / F32(QK_K)
    for j in range(QK_K // 16):
        s = xo + 16 * j
        for l in range(16):
            weight[l] = qw[qo + 16 * j + l] * np.sqrt(sigma2 + x[s + l] * x[s + l])
        sumw = F32(0.0)
        for l in range(16):
            sumw += weight[l]
        sw[j] = sumw
        scales[j] = make_qx_quants(16, 4, x[s:s + 16], L[16 * j:16 * j + 16], 1, weight)
    d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, 1, sw)
    put_q3_scales(Ls, q, bo + Q3K_SCALES)
    put_fp16(q, bo + Q3K_D, d_block)
    _q3k_finish(x, xo, q, bo, L)


@_kernel
def _quantize_q3_k(x, qw, has_qw, out):
    rows, cols = x.shape
    L = np.zeros(QK_K, dtype=np.int8)
    weight = np.zeros(16, dtype=np.float32)
    scales = np.zeros(QK_K // 16, dtype=np.float32)
    sw = np.zeros(QK_K // 16, dtype=np.float32)
    Ls = np.zeros(QK_K // 16, dtype=np.int8)
    for r in range(rows):
        xr = x[r]
        q = out[r]
        for i in range(cols // QK_K):
            if has_qw:
                _q3k_impl_block(xr, i * QK_K, qw, i * QK_K, q, i * Q3K_SIZE, L, weight, scales, sw, Ls)
            else:
                _q3k_ref_block(xr, i * QK_K, q, i * Q3K_SIZE, L, scales, Ls)
    return out


@_kernel
def _dequantize_q3_k(data, y):
    rows = data.shape[0]
    for r in range(rows):
        q = data[r]
        yr = y[r]
        for i in range(data.shape[1] // Q3K_SIZE):
            bo = i * Q3K_SIZE
            d_all = get_fp16(q, bo + Q3K_D)
            k = i * QK_K
            is_ = 0
            m = 1
            for n in range(0, QK_K, 128):
                qo = bo + Q3K_QS + n // 4
                shift = 0
                for _j in range(4):
                    for half in range(2):
                        dl = d_all * F32(get_q3_scale(is_, q, bo + Q3K_SCALES))
                        is_ += 1
                        for l in range(16):
                            hi = 0 if q[bo + Q3K_HMASK + 16 * half + l] & m else 4
                            yr[k] = dl * F32(np.int64((q[qo + 16 * half + l] >> shift) & 3) - hi)
                            k += 1
                    shift += 2
                    m <<= 1


# ---------------------------------------------------------------------------------------------
# Q4_K and Q5_K (identical up to nmax, the search parameters and the high-bit plane)
# ---------------------------------------------------------------------------------------------


@_inline
def _q45k_ref_block(x, xo, q, bo, L, Laux, weights, scales, mins, Ls, Lm, nmax, rmin, rdelta, nstep):
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(QK_K // 32):
        s = xo + 32 * j
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 += x[s + l] * x[s + l]
        av_x = np.sqrt(sum_x2 / F32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(x[s + l])
        scale, the_min = make_qkx2_quants(32, nmax, x[s:s + 32], weights, L[32 * j:32 * j + 32], Laux,
                                          rmin, rdelta, nstep, False)
        scales[j] = scale
        mins[j] = the_min
        if scale > max_scale:
            max_scale = scale
        if the_min > max_min:
            max_min = the_min
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
    for j in range(QK_K // 32):
        Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t ls = nearest_int(...)
        Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    put_scale_min_k4(Ls, Lm, q, bo + Q4K_SCALES)
    put_fp16(q, bo + Q4K_D, max_scale / F32(63.0))
    put_fp16(q, bo + Q4K_DMIN, max_min / F32(63.0))
    _requant_k4(x, xo, q, bo, L, nmax)


@_inline
def _q45k_impl_block(x, xo, qw, qo, q, bo, L, Laux, weights, scales, mins, sw, Ls, Lm, nmax, clamp_scales):
    sum_x2 = F32(0.0)
    for l in range(QK_K):
        sum_x2 += x[xo + l] * x[xo + l]
    sigma2 = F32(2.0) * sum_x2 / F32(QK_K)
    for j in range(QK_K // 32):
        s = xo + 32 * j
        for l in range(32):
            weights[l] = qw[qo + 32 * j + l] * np.sqrt(sigma2 + x[s + l] * x[s + l])
        sumw = F32(0.0)
        for l in range(32):
            sumw += weights[l]
        sw[j] = sumw
        scale, the_min = make_qkx3_quants(32, nmax, x[s:s + 32], weights, L[32 * j:32 * j + 32], Laux,
                                          F32(-0.9), F32(0.05), 36, False)
        scales[j] = scale
        mins[j] = the_min
    d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw)
    m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw)
    if clamp_scales:  # only quantize_row_q5_K_impl has `ls = MIN(63, ls)` (a no-op unless L wrapped)
        for j in range(QK_K // 32):
            Ls[j] = min(63, Ls[j])
            Lm[j] = min(63, Lm[j])
    put_scale_min_k4(Ls, Lm, q, bo + Q4K_SCALES)
    put_fp16(q, bo + Q4K_D, d_block)
    put_fp16(q, bo + Q4K_DMIN, m_block)
    _requant_k4(x, xo, q, bo, L, nmax)


@_inline
def _quantize_q45_k(x, qw, has_qw, out, nmax, rmin, rdelta, nstep, type_size, qs_offset, qh_offset):
    rows, cols = x.shape
    L = np.zeros(QK_K, dtype=np.uint8)
    Laux = np.zeros(32, dtype=np.uint8)
    weights = np.zeros(32, dtype=np.float32)
    scales = np.zeros(QK_K // 32, dtype=np.float32)
    mins = np.zeros(QK_K // 32, dtype=np.float32)
    sw = np.zeros(QK_K // 32, dtype=np.float32)
    Ls = np.zeros(QK_K // 32, dtype=np.uint8)
    Lm = np.zeros(QK_K // 32, dtype=np.uint8)
    for r in range(rows):
        xr = x[r]
        q = out[r]
        for i in range(cols // QK_K):
            bo = i * type_size
            if has_qw:
                _q45k_impl_block(xr, i * QK_K, qw, i * QK_K, q, bo, L, Laux, weights, scales, mins, sw, Ls, Lm,
                                 nmax, qh_offset >= 0)
            else:
                _q45k_ref_block(xr, i * QK_K, q, bo, L, Laux, weights, scales, mins, Ls, Lm, nmax, rmin, rdelta, nstep)
            if qh_offset >= 0:
                # Q5_K: bit 4 of the quants in sub-block pair n/64 goes to bits 2n/64, 2n/64+1 of qh
                for j in range(32):
                    q[bo + qh_offset + j] = 0
                for n in range(0, QK_K, 64):
                    m1 = 1 << (n // 32)
                    for j in range(32):
                        if L[n + j] > 15:
                            q[bo + qh_offset + j] |= m1
                        if L[n + j + 32] > 15:
                            q[bo + qh_offset + j] |= m1 << 1
            _pack_nibbles(L, q, bo + qs_offset)
    return out


@_kernel
def _quantize_q4_k(x, qw, has_qw, out):
    return _quantize_q45_k(x, qw, has_qw, out, 15, F32(-1.0), F32(0.1), 20, Q4K_SIZE, Q4K_QS, -1)


@_kernel
def _quantize_q5_k(x, qw, has_qw, out):
    return _quantize_q45_k(x, qw, has_qw, out, 31, F32(-0.5), F32(0.1), 15, Q5K_SIZE, Q5K_QS, Q5K_QH)


@_inline
def _dequantize_q45_k(data, y, type_size, qs_offset, qh_offset):
    """dequantize_row_q4_K / dequantize_row_q5_K (qh_offset < 0: no high-bit plane)."""
    rows = data.shape[0]
    for r in range(rows):
        q = data[r]
        yr = y[r]
        for i in range(data.shape[1] // type_size):
            bo = i * type_size
            d = get_fp16(q, bo + Q4K_D)
            dmin = get_fp16(q, bo + Q4K_DMIN)
            for jj in range(QK_K // 64):
                qo = bo + qs_offset + 32 * jj
                k = i * QK_K + 64 * jj
                sc, m = get_scale_min_k4(2 * jj, q, bo + Q4K_SCALES)
                d1 = d * F32(sc)
                m1 = dmin * F32(m)
                sc, m = get_scale_min_k4(2 * jj + 1, q, bo + Q4K_SCALES)
                d2 = d * F32(sc)
                m2 = dmin * F32(m)
                if qh_offset < 0:
                    for l in range(32):
                        yr[k + l] = d1 * F32(q[qo + l] & 0xF) - m1
                        yr[k + 32 + l] = d2 * F32(q[qo + l] >> 4) - m2
                else:  # (qh[l] & u1 ? 16 : 0), u1 = 1 << 2jj; u2 = u1 << 1
                    for l in range(32):
                        h = np.int64(q[bo + qh_offset + l]) >> (2 * jj)
                        yr[k + l] = d1 * F32((q[qo + l] & 0xF) + ((h & 1) << 4)) - m1
                        yr[k + 32 + l] = d2 * F32((q[qo + l] >> 4) + ((h & 2) << 3)) - m2


@_kernel
def _dequantize_q4_k(data, y):
    _dequantize_q45_k(data, y, Q4K_SIZE, Q4K_QS, -1)


@_kernel
def _dequantize_q5_k(data, y):
    _dequantize_q45_k(data, y, Q5K_SIZE, Q5K_QS, Q5K_QH)


# ---------------------------------------------------------------------------------------------
# Q6_K (_ref and _impl differ only in the weights passed to make_qx_quants)
# ---------------------------------------------------------------------------------------------


@_kernel
def _q6k_block(x, xo, qw, qo, has_qw, q, bo, L, scales):
    max_scale = F32(0.0)
    max_abs_scale = F32(0.0)
    for ib in range(QK_K // 16):
        s = xo + 16 * ib
        if has_qw:
            scale = make_qx_quants(16, 32, x[s:s + 16], L[16 * ib:16 * ib + 16], 1, qw[qo + 16 * ib:qo + 16 * ib + 16])
        else:
            scale = make_qx_quants(16, 32, x[s:s + 16], L[16 * ib:16 * ib + 16], 1, None)
        scales[ib] = scale
        abs_scale = abs(scale)
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        for j in range(Q6K_SIZE):
            q[bo + j] = 0
        return
    iscale = F32(-128.0) / max_scale
    d_all = put_fp16(q, bo + Q6K_D, F32(1.0) / iscale)
    for ib in range(QK_K // 16):
        q[bo + Q6K_SCALES + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(QK_K // 16):
        d = d_all * F32(_as_int8(np.int64(q[bo + Q6K_SCALES + j])))
        if d == 0:
            continue
        _requant_symmetric(x, xo + 16 * j, L, 16 * j, 16, d, 32)
    for j in range(0, QK_K, 128):
        ql = bo + Q6K_QL + j // 2
        qh = bo + Q6K_QH + j // 4
        for l in range(32):
            l1 = np.int64(L[j + l])
            l2 = np.int64(L[j + l + 32])
            l3 = np.int64(L[j + l + 64])
            l4 = np.int64(L[j + l + 96])
            q[ql + l] = ((l1 & 0xF) | ((l3 & 0xF) << 4)) & 0xFF
            q[ql + l + 32] = ((l2 & 0xF) | ((l4 & 0xF) << 4)) & 0xFF
            q[qh + l] = ((l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6)) & 0xFF


@_kernel
def _quantize_q6_k(x, qw, has_qw, out):
    rows, cols = x.shape
    L = np.zeros(QK_K, dtype=np.int8)
    scales = np.zeros(QK_K // 16, dtype=np.float32)
    for r in range(rows):
        xr = x[r]
        q = out[r]
        for i in range(cols // QK_K):
            _q6k_block(xr, i * QK_K, qw, i * QK_K, has_qw, q, i * Q6K_SIZE, L, scales)
    return out


@_kernel
def _dequantize_q6_k(data, y):
    rows = data.shape[0]
    for r in range(rows):
        q = data[r]
        yr = y[r]
        for i in range(data.shape[1] // Q6K_SIZE):
            bo = i * Q6K_SIZE
            d = get_fp16(q, bo + Q6K_D)
            for n in range(0, QK_K, 128):
                ql = bo + Q6K_QL + n // 2
                qh = bo + Q6K_QH + n // 4
                sc = bo + Q6K_SCALES + n // 16
                k = i * QK_K + n
                for l in range(32):
                    is_ = l // 16
                    h = q[qh + l]
                    q1 = np.int64((q[ql + l] & 0xF) | (((h >> 0) & 3) << 4)) - 32
                    q2 = np.int64((q[ql + l + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32
                    q3 = np.int64((q[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
                    q4 = np.int64((q[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                    yr[k + l] = d * F32(_as_int8(np.int64(q[sc + is_]))) * F32(q1)
                    yr[k + l + 32] = d * F32(_as_int8(np.int64(q[sc + is_ + 2]))) * F32(q2)
                    yr[k + l + 64] = d * F32(_as_int8(np.int64(q[sc + is_ + 4]))) * F32(q3)
                    yr[k + l + 96] = d * F32(_as_int8(np.int64(q[sc + is_ + 6]))) * F32(q4)


# ---------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# error-compensated rounding: every k-quant ends by re-quantizing each weight against the stored
# (fp16 and 6-bit quantized) sub-block scales, so those scales are all the frozen parameters
# ---------------------------------------------------------------------------------------------


@_inline
def frozen_code(x, scale, offset, p):
    """_requant_affine / _requant_symmetric for one weight: clamp(nearest_int((x - offset) / scale),
    lo, hi) + shift with p = (lo, hi, shift), scale = d and offset = -dm of its sub-block; -1 (keep
    the search's code) where d == 0, which ggml skips."""
    if scale == 0:
        return np.int64(-1)
    l = nearest_int((x - offset) / scale)
    l = l if l < p[1] else p[1]
    l = l if l > p[0] else p[0]
    return l + p[2]


def _layout(name: str) -> CodeLayout:
    """The code bits of a super-block as the quantizers above pack them (`_pack_2bit`,
    `_pack_nibbles`, the Q3_K hmask, the Q5_K qh plane, Q6_K's ql/qh)."""
    fields = []
    if name in ("Q2_K", "Q3_K"):
        qs = Q2K_QS if name == "Q2_K" else Q3K_QS
        for j in range(0, QK_K, 128):
            for l in range(32):
                fields += [(j + l + 32 * k, qs + j // 4 + l, 2 * k, 0, 2) for k in range(4)]
        if name == "Q3_K":
            fields += [(32 * b + m, Q3K_HMASK + m, b, 2, 1) for m in range(32) for b in range(8)]
    elif name in ("Q4_K", "Q5_K"):
        qs = Q4K_QS if name == "Q4_K" else Q5K_QS
        for j in range(0, QK_K, 64):
            for l in range(32):
                fields += [(j + l, qs + j // 2 + l, 0, 0, 4), (j + l + 32, qs + j // 2 + l, 4, 0, 4)]
        if name == "Q5_K":
            for n in range(0, QK_K, 64):
                for j in range(32):
                    fields += [(n + j, Q5K_QH + j, n // 32, 4, 1), (n + j + 32, Q5K_QH + j, n // 32 + 1, 4, 1)]
    else:  # Q6_K
        for j in range(0, QK_K, 128):
            for l in range(32):
                fields += [(j + l, Q6K_QL + j // 2 + l, 0, 0, 4), (j + l + 64, Q6K_QL + j // 2 + l, 4, 0, 4),
                           (j + l + 32, Q6K_QL + j // 2 + l + 32, 0, 0, 4),
                           (j + l + 96, Q6K_QL + j // 2 + l + 32, 4, 0, 4)]
                fields += [(j + l + 32 * k, Q6K_QH + j // 4 + l, 2 * k, 4, 2) for k in range(4)]
    return CodeLayout(QK_K, fields)


# name: (lo, hi, shift) of the final rounding, and the bytes of the fp16 dmin (none: symmetric)
_REQUANT = {"Q2_K": ((0, 3, 0), (Q2K_DMIN, Q2K_DMIN + 1)), "Q3_K": ((-4, 3, 4), ()),
            "Q4_K": ((0, 15, 0), (Q4K_DMIN, Q4K_DMIN + 1)), "Q5_K": ((0, 31, 0), (Q5K_D + 2, Q5K_D + 3)),
            "Q6_K": ((-32, 31, 32), ())}


@_kernel
def _read_k4(data, sc, m):
    for r in range(data.shape[0]):
        for j in range(QK_K // 32):
            sc[r, j], m[r, j] = get_scale_min_k4(j, data[r], Q4K_SCALES)


@_kernel
def _write_k4(data, sc, m):
    for r in range(data.shape[0]):
        put_scale_min_k4(sc[r], m[r], data[r], Q4K_SCALES)


@_kernel
def _read_q3(data, sc):
    for r in range(data.shape[0]):
        for j in range(QK_K // 16):
            sc[r, j] = get_q3_scale(j, data[r], Q3K_SCALES)


@_kernel
def _write_q3(data, sc):
    for r in range(data.shape[0]):
        put_q3_scales(sc[r] + 32, data[r], Q3K_SCALES)


def _block_scales(name: str) -> BlockScales:
    """Each k-quant's d, dmin and sub-block scales and mins where ggml-common.h puts them."""
    if name == "Q2_K":
        def read(data):
            s = data[:, Q2K_SCALES:Q2K_SCALES + 16].astype(np.int64)
            return fp16_at(data, Q2K_D), fp16_at(data, Q2K_DMIN), s & 0xF, s >> 4

        def write(data, d, dmin, sc, m):
            out = data.copy()
            out[:, Q2K_SCALES:Q2K_SCALES + 16] = (sc | (m << 4)).astype(np.uint8)
            put_fp16_at(out, Q2K_D, d)
            put_fp16_at(out, Q2K_DMIN, dmin)
            return out

        return BlockScales(16, (0, 15), (0, 15), -1.0, read, write)
    if name == "Q3_K":
        def read(data):
            sc = np.empty((data.shape[0], 16), dtype=np.int64)
            _read_q3(np.ascontiguousarray(data), sc)
            return fp16_at(data, Q3K_D), np.zeros(len(data), np.float32), sc, np.zeros_like(sc)

        def write(data, d, _dmin, sc, _m):
            out = np.ascontiguousarray(data).copy()
            _write_q3(out, np.ascontiguousarray(sc, dtype=np.int64))
            put_fp16_at(out, Q3K_D, d)
            return out

        return BlockScales(16, (-32, 31), None, -1.0, read, write)
    if name in ("Q4_K", "Q5_K"):
        def read(data):
            sc = np.empty((data.shape[0], 8), dtype=np.int64)
            m = np.empty_like(sc)
            _read_k4(np.ascontiguousarray(data), sc, m)
            return fp16_at(data, Q4K_D), fp16_at(data, Q4K_DMIN), sc, m

        def write(data, d, dmin, sc, m):
            out = np.ascontiguousarray(data).copy()
            _write_k4(out, np.ascontiguousarray(sc, dtype=np.int64), np.ascontiguousarray(m, dtype=np.int64))
            put_fp16_at(out, Q4K_D, d)
            put_fp16_at(out, Q4K_DMIN, dmin)
            return out

        return BlockScales(32, (0, 63), (0, 63), -1.0, read, write)

    def read(data):  # Q6_K: int8 scales
        sc = data[:, Q6K_SCALES:Q6K_SCALES + 16].view(np.int8).astype(np.int64)
        return fp16_at(data, Q6K_D), np.zeros(len(data), np.float32), sc, np.zeros_like(sc)

    def write(data, d, _dmin, sc, _m):
        out = data.copy()
        out[:, Q6K_SCALES:Q6K_SCALES + 16] = sc.astype(np.int8).view(np.uint8)
        put_fp16_at(out, Q6K_D, d)
        return out

    return BlockScales(16, (-128, 127), None, -1.0, read, write)


def _frozen_rounding(name: str, quantize_rows, dequantize_rows) -> FrozenRounding:
    (lo, hi, shift), dmin_bytes = _REQUANT[name]
    layout = _layout(name)
    values = np.arange(hi - lo + 1, dtype=np.float64) - shift
    zero, one = shift, shift + 1

    def fit(x: np.ndarray, importance: np.ndarray | None, _context: None):
        """ggml's bytes for these super-blocks and, per weight, its sub-block's d and -dm exactly as
        the final re-quantization computes them (d_all * sc, dmin_all * m), read back through the
        decoder: code 0 decodes to d * 0 - dm, and with dmin zeroed code 1 decodes to d * 1."""
        data = quantize_rows(np.ascontiguousarray(x, dtype=np.float32), importance)
        full = np.ones(x.shape, dtype=np.int64)
        offset = dequantize_rows(layout.pack(full * zero, data))
        no_min = data.copy()
        no_min[:, list(dmin_bytes)] = 0
        scale = dequantize_rows(layout.pack(full * one, no_min))
        return data, scale, offset

    return FrozenRounding(family=1, params=np.array([lo, hi, shift], dtype=np.int64), fit=fit, layout=layout,
                          values=values, probe=(zero, one), scales=_block_scales(name))


def _codec(name: str, type_size: int, quantize_kernel, dequantize_kernel) -> Codec:
    def quantize_rows(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rows, cols = x.shape
        out = np.empty((rows, cols // QK_K * type_size), dtype=np.uint8)
        if importance is None:
            return quantize_kernel(x, _NO_WEIGHTS, False, out)
        return quantize_kernel(x, importance, True, out)

    def dequantize_rows(data: np.ndarray) -> np.ndarray:
        rows, row_bytes = data.shape
        y = np.empty((rows, row_bytes // type_size * QK_K), dtype=np.float32)
        dequantize_kernel(np.ascontiguousarray(data), y)
        return y

    frozen = _frozen_rounding(name, quantize_rows, dequantize_rows)
    return register(Codec(name, quantize_rows, dequantize_rows, frozen=lambda _importance: frozen))


Q2_K = _codec("Q2_K", Q2K_SIZE, _quantize_q2_k, _dequantize_q2_k)
Q3_K = _codec("Q3_K", Q3K_SIZE, _quantize_q3_k, _dequantize_q3_k)
Q4_K = _codec("Q4_K", Q4K_SIZE, _quantize_q4_k, _dequantize_q4_k)
Q5_K = _codec("Q5_K", Q5K_SIZE, _quantize_q5_k, _dequantize_q5_k)
Q6_K = _codec("Q6_K", Q6K_SIZE, _quantize_q6_k, _dequantize_q6_k)
