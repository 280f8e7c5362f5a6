"""numpy reference for IQ2_XXS, IQ2_XS and IQ2_S: ggml's 2-bit E8-lattice quantizers, byte for byte.

Ports ``quantize_row_iq2_xxs_impl``, ``quantize_row_iq2_xs_impl`` and
``quantize_row_iq2_s_impl`` (ggml-quants.c), vectorized across sub-blocks with the
float rules of ``quant/_numpy.py`` (float32 one operation at a time in C order, sequential
sums, ``nearest_int`` bit trick).  Arrays are laid out ``(in-group index, group)``.

Common scheme (one super-block of 256 values, sub-blocks of 32 (XXS) or 16 (XS, S)):

* weights ``qw[i]*sqrtf(sigma2 + x*x)`` with ``sigma2 = sum(x*x)/256`` (IQ2_S:
  ``2*sum(x*x)/256``; IQ2_S without imatrix: ``0.25*sigma2 + x*x``).
* each group of 8 values is fitted as ``scale * sign * g`` with ``g`` a grid point
  (coordinates 1, 3, 5) and per-value signs.  XXS/XS store 7 sign bits: the 8th is implied
  by even parity, so in a group with an odd number of negatives the value with the smallest
  ``w*x*x`` (first one on ties) has its sign bit toggled and enters the fit as ``-|x|``.
* a scale search over ``id = (5 + is/10)/m``: quantize every value to ``l`` in 0..2, look
  the point up; a point off the grid is replaced by the best of its precomputed neighbours
  (``quant/_iqgrid.py``; weighted distance with ``sqrt(w)``, first minimum wins).  The trial
  with the largest ``sumqx**2/sumq2`` (strictly larger) wins, as in C.
* a last requantization with the winning scale, a scale flip if it came out negative, and
  4-bit sub-block scales ``nearest_int(0.5*(scale/d - 1))`` with ``d = max_scale/31``.
"""

from __future__ import annotations

import functools

import numpy as np

from quant import QuantError
from quant._iqgrid import iq2_tables

F32 = np.float32
QK_K = 256
_FLT_MAX = np.finfo(F32).max
_SHIFT8 = (2 * np.arange(8)).reshape(8, 1)

#: ggml aborts (``GGML_ASSERT(grid_index >= 0)`` in iq2_find_best_neighbour, or "point not
#: on grid") when every candidate distance of a neighbour search overflows float32, which
#: takes values of magnitude ~1e13 and more.  We refuse exactly those blocks.
ABORT_MESSAGE = (
    "{name}: values too large for ggml's {name} quantizer (its float32 distances overflow, "
    "|x| of ~1e13 and more); llama.cpp aborts on this tensor"
)


class _Abort(Exception):
    """A block on which ggml aborts (see ``ABORT_MESSAGE``)."""


def _refuses_aborting_blocks(name):
    def wrap(fn):
        @functools.wraps(fn)
        def kernel(xg, qw):
            try:
                return fn(xg, qw)
            except _Abort:
                raise QuantError(ABORT_MESSAGE.format(name=name)) from None

        return kernel

    return wrap


def _best_neighbour(tab, u, xv, wa, scale):
    """``iq2_find_best_neighbour`` for M off-grid points at once.

    ``u`` [M] off-grid indices, ``xv``/``wa`` [8, M] values and sqrt-weights, ``scale``
    [M].  Returns the chosen grid indices [M]: the first neighbour (in list order) with the
    smallest ``sum_i (wa*diff)*diff``, ``diff = scale*g - x``.
    """
    grid, kmap, nbrs = tab
    st = (-kmap[u] - 1).astype(np.int64)
    cnt = nbrs[st].astype(np.int64)
    seg_start = np.cumsum(cnt) - cnt
    seg = np.repeat(np.arange(u.size), cnt)
    rank = np.arange(seg.size) - seg_start[seg]
    cand = nbrs[st[seg] + 1 + rank].astype(np.int64)
    pg = grid[cand].astype(F32)  # [T, 8]
    sc = scale[seg]
    d2 = np.zeros(seg.size, F32)
    for i in range(8):
        diff = sc * pg[:, i] - xv[i][seg]
        d2 = d2 + (wa[i][seg] * diff) * diff
    d2 = np.where(d2 < _FLT_MAX, d2, np.inf)  # C starts from FLT_MAX with a strict '<' (NaN never wins)
    mins = np.minimum.reduceat(d2, seg_start)
    first = np.minimum.reduceat(np.where(d2 == mins[seg], np.arange(seg.size), seg.size), seg_start)
    if not (mins < np.inf).all():
        raise _Abort
    return cand[first]


