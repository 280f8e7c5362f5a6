"""Torch kernels for the ternary TQ1_0 and TQ2_0 (CPU or CUDA), byte-identical to ggml.

The algorithm of ``quant._numpy_tq`` (see there): ``d = amax``, trits
``lroundf(x * (1/amax)) + 1``, where ``|x/amax| <= 1 + 2**-23`` makes ``lroundf`` a test
against 0.5, and a non-finite product (``1/amax`` = inf) gives 1 as on x86-64 glibc.
"""

from __future__ import annotations

import torch


def _trits(k, xr):
    """(fp16 bytes of d [B, 2], trits [B, 256] int64 in {0, 1, 2})."""
    xb = xr.reshape(-1, 256)
    amax = torch.abs(xb).amax(1)
    idn = torch.where(amax != 0, k.div(1.0, amax), 0.0)
    v = xb * idn[:, None]
    a = torch.abs(v)
    one = (a >= 0.5) & torch.isfinite(v)
    xi = 1 + torch.where(one, torch.where(v < 0, -1, 1), 0)
    db, _ = _t._fp16_bytes(amax)
    return db, xi.to(torch.int64)


def _base3(t: torch.Tensor) -> torch.Tensor:
    """Trits [B, k, m] (first most significant) -> ``(q*256 + 242)//243`` uint8 [B, m]."""
    q = torch.zeros_like(t[:, 0])
    for i in range(t.shape[1]):
        q = q * 3 + t[:, i]
    return torch.div(q * 256 + 242, 243, rounding_mode="floor").to(torch.uint8)


def _tq1_0(k, xr, qw):
    rows = xr.shape[0]
    db, xi = _trits(k, xr)
    nb = xi.shape[0]
    tail = torch.cat([xi[:, 240:].reshape(nb, 4, 4), torch.zeros_like(xi[:, :4]).reshape(nb, 1, 4)], 1)
    parts = [_base3(xi[:, :160].reshape(nb, 5, 32)), _base3(xi[:, 160:240].reshape(nb, 5, 16)), _base3(tail), db]
    return torch.cat(parts, 1).reshape(rows, -1)


def _tq2_0(k, xr, qw):
    rows = xr.shape[0]
    db, xi = _trits(k, xr)
    t = xi.reshape(-1, 2, 4, 32)  # [block, j, n, m]
    q = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    return torch.cat([q.reshape(-1, 64).to(torch.uint8), db], 1).reshape(rows, -1)


#: name -> (block size, bytes per block, kernel(ctx, chunk, qw)); quant weights ignored
KERNELS = {
    "TQ1_0": (256, 54, _tq1_0),
    "TQ2_0": (256, 66, _tq2_0),
}

from quant import _torch as _t  # noqa: E402  (helpers; imported last: _torch registers KERNELS)
