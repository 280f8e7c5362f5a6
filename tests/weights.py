"""Realistic (and adversarial) weight matrices and importance matrices for quantization tests.

Every generator takes a seeded ``numpy.random.Generator`` and returns float32 ``[rows, n]``
(``n`` a multiple of 256).  ``CASES`` maps a case name to a generator; ``make(name, rows, n,
seed)`` builds one deterministically.  Real checkpoints are bf16, so most cases are rounded
to bf16 values; a few keep full float32 mantissas on purpose.
"""

from __future__ import annotations

import zlib

import numpy as np

F32 = np.float32


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 value (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(F32)


def _t(rng, shape, df=4.0):
    return rng.standard_t(df, size=shape)


def student_t(rng, rows, n):
    """Heavy-tailed Student-t weights with per-row scales (typical linear layer), bf16."""
    scale = rng.lognormal(np.log(0.02), 0.5, size=(rows, 1))
    return bf16_round((_t(rng, (rows, n)) * scale).astype(F32))


def gaussian_f32(rng, rows, n):
    """Plain Gaussian rows with full float32 mantissas (not bf16)."""
    return (rng.standard_normal((rows, n)) * rng.uniform(1e-3, 1.0, size=(rows, 1))).astype(F32)


def outlier_columns(rng, rows, n):
    """A few input channels 20-100x larger than the rest (activation-outlier style), bf16."""
    x = _t(rng, (rows, n), 5.0) * 0.01
    cols = rng.choice(n, size=max(1, n // 512), replace=False)
    x[:, cols] *= rng.uniform(20, 100, size=cols.size)
    return bf16_round(x.astype(F32))


def super_weight(rng, rows, n):
    """Small weights with one huge "super weight" per matrix and a few large ones, bf16."""
    x = _t(rng, (rows, n), 6.0) * 0.005
    x[rng.integers(rows), rng.integers(n)] = rng.choice([-1, 1]) * rng.uniform(20, 60)
    k = max(1, rows // 4)
    x[rng.integers(rows, size=k), rng.integers(n, size=k)] = rng.normal(0, 2.0, size=k)
    return bf16_round(x.astype(F32))


def zero_and_constant_rows(rng, rows, n):
    """Rows of zeros (+0 and -0), constant rows (positive, negative), and rows with zero or
    constant stretches of one block and one super-block."""
    x = (_t(rng, (rows, n)) * 0.02).astype(F32)
    for r in range(rows):
        kind = r % 8
        if kind == 0:
            x[r] = 0.0
        elif kind == 1:
            x[r] = -0.0
            x[r, rng.integers(n, size=n // 4)] = 0.0
        elif kind == 2:
            x[r] = F32(rng.choice([0.25, 3.0, 1e-3, 7.5e-6]))
        elif kind == 3:
            x[r] = -F32(rng.choice([0.25, 3.0, 1e-3, 7.5e-6]))
        elif kind == 4:
            b = rng.integers(n // 32) * 32
            x[r, b : b + 32] = 0.0
            s = rng.integers(n // 256) * 256
            x[r, s : s + 256] = F32(rng.normal())
        elif kind == 5:
            b = rng.integers(n // 32) * 32
            x[r, b : b + 32] = F32(rng.normal())
            x[r, b + 7] = 0.0
        elif kind == 6:  # a single non-zero value per sub-block
            x[r] = 0.0
            idx = np.arange(0, n, 16) + rng.integers(16, size=n // 16)
            x[r, idx] = rng.normal(size=idx.size)
        # kind 7: unchanged
    return bf16_round(x)


def magnitudes(rng, rows, n):
    """Row scales spread log-uniformly over 1e-8 .. 6e4 (fp16 overflow/underflow of scales)."""
    scale = 10.0 ** rng.uniform(-8, np.log10(6e4), size=(rows, 1))
    x = _t(rng, (rows, n), 5.0)
    x = x / np.abs(x).max(axis=1, keepdims=True) * scale
    return bf16_round(x.astype(F32))


def subnormals(rng, rows, n):
    """Blocks of only subnormal / tiny values (|x| < ~1e-36): the degenerate region where a
    scale's reciprocal overflows; mixed with normal blocks in the same rows."""
    x = (_t(rng, (rows, n)) * 0.02).astype(F32)
    nblk = n // 32
    for r in range(rows):
        for b in rng.choice(nblk, size=max(1, nblk // 3), replace=False):
            e = rng.integers(-149, -118)
            v = rng.normal(size=32) * 2.0 ** float(e)
            if rng.random() < 0.3:
                v[rng.random(32) < 0.5] = 0.0
            if rng.random() < 0.3:
                v = np.abs(v)
            x[r, b * 32 : (b + 1) * 32] = v.astype(F32)
    return x


def rounding_ties(rng, rows, n):
    """Half-integer grids scaled by powers of two, with a block extreme that makes the
    block scale exact, so ``x*id`` lands exactly on .5 (Q8_0 ``roundf``, Q4_0/Q5_0 casts)
    and ``nearest_int`` sees exact ties in the K-quant searches and requantization."""
    nblk = n // 32
    ext = np.array([127, 8, 16, 32, 15, 31, 63, 4])
    m = ext[rng.integers(ext.size, size=(rows, nblk))]
    half = rng.integers(-2 * m[..., None], 2 * m[..., None] + 1, size=(rows, nblk, 32)) / 2.0
    half = np.clip(half, -m[..., None], m[..., None])
    pos = rng.integers(32, size=(rows, nblk))
    sign = rng.choice([-1.0, 1.0], size=(rows, nblk))
    np.put_along_axis(half, pos[..., None], (sign * m)[..., None], axis=2)
    e = rng.integers(-12, 3, size=(rows, nblk, 1))
    return (half * 2.0**e).astype(F32).reshape(rows, n)


def integer_grid(rng, rows, n):
    """Small integers and quarter-integers (exact, tie-prone), some rows all non-negative."""
    x = rng.integers(-20, 21, size=(rows, n)) / rng.choice([1.0, 2.0, 4.0], size=(rows, 1))
    x[::3] = np.abs(x[::3])
    return x.astype(F32)


def lowrank_like(rng, rows, n):
    """Smooth structured rows (sum of a few sinusoids) plus noise, bf16: strongly correlated
    neighbouring values, unlike i.i.d. samples."""
    t = np.arange(n)[None, :]
    f = rng.uniform(0.001, 0.2, size=(rows, 3, 1))
    ph = rng.uniform(0, 6.3, size=(rows, 3, 1))
    a = rng.normal(0, 0.05, size=(rows, 3, 1))
    x = (a * np.sin(f * t[:, None] + ph)).sum(axis=1) + rng.normal(0, 0.005, size=(rows, n))
    return bf16_round(x.astype(F32))


CASES = {
    "student_t": student_t,
    "gaussian_f32": gaussian_f32,
    "outlier_columns": outlier_columns,
    "super_weight": super_weight,
    "zero_const_rows": zero_and_constant_rows,
    "magnitudes": magnitudes,
    "subnormals": subnormals,
    "rounding_ties": rounding_ties,
    "integer_grid": integer_grid,
    "lowrank_like": lowrank_like,
}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make(case: str, rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Weights of one case, deterministic for (case, rows, n, seed)."""
    rng = np.random.default_rng(_seed(case, rows, n, seed))
    x = np.ascontiguousarray(CASES[case](rng, rows, n), dtype=F32)
    assert x.shape == (rows, n) and np.isfinite(x).all()
    return x


def imatrix(n: int, seed: int = 0, *, zero_frac: float = 0.03) -> np.ndarray:
    """A realistic importance vector: positive mean squared activations, heavy-tailed
    (log-normal body, a few channels 100-1000x larger), some exact zeros (dead channels)."""
    rng = np.random.default_rng(_seed("imatrix", n, seed))
    v = rng.lognormal(0.0, 1.0, size=n) * 1e-2
    hot = rng.choice(n, size=max(1, n // 200), replace=False)
    v[hot] *= rng.uniform(100, 1000, size=hot.size)
    v[rng.random(n) < zero_frac] = 0.0
    return v.astype(F32)


def expert_imatrix(n_expert: int, n: int, seed: int = 0) -> np.ndarray:
    """Per-expert importance ``[n_expert, n]``; one expert never routed (all ones, as
    llama.cpp substitutes for zero counts) and one with many zero channels."""
    m = np.stack([imatrix(n, seed * 1000 + e) for e in range(n_expert)])
    if n_expert > 1:
        m[0] = 1.0
    if n_expert > 2:
        m[2, ::3] = 0.0
    return m.astype(F32)
