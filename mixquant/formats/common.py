"""Scalar primitives shared by the numba kernels, each matching ggml's C exactly.

ggml-quants.c is compiled for baseline x86-64 (no FMA, no fast-math), so every float operation
is a plain IEEE float32 operation in source order; the kernels keep that order and stay in
float32 (constants are `np.float32`, never Python floats, which would promote to float64).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32


@intrinsic
def f32_to_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_to_f32(typingctx, x):
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if x.bitwidth > 32:  # numba widens uint32 arithmetic; the low 32 bits are the pattern
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


@njit(cache=True, nogil=True, inline="always")
def fp32_to_fp16(f):
    """IEEE round-to-nearest-even float32 -> float16 bits (ggml_compute_fp32_to_fp16)."""
    base = (abs(f) * F32(5.192296858534828e33)) * F32(7.703719777548943e-34)  # 2**112, 2**-110
    w = f32_to_bits(f)
    shl1_w = (w + w) & np.uint32(0xFFFFFFFF)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = bits_to_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = f32_to_bits(base)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(cache=True, nogil=True, inline="always")
def fp16_to_fp32(h):
    """float16 bits -> float32, operation for operation as ggml_compute_fp16_to_fp32.

    Exact for every finite and infinite half; a signaling-NaN half comes out quiet, as in C
    (the multiply by 2**-112 sets the quiet bit), which a plain bit-shuffling decoder would not do.
    """
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = (w + w) & np.uint32(0xFFFFFFFF)
    normalized = bits_to_f32(np.uint32((two_w >> np.uint32(4)) + np.uint32(0xE0 << 23))) * F32(2.0**-112)
    denormalized = bits_to_f32(np.uint32((two_w >> np.uint32(17)) | np.uint32(126 << 23))) - F32(0.5)
    if two_w < np.uint32(1 << 27):
        return bits_to_f32(np.uint32(sign | f32_to_bits(denormalized)))
    return bits_to_f32(np.uint32(sign | f32_to_bits(normalized)))


@njit(cache=True, nogil=True, inline="always")
def round_fp16(f):
    """The float32 value that storing `f` as fp16 and reading it back yields."""
    return fp16_to_fp32(fp32_to_fp16(f))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def nearest_int(fval):
    """ggml's nearest_int: `fval + 12582912.f`, then the low 23 mantissa bits minus 2**22.

    `fval` must be float32. Round-half-to-even for |fval| <= 4194303; beyond that (ggml's assert
    is compiled out) it returns the same wrapped value the C does, including for inf.
    """
    val = fval + F32(12582912.0)
    return np.int64(f32_to_bits(val) & np.uint32(0x007FFFFF)) - 0x00400000


@njit(cache=True, nogil=True, inline="always")
def put_fp16(out, offset, f):
    """Store `f` as little-endian fp16 at out[offset:offset+2]; returns the rounded value."""
    h = fp32_to_fp16(f)
    out[offset] = np.uint8(h & np.uint16(0xFF))
    out[offset + 1] = np.uint8(h >> np.uint16(8))
    return fp16_to_fp32(h)


@njit(cache=True, nogil=True, inline="always")
def get_fp16(data, offset):
    return fp16_to_fp32(np.uint16(data[offset]) | (np.uint16(data[offset + 1]) << np.uint16(8)))