def _fit_groups(tab, L, xv, wa, scale, groups):
    """Put the 8-groups of ``L`` [gs, P] (levels 0..2) on the grid where ``groups[k]`` [P]
    is set: a point off the grid is replaced, in place, by its best neighbour for
    ``xv``/``wa`` at ``scale`` [P].  Returns per group ``k`` whether the point was on the grid
    (C's ``is_on_grid_aux``)."""
    grid, kmap, _ = tab
    on = []
    for k, mask in enumerate(groups):
        sl = slice(8 * k, 8 * k + 8)
        u = (L[sl] << _SHIFT8).sum(axis=0)
        gi = kmap[np.minimum(u, kmap.size - 1)].astype(np.int64)  # u of unflagged groups may be anything
        off = mask & (gi < 0)
        if off.any():
            best = _best_neighbour(tab, u[off], xv[sl][:, off], wa[sl][:, off], scale[off])
            L[sl, off] = (grid[best].T.astype(np.int32) - 1) // 2
            gi[off] = best
        on.append(~off)
    return on


def _quantize_l(xv, id_):
    """``clamp(nearest_int(0.5f*(id*x - 1)), 0, 2)``."""
    return np.clip(_ref._nearest_int(F32(0.5) * (id_ * xv - F32(1))), 0, 2).astype(np.int32)


def _sums(w, xv, L):
    """Sequential ``sumqx += w*x*q``, ``sumq2 += w*q*q`` with ``q = 2*L + 1``."""
    sumqx = np.zeros(xv.shape[1], F32)
    sumq2 = np.zeros(xv.shape[1], F32)
    for i in range(xv.shape[0]):
        q = (2 * L[i] + 1).astype(F32)
        sumqx = sumqx + (w[i] * xv[i]) * q
        sumq2 = sumq2 + (w[i] * q) * q
    return sumqx, sumq2


