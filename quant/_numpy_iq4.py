"""numpy reference for IQ4_NL, IQ4_XS and MXFP4, byte-identical to ggml's quantizers.

Ports ``quantize_iq4_nl`` / ``quantize_iq4_xs`` (both through ``quantize_row_iq4_nl_impl``
with ``ntry = 7``, with or without quant weights) and ``quantize_row_mxfp4_ref`` (which
``quantize_mxfp4`` calls whatever the quant weights) of ``ggml/src/ggml-quants.c``.
Vectorized across 32-value blocks: arrays are laid out ``(in-block index, block)``.

Value tables come from the ``gguf`` package (``gguf.quants.IQ4_NL.kvalues``,
``gguf.quants.MXFP4.kvalues`` and ``MXFP4.e8m0_to_fp32_half``).

Two C helpers are replaced by exact equivalents that vectorize:

* ``best_index_int8(16, values, x)`` (binary search, then ``x - v[mu-1] < v[mu] - x``) is
  ``searchsorted(T, x, side="right")`` over 15 float32 thresholds: ``T[k-1]`` is the
  smallest float ``t`` in ``(v[k-1], v[k]]`` with ``t - v[k-1] >= v[k] - t`` in float32.
  Both sides of that comparison are monotone in ``x``, so the C choice flips exactly once
  per interval; ``x <= v[0]`` gives 0, ``x >= v[15]`` gives 15 and NaN (where the C search
  ends at ``mu = 15``) gives 15, as searchsorted does.
* ``floorf(log2f(amax))`` (MXFP4 exponent) is the binary exponent of ``amax`` plus one
  where the float32 ``log2`` rounds up to the next integer, i.e. for the few floats just
  below a power of two; ``_LOG2_UP`` holds, per binade, the first float from which it
  does (correctly rounded log2, which glibc's ``log2f`` is in that region).  The byte
  ``(uint8_t)(floor - 2 + 127)`` is negative for blocks of subnormals (amax < 2**-125);
  x86-64 converts through int32 and keeps the low byte, reproduced here.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL
from gguf.quants import MXFP4 as _GGUF_MXFP4

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
NTRY = 7

#: kvalues_iq4nl (int8) as float32
IQ4_VALUES = np.array(_GGUF_IQ4_NL.kvalues, dtype=np.int8).astype(F32)
#: kvalues_mxfp4 (doubled e2m1 values) as float32
MXFP4_VALUES = np.array(_GGUF_MXFP4.kvalues, dtype=np.int8).astype(F32)


# --------------------------------------------------------------------------- helpers


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int`` bit trick (int32), exact for every float incl. inf/NaN."""
    return ((v + F32(12582912.0)).view(np.int32) & np.int32(0x7FFFFF)) - np.int32(0x400000)


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0 (the C ``s += t[i]`` loop)."""
    s = np.zeros(terms.shape[1:], dtype=F32)
    for t in terms:
        s += t
    return s


def _fp16(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` (round to nearest even; identical for every finite value)."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def _bytes(*fields: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields (each ``[nblocks, ...]``) into ``[nblocks, type_size]``."""
    nb = fields[0].shape[0]
    return np.concatenate([np.ascontiguousarray(f).view(np.uint8).reshape(nb, -1) for f in fields], axis=1)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """``L [32, B]`` (0..15) -> ``qs [B, 16]``: ``qs[j] = L[j] | L[j+16] << 4``."""
    L = L.astype(np.uint8)
    return (L[:16] | (L[16:] << 4)).T


def _f32_key(v: np.ndarray) -> np.ndarray:
    """Order-preserving map of float32 values to int64 (``-0.0`` and ``+0.0`` both 0)."""
    b = np.asarray(v, F32).view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _key_f32(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, np.int64)
    b = np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32)
    return b.view(F32)


