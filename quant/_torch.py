"""Torch backend: ggml block quantization on CPU or CUDA, byte-identical to ``ggml_quantize_chunk``.

Same algorithms as the numpy reference (ports of ``ggml/src/ggml-quants.c``), written as
eager torch tensor operations vectorized across blocks.  Exactness rules:

* float32 throughout, one IEEE operation per torch op (eager ops are separate kernels, so
  nothing is contracted into an FMA); no fused ops (``addcmul``, ``lerp``, matmul),
  no ``torch.compile``.
* Sequential in-block sums (``s += t[i]`` in index order) over a ``[n, groups]`` layout,
  never ``torch.sum``/``cumsum`` (pairwise or double accumulation).
* Divisions are tensor-by-tensor divisions: on CUDA, ``tensor / python_float`` is computed
  as a multiplication by the reciprocal and ``python_float / tensor`` as
  ``reciprocal() * float`` (two roundings), so constants travel as 0-dim device tensors.
* ``nearest_int`` is emulated bit for bit (add 1.5*2**23, keep the low 23 bits), so
  values outside its asserted range, infinities and NaN (from blocks of values below
  ~1e-38) give the same integers as ggml on x86-64.  Q8_0's ``roundf`` rounds half away
  from zero; truncating float->int casts follow x86-64 ``cvttss2si`` (NaN/inf -> INT_MIN).
* ``sqrtf`` is settled exactly (``_sqrt``): torch's float32 ``sqrt`` is not correctly
  rounded on CPU.  ``amax``/``amin`` are only used where order and the sign of zero cannot
  matter; elsewhere the first extreme is picked as C's strict comparisons do.
* fp32->fp16 with ``Tensor.to(torch.float16)`` (round to nearest even, as ggml).

Rows are processed in bounded chunks, so memory stays flat; on CUDA each chunk is copied
to the GPU and its bytes back.  On CPU, ``threads`` workers take chunks in turn.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError as e:  # optional dependency
    raise ImportError(f"the torch backend needs PyTorch (pip install 'gguf-moe[torch]'): {e}") from None

from . import QuantError

__all__ = ["DEVICES", "NAMES", "quantize_rows"]

_F32 = torch.float32
_I32 = torch.int32
_MAGIC = 12582912.0  # 1.5 * 2**23, nearest_int's rounding constant
_EPS = 1e-15  # GROUP_MAX_EPS

#: elements per chunk (rows are grouped so that one chunk holds about this many values)
_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}


def DEVICES() -> list[str]:
    """Devices this backend can use here: ``"cpu"``, plus ``"cuda"`` when available."""
    out = ["cpu"]
    try:
        if torch.cuda.is_available():
            out.append("cuda")
    except Exception:  # a broken CUDA install means no CUDA, not a broken backend
        pass
    return out


# ---------------------------------------------------------------------------------------------
# scalar helpers


class _Ctx:
    """Per-call device state: 0-dim float32 constants on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._const: dict[float, torch.Tensor] = {}

    def c(self, v) -> torch.Tensor:
        v = float(np.float32(v))
        t = self._const.get(v)
        if t is None:
            t = self._const[v] = torch.tensor(v, dtype=_F32, device=self.device)
        return t

    def div(self, a, b) -> torch.Tensor:
        """IEEE float32 ``a / b``; either side may be a Python number."""
        if not isinstance(a, torch.Tensor):
            a = self.c(a)
        if not isinstance(b, torch.Tensor):
            b = self.c(b)
        return torch.div(a, b)


