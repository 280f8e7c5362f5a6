"""numba kernels for IQ2_XXS, IQ2_XS and IQ2_S, byte-identical to ggml's quantizers.

Same algorithm as the numpy reference (``quant._numpy_iq2``, which describes the formats
and the search): ``quantize_row_iq2_{xxs,xs,s}_impl`` with ``iq2_find_best_neighbour``,
tables from ``quant._iqgrid.iq2_tables``.  Conventions of ``quant._numba``: float32 in C
operation order, no FMA, ``nearest_int`` as the bit trick everywhere (a value flipped
for sign parity can be far larger than the group maximum, so ``id*x`` is unbounded).

Each sub-block is processed by one function (``_fit``): numba updates reference counts
(atomically) for every array passed to a call, which cost more than the search itself when
the helpers were separate functions.  Speed comes from

* the neighbour search (most points of a scale search are off the grid, lists of ~10-60
  candidates): per coordinate the 3 possible error terms are computed once, each
  candidate's distance is the sequential C sum of its 8 terms picked by level, in a loop
  over candidates that LLVM vectorizes (levels stored transposed list by list, padded to
  whole vectors, indexed with unsigned offsets so numba adds no negative-index checks);
  the first minimum is the first candidate equal to the minimum of 8 partial minima;
* the scale trials are independent until C's sequential "strictly better" test, so their
  levels and their ``sumqx``/``sumq2`` are computed together, vectorized over trials.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from . import QuantError
from ._iqgrid import IQ2_KMAP_SIZE, iq2_tables
from ._numba import _JIT, _f16, _nint, _put16, _qp, _s8
from ._numpy_iq2 import ABORT_MESSAGE

F32 = np.float32
QK_K = 256

_Z = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_FIVE = F32(5.0)
_TENTH = F32(0.1)
_FLT_MAX = F32(3.4028234663852886e38)
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_EPS_S = F32(1e-8)  # GROUP_MAX_EPS_IQ2_S
_MAXCNT = 512  # longer than any neighbour list (IQ2_XS: 292)
#: neighbour lists are padded to a multiple of this many entries, so the vectorized
#: candidate loop (8 float32 lanes) never falls back to LLVM's scalar remainder loop; IQ2_S's
#: short lists (~9 entries) run faster padded to 16 (two vectors per iteration)
_PAD = {"IQ2_XXS": 8, "IQ2_XS": 8, "IQ2_S": 16}
#: raised where ggml aborts (GGML_ASSERT(grid_index >= 0), "point not on grid"): only for
#: values whose float32 sums overflow, turned into a QuantError by ``quantize``
_ABORT = "iq2: ggml aborts on this block"


@functools.cache
def tables(name: str):
    """``(glev int32 [G, 8], kmap, start, count, pstart, pcount int32 [43692], nbi int32, nbl int8)``.

    ``kmap[u] >= 0``: grid index; otherwise the neighbour list of ``u`` is entries
    ``start[u] .. start[u] + count[u] - 1`` of ``nbi`` (grid indices, ggml's order).  ``nbl``
    holds their levels (0..2) transposed list by list and padded to ``cp = pcount[u]`` entries
    (a multiple of ``_PAD``): level i of entry j is ``nbl[8*pstart[u] + i*cp + j]``, so
    one list is one contiguous run of memory, each coordinate a unit-stride row of it, and
    the candidate loop runs in whole SIMD vectors.
    """
    t = iq2_tables(name)
    glev = (t.grid.astype(np.int32) - 1) // 2
    kmap = t.kmap.astype(np.int32)
    nb = t.neighbours.astype(np.int32)
    off = np.flatnonzero(kmap < 0)
    pos = -kmap[off] - 1
    cnt = nb[pos]
    pad = _PAD[name]
    cp = (cnt + pad - 1) // pad * pad
    start = np.zeros(IQ2_KMAP_SIZE, np.int32)
    count = np.zeros(IQ2_KMAP_SIZE, np.int32)
    pstart = np.zeros(IQ2_KMAP_SIZE, np.int32)
    pcount = np.zeros(IQ2_KMAP_SIZE, np.int32)
    first = np.cumsum(cnt) - cnt
    pfirst = np.cumsum(cp) - cp
    start[off] = first
    count[off] = cnt
    pstart[off] = pfirst
    pcount[off] = cp
    seg = np.repeat(np.arange(off.size), cnt)
    rank = np.arange(seg.size) - first[seg]
    nbi = nb[pos[seg] + 1 + rank].astype(np.int32)
    lev = glev[nbi]  # [E, 8]
    nbl = np.zeros(8 * int(cp.sum()), np.int8)
    for i in range(8):
        nbl[8 * pfirst[seg] + i * cp[seg] + rank] = lev[:, i]
    assert cp.max() <= _MAXCNT
    return (np.ascontiguousarray(glev), kmap, start, count, pstart, pcount, nbi, nbl)


@njit(inline="always", **_JIT)
def _terms(x, w, scale):
    """The weighted squared error ``(w*diff)*diff``, ``diff = scale*q - x``, for q = 1, 3, 5."""
    d = scale - x  # scale*1.0f is scale
    a = (w * d) * d
    d = scale * F32(3.0) - x
    b = (w * d) * d
    d = scale * F32(5.0) - x
    c = (w * d) * d
    return a, b, c


@njit(inline="always", **_JIT)
def _pick(lv, a, b, c):
    return a if lv == 0 else (b if lv == 1 else c)


@njit(**_JIT)
def _fit(
    gs, lo, hi, denom, scale, all_refit,  # search parameters
    xv, w, wa, LL, LT, ON, fs, d2,  # sub-block data and scratch
    glev, kmap, start, count, pstart, pcount, nbi, nbl,  # tables()
):
    """The scale search of one sub-block and its final requantization; returns the scale.

    Trials ``is = lo..hi`` (column ``t = is - lo`` of ``LT``/``ON``/``fs``): ``id = (5 +
    is*0.1f)/denom``, levels ``clamp(nearest_int(0.5f*(id*x - 1)), 0, 2)``, each 8-group
    looked up and, off the grid, replaced by its best neighbour at ``1/id``; the first trial
    with a strictly larger ``sumqx**2/sumq2`` than all before it wins (C's sequential test).
    The trials are independent until that test, so levels and sums are computed for all
    trials at once (loops over trials that LLVM vectorizes, each trial's sums still
    sequential over the values).  Then one more column at the best scale requantizes every
    group (``all_refit``: IQ2_XXS) or the groups left off the grid (IQ2_XS/S), and refits
    the scale.  ``LL[0]`` holds the initial levels on entry and the final ones on return.

    Everything runs in this one function: helper calls taking arrays cost reference-count
    updates (atomic) per call in numba, more than the search itself.

    ``iq2_find_best_neighbour`` inline: each coordinate takes only 3 values, so its 3
    possible terms ``(w*diff)*diff``, ``diff = scale*q - x`` (q = 1, 3, 5) are computed once
    with C's float32 operations, and each candidate's distance is the sequential C sum of its
    8 terms picked by level: a loop over candidates that LLVM vectorizes.  The first
    minimum below FLT_MAX (C's strict ``<`` scan) is the first candidate equal to it.
    """
    ng = gs // 8
    nt = hi - lo + 1
    for t in range(nt):
        id_ = (_FIVE + F32(lo + t) * _TENTH) / denom
        fs[0, t] = id_
        fs[1, t] = _ONE / id_
    for i in range(gs):
        x = xv[i]
        for t in range(nt):
            l_ = _nint(_HALF * (fs[0, t] * x - _ONE))
            LT[i, t] = 0 if l_ < 0 else (2 if l_ > 2 else l_)
    onmask = (1 << ng) - 1  # groups of the best levels that were on the grid
    refitted = False
    for pss in range(2):
        if pss == 0:
            t0 = 0
            t1 = nt
        else:
            for t in range(nt):
                fs[2, t] = _Z
                fs[3, t] = _Z
            for i in range(gs):
                wi = w[i]
                wx = wi * xv[i]
                for t in range(nt):
                    q = F32(2 * LT[i, t] + 1)
                    fs[2, t] += wx * q
                    fs[3, t] += (wi * q) * q
            best = _Z
            bt = -1
            for t in range(nt):
                sumqx = fs[2, t]
                sumq2 = fs[3, t]
                if sumq2 > _Z and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    bt = t
            if bt >= 0:
                for i in range(gs):
                    LL[0, i] = LT[i, bt]
                onmask = 0
                for k in range(ng):
                    onmask |= ON[k, bt] << k
            if not scale > _Z or (not all_refit and onmask == (1 << ng) - 1):
                break
            refitted = True
            id_ = _ONE / scale
            fs[1, nt] = scale
            for i in range(gs):
                if all_refit or not (onmask >> (i // 8)) & 1:
                    l_ = _nint(_HALF * (id_ * xv[i] - _ONE))
                    LT[i, nt] = 0 if l_ < 0 else (2 if l_ > 2 else l_)
                else:
                    LT[i, nt] = LL[0, i]
            t0 = nt
            t1 = nt + 1
        for t in range(t0, t1):
            sc = fs[1, t]
            for k in range(ng):
                k8 = 8 * k
                if pss == 1 and not all_refit and (onmask >> k) & 1:
                    continue
                u = 0
                for i in range(8):
                    u |= LT[k8 + i, t] << (2 * i)
                if kmap[u] >= 0:
                    ON[k, t] = 1
                    continue
                ON[k, t] = 0
                st = start[u]
                cnt = count[u]
                cp = pcount[u]
                a0, e0, c0 = _terms(xv[k8], wa[k8], sc)
                a1, e1, c1 = _terms(xv[k8 + 1], wa[k8 + 1], sc)
                a2, e2, c2 = _terms(xv[k8 + 2], wa[k8 + 2], sc)
                a3, e3, c3 = _terms(xv[k8 + 3], wa[k8 + 3], sc)
                a4, e4, c4 = _terms(xv[k8 + 4], wa[k8 + 4], sc)
                a5, e5, c5 = _terms(xv[k8 + 5], wa[k8 + 5], sc)
                a6, e6, c6 = _terms(xv[k8 + 6], wa[k8 + 6], sc)
                a7, e7, c7 = _terms(xv[k8 + 7], wa[k8 + 7], sc)
                # unsigned offsets: numba then needs no negative-index wraparound and LLVM
                # vectorizes the loop with plain contiguous loads; cp is a whole number of vectors
                ucp = np.uint64(cp)
                b0 = np.uint64(8 * pstart[u])
                b1 = b0 + ucp
                b2 = b1 + ucp
                b3 = b2 + ucp
                b4 = b3 + ucp
                b5 = b4 + ucp
                b6 = b5 + ucp
                b7 = b6 + ucp
                for j in range(ucp):
                    d = _Z + _pick(nbl[b0 + j], a0, e0, c0)
                    d = d + _pick(nbl[b1 + j], a1, e1, c1)
                    d = d + _pick(nbl[b2 + j], a2, e2, c2)
                    d = d + _pick(nbl[b3 + j], a3, e3, c3)
                    d = d + _pick(nbl[b4 + j], a4, e4, c4)
                    d = d + _pick(nbl[b5 + j], a5, e5, c5)
                    d = d + _pick(nbl[b6 + j], a6, e6, c6)
                    d = d + _pick(nbl[b7 + j], a7, e7, c7)
                    d2[j] = d
                for j in range(cnt, cp):  # padding entries never win
                    d2[j] = _FLT_MAX
                m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = _FLT_MAX
                for jb in range(ucp >> np.uint64(3)):  # 8 interleaved partial minima (NaN never wins)
                    j8 = jb << np.uint64(3)
                    v = d2[j8]
                    m0 = v if v < m0 else m0
                    v = d2[j8 + np.uint64(1)]
                    m1 = v if v < m1 else m1
                    v = d2[j8 + np.uint64(2)]
                    m2 = v if v < m2 else m2
                    v = d2[j8 + np.uint64(3)]
                    m3 = v if v < m3 else m3
                    v = d2[j8 + np.uint64(4)]
                    m4 = v if v < m4 else m4
                    v = d2[j8 + np.uint64(5)]
                    m5 = v if v < m5 else m5
                    v = d2[j8 + np.uint64(6)]
                    m6 = v if v < m6 else m6
                    v = d2[j8 + np.uint64(7)]
                    m7 = v if v < m7 else m7
                m = min(min(min(m0, m1), min(m2, m3)), min(min(m4, m5), min(m6, m7)))
                if not m < _FLT_MAX:
                    raise ValueError(_ABORT)
                uj = np.uint64(0)
                while d2[uj] != m:
                    uj += np.uint64(1)
                j = np.int64(uj)
                gi = nbi[st + j]
                for i in range(8):
                    LT[k8 + i, t] = glev[gi, i]
    if refitted:
        sumqx = _Z
        sumq2 = _Z
        for i in range(gs):
            q = F32(2 * LT[i, nt] + 1)
            sumqx += (w[i] * xv[i]) * q
            sumq2 += (w[i] * q) * q
            LL[0, i] = LT[i, nt]
        if sumq2 > _Z:
            scale = sumqx / sumq2
    return scale


@njit(**_JIT)
def _grid_of(LL, k8, kmap):
    """Grid index of the 8-group ``LL[0, k8:k8+8]``, ``u`` built as C does from ``int8_t``
    levels into a ``uint16_t`` (see ``_numpy_iq2._grid_index``: only after a NaN scale can
    the levels leave 0..2); ggml aborts (or reads past its map) where we refuse."""
    u = 0
    for i in range(8):
        u |= _s8(LL[0, k8 + i]) << (2 * i)
    u &= 0xFFFF
    if u >= kmap.size:
        raise ValueError(_ABORT)
    gi = kmap[u]
    if gi < 0:
        raise ValueError(_ABORT)
    return gi


@njit(**_JIT)
def _prep(x, xo, qw, qo, use_qw, sigma2, gs, parity, w, wa, xv, signs):
    """Weights, sqrt-weights, ``xval`` and sign bits of one sub-block (see ``_numpy_iq2._signs``)."""
    for i in range(gs):
        v = x[xo + i]
        if use_qw:
            w[i] = qw[qo + i] * np.sqrt(sigma2 + v * v)
        else:
            w[i] = F32(0.25) * sigma2 + v * v
        wa[i] = np.sqrt(w[i])
    for k in range(gs // 8):
        nflip = 0
        s = 0
        for i in range(8):
            v = x[xo + 8 * k + i]
            if v >= _Z:
                xv[8 * k + i] = v
            else:
                xv[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if parity:
            if nflip % 2:
                imin = 0
                v = x[xo + 8 * k]
                mn = (w[8 * k] * v) * v
                for i in range(1, 8):
                    v = x[xo + 8 * k + i]
                    ax = (w[8 * k + i] * v) * v
                    if ax < mn:
                        mn = ax
                        imin = i
                xv[8 * k + imin] = -xv[8 * k + imin]
                s ^= 1 << imin
            s &= 127
        signs[k] = s
    mx = xv[0]
    for i in range(1, gs):
        mx = mx if mx > xv[i] else xv[i]
    return mx


@njit(**_JIT)
def _kxxs(x, n, qw, glev, kmap, start, count, pstart, pcount, nbi, nbl, out):
    """``quantize_row_iq2_xxs_impl`` over the flat rows ``x`` (66 bytes per super-block)."""
    nbl_row = n // QK_K
    nblk = x.size // QK_K
    w = np.empty(32, F32)
    wa = np.empty(32, F32)
    xv = np.empty(32, F32)
    LL = np.zeros((1, 32), np.int64)
    LT = np.zeros((32, 14), np.int64)
    ON = np.zeros((4, 14), np.int64)
    fs = np.zeros((4, 14), F32)
    Lqp = np.zeros(32, np.int64)
    d2 = np.empty(_MAXCNT, F32)
    signs = np.zeros(4, np.int64)
    scales = np.empty(8, F32)
    q2 = np.zeros(16, np.int64)
    for blk in range(nblk):
        b0 = blk * QK_K
        qo = (blk % nbl_row) * QK_K
        sumx2 = _Z
        for i in range(QK_K):
            sumx2 += x[b0 + i] * x[b0 + i]
        sigma2 = sumx2 / F32(QK_K)
        for j in range(16):
            q2[j] = 0
        max_scale = _Z
        for ib in range(8):
            mx = _prep(x, b0 + 32 * ib, qw, qo + 32 * ib, True, sigma2, 32, True, w, wa, xv, signs)
            scales[ib] = _Z
            if mx < _EPS:
                continue
            scale = _qp(32, 4, xv, w, Lqp)
            eff_max = scale * F32(3)
            if eff_max <= _Z:
                continue
            for i in range(32):
                LL[0, i] = Lqp[i]
            scale = _fit(
                32, -6, 6, eff_max, scale, True,
                xv, w, wa, LL, LT, ON, fs, d2,
                glev, kmap, start, count, pstart, pcount, nbi, nbl,
            )
            if scale < _Z:
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(4):
                gi = _grid_of(LL, 8 * k, kmap)
                q2[2 * ib] |= gi << (8 * k)
                q2[2 * ib + 1] |= signs[k] << (7 * k)
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        o = blk * 66
        if max_scale == _Z:
            for j in range(66):
                out[o + j] = 0
            continue
        d = max_scale / F32(31)
        _put16(out, o, _f16(d))
        id_ = _ONE / d
        for ib in range(8):
            l_ = _nint(_HALF * (id_ * scales[ib] - _ONE))
            l_ = 0 if l_ < 0 else (15 if l_ > 15 else l_)
            q2[2 * ib + 1] |= l_ << 28
        for j in range(16):
            v = q2[j]
            for b in range(4):
                out[o + 2 + 4 * j + b] = (v >> (8 * b)) & 0xFF


@njit(**_JIT)
def _kxs_s(x, n, qw, use_qw, s_type, glev, kmap, start, count, pstart, pcount, nbi, nbl, out):
    """``quantize_row_iq2_xs_impl`` (74 bytes) / ``quantize_row_iq2_s_impl`` (82 bytes)."""
    nbl_row = n // QK_K
    nblk = x.size // QK_K
    ts = 82 if s_type else 74
    eps = _EPS_S if s_type else _EPS
    w = np.empty(16, F32)
    wa = np.empty(16, F32)
    xv = np.empty(16, F32)
    LL = np.zeros((1, 16), np.int64)
    LT = np.zeros((16, 20), np.int64)
    ON = np.zeros((2, 20), np.int64)
    fs = np.zeros((4, 20), F32)
    d2 = np.empty(_MAXCNT, F32)
    signs = np.zeros(2, np.int64)
    scales = np.empty(16, F32)
    gidx = np.zeros(32, np.int64)
    gsig = np.zeros(32, np.int64)
    for blk in range(nblk):
        b0 = blk * QK_K
        qo = (blk % nbl_row) * QK_K
        sumx2 = _Z
        for i in range(QK_K):
            sumx2 += x[b0 + i] * x[b0 + i]
        sigma2 = (F32(2) * sumx2) / F32(QK_K) if s_type else sumx2 / F32(QK_K)
        max_scale = _Z
        for ib in range(16):
            mx = _prep(x, b0 + 16 * ib, qw, qo + 16 * ib, use_qw, sigma2, 16, not s_type, w, wa, xv, signs)
            scales[ib] = _Z
            gidx[2 * ib] = 0
            gidx[2 * ib + 1] = 0
            gsig[2 * ib] = 0
            gsig[2 * ib + 1] = 0
            if mx < eps:
                continue
            for i in range(16):
                LL[0, i] = 0
            scale = _fit(
                16, -9, 9, mx, mx / _FIVE, False,
                xv, w, wa, LL, LT, ON, fs, d2,
                glev, kmap, start, count, pstart, pcount, nbi, nbl,
            )
            if scale < _Z:
                scale = -scale
                m = 255 if s_type else 127
                signs[0] = ~signs[0] & m
                signs[1] = ~signs[1] & m
            gidx[2 * ib] = _grid_of(LL, 0, kmap)
            gidx[2 * ib + 1] = _grid_of(LL, 8, kmap)
            gsig[2 * ib] = signs[0]
            gsig[2 * ib + 1] = signs[1]
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        o = blk * ts
        for j in range(ts):
            out[o + j] = 0
        nz = max_scale != _Z
        if s_type:
            # qs: low index bytes, then signs; qh; scales.  Written even when max_scale == 0.
            for i8 in range(32):
                out[o + 2 + i8] = gidx[i8] & 255
                out[o + 34 + i8] = gsig[i8]
                out[o + 66 + i8 // 4] |= (gidx[i8] >> 8) << (2 * (i8 % 4))
        elif nz:
            for i8 in range(32):
                _put16(out, o + 2 + 2 * i8, gidx[i8] | (gsig[i8] << 9))
        if not nz:
            continue
        d = max_scale / F32(31)
        _put16(out, o, _f16(d * F32(0.9875)) if s_type else _f16(d))
        id_ = _ONE / d
        so = o + (74 if s_type else 66)
        for ib in range(16):
            l_ = _nint(_HALF * (id_ * scales[ib] - _ONE))
            l_ = 0 if l_ < 0 else (15 if l_ > 15 else l_)
            if ib % 2 == 0:
                out[so + ib // 2] = l_
            else:
                out[so + ib // 2] |= l_ << 4


def quantize(name: str, x: np.ndarray, n: int, qw: np.ndarray, use_qw: bool, out: np.ndarray) -> None:
    """Hook for ``quant._numba._run``: IQ2_XXS / IQ2_XS / IQ2_S of the flat rows ``x`` into ``out``."""
    if name != "IQ2_S" and not use_qw:
        raise ValueError(f"{name} needs quant weights")
    glev, kmap, start, count, pstart, pcount, nbi, nbl = tables(name)
    try:
        if name == "IQ2_XXS":
            _kxxs(x, n, qw, glev, kmap, start, count, pstart, pcount, nbi, nbl, out)
        else:
            _kxs_s(x, n, qw, use_qw, name == "IQ2_S", glev, kmap, start, count, pstart, pcount, nbi, nbl, out)
    except ValueError as e:
        if str(e) != _ABORT:
            raise
        raise QuantError(ABORT_MESSAGE.format(name=name)) from None
