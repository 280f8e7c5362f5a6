"""numba kernels for IQ1_S and IQ1_M, byte-identical to ggml's quantizers.

Same algorithm as the numpy reference (``quant._numpy_iq1``, which describes the formats and
the search): ``quantize_row_iq1_s_impl`` / ``quantize_row_iq1_m_impl`` with
``iq1_find_best_neighbour2``, tables from ``quant._iqgrid.iq2_tables("IQ1_S")``.

Layout follows ``quant._numba``: a tile of ``NL`` sub-blocks (32 values for IQ1_S, 16 for
IQ1_M) is transposed into flat float32 buffers, value i of lane s at ``i*NL + s``, and the
heavy steps are loops over the lanes that LLVM vectorizes, each lane doing exactly the
float32 operations of its C sub-block in C order:

* the sort: glibc's ``qsort`` is a stable merge sort here, so the sorted position of value
  i is ``#{j < i: x_j <= x_i} + #{j > i: x_j < x_i}`` (-0.0 equals +0.0, as for the C
  comparator), computed for all lanes with comparisons instead of a per-lane sort;
* the prefix sums in sorted order and the exhaustive split search: every split (i1, i2)
  and shift is scored for all lanes at once, the running best kept per lane with selects
  (the strict ``sumqx^2 > best*sumq2`` test in the C candidate order);
* the neighbour search of a group off the grid: the 8 x 3 possible error terms
  ``w*diff*diff`` are computed once, then the errors of all neighbours (grid codes as 2-bit
  fields) are sums of 8 table picks in C order, vectorized over the neighbour list; the
  first strict minimum below FLT_MAX wins, as in C.

* the scale refits: a sub-block whose groups moved to neighbours, and IQ1_M's super-block
  scale with the 3-bit scales, have their terms computed for all lanes at once; each sum
  stays sequential in C order (per lane, or per super-block with the super-blocks of a tile
  as independent chains).

Levels, grid lookups and packing are scalar per lane; sigma2 is a sequential sum over the
256 values of each super-block, as in C.  Shifted levels are formed as ``lv - 0.875`` /
``lv - 1.125``, exactly ggml's ``x_p`` / ``x_m`` table values, without branches.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from numba import njit

from ._iqgrid import iq2_tables
from ._numba import _JIT, _f16, _f32_bits, _nint, _put16

F32 = np.float32
QK_K = 256
NL = 64  # lanes (sub-blocks) per tile; a multiple of 16

_Z = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_FLT_MAX = F32(3.4028234663852886e38)
_EPS_S = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
_EPS_M = F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
_P0 = F32(-0.875)  # -1 + IQ1S_DELTA
_P1 = F32(0.125)
_P2 = F32(1.125)
_M0 = F32(-1.125)  # -1 - IQ1S_DELTA
_M1 = F32(-0.125)
_M2 = F32(0.875)
# IQ1_M's split-score constants, computed in float32 as the C code does (all exact)
_CP1 = _P0 * _P0 - _P1 * _P1
_CP2 = _P1 * _P1 - _P2 * _P2
_CM1 = _M0 * _M0 - _M1 * _M1
_CM2 = _M1 * _M1 - _M2 * _M2
_MASKS = (0x00, 0x80, 0x08, 0x88)
_KEY_NONE = np.int64(0x7FFFFFFFFFFFFFFF)


#: neighbour lists are padded to a multiple of this many entries (no scalar loop tail)
PAD = 16


_tables_lock = threading.Lock()


def tables():
    """The kernels' tables (see ``_build_tables``), built once per process; worker threads
    arriving together wait for the first build instead of repeating it."""
    with _tables_lock:
        return _build_tables()


@functools.cache
def _build_tables():
    """``(glev, kmap, plist)`` for the kernels.

    ``glev``: int32 ``[2048*8]`` grid levels 0..2.  ``kmap``: ggml's kmap, except that an
    off-grid point refers to its list in ``plist`` as ``-(start + 1)``: ``plist[start]`` is
    ggml's neighbour count ``cnt``; entry j < cnt of the list, ``plist[start + PAD + j]``, is
    ``grid_index << 16 | code`` (code: the neighbour's eight 2-bit levels), in ggml's order,
    padded with zeros to a multiple of ``PAD`` entries.  Only points whose fields are all
    0..2 (the only ones the quantizers form) get a list; the others get the empty list 0."""
    t = iq2_tables("IQ1_S")
    glev = ((t.grid.astype(np.int32) - 1) // 2).reshape(-1, 8)
    gcode = (glev << (2 * np.arange(8, dtype=np.int32))).sum(axis=1).astype(np.int32)
    u = np.arange(t.kmap.size)
    reach = (((u[:, None] >> (2 * np.arange(8))) & 3) <= 2).all(axis=1)
    off = np.flatnonzero((t.kmap < 0) & reach)
    starts = -t.kmap[off].astype(np.int64) - 1
    cnt = t.neighbours[starts].astype(np.int64)
    cpad = (cnt + PAD - 1) // PAD * PAD
    pst = PAD + np.concatenate(([0], np.cumsum(PAD + cpad)[:-1]))
    plist = np.zeros(int(pst[-1] + PAD + cpad[-1]), np.int32)
    kmap = np.where(t.kmap >= 0, t.kmap, -1).astype(np.int32)  # -1: the empty list at 0
    for k in range(off.size):
        lst = t.neighbours[starts[k] + 1 : starts[k] + 1 + cnt[k]].astype(np.int32)
        plist[pst[k]] = cnt[k]
        plist[pst[k] + PAD : pst[k] + PAD + cnt[k]] = (lst << 16) | gcode[lst]
        kmap[off[k]] = -(pst[k] + 1)
    return np.ascontiguousarray(glev.reshape(-1)), kmap, plist


@njit(inline="always", **_JIT)
def _lev(v0, v1, v2, c):
    return v0 if c == 0 else (v1 if c == 1 else v2)


@njit(**_JIT)
def _neighbour2(plist, start, xb, wb, o, stride, scale, q0, q1, q2, t, d2):
    """``iq1_find_best_neighbour2`` for the group ``xb[o + i*stride]`` (i < 8): grid index, or
    -1 where no neighbour has an error below FLT_MAX (ggml then aborts).

    The error of a neighbour is ``0 + t[0][l0] + t[1][l1] + ... + t[7][l7]`` (C order) with
    ``t[i][l] = w_i*diff*diff`` for level l.  With no negative term (weights >= 0) every
    error is >= +0, so its float bits order like integers and the first strict minimum is
    the minimum of ``bits << 32 | position``: one vectorizable integer reduction."""
    neg = False
    for i in range(8):
        xv = xb[o + i * stride]
        wv = wb[o + i * stride]
        diff = scale * q0 - xv
        t[3 * i] = (wv * diff) * diff
        diff = scale * q1 - xv
        t[3 * i + 1] = (wv * diff) * diff
        diff = scale * q2 - xv
        t[3 * i + 2] = (wv * diff) * diff
        neg |= (t[3 * i] < _Z) | (t[3 * i + 1] < _Z) | (t[3 * i + 2] < _Z)
    cnt = plist[start]
    cp = (cnt + PAD - 1) // PAD * PAD
    p0 = np.uint64(start + PAD)  # unsigned indices: no negative-index handling in the loops
    t00, t01, t02 = t[0], t[1], t[2]
    t10, t11, t12 = t[3], t[4], t[5]
    t20, t21, t22 = t[6], t[7], t[8]
    t30, t31, t32 = t[9], t[10], t[11]
    t40, t41, t42 = t[12], t[13], t[14]
    t50, t51, t52 = t[15], t[16], t[17]
    t60, t61, t62 = t[18], t[19], t[20]
    t70, t71, t72 = t[21], t[22], t[23]
    if not neg:
        bestkey = _KEY_NONE
        for j in range(cp):
            c = plist[p0 + np.uint64(j)]
            a = _Z + _lev(t00, t01, t02, c & 3)
            a += _lev(t10, t11, t12, (c >> 2) & 3)
            a += _lev(t20, t21, t22, (c >> 4) & 3)
            a += _lev(t30, t31, t32, (c >> 6) & 3)
            a += _lev(t40, t41, t42, (c >> 8) & 3)
            a += _lev(t50, t51, t52, (c >> 10) & 3)
            a += _lev(t60, t61, t62, (c >> 12) & 3)
            a += _lev(t70, t71, t72, (c >> 14) & 3)
            key = (np.int64(_f32_bits(a)) << 32) | j if (a < _FLT_MAX) & (j < cnt) else _KEY_NONE
            bestkey = min(bestkey, key)
        if bestkey == _KEY_NONE:
            return -1
        return plist[p0 + np.uint64(bestkey & 0xFFFFFFFF)] >> 16
    for j in range(cnt):
        c = plist[p0 + np.uint64(j)]
        a = _Z + _lev(t00, t01, t02, c & 3)
        a += _lev(t10, t11, t12, (c >> 2) & 3)
        a += _lev(t20, t21, t22, (c >> 4) & 3)
        a += _lev(t30, t31, t32, (c >> 6) & 3)
        a += _lev(t40, t41, t42, (c >> 8) & 3)
        a += _lev(t50, t51, t52, (c >> 10) & 3)
        a += _lev(t60, t61, t62, (c >> 12) & 3)
        a += _lev(t70, t71, t72, (c >> 14) & 3)
        d2[j] = a
    best = _FLT_MAX
    gi = -1
    for j in range(cnt):
        if d2[j] < best:
            best = d2[j]
            gi = plist[p0 + np.uint64(j)] >> 16
    return gi


@njit(inline="always", **_JIT)
def _ranks(X, R, bs):
    """Stable sorted position of every value of every lane (``R[i*NL + s]``)."""
    for k in range(bs * NL):
        R[k] = 0
    for i in range(1, bs):
        for j in range(i):
            for s in range(NL):
                c = X[j * NL + s] <= X[i * NL + s]
                R[i * NL + s] += np.int32(c)
                R[j * NL + s] += np.int32(not c)


@njit(inline="always", **_JIT)
def _load(x, qw, n, use_qw, t0, nl, BS, X, W, amax, wl, sig):
    """Tile ``t0`` (``nl`` sub-blocks of ``BS`` values) into the lane layout: values ``X``,
    weights ``W`` (``qw*sqrtf(sigma2 + x*x)``, or ``x*x`` without quant weights), ``amax``.
    Lanes past ``nl`` are zeros.  ``sigma2 = 2*sum(x*x)/256`` per super-block, sequential."""
    SPB = QK_K // BS
    base = t0 * BS
    if use_qw:
        nsup = (nl + SPB - 1) // SPB
        for b in range(nsup):
            sig[b] = _Z
        for e in range(QK_K):  # the super-blocks' sums are independent chains
            for b in range(nsup):
                v = x[base + b * QK_K + e]
                sig[b] += v * v
        for b in range(nsup):
            sig[b] = (F32(2.0) * sig[b]) / F32(256.0)
    for s in range(NL):
        if s < nl:
            o = base + s * BS
            if use_qw:
                col = ((t0 + s) * BS) % n
                sg = sig[s // SPB]
                for i in range(BS):
                    v = x[o + i]
                    wl[i] = qw[col + i] * np.sqrt(sg + v * v)
            else:
                for i in range(BS):
                    v = x[o + i]
                    wl[i] = v * v
            m = _Z
            for i in range(BS):
                v = x[o + i]
                X[i * NL + s] = v
                W[i * NL + s] = wl[i]
                m = max(m, abs(v))
            amax[s] = m
        else:
            for i in range(BS):
                X[i * NL + s] = _Z
                W[i * NL + s] = _Z
            amax[s] = _Z


@njit(**_JIT)
def _kiq1_s(x, n, qw, kmap, plist, glev, out):
    """IQ1_S bytes of the flat rows ``x`` (whole rows of length ``n``) with quant weights ``qw``.

    Returns -1, or the index of a sub-block where ggml's neighbour search finds no candidate
    (ggml aborts there): then ``out`` is incomplete."""
    BS = 32
    nsb = x.size // BS
    X = np.empty(BS * NL, F32)
    W = np.empty(BS * NL, F32)
    R = np.empty(BS * NL, np.int32)
    SWX = np.empty(BS * NL, F32)
    SW1 = np.empty(BS * NL, F32)
    SX = np.empty((BS + 1) * NL, F32)
    SW = np.empty((BS + 1) * NL, F32)
    amax = np.empty(NL, F32)
    best = np.empty(NL, F32)
    scl = np.empty(NL, F32)
    b1 = np.empty(NL, np.int32)
    b2 = np.empty(NL, np.int32)
    shf = np.empty(NL, np.int32)
    sig = np.empty(NL // 8, F32)
    wl = np.empty(BS, F32)
    fscale = np.empty(NL, F32)
    fshift = np.empty(NL, np.int32)
    L = np.empty(BS, np.int32)
    idx = np.empty(4, np.int32)
    mv = np.zeros(NL, np.bool_)
    LQ = np.zeros(BS * NL, F32)
    RX = np.zeros(NL, F32)
    R2 = np.zeros(NL, F32)
    t = np.empty(24, F32)
    d2 = np.empty(4096, F32)
    for t0 in range(0, nsb, NL):
        nl = min(NL, nsb - t0)
        nsup = (nl + 7) // 8
        _load(x, qw, n, True, t0, nl, BS, X, W, amax, wl, sig)
        # stable sort positions, then prefix sums of w*x and w in sorted order
        _ranks(X, R, BS)
        for s in range(NL):
            for i in range(BS):
                r = R[i * NL + s]
                SWX[r * NL + s] = W[i * NL + s] * X[i * NL + s]
                SW1[r * NL + s] = W[i * NL + s]
        for s in range(NL):
            SX[s] = _Z
            SW[s] = _Z
        for j in range(BS):
            for s in range(NL):
                SX[(j + 1) * NL + s] = SX[j * NL + s] + SWX[j * NL + s]
                SW[(j + 1) * NL + s] = SW[j * NL + s] + SW1[j * NL + s]
        # exhaustive split search, all lanes at once
        for s in range(NL):
            best[s] = -_FLT_MAX
            scl[s] = amax[s]
            b1[s] = -1
            b2[s] = -1
            shf[s] = 0
        for i1 in range(BS + 1):
            for i2 in range(i1, BS + 1):
                for s in range(NL):
                    x0 = SX[s]
                    xa = SX[i1 * NL + s]
                    xb = SX[i2 * NL + s]
                    xn = SX[BS * NL + s]
                    w0 = SW[s]
                    wa = SW[i1 * NL + s]
                    wb = SW[i2 * NL + s]
                    wn = SW[BS * NL + s]
                    ax = xa - x0
                    bx = xb - xa
                    cx = xn - xb
                    aw = wa - w0
                    bw = wb - wa
                    cw = wn - wb
                    bs = best[s]
                    sc = scl[s]
                    k1 = b1[s]
                    k2 = b2[s]
                    sh = shf[s]
                    sqx = (ax * _P0 + bx * _P1) + cx * _P2
                    sq2 = ((aw * _P0) * _P0 + (bw * _P1) * _P1) + (cw * _P2) * _P2
                    c = (sq2 > _Z) & (sqx * sqx > bs * sq2)
                    r = sqx / sq2
                    if c:
                        sc = r
                        bs = r * sqx
                        k1 = i1
                        k2 = i2
                        sh = 1
                    sqx = (ax * _M0 + bx * _M1) + cx * _M2
                    sq2 = ((aw * _M0) * _M0 + (bw * _M1) * _M1) + (cw * _M2) * _M2
                    c = (sq2 > _Z) & (sqx * sqx > bs * sq2)
                    r = sqx / sq2
                    if c:
                        sc = r
                        bs = r * sqx
                        k1 = i1
                        k2 = i2
                        sh = -1
                    best[s] = bs
                    scl[s] = sc
                    b1[s] = k1
                    b2[s] = k2
                    shf[s] = sh
        # per lane: levels, grid points, refit, qs/qh
        for s in range(nl):
            g = t0 + s
            ob = (g // 8) * 50
            ib = g % 8
            if amax[s] < _EPS_S or b1[s] < 0:
                fscale[s] = _Z
                fshift[s] = 1
                mv[s] = False
                for k in range(4):
                    out[ob + 2 + 4 * ib + k] = 0
                _put16(out, ob + 34 + 2 * ib, 0)
                continue
            scale = scl[s]
            shift = shf[s]
            neg = scale < _Z
            for i in range(BS):
                r = R[i * NL + s]
                lv = np.int32(r >= b1[s]) + np.int32(r >= b2[s])
                L[i] = 2 - lv if neg else lv
            if neg:
                scale = -scale
                shift = -shift
            q0, q1, q2 = (_P0, _P1, _P2) if shift == 1 else (_M0, _M1, _M2)
            dlt = -q0  # levels are lv - 0.875 (x_p) or lv - 1.125 (x_m)
            moved = False
            for k in range(4):
                u = 0
                for j in range(8):
                    u |= L[8 * k + j] << (2 * j)
                gi = kmap[u]
                if gi < 0:
                    moved = True
                    gi = _neighbour2(plist, -kmap[u] - 1, X, W, (8 * k) * NL + s, NL, scale, q0, q1, q2, t, d2)
                    if gi < 0:
                        return g
                idx[k] = gi
            h = 0
            for k in range(4):
                out[ob + 2 + 4 * ib + k] = idx[k] & 255
                h |= (idx[k] >> 8) << (3 * k)
                for j in range(8):
                    LQ[(8 * k + j) * NL + s] = F32(glev[8 * idx[k] + j]) - dlt
            _put16(out, ob + 34 + 2 * ib, h)
            fscale[s] = scale
            fshift[s] = shift
            mv[s] = moved
        # refit the scale of the sub-blocks with a group moved to a neighbour (lanes at once)
        for s in range(NL):
            RX[s] = _Z
            R2[s] = _Z
        for i in range(BS):
            for s in range(NL):
                q = LQ[i * NL + s]
                wq = W[i * NL + s] * q
                RX[s] += wq * X[i * NL + s]
                R2[s] += wq * q
        for s in range(nl):
            if mv[s] and RX[s] > _Z and R2[s] > _Z:
                fscale[s] = RX[s] / R2[s]
        # per super-block: d and the 3-bit scales
        for b in range(nsup):
            ob = ((t0 // 8) + b) * 50
            mx = _Z
            for ib in range(8):
                mx = max(mx, fscale[8 * b + ib])
            if mx == _Z:
                _put16(out, ob, 0)
                continue
            d = mx / F32(15.0)
            _put16(out, ob, _f16(d * F32(1.125)))
            idv = _ONE / d
            for ib in range(8):
                l = _nint(_HALF * (idv * fscale[8 * b + ib] - _ONE))
                l = max(0, min(7, l))
                if fshift[8 * b + ib] == -1:
                    l |= 8
                o = ob + 34 + 2 * ib
                out[o + 1] |= (l << 4) & 0xFF
    return -1


@njit(**_JIT)
def _kiq1_m(x, n, qw, use_qw, kmap, plist, glev, out):
    """IQ1_M bytes of the flat rows ``x`` (whole rows of length ``n`` when ``use_qw``; any
    whole super-blocks otherwise).  Returns -1, or the index of a sub-block where ggml's
    neighbour search finds no candidate (ggml aborts there): then ``out`` is incomplete."""
    BS = 16
    nsb = x.size // BS
    X = np.empty(BS * NL, F32)
    W = np.empty(BS * NL, F32)
    R = np.empty(BS * NL, np.int32)
    SWX = np.empty(BS * NL, F32)
    SW1 = np.empty(BS * NL, F32)
    SH = np.empty(BS * NL, np.bool_)
    PX0 = np.empty((BS + 1) * NL, F32)
    PX1 = np.empty((BS + 1) * NL, F32)
    PW0 = np.empty((BS + 1) * NL, F32)
    PW1 = np.empty((BS + 1) * NL, F32)
    amax = np.empty(NL, F32)
    best = np.empty(NL, F32)
    scl = np.empty(NL, F32)
    b1 = np.empty(NL, np.int32)
    b2 = np.empty(NL, np.int32)
    bk = np.empty(NL, np.int32)
    sig = np.empty(NL // 16, F32)
    wl = np.empty(BS, F32)
    fscale = np.empty(NL, F32)
    fshift = np.empty(NL, np.int32)
    fidx = np.empty(2 * NL, np.int32)
    mv = np.zeros(NL, np.bool_)
    LQ = np.zeros(BS * NL, F32)
    TX = np.zeros(BS * NL, F32)
    T2 = np.zeros(BS * NL, F32)
    RX = np.zeros(NL, F32)
    R2 = np.zeros(NL, F32)
    mult = np.ones(NL, F32)
    has = np.zeros(NL // 16, np.bool_)
    dsb = np.zeros(NL // 16, F32)
    scw = np.zeros(4 * (NL // 16), np.int64)
    SQX = np.zeros(NL // 16, F32)
    SQ2 = np.zeros(NL // 16, F32)
    L = np.empty(BS, np.int32)
    t = np.empty(24, F32)
    d2 = np.empty(4096, F32)
    for t0 in range(0, nsb, NL):
        nl = min(NL, nsb - t0)
        nsup = (nl + 15) // 16
        _load(x, qw, n, use_qw, t0, nl, BS, X, W, amax, wl, sig)
        # stable sort positions; prefix sums of w*x and w per half of the sub-block
        _ranks(X, R, BS)
        for s in range(NL):
            for i in range(BS):
                r = R[i * NL + s]
                SWX[r * NL + s] = W[i * NL + s] * X[i * NL + s]
                SW1[r * NL + s] = W[i * NL + s]
                SH[r * NL + s] = i >= BS // 2
        for s in range(NL):
            PX0[s] = _Z
            PX1[s] = _Z
            PW0[s] = _Z
            PW1[s] = _Z
        for j in range(BS):
            for s in range(NL):
                o = j * NL + s
                h1 = SH[o]
                a0 = PX0[o]
                a1 = PX1[o]
                c0 = PW0[o]
                c1 = PW1[o]
                PX0[o + NL] = a0 if h1 else a0 + SWX[o]
                PX1[o + NL] = a1 + SWX[o] if h1 else a1
                PW0[o + NL] = c0 if h1 else c0 + SW1[o]
                PW1[o + NL] = c1 + SW1[o] if h1 else c1
        for s in range(NL):
            best[s] = -_FLT_MAX
            scl[s] = amax[s]
            b1[s] = -1
            b2[s] = -1
            bk[s] = -1
        for i1 in range(BS + 1):
            for i2 in range(i1, BS + 1):
                for s in range(NL):
                    tx0 = PX0[BS * NL + s]
                    tx1 = PX1[BS * NL + s]
                    tw0 = PW0[BS * NL + s]
                    tw1 = PW1[BS * NL + s]
                    sx = PX0[i1 * NL + s] + PX0[i2 * NL + s]
                    qxp0 = tx0 * _P2 - sx
                    qxm0 = tx0 * _M2 - sx
                    wa = PW0[i1 * NL + s]
                    wb = PW0[i2 * NL + s]
                    q2p0 = ((tw0 * _P2) * _P2 + wa * _CP1) + wb * _CP2
                    q2m0 = ((tw0 * _M2) * _M2 + wa * _CM1) + wb * _CM2
                    sx = PX1[i1 * NL + s] + PX1[i2 * NL + s]
                    qxp1 = tx1 * _P2 - sx
                    qxm1 = tx1 * _M2 - sx
                    wa = PW1[i1 * NL + s]
                    wb = PW1[i2 * NL + s]
                    q2p1 = ((tw1 * _P2) * _P2 + wa * _CP1) + wb * _CP2
                    q2m1 = ((tw1 * _M2) * _M2 + wa * _CM1) + wb * _CM2
                    bs = best[s]
                    sc = scl[s]
                    k1 = b1[s]
                    k2 = b2[s]
                    kk = bk[s]
                    sqx = qxp0 + qxp1
                    sq2 = q2p0 + q2p1
                    c = (sq2 > _Z) & (sqx * sqx > bs * sq2)
                    r = sqx / sq2
                    if c:
                        sc = r
                        bs = r * sqx
                        k1 = i1
                        k2 = i2
                        kk = 0
                    sqx = qxp0 + qxm1
                    sq2 = q2p0 + q2m1
                    c = (sq2 > _Z) & (sqx * sqx > bs * sq2)
                    r = sqx / sq2
                    if c:
                        sc = r
                        bs = r * sqx
                        k1 = i1
                        k2 = i2
                        kk = 1
                    sqx = qxm0 + qxp1
                    sq2 = q2m0 + q2p1
                    c = (sq2 > _Z) & (sqx * sqx > bs * sq2)
                    r = sqx / sq2
                    if c:
                        sc = r
                        bs = r * sqx
                        k1 = i1
                        k2 = i2
                        kk = 2
                    sqx = qxm0 + qxm1
                    sq2 = q2m0 + q2m1
                    c = (sq2 > _Z) & (sqx * sqx > bs * sq2)
                    r = sqx / sq2
                    if c:
                        sc = r
                        bs = r * sqx
                        k1 = i1
                        k2 = i2
                        kk = 3
                    best[s] = bs
                    scl[s] = sc
                    b1[s] = k1
                    b2[s] = k2
                    bk[s] = kk
        # per lane: levels, grid points; LQ = the shifted level of every value
        for s in range(nl):
            ok = amax[s] >= _EPS_M and b1[s] >= 0
            scale = scl[s]
            kk = bk[s]
            moved = False
            if ok:
                neg = scale < _Z
                for i in range(BS):
                    r = R[i * NL + s]
                    lv = np.int32(r >= b1[s]) + np.int32(r >= b2[s])
                    L[i] = 2 - lv if neg else lv
                if neg:
                    scale = -scale
                    kk = 3 - kk
            else:
                scale = _Z
                kk = 0
            for k in range(2):
                neg_half = kk >= 2 if k == 0 else kk % 2 == 1
                gi = 0
                if ok:
                    q0, q1, q2 = (_M0, _M1, _M2) if neg_half else (_P0, _P1, _P2)
                    u = 0
                    for j in range(8):
                        u |= L[8 * k + j] << (2 * j)
                    gi = kmap[u]
                    if gi < 0:
                        moved = True
                        gi = _neighbour2(plist, -kmap[u] - 1, X, W, (8 * k) * NL + s, NL, scale, q0, q1, q2, t, d2)
                        if gi < 0:
                            return t0 + s
                fidx[2 * s + k] = gi
                dlt = -_M0 if neg_half else -_P0  # levels are lv - 1.125 (x_m) or lv - 0.875 (x_p)
                for j in range(8):
                    LQ[(8 * k + j) * NL + s] = F32(glev[8 * gi + j]) - dlt
            fscale[s] = scale
            fshift[s] = kk
            mv[s] = moved
        # refit the scale of the sub-blocks with a group moved to a neighbour (lanes at once)
        for s in range(NL):
            RX[s] = _Z
            R2[s] = _Z
        for i in range(BS):
            for s in range(NL):
                q = LQ[i * NL + s]
                wq = W[i * NL + s] * q
                RX[s] += wq * X[i * NL + s]
                R2[s] += wq * q
        for s in range(nl):
            if mv[s] and RX[s] > _Z and R2[s] > _Z:
                fscale[s] = RX[s] / R2[s]
        # per super-block: qs, qh (+ shift bits), 3-bit scales
        for b in range(nsup):
            ob = ((t0 // 16) + b) * 56
            mx = _Z
            for ib in range(16):
                mx = max(mx, fscale[16 * b + ib])
            has[b] = mx != _Z
            for ib in range(16):
                s = 16 * b + ib
                out[ob + 2 * ib] = fidx[2 * s] & 255
                out[ob + 2 * ib + 1] = fidx[2 * s + 1] & 255
                h = (fidx[2 * s] >> 8) | ((fidx[2 * s + 1] >> 8) << 4)
                if has[b]:
                    h |= _MASKS[fshift[s]]
                out[ob + 32 + ib] = h
            sc0 = 0
            sc1 = 0
            sc2 = 0
            sc3 = 0
            dsb[b] = mx / F32(15.0)
            if has[b]:
                idv = _ONE / dsb[b]
                for ib in range(16):
                    s = 16 * b + ib
                    l = _nint(_HALF * (idv * fscale[s] - _ONE))
                    l = max(0, min(7, l))
                    v = l << (3 * (ib % 4))
                    if ib < 4:
                        sc0 |= v
                    elif ib < 8:
                        sc1 |= v
                    elif ib < 12:
                        sc2 |= v
                    else:
                        sc3 |= v
                    mult[s] = F32(2 * l + 1)
            else:
                for ib in range(16):
                    mult[16 * b + ib] = _ONE
            scw[4 * b] = sc0
            scw[4 * b + 1] = sc1
            scw[4 * b + 2] = sc2
            scw[4 * b + 3] = sc3
        # the super-block scale refit with the 3-bit scales: terms for all lanes at once, then
        # sequential sums over each super-block's 256 values in C order (ib, group, j)
        for i in range(BS):
            for s in range(NL):
                q = LQ[i * NL + s] * mult[s]
                wq = W[i * NL + s] * q
                TX[i * NL + s] = wq * X[i * NL + s]
                T2[i * NL + s] = wq * q
        for b in range(nsup):
            SQX[b] = _Z
            SQ2[b] = _Z
        for ib in range(16):
            for i in range(BS):
                for b in range(nsup):  # independent chains, one per super-block
                    o = i * NL + 16 * b + ib
                    SQX[b] += TX[o]
                    SQ2[b] += T2[o]
        for b in range(nsup):
            ob = ((t0 // 16) + b) * 56
            if not has[b]:
                for i in range(8):
                    out[ob + 48 + i] = 0
                continue
            d = dsb[b]
            if SQ2[b] > _Z:
                d = SQX[b] / SQ2[b]
            hs = _f16(d * F32(1.1125))
            _put16(out, ob + 48, scw[4 * b] | ((hs & 0x000F) << 12))
            _put16(out, ob + 50, scw[4 * b + 1] | ((hs & 0x00F0) << 8))
            _put16(out, ob + 52, scw[4 * b + 2] | ((hs & 0x0F00) << 4))
            _put16(out, ob + 54, scw[4 * b + 3] | (hs & 0xF000))
    return -1


def quantize(name: str, x: np.ndarray, n: int, qw: np.ndarray, use_qw: bool, out: np.ndarray) -> None:
    """Hook for ``quant._numba._run``: IQ1_S / IQ1_M of the flat rows ``x`` into ``out``."""
    glev, kmap, plist = tables()
    if name == "IQ1_S":
        if not use_qw:
            raise ValueError("IQ1_S needs quant weights (ggml asserts)")
        bad = _kiq1_s(x, n, qw, kmap, plist, glev, out)
    else:
        bad = _kiq1_m(x, n, qw, use_qw, kmap, plist, glev, out)
    if bad >= 0:
        from . import QuantError

        raise QuantError(
            f"{name}: no grid neighbour with a finite error in sub-block {bad} (float32 overflow): "
            "llama.cpp aborts on this input (GGML_ASSERT); rescale the tensor"
        )
