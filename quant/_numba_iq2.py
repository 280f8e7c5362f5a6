"""numba kernels for IQ2_XXS, IQ2_XS and IQ2_S, byte-identical to ggml's quantizers.

Same algorithm as the numpy reference (``quant._numpy_iq2``, which describes the formats
and the search): ``quantize_row_iq2_{xxs,xs,s}_impl`` with ``iq2_find_best_neighbour``,
tables from ``quant._iqgrid.iq2_tables``.  Conventions of ``quant._numba``: float32 in C
operation order, no FMA, ``nearest_int`` as the bit trick everywhere (a value flipped
for sign parity can be far larger than the group maximum, so ``id*x`` is unbounded).

Each sub-block is processed on its own.  The hot spot is the neighbour search for points
off the grid (most points in a scale search are): the neighbour lists are stored with
their grid coordinates transposed (``nbq[i, e]``, coordinate i of list entry e), so the
distances of all candidates are computed by a loop over candidates that LLVM vectorizes,
each candidate's distance still the sequential C sum over its 8 coordinates; the first
minimum is then found by a scalar scan with C's strict ``<`` from ``FLT_MAX``.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from . import QuantError
from ._iqgrid import IQ2_KMAP_SIZE, iq2_tables
from ._numba import _JIT, _f16, _nint, _put16, _qp
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
#: raised where ggml aborts (GGML_ASSERT(grid_index >= 0), "point not on grid"): only for
#: values whose float32 sums overflow, turned into a QuantError by ``quantize``
_ABORT = "iq2: ggml aborts on this block"


@functools.cache
def tables(name: str):
    """``(glev int32 [G, 8], kmap int32, start int32, count int32, nbi int32 [E], nbq float32 [8, E])``.

    ``kmap[u] >= 0``: grid index; otherwise the neighbour list of ``u`` is entries
    ``start[u] .. start[u] + count[u] - 1`` of ``nbi`` (grid indices, ggml's order) and of
    ``nbq`` (their coordinates 1/3/5, transposed).
    """
    t = iq2_tables(name)
    grid = t.grid.astype(np.int32)
    kmap = t.kmap.astype(np.int32)
    nb = t.neighbours.astype(np.int32)
    off = np.flatnonzero(kmap < 0)
    pos = -kmap[off] - 1
    cnt = nb[pos]
    start = np.zeros(IQ2_KMAP_SIZE, np.int32)
    count = np.zeros(IQ2_KMAP_SIZE, np.int32)
    first = np.cumsum(cnt) - cnt
    start[off] = first
    count[off] = cnt
    seg = np.repeat(np.arange(off.size), cnt)
    rank = np.arange(seg.size) - first[seg]
    nbi = nb[pos[seg] + 1 + rank].astype(np.int32)
    nbq = np.ascontiguousarray(grid[nbi].T.astype(F32))
    assert cnt.max() < _MAXCNT
    return (np.ascontiguousarray((grid - 1) // 2), kmap, start, count, nbi, nbq)


@njit(**_JIT)
def _neighbour(start, cnt, nbi, nbq, xv, wa, o, scale, d2):
    """``iq2_find_best_neighbour`` for the 8 values ``xv[o:o+8]``: the grid index of the first
    list entry with the smallest ``sum_i (wa*diff)*diff``, ``diff = scale*g - x``."""
    x0 = xv[o]
    x1 = xv[o + 1]
    x2 = xv[o + 2]
    x3 = xv[o + 3]
    x4 = xv[o + 4]
    x5 = xv[o + 5]
    x6 = xv[o + 6]
    x7 = xv[o + 7]
    w0 = wa[o]
    w1 = wa[o + 1]
    w2 = wa[o + 2]
    w3 = wa[o + 3]
    w4 = wa[o + 4]
    w5 = wa[o + 5]
    w6 = wa[o + 6]
    w7 = wa[o + 7]
    q0 = nbq[0, start : start + cnt]
    q1 = nbq[1, start : start + cnt]
    q2 = nbq[2, start : start + cnt]
    q3 = nbq[3, start : start + cnt]
    q4 = nbq[4, start : start + cnt]
    q5 = nbq[5, start : start + cnt]
    q6 = nbq[6, start : start + cnt]
    q7 = nbq[7, start : start + cnt]
    for j in range(cnt):
        diff = scale * q0[j] - x0
        d = _Z + (w0 * diff) * diff
        diff = scale * q1[j] - x1
        d = d + (w1 * diff) * diff
        diff = scale * q2[j] - x2
        d = d + (w2 * diff) * diff
        diff = scale * q3[j] - x3
        d = d + (w3 * diff) * diff
        diff = scale * q4[j] - x4
        d = d + (w4 * diff) * diff
        diff = scale * q5[j] - x5
        d = d + (w5 * diff) * diff
        diff = scale * q6[j] - x6
        d = d + (w6 * diff) * diff
        diff = scale * q7[j] - x7
        d = d + (w7 * diff) * diff
        d2[j] = d
    best = _FLT_MAX
    bj = -1
    for j in range(cnt):
        if d2[j] < best:
            best = d2[j]
            bj = j
    if bj < 0:
        raise ValueError(_ABORT)
    return nbi[start + bj]


@njit(**_JIT)
def _place(k8, L, xv, wa, scale, glev, kmap, start, count, nbi, nbq, d2):
    """Look up the 8-group at ``L[k8:k8+8]`` (levels 0..2); off the grid, replace it by its
    best neighbour at ``scale``.  Returns True if the point was on the grid."""
    u = 0
    for i in range(8):
        u |= L[k8 + i] << (2 * i)
    if kmap[u] >= 0:
        return True
    gi = _neighbour(start[u], count[u], nbi, nbq, xv, wa, k8, scale, d2)
    for i in range(8):
        L[k8 + i] = glev[gi, i]
    return False


@njit(inline="always", **_JIT)
def _levels(L, xv, k8, id_):
    """``L = clamp(nearest_int(0.5f*(id*x - 1)), 0, 2)`` for one 8-group."""
    for i in range(8):
        l_ = _nint(_HALF * (id_ * xv[k8 + i] - _ONE))
        L[k8 + i] = 0 if l_ < 0 else (2 if l_ > 2 else l_)


@njit(inline="always", **_JIT)
def _sums(gs, w, xv, L):
    sumqx = _Z
    sumq2 = _Z
    for i in range(gs):
        q = F32(2 * L[i] + 1)
        sumqx += (w[i] * xv[i]) * q
        sumq2 += (w[i] * q) * q
    return sumqx, sumq2


@njit(inline="always", **_JIT)
def _grid_of(L, k8, kmap):
    u = 0
    for i in range(8):
        u |= L[k8 + i] << (2 * i)
    gi = kmap[u]
    if gi < 0:
        raise ValueError(_ABORT)
    return gi


@njit(**_JIT)
def _prep(xb, qb, use_qw, sigma2, gs, parity, w, wa, xv, signs):
    """Weights, sqrt-weights, ``xval`` and sign bits of one sub-block (see ``_numpy_iq2._signs``)."""
    for i in range(gs):
        if use_qw:
            w[i] = qb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
        else:
            w[i] = F32(0.25) * sigma2 + xb[i] * xb[i]
        wa[i] = np.sqrt(w[i])
    for k in range(gs // 8):
        nflip = 0
        s = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= _Z:
                xv[8 * k + i] = v
            else:
                xv[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if parity:
            if nflip % 2:
                imin = 0
                mn = (w[8 * k] * xb[8 * k]) * xb[8 * k]
                for i in range(1, 8):
                    ax = (w[8 * k + i] * xb[8 * k + i]) * xb[8 * k + i]
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
def _kxxs(x, n, qw, glev, kmap, start, count, nbi, nbq, out):
    """``quantize_row_iq2_xxs_impl`` over the flat rows ``x`` (66 bytes per super-block)."""
    nbl_row = n // QK_K
    nblk = x.size // QK_K
    w = np.empty(32, F32)
    wa = np.empty(32, F32)
    xv = np.empty(32, F32)
    L = np.zeros(32, np.int64)
    La = np.zeros(32, np.int64)
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
            xb = x[b0 + 32 * ib : b0 + 32 * ib + 32]
            mx = _prep(xb, qw[qo + 32 * ib : qo + 32 * ib + 32], True, sigma2, 32, True, w, wa, xv, signs)
            scales[ib] = _Z
            if mx < _EPS:
                continue
            scale = _qp(32, 4, xv, w, Lqp)
            eff_max = scale * F32(3)
            if eff_max <= _Z:
                continue
            for i in range(32):
                L[i] = Lqp[i]
            best = _Z
            for is_ in range(-6, 7):
                id_ = (_FIVE + F32(is_) * _TENTH) / eff_max
                this_scale = _ONE / id_
                for k in range(4):
                    _levels(La, xv, 8 * k, id_)
                    _place(8 * k, La, xv, wa, this_scale, glev, kmap, start, count, nbi, nbq, d2)
                sumqx, sumq2 = _sums(32, w, xv, La)
                if sumq2 > _Z and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    for i in range(32):
                        L[i] = La[i]
            if scale > _Z:
                id_ = _ONE / scale
                for k in range(4):
                    _levels(L, xv, 8 * k, id_)
                    _place(8 * k, L, xv, wa, scale, glev, kmap, start, count, nbi, nbq, d2)
                sumqx, sumq2 = _sums(32, w, xv, L)
                if sumq2 > _Z:
                    scale = sumqx / sumq2
            if scale < _Z:
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(4):
                gi = _grid_of(L, 8 * k, kmap)
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
def _kxs_s(x, n, qw, use_qw, s_type, glev, kmap, start, count, nbi, nbq, out):
    """``quantize_row_iq2_xs_impl`` (74 bytes) / ``quantize_row_iq2_s_impl`` (82 bytes)."""
    nbl_row = n // QK_K
    nblk = x.size // QK_K
    ts = 82 if s_type else 74
    eps = _EPS_S if s_type else _EPS
    w = np.empty(16, F32)
    wa = np.empty(16, F32)
    xv = np.empty(16, F32)
    L = np.zeros(16, np.int64)
    La = np.zeros(16, np.int64)
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
            xb = x[b0 + 16 * ib : b0 + 16 * ib + 16]
            qb = qw[qo + 16 * ib : qo + 16 * ib + 16] if use_qw else qw
            mx = _prep(xb, qb, use_qw, sigma2, 16, not s_type, w, wa, xv, signs)
            scales[ib] = _Z
            gidx[2 * ib] = 0
            gidx[2 * ib + 1] = 0
            gsig[2 * ib] = 0
            gsig[2 * ib + 1] = 0
            if mx < eps:
                continue
            for i in range(16):
                L[i] = 0
            best = _Z
            scale = mx / _FIVE
            on0 = True
            on1 = True
            for is_ in range(-9, 10):
                id_ = (_FIVE + F32(is_) * _TENTH) / mx
                this_scale = _ONE / id_
                _levels(La, xv, 0, id_)
                a0 = _place(0, La, xv, wa, this_scale, glev, kmap, start, count, nbi, nbq, d2)
                _levels(La, xv, 8, id_)
                a1 = _place(8, La, xv, wa, this_scale, glev, kmap, start, count, nbi, nbq, d2)
                sumqx, sumq2 = _sums(16, w, xv, La)
                if sumq2 > _Z and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    for i in range(16):
                        L[i] = La[i]
                    on0 = a0
                    on1 = a1
            if (not on0 or not on1) and scale > _Z:
                id_ = _ONE / scale
                if not on0:
                    _levels(L, xv, 0, id_)
                    _place(0, L, xv, wa, scale, glev, kmap, start, count, nbi, nbq, d2)
                if not on1:
                    _levels(L, xv, 8, id_)
                    _place(8, L, xv, wa, scale, glev, kmap, start, count, nbi, nbq, d2)
                sumqx, sumq2 = _sums(16, w, xv, L)
                if sumq2 > _Z:
                    scale = sumqx / sumq2
            if scale < _Z:
                scale = -scale
                m = 255 if s_type else 127
                signs[0] = ~signs[0] & m
                signs[1] = ~signs[1] & m
            gidx[2 * ib] = _grid_of(L, 0, kmap)
            gidx[2 * ib + 1] = _grid_of(L, 8, kmap)
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
    glev, kmap, start, count, nbi, nbq = tables(name)
    try:
        if name == "IQ2_XXS":
            _kxxs(x, n, qw, glev, kmap, start, count, nbi, nbq, out)
        else:
            _kxs_s(x, n, qw, use_qw, name == "IQ2_S", glev, kmap, start, count, nbi, nbq, out)
    except ValueError as e:
        if str(e) != _ABORT:
            raise
        raise QuantError(ABORT_MESSAGE.format(name=name)) from None
