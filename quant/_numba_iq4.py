"""numba kernels for IQ4_NL, IQ4_XS and MXFP4, byte-identical to ggml (see ``_numpy_iq4``).

Conventions of ``quant._numba``: njit nogil, ``cache=True``, ``fastmath=False``, float32
operations in the C order.

* IQ4_NL / IQ4_XS: a tile of ``LANES`` 32-value blocks is transposed into one flat buffer
  (value i of lane s at ``i*LANES + s``) and the 16 fits of the scale search
  (``quantize_row_iq4_nl_impl``, ntry = 7) run as loops over the lanes.  ``best_index_int8``
  is a branch-free count of the 15 thresholds of ``_numpy_iq4.IQ4_THRESHOLDS`` (equal to the
  C binary search for every float), so the loops vectorize; each lane still sums in the C
  order.  The IQ4_XS super-block step (6-bit sub-block scales) is scalar per super-block.
* MXFP4: block by block; the 16-candidate error search of ``best_index_mxfp4`` is computed
  for all 32 values at once, and ``floorf(log2f(amax))`` comes from the exponent bits and
  ``_numpy_iq4.LOG2_UP``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quant._numba import _JIT, _bits_f32, _f16, _f32_bits, _nint, _put16
from quant._numpy_iq4 import IQ4_THRESHOLDS, IQ4_VALUES, LOG2_UP, MXFP4_THRESHOLDS, MXFP4_VALUES

F32 = np.float32
_Z = F32(0.0)
_ONE = F32(1.0)
_EPS = F32(1e-15)

#: 32-value blocks per tile (SIMD lanes of the inner loops); a multiple of 8 (IQ4_XS).
LANES = 64
_L = LANES

_T = tuple(F32(t) for t in IQ4_THRESHOLDS)  # 15 thresholds
_V = tuple(F32(v) for v in IQ4_VALUES)  # 16 values
_V0 = _V[0]
_MV = tuple(F32(v) for v in MXFP4_VALUES)
_MT = tuple(F32(t) for t in MXFP4_THRESHOLDS)  # 7 thresholds

# tile layout (float32 offsets)
_X = 0
_W = 32 * _L
_ST = 64 * _L
_MX, _AM, _ISC, _SQX, _SQ2, _D, _BEST, _SIG = (_ST + k * _L for k in range(8))
_SIZE = _ST + 8 * _L


@njit(inline="always", **_JIT)
def _qval(al):
    """kvalues_iq4nl[best_index_int8(al)] for a finite ``al`` (branch-free)."""
    q = _V0
    for k in range(15):
        q = _V[k + 1] if al >= _T[k] else q
    return q


@njit(inline="always", **_JIT)
def _qidx(al):
    """best_index_int8(16, kvalues_iq4nl, al) (NaN -> 15, as the C search)."""
    c = 0
    for k in range(15):
        c += 1 if al >= _T[k] else 0
    return c if al == al else 15


@njit(**_JIT)
def _fit(buf):
    """sumqx/sumq2 of every lane for its inverse scale at ``_ISC`` (values at ``_X``)."""
    for s in range(_L):
        buf[_SQX + s] = _Z
        buf[_SQ2 + s] = _Z
    for i in range(32):
        for s in range(_L):
            xv = buf[_X + i * _L + s]
            q = _qval(buf[_ISC + s] * xv)
            wq = buf[_W + i * _L + s] * q
            buf[_SQX + s] += wq * xv
            buf[_SQ2 + s] += wq * q


@njit(**_JIT)
def _search(buf, scales):
    """The per-block scale search of ``quantize_row_iq4_nl_impl`` (ntry = 7) on a tile.

    x at ``_X``, weights at ``_W``; scales[s] = the block's fitted scale (0 if amax < 1e-15).
    """
    for s in range(_L):
        buf[_AM + s] = _Z
        buf[_MX + s] = _Z
    for i in range(32):
        for s in range(_L):
            v = buf[_X + i * _L + s]
            a = abs(v)
            c = a > buf[_AM + s]
            buf[_AM + s] = a if c else buf[_AM + s]
            buf[_MX + s] = v if c else buf[_MX + s]
    for s in range(_L):
        mx = buf[_MX + s] if buf[_AM + s] >= _EPS else _ONE
        buf[_MX + s] = mx
        buf[_ISC + s] = _ONE / (-mx / _V0)
    _fit(buf)
    for s in range(_L):
        sqx = buf[_SQX + s]
        sq2 = buf[_SQ2 + s]
        d = sqx / sq2 if sq2 > _Z else _Z
        buf[_D + s] = d
        buf[_BEST + s] = d * sqx
    for itry in range(-7, 8):
        num = F32(itry - 127)
        for s in range(_L):
            buf[_ISC + s] = num / buf[_MX + s]
        _fit(buf)
        for s in range(_L):
            sqx = buf[_SQX + s]
            sq2 = buf[_SQ2 + s]
            ok = sq2 > _Z and sqx * sqx > buf[_BEST + s] * sq2
            d = sqx / sq2
            buf[_D + s] = d if ok else buf[_D + s]
            buf[_BEST + s] = d * sqx if ok else buf[_BEST + s]
    for s in range(_L):
        scales[s] = buf[_D + s] if buf[_AM + s] >= _EPS else _Z


@njit(**_JIT)
def _load_tile(x, b0, nvalid, buf, qw, use_qw, n, xs):
    """Transpose blocks b0..b0+nvalid-1 into the tile and set the weights.

    Weights: ``x*x``, or ``qw * sqrtf(sigma2 + x*x)`` with ``sigma2`` of the block
    (IQ4_NL, ``xs`` False: 2*sum(x*x)/32) or of its super-block (IQ4_XS: 2*sum(x*x)/256),
    sequential sums as in C.
    """
    for s in range(_L):
        if s < nvalid:
            o = (b0 + s) * 32
            for i in range(32):
                buf[_X + i * _L + s] = x[o + i]
        else:
            for i in range(32):
                buf[_X + i * _L + s] = _Z
    if not use_qw:
        for i in range(32):
            for s in range(_L):
                v = buf[_X + i * _L + s]
                buf[_W + i * _L + s] = v * v
        return
    if xs:
        for s0 in range(0, _L, 8):
            sg = _Z
            if s0 < nvalid:
                o = (b0 + s0) * 32
                for j in range(256):
                    sg += x[o + j] * x[o + j]
            sg = sg * F32(2.0 / 256)
            for s in range(s0, s0 + 8):
                buf[_SIG + s] = sg
    else:
        for s in range(_L):
            buf[_SIG + s] = _Z
        for i in range(32):
            for s in range(_L):
                v = buf[_X + i * _L + s]
                buf[_SIG + s] += v * v
        for s in range(_L):
            buf[_SIG + s] = buf[_SIG + s] * F32(2.0 / 32)
    for s in range(_L):
        col = ((b0 + s) * 32) % n if s < nvalid else 0
        sg = buf[_SIG + s]
        for i in range(32):
            v = buf[_X + i * _L + s]
            buf[_W + i * _L + s] = qw[col + i] * np.sqrt(sg + v * v)


@njit(**_JIT)
def _requant(buf, idl, Lq):
    """Lq[i*L + s] = best_index_int8(idl[s] * x) for every value of the tile."""
    for i in range(32):
        for s in range(_L):
            Lq[i * _L + s] = _qidx(idl[s] * buf[_X + i * _L + s])


@njit(inline="always", **_JIT)
def _pack_qs(out, o, Lq, s):
    for j in range(16):
        out[o + j] = (Lq[j * _L + s] | (Lq[(j + 16) * _L + s] << 4)) & 0xFF


@njit(**_JIT)
def kq_iq4_nl(x, n, qw, use_qw, out):
    """IQ4_NL (``quantize_iq4_nl``; 18-byte blocks), ``x`` whole rows of length ``n``."""
    nblk = x.size // 32
    buf = np.empty(_SIZE, F32)
    scales = np.empty(_L, F32)
    idl = np.empty(_L, F32)
    Lq = np.empty(32 * _L, np.int32)
    for b0 in range(0, nblk, _L):
        m = min(_L, nblk - b0)
        _load_tile(x, b0, m, buf, qw, use_qw, n, False)
        _search(buf, scales)
        for s in range(_L):
            d = scales[s]
            idl[s] = _ONE / d if d != _Z else _Z  # NaN != 0: 1/NaN, as in C
        _requant(buf, idl, Lq)
        for s in range(m):
            o = (b0 + s) * 18
            _put16(out, o, _f16(scales[s]))
            _pack_qs(out, o + 2, Lq, s)


@njit(**_JIT)
def kq_iq4_xs(x, n, qw, use_qw, out):
    """IQ4_XS (``quantize_iq4_xs``; 136-byte super-blocks), ``x`` whole rows of length ``n``."""
    nblk = x.size // 32
    buf = np.empty(_SIZE, F32)
    scales = np.empty(_L, F32)
    idl = np.empty(_L, F32)
    ls = np.empty(_L, np.int64)
    dsb = np.empty(_L // 8, F32)
    Lq = np.empty(32 * _L, np.int32)
    for b0 in range(0, nblk, _L):
        m = min(_L, nblk - b0)
        _load_tile(x, b0, m, buf, qw, use_qw, n, True)
        _search(buf, scales)
        for g in range(_L // 8):
            amax = _Z
            max_scale = _Z
            for ib in range(8):
                sc = scales[g * 8 + ib]
                a = abs(sc)
                if a > amax:
                    amax = a
                    max_scale = sc
            d = -max_scale / F32(32.0)
            dsb[g] = d
            idv = _ONE / d if d != _Z else _Z
            for ib in range(8):
                s = g * 8 + ib
                l = _nint(idv * scales[s])
                l = max(-32, min(31, l))
                ls[s] = l
                dl = d * F32(l)
                idl[s] = _ONE / dl if dl != _Z else _Z
        _requant(buf, idl, Lq)
        for g in range(m // 8):
            o = (b0 // 8 + g) * 136
            _put16(out, o, _f16(dsb[g]))
            sh = 0
            for ib in range(8):
                sh |= ((ls[g * 8 + ib] + 32) >> 4) << (2 * ib)
            _put16(out, o + 2, sh)
            for k in range(4):
                lo = (ls[g * 8 + 2 * k] + 32) & 15
                hi = (ls[g * 8 + 2 * k + 1] + 32) & 15
                out[o + 4 + k] = lo | (hi << 4)
            for ib in range(8):
                _pack_qs(out, o + 8 + 16 * ib, Lq, g * 8 + ib)


@njit(**_JIT)
def kq_mxfp4(x, log2_up, out):
    """MXFP4 (``quantize_row_mxfp4_ref``; 17-byte blocks); quant weights are not used.

    ``best_index_mxfp4`` (first index of least ``fabsf(kvalues[i]*d - x)``) is, for the
    power-of-two ``d`` of ordinary blocks, the count ``c`` of thresholds
    ``MXFP4_THRESHOLDS*d`` that ``|x|`` reaches: index ``c`` for x >= 0, ``8 + c`` for x < 0
    with c > 0 (ties go to the earlier index: 0 before -0, positive before negative).  The
    scaled thresholds are exact and the errors scale exactly while ``d`` is a normal float
    with ``12*d`` finite and ``T*d`` normal (e = 28..252); other blocks (subnormal or huge
    magnitudes) run the C search literally.
    """
    nblk = x.size // 32
    best = np.empty(32, F32)
    idx = np.empty(32, np.int32)
    for b in range(nblk):
        o = b * 32
        m = np.int32(0)
        for i in range(32):
            u = _f32_bits(x[o + i]) & np.int32(0x7FFFFFFF)
            m = u if u > m else m
        e = 0
        if m > 0:
            ex = m >> 23
            if ex > 0:
                k = ex - 127
            else:  # subnormal: highest set bit
                k = -150
                t = m
                while t > 0:
                    t >>= 1
                    k += 1
            if (np.int64(m) & 0xFFFFFFFF) >= log2_up[k + 149]:
                k += 1
            e = (k - 2 + 127) & 0xFF  # x86-64 (uint8_t) of a float: through int32
        d = _bits_f32(np.int32(0x00200000 << e)) if e < 2 else _bits_f32(np.int32((e - 1) << 23))
        if e >= 28 and e <= 252:
            t1 = _MT[0] * d
            t2 = _MT[1] * d
            t3 = _MT[2] * d
            t4 = _MT[3] * d
            t5 = _MT[4] * d
            t6 = _MT[5] * d
            t7 = _MT[6] * d
            for i in range(32):
                v = x[o + i]
                a = abs(v)
                c = np.int32(a >= t1) + np.int32(a >= t2) + np.int32(a >= t3) + np.int32(a >= t4)
                c += np.int32(a >= t5) + np.int32(a >= t6) + np.int32(a >= t7)
                idx[i] = c + 8 if (v < _Z and c > 0) else c
        else:
            for i in range(32):
                best[i] = abs(_MV[0] * d - x[o + i])
                idx[i] = 0
            for c in range(1, 16):
                kd = _MV[c] * d
                for i in range(32):
                    err = abs(kd - x[o + i])
                    u = err < best[i]
                    best[i] = err if u else best[i]
                    idx[i] = c if u else idx[i]
        ob = b * 17
        out[ob] = e
        for j in range(16):
            out[ob + 1 + j] = idx[j] | (idx[j + 16] << 4)


def run(name: str, x: np.ndarray, n: int, qw: np.ndarray, use_qw: bool, out: np.ndarray) -> None:
    """Quantize a chunk (whole rows when ``use_qw``) of one of this module's types."""
    if name == "IQ4_NL":
        kq_iq4_nl(x, n, qw, use_qw, out)
    elif name == "IQ4_XS":
        kq_iq4_xs(x, n, qw, use_qw, out)
    else:
        kq_mxfp4(x, LOG2_UP, out)


#: name -> (block size, type size)
SPECS = {"IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "MXFP4": (32, 17)}