def _nint(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` as float32: round half to even for |v| < 2**22, and the same
    bit-trick result as C outside that range (inf -> -2**22, NaN -> 0 as x86's default NaN).
    Always finite."""
    bits = torch.add(v, _MAGIC).view(_I32)
    r = torch.bitwise_and(bits, 0x7FFFFF).sub_(0x400000).to(_F32)
    if v.is_cuda:  # x86's default NaN (all NaN here come from invalid ops) has low bits giving 0;
        r = torch.where(torch.isnan(v), 0.0, r)  # CUDA's canonical NaN would give 4194303
    return r


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf`` for finite a >= 0.  torch's float32 sqrt is not
    (its vectorized CPU path is off by one ulp for ~15% of inputs), so take a close value
    and settle it exactly: a float32 y is the rounded root iff the squares of its two
    neighbouring midpoints (25 bits, exact in float64) bracket a."""
    a64 = a.double()
    y = torch.sqrt(a64).float()
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    dn = torch.nextafter(y, torch.zeros_like(y))
    y64 = y.double()
    mhi = (y64 + up.double()) * 0.5
    mlo = (y64 + dn.double()) * 0.5
    y = torch.where(mhi * mhi < a64, up, y)
    return torch.where(mlo * mlo > a64, dn, y)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) for every finite float:
    copysign(floor(|v| + (0.5 - 2**-25)), v); the float32 sum reaches the next integer
    exactly when the fraction is >= 0.5.  (floor, not trunc: torch's CPU trunc is slow.)"""
    h = torch.tensor(0.49999997, dtype=_F32, device=v.device)
    return torch.copysign(torch.floor(torch.abs(v) + h), v)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """``s = 0; for i: s += t[i]`` over dim 0, in index order, float32."""
    s = t[0] + 0.0
    for i in range(1, t.shape[0]):
        s.add_(t[i])
    return s


def _index_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return torch.arange(x.shape[dim], device=x.device, dtype=_I32).view(shape)


def _first_absmax(x: torch.Tensor, dim: int = 0, nan_safe: bool = False):
    """Along ``dim``: (amax, the signed x at the first index reaching it), as C's
    ``if (ax > amax) { amax = ax; max = x; }`` from 0 finds them: max stays +0 for all-zero
    groups, NaN never wins (``nan_safe``), and when both +a and -a occur the first wins."""
    if nan_safe:
        x = torch.where(torch.isnan(x), 0.0, x)
    hi = x.amax(dim)
    lo = x.amin(dim)
    nlo = -lo
    amax = torch.maximum(hi, nlo)
    signed = torch.where(hi >= nlo, hi, lo)
    tie = (hi == nlo) & (hi > 0)
    if bool(tie.any()):  # rare: settle by the first index reaching amax
        first = torch.where(torch.abs(x) == amax.unsqueeze(dim), _index_along(x, dim), x.shape[dim])
        first = first.amin(dim, keepdim=True).clamp_(max=x.shape[dim] - 1)
        signed = torch.where(tie, torch.gather(x, dim, first.long()).squeeze(dim), signed)
    return amax, torch.where(amax > 0, signed, 0.0)


def _first_ext(x: torch.Tensor, largest: bool, dim: int = 0) -> torch.Tensor:
    """min (or max) along ``dim`` as C's strict ``<`` (``>``) update loop finds it: the
    first of equal extremes, which decides the sign of a zero result."""
    m = x.amax(dim) if largest else x.amin(dim)
    z = m == 0
    if bool(z.any()):  # +0 or -0: the first zero decides
        first = torch.where(x == 0, _index_along(x, dim), x.shape[dim]).amin(dim, keepdim=True)
        first.clamp_(max=x.shape[dim] - 1)  # groups without a zero: any index, unused
        m = torch.where(z, torch.gather(x, dim, first.long()).squeeze(dim), m)
    return m


def _fp16_bytes(v: torch.Tensor):
    """float32 [...] -> (fp16 bytes uint8 [..., 2], the fp16 value back as float32)."""
    h = v.contiguous().to(torch.float16)
    bits = h.view(torch.int16)
    if h.is_cuda:
        # NaN scales only arise for |x| > ~1e19 (x*x overflows); x86 makes them the
        # "default NaN", which ggml stores as 0xFE00; CUDA's canonical NaN would give 0x7FFF
        bits = torch.where(torch.isnan(h), -512, bits)
    return bits.unsqueeze(-1).view(torch.uint8), h.to(_F32)


def _u8(v: torch.Tensor) -> torch.Tensor:
    """Integer-valued tensor -> uint8 with C's modulo-256 wrap."""
    if v.is_floating_point():
        v = v.to(_I32)
    return torch.bitwise_and(v, 255).to(torch.uint8)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8k] 0/1 integers (bit i of a little-endian bit field) -> [..., k] uint8."""
    b = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, 8)
    w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=bits.device)
    return (b * w).sum(-1).to(torch.uint8)  # integer sum: exact


# ---------------------------------------------------------------------------------------------
# the searches of ggml-quants.c, vectorized over groups (layout [n, groups])


def _make_qx_quants(k: _Ctx, x: torch.Tensor, nmax: int, w: torch.Tensor | None, nan_safe: bool = False):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w)``; w=None means x*x.
    Returns (scale [G], L [n, G] float in 0..2*nmax-1).  ``nan_safe``: x may hold NaN
    (scales fitted to overflowing weights), which never wins C's ``ax > amax``.

    In the search |iscale*x| <= nmax+1 for every group with amax >= eps (the others are
    masked at the end), so ``torch.round`` equals ``nearest_int`` there; L is rebuilt once
    from the chosen iscale with the exact emulation."""
    n = x.shape[0]
    amax, mx = _first_absmax(x, nan_safe=nan_safe)
    small = amax < _EPS
    if w is None:
        w = x * x
    wx = w * x
    lo, hi = float(-nmax), float(nmax - 1)
    T = torch.empty((n, 2) + x.shape[1:], dtype=_F32, device=x.device)
    lv = torch.empty_like(x)

    def sums(iscale):
        torch.mul(x, iscale, out=lv)
        torch.round(lv, out=lv).clamp_(lo, hi)
        torch.mul(wx, lv, out=T[:, 0])  # (w*x)*l
        torch.mul(w, lv, out=T[:, 1]).mul_(lv)  # (w*l)*l
        s = _seqsum(T)
        return s[0], s[1]

    sel = k.div(float(-nmax), mx)
    sumlx, suml2 = sums(sel)
    scale = torch.where(suml2 != 0, k.div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        iscale = k.div(c, mx)
        sumlx, suml2 = sums(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        sel = torch.where(upd, iscale, sel)
        scale = torch.where(upd, k.div(sumlx, suml2), scale)
        best = torch.where(upd, scale * sumlx, best)
    L = torch.clamp(_nint(x * sel), lo, hi).add_(float(nmax))
    scale = torch.where(small, 0.0, scale)
    L.mul_((~small).to(_F32))  # L is finite: where() by arithmetic, cheaper on CPU
    return scale, L


def _err(diff: torch.Tensor, mad: bool) -> torch.Tensor:
    """In place: ``|diff|`` (use_mad) or ``diff*diff``."""
    return diff.abs_() if mad else diff.mul_(diff)


def _make_qkx(k: _Ctx, x, w, nmax, rmin, rdelta, nstep, strict_eq, mad=False):
    """``make_qkx2_quants`` (strict_eq: degenerate when max == min) or ``make_qkx3_quants``
    (max <= min) with weights w; errors are ``w*diff*diff``, or ``w*|diff|`` with ``mad``
    (ggml's ``use_mad``).  Returns (scale, min, L): ggml's
    ``the_min`` is ``-min``; ``min`` keeps the sign of zero that ggml carries.

    Each step uses ``torch.round`` for ``nearest_int`` when a per-group bound shows
    |iscale*(x-min)| < 2**21 for all groups (the usual case), else the exact emulation;
    L is rebuilt once at the end from the accepted (iscale, min) with the exact one."""
    n = x.shape[0]
    mn = _first_ext(x, False)
    mx = _first_ext(x, True)
    xlo = mn
    wx = w * x
    sum_w = w[0].clone()
    sum_x = wx[0].clone()
    for i in range(1, n):
        sum_w.add_(w[i])
        sum_x.add_(wx[i])
    mn = torch.where(mn > 0, 0.0, mn)
    degen = (mx == mn) if strict_eq else (mx <= mn)
    fmax = float(nmax)
    buf = torch.empty_like(x)
    laux = torch.empty_like(x)

    def quants(iscale, out):
        torch.sub(x, mn, out=buf).mul_(iscale)  # iscale*(x - min)
        bound = torch.maximum(torch.abs(mx - mn), torch.abs(xlo - mn)) * torch.abs(iscale)
        if bool(((bound < 2097152.0) | degen).all()):
            torch.round(buf, out=out)
        else:
            out.copy_(_nint(buf))
        return out.clamp_(0.0, fmax)

    sel_is = k.div(fmax, mx - mn)
    sel_mn = mn
    scale = k.div(1.0, sel_is)
    L = quants(sel_is, torch.empty_like(x))
    torch.mul(L, scale, out=buf).add_(mn).sub_(x)  # scale*L + min - x
    best = _seqsum(_err(buf, mad).mul_(w))  # w*(diff*diff) or w*|diff|

    T = torch.empty((n, 3) + x.shape[1:], dtype=_F32, device=x.device)
    for step in range(nstep + 1):
        c = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = k.div(c, mx - mn)
        quants(iscale, laux)
        wl = torch.mul(w, laux, out=T[:, 0])
        torch.mul(wl, laux, out=T[:, 1])
        torch.mul(wl, x, out=T[:, 2])
        s = _seqsum(T)
        sum_l, sum_l2, sum_xl = s[0], s[1], s[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = k.div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = k.div(sum_l2 * sum_x - sum_l * sum_xl, D)
        mpos = this_min > 0
        this_min = torch.where(mpos, 0.0, this_min)
        this_scale = torch.where(mpos, k.div(sum_xl, sum_l2), this_scale)
        torch.mul(laux, this_scale, out=buf).add_(this_min).sub_(x)  # this_scale*Laux + this_min - x
        cur = _seqsum(_err(buf, mad).mul_(w))
        acc = (D > 0) & (cur < best)
        sel_is = torch.where(acc, iscale, sel_is)
        sel_mn = torch.where(acc, mn, sel_mn)
        best = torch.where(acc, cur, best)
        scale = torch.where(acc, this_scale, scale)
        mn = torch.where(acc, this_min, mn)
    torch.sub(x, sel_mn, out=buf).mul_(sel_is)
    L = _nint(buf).clamp_(0.0, fmax)
    scale = torch.where(degen, 0.0, scale)
    L.mul_((~degen).to(_F32))
    return scale, mn, L


def _make_qp_quants(k: _Ctx, x, w, nmax):
    """``make_qp_quants(n, nmax, x, L, quant_weights=w)`` over [n, G].
    Returns (scale [G], L [n, G] float holding the uint8 value 0..255)."""
    n = x.shape[0]
    fmax = float(nmax)
    mx = torch.zeros_like(x[0])
    for i in range(n):  # max = MAX(max, x[i]) = max > x[i] ? max : x[i], NaN included
        mx = torch.where(mx > x[i], mx, x[i])
    small = mx < _EPS
    iscale = k.div(fmax, mx)
    L0 = torch.remainder(_nint(iscale * x), 256.0)  # stored unclamped in uint8
    scale = k.div(1.0, iscale)
    diff = x - scale * L0
    best = _seqsum(w * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = np.float32(0.1) * np.float32(step) + np.float32(nmax)
        iscale_is = k.div(c, mx)
        scale_is = k.div(1.0, iscale_is)
        lv = torch.clamp(_nint(iscale_is * x), max=fmax)
        diff = x - scale_is * lv
        mse = _seqsum(w * diff * diff)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_is, iscale)
    lv = torch.clamp(_nint(iscale * x), max=fmax)
    wx = w * x
    sumlx = _seqsum(wx * lv)
    suml2 = _seqsum(w * lv * lv)
    L = torch.remainder(lv, 256.0)
    for _ in range(5):
        changed = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)
        for i in range(n):
            wi, xi, wxi, li = w[i], x[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp(_nint(k.div(xi * sl2, slx)), max=fmax)
            ok &= new_l != li
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[i] = torch.where(ok, torch.remainder(new_l, 256.0), li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, k.div(sumlx, suml2), 0.0)
    scale = torch.where(small, 0.0, scale)
    L = torch.where(small, 0.0, L)
    return scale, L


def _make_q3_quants(k: _Ctx, x, nmax):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` over [n, G]: symmetric fit with
    weights x*x from ``iscale = -nmax/max``, then up to 5 coordinate-descent passes.
    Returns (scale [G], L [n, G] float in 0..2*nmax-1; 0 for all-zero groups)."""
    n = x.shape[0]
    lo, hi = float(-nmax), float(nmax - 1)
    amax, mx = _first_absmax(x)
    small = amax < _EPS
    iscale = k.div(float(-nmax), mx)
    L = torch.clamp(_nint(iscale * x), lo, hi)
    w = x * x
    wx = w * x  # (w*x)*l
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)
        for i in range(n):
            wi, xi, wxi, li = w[i], x[i], wx[i], L[i]
            slx = sumlx - wxi * li
            ok = slx > 0  # guards the division (inf/NaN where it fails, masked)
            sl2 = suml2 - wi * li * li
            new_l = torch.clamp(_nint(k.div(xi * sl2, slx)), lo, hi)
            ok &= new_l != li
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            ok &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, k.div(sumlx, suml2), 0.0)
    scale = torch.where(small, 0.0, scale)
    L = torch.where(small, 0.0, L + float(nmax))
    return scale, L


# ---------------------------------------------------------------------------------------------
# layout helpers


def _groups(xr: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, N] -> [n, G] with G = rows*N/n groups in row-major block order."""
    return xr.reshape(-1, n).t().contiguous()


def _qw_groups(qw: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """Importance weights [N] -> [n, rows*N/n], matching _groups of a [rows, N] chunk."""
    return qw.view(-1, n).t().repeat(1, rows).contiguous()


def _row_sigma2(k: _Ctx, xr: torch.Tensor) -> torch.Tensor:
    """Per row: (sequential sum of x*x over the row) / n_per_row."""
    x2 = (xr * xr).t().contiguous()
    return k.div(_seqsum(x2), float(xr.shape[1]))


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """uint8 values (as int64 0..255) [nsb, 8] -> the 12-byte ``scales`` field."""
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return torch.cat([a, b, c], 1).bitwise_and_(255)


def _unpack_k_scales(q: torch.Tensor):
    """``get_scale_min_k4`` for j = 0..7 from the packed [nsb, 12] field (int64)."""
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc, m


# ---------------------------------------------------------------------------------------------
# per-type kernels: chunk [rows, N] float32 on the device -> uint8 [rows, row_bytes]


def _zero_bad_blocks(q: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Blocks [G, 32] where the reciprocal scale (or max-min) overflowed, which only happens
    for |x| below ~1e-38 or above ~1e38: their scaled values are inf/NaN (or 0.5), and C's
    float->int casts give INT_MIN for inf/NaN on x86-64 (``cvttss2si``), whose low byte is
    0, so every quant of such a block is 0."""
    if bool(bad.any()):
        q = torch.where(bad[:, None], 0.0, q)
    return q


def _q8_0(k, xr, qw):
    xb = xr.reshape(-1, 32)
    amax = torch.abs(xb).amax(1)
    d = k.div(amax, 127.0)
    idn = torch.where(d != 0, k.div(1.0, d), 0.0)
    v = xb * idn[:, None]  # |v| <= 127 unless id = inf (blocks below ~1e-38)
    q = _roundf(v)  # int8 = roundf(v)
    q = _zero_bad_blocks(q, torch.isinf(idn))
    db, _ = _fp16_bytes(d)
    return torch.cat([db, q.to(torch.int8).view(torch.uint8)], 1).reshape(xr.shape[0], -1)


def _q4_0_q5_0_ref(k, xr, bits):
    xb = xr.reshape(-1, 32)
    _, mx = _first_absmax(xb, 1)
    half = 1 << (bits - 1)
    d = k.div(mx, float(-half))
    idn = torch.where(d != 0, k.div(1.0, d), 0.0)
    v = xb * idn[:, None] + (half + 0.5)  # in [0.5, 2*half + 0.5] unless id = inf
    q = torch.floor(v).clamp_(max=2 * half - 1)  # MIN(2*half-1, (int8_t)v), v >= 0
    q = _zero_bad_blocks(q, torch.isinf(idn))
    db, _ = _fp16_bytes(d)
    return _pack_32(db, None, q.to(_I32), bits, xr.shape[0])


def _pack_32(db, mb, q, bits, rows):
    """Q4_0/Q5_0/Q5_1 block bytes from d (and m) fp16 bytes and quants q [G, 32] (int32)."""
    parts = [db] if mb is None else [db, mb]
    lo, hi = q[:, :16], q[:, 16:]
    if bits == 5:
        parts.append(_bits_to_bytes((q >> 4) & 1))
        lo, hi = lo & 15, hi & 15
    parts.append(_u8(lo | (hi << 4)))
    return torch.cat(parts, 1).reshape(rows, -1)


def _q4_1_q5_1_ref(k, xr, bits):
    """``quantize_row_q4_1_ref`` / ``_q5_1_ref``: block min/max, ``d = (max-min)/nmax``,
    ``q = (uint8)((x-min)*id + 0.5)``, capped at 15 for Q4_1 (Q5_1 stores it unclamped)."""
    nmax = float((1 << bits) - 1)
    xb = xr.reshape(-1, 32)
    mn = _first_ext(xb, False, 1)
    mx = _first_ext(xb, True, 1)
    d = k.div(mx - mn, nmax)
    idn = torch.where(d != 0, k.div(1.0, d), 0.0)
    v = (xb - mn[:, None]) * idn[:, None] + 0.5  # in [0.5, nmax + 0.5] unless id or max-min is inf
    q = torch.floor(v)  # (uint8_t)v, v >= 0
    if bits == 4:
        q = q.clamp_(max=15.0)
    q = _zero_bad_blocks(q, torch.isinf(idn) | torch.isinf(mx - mn))
    db, _ = _fp16_bytes(d)
    mb, _ = _fp16_bytes(mn)
    return _pack_32(db, mb, q.to(_I32), bits, xr.shape[0])


def _q4_0_q5_0_impl(k, xr, qw, bits):
    rows = xr.shape[0]
    sigma2 = _row_sigma2(k, xr)
    X = _groups(xr, 32)
    nb = xr.shape[1] // 32
    s2 = sigma2.repeat_interleave(nb)
    W = _qw_groups(qw, 32, rows) * _sqrt(s2 + X * X)
    d, L = _make_qx_quants(k, X, 1 << (bits - 1), W)
    db, _ = _fp16_bytes(d)
    return _pack_32(db, None, L.t().to(_I32), bits, rows)


def _qk_45(k, xr, qw, nmax):
    """Q4_K (nmax 15) / Q5_K (nmax 31): ``quantize_row_q{4,5}_K_ref`` without imatrix,
    ``quantize_row_q{4,5}_K_impl`` with one."""
    rows = xr.shape[0]
    X = _groups(xr, 32)  # [32, G], G = nsb*8
    G = X.shape[1]
    nsb = G // 8
    if qw is None:
        av = _sqrt(k.div(_seqsum(X * X), 32.0))
        W = av + torch.abs(X)
        if nmax == 15:
            scales, mn, L = _make_qkx(k, X, W, 15, -1.0, 0.1, 20, strict_eq=True)
        else:
            scales, mn, L = _make_qkx(k, X, W, 31, -0.5, 0.1, 15, strict_eq=True)
        mins = -mn
        S, M = scales.view(nsb, 8), mins.view(nsb, 8)
        # C: ``if (scale > max_scale) max_scale = scale`` from 0; NaN never wins
        smax = torch.where(torch.isnan(S), 0.0, S).amax(1)
        mmax = torch.where(torch.isnan(M), 0.0, M).amax(1)
        max_scale = torch.where(smax > 0, smax, 0.0)
        max_min = torch.where(mmax > 0, mmax, 0.0)
        inv_s = torch.where(max_scale > 0, k.div(63.0, max_scale), 0.0)
        inv_m = torch.where(max_min > 0, k.div(63.0, max_min), 0.0)
        ls = torch.clamp(torch.remainder(_nint(inv_s[:, None] * S), 256.0), max=63.0).to(torch.int64)
        lm = torch.clamp(torch.remainder(_nint(inv_m[:, None] * M), 256.0), max=63.0).to(torch.int64)
        dv = k.div(max_scale, 63.0)
        mv = k.div(max_min, 63.0)
    else:
        X2 = (X * X).view(32, nsb, 8)
        sum_x2 = X2[0, :, 0] + 0.0
        for j in range(8):
            for i in range(32):
                if i or j:
                    sum_x2.add_(X2[i, :, j])
        sigma2 = k.div(sum_x2 * 2.0, 256.0)
        W = _qw_groups(qw, 32, rows) * _sqrt(sigma2.repeat_interleave(8) + X * X)
        sw = _seqsum(W)
        scales, mn, L = _make_qkx(k, X, W, nmax, -0.9, 0.05, 36, strict_eq=False)
        mins = -mn
        swt = sw.view(nsb, 8).t()
        dv, Ls = _make_qp_quants(k, scales.view(nsb, 8).t(), swt, 63)
        mv, Lm = _make_qp_quants(k, mins.view(nsb, 8).t(), swt, 63)
        ls, lm = Ls.t().to(torch.int64), Lm.t().to(torch.int64)
        if nmax == 31:
            ls, lm = torch.clamp(ls, max=63), torch.clamp(lm, max=63)
    sc_bytes = _pack_k_scales(ls, lm)
    sc, m = _unpack_k_scales(sc_bytes)
    db, d16 = _fp16_bytes(dv)
    mb, m16 = _fp16_bytes(mv)
    d = (d16[:, None] * sc.to(_F32)).reshape(G)
    dm = (m16[:, None] * m.to(_F32)).reshape(G)
    Lq = torch.clamp(_nint(k.div(X + dm, d)), 0.0, float(nmax))
    L = Lq.sub_(L).mul_((d != 0).to(_F32)).add_(L)  # d != 0 ? Lq : L (finite small integers)
    Lb = L.t().to(_I32).reshape(nsb, 4, 2, 32)  # [sb, chunk c, sub-block 2c+h, l]
    lo, hi = Lb[:, :, 0], Lb[:, :, 1]
    parts = [db, mb, _u8(sc_bytes)]
    if nmax == 31:
        sh = torch.arange(8, device=X.device, dtype=_I32).view(1, 8, 1)
        qh = ((L.t().to(_I32).reshape(nsb, 8, 32) >> 4) << sh).sum(1)
        parts.append(_u8(qh))
        lo, hi = lo & 15, hi & 15
    parts.append(_u8(lo | (hi << 4)).reshape(nsb, 128))
    return torch.cat(parts, 1).reshape(rows, -1)


def _q6_k(k, xr, qw):
    rows = xr.shape[0]
    X = _groups(xr, 16)  # [16, G], G = nsb*16
    G = X.shape[1]
    nsb = G // 16
    W = None if qw is None else _qw_groups(qw, 16, rows)
    scales, L = _make_qx_quants(k, X, 32, W)
    S = scales.view(nsb, 16).t()
    max_abs, max_scale = _first_absmax(S, nan_safe=True)
    zero = max_abs < _EPS
    iscale = k.div(-128.0, max_scale)
    db, d16 = _fp16_bytes(k.div(1.0, iscale))
    sq = torch.clamp(_nint(iscale[None, :] * S), max=127.0)  # [16, nsb]
    d = (d16[None, :] * sq).t().reshape(G)
    Lq = torch.clamp(_nint(k.div(X, d)), -32.0, 31.0).add_(32.0)
    L = Lq.sub_(L).mul_((d != 0).to(_F32)).add_(L)  # d != 0 ? Lq : L
    Lb = L.t().to(_I32).reshape(nsb, 2, 4, 32)  # [sb, half h, quarter q, l]
    ql = torch.stack([Lb[:, :, 0] & 15 | (Lb[:, :, 2] & 15) << 4, Lb[:, :, 1] & 15 | (Lb[:, :, 3] & 15) << 4], 2)
    sh = torch.tensor([0, 2, 4, 6], device=X.device, dtype=_I32).view(1, 1, 4, 1)
    qh = ((Lb >> 4) << sh).sum(2)
    out = torch.cat(
        [_u8(ql).reshape(nsb, 128), _u8(qh).reshape(nsb, 64), _u8(sq.t()), db],
        1,
    )
    out.mul_((~zero).to(torch.uint8)[:, None])  # all-zero super-blocks: 210 zero bytes
    return out.reshape(rows, -1)


def _q4_1_q5_1_impl(k, xr, qw, bits):
    rows = xr.shape[0]
    sigma2 = _row_sigma2(k, xr)
    X = _groups(xr, 32)
    nb = xr.shape[1] // 32
    s2 = sigma2.repeat_interleave(nb)
    W = _qw_groups(qw, 32, rows) * _sqrt(s2 + X * X)
    scale, mn, L = _make_qkx(k, X, W, (1 << bits) - 1, -0.9, 0.05, 36, strict_eq=False)
    db, _ = _fp16_bytes(scale)
    mb, _ = _fp16_bytes(mn)  # fp16(-the_min)
    return _pack_32(db, mb, L.t().to(_I32), bits, rows)


def _sum_x2_256(X: torch.Tensor, nsb: int) -> torch.Tensor:
    """Per super-block, from groups [16, nsb*16]: the sequential sum of x*x over its 256
    values in memory order (sub-block j, then l)."""
    X2 = (X * X).view(16, nsb, 16)  # [l, sb, j]
    s = X2[0, :, 0] + 0.0
    for j in range(16):
        for i in range(16):
            if i or j:
                s.add_(X2[i, :, j])
    return s


def _pack_2bit(L: torch.Tensor, nsb: int) -> torch.Tensor:
    """L [256, nsb]-ordered as groups [16, nsb*16] with values 0..3 -> qs [nsb, 64] uint8:
    ``qs[32c + l] = sum_k L[128c + 32k + l] << 2k``."""
    Lb = L.t().to(_I32).reshape(nsb, 2, 4, 32)
    sh = torch.tensor([0, 2, 4, 6], device=L.device, dtype=_I32).view(1, 1, 4, 1)
    return _u8((Lb << sh).sum(2)).reshape(nsb, 64)  # integer sum: exact


def _q2_k(k, xr, qw):
    """``quantize_row_q2_K_ref`` / ``quantize_row_q2_K_impl`` (see quant/_numpy.py)."""
    rows = xr.shape[0]
    X = _groups(xr, 16)  # [16, G], G = nsb*16
    G = X.shape[1]
    nsb = G // 16
    if qw is None:
        scales, mn, L = _make_qkx(k, X, torch.abs(X), 3, -0.5, 0.1, 15, strict_eq=True, mad=True)
        S, M = scales.view(nsb, 16), (-mn).view(nsb, 16)
        # C: ``if (scale > max_scale) max_scale = scale`` from 0; NaN never wins
        smax = torch.where(torch.isnan(S), 0.0, S).amax(1)
        mmax = torch.where(torch.isnan(M), 0.0, M).amax(1)
        ps, pm = smax > 0, mmax > 0
        inv_s = k.div(15.0, torch.where(ps, smax, 1.0))
        inv_m = k.div(15.0, torch.where(pm, mmax, 1.0))
        ls = torch.where(ps[:, None], _nint(inv_s[:, None] * S), 0.0)
        lm = torch.where(pm[:, None], _nint(inv_m[:, None] * M), 0.0)
        dv = torch.where(ps, k.div(smax, 15.0), 0.0)
        mv = torch.where(pm, k.div(mmax, 15.0), 0.0)
    else:
        sigma2 = k.div(_sum_x2_256(X, nsb), 256.0)
        W = _qw_groups(qw, 16, rows) * _sqrt(sigma2.repeat_interleave(16) + X * X)
        sw = _seqsum(W)
        scales, mn, L = _make_qkx(k, X, W, 3, -0.9, 0.05, 36, strict_eq=False)
        swt = sw.view(nsb, 16).t()
        dv, Ls = _make_qp_quants(k, scales.view(nsb, 16).t(), swt, 15)
        mv, Lm = _make_qp_quants(k, (-mn).view(nsb, 16).t(), swt, 15)
        ls, lm = Ls.t(), Lm.t()
    sc = (ls.to(torch.int64) | (lm.to(torch.int64) << 4)) & 255  # uint8_t field: the low byte
    db, d16 = _fp16_bytes(dv)
    mb, m16 = _fp16_bytes(mv)
    d = (d16[:, None] * (sc & 15).to(_F32)).reshape(G)
    dm = (m16[:, None] * (sc >> 4).to(_F32)).reshape(G)
    Lq = torch.clamp(_nint(k.div(X + dm, d)), 0.0, 3.0)
    L = torch.where(d != 0, Lq, L)
    return torch.cat([_u8(sc), _pack_2bit(L, nsb), db, mb], 1).reshape(rows, -1)


def _q3_k(k, xr, qw):
    """``quantize_row_q3_K_ref`` / ``quantize_row_q3_K_impl`` (see quant/_numpy.py)."""
    rows = xr.shape[0]
    X = _groups(xr, 16)  # [16, G], G = nsb*16
    G = X.shape[1]
    nsb = G // 16
    if qw is None:
        scales, L = _make_q3_quants(k, X, 4)
        S = scales.view(nsb, 16)
        _, max_scale = _first_absmax(S.t(), nan_safe=True)
        nz = max_scale != 0
        iscale = k.div(-32.0, torch.where(nz, max_scale, 1.0))
        l = torch.remainder(_nint(iscale[:, None] * S) + 128.0, 256.0) - 128.0  # int8_t l = nearest_int(.)
        l = torch.where(nz[:, None], torch.clamp(l, -32.0, 31.0) + 32.0, 0.0)
        dv = torch.where(nz, k.div(1.0, iscale), 0.0)
    else:
        sigma2 = k.div(_sum_x2_256(X, nsb) * 2.0, 256.0)
        W = _qw_groups(qw, 16, rows) * _sqrt(sigma2.repeat_interleave(16) + X * X)
        sw = _seqsum(W)
        scales, L = _make_qx_quants(k, X, 4, W)
        dv, Ls = _make_qx_quants(k, scales.view(nsb, 16).t(), 32, sw.view(nsb, 16).t(), nan_safe=True)
        l = Ls.t()
    li = l.to(torch.int64)  # [nsb, 16], 0..63
    s_lo = (li[:, :8] & 15) | ((li[:, 8:] & 15) << 4)
    s_hi = (li[:, 0:4] >> 4) | ((li[:, 4:8] >> 4) << 2) | ((li[:, 8:12] >> 4) << 4) | ((li[:, 12:] >> 4) << 6)
    db, d16 = _fp16_bytes(dv)
    d = (d16[:, None] * (l - 32.0)).reshape(G)
    Lq = torch.clamp(_nint(k.div(X, d)), -4.0, 3.0).add_(4.0)
    L = torch.where(d != 0, Lq, L)
    high = L > 3.0
    hb = high.t().to(_I32).reshape(nsb, 8, 32)  # [sb, k, m]: bit k of hmask[m]
    sh = torch.arange(8, device=X.device, dtype=_I32).view(1, 8, 1)
    hmask = _u8((hb << sh).sum(1))
    qs = _pack_2bit(torch.where(high, L - 4.0, L), nsb)
    return torch.cat([hmask, qs, _u8(s_lo), _u8(s_hi), db], 1).reshape(rows, -1)


_KERNELS = {
    "Q8_0": (32, 34, lambda k, x, qw: _q8_0(k, x, qw)),
    "Q4_0": (32, 18, lambda k, x, qw: _q4_0_q5_0_ref(k, x, 4) if qw is None else _q4_0_q5_0_impl(k, x, qw, 4)),
    "Q5_0": (32, 22, lambda k, x, qw: _q4_0_q5_0_ref(k, x, 5) if qw is None else _q4_0_q5_0_impl(k, x, qw, 5)),
    "Q5_1": (32, 24, lambda k, x, qw: _q4_1_q5_1_ref(k, x, 5) if qw is None else _q4_1_q5_1_impl(k, x, qw, 5)),
    "Q4_K": (256, 144, lambda k, x, qw: _qk_45(k, x, qw, 15)),
    "Q5_K": (256, 176, lambda k, x, qw: _qk_45(k, x, qw, 31)),
    "Q6_K": (256, 210, lambda k, x, qw: _q6_k(k, x, qw)),
    "Q4_1": (32, 20, lambda k, x, qw: _q4_1_q5_1_ref(k, x, 4) if qw is None else _q4_1_q5_1_impl(k, x, qw, 4)),
    "Q2_K": (256, 84, lambda k, x, qw: _q2_k(k, x, qw)),
    "Q3_K": (256, 110, lambda k, x, qw: _q3_k(k, x, qw)),
}

from quant import _torch_iq4  # noqa: E402  (IQ4_NL, IQ4_XS, MXFP4)

_KERNELS.update(_torch_iq4.KERNELS)

from quant import _torch_tq  # noqa: E402  (TQ1_0, TQ2_0)

_KERNELS.update(_torch_tq.KERNELS)

NAMES = tuple(_KERNELS)


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if "cuda" in DEVICES() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise QuantError(f"torch backend: bad device {device!r} ({e}); use 'cpu' or 'cuda'") from None
    if dev.type not in _CHUNK:
        raise QuantError(f"torch backend: device {device!r} is not supported; use 'cpu' or 'cuda'")
    if dev.type == "cuda" and "cuda" not in DEVICES():
        raise QuantError("torch backend: CUDA was requested but torch.cuda.is_available() is False")
    return dev


def quantize_rows(name: str, x: np.ndarray, qw: np.ndarray | None, threads: int | None = None, device=None) -> np.ndarray:
    """float32 ``[nrows, n]`` -> uint8 ``[nrows, row_bytes]``, as ``ggml_quantize_chunk``.

    ``qw``: importance weights ``[n]`` (llama.cpp's ``quant_weights``) or None; Q8_0 ignores
    them.  ``device``: "cpu", "cuda" or "cuda:N" (default: CUDA when available).
    ``threads`` (CPU): worker threads over row chunks, each running torch ops
    single-threaded (default 1).  Most ops here are small, and torch's own OpenMP
    threads slow down badly on a busy machine, so parallelism is over chunks instead.
    """
    if name not in _KERNELS:
        raise QuantError(f"torch backend: unsupported type {name!r}; supported: {', '.join(_KERNELS)}")
    bs, ts, kern = _KERNELS[name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise QuantError(f"{name}: expected 2-D rows, got shape {x.shape}")
    nrows, n = x.shape
    if n % bs:
        raise QuantError(f"{name}: row length {n} is not a multiple of the block size {bs}")
    out = np.empty((nrows, n // bs * ts), dtype=np.uint8)
    if x.size == 0:
        return out
    if name == "Q8_0":
        qw = None
    if qw is not None:
        qw = np.ascontiguousarray(qw, dtype=np.float32)
        if qw.shape != (n,):
            raise QuantError(f"{name}: importance weights have shape {qw.shape}, expected ({n},)")
    dev = _resolve_device(device)
    step = max(1, _CHUNK[dev.type] // n)
    starts = range(0, nrows, step)

    def run(r0s):
        with torch.inference_mode():
            k = _Ctx(dev)
            qwt = None if qw is None else torch.from_numpy(qw.copy()).to(dev)
            for r0 in r0s:
                xc = x[r0 : r0 + step]
                if not xc.flags.writeable:  # torch warns on read-only arrays; it only reads them
                    xc = xc.copy()
                xr = torch.from_numpy(xc).to(dev)
                out[r0 : r0 + step] = kern(k, xr, qwt).cpu().numpy()

    if dev.type == "cuda":
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False  # no matmuls here, but never TF32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.cuda.device(dev):
                run(starts)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return out

    nthreads = max(1, min(int(threads or 1), len(starts)))
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # worker threads inherit this on first use
    try:
        if nthreads == 1:
            run(starts)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(nthreads) as pool:
                for f in [pool.submit(run, starts[i::nthreads]) for i in range(nthreads)]:
                    f.result()
    finally:
        torch.set_num_threads(old)
    return out
