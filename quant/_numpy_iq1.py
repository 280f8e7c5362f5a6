"""numpy reference for IQ1_S and IQ1_M (ggml ``quantize_iq1_s`` / ``quantize_iq1_m``).

Both types quantize groups of 8 values to one point of a 2048-point grid whose
coordinates are -1, 0, +1, shifted by a per-group ``delta`` of -/+0.125 (IQ1S_DELTA,
IQ1M_DELTA), times a sub-block scale:

* IQ1_S (50 bytes per 256 values): ``d`` (fp16) | ``qs[32]`` (grid index, low 8 bits)
  | ``qh[8]`` (uint16 per 32-value sub-block: 3 high index bits per group, a 3-bit
  scale in bits 12-14, the delta sign in bit 15).
* IQ1_M (56 bytes): ``qs[32]`` | ``qh[16]`` (per 16-value sub-block: high index bits of
  its two groups in bits 0-2 and 4-6, their delta signs in bits 3 and 7) | ``scales[8]``
  (four uint16: 3-bit sub-block scales in bits 0-11, the fp16 super-block scale split
  over the four top nibbles).

The scale search of a sub-block (``quantize_row_iq1_s_impl`` / ``_iq1_m_impl``) is exact
for three levels: the values are sorted (``qsort`` with a comparator on the value only;
glibc's ``qsort`` is a stable merge sort for these sizes, so equal values keep their
index order: here a stable ``argsort``), prefix sums of ``w*x`` and ``w`` are taken in
sorted order, and every split ``(i1, i2)`` of the sorted values into levels 0/1/2 is
scored in the C loop order with the running-best test ``sumqx^2 > best*sumq2``.  The
levels are then snapped to the grid (points off the grid try their neighbour list with a
weighted squared error, first minimum wins) and the scale refitted if any group moved.

Everything is float32, one IEEE operation at a time in the C order, vectorized across
sub-blocks (the search is a Python loop over the splits).
"""

from __future__ import annotations

import functools

import numpy as np

from ._iqgrid import iq2_tables

F32 = np.float32
QK_K = 256
_FLT_MAX = F32(np.finfo(np.float32).max)
_EPS_S = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
_EPS_M = F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
_DELTA = F32(0.125)  # IQ1S_DELTA == IQ1M_DELTA
#: the three levels with delta added (shift +1, "x_p") or subtracted (shift -1, "x_m")
X_P = np.array([F32(-1) + _DELTA, _DELTA, F32(1) + _DELTA], dtype=F32)
X_M = np.array([F32(-1) - _DELTA, -_DELTA, F32(1) - _DELTA], dtype=F32)
#: off-grid groups searched per vectorized step (bounds the [groups, neighbours, 8] temporaries)
_NB_CHUNK = 2048


