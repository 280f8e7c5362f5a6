"""numpy reference backend: ggml's block quantizers, byte for byte, vectorized across blocks.

This is the readable reference the other backends (``_numba``, ``_torch``) are checked
against.  Every function below names the routine of ``ggml/src/ggml-quants.c`` it ports.

How byte identity with ggml (x86-64 build, no FMA in ``ggml-base``) is kept:

* float32 only, one IEEE operation at a time, in the C evaluation order:
  ``w*x*l`` is ``(w*x)*l``, ``a*L + m - x`` is ``((a*L)+m)-x``; Python scalars are wrapped in
  ``np.float32`` so nothing is promoted to float64.
* Sums are sequential (``s = 0; s += t[0]; s += t[1]; ...``) via ``_seqsum``; numpy's
  ``sum`` is pairwise and would round differently.
* Data are laid out ``(in-block index, block)`` so the loop over the 16/32 elements of a
  block, or over the steps of a search, is a short Python loop of vector operations over
  thousands of blocks at once; the per-block branches of the C code become masks.
* ``nearest_int`` is the exact bit trick of ggml (add 1.5*2**23, keep the mantissa), so
  it also agrees with C outside the asserted range and on inf/NaN.
* Float -> integer casts of the legacy types (``(int8_t)(x + 8.5f)``, ``roundf`` stored to
  int8, ``(uint8_t)(x + 0.5f)``) are done as x86-64 does them: truncate to int32, with
  NaN and out-of-range giving INT_MIN, then keep the low byte (``_cvt_i32``).  In C these
  casts are undefined for inf/NaN; they only happen for blocks whose largest magnitude is
  below ~1e-37 (the reciprocal of the scale overflows).  We reproduce x86-64 ggml for
  them on every platform (see docs/quant.md).
* fp32 -> fp16 is ``astype(np.float16)`` (round to nearest even, identical to
  ``GGML_FP32_TO_FP16`` for every finite value).

Rows are processed in groups of about ``GROUP_ELEMS`` values, so temporaries stay small
whatever the tensor size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._numpy_iq3 import quantize_iq3_s, quantize_iq3_xxs

F32 = np.float32
_I32_MIN = np.int32(-(2**31))

#: Approximate number of float32 values quantized per vectorized group.
GROUP_ELEMS = 1 << 18

QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


# --------------------------------------------------------------------------- helpers


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int``: ``bits(v + 12582912.0f) & 0x7FFFFF) - 0x400000`` (int32).

    Round half to even for |v| < 2**22; bit-exact with C for every float, inf and NaN.
    """
    return ((v + F32(12582912.0)).view(np.int32) & np.int32(0x7FFFFF)) - np.int32(0x400000)


def _cvt_i32(v: np.ndarray) -> np.ndarray:
    """C float -> int conversion as x86-64 executes it (``cvttss2si``).

    Truncates toward zero; NaN and values outside the int32 range give INT_MIN.
    """
    ok = np.abs(v) < F32(2147483648.0)  # False for NaN and inf
    t = np.where(ok, v, F32(0)).astype(np.int32)
    return np.where(ok, t, _I32_MIN)


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0, as the C loop ``float s = 0; s += t[i]``."""
    s = np.zeros(terms.shape[1:], dtype=F32)
    for t in terms:
        s += t
    return s


def _fp16(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` (round to nearest even) as float16."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def _u8(a: np.ndarray) -> np.ndarray:
    """Integer -> ``uint8_t`` as C converts it (modulo 256)."""
    return a.astype(np.int32).astype(np.uint8)


def _bytes(*fields: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields (each ``[nblocks, ...]``) into ``[nblocks, type_size]`` bytes."""
    nb = fields[0].shape[0]
    return np.concatenate([np.ascontiguousarray(f).view(np.uint8).reshape(nb, -1) for f in fields], axis=1)


def _columns(blocks: np.ndarray) -> np.ndarray:
    """``[nblocks, n]`` -> contiguous ``[n, nblocks]`` (in-block index first)."""
    return np.ascontiguousarray(blocks.T)


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """Whole-row ``sigma2 = (sum of x*x over the row) / n_per_row`` (legacy ``_impl`` paths).

    ``np.add.accumulate`` along a row is the sequential C sum; adding ``+0.0f`` at the
    end gives the sign of zero that ``0.0f + ...`` gives in C.
    """
    x2 = x * x
    s = np.add.accumulate(x2, axis=1, dtype=F32)[:, -1] + F32(0)
    return s / F32(x.shape[1])


# --------------------------------------------------------------------------- search kernels


