"""numba backend: compiled CPU kernels, byte-identical to ggml's quantizers.

Same contract as ``quant._numpy.quantize_rows`` (the readable reference), built for speed:

* **Lanes.**  Blocks are independent, so a tile of ``LANES_K`` (make_qkx searches: Q2_K,
  Q4_K, Q5_K, Q4_1, Q5_1) or ``LANES`` (the others) sub-blocks is transposed into one flat
  float32 buffer, value i of lane s at ``i*lanes + s``, and every step of the C algorithm runs as a
  loop over the lanes.  All offsets are compile-time constants, so LLVM proves the rows of
  the buffer independent and turns those loops into SIMD code without runtime alias checks;
  the branches of the C code become per-lane selects.  Each lane still does exactly the
  float32 operations of its C block, in the same order (sequential sums over the in-block
  index).  Q8_0 and the Q4_0/Q5_0/Q4_1/Q5_1 reference paths need no search and work block
  by block on the contiguous input.  The small per-super-block searches over 16 sub-block
  scales (make_qp_quants for Q2_K, make_qx_quants for Q3_K with an imatrix) are scalar.
* **No FMA, no fast-math.**  Kernels are compiled with ``fastmath=False``; LLVM then never
  contracts ``a*b + c`` (the x86-64 ``ggml-base`` build does not either).  Checked by the
  byte comparisons against ggml in the tests.
* **Rounding.**  ``nearest_int`` is ggml's bit trick (``_nint``, via a float->int bitcast).
  Inside the scale searches the lanes use the equivalent float form
  ``(v + 1.5*2**23) - 1.5*2**23``, which equals the bit trick for |v| <= 4194303.  In
  make_qx_quants (and the first step of make_q3_quants) |v| <= nmax + 1 always; the
  coordinate descent of make_q3_quants has no bound and uses the bit trick; in make_qkx a
  per-lane bound on |v| is checked at every step and a lane that could leave the range (in practice: blocks of subnormal
  values) is redone by an exact scalar port (``_qkx_one``).  ``roundf`` (Q8_0) rounds half
  away from zero; C float->int8 casts are done as x86-64 executes them (truncate to int32,
  NaN/out of range -> INT_MIN, keep the low byte), like the numpy reference.
* **Threads.**  Kernels release the GIL (``nogil``); ``quantize_rows`` splits the rows (or,
  without an imatrix, the blocks) into chunks run by a thread pool.  Chunking never
  changes bytes: blocks are independent and the per-row statistics of the ``_impl`` paths
  are computed over whole rows.

Compiled code is cached on disk (``cache=True``): the JIT cost (tens of seconds for all
kernels) is paid once per machine; later processes load the kernels in about a second.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError as e:  # pragma: no cover - exercised only without numba
    raise ImportError(f"the numba quantization backend needs numba: {e}") from e

__all__ = ["quantize_rows", "NAMES", "LANES", "LANES_K"]

F32 = np.float32
_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)

#: Sub-blocks processed together (SIMD lanes of the inner loops): make_qkx tiles
#: (Q2_K, Q4_K, Q5_K, Q4_1, Q5_1) and the other tiles (Q3_K, Q6_K, Q4_0, Q5_0).
LANES_K = 64
LANES = 128
QK_K = 256

_MAGIC = F32(12582912.0)  # 1.5 * 2**23, ggml nearest_int
_LIM = F32(4194303.0)  # float rounding == bit trick for |v| <= this
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_Z = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_TWO31 = F32(2147483648.0)
_FLT_MAX = F32(3.4028234663852886e38)
_I32_MIN = -2147483648


# --------------------------------------------------------------------------- scalar helpers


@intrinsic
def _f32_bits(typingctx, x):
    """Reinterpret a float32 as int32 (C ``memcpy``)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):
    """Reinterpret an int32 as float32."""
    if x != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", **_JIT)
def _nint(v):
    """ggml ``nearest_int``, bit-exact for every float32 (inf and NaN included)."""
    return (np.int64(_f32_bits(v + _MAGIC)) & 0x7FFFFF) - 0x400000


@njit(inline="always", **_JIT)
def _rnd(v):
    """``nearest_int`` as a float; exact for |v| <= 4194303 (callers guarantee it)."""
    return (v + _MAGIC) - _MAGIC


@njit(inline="always", **_JIT)
def _s8(c):
    """Low byte of an int, as a signed int8 value."""
    return ((c & 0xFF) ^ 0x80) - 0x80


@njit(inline="always", **_JIT)
def _f16(f):
    """``GGML_FP32_TO_FP16``: float32 -> binary16 bits, round to nearest even."""
    u = np.int64(_f32_bits(f)) & 0xFFFFFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x47800000:
        return sign | 0x7C00
    if a < 0x38800000:  # fp16 subnormal (or zero): units of 2**-24, exact scaling
        return sign | _nint(_bits_f32(np.int32(a)) * F32(16777216.0))
    return sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13)