def _aborts(name: str, what: str):
    """The error for input on which ggml's quantizer aborts (GGML_ASSERT)."""
    from . import QuantError

    return QuantError(f"{name}: {what}: llama.cpp aborts on this input (GGML_ASSERT); rescale the tensor")


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int`` (bit trick; exact for every float32, inf and NaN included)."""
    return ((v + F32(12582912.0)).view(np.int32) & np.int32(0x7FFFFF)) - np.int32(0x400000)


def _cumsum0(terms: np.ndarray) -> np.ndarray:
    """``s[0] = 0; s[j+1] = s[j] + terms[:, j]`` (sequential, float32) -> ``[m, n+1]``."""
    z = np.zeros((terms.shape[0], 1), F32)
    return np.add.accumulate(np.concatenate([z, terms], axis=1), axis=1, dtype=F32)


def _sigma2(blocks: np.ndarray) -> np.ndarray:
    """``2*sum(x*x)/QK_K`` per super-block (sequential sum)."""
    s = np.add.accumulate(blocks * blocks, axis=1, dtype=F32)[:, -1] + F32(0)
    return (F32(2) * s) / F32(QK_K)


@functools.cache
def _tables():
    """Grid levels ``[2048, 8]`` (0..2), kmap, and the neighbour lists of every off-grid
    point with levels 0..2 as a padded matrix (-1 = no entry) with a row per such point."""
    t = iq2_tables("IQ1_S")
    levels = ((t.grid.astype(np.int32) - 1) // 2).astype(np.int8)
    u = np.arange(t.kmap.size)
    fields = (u[:, None] >> (2 * np.arange(8))) & 3
    off = np.flatnonzero((t.kmap < 0) & (fields <= 2).all(axis=1))
    starts = -t.kmap[off].astype(np.int64) - 1
    counts = t.neighbours[starts].astype(np.int64)
    pad = np.full((off.size, int(counts.max())), -1, np.intp)
    for r, (s, c) in enumerate(zip(starts, counts)):
        pad[r, :c] = t.neighbours[s + 1 : s + 1 + c]
    row = np.full(t.kmap.size, -1, np.intp)
    row[off] = np.arange(off.size)
    return levels, t.kmap.astype(np.intp), row, pad


def _qsort_order(xs: np.ndarray) -> np.ndarray:
    """The order glibc's ``qsort`` leaves ``(value, index)`` pairs in when the comparator
    looks at the value only: a merge sort for these sizes, so stable (ties keep index order;
    -0.0 and +0.0 compare equal)."""
    return np.argsort(xs + F32(0), axis=1, kind="stable")


def _split_search(xs, w, amax, eps, per_half):
    """The exhaustive 3-level split search of one sub-block per row of ``xs``.

    Returns ``(ok, scale, code, L)``: ``ok`` False where C zeroes the sub-block (max below
    ``eps`` or no split accepted); ``code`` is IQ1_S's shift (+1 = x_p, -1 = x_m) or IQ1_M's
    ``best_k`` (0..3: x_p/x_m for the first and second half of the block); ``L`` the levels
    0..2 (already mirrored where the best scale was negative).
    """
    m, n = xs.shape
    order = _qsort_order(xs)
    xo = np.take_along_axis(xs, order, axis=1)
    wo = np.take_along_axis(w, order, axis=1)
    best = np.full(m, -_FLT_MAX, F32)
    scale = amax.copy()
    b1 = np.full(m, -1, np.intp)
    b2 = np.full(m, -1, np.intp)
    code = np.zeros(m, np.intp)

    def consider(sqx, sq2, i1, i2, c):
        nonlocal best, scale
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        if take.any():
            s = sqx / sq2
            scale = np.where(take, s, scale)
            best = np.where(take, s * sqx, best)
            b1[take] = i1
            b2[take] = i2
            code[take] = c

    if not per_half:  # IQ1_S: three groups, one shift for the whole sub-block
        sx, sw = _cumsum0(wo * xo), _cumsum0(wo)
        for i1 in range(n + 1):
            ax, aw = sx[:, i1] - sx[:, 0], sw[:, i1] - sw[:, 0]
            for i2 in range(i1, n + 1):
                bx, bw = sx[:, i2] - sx[:, i1], sw[:, i2] - sw[:, i1]
                cx, cw = sx[:, n] - sx[:, i2], sw[:, n] - sw[:, i2]
                for c, v in ((1, X_P), (-1, X_M)):
                    sqx = (ax * v[0] + bx * v[1]) + cx * v[2]
                    sq2 = ((aw * v[0]) * v[0] + (bw * v[1]) * v[1]) + (cw * v[2]) * v[2]
                    consider(sqx, sq2, i1, i2, c)
    else:  # IQ1_M: prefix sums per half of the sub-block, each half with its own shift
        half = order >= n // 2
        wx = wo * xo
        px = [_cumsum0(np.where(half == h, wx, F32(0))) for h in (0, 1)]
        pw = [_cumsum0(np.where(half == h, wo, F32(0))) for h in (0, 1)]
        tx = [p[:, n] for p in px]
        tw = [p[:, n] for p in pw]
        p2, m2 = X_P[2], X_M[2]
        cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
        cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
        for i1 in range(n + 1):
            for i2 in range(i1, n + 1):
                qxp, qxm, q2p, q2m = [], [], [], []
                for h in (0, 1):
                    s = px[h][:, i1] + px[h][:, i2]
                    qxp.append(tx[h] * p2 - s)
                    qxm.append(tx[h] * m2 - s)
                    q2p.append(((tw[h] * p2) * p2 + pw[h][:, i1] * cp1) + pw[h][:, i2] * cp2)
                    q2m.append(((tw[h] * m2) * m2 + pw[h][:, i1] * cm1) + pw[h][:, i2] * cm2)
                consider(qxp[0] + qxp[1], q2p[0] + q2p[1], i1, i2, 0)
                consider(qxp[0] + qxm[1], q2p[0] + q2m[1], i1, i2, 1)
                consider(qxm[0] + qxp[1], q2m[0] + q2p[1], i1, i2, 2)
                consider(qxm[0] + qxm[1], q2m[0] + q2m[1], i1, i2, 3)

    ok = (amax >= eps) & (b1 >= 0)
    j = np.arange(n)
    lev = (j >= b1[:, None]).astype(np.intp) + (j >= b2[:, None])
    L = np.empty_like(lev)
    np.put_along_axis(L, order, lev, axis=1)
    neg = scale < 0
    L = np.where(neg[:, None], 2 - L, L)
    scale = np.where(neg, -scale, scale)
    code = np.where(neg, -code if not per_half else 3 - code, code)
    return ok, scale, code, L


def _snap_to_grid(name, xs, w, scale, L, xx, ok):
    """Grid index of every group of 8 (``kmap``, else ``iq1_find_best_neighbour2``).

    ``xx``: ``[m, ngroups, 3]`` the shifted levels used by each group; sub-blocks not
    ``ok`` get index 0.  Returns ``(index [m, ngroups], moved [m])`` (moved: some group was
    off the grid)."""
    levels, kmap, row, pad = _tables()
    m, n = xs.shape
    g = L.reshape(m, n // 8, 8)
    u = (g << (2 * np.arange(8))).sum(axis=2)
    index = np.where(ok[:, None], kmap[u], 0)
    moved = (index < 0).any(axis=1)
    sbs, ks = np.nonzero(index < 0)
    for c0 in range(0, sbs.size, _NB_CHUNK):  # bounded temporaries: [chunk, K, 8]
        sb, k = sbs[c0 : c0 + _NB_CHUNK], ks[c0 : c0 + _NB_CHUNK]
        cand = pad[row[u[sb, k]]]  # [M, K] grid indices, -1 padding
        cl = levels[np.maximum(cand, 0)]  # [M, K, 8]
        q = np.take_along_axis(xx[sb, k][:, None, :], cl.reshape(sb.size, 1, -1), axis=2).reshape(cl.shape)
        xv = xs.reshape(m, -1, 8)[sb, k]
        wv = w.reshape(m, -1, 8)[sb, k]
        sc = scale[sb][:, None]
        d2 = np.zeros(cand.shape, F32)
        for i in range(8):
            diff = sc * q[:, :, i] - xv[:, i : i + 1]
            d2 = d2 + (wv[:, i : i + 1] * diff) * diff
        d2 = np.where((cand >= 0) & (d2 < _FLT_MAX), d2, np.inf)  # strict '<' from FLT_MAX, NaN never wins
        pick = np.argmin(d2, axis=1)  # first minimum, as the C loop's strict '<'
        if not np.isfinite(d2[np.arange(sb.size), pick]).all():
            raise _aborts(name, "no grid neighbour with a finite error (float32 overflow)")
        index[sb, k] = cand[np.arange(sb.size), pick]
    return index, moved


def _refit(xs, w, scale, index, xx, moved):
    """Least-squares scale with the grid points chosen (only where a group moved)."""
    levels = _tables()[0]
    m, n = xs.shape
    sumqx = np.zeros(m, F32)
    sumq2 = np.zeros(m, F32)
    for k in range(n // 8):
        lv = levels[index[:, k]]
        for j in range(8):
            q = xx[np.arange(m), k, lv[:, j]]
            wq = w[:, 8 * k + j] * q
            sumqx = sumqx + wq * xs[:, 8 * k + j]
            sumq2 = sumq2 + wq * q
    upd = moved & (sumqx > 0) & (sumq2 > 0)
    return np.where(upd, sumqx / np.where(upd, sumq2, F32(1)), scale)


def _sub_weights(blocks, qw, nrows, bs):
    """Per sub-block weights: ``qw*sqrtf(sigma2 + x*x)`` (imatrix) or ``x*x`` (IQ1_M without)."""
    xs = blocks.reshape(-1, bs)
    if qw is None:
        return xs, xs * xs
    sig = np.repeat(_sigma2(blocks), QK_K // bs)[:, None]
    q = np.broadcast_to(qw.reshape(1, -1, bs), (nrows, qw.size // bs, bs)).reshape(-1, bs)
    return xs, q * np.sqrt(sig + xs * xs)


def _iq1_s(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``quantize_iq1_s`` (``quantize_row_iq1_s_impl`` per row; needs quant weights)."""
    name = "IQ1_S"
    if qw is None:
        raise ValueError("IQ1_S needs quant weights (ggml asserts)")
    blocks = xg.reshape(-1, QK_K)
    nb = blocks.shape[0]
    xs, w = _sub_weights(blocks, qw, xg.shape[0], 32)
    amax = np.abs(xs).max(axis=1)
    ok, scale, shift, L = _split_search(xs, w, amax, _EPS_S, per_half=False)
    xx = np.where((shift == 1)[:, None, None], X_P, X_M) * np.ones((1, 4, 1), F32)
    index, moved = _snap_to_grid(name, xs, w, scale, L, xx, ok)
    scale = _refit(xs, w, scale, index, xx, moved)
    if (ok & ~(scale >= 0)).any():
        raise _aborts(name, "negative or NaN sub-block scale")
    scale = np.where(ok, scale, F32(0)).reshape(nb, 8)
    shift = np.where(ok, shift, 1).reshape(nb, 8)

    qs = (index & 255).astype(np.uint8).reshape(nb, 32)
    qh = ((index >> 8) << (3 * np.arange(4))).sum(axis=1).reshape(nb, 8)
    max_scale = scale.max(axis=1)
    has = max_scale != 0
    d = max_scale / F32(15)
    dh = np.where(has, (d * F32(1.125)).astype(np.float16), np.float16(0))
    idv = F32(1) / d
    l = np.clip(_nearest_int(F32(0.5) * (idv[:, None] * scale - F32(1))), 0, 7)
    l = np.where(shift == -1, l | 8, l)
    qh = np.where(has[:, None], qh | (l << 12), qh).astype("<u2")
    return np.concatenate([dh.astype("<f2").view(np.uint8).reshape(nb, 2), qs, qh.view(np.uint8).reshape(nb, 16)], axis=1)


