"""numba kernels for TQ1_0 and TQ2_0, byte-identical to ggml (see ``_numpy_tq``).

Block by block on the contiguous input, as the C loops; ``lroundf(x*id) + 1`` rounds half
away from zero, and a non-finite ``x*id`` (blocks below ~2.9e-39, where ``1/d`` is inf)
gives 1 as glibc's ``lroundf`` on x86-64 does after the ``(int)`` truncation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from quant._numba import _JIT, _bits_f32, _f16, _f32_bits, _put16

F32 = np.float32
_Z = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_INF = F32(np.inf)


@njit(**_JIT)
def _trits(x, o, xi):
    """xi[0..255] = lroundf(x[o+j]*id) + 1 for the block at o; returns the fp16 bits of d."""
    m = np.int32(0)
    for j in range(256):  # largest |x| as integer bits: the float maximum for finite x
        u = _f32_bits(x[o + j]) & np.int32(0x7FFFFFFF)
        m = u if u > m else m
    amax = _bits_f32(np.int32(m))
    idv = _ONE / amax if amax != _Z else _Z
    for j in range(256):
        # lroundf: |v| <= 1 + 2**-23 for finite v, so it is 0 or +-1 (half away from zero);
        # inf/NaN (1/amax = inf) give 1 after glibc's LONG_MIN and the (int) truncation
        v = x[o + j] * idv
        a = abs(v)
        r = np.int32(1) if (a >= _HALF and a < _INF) else np.int32(0)
        xi[j] = (-r if v < _Z else r) + 1
    return _f16(amax)


@njit(**_JIT)
def kq_tq2_0(x, out):
    nblk = x.size // 256
    xi = np.empty(256, np.int32)
    for b in range(nblk):
        h = _trits(x, b * 256, xi)
        ob = b * 66
        for j in range(2):
            for m in range(32):
                q = 0
                for n in range(4):
                    q |= (xi[128 * j + m + 32 * n] & 3) << (2 * n)
                out[ob + 32 * j + m] = q
        _put16(out, ob + 64, h)


@njit(**_JIT)
def kq_tq1_0(x, out):
    nblk = x.size // 256
    xi = np.empty(256, np.int32)
    q = np.empty(32, np.int32)
    for b in range(nblk):
        h = _trits(x, b * 256, xi)
        ob = b * 54
        # five trits per byte, the first most significant; loops over the bytes innermost
        for m in range(32):
            q[m] = 0
        for n in range(5):
            for m in range(32):
                q[m] = q[m] * 3 + xi[m + 32 * n]
        for m in range(32):
            out[ob + m] = (q[m] * 256 + 242) // 243
        for m in range(16):
            q[m] = 0
        for n in range(5):
            for m in range(16):
                q[m] = q[m] * 3 + xi[160 + m + 16 * n]
        for m in range(16):
            out[ob + 32 + m] = (q[m] * 256 + 242) // 243
        for j in range(4):  # four trits, then * 3
            t = ((xi[240 + j] * 3 + xi[244 + j]) * 3 + xi[248 + j]) * 3 + xi[252 + j]
            out[ob + 48 + j] = (t * 3 * 256 + 242) // 243
        _put16(out, ob + 52, h)


def run(name: str, x: np.ndarray, out: np.ndarray) -> None:
    if name == "TQ1_0":
        kq_tq1_0(x, out)
    else:
        kq_tq2_0(x, out)