def index_thresholds(values: np.ndarray, *, strict: bool = False) -> np.ndarray:
    """Thresholds ``T [len(values)-1]`` at which a nearest-value choice moves up one index.

    ``T[k-1]`` = smallest float32 ``t`` in ``(v[k-1], v[k]]`` with ``t - v[k-1] >= v[k] - t``
    (``strict``: ``>``) in float32, found by bisection on the float order.  Without
    ``strict`` this is ``best_index_int8``: ``best_index_int8(x) == searchsorted(T, x, "right")``;
    ``strict`` is a first-index-wins search over ``fabsf(v[k] - x)`` (MXFP4).
    """
    v = np.asarray(values, F32)
    lo_v, hi_v = v[:-1], v[1:]
    lo = _f32_key(lo_v)  # condition false here (0 >= gap fails)
    hi = _f32_key(hi_v)  # condition true here
    with np.errstate(all="ignore"):
        while (hi - lo > 1).any():
            mid = (lo + hi) // 2
            t = _key_f32(mid)
            ok = (t - lo_v) > (hi_v - t) if strict else (t - lo_v) >= (hi_v - t)
            move = hi - lo > 1
            hi = np.where(move & ok, mid, hi)
            lo = np.where(move & ~ok, mid, lo)
    return _key_f32(hi)


#: best_index_int8 thresholds for kvalues_iq4nl
IQ4_THRESHOLDS = index_thresholds(IQ4_VALUES)
#: best_index_mxfp4 thresholds between the non-negative values 0, 1, 2, 3, 4, 6, 8, 12
#: (scale 1; see ``_numba_iq4.kq_mxfp4``)
MXFP4_THRESHOLDS = index_thresholds(MXFP4_VALUES[:8], strict=True)


def best_index(v: np.ndarray) -> np.ndarray:
    """ggml ``best_index_int8(16, kvalues_iq4nl, v)`` for an array of float32 ``v`` (int64)."""
    return np.searchsorted(IQ4_THRESHOLDS, v, side="right")


def _log2_up_table() -> np.ndarray:
    """Per binade ``k`` = -149..127 (index ``k + 149``): the bits of the first float32 in
    ``[2**k, 2**(k+1))`` whose float32 ``log2`` rounds up to ``k + 1`` (``0xFFFFFFFF``:
    none).  Correctly rounded log2, via float64 (exact to far below the float32 margins)."""
    ks = np.arange(-149, 128)
    lo = np.where(ks < -126, 1 << np.clip(ks + 149, 0, 31), (ks + 127) << 23).astype(np.int64)
    hi = np.where(ks < -127, 1 << np.clip(ks + 150, 0, 31), (ks + 128) << 23).astype(np.int64)
    # search in [lo, hi): smallest b with round32(log2(b)) >= k+1; hi means none
    a, b = lo.copy(), hi.copy()

    def up(bits):
        f = np.asarray(bits, np.int64).astype(np.uint32).view(F32).astype(np.float64)
        return np.log2(f).astype(F32) >= (ks + 1).astype(F32)

    while (b - a > 0).any():
        m = (a + b) // 2
        ok = up(m)
        busy = b > a
        b = np.where(busy & ok, m, b)
        a = np.where(busy & ~ok, m + 1, a)
    return np.where(b == hi, 0xFFFFFFFF, b).astype(np.uint32)


#: floorf(log2f(x)) rounds up from these bits on, per binade (see ``floor_log2f``)
LOG2_UP = _log2_up_table()


def floor_log2f(a: np.ndarray) -> np.ndarray:
    """``floorf(log2f(a))`` for positive finite float32 ``a`` (int32)."""
    bits = np.asarray(a, F32).view(np.uint32)
    e = (bits >> 23).astype(np.int32)
    m = (bits & 0x7FFFFF).astype(np.int64)
    # subnormal: position of the highest set mantissa bit
    sub_k = np.floor(np.log2(np.maximum(m, 1).astype(np.float64))).astype(np.int32) - 149
    k = np.where(e > 0, e - 127, sub_k)
    return k + (bits >= LOG2_UP[k + 149]).astype(np.int32)


# --------------------------------------------------------------------------- IQ4_NL / IQ4_XS


