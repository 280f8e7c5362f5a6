"""numpy reference for the ternary types TQ1_0 and TQ2_0, byte-identical to ggml.

Ports ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` of ``ggml/src/ggml-quants.c``
(``quantize_tq1_0`` / ``quantize_tq2_0`` ignore the quant weights).  Per 256-value block:
``d = amax`` (stored fp16), ``id = d ? 1/d : 0``, each value ``xi = lroundf(x*id) + 1`` in
{0, 1, 2} (-1, 0, +1 times d).

* TQ2_0 (66 bytes): ``qs[64]`` | ``d`` fp16; byte ``32*j + m`` holds
  ``xi[128*j + m + 32*n] << 2n`` for n = 0..3.
* TQ1_0 (54 bytes): ``qs[48]`` | ``qh[4]`` | ``d`` fp16.  Five trits per byte, base 3
  with the first value most significant, then scaled to a byte as ``(q*256 + 242)/243``
  (integer ceiling division): qs[0..31] from values ``m + 32*n`` (0..159), qs[32..47]
  from ``160 + m + 16*n``, qh[j] from the four values ``240 + j + 4*m`` times 3 (the
  fifth trit 0).

A block whose largest magnitude is below ~2.9e-39 has ``1/d = inf``: ``x*id`` is inf or
NaN and ``lroundf`` of it is undefined in C; glibc on x86-64 returns ``LONG_MIN`` (a
truncating conversion), and ``(int)(LONG_MIN + 1)`` is 1, so every trit is 1 (zero) and
``d`` is fp16 0.  Reproduced here.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256


def _fp16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16)


def _trits(xg: np.ndarray):
    """Per 256-block: (fp16 d [B], xi [B, 256] int32 in {0, 1, 2})."""
    blocks = xg.reshape(-1, QK_K)
    amax = np.abs(blocks).max(axis=1)
    nz = amax != 0
    id_ = np.where(nz, F32(1) / np.where(nz, amax, F32(1)), F32(0))
    v = blocks * id_[:, None]
    # lroundf (half away from zero); |v| <= ~1 here, the add is exact in float64
    r = np.floor(np.abs(v).astype(np.float64) + 0.5) * np.sign(v)
    xi = np.where(np.isfinite(v), r + 1, 1).astype(np.int32)
    return _fp16(amax), xi


def _base3_bytes(t: np.ndarray) -> np.ndarray:
    """Trits ``[B, k, m]`` (most significant first along k) -> ``(q*256 + 242)//243`` bytes."""
    q = np.zeros(t.shape[::2], np.int32)
    for i in range(t.shape[1]):
        q = q * 3 + t[:, i]
    return ((q * 256 + 242) // 243).astype(np.uint8)


def tq1_0(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """TQ1_0 (``quantize_row_tq1_0_ref``), quant weights ignored."""
    d16, xi = _trits(xg)
    nb = xi.shape[0]
    qs0 = _base3_bytes(xi[:, :160].reshape(nb, 5, 32))
    qs1 = _base3_bytes(xi[:, 160:240].reshape(nb, 5, 16))
    tail = np.concatenate([xi[:, 240:].reshape(nb, 4, 4), np.zeros((nb, 1, 4), np.int32)], axis=1)
    qh = _base3_bytes(tail)  # four trits then * 3
    return np.concatenate([qs0, qs1, qh, d16[:, None].view(np.uint8)], axis=1)


def tq2_0(xg: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """TQ2_0 (``quantize_row_tq2_0_ref``), quant weights ignored."""
    d16, xi = _trits(xg)
    nb = xi.shape[0]
    t = xi.reshape(nb, 2, 4, 32)  # [block, j, n, m]
    q = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    return np.concatenate([q.reshape(nb, 64).astype(np.uint8), d16[:, None].view(np.uint8)], axis=1)


#: name -> (block size, bytes per block, kernel(x_rows_group, qw_or_None))
KERNELS = {
    "TQ1_0": (QK_K, 54, tq1_0),
    "TQ2_0": (QK_K, 66, tq2_0),
}
