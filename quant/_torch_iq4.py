"""Torch kernels for IQ4_NL, IQ4_XS and MXFP4 (CPU or CUDA), byte-identical to ggml.

The algorithms of ``quant._numpy_iq4`` (see there and docs/quant.md) as eager torch ops
vectorized over 32-value blocks (layout ``[32, G]``), under the exactness rules of
``quant._torch``: float32 one op at a time, tensor-by-tensor divisions, sequential sums,
the exact ``sqrtf`` and ``nearest_int`` of that module.  ``best_index_int8`` is the count
of ``_numpy_iq4.IQ4_THRESHOLDS`` reached (NaN -> 15).
"""

from __future__ import annotations

import torch

from ._numpy_iq4 import IQ4_THRESHOLDS, IQ4_VALUES, LOG2_UP, MXFP4_VALUES

_F32 = torch.float32
_I32 = torch.int32
_EPS = 1e-15  # GROUP_MAX_EPS
_NTRY = 7


def _tables(device: torch.device):
    return (
        torch.from_numpy(IQ4_THRESHOLDS.copy()).to(device),
        torch.from_numpy(IQ4_VALUES.copy()).to(device),
    )


def _best_index(v: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, v)`` elementwise (int64)."""
    idx = torch.zeros(v.shape, dtype=torch.int64, device=v.device)
    for t in thresholds:
        idx += v >= t
    return torch.where(torch.isnan(v), 15, idx)


def _block_scales(k, X: torch.Tensor, W: torch.Tensor, T: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The per-32-block scale search of ``quantize_row_iq4_nl_impl`` (ntry 7); X, W [32, G]."""
    amax, mx = _t._first_absmax(X, 0)
    zero = amax < _EPS
    mx = torch.where(zero, 1.0, mx)
    v0 = float(IQ4_VALUES[0])

    def fit(idn):
        q = V[_best_index(idn * X, T)]
        wq = W * q
        return _t._seqsum(wq * X), _t._seqsum(wq * q)

    sumqx, sumq2 = fit(k.div(1.0, k.div(-mx, v0)))
    pos = sumq2 > 0
    d = torch.where(pos, k.div(sumqx, torch.where(pos, sumq2, 1.0)), 0.0)
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        sumqx, sumq2 = fit(k.div(float(itry + int(v0)), mx))
        acc = (sumq2 > 0) & ((sumqx * sumqx) > (best * sumq2))
        d = torch.where(acc, k.div(sumqx, sumq2), d)
        best = torch.where(acc, d * sumqx, best)
    return torch.where(zero, 0.0, d)


def _inv_or_zero(k, d: torch.Tensor) -> torch.Tensor:
    """C ``d ? 1/d : 0`` (NaN is true: 1/NaN = NaN)."""
    return torch.where(d != 0, k.div(1.0, d), 0.0)


def _weights(X, qw, rows, sigma2):
    if qw is None:
        return X * X
    return _t._qw_groups(qw, 32, rows) * _t._sqrt(sigma2 + X * X)


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """L [32, G] (0..15) -> [G, 16] uint8 ``L[j] | L[j+16] << 4``."""
    return (L[:16] | (L[16:] << 4)).t().to(torch.uint8)


def _sigma2(blocks: torch.Tensor) -> torch.Tensor:
    """``2*sum(x*x)/size`` per row of ``blocks`` [G, size] (sequential sum)."""
    s = _t._seqsum((blocks * blocks).t().contiguous())
    return s * (2.0 / blocks.shape[1])  # a power of two: exact on every device


def _iq4_nl(k, xr, qw):
    rows = xr.shape[0]
    T, V = _tables(xr.device)
    X = _t._groups(xr, 32)
    sigma2 = None if qw is None else _sigma2(xr.reshape(-1, 32))
    d = _block_scales(k, X, _weights(X, qw, rows, sigma2), T, V)
    L = _best_index(_inv_or_zero(k, d) * X, T)
    db, _ = _t._fp16_bytes(d)
    return torch.cat([db, _pack_nibbles(L)], 1).reshape(rows, -1)


def _iq4_xs(k, xr, qw):
    rows = xr.shape[0]
    T, V = _tables(xr.device)
    X = _t._groups(xr, 32)  # [32, nsb*8]
    nsb = X.shape[1] // 8
    sigma2 = None if qw is None else _sigma2(xr.reshape(-1, 256)).repeat_interleave(8)
    scales = _block_scales(k, X, _weights(X, qw, rows, sigma2), T, V).reshape(nsb, 8)
    _, max_scale = _t._first_absmax(scales.t(), 0, nan_safe=True)
    d = k.div(-max_scale, 32.0)
    ls = _t._nint(_inv_or_zero(k, d)[:, None] * scales).clamp_(-32, 31)  # [nsb, 8] float
    dl = d[:, None] * ls
    L = _best_index(_inv_or_zero(k, dl).reshape(1, -1) * X, T)
    u = (ls + 32).to(torch.int64)
    lo = u & 15
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    sh = ((u >> 4) << (2 * torch.arange(8, device=X.device))).sum(1)  # disjoint bits: exact
    scales_h = torch.stack([sh & 255, sh >> 8], 1)
    db, _ = _t._fp16_bytes(d)
    qs = _pack_nibbles(L).reshape(nsb, 128)
    return torch.cat([db, scales_h.to(torch.uint8), scales_l.to(torch.uint8), qs], 1).reshape(rows, -1)


def _mxfp4(k, xr, qw):
    """``quantize_row_mxfp4_ref``; the quant weights are ignored, as in ggml."""
    rows = xr.shape[0]
    xb = xr.reshape(-1, 32)
    bits = xb.view(_I32) & 0x7FFFFFFF
    m = bits.amax(1)  # integer max of |x| bits: the float max for finite x
    ex = m >> 23
    mant = (m & 0x7FFFFF).to(torch.float64).clamp_(min=1.0)
    k2 = torch.where(ex > 0, ex - 127, torch.floor(torch.log2(mant)).to(_I32) - 149)
    up = torch.from_numpy(LOG2_UP.astype("int64")).to(xr.device)[(k2 + 149).clamp_(0, 276).long()]
    k2 = k2 + (m.to(torch.int64) >= up).to(_I32)
    e = torch.where(m > 0, (k2 - 2 + 127) & 0xFF, 0)  # x86-64 (uint8_t): low byte of the int32
    dbits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e.clamp(max=1)), (e - 1) << 23)
    d = dbits.view(_F32)[:, None]
    best = torch.abs(k.c(float(MXFP4_VALUES[0])) * d - xb)
    L = torch.zeros(xb.shape, dtype=torch.int64, device=xr.device)
    for i in range(1, 16):  # strict '<': the first index of least error
        err = torch.abs(k.c(float(MXFP4_VALUES[i])) * d - xb)
        upd = err < best
        best = torch.where(upd, err, best)
        L = torch.where(upd, i, L)
    qs = (L[:, :16] | (L[:, 16:] << 4)).to(torch.uint8)
    return torch.cat([e.to(torch.uint8)[:, None], qs], 1).reshape(rows, -1)


#: name -> (block size, bytes per block, kernel(ctx, chunk, qw))
KERNELS = {
    "IQ4_NL": (32, 18, _iq4_nl),
    "IQ4_XS": (256, 136, _iq4_xs),
    "MXFP4": (32, 17, _mxfp4),
}

from quant import _torch as _t  # noqa: E402  (helpers; imported last: _torch registers KERNELS)
