"""Non-linear 4-bit i-quants: IQ4_NL (blocks of 32) and IQ4_XS (256-weight super-blocks).

Both mirror ggml-quants.c (llama.cpp 0c1e570): `quantize_iq4_nl` / `quantize_iq4_xs`, which share
`quantize_row_iq4_nl_impl` (super-block size 32 or QK_K=256, sub-blocks of 32, ntry=7, with or without
importance), and `dequantize_row_iq4_nl` / `dequantize_row_iq4_xs`. One numba kernel serves both,
parameterised by the super-block size.

Block layouts (ggml-common.h):
    block_iq4_nl (18 bytes):  fp16 d | uint8 qs[16]
    block_iq4_xs (136 bytes): fp16 d | uint16 scales_h | uint8 scales_l[4] | uint8 qs[128]
qs packs sub-block element j in the low nibble and element j+16 in the high nibble of byte j.
"""

import numpy as np
from numba import njit

from .base import BlockScales, Codec, CodeLayout, FrozenRounding, fp16_at, put_fp16_at, register
from .common import get_fp16, nearest_int, put_fp16

F32 = np.float32

QK4_NL = 32
QK_K = 256
NTRY = 7  # both quantize_iq4_nl and quantize_iq4_xs pass ntry=7, with or without importance

# kvalues_iq4nl (ggml-common.h); as float32 since C promotes int8 -> float in every use, plus a +inf
# sentinel for _best_index_int8.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_VALUES = np.append(KVALUES_IQ4NL.astype(np.float32), np.float32(np.inf))

_GROUP_MAX_EPS = F32(1e-15)

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(inline="always", **_JIT)
def _best_index_int8(values, x):
    """best_index_int8(16, values, x): the nearer of the two table values around x (ties go up).

    ggml bisects with ml/mu and ends on the unique i with values[i] <= x < values[i+1]; a branch-free
    4-step search finds the same i, then the same comparison picks i or i+1. `values` carries a 17th
    entry, +inf, so x >= values[15] lands on 15 through that comparison; the final select covers what
    remains (x = +inf, or NaN, which ggml's search also sends to 15).
    """
    i = 8 if x >= values[8] else 0
    i += 4 if x >= values[i + 4] else 0
    i += 2 if x >= values[i + 2] else 0
    i += 1 if x >= values[i + 1] else 0
    r = i if x - values[i] < values[i + 1] - x else i + 1
    return r if x < values[15] else 15