def _block_scales(xc: np.ndarray, wc: np.ndarray) -> np.ndarray:
    """The per-32-block scale search of ``quantize_row_iq4_nl_impl`` (ntry = 7).

    ``xc``, ``wc``: ``[32, B]`` values and weights.  ``max`` is the first value of largest
    |x|; a block with ``amax < 1e-15`` gets scale 0.  Start from ``d = -max/values[0]``,
    fit ``d = sumqx/sumq2``, then try ``id = (itry + values[0])/max`` for itry = -7..7,
    keeping a fit when ``sumqx**2 > best*sumq2`` (strict: earlier tries win ties).
    """
    amax = np.zeros(xc.shape[1:], F32)
    mx = np.zeros(xc.shape[1:], F32)
    for v in xc:  # strict '>' keeps the first index of the largest |x|
        av = np.abs(v)
        upd = av > amax
        amax = np.where(upd, av, amax)
        mx = np.where(upd, v, mx)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    v0 = IQ4_VALUES[0]

    def fit(id_):
        q = IQ4_VALUES[best_index(id_ * xc)]
        wq = wc * q  # C: w*q*x == (w*q)*x, w*q*q == (w*q)*q
        return _seqsum(wq * xc), _seqsum(wq * q)

    sumqx, sumq2 = fit(F32(1) / ((-mx) / v0))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit(F32(itry + int(v0)) / mx)
        acc = (sumq2 > 0) & ((sumqx * sumqx) > (best * sumq2))
        d = np.where(acc, sumqx / sumq2, d)
        best = np.where(acc, d * sumqx, best)
    return np.where(zero, F32(0), d)


def _weights(xc: np.ndarray, qwc: np.ndarray | None, sigma2: np.ndarray | None) -> np.ndarray:
    """``qw * sqrtf(sigma2 + x*x)`` with quant weights, else ``x*x`` (``[32, B]``)."""
    if qwc is None:
        return xc * xc
    return qwc * np.sqrt(sigma2 + xc * xc)


def _sigma2(blocks: np.ndarray) -> np.ndarray:
    """``sigma2 = sum(x*x) * (2/super_block_size)`` per super-block row of ``blocks``."""
    x2 = blocks * blocks
    s = np.add.accumulate(x2, axis=1, dtype=F32)[:, -1] + F32(0)  # sequential, as C
    return s * F32(2.0 / blocks.shape[1])


def _qw_columns(qw: np.ndarray | None, rows: int) -> np.ndarray | None:
    """Quant weights of one row -> ``[32, rows * n/32]`` in block order."""
    if qw is None:
        return None
    return np.ascontiguousarray(np.tile(qw.reshape(-1, 32), (rows, 1)).T)