def _make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray):
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for many groups at once.

    ``x``, ``w``: ``[n, G]`` float32 (``w`` = ``qw`` or ``x*x``).  Returns
    ``(scale [G], L [n, G] int32 in 0..2*nmax-1)``: symmetric fit ``x ~ scale*(L - nmax)``,
    a scan of 18 scales around ``-nmax/max`` maximising ``sumlx**2/suml2``.
    All-zero groups (``amax < 1e-15``) give ``scale = 0`` and ``L = 0``.
    """
    n = x.shape[0]
    amax = np.zeros(x.shape[1:], F32)
    mx = np.zeros(x.shape[1:], F32)
    for i in range(n):  # strict '>' keeps the first index of the largest |x| and its sign
        ax = np.abs(x[i])
        upd = ax > amax
        amax = np.where(upd, ax, amax)
        mx = np.where(upd, x[i], mx)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    wx = w * x  # C: w*x[i]*l == (w*x[i])*l

    def fit(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l, _seqsum(wx * lf), _seqsum((w * lf) * lf)

    L, sumlx, suml2 = fit(F32(-nmax) / mx)
    nz = suml2 != 0
    scale = np.where(nz, sumlx / np.where(nz, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        l, sumlx, suml2 = fit(iscale)
        acc = (suml2 > 0) & ((sumlx * sumlx) > (best * suml2))
        L = np.where(acc, l, L)
        scale = np.where(acc, sumlx / np.where(acc, suml2, F32(1)), scale)
        best = np.where(acc, scale * sumlx, best)
    L = np.where(zero, 0, L + nmax)
    return np.where(zero, F32(0), scale), L


def _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, *, le, mad=False):
    """ggml ``make_qkx2_quants`` (``le=False``) / ``make_qkx3_quants`` (``le=True``).

    Weighted asymmetric fit ``x ~ scale*L + min``, ``L`` in ``0..nmax``, ``min <= 0``, for
    ``[n, G]`` groups.  Returns ``(scale [G], the_min [G] (= -min), L [n, G] int32)``.

    The search over ``is = 0..nstep`` tries ``iscale = (rmin + rdelta*is + nmax)/(max - min)``
    and keeps a candidate only if its weighted error (squared, or absolute with ``mad``,
    ggml's ``use_mad``) is strictly smaller.  As in C,
    an accepted candidate's ``min`` replaces the running ``min`` used by the later steps.
    Degenerate groups (``max == min``; ``max <= min`` for qkx3) give ``L = 0``, scale 0.
    """
    n = x.shape[0]
    mn = x[0].copy()
    mx = x[0].copy()
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        xi = x[i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * xi
    mn = np.where(mn > 0, F32(0), mn)
    degen = (mx <= mn) if le else (mx == mn)
    mn0 = mn

    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = (scale * L.astype(F32) + mn) - x
    best = _seqsum(w * (np.abs(diff) if mad else diff * diff))

    for step in range(nstep + 1):
        num = (F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)
        iscale = num / (mx - mn)
        laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = laux.astype(F32)
        wl = w * lf
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * lf)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, F32(1)), this_scale)
        diff = (this_scale * lf + this_min) - x
        cur = _seqsum(w * (np.abs(diff) if mad else diff * diff))
        acc = ok & (cur < best)
        L = np.where(acc, laux, L)
        best = np.where(acc, cur, best)
        scale = np.where(acc, this_scale, scale)
        mn = np.where(acc, this_min, mn)

    L = np.where(degen, 0, L)
    scale = np.where(degen, F32(0), scale)
    mn = np.where(degen, mn0, mn)
    return scale, -mn, L


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray):
    """ggml ``make_qp_quants(n, nmax, x, L, quant_weights)``: fit a non-negative vector.

    Used by the Q4_K/Q5_K imatrix paths to turn the 8 sub-block scales (and mins) into
    6-bit integers.  ``x``, ``w``: ``[n, G]``.  Returns ``(scale [G], L [n, G] uint8)``.
    Steps: ``iscale = nmax/max``; try 8 nearby iscales by weighted MSE; then up to 5
    coordinate-descent passes moving single ``L[i]`` while ``sumlx**2/suml2`` improves.
    ``L`` is ``uint8_t`` in C, so negative intermediate values wrap (kept here).
    """
    n = x.shape[0]
    mx = np.zeros(x.shape[1:], F32)
    for i in range(n):  # MAX(a,b) = a > b ? a : b
        mx = np.where(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)

    iscale = F32(nmax) / mx
    L0 = _u8(_nearest_int(iscale * x)).astype(F32)
    scale = F32(1) / iscale
    diff = x - scale * L0
    best = _seqsum((w * diff) * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
        scale_is = F32(1) / iscale_is
        l = np.minimum(nmax, _nearest_int(iscale_is * x))
        diff = x - scale_is * l.astype(F32)
        mse = _seqsum((w * diff) * diff)
        acc = mse < best
        best = np.where(acc, mse, best)
        iscale = np.where(acc, iscale_is, iscale)

    l = np.minimum(nmax, _nearest_int(iscale * x))
    lf = l.astype(F32)
    L = _u8(l)
    wx = w * x
    sumlx = _seqsum(wx * lf)
    suml2 = _seqsum((w * lf) * lf)
    # A pass that changes nothing leaves the state as it was, so always running the
    # 5 passes equals C's early exit.
    for _ in range(5):
        for i in range(n):
            Li = L[i].astype(F32)
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - (w[i] * Li) * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, _nearest_int((x[i] * sl2) / np.where(ok, slx, F32(1))))
            ok &= new_l != L[i].astype(np.int32)
            nl = new_l.astype(F32)
            slx = slx + wx[i] * nl
            sl2 = sl2 + (w[i] * nl) * nl
            acc = ok & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[i] = np.where(acc, _u8(new_l), L[i])
            sumlx = np.where(acc, slx, sumlx)
            suml2 = np.where(acc, sl2, suml2)
    pos = suml2 > 0
    out = np.where(pos, sumlx / np.where(pos, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), out), np.where(zero, np.uint8(0), L)


def _make_q3_quants(x: np.ndarray, nmax: int):
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for ``[n, G]`` groups.

    Symmetric fit ``x ~ scale*(L - nmax)`` with weights ``x*x``: start from
    ``iscale = -nmax/max`` (``max`` the signed value of the first largest |x|), then up to
    5 coordinate-descent passes moving single ``L[i]`` (in ``-nmax..nmax-1``) while
    ``sumlx**2/suml2`` improves.  Returns ``(scale [G], L [n, G] int32 in 0..2*nmax-1)``;
    all-zero groups (``amax < 1e-15``) give ``scale = 0`` and ``L = 0``.
    """
    n = x.shape[0]
    mx = _amax_signed(x)  # strict '>' from 0: NaN never wins, so amax == |mx|
    zero = np.abs(mx) < GROUP_MAX_EPS
    iscale = F32(-nmax) / np.where(zero, F32(1), mx)
    L = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x  # C: w*x[i]*l == (w*x[i])*l
    lf = L.astype(F32)
    sumlx = _seqsum(wx * lf)
    suml2 = _seqsum((w * lf) * lf)
    # As in _make_qp_quants, always running the 5 passes equals C's early exit.
    for _ in range(5):
        for i in range(n):
            Li = L[i].astype(F32)
            slx = sumlx - wx[i] * Li
            ok = slx > 0  # guards the division below (NaN/inf otherwise)
            sl2 = suml2 - (w[i] * Li) * Li
            new_l = np.clip(_nearest_int((x[i] * sl2) / np.where(ok, slx, F32(1))), -nmax, nmax - 1)
            ok &= new_l != L[i]
            nl = new_l.astype(F32)
            slx = slx + wx[i] * nl
            sl2 = sl2 + (w[i] * nl) * nl
            acc = ok & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[i] = np.where(acc, new_l, L[i])
            sumlx = np.where(acc, slx, sumlx)
            suml2 = np.where(acc, sl2, suml2)
    pos = suml2 > 0
    scale = np.where(pos, sumlx / np.where(pos, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


# --------------------------------------------------------------------------- legacy 32-blocks


def _amax_signed(xc: np.ndarray) -> np.ndarray:
    """Signed value of the largest |x| (first occurrence, strict ``amax < |v|`` from 0)."""
    amax = np.zeros(xc.shape[1:], F32)
    mx = np.zeros(xc.shape[1:], F32)
    for v in xc:
        av = np.abs(v)
        upd = amax < av
        amax = np.where(upd, av, amax)
        mx = np.where(upd, v, mx)
    return mx


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """32 quants ``[32, B]`` -> ``qs[16]`` with ``qs[j] = q[j] & 15 | (q[j+16] & 15) << 4``."""
    q = q.astype(np.uint8)
    return ((q[:16] & 15) | ((q[16:] & 15) << 4)).T


def _pack_qh32(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 quants -> little-endian ``uint32 qh`` (bit j = quant j)."""
    bits = (q.astype(np.uint32) >> 4) & 1
    qh = np.zeros(q.shape[1:], np.uint32)
    for j in range(32):
        qh |= bits[j] << np.uint32(j)
    return qh.astype("<u4")[:, None]


def _q8_0(xg, qw):
    """``quantize_row_q8_0_ref`` (imatrix ignored), using gguf-py's bit-exact ``Q8_0``.

    Block (34 bytes): ``d`` fp16 = amax/127 | ``qs[32]`` int8 = roundf(x * (1/d)), where the
    unrounded ``d`` is used for quantizing.
    """
    from gguf.quants import Q8_0

    blocks = xg.reshape(-1, 32)
    with np.errstate(all="ignore"):
        out = Q8_0.quantize_blocks(blocks)
        # Blocks with amax < ~3.7e-37: 1/d overflows, x*id is inf/NaN and C's (int8) cast
        # is undefined; store what x86-64 ggml stores (low byte of INT_MIN = 0).
        d = np.abs(blocks).max(axis=1) / F32(127)
        bad = (d != 0) & ~np.isfinite(F32(1) / d)
        if bad.any():
            id_ = F32(1) / d[bad]
            out[bad, 2:] = _cvt_i32(blocks[bad] * id_[:, None]).astype(np.uint8)
    return out


def _q4_0_q5_0_ref(xg, nbits):
    """``quantize_row_q4_0_ref`` / ``quantize_row_q5_0_ref``.

    ``d = max / -8`` (-16) with ``max`` the signed largest-magnitude value;
    ``q = MIN(15, (int8_t)(x*id + 8.5f))`` (31 and 16.5f).  An all-zero block stores
    ``d = -0.0`` and q = 8 (16).
    """
    xc = _columns(xg.reshape(-1, 32))
    half = 1 << (nbits - 1)
    qmax = (1 << nbits) - 1
    mx = _amax_signed(xc)
    d = mx / F32(-half)
    nz = d != 0
    id_ = np.where(nz, F32(1) / np.where(nz, d, F32(1)), F32(0))
    q = _cvt_i32(xc * id_ + F32(half + 0.5)).astype(np.int8)
    q = _u8(np.minimum(qmax, q.astype(np.int32)))
    return _fp16(d)[:, None], q


def _q4_0(xg, qw):
    """Q4_0 block (18 bytes): ``d`` fp16 | ``qs[16]``: ``q[j] | q[j+16] << 4``; x = d*(q-8).

    No imatrix: ``quantize_row_q4_0_ref``.  With imatrix: ``quantize_row_q4_0_impl``:
    ``sigma2`` over the whole row, weights ``qw*sqrtf(sigma2 + x*x)``,
    ``d = make_qx_quants(32, 8, ...)``, quants stored as found (no requantization).
    """
    if qw is None:
        d16, q = _q4_0_q5_0_ref(xg, 4)
    else:
        d16, q = _legacy_qx_impl(xg, qw, 8)
    return _bytes(d16, _pack_nibbles(q))


def _q5_0(xg, qw):
    """Q5_0 block (22 bytes): ``d`` fp16 | ``qh`` u32 (bit j = bit 4 of q[j]) | ``qs[16]`` low nibbles.

    x = d*(q-16).  ``quantize_row_q5_0_ref`` / ``quantize_row_q5_0_impl`` (nmax 16).
    """
    if qw is None:
        d16, q = _q4_0_q5_0_ref(xg, 5)
    else:
        d16, q = _legacy_qx_impl(xg, qw, 16)
    return _bytes(d16, _pack_qh32(q), _pack_nibbles(q))


def _legacy_qx_impl(xg, qw, nmax):
    """Shared part of ``quantize_row_q4_0_impl`` / ``_q5_0_impl`` for whole rows ``[R, n]``:
    ``sigma2 = sum(x*x)/n`` per row, weights ``qw*sqrtf(sigma2 + x*x)``,
    ``make_qx_quants(32, nmax, x, L, 1, weights)``.  Returns ``(fp16 d [B, 1], L [32, B])``.
    """
    sigma2 = _row_sigma2(xg)  # [R]
    R, n = xg.shape
    nb = n // 32
    xc = _columns(xg.reshape(-1, 32))
    qwc = np.tile(qw.reshape(nb, 32), (R, 1)).T
    s2 = np.repeat(sigma2, nb)
    w = qwc * np.sqrt(s2 + xc * xc)
    scale, L = _make_qx_quants(xc, nmax, w)
    return _fp16(scale)[:, None], L


def _q4_1_q5_1(xg, qw, nbits):
    """Shared part of Q4_1 (``nbits`` 4) and Q5_1 (5): ``(fp16 d [B], fp16 m [B], q [32, B])``.

    No imatrix: ``quantize_row_q4_1_ref`` / ``_q5_1_ref``: block min/max (sequential, so an
    all-zero block keeps the sign of its first zero in ``m``), ``d = (max-min)/qmax``,
    ``id = d ? 1/d : 0``; Q4_1 stores ``MIN(15, (int8_t)((x-min)*id + 0.5f))``, Q5_1
    ``(uint8_t)((x-min)*id + 0.5f)`` unclamped.
    With imatrix: ``quantize_row_q4_1_impl`` / ``_q5_1_impl``: whole-row ``sigma2``,
    ``make_qkx3_quants(32, qmax, x, qw*sqrtf(sigma2+x*x), -0.9, 0.05, 36)``, ``m = -the_min``.
    """
    R, n = xg.shape
    qmax = (1 << nbits) - 1
    xc = _columns(xg.reshape(-1, 32))
    if qw is None:
        mn = np.full(xc.shape[1:], np.finfo(F32).max, F32)
        mx = np.full(xc.shape[1:], -np.finfo(F32).max, F32)
        for v in xc:
            mn = np.where(v < mn, v, mn)
            mx = np.where(v > mx, v, mx)
        d = (mx - mn) / F32(qmax)
        nz = d != 0
        id_ = np.where(nz, F32(1) / np.where(nz, d, F32(1)), F32(0))
        q = _cvt_i32((xc - mn) * id_ + F32(0.5))
        if nbits == 4:
            q = np.minimum(15, q.astype(np.int8).astype(np.int32))
        return _fp16(d), _fp16(mn), _u8(q)
    nb = n // 32
    sigma2 = np.repeat(_row_sigma2(xg), nb)
    qwc = np.tile(qw.reshape(nb, 32), (R, 1)).T
    w = qwc * np.sqrt(sigma2 + xc * xc)
    scale, the_min, q = _make_qkx_quants(xc, w, qmax, -0.9, 0.05, 36, le=True)
    return _fp16(scale), _fp16(-the_min), q


def _q4_1(xg, qw):
    """Q4_1 block (20 bytes): ``d`` fp16 | ``m`` fp16 | ``qs[16]``: ``q[j] | q[j+16] << 4``; x = d*q + m."""
    d16, m16, q = _q4_1_q5_1(xg, qw, 4)
    return _bytes(d16[:, None], m16[:, None], _pack_nibbles(q))


def _q5_1(xg, qw):
    """Q5_1 block (24 bytes): ``d`` fp16 | ``m`` fp16 | ``qh`` u32 | ``qs[16]``; x = d*q + m."""
    d16, m16, q = _q4_1_q5_1(xg, qw, 5)
    return _bytes(d16[:, None], m16[:, None], _pack_qh32(q), _pack_nibbles(q))


# --------------------------------------------------------------------------- K-quants


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins ``[NB, 8]`` (uint8) into ``scales[12]`` as ggml does.

    ::

        byte j   (j<4):  ls_j           | (ls_{j+4} >> 4) << 6
        byte 4+j (j<4):  lm_j           | (lm_{j+4} >> 4) << 6
        byte 8+j (j<4):  ls_{j+4} & 0xF | (lm_{j+4} & 0xF) << 4
    """
    s = np.zeros((ls.shape[0], 12), np.uint8)
    s[:, 0:4] = ls[:, :4]
    s[:, 4:8] = lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return s


def _unpack_scales_k4(s: np.ndarray):
    """ggml ``get_scale_min_k4`` for j = 0..7 -> ``(sc [NB, 8], m [NB, 8])`` uint8."""
    sc = np.empty((s.shape[0], 8), np.uint8)
    m = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _k_requantize(xc, L, scales12, d16, dmin16, nmax):
    """Final pass of ``quantize_row_q4_K_ref``/``_q5_K_ref``/``_impl``: requantize each sub-block
    with the stored fp16 ``d``/``dmin`` and 6-bit ``sc``/``m``:
    ``L = clamp(nearest_int((x + dmin*m)/(d*sc)), 0, nmax)``; a sub-block with
    ``d*sc == 0`` keeps the L of the search.
    """
    sc, m = _unpack_scales_k4(scales12)
    d = (d16.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    dm = (dmin16.astype(F32)[:, None] * m.astype(F32)).reshape(-1)
    skip = d == 0
    lr = np.clip(_nearest_int((xc + dm) / np.where(skip, F32(1), d)), 0, nmax)
    return np.where(skip, L, lr)


def _k_search(blocks, qw, nmax, rmin, rdelta, nstep):
    """Scales/mins search of Q4_K/Q5_K for ``[NB, 256]`` super-blocks.

    Returns ``(L [32, NB*8] (requantized), scales12 [NB, 12], d16 [NB], dmin16 [NB])``.

    * no imatrix (``quantize_row_qX_K_ref``): per sub-block weights ``sqrtf(sum x^2/32) + |x|``,
      ``make_qkx2_quants``; 6-bit scales ``MIN(63, (uint8_t)nearest_int(63/max_scale*s))``,
      ``d = max_scale/63``, ``dmin = max_min/63``.
    * imatrix (``quantize_row_qX_K_impl``): ``sigma2 = 2*sum_{256} x^2/256``, weights
      ``qw*sqrtf(sigma2 + x*x)``, ``make_qkx3_quants(-0.9, 0.05, 36)``; 6-bit scales and mins
      from ``make_qp_quants(8, 63, ., sw)`` with ``sw`` the per-sub-block weight sums.
    """
    NB = blocks.shape[0]
    xc = _columns(blocks.reshape(-1, 32))  # [32, NB*8], column = 8*superblock + subblock
    if qw is None:
        av_x = np.sqrt(_seqsum(xc * xc) / F32(32))
        w = av_x + np.abs(xc)
        scale, the_min, L = _make_qkx_quants(xc, w, nmax, rmin, rdelta, nstep, le=False)
        scales = scale.reshape(NB, 8)
        mins = the_min.reshape(NB, 8)
        max_scale = np.zeros(NB, F32)
        max_min = np.zeros(NB, F32)
        for j in range(8):
            max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(np.uint8(63), _u8(_nearest_int(inv_scale[:, None] * scales)))
        lm = np.minimum(np.uint8(63), _u8(_nearest_int(inv_min[:, None] * mins)))
        d16 = _fp16(max_scale / F32(63))
        dmin16 = _fp16(max_min / F32(63))
    else:
        sum_x2 = _seqsum(_columns(blocks * blocks))  # sequential over the 256 values
        sigma2 = (F32(2) * sum_x2) / F32(QK_K)
        nsb = qw.size // QK_K
        qwc = np.tile(qw.reshape(-1, 32), (NB // nsb, 1)).T
        w = qwc * np.sqrt(np.repeat(sigma2, 8) + xc * xc)
        sw = _seqsum(w)
        scale, the_min, L = _make_qkx_quants(xc, w, nmax, -0.9, 0.05, 36, le=True)
        swc = _columns(sw.reshape(NB, 8))
        d_block, ls = _make_qp_quants(_columns(scale.reshape(NB, 8)), 63, swc)
        m_block, lm = _make_qp_quants(_columns(the_min.reshape(NB, 8)), 63, swc)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # quantize_row_q5_K_impl clamps, _q4_K_impl does not
            ls = np.minimum(np.uint8(63), ls)
            lm = np.minimum(np.uint8(63), lm)
        d16 = _fp16(d_block)
        dmin16 = _fp16(m_block)
    scales12 = _pack_scales_k4(np.ascontiguousarray(ls), np.ascontiguousarray(lm))
    L = _k_requantize(xc, L, scales12, d16, dmin16, nmax)
    return L, scales12, d16, dmin16


def _q4_k(xg, qw):
    """Q4_K super-block (144 bytes): ``d`` fp16 | ``dmin`` fp16 | ``scales[12]`` | ``qs[128]``.

    ``qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4`` (c = 0..3); x = d*sc_j*L - dmin*m_j.
    ``quantize_row_q4_K_ref``: make_qkx2_quants(32, 15, ..., -1.0, 0.1, 20).
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    L, s12, d16, dmin16 = _k_search(blocks, qw, 15, -1.0, 0.1, 20)
    Lb = L.T.reshape(NB, 4, 2, 32).astype(np.uint8)
    qs = (Lb[:, :, 0] | (Lb[:, :, 1] << 4)).reshape(NB, 128)
    return _bytes(d16[:, None], dmin16[:, None], s12, qs)


def _q5_k(xg, qw):
    """Q5_K super-block (176 bytes): ``d`` | ``dmin`` | ``scales[12]`` | ``qh[32]`` | ``qs[128]``.

    ``qs`` holds the low 4 bits as Q4_K; ``qh[l]`` bit ``2c`` = bit 4 of ``L[64c+l]``,
    bit ``2c+1`` = bit 4 of ``L[64c+32+l]``.
    ``quantize_row_q5_K_ref``: make_qkx2_quants(32, 31, ..., -0.5, 0.1, 15).
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    L, s12, d16, dmin16 = _k_search(blocks, qw, 31, -0.5, 0.1, 15)
    Lb = L.T.reshape(NB, 8, 32).astype(np.uint8)  # [NB, sub-block, l]
    qs = ((Lb[:, 0::2] & 15) | ((Lb[:, 1::2] & 15) << 4)).reshape(NB, 128)
    qh = np.zeros((NB, 32), np.uint8)
    for j in range(8):
        qh |= ((Lb[:, j] >> 4) & 1) << j
    return _bytes(d16[:, None], dmin16[:, None], s12, qh, qs)


def _q6_k(xg, qw):
    """Q6_K super-block (210 bytes): ``ql[128]`` | ``qh[64]`` | ``scales[16]`` int8 | ``d`` fp16.

    ``quantize_row_q6_K_ref`` / ``_impl``: per 16 values ``make_qx_quants(16, 32, x, L, 1, qw)``
    (weights ``x*x`` without imatrix, ``qw`` as is with one); the signed scale of largest
    magnitude gives ``iscale = -128/max_scale``, ``d = fp16(1/iscale)``,
    ``scales[j] = MIN(127, nearest_int(iscale*s_j))``; requantize
    ``L = clamp(nearest_int(x/(d*sc)), -32, 31) + 32`` unless ``d*sc == 0``.
    All-zero super-block (max |scale| < 1e-15): 210 zero bytes.
    Packing for half h, l = 0..31 (``L`` in 0..63)::

        ql[64h+l]    = L[128h+l]    & 15 | (L[128h+64+l] & 15) << 4
        ql[64h+32+l] = L[128h+32+l] & 15 | (L[128h+96+l] & 15) << 4
        qh[32h+l]    = L[128h+l]>>4 | L[128h+32+l]>>4 << 2 | L[128h+64+l]>>4 << 4 | L[128h+96+l]>>4 << 6
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    xc = _columns(blocks.reshape(-1, 16))  # [16, NB*16]
    if qw is None:
        w = xc * xc
    else:
        nsb = qw.size // QK_K
        w = np.tile(qw.reshape(-1, 16), (NB // nsb, 1)).T
    scale, L = _make_qx_quants(xc, 32, w)
    scales = scale.reshape(NB, 16)
    max_abs = np.zeros(NB, F32)
    max_scale = np.zeros(NB, F32)
    for ib in range(16):
        a = np.abs(scales[:, ib])
        upd = a > max_abs
        max_abs = np.where(upd, a, max_abs)
        max_scale = np.where(upd, scales[:, ib], max_scale)
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d16 = _fp16(F32(1) / iscale)
    sq = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = (d16.astype(F32)[:, None] * sq.astype(F32)).reshape(-1)
    skip = d == 0
    lr = np.clip(_nearest_int(xc / np.where(skip, F32(1), d)), -32, 31) + 32
    L = np.where(skip, L, lr).T.reshape(NB, 2, 4, 32).astype(np.uint8)  # [NB, h, quarter, l]
    ql = np.stack(
        [(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], axis=2
    ).reshape(NB, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)).reshape(
        NB, 64
    )
    out = _bytes(ql, qh, sq, d16[:, None])
    out[zero] = 0
    return out


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Quants ``[NB, 256]`` in 0..3 -> ``qs[64]``: ``qs[32c + l] = sum_k L[128c + 32k + l] << 2k``."""
    Lb = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (Lb[:, :, 0] | (Lb[:, :, 1] << 2) | (Lb[:, :, 2] << 4) | (Lb[:, :, 3] << 6)).reshape(-1, 64)


def _row_weights16(blocks, qw, sigma2):
    """``qw[16j + l] * sqrtf(sigma2 + x*x)`` for ``[NB, 256]`` super-blocks -> ``[16, NB*16]``."""
    NB = blocks.shape[0]
    xc = _columns(blocks.reshape(-1, 16))
    nsb = qw.size // QK_K
    qwc = np.tile(qw.reshape(-1, 16), (NB // nsb, 1)).T
    return xc, qwc * np.sqrt(np.repeat(sigma2, 16) + xc * xc)


def _q2_k(xg, qw):
    """Q2_K super-block (84 bytes): ``scales[16]`` | ``qs[64]`` | ``d`` fp16 | ``dmin`` fp16.

    ``scales[j] = sc_j | m_j << 4`` (4-bit scale and min of the 16 values of sub-block j);
    x = d*sc_j*L - dmin*m_j, ``L`` in 0..3 packed by ``_pack_2bit``.

    * no imatrix (``quantize_row_q2_K_ref``): ``make_qkx2_quants(16, 3, x, |x|, -0.5, 0.1,
      15, use_mad=true)``; ``max_scale``/``max_min`` from 0 by strict ``>``;
      ``sc_j = nearest_int(15/max_scale*s_j)`` stored unclamped (modulo 256), d =
      max_scale/15 (0 and sc 0 if ``max_scale <= 0``); mins likewise.
    * imatrix (``quantize_row_q2_K_impl``): ``sigma2 = sum_{256} x^2/256``, weights
      ``qw*sqrtf(sigma2 + x*x)``, ``make_qkx3_quants(16, 3, ..., -0.9, 0.05, 36)``; 4-bit
      scales and mins from ``make_qp_quants(16, 15, ., sw)`` (``sw`` sub-block weight sums).

    Then every sub-block with ``d*sc != 0`` is requantized with the stored values:
    ``L = clamp(nearest_int((x + dmin*m)/(d*sc)), 0, 3)``.
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    if qw is None:
        xc = _columns(blocks.reshape(-1, 16))  # [16, NB*16], column = 16*superblock + j
        scale, the_min, L = _make_qkx_quants(xc, np.abs(xc), 3, -0.5, 0.1, 15, le=False, mad=True)
        scales = scale.reshape(NB, 16)
        mins = the_min.reshape(NB, 16)
        max_scale = np.zeros(NB, F32)
        max_min = np.zeros(NB, F32)
        for j in range(16):
            max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
        ps = max_scale > 0
        pm = max_min > 0
        inv_s = F32(15) / np.where(ps, max_scale, F32(1))
        inv_m = F32(15) / np.where(pm, max_min, F32(1))
        ls = np.where(ps[:, None], _nearest_int(inv_s[:, None] * scales), 0)
        lm = np.where(pm[:, None], _nearest_int(inv_m[:, None] * mins), 0)
        d16 = _fp16(np.where(ps, max_scale / F32(15), F32(0)))
        dmin16 = _fp16(np.where(pm, max_min / F32(15), F32(0)))
    else:
        sigma2 = _seqsum(_columns(blocks * blocks)) / F32(QK_K)
        xc, w = _row_weights16(blocks, qw, sigma2)
        sw = _seqsum(w)
        scale, the_min, L = _make_qkx_quants(xc, w, 3, -0.9, 0.05, 36, le=True)
        swc = _columns(sw.reshape(NB, 16))
        dm, ls = _make_qp_quants(_columns(scale.reshape(NB, 16)), 15, swc)
        mm, lm = _make_qp_quants(_columns(the_min.reshape(NB, 16)), 15, swc)
        ls, lm = ls.T.astype(np.int32), lm.T.astype(np.int32)
        d16 = _fp16(dm)
        dmin16 = _fp16(mm)
    sc = _u8(ls | (lm << 4))  # uint8_t field: C keeps the low byte
    d = (d16.astype(F32)[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    dm = (dmin16.astype(F32)[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    skip = d == 0
    lr = np.clip(_nearest_int((xc + dm) / np.where(skip, F32(1), d)), 0, 3)
    L = np.where(skip, L, lr)
    qs = _pack_2bit(L.T.reshape(NB, QK_K))
    return _bytes(sc, qs, d16[:, None], dmin16[:, None])


def _q3_k(xg, qw):
    """Q3_K super-block (110 bytes): ``hmask[32]`` | ``qs[64]`` | ``scales[12]`` | ``d`` fp16.

    x = d*(sc_j - 32)*(L - 4), ``L`` in 0..7: bit 2 of ``L[32k + m]`` is bit k of
    ``hmask[m]``, the low 2 bits are packed by ``_pack_2bit``.  The 16 six-bit scales
    ``l_j`` (0..63): ``scales[j] = l_j & 15 | (l_{j+8} & 15) << 4`` (j < 8) and
    ``scales[8 + k] = sum_g (l_{4g+k} >> 4) << 2g``.

    * no imatrix (``quantize_row_q3_K_ref``): ``make_q3_quants(16, 4, x, L, true)`` per
      sub-block; the signed scale of largest magnitude gives ``iscale = -32/max_scale``,
      ``l_j = clamp((int8_t)nearest_int(iscale*s_j), -32, 31) + 32``, ``d = fp16(1/iscale)``;
      all scales 0 if ``max_scale == 0``.
    * imatrix (``quantize_row_q3_K_impl``): ``sigma2 = 2*sum_{256} x^2/256``, weights
      ``qw*sqrtf(sigma2 + x*x)``, ``make_qx_quants(16, 4, x, L, 1, weights)``; then
      ``d = make_qx_quants(16, 32, scales, l, 1, sw)`` (``sw`` sub-block weight sums).

    Then every sub-block with ``d*(l_j - 32) != 0`` is requantized with the stored values:
    ``L = clamp(nearest_int(x/(d*(l_j-32))), -4, 3) + 4``.
    """
    blocks = xg.reshape(-1, QK_K)
    NB = blocks.shape[0]
    if qw is None:
        xc = _columns(blocks.reshape(-1, 16))
        scale, L = _make_q3_quants(xc, 4)
        max_scale = _amax_signed(_columns(scale.reshape(NB, 16)))
        nz = max_scale != 0
        iscale = F32(-32) / np.where(nz, max_scale, F32(1))
        l = _nearest_int(iscale[:, None] * scale.reshape(NB, 16)).astype(np.int8)  # int8_t l = ...
        l = np.where(nz[:, None], np.clip(l.astype(np.int32), -32, 31) + 32, 0)
        d16 = _fp16(np.where(nz, F32(1) / iscale, F32(0)))
    else:
        sigma2 = (F32(2) * _seqsum(_columns(blocks * blocks))) / F32(QK_K)
        xc, w = _row_weights16(blocks, qw, sigma2)
        sw = _seqsum(w)
        scale, L = _make_qx_quants(xc, 4, w)
        d_block, l = _make_qx_quants(_columns(scale.reshape(NB, 16)), 32, _columns(sw.reshape(NB, 16)))
        l = l.T
        d16 = _fp16(d_block)
    l = l.astype(np.int32)
    s12 = np.zeros((NB, 12), np.uint8)
    s12[:, :8] = _u8((l[:, :8] & 15) | ((l[:, 8:] & 15) << 4))
    s12[:, 8:] = _u8((l[:, 0:4] >> 4) | ((l[:, 4:8] >> 4) << 2) | ((l[:, 8:12] >> 4) << 4) | ((l[:, 12:] >> 4) << 6))
    d = (d16.astype(F32)[:, None] * (l - 32).astype(F32)).reshape(-1)
    skip = d == 0
    lr = np.clip(_nearest_int(xc / np.where(skip, F32(1), d)), -4, 3) + 4
    L = np.where(skip, L, lr).T.reshape(NB, QK_K)
    hi = (L > 3).reshape(NB, 8, 32).astype(np.uint8)
    hmask = np.zeros((NB, 32), np.uint8)
    for k in range(8):
        hmask |= hi[:, k] << k
    qs = _pack_2bit(np.where(L > 3, L - 4, L))
    return _bytes(hmask, qs, s12, d16[:, None])


#: name -> (block size, bytes per block, kernel(x_rows_group, qw_or_None) -> bytes[nblocks, size])
_KERNELS = {
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q5_0": (32, 22, _q5_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "IQ3_XXS": (QK_K, 98, quantize_iq3_xxs),
    "IQ3_S": (QK_K, 110, quantize_iq3_s),
}

from quant import _numpy_iq2  # noqa: E402  (IQ2_XXS, IQ2_XS, IQ2_S)

_KERNELS.update(_numpy_iq2.KERNELS)

from quant import _numpy_iq4  # noqa: E402  (IQ4_NL, IQ4_XS, MXFP4)

_KERNELS.update(_numpy_iq4.KERNELS)

from quant import _numpy_tq  # noqa: E402  (TQ1_0, TQ2_0)

_KERNELS.update(_numpy_tq.KERNELS)

from quant import _numpy_iq1  # noqa: E402  (IQ1_S, IQ1_M)

_KERNELS.update(_numpy_iq1.KERNELS)

NAMES = tuple(_KERNELS)


def quantize_rows(name: str, x: np.ndarray, qw: np.ndarray | None, threads: int | None = None) -> np.ndarray:
    """Quantize float32 rows ``[nrows, n]`` to ggml bytes ``[nrows, n/bs*type_size]``.

    Same bytes as ``ggml_quantize_chunk(type, x, dst, 0, nrows, n, qw)``.  ``qw`` (float32
    ``[n]``, llama.cpp's quant_weights) selects the ``_impl`` path; Q8_0 ignores it.
    ``threads`` > 1 quantizes row groups in a thread pool (numpy releases the GIL).
    """
    try:
        bs, ts, kernel = _KERNELS[name.upper()]
    except KeyError:
        raise ValueError(f"numpy backend: unsupported type {name!r}") from None
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim != 2 or x.shape[1] % bs:
        raise ValueError(f"{name}: expected [nrows, n] with n a multiple of {bs}, got {x.shape}")
    nrows, n = x.shape
    if qw is not None:
        qw = np.ascontiguousarray(qw, dtype=F32).reshape(-1)
        if qw.size != n:
            raise ValueError(f"{name}: quant weights have {qw.size} values, rows have {n}")
    out = np.empty((nrows, n // bs * ts), np.uint8)
    if nrows == 0 or n == 0:
        return out
    step = max(1, GROUP_ELEMS // n)

    def work(r0: int) -> None:
        r1 = min(nrows, r0 + step)
        with np.errstate(all="ignore"):
            out[r0:r1] = kernel(x[r0:r1], qw).reshape(r1 - r0, -1)

    starts = range(0, nrows, step)
    if threads and threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(work, starts))
    else:
        for r0 in starts:
            work(r0)
    return out
