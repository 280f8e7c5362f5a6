"""numpy reference for IQ3_XXS and IQ3_S, byte-identical to ggml's quantizers.

Ports ``quantize_row_iq3_xxs_impl`` and ``quantize_row_iq3_s_impl`` (with
``iq3_find_best_neighbour``) of ``ggml/src/ggml-quants.c``; the lattice tables are
``quant._iqgrid.iq3_tables`` (ggml's ``iq3xs_init_impl``).  Vectorized across the 32-value
sub-blocks: arrays are laid out ``(in-block index, sub-block)`` and every step of the C
search is a vector operation over all sub-blocks, with the C branches as masks.

Both types quantize a sub-block of 32 values as a scale times 8 groups of 4 magnitudes,
each group a point of a 3-bit lattice grid (coordinates 1, 3, ..., 15), plus signs:

* weights: ``qw * sqrtf(sigma2 + x*x)`` with an imatrix (``sigma2 = 2*sum(x*x)/256`` over
  the super-block), else ``x*x``; the neighbour search weighs by ``sqrtf(weight)``.
* signs: IQ3_XXS stores 7 sign bits per 8 values, the 8th implied by even parity; for an
  odd number of negatives the value with the smallest ``weight*x*x`` gets the wrong sign
  (its magnitude enters the fit negated).  IQ3_S stores all 8 bits.
* scale search over ``id = (15 + 0.2*is)/max`` (is = -15..15 for IQ3_XXS, -9..9 for IQ3_S):
  levels ``nearest_int(0.5*(id*|x| - 1))`` clamped to 0..7; a group off the grid takes the
  best of its neighbour list at scale ``1/id``; the candidate is kept if
  ``sumqx**2 > best*sumq2`` (strict: earlier steps win ties).  Then groups off the grid are
  requantized with the final scale (IQ3_S: every group), and the scale refitted.
* super-block scale ``d = max_scale/31`` stored as ``fp16(d*1.0125)`` (IQ3_S:
  ``fp16(d*1.033)``), 4-bit sub-block scales ``nearest_int(0.5*(scale/d - 1))``.

Layouts (per super-block of 256):

* IQ3_XXS, 98 bytes: ``d`` fp16 | 64 grid indices (8 per sub-block) | 8 x u32: bits 0-27
  four 7-bit sign groups, bits 28-31 the sub-block scale.  A super-block whose scales are
  all 0 is all zero bytes.
* IQ3_S, 110 bytes: ``d`` fp16 | ``qs[64]`` low 8 bits of the grid indices | ``qh[8]``
  (bit k of byte ib = bit 8 of index k of sub-block ib) | ``signs[32]`` | ``scales[4]``
  (two 4-bit scales per byte).  ggml advances its ``qs``/``signs`` write pointers only for
  sub-blocks that are not all zero, so the entries of the non-zero sub-blocks are packed
  to the front and the trailing slots stay zero; reproduced here (``qh`` and ``scales`` are
  indexed by sub-block and are not shifted).
"""

from __future__ import annotations

import numpy as np

from ._iqgrid import iq3_tables

F32 = np.float32
QK_K = 256

#: GROUP_MAX_EPS_IQ3_XXS: an IQ3_XXS sub-block whose largest magnitude is below it is zero
EPS_XXS = F32(1e-8)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int`` bit trick (int32), exact for every float incl. inf/NaN."""
    return ((v + F32(12582912.0)).view(np.int32) & np.int32(0x7FFFFF)) - np.int32(0x400000)


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0 (the C ``s += t[i]`` loop)."""
    s = np.zeros(terms.shape[1:], dtype=F32)
    for t in terms:
        s += t
    return s


def too_large(name: str, amax: float):
    """The error for input where ggml's neighbour search finds no candidate and ggml aborts."""
    from . import QuantError

    return QuantError(
        f"{name}: no finite distance in the grid search (|x| up to {amax:.3g} in one block: values "
        "too large, or negative importance weights): llama.cpp aborts on this input "
        "(GGML_ASSERT in iq3_find_best_neighbour)"
    )


