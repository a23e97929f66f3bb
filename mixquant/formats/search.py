"""Numba ports of ggml's shared scale searches (ggml-quants.c, llama.cpp 0c1e570), bit-exact.

    make_qx_quants(n, nmax, x, L, rmse_type, qw)                              -> scale
    make_q3_quants(n, nmax, x, L, do_rmse)                                    -> scale
    make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad) -> (scale, the_min)
    make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad) -> (scale, the_min)
    make_qp_quants(n, nmax, x, L, quant_weights)                              -> scale

Conventions (shared by every format module):

* Same names and argument order as the C. Pointers are 1-D numpy arrays (slices are fine): `x`,
  `weights`, `qw`, `quant_weights` float32; `L` int8 for make_qx_quants/make_q3_quants and uint8
  for the others (as in C; pass `L.view(np.uint8)` where C casts `(uint8_t*)L`); `Laux` uint8.
* C out-parameters (`float * the_min`) are dropped from the arguments and returned after the C
  return value: `scale, the_min = make_qkx2_quants(...)`.
* Pointers that C accepts as NULL (`qw` of make_qx_quants, `weights` of make_qkx3_quants) accept
  None; numba compiles a separate specialization and prunes the `is None` branches.
* C `float` parameters (rmin, rdelta) are converted to float32 on entry, so Python floats are fine.
* Every float operation is float32 in C source order (ggml-quants.c is built without FMA or
  fast-math); `nearest_int` here is ggml's own magic-number rounding (`nearest_int`), which equals
  round-half-to-even for |x| <= 2**22 and reproduces ggml's (assert-free, -DNDEBUG) result beyond.
"""

import numpy as np
from numba import njit

from .common import nearest_int

F32 = np.float32

GROUP_MAX_EPS = F32(1e-15)

__all__ = [
    "GROUP_MAX_EPS",
    "make_qx_quants",
    "make_q3_quants",
    "make_qkx2_quants",
    "make_qkx3_quants",
    "make_qp_quants",
]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _qx_weight(qw, i, xi, rmse_type):
    # float w = qw ? qw[i] : rmse_type == 1 ? x[i] * x[i] : rmse_type == 2 ? 1 : rmse_type == 3 ? fabsf(x[i]) : sqrtf(fabsf(x[i]));
    if qw is None:
        if rmse_type == 1:
            return xi * xi
        if rmse_type == 2:
            return F32(1.0)
        if rmse_type == 3:
            return abs(xi)
        return np.sqrt(abs(xi))
    return qw[i]


@njit(cache=True, nogil=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """Symmetric scale search; L (int8) gets values in [0, 2*nmax-1]. Returns the scale."""
    mx = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return F32(1.0) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(qw, i, x[i], rmse_type)
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != F32(0.0) else F32(0.0)
    if return_early:
        return F32(0.5) * (scale + F32(1.0) / iscale) if suml2 > F32(0.0) else F32(1.0) / iscale
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(is_)) / mx
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(qw, i, x[i], rmse_type)
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > F32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, nogil=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Symmetric search with coordinate-descent refinement (Q3_K); L (int8) in [0, 2*nmax-1]."""
    mx = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / mx
    if do_rmse:
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for _itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                Li = F32(L[i])
                slx = sumlx - w * x[i] * Li
                if slx > F32(0.0):
                    sl2 = suml2 - w * Li * Li
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fnl = F32(new_l)
                        slx += w * x[i] * fnl
                        sl2 += w * fnl * fnl
                        if sl2 > F32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return F32(1.0) / iscale


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) search with explicit weights (not nullable).

    L, Laux uint8. Returns (scale, the_min) where the_min = -min >= 0 (may be -0.0, as in C).
    """
    rmin = F32(rmin)
    rdelta = F32(rdelta)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > F32(0.0):
        mn = F32(0.0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F32(0.0), -mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1.0) / iscale
    best_error = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i]
        best_error += w * diff
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * F32(is_) + F32(nmax)) / (mx - mn)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i]
                cur_error += w * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _qkx3_weight(weights, i, xi):
    # float w = weights ? weights[i] : x[i]*x[i];
    if weights is None:
        return xi * xi
    return weights[i]


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) search; weights may be None (then x**2).

    L, Laux uint8. Returns (scale, the_min) where the_min = -min >= 0 (may be -0.0, as in C).
    """
    rmin = F32(rmin)
    rdelta = F32(rdelta)
    mn = x[0]
    mx = x[0]
    sum_w = _qkx3_weight(weights, 0, x[0])
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = _qkx3_weight(weights, i, x[i])
        sum_w += w
        sum_x += w * x[i]
    if mn > F32(0.0):
        mn = F32(0.0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return F32(0.0), -mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1.0) / iscale
    best_mad = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = _qkx3_weight(weights, i, x[i])
        best_mad += w * diff
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * F32(is_) + F32(nmax)) / (mx - mn)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = _qkx3_weight(weights, i, x[i])
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            mad = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = _qkx3_weight(weights, i, x[i])
                mad += w * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, nogil=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Search for a positive-only scale of non-negative x (the sub-block scales of the K-quants).

    L uint8 (C stores nearest_int results into uint8_t unclamped at first: wraps as in C).
    quant_weights is required (not nullable). Returns the scale.
    """
    mx = F32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F32(1.0) / iscale
    best_mse = F32(0.0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F32(0.1) * F32(is_) + F32(nmax)) / mx
        scale_is = F32(1.0) / iscale_is
        mse = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * F32(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l & 0xFF
        w = quant_weights[i]
        fl = F32(l)  # C accumulates the int l here, not the stored uint8_t
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            Li = F32(L[i])
            slx = sumlx - w * x[i] * Li
            sl2 = suml2 - w * Li * Li
            if slx > F32(0.0) and sl2 > F32(0.0):
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != L[i]:
                    fnl = F32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