@njit(inline="always", **_JIT)
def _f16v(h):
    """binary16 bits -> float32 value (exact)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = F32(m) * F32(5.9604644775390625e-08)
    elif e == 31:
        v = _bits_f32(np.int32(0x7F800000 | (m << 13)))
    else:
        v = _bits_f32(np.int32(((e + 112) << 23) | (m << 13)))
    return -v if h & 0x8000 else v


@njit(inline="always", **_JIT)
def _put16(out, o, h):
    out[o] = h & 0xFF
    out[o + 1] = (h >> 8) & 0xFF


# --------------------------------------------------------------------------- tile layout
#
# A tile is one flat float32 buffer ``buf``: in-block index i, lane s at ``base + i*LANES + s``.
# All offsets are compile-time constants, so LLVM sees every access as the same base plus
# a constant offset, proves the rows independent and vectorizes without runtime checks.

_NL = LANES
_NK = LANES_K
# make_qkx2/3_quants tiles (32 values per lane): x, weights, candidate L, per-lane state
_KX = 0
_KW = 32 * _NK
_KLT = 64 * _NK
_KST = 96 * _NK
(_MN, _MX, _SW, _SX, _XLO, _BEST, _ACCI, _ACCM, _SCL, _ISC, _SL, _SL2, _SXL, _TSC, _TMN, _CUR, _DOK, _BAD) = (
    _KST + k * _NK for k in range(18)
)
_KSIZE = _KST + 18 * _NK


# --------------------------------------------------------------------------- make_qx_quants (rmse_type 1)


def _make_qx(N):
    """Build ``make_qx_quants(N, nmax, x, L, 1, w)`` over the lanes of a tile.

    Tile layout: x at 0, weights at N*LANES, then scratch; size ``N*3*LANES + 8*LANES``.
    Out: scales[LANES], Lq (int32, [N*LANES]; L in 0 .. 2*nmax-1, 0 for all-zero lanes).
    """
    X = 0
    W = N * _NL
    WX = 2 * N * _NL
    ST = 3 * N * _NL
    AM = ST
    MX = ST + _NL
    SLX = ST + 2 * _NL
    SL2 = ST + 3 * _NL
    BEST = ST + 4 * _NL
    BISC = ST + 5 * _NL
    ISC = ST + 6 * _NL

    @njit(**_JIT)
    def qx(buf, nmax, scales, Lq):
        nm = F32(nmax)
        lo = F32(-nmax)
        hi = F32(nmax - 1)
        for s in range(_NL):
            buf[AM + s] = _Z
            buf[MX + s] = _Z
        for i in range(N):
            for s in range(_NL):
                v = buf[X + i * _NL + s]
                a = abs(v)
                c = a > buf[AM + s]
                buf[AM + s] = a if c else buf[AM + s]
                buf[MX + s] = v if c else buf[MX + s]
                buf[WX + i * _NL + s] = buf[W + i * _NL + s] * v
        for s in range(_NL):
            buf[ISC + s] = -nm / buf[MX + s]
            buf[SLX + s] = _Z
            buf[SL2 + s] = _Z
        for i in range(N):
            for s in range(_NL):
                w = buf[W + i * _NL + s]
                q = _rnd(buf[ISC + s] * buf[X + i * _NL + s])
                q = q if q > lo else lo
                q = q if q < hi else hi
                buf[SLX + s] += buf[WX + i * _NL + s] * q
                buf[SL2 + s] += (w * q) * q
        for s in range(_NL):
            slx = buf[SLX + s]
            sl2 = buf[SL2 + s]
            sc = slx / sl2 if sl2 != _Z else _Z
            scales[s] = sc
            buf[BEST + s] = sc * slx
            buf[BISC + s] = buf[ISC + s]
        for k in range(-9, 10):
            if k == 0:
                continue
            c = -(nm + F32(0.1) * F32(k))
            for s in range(_NL):
                buf[ISC + s] = c / buf[MX + s]
                buf[SLX + s] = _Z
                buf[SL2 + s] = _Z
            for i in range(N):
                for s in range(_NL):
                    w = buf[W + i * _NL + s]
                    q = _rnd(buf[ISC + s] * buf[X + i * _NL + s])
                    q = q if q > lo else lo
                    q = q if q < hi else hi
                    buf[SLX + s] += buf[WX + i * _NL + s] * q
                    buf[SL2 + s] += (w * q) * q
            for s in range(_NL):
                slx = buf[SLX + s]
                sl2 = buf[SL2 + s]
                ok = sl2 > _Z and slx * slx > buf[BEST + s] * sl2
                sc = slx / sl2
                buf[BISC + s] = buf[ISC + s] if ok else buf[BISC + s]
                scales[s] = sc if ok else scales[s]
                buf[BEST + s] = sc * slx if ok else buf[BEST + s]
        for i in range(N):
            for s in range(_NL):
                q = _rnd(buf[BISC + s] * buf[X + i * _NL + s])
                q = q if q > lo else lo
                q = q if q < hi else hi
                Lq[i * _NL + s] = np.int32(q) + nmax if buf[AM + s] >= _EPS else 0
        for s in range(_NL):
            if not buf[AM + s] >= _EPS:
                scales[s] = _Z

    return qx


_qx16 = _make_qx(16)
_qx32 = _make_qx(32)
_Q6SIZE = 3 * 16 * _NL + 8 * _NL
_Q32SIZE = 3 * 32 * _NL + 8 * _NL


# --------------------------------------------------------------------------- make_qkx2/3_quants


@njit(**_JIT)
def _qkx_one(x, w, n, nmax, rmin, rdelta, nstep, mad, L, Laux):
    """Scalar ``make_qkx2_quants`` / ``make_qkx3_quants`` (weights given).

    Exact port with ggml's bit-trick ``nearest_int``; ``mad`` selects ``|diff|`` instead of
    ``diff*diff`` as the error (Q2_K).  Used for lanes whose values could leave the range
    where the vectorized float rounding is exact.  Returns (scale, the_min).
    """
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > _Z:
        mn = _Z
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _Z, -mn
    iscale = F32(nmax) / (mx - mn)
    scale = _ONE / iscale
    best = _Z
    for i in range(n):
        li = _nint(iscale * (x[i] - mn))
        li = max(0, min(nmax, li))
        L[i] = li
        diff = scale * F32(li) + mn - x[i]
        best += w[i] * (abs(diff) if mad else diff * diff)
    for k in range(nstep + 1):
        iscale = (rmin + rdelta * F32(k) + F32(nmax)) / (mx - mn)
        sl = _Z
        sl2 = _Z
        sxl = _Z
        for i in range(n):
            li = _nint(iscale * (x[i] - mn))
            li = max(0, min(nmax, li))
            Laux[i] = li
            fl = F32(li)
            sl += w[i] * fl
            sl2 += (w[i] * fl) * fl
            sxl += (w[i] * fl) * x[i]
        D = sum_w * sl2 - sl * sl
        if D > _Z:
            ts = (sum_w * sxl - sum_x * sl) / D
            tm = (sl2 * sum_x - sl * sxl) / D
            if tm > _Z:
                tm = _Z
                ts = sxl / sl2
            cur = _Z
            for i in range(n):
                diff = ts * F32(Laux[i]) + tm - x[i]
                cur += w[i] * (abs(diff) if mad else diff * diff)
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = ts
                mn = tm
    return scale, -mn


def _make_qkx(N, MAD):
    """Build ``make_qkx2_quants``/``make_qkx3_quants`` (n=N <= 32, weights given) over the
    lanes of a ``_KSIZE`` tile (x at ``_KX``, weights at ``_KW``, rows 0..N-1 used).

    ``MAD``: the error is ``w*|diff|`` (Q2_K ``_ref``) instead of ``w*diff*diff``.
    Out: scales, the_min [LANES_K], Lq (int32, value i of lane s at ``i*LANES_K + s``).
    """

    @njit(**_JIT)
    def qkx(buf, nmax, rmin, rdelta, nstep, scales, the_min, Lq):
        nm = F32(nmax)
        for s in range(_NK):
            v = buf[_KX + s]
            w = buf[_KW + s]
            buf[_MN + s] = v
            buf[_MX + s] = v
            buf[_SW + s] = w
            buf[_SX + s] = w * v
        for i in range(1, N):
            for s in range(_NK):
                v = buf[_KX + i * _NK + s]
                w = buf[_KW + i * _NK + s]
                buf[_MN + s] = v if v < buf[_MN + s] else buf[_MN + s]
                buf[_MX + s] = v if v > buf[_MX + s] else buf[_MX + s]
                buf[_SW + s] += w
                buf[_SX + s] += w * v
        for s in range(_NK):
            m = buf[_MN + s]
            buf[_XLO + s] = m
            m = m if not m > _Z else _Z
            buf[_MN + s] = m
            ic = nm / (buf[_MX + s] - m)
            buf[_ISC + s] = ic
            buf[_SCL + s] = _ONE / ic
            buf[_ACCI + s] = ic
            buf[_ACCM + s] = m
            buf[_BEST + s] = _Z
            b = ic * (buf[_MX + s] - m)
            buf[_BAD + s] = _Z if b <= _LIM else _ONE
        for i in range(N):
            for s in range(_NK):
                v = buf[_KX + i * _NK + s]
                mn = buf[_MN + s]
                q = _rnd(buf[_ISC + s] * (v - mn))
                q = q if q > _Z else _Z
                q = q if q < nm else nm
                diff = buf[_SCL + s] * q + mn - v
                buf[_BEST + s] += buf[_KW + i * _NK + s] * (abs(diff) if MAD else diff * diff)
        for k in range(nstep + 1):
            c = rmin + rdelta * F32(k) + nm
            for s in range(_NK):
                mn = buf[_MN + s]
                ic = c / (buf[_MX + s] - mn)
                buf[_ISC + s] = ic
                b1 = ic * (buf[_MX + s] - mn)
                b2 = ic * (mn - buf[_XLO + s])
                buf[_BAD + s] = buf[_BAD + s] if (abs(b1) <= _LIM and abs(b2) <= _LIM) else _ONE
                buf[_SL + s] = _Z
                buf[_SL2 + s] = _Z
                buf[_SXL + s] = _Z
            for i in range(N):
                for s in range(_NK):
                    v = buf[_KX + i * _NK + s]
                    q = _rnd(buf[_ISC + s] * (v - buf[_MN + s]))
                    q = q if q > _Z else _Z
                    q = q if q < nm else nm
                    buf[_KLT + i * _NK + s] = q
                    wl = buf[_KW + i * _NK + s] * q
                    buf[_SL + s] += wl
                    buf[_SL2 + s] += wl * q
                    buf[_SXL + s] += wl * v
            for s in range(_NK):
                sw = buf[_SW + s]
                sx = buf[_SX + s]
                sl = buf[_SL + s]
                sl2 = buf[_SL2 + s]
                sxl = buf[_SXL + s]
                D = sw * sl2 - sl * sl
                ts = (sw * sxl - sx * sl) / D
                tm = (sl2 * sx - sl * sxl) / D
                pos = tm > _Z
                buf[_TSC + s] = sxl / sl2 if pos else ts
                buf[_TMN + s] = _Z if pos else tm
                buf[_DOK + s] = _ONE if D > _Z else _Z
                buf[_CUR + s] = _Z
            for i in range(N):
                for s in range(_NK):
                    diff = buf[_TSC + s] * buf[_KLT + i * _NK + s] + buf[_TMN + s] - buf[_KX + i * _NK + s]
                    buf[_CUR + s] += buf[_KW + i * _NK + s] * (abs(diff) if MAD else diff * diff)
            for s in range(_NK):
                ok = buf[_DOK + s] != _Z and buf[_CUR + s] < buf[_BEST + s]
                buf[_BEST + s] = buf[_CUR + s] if ok else buf[_BEST + s]
                buf[_SCL + s] = buf[_TSC + s] if ok else buf[_SCL + s]
                buf[_ACCI + s] = buf[_ISC + s] if ok else buf[_ACCI + s]
                buf[_ACCM + s] = buf[_MN + s] if ok else buf[_ACCM + s]
                buf[_MN + s] = buf[_TMN + s] if ok else buf[_MN + s]
        for i in range(N):
            for s in range(_NK):
                q = _rnd(buf[_ACCI + s] * (buf[_KX + i * _NK + s] - buf[_ACCM + s]))
                q = q if q > _Z else _Z
                q = q if q < nm else nm
                Lq[i * _NK + s] = np.int32(q)
        for s in range(_NK):
            xlo = buf[_XLO + s]
            m0 = xlo if not xlo > _Z else _Z
            if buf[_MX + s] == m0:  # degenerate: all L = 0
                scales[s] = _Z
                the_min[s] = -m0
                for i in range(N):
                    Lq[i * _NK + s] = 0
            elif buf[_BAD + s] != _Z:  # values may leave the exact range: scalar exact port
                xv = np.empty(N, F32)
                wv = np.empty(N, F32)
                for i in range(N):
                    xv[i] = buf[_KX + i * _NK + s]
                    wv[i] = buf[_KW + i * _NK + s]
                Li = np.empty(N, np.int64)
                La = np.empty(N, np.int64)
                sc, tm = _qkx_one(xv, wv, N, nmax, rmin, rdelta, nstep, MAD, Li, La)
                scales[s] = sc
                the_min[s] = tm
                for i in range(N):
                    Lq[i * _NK + s] = Li[i]
            else:
                scales[s] = buf[_SCL + s]
                the_min[s] = -buf[_MN + s]

    return qkx


_qkx_lanes = _make_qkx(32, False)
_qkx16 = _make_qkx(16, False)
_qkx16_mad = _make_qkx(16, True)


@njit(**_JIT)
def _load(x, base, nvalid, bs, buf, off, nl):
    """buf[off + i*nl + s] = x[base + s*bs + i] for lanes s < nvalid; zeros elsewhere."""
    for s in range(nl):
        if s < nvalid:
            o = base + s * bs
            for i in range(bs):
                buf[off + i * nl + s] = x[o + i]
        else:
            for i in range(bs):
                buf[off + i * nl + s] = _Z


# --------------------------------------------------------------------------- make_qp_quants


@njit(**_JIT)
def _qp(n, nmax, x, w, L):
    """``make_qp_quants(n, nmax, x, L, w)``; L is int64 holding the uint8 values."""
    mx = _Z
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _Z
    nm = F32(nmax)
    iscale = nm / mx
    for i in range(n):
        L[i] = _nint(iscale * x[i]) & 0xFF
    scale = _ONE / iscale
    best = _Z
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best += (w[i] * diff) * diff
    for k in range(-4, 5):
        if k == 0:
            continue
        isk = (F32(0.1) * F32(k) + nm) / mx
        sck = _ONE / isk
        mse = _Z
        for i in range(n):
            li = min(nmax, _nint(isk * x[i]))
            diff = x[i] - sck * F32(li)
            mse += (w[i] * diff) * diff
        if mse < best:
            best = mse
            iscale = isk
    sumlx = _Z
    suml2 = _Z
    for i in range(n):
        li = min(nmax, _nint(iscale * x[i]))
        L[i] = li & 0xFF
        sumlx += (w[i] * x[i]) * F32(li)
        suml2 += (w[i] * F32(li)) * F32(li)
    for _ in range(5):
        changed = 0
        for i in range(n):
            wi = w[i]
            fL = F32(L[i])
            slx = sumlx - (wi * x[i]) * fL
            sl2 = suml2 - (wi * fL) * fL
            if slx > _Z and sl2 > _Z:
                nl_ = min(nmax, _nint((x[i] * sl2) / slx))
                if nl_ != L[i]:
                    slx += (wi * x[i]) * F32(nl_)
                    sl2 += (wi * F32(nl_)) * F32(nl_)
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = nl_ & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > _Z else _Z


# --------------------------------------------------------------------------- Q4_K / Q5_K


@njit(**_JIT)
def _kq45(x, n, qw, use_qw, five, out):
    """Q4_K (five=False) / Q5_K (five=True) for the flat rows ``x`` (length multiple of 256).

    use_qw: the ``_impl`` path with quant weights ``qw`` indexed by column (mod n).
    """
    nsb = x.size // QK_K
    SB = _NK // 8
    ts = 176 if five else 144
    nmax = 31 if five else 15
    if use_qw:
        rmin, rdelta, nstep = F32(-0.9), F32(0.05), 36
    elif five:
        rmin, rdelta, nstep = F32(-0.5), F32(0.1), 15
    else:
        rmin, rdelta, nstep = F32(-1.0), F32(0.1), 20
    buf = np.empty(_KSIZE, F32)
    Lq = np.empty(32 * _NK, np.int32)
    scales = np.empty(_NK, F32)
    mins = np.empty(_NK, F32)
    sw = np.empty(_NK, F32)
    lane = np.empty(_NK, F32)
    dl = np.empty(_NK, F32)
    dml = np.empty(_NK, F32)
    sig = np.empty(SB, F32)
    cols = np.empty(_NK, np.int64)
    sc12 = np.zeros(12, np.int64)
    Ls = np.empty(8, np.int64)
    Lm = np.empty(8, np.int64)
    for t0 in range(0, nsb, SB):
        nb = min(SB, nsb - t0)
        _load(x, t0 * QK_K, nb * 8, 32, buf, _KX, _NK)
        if use_qw:
            for b in range(SB):
                sig[b] = _Z
            for e in range(QK_K):
                for b in range(nb):
                    v = x[(t0 + b) * QK_K + e]
                    sig[b] += v * v
            for s in range(_NK):
                lane[s] = (F32(2.0) * sig[s // 8]) / F32(256.0)  # sigma2
            for s in range(_NK):
                cols[s] = ((t0 * 8 + s) * 32) % n
            for i in range(32):
                for s in range(_NK):
                    v = buf[_KX + i * _NK + s]
                    buf[_KW + i * _NK + s] = qw[cols[s] + i] * np.sqrt(lane[s] + v * v)
            for s in range(_NK):
                sw[s] = _Z
            for i in range(32):
                for s in range(_NK):
                    sw[s] += buf[_KW + i * _NK + s]
        else:
            for s in range(_NK):
                lane[s] = _Z
            for i in range(32):
                for s in range(_NK):
                    v = buf[_KX + i * _NK + s]
                    lane[s] += v * v
            for s in range(_NK):
                lane[s] = np.sqrt(lane[s] / F32(32.0))
            for i in range(32):
                for s in range(_NK):
                    buf[_KW + i * _NK + s] = lane[s] + abs(buf[_KX + i * _NK + s])
        _qkx_lanes(buf, nmax, rmin, rdelta, nstep, scales, mins, Lq)
        for b in range(nb):
            o = (t0 + b) * ts
            s0 = b * 8
            for j in range(12):
                sc12[j] = 0
            if use_qw:
                d_block = _qp(8, 63, scales[s0 : s0 + 8], sw[s0 : s0 + 8], Ls)
                m_block = _qp(8, 63, mins[s0 : s0 + 8], sw[s0 : s0 + 8], Lm)
                if five:
                    for j in range(8):
                        Ls[j] = min(63, Ls[j])
                        Lm[j] = min(63, Lm[j])
                dh = _f16(d_block)
                mh = _f16(m_block)
            else:
                max_scale = _Z
                max_min = _Z
                for j in range(8):
                    if scales[s0 + j] > max_scale:
                        max_scale = scales[s0 + j]
                    if mins[s0 + j] > max_min:
                        max_min = mins[s0 + j]
                inv_s = F32(63.0) / max_scale if max_scale > _Z else _Z
                inv_m = F32(63.0) / max_min if max_min > _Z else _Z
                for j in range(8):
                    Ls[j] = min(63, _nint(inv_s * scales[s0 + j]) & 0xFF)
                    Lm[j] = min(63, _nint(inv_m * mins[s0 + j]) & 0xFF)
                dh = _f16(max_scale / F32(63.0))
                mh = _f16(max_min / F32(63.0))
            for j in range(8):
                ls = Ls[j]
                lm = Lm[j]
                if j < 4:
                    sc12[j] = ls
                    sc12[j + 4] = lm
                else:
                    sc12[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
                    sc12[j - 4] = (sc12[j - 4] | ((ls >> 4) << 6)) & 0xFF
                    sc12[j] = (sc12[j] | ((lm >> 4) << 6)) & 0xFF
            _put16(out, o, dh)
            _put16(out, o + 2, mh)
            for j in range(12):
                out[o + 4 + j] = sc12[j]
            dv = _f16v(dh)
            mv = _f16v(mh)
            for j in range(8):
                if j < 4:
                    sc = sc12[j] & 63
                    m = sc12[j + 4] & 63
                else:
                    sc = (sc12[j + 4] & 0xF) | ((sc12[j - 4] >> 6) << 4)
                    m = (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4)
                dl[s0 + j] = dv * F32(sc)
                dml[s0 + j] = mv * F32(m)
        for s in range(nb * 8, _NK):
            dl[s] = _Z
            dml[s] = _Z
        for i in range(32):
            for s in range(_NK):
                d = dl[s]
                q = _nint((buf[_KX + i * _NK + s] + dml[s]) / d)
                q = max(0, min(nmax, q))
                Lq[i * _NK + s] = np.int32(q) if d != _Z else Lq[i * _NK + s]
        for b in range(nb):
            o = (t0 + b) * ts
            s0 = b * 8
            if five:
                for l in range(32):
                    h = 0
                    for c in range(4):
                        a0 = Lq[l * _NK + s0 + 2 * c]
                        a1 = Lq[l * _NK + s0 + 2 * c + 1]
                        h |= ((a0 >> 4) & 1) << (2 * c)
                        h |= ((a1 >> 4) & 1) << (2 * c + 1)
                        out[o + 48 + 32 * c + l] = (a0 & 0xF) | ((a1 & 0xF) << 4)
                    out[o + 16 + l] = h
            else:
                for c in range(4):
                    for l in range(32):
                        out[o + 16 + 32 * c + l] = (Lq[l * _NK + s0 + 2 * c] | (Lq[l * _NK + s0 + 2 * c + 1] << 4)) & 0xFF


# --------------------------------------------------------------------------- Q6_K


@njit(**_JIT)
def _kq6(x, n, qw, use_qw, out):
    """Q6_K (``_ref``, or ``_impl`` with quant weights ``qw`` used directly as weights)."""
    nsb = x.size // QK_K
    SB = _NL // 16
    W = 16 * _NL
    buf = np.empty(_Q6SIZE, F32)
    Lq = np.empty(16 * _NL, np.int32)
    scales = np.empty(_NL, F32)
    dl = np.empty(_NL, F32)
    zsb = np.empty(SB, np.bool_)
    for t0 in range(0, nsb, SB):
        nb = min(SB, nsb - t0)
        _load(x, t0 * QK_K, nb * 16, 16, buf, 0, _NL)
        if use_qw:
            for s in range(_NL):
                col = ((t0 * 16 + s) * 16) % n
                for i in range(16):
                    buf[W + i * _NL + s] = qw[col + i]
        else:
            for i in range(16):
                for s in range(_NL):
                    v = buf[i * _NL + s]
                    buf[W + i * _NL + s] = v * v
        _qx16(buf, 32, scales, Lq)
        for s in range(_NL):
            dl[s] = _Z
        for b in range(nb):
            o = (t0 + b) * 210
            s0 = b * 16
            max_scale = _Z
            max_abs = _Z
            for j in range(16):
                a = abs(scales[s0 + j])
                if a > max_abs:
                    max_abs = a
                    max_scale = scales[s0 + j]
            zsb[b] = max_abs < _EPS
            if zsb[b]:  # 210 zero bytes, whatever the search left in L
                for j in range(210):
                    out[o + j] = 0
                continue
            iscale = F32(-128.0) / max_scale
            dh = _f16(_ONE / iscale)
            _put16(out, o + 208, dh)
            dv = _f16v(dh)
            for j in range(16):
                q = _s8(min(127, _nint(iscale * scales[s0 + j])))
                out[o + 192 + j] = q & 0xFF
                dl[s0 + j] = dv * F32(q)
        for i in range(16):
            for s in range(_NL):
                d = dl[s]
                q = _nint(buf[i * _NL + s] / d)
                q = max(-32, min(31, q)) + 32
                Lq[i * _NL + s] = np.int32(q) if d != _Z else Lq[i * _NL + s]
        for b in range(nb):
            if zsb[b]:
                continue
            o = (t0 + b) * 210
            s0 = b * 16
            for h in range(2):
                for l in range(32):
                    e0 = 128 * h + l
                    a0 = Lq[(e0 % 16) * _NL + s0 + e0 // 16]
                    a1 = Lq[((e0 + 32) % 16) * _NL + s0 + (e0 + 32) // 16]
                    a2 = Lq[((e0 + 64) % 16) * _NL + s0 + (e0 + 64) // 16]
                    a3 = Lq[((e0 + 96) % 16) * _NL + s0 + (e0 + 96) // 16]
                    out[o + 64 * h + l] = ((a0 & 0xF) | ((a2 & 0xF) << 4)) & 0xFF
                    out[o + 64 * h + 32 + l] = ((a1 & 0xF) | ((a3 & 0xF) << 4)) & 0xFF
                    out[o + 128 + 32 * h + l] = ((a0 >> 4) | ((a1 >> 4) << 2) | ((a2 >> 4) << 4) | ((a3 >> 4) << 6)) & 0xFF


# --------------------------------------------------------------------------- Q2_K


@njit(**_JIT)
def _kq2(x, n, qw, use_qw, out):
    """Q2_K for the flat rows ``x`` (length multiple of 256); 16 sub-blocks of 16 per super-block.

    ``_ref``: make_qkx2_quants(16, 3, w=|x|, -0.5, 0.1, 15, use_mad) per sub-block, 4-bit
    scales and mins ``nearest_int(15/max * v)`` (wrapped to a byte, no clamp).
    ``_impl`` (use_qw): weights ``qw*sqrt(sigma2 + x*x)`` with the super-block's
    ``sigma2 = sum(x*x)/256``, make_qkx3_quants(-0.9, 0.05, 36), make_qp_quants(16, 15) for
    the scales and mins.  Both requantize with the fp16 d/dmin (search L kept where d == 0).
    """
    nsb = x.size // QK_K
    SB = _NK // 16
    buf = np.empty(_KSIZE, F32)
    Lq = np.empty(32 * _NK, np.int32)
    scales = np.empty(_NK, F32)
    mins = np.empty(_NK, F32)
    sw = np.empty(_NK, F32)
    lane = np.empty(_NK, F32)
    dl = np.empty(_NK, F32)
    dml = np.empty(_NK, F32)
    sig = np.empty(SB, F32)
    cols = np.empty(_NK, np.int64)
    Ls = np.empty(16, np.int64)
    Lm = np.empty(16, np.int64)
    for t0 in range(0, nsb, SB):
        nb = min(SB, nsb - t0)
        _load(x, t0 * QK_K, nb * 16, 16, buf, _KX, _NK)
        if use_qw:
            for b in range(SB):
                sig[b] = _Z
            for e in range(QK_K):
                for b in range(nb):
                    v = x[(t0 + b) * QK_K + e]
                    sig[b] += v * v
            for s in range(_NK):
                lane[s] = sig[s // 16] / F32(256.0)  # sigma2
                cols[s] = ((t0 * 16 + s) * 16) % n
            for i in range(16):
                for s in range(_NK):
                    v = buf[_KX + i * _NK + s]
                    buf[_KW + i * _NK + s] = qw[cols[s] + i] * np.sqrt(lane[s] + v * v)
            for s in range(_NK):
                sw[s] = _Z
            for i in range(16):
                for s in range(_NK):
                    sw[s] += buf[_KW + i * _NK + s]
            _qkx16(buf, 3, F32(-0.9), F32(0.05), 36, scales, mins, Lq)
        else:
            for i in range(16):
                for s in range(_NK):
                    buf[_KW + i * _NK + s] = abs(buf[_KX + i * _NK + s])
            _qkx16_mad(buf, 3, F32(-0.5), F32(0.1), 15, scales, mins, Lq)
        for b in range(nb):
            o = (t0 + b) * 84
            s0 = b * 16
            if use_qw:
                dh = _f16(_qp(16, 15, scales[s0 : s0 + 16], sw[s0 : s0 + 16], Ls))
                mh = _f16(_qp(16, 15, mins[s0 : s0 + 16], sw[s0 : s0 + 16], Lm))
            else:
                max_scale = _Z
                max_min = _Z
                for j in range(16):
                    if scales[s0 + j] > max_scale:
                        max_scale = scales[s0 + j]
                    if mins[s0 + j] > max_min:
                        max_min = mins[s0 + j]
                if max_scale > _Z:
                    isc = F32(15.0) / max_scale
                    for j in range(16):
                        Ls[j] = _nint(isc * scales[s0 + j])
                    dh = _f16(max_scale / F32(15.0))
                else:
                    for j in range(16):
                        Ls[j] = 0
                    dh = 0
                if max_min > _Z:
                    imn = F32(15.0) / max_min
                    for j in range(16):
                        Lm[j] = _nint(imn * mins[s0 + j])
                    mh = _f16(max_min / F32(15.0))
                else:
                    for j in range(16):
                        Lm[j] = 0
                    mh = 0
            _put16(out, o + 80, dh)
            _put16(out, o + 82, mh)
            dv = _f16v(dh)
            mv = _f16v(mh)
            for j in range(16):
                sc = (Ls[j] | (Lm[j] << 4)) & 0xFF  # uint8 field: wraps as in C
                out[o + j] = sc
                dl[s0 + j] = dv * F32(sc & 0xF)
                dml[s0 + j] = mv * F32(sc >> 4)
        for s in range(nb * 16, _NK):
            dl[s] = _Z
            dml[s] = _Z
        for i in range(16):
            for s in range(_NK):
                d = dl[s]
                q = _nint((buf[_KX + i * _NK + s] + dml[s]) / d)
                q = max(0, min(3, q))
                Lq[i * _NK + s] = np.int32(q) if d != _Z else Lq[i * _NK + s]
        for b in range(nb):
            _pack2(out, (t0 + b) * 84 + 16, Lq, b * 16, _NK, False)


@njit(inline="always", **_JIT)
def _pack2(out, o, Lq, s0, nl, q3):
    """Low 2 bits of a super-block's 256 quants (sub-block j = lane s0+j, value i at row i)
    into ``qs[64]`` at ``o``; with ``q3`` the values are 0..7 and the bit 2 (``L > 3``) goes
    to ``hmask[32]`` at ``o - 32`` (element e: byte e % 32, bit e // 32)."""
    for c in range(2):
        for l in range(32):
            v = 0
            for k in range(4):
                e = 128 * c + 32 * k + l
                a = Lq[(e % 16) * nl + s0 + e // 16]
                if q3:
                    a = a - 4 if a > 3 else a
                v |= a << (2 * k)
            out[o + 32 * c + l] = v & 0xFF
    if q3:
        for m in range(32):
            h = 0
            for k in range(8):
                e = 32 * k + m
                a = Lq[(e % 16) * nl + s0 + e // 16]
                h |= (1 if a > 3 else 0) << k
            out[o - 32 + m] = h


# --------------------------------------------------------------------------- Q3_K

# make_q3_quants tile (16 values per lane): x, x*x, x*x*x, L (float), per-lane state
_Q3W = 16 * _NL
_Q3WX = 32 * _NL
_Q3L = 48 * _NL
_Q3AM = 64 * _NL
_Q3MX = _Q3AM + _NL
_Q3SLX = _Q3AM + 2 * _NL
_Q3SL2 = _Q3AM + 3 * _NL
_Q3SIZE = _Q3AM + 4 * _NL


@njit(**_JIT)
def _q3_lanes(buf, scales, Lq):
    """``make_q3_quants(16, 4, x, L, do_rmse=true)`` for every lane of a ``_Q3SIZE`` tile (x at 0).

    Weights x*x; start from ``iscale = -4/max`` (signed largest |x|, first occurrence), then 5
    coordinate-descent passes moving single L[i] to ``nearest_int(x*sl2/slx)`` while
    ``sumlx**2/suml2`` strictly improves (a pass without change is a no-op for a lane, so
    stopping only when no lane changed equals C's per-block early exit).  The descent's
    ``nearest_int`` is the exact bit trick (its argument is unbounded).
    Out: scales [LANES], Lq (L+4 in 0..7; 0 for all-zero lanes).
    """
    for s in range(_NL):
        buf[_Q3AM + s] = _Z
        buf[_Q3MX + s] = _Z
    for i in range(16):
        for s in range(_NL):
            v = buf[i * _NL + s]
            a = abs(v)
            c = a > buf[_Q3AM + s]
            buf[_Q3AM + s] = a if c else buf[_Q3AM + s]
            buf[_Q3MX + s] = v if c else buf[_Q3MX + s]
            w = v * v
            buf[_Q3W + i * _NL + s] = w
            buf[_Q3WX + i * _NL + s] = w * v
    for s in range(_NL):
        buf[_Q3MX + s] = F32(-4.0) / buf[_Q3MX + s]  # iscale from here on
        buf[_Q3SLX + s] = _Z
        buf[_Q3SL2 + s] = _Z
    for i in range(16):
        for s in range(_NL):
            q = _rnd(buf[_Q3MX + s] * buf[i * _NL + s])  # |.| <= 4 for non-zero lanes
            q = q if q > F32(-4.0) else F32(-4.0)
            q = q if q < F32(3.0) else F32(3.0)
            buf[_Q3L + i * _NL + s] = q
            w = buf[_Q3W + i * _NL + s]
            buf[_Q3SLX + s] += buf[_Q3WX + i * _NL + s] * q
            buf[_Q3SL2 + s] += (w * q) * q
    for _ in range(5):
        changed = 0
        for i in range(16):
            for s in range(_NL):
                v = buf[i * _NL + s]
                w = buf[_Q3W + i * _NL + s]
                wx = buf[_Q3WX + i * _NL + s]
                lf = buf[_Q3L + i * _NL + s]
                sumlx = buf[_Q3SLX + s]
                suml2 = buf[_Q3SL2 + s]
                slx = sumlx - wx * lf
                sl2 = suml2 - (w * lf) * lf
                nl = _nint((v * sl2) / slx)
                nl = max(-4, min(3, nl))
                nf = F32(nl)
                slx2 = slx + wx * nf
                sl22 = sl2 + (w * nf) * nf
                acc = (slx > _Z) & (nf != lf) & (sl22 > _Z) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                buf[_Q3L + i * _NL + s] = nf if acc else lf
                buf[_Q3SLX + s] = slx2 if acc else sumlx
                buf[_Q3SL2 + s] = sl22 if acc else suml2
                changed += 1 if acc else 0
        if changed == 0:  # no lane moved: further passes change nothing
            break
    for i in range(16):
        for s in range(_NL):
            nz = buf[_Q3AM + s] >= _EPS
            Lq[i * _NL + s] = np.int32(buf[_Q3L + i * _NL + s]) + 4 if nz else 0
    for s in range(_NL):
        sl2 = buf[_Q3SL2 + s]
        sc = buf[_Q3SLX + s] / sl2 if sl2 > _Z else _Z
        scales[s] = sc if buf[_Q3AM + s] >= _EPS else _Z


@njit(**_JIT)
def _qx_one(n, nmax, x, w, L):
    """Scalar ``make_qx_quants(n, nmax, x, L, 1, w)``; L (int64) in 0..2*nmax-1, 0 if all zero."""
    mx = _Z
    amax = _Z
    for i in range(n):
        a = abs(x[i])
        if a > amax:
            amax = a
            mx = x[i]
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _Z
    nm = F32(nmax)
    iscale = -nm / mx
    sumlx = _Z
    suml2 = _Z
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nint(iscale * x[i])))
        L[i] = l + nmax
        fl = F32(l)
        sumlx += (w[i] * x[i]) * fl
        suml2 += (w[i] * fl) * fl
    scale = sumlx / suml2 if suml2 != _Z else _Z
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(nm + F32(0.1) * F32(k)) / mx
        sumlx = _Z
        suml2 = _Z
        for i in range(n):
            fl = F32(max(-nmax, min(nmax - 1, _nint(iscale * x[i]))))
            sumlx += (w[i] * x[i]) * fl
            suml2 += (w[i] * fl) * fl
        if suml2 > _Z and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nint(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def _kq3(x, n, qw, use_qw, out):
    """Q3_K for the flat rows ``x`` (length multiple of 256); 16 sub-blocks of 16 per super-block.

    ``_ref``: make_q3_quants per sub-block, 6-bit scales ``clamp((int8)nearest_int(-32/max *
    s), -32, 31) + 32`` around the signed largest scale, ``d = fp16(max/-32)``.
    ``_impl`` (use_qw): weights ``qw*sqrt(2*sum(x*x)/256 + x*x)``, make_qx_quants(16, 4) per
    sub-block, then make_qx_quants(16, 32) over the 16 scales (weighted by their weight sums).
    Both requantize ``clamp(nearest_int(x/(d*(sc-32))), -4, 3) + 4`` (search L kept where that
    d == 0) and split L into ``hmask`` (bit 2) and ``qs`` (bits 0-1).
    """
    nsb = x.size // QK_K
    SB = _NL // 16
    W = 16 * _NL
    buf = np.empty(max(_Q3SIZE, _Q6SIZE), F32)
    Lq = np.empty(16 * _NL, np.int32)
    scales = np.empty(_NL, F32)
    sw = np.empty(_NL, F32)
    lane = np.empty(_NL, F32)
    dl = np.empty(_NL, F32)
    sig = np.empty(SB, F32)
    cols = np.empty(_NL, np.int64)
    Ls = np.empty(16, np.int64)
    sc12 = np.zeros(12, np.int64)
    for t0 in range(0, nsb, SB):
        nb = min(SB, nsb - t0)
        _load(x, t0 * QK_K, nb * 16, 16, buf, 0, _NL)
        if use_qw:
            for b in range(SB):
                sig[b] = _Z
            for e in range(QK_K):
                for b in range(nb):
                    v = x[(t0 + b) * QK_K + e]
                    sig[b] += v * v
            for s in range(_NL):
                lane[s] = (F32(2.0) * sig[s // 16]) / F32(256.0)  # sigma2
                cols[s] = ((t0 * 16 + s) * 16) % n
            for i in range(16):
                for s in range(_NL):
                    v = buf[i * _NL + s]
                    buf[W + i * _NL + s] = qw[cols[s] + i] * np.sqrt(lane[s] + v * v)
            for s in range(_NL):
                sw[s] = _Z
            for i in range(16):
                for s in range(_NL):
                    sw[s] += buf[W + i * _NL + s]
            _qx16(buf, 4, scales, Lq)
        else:
            _q3_lanes(buf, scales, Lq)
        for b in range(nb):
            o = (t0 + b) * 110
            s0 = b * 16
            if use_qw:
                dh = _f16(_qx_one(16, 32, scales[s0 : s0 + 16], sw[s0 : s0 + 16], Ls))
            else:
                max_scale = _Z
                amax = _Z
                for j in range(16):
                    a = abs(scales[s0 + j])
                    if a > amax:
                        amax = a
                        max_scale = scales[s0 + j]
                if max_scale != _Z:
                    isc = F32(-32.0) / max_scale
                    for j in range(16):
                        Ls[j] = max(-32, min(31, _s8(_nint(isc * scales[s0 + j])))) + 32
                    dh = _f16(_ONE / isc)
                else:
                    for j in range(16):
                        Ls[j] = 0
                    dh = 0
            for k in range(12):
                sc12[k] = 0
            for j in range(16):
                l = Ls[j]
                if j < 8:
                    sc12[j] = l & 0xF
                else:
                    sc12[j - 8] |= (l & 0xF) << 4
                sc12[8 + j % 4] |= (l >> 4) << (2 * (j // 4))
            for k in range(12):
                out[o + 96 + k] = sc12[k] & 0xFF
            _put16(out, o + 108, dh)
            dv = _f16v(dh)
            for j in range(16):
                dl[s0 + j] = dv * F32((Ls[j] & 63) - 32)
        for s in range(nb * 16, _NL):
            dl[s] = _Z
        for i in range(16):
            for s in range(_NL):
                d = dl[s]
                q = _nint(buf[i * _NL + s] / d)
                q = max(-4, min(3, q)) + 4
                Lq[i * _NL + s] = np.int32(q) if d != _Z else Lq[i * _NL + s]
        for b in range(nb):
            _pack2(out, (t0 + b) * 110 + 32, Lq, b * 16, _NL, True)


# --------------------------------------------------------------------------- Q8_0


@njit(**_JIT)
def _kq8_0(x, out):
    """Q8_0 (``quantize_row_q8_0_ref``; imatrix ignored as in ggml).

    One block at a time (its 32 values are already contiguous).  The block maximum of
    |x| is taken on the magnitude bits as integers: the same value as the C float loop
    for finite input, and a reduction LLVM may vectorize.
    """
    nblk = x.size // 32
    for b in range(nblk):
        o = b * 32
        m = np.int32(0)
        for i in range(32):
            u = _f32_bits(x[o + i]) & np.int32(0x7FFFFFFF)
            m = u if u > m else m
        d = _bits_f32(np.int32(m)) / F32(127.0)
        idv = _ONE / d if d != _Z else _Z
        ob = b * 34
        _put16(out, ob, _f16(d))
        for i in range(32):
            v = x[o + i] * idv
            a = abs(v)
            t = np.trunc(a)
            r = t + _ONE if a - t >= _HALF else t  # roundf: half away from zero
            ok = r < _TWO31
            qi = np.int32(r) if ok else np.int32(0)
            qi = -qi if v < _Z else qi
            qi = qi if ok else np.int32(_I32_MIN)
            out[ob + 2 + i] = qi & 0xFF


# --------------------------------------------------------------------------- Q4_0 / Q5_0 / Q5_1


@njit(**_JIT)
def _row_sigma2(x, n, sig):
    """Per row: sum of x*x (sequential) / n_per_row (``_impl`` of the legacy types)."""
    nrows = x.size // n
    for r in range(nrows):
        s = _Z
        o = r * n
        for j in range(n):
            s += x[o + j] * x[o + j]
        sig[r] = s / F32(n)


@njit(**_JIT)
def _legacy_weights(buf, qw, n, b0, sig, nl):
    """weights (at 32*nl) = qw * sqrt(sigma2_row + x*x) for 32-value lanes (x at 0)."""
    for s in range(nl):
        e = (b0 + s) * 32
        r = min(e // n, sig.size - 1)
        col = e % n
        sg = sig[r]
        for i in range(32):
            v = buf[i * nl + s]
            buf[32 * nl + i * nl + s] = qw[col + i] * np.sqrt(sg + v * v)


@njit(**_JIT)
def _pack5(out, o, Lq, s, nl):
    """qh (u32 at o) and qs (16 bytes at o+4) of a 5-bit block from lane s of Lq."""
    qh = 0
    for j in range(16):
        a0 = Lq[j * nl + s] & 0xFF
        a1 = Lq[(j + 16) * nl + s] & 0xFF
        out[o + 4 + j] = (a0 & 0x0F) | ((a1 & 0x0F) << 4)
        qh |= ((a0 & 0x10) >> 4) << j
        qh |= ((a1 & 0x10) >> 4) << (j + 16)
    out[o] = qh & 0xFF
    out[o + 1] = (qh >> 8) & 0xFF
    out[o + 2] = (qh >> 16) & 0xFF
    out[o + 3] = (qh >> 24) & 0xFF


@njit(inline="always", **_JIT)
def _q_legacy(x, idv, off, qmax):
    """``MIN(qmax, (int8_t)(x*id + off))`` stored as uint8, with x86-64 float->int rules."""
    v = x * idv + off
    ok = v >= F32(-2147483648.0) and v < _TWO31
    c = np.int32(v) if ok else np.int32(_I32_MIN)
    qq = np.int32(np.int8(c))  # low byte, signed (C's (int8_t) cast)
    return np.int32(np.uint8(qq if qq < qmax else np.int32(qmax)))


@njit(**_JIT)
def _ref4_0_5_0(x, five, out):
    """Q4_0 / Q5_0 ``_ref``, block by block on the contiguous input (as the C loop)."""
    nblk = x.size // 32
    ts = 22 if five else 18
    dneg = F32(-16.0) if five else F32(-8.0)
    off = F32(16.5) if five else F32(8.5)
    qmax = 31 if five else 15
    q = np.empty(32, np.int32)
    for b in range(nblk):
        o = b * 32
        # C: first value of largest |x| (strict '<' from 0).  Largest magnitude as integer
        # bits (vectorizable, exact for finite x), then the first value that has it.
        m = np.int32(0)
        for i in range(32):
            u = _f32_bits(x[o + i]) & np.int32(0x7FFFFFFF)
            m = u if u > m else m
        first = 32
        for i in range(32):
            u = _f32_bits(x[o + i]) & np.int32(0x7FFFFFFF)
            k = i if u == m else 32
            first = k if k < first else first
        mx = x[o + first] if m != 0 else _Z
        d = mx / dneg
        idv = _ONE / d if d != _Z else _Z
        ob = b * ts
        _put16(out, ob, _f16(d))
        if five:
            for i in range(32):
                q[i] = _q_legacy(x[o + i], idv, off, qmax)
            qh = 0
            for j in range(16):
                out[ob + 6 + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)
                qh |= ((q[j] & 0x10) >> 4) << j
                qh |= ((q[j + 16] & 0x10) >> 4) << (j + 16)
            out[ob + 2] = qh & 0xFF
            out[ob + 3] = (qh >> 8) & 0xFF
            out[ob + 4] = (qh >> 16) & 0xFF
            out[ob + 5] = (qh >> 24) & 0xFF
        else:
            for j in range(16):
                q0 = _q_legacy(x[o + j], idv, off, qmax)
                q1 = _q_legacy(x[o + 16 + j], idv, off, qmax)
                out[ob + 2 + j] = np.uint8(q0 | (q1 << 4))


@njit(**_JIT)
def _ref_q41_q51(x, five, out):
    """Q4_1 (five=False) / Q5_1 (five=True) ``_ref``, block by block on the contiguous input.

    ``d = (max - min)/15`` (31); Q4_1 stores ``MIN(15, (int8_t)((x-min)*id + 0.5f))``,
    Q5_1 ``(uint8_t)((x-min)*id + 0.5f)`` unclamped (x86-64 float->int rules).
    """
    nblk = x.size // 32
    ts = 24 if five else 20
    q = np.empty(32, np.int64)
    for b in range(nblk):
        o = b * 32
        mn = _FLT_MAX
        mx = -_FLT_MAX
        for i in range(32):
            v = x[o + i]
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = (mx - mn) / (F32(31.0) if five else F32(15.0))
        idv = _ONE / d if d != _Z else _Z
        ob = b * ts
        _put16(out, ob, _f16(d))
        _put16(out, ob + 2, _f16(mn))
        if five:
            for i in range(32):
                v = (x[o + i] - mn) * idv + _HALF
                ok = v >= F32(-2147483648.0) and v < _TWO31
                c = np.int32(v) if ok else np.int32(_I32_MIN)
                q[i] = c & 0xFF
            qh = 0
            for j in range(16):
                out[ob + 8 + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)
                qh |= ((q[j] & 0x10) >> 4) << j
                qh |= ((q[j + 16] & 0x10) >> 4) << (j + 16)
            out[ob + 4] = qh & 0xFF
            out[ob + 5] = (qh >> 8) & 0xFF
            out[ob + 6] = (qh >> 16) & 0xFF
            out[ob + 7] = (qh >> 24) & 0xFF
        else:
            for j in range(16):
                q0 = _q_legacy(x[o + j] - mn, idv, _HALF, 15)
                q1 = _q_legacy(x[o + 16 + j] - mn, idv, _HALF, 15)
                out[ob + 4 + j] = (q0 | (q1 << 4)) & 0xFF  # a wrapped q0 > 15 spills, as in C


@njit(**_JIT)
def _kq4_0_5_0(x, n, qw, five, out):
    """Q4_0 (five=False) / Q5_0 (five=True) ``_impl``: make_qx_quants with row-sigma2 weights.

    ``x`` holds whole rows of length ``n``; ``qw`` the quant weights of one row.
    """
    nblk = x.size // 32
    ts = 22 if five else 18
    buf = np.empty(_Q32SIZE, F32)
    Lq = np.empty(32 * _NL, np.int32)
    scales = np.empty(_NL, F32)
    sig = np.empty(max(1, x.size // n), F32)
    _row_sigma2(x, n, sig)
    for b0 in range(0, nblk, _NL):
        m = min(_NL, nblk - b0)
        _load(x, b0 * 32, m, 32, buf, 0, _NL)
        _legacy_weights(buf, qw, n, b0, sig, _NL)
        _qx32(buf, 16 if five else 8, scales, Lq)
        for s in range(m):
            o = (b0 + s) * ts
            _put16(out, o, _f16(scales[s]))
            if five:
                _pack5(out, o + 2, Lq, s, _NL)
            else:
                for j in range(16):
                    out[o + 2 + j] = (Lq[j * _NL + s] | (Lq[(j + 16) * _NL + s] << 4)) & 0xFF


@njit(**_JIT)
def _kq_min_impl(x, n, qw, five, out):
    """Q4_1 (five=False) / Q5_1 (five=True) ``_impl``: make_qkx3_quants(-0.9, 0.05, 36) with
    row-sigma2 weights; d, -min and L stored as found (no requantization)."""
    nblk = x.size // 32
    ts = 24 if five else 20
    buf = np.empty(_KSIZE, F32)
    Lq = np.empty(32 * _NK, np.int32)
    scales = np.empty(_NK, F32)
    mins = np.empty(_NK, F32)
    sig = np.empty(max(1, x.size // n), F32)
    _row_sigma2(x, n, sig)
    for b0 in range(0, nblk, _NK):
        m = min(_NK, nblk - b0)
        _load(x, b0 * 32, m, 32, buf, _KX, _NK)
        _legacy_weights(buf, qw, n, b0, sig, _NK)
        _qkx_lanes(buf, 31 if five else 15, F32(-0.9), F32(0.05), 36, scales, mins, Lq)
        for s in range(m):
            o = (b0 + s) * ts
            _put16(out, o, _f16(scales[s]))
            _put16(out, o + 2, _f16(-mins[s]))
            if five:
                _pack5(out, o + 4, Lq, s, _NK)
            else:
                for j in range(16):
                    out[o + 4 + j] = (Lq[j * _NK + s] | (Lq[(j + 16) * _NK + s] << 4)) & 0xFF


# --------------------------------------------------------------------------- dispatch

# name -> (block size, type size in bytes)
_SPECS = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (QK_K, 84),
    "Q3_K": (QK_K, 110),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
    "IQ2_XXS": (QK_K, 66),
    "IQ2_XS": (QK_K, 74),
    "IQ2_S": (QK_K, 82),
    "IQ3_XXS": (QK_K, 98),
    "IQ3_S": (QK_K, 110),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (QK_K, 136),
    "MXFP4": (32, 17),
    "IQ1_S": (QK_K, 50),
    "IQ1_M": (QK_K, 56),
    "TQ1_0": (QK_K, 54),
    "TQ2_0": (QK_K, 66),
}
NAMES = tuple(_SPECS)

#: Elements per work item handed to a thread.
CHUNK_ELEMS = 1 << 18

_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _pool_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="quant-numba")
        return p


def _run(name: str, x: np.ndarray, n: int, qw: np.ndarray, use_qw: bool, out: np.ndarray) -> None:
    if name == "Q4_K":
        _kq45(x, n, qw, use_qw, False, out)
    elif name == "Q5_K":
        _kq45(x, n, qw, use_qw, True, out)
    elif name == "Q6_K":
        _kq6(x, n, qw, use_qw, out)
    elif name == "Q2_K":
        _kq2(x, n, qw, use_qw, out)
    elif name == "Q3_K":
        _kq3(x, n, qw, use_qw, out)
    elif name == "Q8_0":
        _kq8_0(x, out)
    elif name == "IQ2_XXS" or name == "IQ2_XS" or name == "IQ2_S":
        from ._numba_iq2 import quantize as _iq2

        _iq2(name, x, n, qw, use_qw, out)
    elif name == "IQ3_XXS" or name == "IQ3_S":
        from ._numba_iq3 import quantize as _iq3

        _iq3(name, x, n, qw, use_qw, out)
    elif name == "IQ4_NL" or name == "IQ4_XS" or name == "MXFP4":
        from ._numba_iq4 import run as _iq4

        _iq4(name, x, n, qw, use_qw, out)
    elif name == "IQ1_S" or name == "IQ1_M":
        from ._numba_iq1 import quantize as _iq1

        _iq1(name, x, n, qw, use_qw, out)
    elif name == "TQ1_0" or name == "TQ2_0":
        from ._numba_tq import run as _tq

        _tq(name, x, out)
    elif not use_qw:
        if name == "Q5_1" or name == "Q4_1":
            _ref_q41_q51(x, name == "Q5_1", out)
        else:
            _ref4_0_5_0(x, name == "Q5_0", out)
    elif name == "Q5_1" or name == "Q4_1":
        _kq_min_impl(x, n, qw, name == "Q5_1", out)
    else:
        _kq4_0_5_0(x, n, qw, name == "Q5_0", out)


def quantize_rows(name: str, x: np.ndarray, qw: np.ndarray | None, threads: int | None = None) -> np.ndarray:
    """Quantize float32 rows ``[nrows, n]`` to ggml bytes ``[nrows, n/bs*type_size]``.

    Same bytes as ``ggml_quantize_chunk(type, x, dst, 0, nrows, n, qw)``.  ``qw`` (float32
    ``[n]``, llama.cpp's quant_weights) selects the ``_impl`` path; Q8_0 ignores it.
    ``threads``: worker threads (``None`` = ``os.cpu_count()``).
    """
    key = name.upper()
    try:
        bs, ts = _SPECS[key]
    except KeyError:
        raise ValueError(f"numba backend: unsupported type {name!r}") from None
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim != 2 or x.shape[1] % bs:
        raise ValueError(f"{key}: expected [nrows, n] with n a multiple of {bs}, got {x.shape}")
    nrows, n = x.shape
    use_qw = qw is not None and key != "Q8_0"
    if use_qw:
        qw = np.ascontiguousarray(qw, dtype=F32).reshape(-1)
        if qw.size != n:
            raise ValueError(f"{key}: quant weights have {qw.size} values, rows have {n}")
    else:
        qw = np.zeros(1, F32)
    out = np.empty((nrows, n // bs * ts), np.uint8)
    if nrows == 0 or n == 0:
        return out
    nthreads = (os.cpu_count() or 1) if threads is None else max(1, int(threads))

    if use_qw:  # whole rows per work item (column index and row statistics)
        flat_x, flat_o = x, out
        unit, uelems = n, n
    else:  # blocks are independent: split anywhere on a block boundary
        unit = QK_K if bs == QK_K else 32 * _NL
        if (nrows * n) % unit:
            unit = bs
        flat_x = x.reshape(-1, unit)
        flat_o = out.reshape(flat_x.shape[0], -1)
        uelems = unit
    nunits = flat_x.shape[0]
    per = max(1, CHUNK_ELEMS // uelems)
    if nthreads > 1:
        per = max(1, min(per, -(-nunits // nthreads)))
    starts = list(range(0, nunits, per))

    def work(u0: int) -> None:
        u1 = min(nunits, u0 + per)
        _run(key, flat_x[u0:u1].reshape(-1), n, qw, use_qw, flat_o[u0:u1].reshape(-1))

    if nthreads == 1 or len(starts) == 1:
        for u0 in starts:
            work(u0)
    else:
        list(_pool(nthreads).map(work, starts))
    return out