@njit(inline="always", **_JIT)
def _fit(values, x, r, xb, weight, inv):
    """The weighted sums sum(w*q*x), sum(w*q*q) of one 32-block's nearest grid values at scale 1/inv."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for j in range(32):
        xv = x[r, xb + j]
        q = values[_best_index_int8(values, inv * xv)]
        wq = weight[j] * q
        sumqx += wq * xv
        sumq2 += wq * q
    return sumqx, sumq2


@njit(**_JIT)
def _quantize_rows(x, qw, use_qw, sbs, ntry, out, frozen=None):
    """quantize_row_iq4_nl_impl(sbs, 32, ...) over every super-block of every row of x into out.

    sbs == 32 writes block_iq4_nl, sbs == 256 writes block_iq4_xs. frozen (rows, cols // 32), when
    given, receives the inverse scale each 32-block's indices were found with (`frozen_code`).
    """
    values = _VALUES
    rows, cols = x.shape
    nsb = cols // sbs
    nb = sbs // 32
    qs_off = 2 if nb == 1 else 8
    type_size = qs_off + sbs // 2
    weight = np.empty(32, dtype=np.float32)
    scales = np.empty(nb, dtype=np.float32)
    L = np.empty(sbs, dtype=np.uint8)
    inv_sbs = F32(2.0) / F32(sbs)
    v0 = values[0]
    for r in range(rows):
        for ibl in range(nsb):
            x0 = ibl * sbs
            o = ibl * type_size

            sigma2 = F32(0.0)
            for j in range(sbs):
                xv = x[r, x0 + j]
                sigma2 += xv * xv
            sigma2 *= inv_sbs

            max_scale = F32(0.0)
            amax_scale = F32(0.0)
            for ib in range(nb):
                xb = x0 + ib * 32
                if use_qw:
                    for j in range(32):
                        xv = x[r, xb + j]
                        weight[j] = qw[xb + j] * np.sqrt(sigma2 + xv * xv)
                else:
                    for j in range(32):
                        xv = x[r, xb + j]
                        weight[j] = xv * xv
                amax = F32(0.0)
                mx = F32(0.0)
                for j in range(32):
                    xv = x[r, xb + j]
                    ax = abs(xv)
                    if ax > amax:
                        amax = ax
                        mx = xv
                if amax < _GROUP_MAX_EPS:
                    scales[ib] = F32(0.0)
                    continue
                d = -mx / v0 if ntry > 0 else mx / v0
                # (C stores the indices into L here; every path with ntry > 0 overwrites them below)
                sumqx, sumq2 = _fit(values, x, r, xb, weight, F32(1.0) / d)
                d = sumqx / sumq2 if sumq2 > F32(0.0) else F32(0.0)
                best = d * sumqx
                for itry in range(-ntry, ntry + 1):
                    sumqx, sumq2 = _fit(values, x, r, xb, weight, (F32(itry) + v0) / mx)
                    if sumq2 > F32(0.0) and sumqx * sumqx > best * sumq2:
                        d = sumqx / sumq2
                        best = d * sumqx
                scales[ib] = d
                abs_d = abs(d)
                if abs_d > amax_scale:
                    amax_scale = abs_d
                    max_scale = d

            if nb > 1:
                # -0/32 is -0.0 for an all-zero super-block, stored as fp16 0x8000 like ggml does.
                d = -max_scale / F32(32.0)
                put_fp16(out[r], o, d)
                inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
                scales_h = 0
                for ib in range(nb):
                    l = nearest_int(inv * scales[ib])
                    l = max(-32, min(31, l))
                    dl = d * F32(l)
                    idl = F32(1.0) / dl if dl != F32(0.0) else F32(0.0)
                    if frozen is not None:
                        frozen[r, ibl * nb + ib] = idl
                    xb = x0 + ib * 32
                    for j in range(32):
                        L[ib * 32 + j] = _best_index_int8(values, idl * x[r, xb + j])
                    l += 32
                    l_l = l & 0xF
                    l_h = l >> 4
                    if ib % 2 == 0:
                        out[r, o + 4 + ib // 2] = l_l
                    else:
                        out[r, o + 4 + ib // 2] |= l_l << 4
                    scales_h |= l_h << (2 * (ib % 8))
                out[r, o + 2] = scales_h & 0xFF
                out[r, o + 3] = (scales_h >> 8) & 0xFF
            else:
                # d is stored as fp16, but the indices come from the unrounded scale.
                put_fp16(out[r], o, scales[0])
                if ntry > 0:
                    s = scales[0]
                    inv = F32(1.0) / s if s != F32(0.0) else F32(0.0)
                    if frozen is not None:
                        frozen[r, ibl] = inv
                    for j in range(sbs):
                        L[j] = _best_index_int8(values, inv * x[r, x0 + j])

            for i in range(sbs // 32):
                for j in range(16):
                    out[r, o + qs_off + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(**_JIT)
def _dequantize_rows(data, sbs, out):
    """dequantize_row_iq4_nl (sbs == 32) / dequantize_row_iq4_xs (sbs == 256)."""
    values = _VALUES
    rows = data.shape[0]
    nsb = out.shape[1] // sbs
    nb = sbs // 32
    qs_off = 2 if nb == 1 else 8
    type_size = qs_off + sbs // 2
    for r in range(rows):
        for ibl in range(nsb):
            o = ibl * type_size
            d = get_fp16(data[r], o)
            scales_h = np.int32(data[r, o + 2]) | (np.int32(data[r, o + 3]) << 8)
            for ib in range(nb):
                if nb == 1:
                    dl = d
                else:
                    ls = ((np.int32(data[r, o + 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF) | (
                        ((scales_h >> (2 * ib)) & 3) << 4
                    )
                    dl = d * F32(ls - 32)
                y = ibl * sbs + ib * 32
                q = o + qs_off + ib * 16
                for j in range(16):
                    b = data[r, q + j]
                    out[r, y + j] = dl * values[b & 0xF]
                    out[r, y + j + 16] = dl * values[b >> 4]


@njit(inline="always", **_JIT)
def frozen_code(x, scale, offset, p):
    """The final step of quantize_row_iq4_nl_impl for one weight: the nearest table value to
    scale * x, scale the inverse of the block's unrounded (IQ4_NL) or 6-bit (IQ4_XS) scale."""
    return np.int64(_best_index_int8(_VALUES, scale * x))


def _frozen_rounding(sbs: int, type_size: int) -> FrozenRounding:
    qs = 2 if sbs == QK4_NL else 8
    layout = CodeLayout(sbs, [f for i in range(sbs // 32) for j in range(16)
                              for f in ((32 * i + j, qs + 16 * i + j, 0, 0, 4), (32 * i + 16 + j, qs + 16 * i + j, 4, 0, 4))])

    def fit(x: np.ndarray, importance: np.ndarray | None, _context: None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.zeros((rows, cols // sbs * type_size), dtype=np.uint8)
        frozen = np.empty((rows, cols // 32), dtype=np.float32)
        if importance is None:
            _quantize_rows(x, _VALUES, False, sbs, NTRY, out, frozen)
        else:
            _quantize_rows(x, np.ascontiguousarray(importance, dtype=np.float32), True, sbs, NTRY, out, frozen)
        scale = np.repeat(frozen, 32, axis=1)
        return out, scale, np.zeros_like(scale)

    if sbs == QK4_NL:
        def read(data):
            ones = np.ones((len(data), 1), dtype=np.int64)
            return fp16_at(data, 0), np.zeros(len(data), np.float32), ones, ones

        def write(data, d, _dmin, _sc, _m):
            out = data.copy()
            put_fp16_at(out, 0, d)
            return out
    else:  # IQ4_XS: 6-bit ls - 32 per 32 weights, low nibbles in scales_l[4] @4, high 2 bits in scales_h @2
        def read(data):
            high = data[:, 2].astype(np.int64) | (data[:, 3].astype(np.int64) << 8)
            ib = np.arange(8)
            low = (data[:, 4 + ib // 2].astype(np.int64) >> (4 * (ib % 2))) & 0xF
            sc = (low | (((high[:, None] >> (2 * ib)) & 3) << 4)) - 32
            return fp16_at(data, 0), np.zeros(len(data), np.float32), sc, np.ones_like(sc)

        def write(data, d, _dmin, sc, _m):
            out = data.copy()
            ls = sc + 32
            high = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8)), axis=1)
            out[:, 2], out[:, 3] = high & 0xFF, high >> 8
            out[:, 4:8] = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
            put_fp16_at(out, 0, d)
            return out

    scales = BlockScales(32, (1, 1) if sbs == QK4_NL else (-32, 31), None, 1.0, read, write)
    return FrozenRounding(family=2, params=np.zeros(1, dtype=np.int64), fit=fit, layout=layout,
                          values=KVALUES_IQ4NL.astype(np.float64), probe=(8, 9), scales=scales)


def _make_codec(name: str, sbs: int) -> Codec:
    type_size = (2 if sbs == QK4_NL else 8) + sbs // 2

    def quantize_rows(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.zeros((rows, cols // sbs * type_size), dtype=np.uint8)
        if importance is None:
            _quantize_rows(x, _VALUES, False, sbs, NTRY, out)
        else:
            qw = np.ascontiguousarray(importance, dtype=np.float32)
            _quantize_rows(x, qw, True, sbs, NTRY, out)
        return out

    def dequantize_rows(data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows = data.shape[0]
        out = np.empty((rows, data.shape[1] // type_size * sbs), dtype=np.float32)
        _dequantize_rows(data, sbs, out)
        return out

    frozen = _frozen_rounding(sbs, type_size)
    return register(Codec(name, quantize_rows, dequantize_rows, frozen=lambda _importance: frozen))


IQ4_NL = _make_codec("IQ4_NL", QK4_NL)
IQ4_XS = _make_codec("IQ4_XS", QK_K)