class _Lattice:
    """ggml's ``kgrid_q3xs`` / ``kmap_q3xs`` / ``kneighbors_q3xs`` in gather-friendly form."""

    def __init__(self, name: str):
        t = iq3_tables(name)
        self.name = name
        self.kmap = t.kmap.astype(np.int64)
        self.levels = ((t.grid.astype(np.int64) - 1) // 2).astype(np.int8)  # [G, 4] in 0..7
        self.gridf = t.grid.astype(F32)  # [G, 4] 1..15
        # neighbour lists padded to a rectangle: row r is the list of off-grid code off[r]
        off = np.flatnonzero(self.kmap < 0)
        starts = -self.kmap[off] - 1
        counts = t.neighbours[starts].astype(np.int64)
        width = int(counts.max())
        idx = starts[:, None] + 1 + np.arange(width)[None, :]
        valid = np.arange(width)[None, :] < counts[:, None]
        lists = np.where(valid, t.neighbours[np.where(valid, idx, 0)].astype(np.int64), -1)
        self.row_of = np.full(self.kmap.size, -1, np.int64)
        self.row_of[off] = np.arange(off.size)
        self.lists = lists  # [M, width], -1 = padding

    def best_neighbour(self, u, xval, waux, scale):
        """``iq3_find_best_neighbour`` for off-grid codes ``u`` [m] with the group's
        ``xval``/``waux`` [4, m] and ``scale`` [m]: the grid index of smallest
        ``sum(waux*diff*diff)`` (``diff = scale*q - xval``), first one on ties."""
        cand = self.lists[self.row_of[u]]  # [m, width]
        q = self.gridf[np.maximum(cand, 0)]  # [m, width, 4]
        d2 = np.zeros(cand.shape, F32)
        for i in range(4):
            diff = scale[:, None] * q[:, :, i] - xval[i][:, None]
            d2 += (waux[i][:, None] * diff) * diff
        # C: strict '<' from FLT_MAX: NaN and values >= FLT_MAX are never taken
        d2 = np.where((cand >= 0) & (d2 < np.finfo(F32).max), d2, np.inf)
        j = np.argmin(d2, axis=1)
        r = np.arange(cand.shape[0])
        if np.isinf(d2[r, j]).any():  # no candidate: ggml's GGML_ASSERT(grid_index >= 0) aborts
            raise too_large(self.name, float(np.abs(xval[:, np.flatnonzero(np.isinf(d2[r, j]))[0]]).max()))
        return cand[r, j]

    def quantize_groups(self, L, xval, waux, id_, scale, mask):
        """Levels for the groups ``mask`` [8, B]: ``nearest_int(0.5*(id*xval - 1))`` in 0..7,
        replaced by the best neighbour at ``scale`` for codes off the grid.  Writes ``L``
        [8, 4, B] in place where ``mask``; returns whether each group was on the grid."""
        lv = np.clip(_nearest_int(F32(0.5) * (id_ * xval - F32(1))), 0, 7)  # [32, B]
        lv = lv.reshape(8, 4, -1)
        u = lv[:, 0] | (lv[:, 1] << 3) | (lv[:, 2] << 6) | (lv[:, 3] << 9)  # [8, B]
        gi = self.kmap[u]
        on = gi >= 0
        miss = ~on & mask
        if miss.any():
            k, b = np.nonzero(miss)
            xv = xval.reshape(8, 4, -1)[k, :, b].T  # [4, m]
            wa = waux.reshape(8, 4, -1)[k, :, b].T
            gi[k, b] = self.best_neighbour(u[k, b], xv, wa, scale[b])
        lv = np.where(on[:, None, :], lv, self.levels[np.maximum(gi, 0)].transpose(0, 2, 1))
        L[...] = np.where(mask[:, None, :], lv, L)
        return on


_LATTICES: dict[str, _Lattice] = {}


def _lattice(name: str) -> _Lattice:
    lat = _LATTICES.get(name)
    if lat is None:
        lat = _LATTICES[name] = _Lattice(name)
    return lat


def _fit(w, xval, L):
    """``sumqx = sum(w*xval*q)``, ``sumq2 = sum(w*q*q)`` with ``q = 2*L + 1`` (sequential)."""
    q = (2 * L.reshape(32, -1) + 1).astype(F32)
    return _seqsum((w * xval) * q), _seqsum((w * q) * q)


def _search(xc, w, *, xxs: bool):
    """The per-sub-block part of ``quantize_row_iq3_{xxs,s}_impl``.

    ``xc`` [32, B] values, ``w`` [32, B] weights.  Returns ``(scale [B], grid index [8, B],
    signs [4, B] uint8, xs [B])``; ``xs`` is False for sub-blocks ggml skips as zero
    (largest ``xval`` below 1e-8 for IQ3_XXS, exactly 0 for IQ3_S).
    """
    lat = _lattice("IQ3_XXS" if xxs else "IQ3_S")
    B = xc.shape[1]
    waux = np.sqrt(w)

    # signs and magnitudes (C: x >= 0 keeps x, so -0.0 stays -0.0)
    neg = ~(xc >= 0)
    xval = np.where(neg, -xc, xc)
    neg8 = neg.reshape(4, 8, B)
    signs = np.zeros((4, B), np.uint8)
    for i in range(8):
        signs |= neg8[:, i].astype(np.uint8) << np.uint8(i)
    if xxs:
        odd = (neg8.sum(axis=1) % 2) == 1  # [4, B]
        wx2 = ((w * xc) * xc).reshape(4, 8, B)
        vmin = wx2[:, 0].copy()
        imin = np.zeros((4, B), np.int64)
        for i in range(1, 8):  # strict '<': first smallest
            upd = wx2[:, i] < vmin
            vmin = np.where(upd, wx2[:, i], vmin)
            imin = np.where(upd, i, imin)
        flip = np.zeros((4, 8, B), bool)
        np.put_along_axis(flip, imin[:, None, :], odd[:, None, :], axis=1)
        xval = np.where(flip.reshape(32, B), -xval, xval)
        signs ^= (odd.astype(np.uint8) << imin.astype(np.uint8)).astype(np.uint8)
        signs &= np.uint8(127)

    mx = xval.max(axis=0)  # after the parity flip (IQ3_XXS): may miss the flipped value
    xs = ~(mx < EPS_XXS) if xxs else mx != 0
    mx = np.where(xs, mx, F32(1))

    scale = mx / F32(15)
    best = np.zeros(B, F32)
    L = np.zeros((8, 4, B), np.int64)
    on_grid = np.full((8, B), xxs)
    every = np.ones((8, B), bool)
    Laux = np.zeros((8, 4, B), np.int64)
    steps = range(-15, 16) if xxs else range(-9, 10)
    for is_ in steps:
        id_ = (F32(15) + F32(is_) * F32(0.2)) / mx
        this_scale = F32(1) / id_
        on = lat.quantize_groups(Laux, xval, waux, id_, this_scale, every)
        sumqx, sumq2 = _fit(w, xval, Laux)
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(upd, sumqx / np.where(upd, sumq2, F32(1)), scale)
        best = np.where(upd, scale * sumqx, best)
        L = np.where(upd[None, None, :], Laux, L)
        on_grid = np.where(upd[None, :], on, on_grid)

    need = (~on_grid).any(axis=0) & (scale > 0)
    if need.any():
        id_ = F32(1) / np.where(need, scale, F32(1))
        mask = need[None, :] & (~on_grid if xxs else True)
        lat.quantize_groups(L, xval, waux, id_, scale, mask)
        sumqx, sumq2 = _fit(w, xval, L)
        ok = need & (sumq2 > 0)
        scale = np.where(ok, sumqx / np.where(ok, sumq2, F32(1)), scale)

    negs = scale < 0  # "should never happen" in ggml: flip the scale and all signs
    scale = np.where(negs, -scale, scale)
    signs = np.where(negs[None, :], ~signs & np.uint8(127 if xxs else 255), signs).astype(np.uint8)

    u = L[:, 0] | (L[:, 1] << 3) | (L[:, 2] << 6) | (L[:, 3] << 9)
    gi = lat.kmap[u]
    if (gi < 0).any():  # ggml aborts here ("Oops: found point not on grid")
        raise AssertionError("iq3 search left a point off the grid")
    scale = np.where(xs, scale, F32(0))
    return scale, gi, signs, xs


def _prepare(xg, qw):
    """Sub-block columns ``[32, B]`` and their weights for rows ``xg`` [R, n]."""
    R, n = xg.shape
    nsb = R * n // QK_K
    blocks = xg.reshape(nsb, QK_K)
    xc = np.ascontiguousarray(xg.reshape(-1, 32).T)  # [32, B], B = 8*nsb
    if qw is not None:
        sumx2 = _seqsum(np.ascontiguousarray((blocks * blocks).T))  # [nsb]
        sigma2 = (F32(2) * sumx2) / F32(QK_K)
        sig = np.repeat(sigma2, 8)  # per sub-block
        qwc = np.tile(np.asarray(qw, F32).reshape(-1, 32), (R, 1)).T  # [32, B]
        w = qwc * np.sqrt(sig[None, :] + xc * xc)
    else:
        w = xc * xc
    return xc, w


def _sub_scales(scale, d_factor):
    """Super-block scale and 4-bit sub-block scales: ``(fp16 d [nsb], l [nsb, 8], zero [nsb])``."""
    sc = scale.reshape(-1, 8)
    max_scale = sc.max(axis=1)
    zero = max_scale == 0
    d = max_scale / F32(31)
    d16 = (d * F32(d_factor)).astype(np.float16)
    id_ = F32(1) / np.where(zero, F32(1), d)
    l = np.clip(_nearest_int(F32(0.5) * (id_[:, None] * sc - F32(1))), 0, 15)
    d16 = np.where(zero, np.float16(0), d16)
    return d16, np.where(zero[:, None], 0, l), zero


def quantize_iq3_xxs(xg, qw):
    """IQ3_XXS bytes ``[nsb, 98]`` for rows ``xg`` [R, n] (``quantize_iq3_xxs``)."""
    xc, w = _prepare(xg, qw)
    scale, gi, signs, xs = _search(xc, w, xxs=True)
    nsb = xc.shape[1] // 8
    d16, l, zero = _sub_scales(scale, 1.0125)
    gi = np.where(xs[None, :], gi, 0)
    signs = np.where(xs[None, :], signs, 0).astype(np.uint32)
    ss = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)  # [B]
    ss = ss.reshape(nsb, 8) | (l.astype(np.uint32) << np.uint32(28))
    q3 = gi.T.reshape(nsb, 64).astype(np.uint8)
    ss = np.where(zero[:, None], np.uint32(0), ss).astype("<u4")
    q3 = np.where(zero[:, None], np.uint8(0), q3)
    return np.concatenate(
        [d16.astype("<f2").view(np.uint8).reshape(nsb, 2), q3, ss.view(np.uint8).reshape(nsb, 32)], axis=1
    )