_MASKS = np.array([0x00, 0x80, 0x08, 0x88])


def _iq1_m(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """``quantize_iq1_m`` (``quantize_row_iq1_m_impl`` per row; weights ``x*x`` without qw)."""
    name = "IQ1_M"
    blocks = xg.reshape(-1, QK_K)
    nb = blocks.shape[0]
    xs, w = _sub_weights(blocks, qw, xg.shape[0], 16)
    amax = np.abs(xs).max(axis=1)
    ok, scale, k, L = _split_search(xs, w, amax, _EPS_M, per_half=True)
    # group 0 uses x_m when k >= 2, group 1 when k is odd
    xx = np.stack([np.where((k < 2)[:, None], X_P, X_M), np.where((k % 2 == 0)[:, None], X_P, X_M)], axis=1)
    index, moved = _snap_to_grid(name, xs, w, scale, L, xx, ok)
    scale = _refit(xs, w, scale, index, xx, moved)
    if (ok & ~(scale >= 0)).any():
        raise _aborts(name, "negative or NaN sub-block scale")
    scale = np.where(ok, scale, F32(0)).reshape(nb, 16)
    k = np.where(ok, k, 0).reshape(nb, 16)
    xx = np.where(ok[:, None, None], xx, X_P).reshape(nb, 16, 2, 3)

    qs = (index & 255).astype(np.uint8).reshape(nb, 32)
    qh = ((index[:, 0] >> 8) | ((index[:, 1] >> 8) << 4)).reshape(nb, 16)
    max_scale = scale.max(axis=1)
    has = max_scale != 0
    d = max_scale / F32(15)
    idv = F32(1) / d
    l = np.clip(_nearest_int(F32(0.5) * (idv[:, None] * scale - F32(1))), 0, 7)
    sc = (l.reshape(nb, 4, 4) << (3 * np.arange(4))).sum(axis=2)
    qh = np.where(has[:, None], qh | _MASKS[k], qh)

    # refit the super-block scale with the 3-bit sub-block scales: sequential over the block
    levels = _tables()[0]
    lv = levels[index.reshape(nb, 16, 2)]  # [nb, 16, 2, 8]
    wb = w.reshape(nb, 16, 2, 8)
    xb = xs.reshape(nb, 16, 2, 8)
    mult = (2 * l + 1).astype(F32)
    sumqx = np.zeros(nb, F32)
    sumq2 = np.zeros(nb, F32)
    r = np.arange(nb)
    for ib in range(16):
        for g in range(2):
            for j in range(8):
                q = xx[r, ib, g, lv[:, ib, g, j]] * mult[:, ib]
                wq = wb[:, ib, g, j] * q
                sumqx = sumqx + wq * xb[:, ib, g, j]
                sumq2 = sumq2 + wq * q
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), d)
    s = (d * F32(1.1125)).astype(np.float16).view(np.uint16).astype(np.intp)
    sc[:, 0] |= (s & 0x000F) << 12
    sc[:, 1] |= (s & 0x00F0) << 8
    sc[:, 2] |= (s & 0x0F00) << 4
    sc[:, 3] |= s & 0xF000
    sc = np.where(has[:, None], sc, 0).astype("<u2")
    return np.concatenate([qs, qh.astype(np.uint8), sc.view(np.uint8).reshape(nb, 8)], axis=1)


#: name -> (block size, bytes per block, kernel(x_rows_group, qw_or_None) -> bytes[nblocks, size])
KERNELS = {
    "IQ1_S": (QK_K, 50, _iq1_s),
    "IQ1_M": (QK_K, 56, _iq1_m),
}