def _signs(xc, w, parity):
    """``xval = |x|`` (``-0.0`` kept: ``x >= 0`` holds for it) and sign bits per 8-group.

    ``parity``: an odd count of negatives flips back the value with the smallest ``w*x*x``
    (strict ``<``, first on ties), which then enters the fit as ``-|x|``; 7 bits are kept.
    Returns ``xval`` [gs, P] and ``signs`` [gs/8, P] (uint8).
    """
    neg = ~(xc >= 0)
    xval = np.where(neg, -xc, xc)
    gs, P = xc.shape
    signs = []
    for k in range(gs // 8):
        sl = slice(8 * k, 8 * k + 8)
        s = (neg[sl].astype(np.int32) << np.arange(8)[:, None]).sum(axis=0)
        if parity:
            odd = neg[sl].sum(axis=0) % 2 == 1
            imin = np.zeros(P, np.int64)
            mn = (w[8 * k] * xc[8 * k]) * xc[8 * k]
            for i in range(1, 8):
                ax = (w[8 * k + i] * xc[8 * k + i]) * xc[8 * k + i]
                lt = ax < mn
                mn = np.where(lt, ax, mn)
                imin = np.where(lt, i, imin)
            cols = np.flatnonzero(odd)
            xval[8 * k + imin[cols], cols] = -xval[8 * k + imin[cols], cols]
            s = np.where(odd, s ^ (1 << imin), s) & 127
        signs.append(s)
    return xval, np.array(signs, dtype=np.int64).reshape(gs // 8, P)


def _group_max(xval):
    """``max = x[0]; max = MAX(max, x[i])`` (``a > b ? a : b``)."""
    mx = xval[0].copy()
    for i in range(1, xval.shape[0]):
        mx = np.where(mx > xval[i], mx, xval[i])
    return mx


def _weights(blocks, qw, gs, *, s_type):
    """Per-value weights ``[gs, P]`` and the values ``[gs, P]`` of the sub-blocks of ``blocks``."""
    NB = blocks.shape[0]
    sumx2 = _ref._seqsum(_ref._columns(blocks * blocks))
    sigma2 = (F32(2) * sumx2) / F32(QK_K) if s_type else sumx2 / F32(QK_K)
    xc = _ref._columns(blocks.reshape(-1, gs))  # column p = sub-block p (super-block p // (256/gs))
    sg = np.repeat(sigma2, QK_K // gs)
    if qw is None:
        w = F32(0.25) * sg + xc * xc
    else:
        nsb = qw.size // QK_K
        qwc = np.tile(qw.reshape(-1, gs), (NB // nsb, 1)).T
        w = qwc * np.sqrt(sg + xc * xc)
    return xc, w


def _search(tab, xv, w, wa, scale, lo, hi, denom, active, L0=None):
    """The common scale search over ``is = lo..hi``: ``id = (5 + is*0.1f)/denom``.

    Returns the scale, the levels and the on-grid flags per 8-group of the winning trial
    (the initial ``scale``, levels ``L0`` (default 0) and all-on-grid where no trial won).
    """
    gs, P = xv.shape
    ng = gs // 8
    L = np.zeros((gs, P), np.int32) if L0 is None else L0.astype(np.int32)
    on_grid = np.ones((ng, P), bool)
    best = np.zeros(P, F32)
    safe = np.where(active, denom, F32(1))
    for step in range(lo, hi + 1):
        id_ = (F32(5) + F32(step) * F32(0.1)) / safe
        this_scale = F32(1) / id_
        Laux = _quantize_l(xv, id_)
        on = _fit_groups(tab, Laux, xv, wa, this_scale, [active] * ng)
        sumqx, sumq2 = _sums(w, xv, Laux)
        acc = active & (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if acc.any():
            new_scale = sumqx / np.where(acc, sumq2, F32(1))
            scale = np.where(acc, new_scale, scale)
            best = np.where(acc, new_scale * sumqx, best)
            L = np.where(acc, Laux, L)
            on_grid = np.where(acc, np.array(on), on_grid)
    return scale, L, on_grid


def _refit(tab, xv, w, wa, scale, L, groups):
    """Requantize the groups flagged in ``groups`` [ng, P] at ``scale`` and refit the scale
    (``scale = sumqx/sumq2`` where ``sumq2 > 0``) for the columns with any flagged group."""
    any_ = groups.any(axis=0)
    id_ = F32(1) / np.where(any_, scale, F32(1))
    Lnew = _quantize_l(xv, id_)
    for k in range(groups.shape[0]):
        sl = slice(8 * k, 8 * k + 8)
        L[sl] = np.where(groups[k], Lnew[sl], L[sl])
    _fit_groups(tab, L, xv, wa, np.where(any_, scale, F32(1)), list(groups))
    sumqx, sumq2 = _sums(w, xv, L)
    ok = any_ & (sumq2 > 0)
    return np.where(ok, sumqx / np.where(ok, sumq2, F32(1)), scale)


def _grid_index(tab, L):
    """Grid index of every 8-group of ``L`` [gs, P] -> [gs/8, P].

    ``u`` is built as C does from ``int8_t`` levels into a ``uint16_t``.  Levels are 0..2
    except after a NaN scale, where IQ2_XXS keeps ``make_qp_quants``' levels (``uint8_t``
    values, negative ones wrapped); a ``u`` outside the map or off the grid is where ggml
    aborts (or reads past its map), and is refused.
    """
    kmap = tab[1]
    out = []
    for k in range(L.shape[0] // 8):
        l8 = L[8 * k : 8 * k + 8].astype(np.uint8).view(np.int8).astype(np.int64)
        u = np.bitwise_or.reduce(l8 << _SHIFT8, axis=0) & 0xFFFF
        inside = u < kmap.size
        out.append(np.where(inside, kmap[np.where(inside, u, 0)], -1))
    gi = np.array(out, dtype=np.int64)
    if not (gi >= 0).all():
        raise _Abort
    return gi


def _superblock_scales(scales, NB, mult=None):
    """``max_scale`` (``MAX`` from 0), ``d = max_scale/31`` as fp16 (times ``mult`` for
    IQ2_S), and the 4-bit scales ``clamp(nearest_int(0.5f*(scale/d... - 1)), 0, 15)``."""
    s = scales.reshape(NB, -1)
    mx = np.zeros(NB, F32)
    for j in range(s.shape[1]):
        mx = np.where(mx > s[:, j], mx, s[:, j])
    nz = mx != 0
    d = np.where(nz, mx, F32(31)) / F32(31)
    d16 = _ref._fp16(np.where(nz, d if mult is None else d * F32(mult), F32(0)))
    id_ = F32(1) / d
    ls = np.clip(_ref._nearest_int(F32(0.5) * (id_[:, None] * s - F32(1))), 0, 15)
    return nz, d16, np.where(nz[:, None], ls, 0)


def _finish_scale(scale, signs, mask127):
    """``if (scale < 0) { scale = -scale; signs = ~signs (& 127) }``."""
    neg = scale < 0
    scale = np.where(neg, -scale, scale)
    signs = np.where(neg, ~signs & mask127, signs)
    return scale, signs


@_refuses_aborting_blocks("IQ2_XXS")
def iq2_xxs(xg, qw):
    """IQ2_XXS (66 bytes / 256): ``d`` fp16 | ``qs`` 8 x (4 grid bytes, uint32 signs+scale).

    Per sub-block of 32: ``aux32[0]`` = four 8-bit indices into the 256-point grid,
    ``aux32[1]`` = four 7-bit sign groups (bits 0..27) | 4-bit scale << 28.  The scale
    search starts from ``make_qp_quants(32, 4, xval, ., w)`` (``eff_max = 3*scale``) and tries
    ``is = -6..6``; groups with ``max < 1e-15`` or ``eff_max <= 0`` are left zero; then every
    group is requantized with the found scale.  An all-zero super-block is all zero bytes.
    """
    tab = iq2_tables("IQ2_XXS")
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    xc, w = _weights(blocks, qw, 32, s_type=False)
    wa = np.sqrt(w)
    xv, signs = _signs(xc, w, parity=True)
    mx = _group_max(xv)
    active = ~(mx < _ref.GROUP_MAX_EPS)
    qp_scale, qp_L = _ref._make_qp_quants(xv, 4, w)
    eff_max = qp_scale * F32(3)
    active &= ~(eff_max <= 0)
    scale, L, _ = _search(tab, xv, w, wa, qp_scale, -6, 6, eff_max, active, L0=qp_L)
    pos = active & (scale > 0)
    scale = _refit(tab, xv, w, wa, scale, L, np.repeat(pos[None], 4, axis=0))
    scale, signs = _finish_scale(scale, signs, 127)
    scale = np.where(active, scale, F32(0))
    gi = np.where(active, _grid_index(tab, np.where(active, L, 0)), 0)
    nz, d16, ls = _superblock_scales(scale, NB)
    a0 = gi[0] | (gi[1] << 8) | (gi[2] << 16) | (gi[3] << 24)
    a1 = np.where(active, signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21), 0)
    a0 = a0.reshape(NB, 8)
    a1 = a1.reshape(NB, 8) | (ls.astype(np.int64) << 28)
    q = np.stack([a0, a1], axis=2).reshape(NB, 16)
    q = np.where(nz[:, None], q, 0).astype(np.uint32)
    return _ref._bytes(d16[:, None], q)


def _xs_or_s(xg, qw, name):
    """Sub-blocks of 16 (two 8-groups) for IQ2_XS and IQ2_S: search ``is = -9..9`` from
    ``scale = max/5``; groups left off the grid by the winning trial are requantized."""
    tab = iq2_tables(name)
    s_type = name == "IQ2_S"
    blocks = xg.reshape(-1, QK_K)
    xc, w = _weights(blocks, qw, 16, s_type=s_type)
    wa = np.sqrt(w)
    xv, signs = _signs(xc, w, parity=not s_type)
    mx = _group_max(xv)
    active = ~(mx < (F32(1e-8) if s_type else _ref.GROUP_MAX_EPS))
    scale0 = mx / F32(5)
    scale, L, on_grid = _search(tab, xv, w, wa, scale0, -9, 9, mx, active)
    redo = ~on_grid & (active & (scale > 0))[None]
    scale = _refit(tab, xv, w, wa, scale, L, redo)
    scale, signs = _finish_scale(scale, signs, 127 if not s_type else 255)
    scale = np.where(active, scale, F32(0))
    gi = np.where(active, _grid_index(tab, np.where(active, L, 0)), 0)
    return scale, gi, np.where(active, signs, 0)


def _pack_nib(ls, NB):
    ls = ls.reshape(NB, 8, 2)
    return (ls[:, :, 0] | (ls[:, :, 1] << 4)).astype(np.uint8)


@_refuses_aborting_blocks("IQ2_XS")
def iq2_xs(xg, qw):
    """IQ2_XS (74 bytes / 256): ``d`` fp16 | ``qs`` 32 uint16 | ``scales[8]``.

    ``qs[2*ib + k]`` = 9-bit index into the 512-point grid | 7 sign bits << 9, for the two
    8-groups of sub-block ``ib`` (16 values); ``scales[j]`` = 4-bit scales of sub-blocks
    2j and 2j+1.  An all-zero super-block is all zero bytes.
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    scale, gi, signs = _xs_or_s(xg, qw, "IQ2_XS")
    nz, d16, ls = _superblock_scales(scale, NB)
    q = (gi | (signs << 9)).T.reshape(NB, 32)  # [P, 2] -> 2*ib + k
    q = np.where(nz[:, None], q, 0).astype(np.uint16)
    return _ref._bytes(d16[:, None], q, _pack_nib(ls, NB))


@_refuses_aborting_blocks("IQ2_S")
def iq2_s(xg, qw):
    """IQ2_S (82 bytes / 256): ``d`` fp16 | ``qs[32]`` low index bytes | ``signs[32]`` |
    ``qh[8]`` | ``scales[8]``.

    ``i8 = 2*ib + k`` indexes the 8-groups; the grid index (1024 points) is split into
    ``qs[i8]`` (low 8 bits) and 2 bits at ``qh[i8/4] >> 2*(i8%4)``; all 8 signs are stored.
    Without imatrix the weights are ``0.25*sigma2 + x*x``.  ``d`` is ``fp16(max_scale/31 *
    0.9875)`` while the 4-bit scales use the unscaled ``max_scale/31``.  Unlike XXS/XS, a
    super-block whose scales are all 0 keeps the indices and signs written for it (d = 0).
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    scale, gi, signs = _xs_or_s(xg, qw, "IQ2_S")
    nz, d16, ls = _superblock_scales(scale, NB, mult=0.9875)
    gi = gi.T.reshape(NB, 32)
    qs = (gi & 255).astype(np.uint8)
    hi = (gi >> 8).reshape(NB, 8, 4)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).astype(np.uint8)
    sg = signs.T.reshape(NB, 32).astype(np.uint8)
    return _ref._bytes(d16[:, None], qs, sg, qh, _pack_nib(ls, NB))


#: name -> (block size, bytes per block, kernel) for ``quant._numpy._KERNELS``
KERNELS = {
    "IQ2_XXS": (QK_K, 66, iq2_xxs),
    "IQ2_XS": (QK_K, 74, iq2_xs),
    "IQ2_S": (QK_K, 82, iq2_s),
}

# Imported last: quant._numpy registers KERNELS when it is imported, whichever module loads first.
from quant import _numpy as _ref  # noqa: E402