def quantize_iq3_s(xg, qw):
    """IQ3_S bytes ``[nsb, 110]`` for rows ``xg`` [R, n] (``quantize_iq3_s``)."""
    xc, w = _prepare(xg, qw)
    scale, gi, signs, xs = _search(xc, w, xxs=False)
    nsb = xc.shape[1] // 8
    d16, l, _ = _sub_scales(scale, 1.033)
    gi = gi.T.reshape(nsb, 8, 8)  # [super-block, sub-block, group]
    signs = signs.T.reshape(nsb, 8, 4)
    xs8 = xs.reshape(nsb, 8)
    # ggml's qs/signs pointers skip all-zero sub-blocks: slot = rank among the non-zero ones
    slot = np.cumsum(xs8, axis=1) - 1
    qs = np.zeros((nsb, 8, 8), np.uint8)
    sg = np.zeros((nsb, 8, 4), np.uint8)
    r, c = np.nonzero(xs8)
    qs[r, slot[r, c]] = (gi[r, c] & 255).astype(np.uint8)
    sg[r, slot[r, c]] = signs[r, c]
    hi = ((gi >> 8) & 1) * xs8[:, :, None]
    qh = np.zeros((nsb, 8), np.uint8)
    for k in range(8):
        qh |= (hi[:, :, k] << k).astype(np.uint8)
    scales = (l[:, 0::2] | (l[:, 1::2] << 4)).astype(np.uint8)
    return np.concatenate(
        [d16.astype("<f2").view(np.uint8).reshape(nsb, 2), qs.reshape(nsb, 64), qh, sg.reshape(nsb, 32), scales],
        axis=1,
    )