def iq4_nl(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """IQ4_NL block (18 bytes): ``d`` fp16 | ``qs[16]``: ``L[j] | L[j+16] << 4``;
    x = d * kvalues_iq4nl[L].

    ``quantize_iq4_nl``: the scale search on the 32-block (weights ``x*x``, or with quant
    weights ``qw*sqrtf(sigma2 + x*x)``, ``sigma2 = 2*sum(x*x)/32``), ``d`` stored as fp16,
    then every value requantized with ``id = d ? 1/d : 0`` (the unrounded ``d``).
    """
    blocks = xg.reshape(-1, 32)
    xc = np.ascontiguousarray(blocks.T)
    qwc = _qw_columns(qw, xg.shape[0])
    w = _weights(xc, qwc, None if qwc is None else _sigma2(blocks))
    d = _block_scales(xc, w)
    id_ = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    id_ = np.where(np.isnan(d), d, id_)  # C: NaN is "true", 1/NaN = NaN
    L = best_index(id_ * xc)
    return _bytes(_fp16(d)[:, None], _pack_nibbles(L))


def iq4_xs(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """IQ4_XS super-block (136 bytes): ``d`` fp16 | ``scales_h`` u16 | ``scales_l[4]`` |
    ``qs[128]``; sub-block ib has the 6-bit scale ``ls = (scales_l nibble ib) | (2 bits ib of
    scales_h) << 4`` and x = d * (ls - 32) * kvalues_iq4nl[L].

    ``quantize_iq4_xs``: the scale search on each 32-block (``sigma2`` over the 256 values),
    ``d = -max_scale/32`` with ``max_scale`` the first scale of largest magnitude,
    ``ls = clamp(nearest_int(scale/d), -32, 31)`` (through ``id = 1/d``), then every value
    requantized with ``1/(d*ls)`` (0 where ``d*ls`` is 0), all with the unrounded ``d``.
    """
    sb = xg.reshape(-1, QK_K)
    nsb = sb.shape[0]
    blocks = xg.reshape(-1, 32)
    xc = np.ascontiguousarray(blocks.T)  # [32, nsb*8]
    qwc = _qw_columns(qw, xg.shape[0])
    sigma2 = None if qwc is None else np.repeat(_sigma2(sb), QK_K // 32)
    w = _weights(xc, qwc, sigma2)
    scales = _block_scales(xc, w).reshape(nsb, 8)

    amax = np.zeros(nsb, F32)
    max_scale = np.zeros(nsb, F32)
    for ib in range(8):  # strict '>': first scale of largest magnitude; NaN never taken
        a = np.abs(scales[:, ib])
        upd = a > amax
        amax = np.where(upd, a, amax)
        max_scale = np.where(upd, scales[:, ib], max_scale)
    d = -max_scale / F32(32)
    id_ = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    ls = np.clip(_nearest_int(id_[:, None] * scales), -32, 31)  # [nsb, 8]
    dl = d[:, None] * ls.astype(F32)
    idl = np.where(dl != 0, F32(1) / np.where(dl != 0, dl, F32(1)), F32(0))
    L = best_index(idl.reshape(1, -1) * xc)  # [32, nsb*8]

    u = (ls + 32).astype(np.uint16)
    lo = (u & 15).astype(np.uint8)
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    scales_h = np.zeros(nsb, np.uint16)
    for ib in range(8):
        scales_h |= (u[:, ib] >> 4) << (2 * ib)
    qs = _pack_nibbles(L).reshape(nsb, 128)
    return _bytes(_fp16(d)[:, None], scales_h.astype("<u2")[:, None], scales_l, qs)


# --------------------------------------------------------------------------- MXFP4


def mxfp4(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """MXFP4 block (17 bytes): ``e`` (E8M0 exponent) | ``qs[16]``: ``L[j] | L[j+16] << 4``;
    x = e8m0_half(e) * kvalues_mxfp4[L].

    ``quantize_row_mxfp4_ref`` (quant weights ignored, as ``quantize_mxfp4`` does):
    ``e = amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0``, ``d = e8m0_half(e)``,
    each value the first index of least ``fabsf(kvalues[i]*d - x)``.
    """
    blocks = xg.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    pos = amax > 0
    fl = floor_log2f(np.where(pos, amax, F32(1)))
    e = np.where(pos, (fl - 2 + 127) & 0xFF, 0).astype(np.uint8)
    d = _GGUF_MXFP4.e8m0_to_fp32_half(e).astype(F32)
    xc = blocks.T  # [32, B]
    best_err = np.abs(MXFP4_VALUES[0] * d - xc)
    L = np.zeros(xc.shape, np.uint8)
    for i in range(1, 16):  # strict '<': the first index of the least error wins
        err = np.abs(MXFP4_VALUES[i] * d - xc)
        upd = err < best_err
        best_err = np.where(upd, err, best_err)
        L = np.where(upd, np.uint8(i), L)
    return _bytes(e[:, None], _pack_nibbles(L))


#: name -> (block size, bytes per block, kernel(x_rows_group, qw_or_None))
KERNELS = {
    "IQ4_NL": (32, 18, iq4_nl),
    "IQ4_XS": (QK_K, 136, iq4_xs),
    "MXFP4": (32, 17, mxfp4),
}
