"""numba backend specifics: threading determinism, tile edges, the exact scalar fallback,
fp16 conversion, and a clean ImportError without numba.

Byte identity over all types and realistic data is in ``test_quant_bytes.py`` (parametrized
over every available backend); here the oracle is used on the inputs that exercise the
numba-only code paths.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

qn = pytest.importorskip("quant._numba", reason="numba is not installed")

ROOT = Path(__file__).resolve().parent.parent
F32 = np.float32
TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
#: bytes per block
TYPE_SIZE = {
    "Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_1": 20, "Q5_1": 24,
    "Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
}


def _oracle():
    return pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")


def _weights(rows: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(rows, n)).astype(F32)
    x *= (10.0 ** rng.uniform(-3, 0, size=(rows, 1))).astype(F32)
    return x


def _imatrix(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qw = (rng.gamma(0.5, 2.0, size=n) ** 2).astype(F32)
    qw[rng.random(n) < 0.05] = 0
    return qw


def _mismatches(ref: np.ndarray, got: np.ndarray, qtype: str) -> int:
    ts = TYPE_SIZE[qtype]
    assert ref.shape == got.shape
    return int((ref.reshape(-1, ts) != got.reshape(-1, ts)).any(axis=1).sum())


@pytest.mark.parametrize("qtype", TYPES)
def test_threads_and_chunking_do_not_change_bytes(qtype):
    # 37 rows x 1536: tiles and thread chunks end mid-row and mid-tile
    x = _weights(37, 1536, seed=3)
    for qw in (None, _imatrix(1536)):
        base = qn.quantize_rows(qtype, x, qw, threads=1)
        for t in (2, 3, 8, None):
            assert np.array_equal(qn.quantize_rows(qtype, x, qw, threads=t), base), (qtype, t, qw is None)
        # row subsets quantize to the same rows
        assert np.array_equal(qn.quantize_rows(qtype, x[5:17], qw, threads=2), base[5:17])


@pytest.mark.parametrize("qtype", TYPES)
def test_small_and_partial_tiles_match_ggml(qtype):
    oracle = _oracle()
    bs = 256 if qtype.endswith("_K") else 32
    for rows, nblk in ((1, 1), (3, 1), (1, 7), (5, 3), (2, 41)):
        x = _weights(rows, nblk * bs, seed=rows * 100 + nblk)
        for qw in (None, _imatrix(nblk * bs, seed=nblk)):
            ref = oracle.ggml_quantize(x, qtype, qw)
            got = qn.quantize_rows(qtype, x, qw, threads=2)
            assert _mismatches(ref, got, qtype) == 0, (qtype, rows, nblk, qw is None)


def _lane_tile(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nk = qn.LANES_K
    buf = np.zeros(qn._KSIZE, F32)
    buf[qn._KX : qn._KX + 32 * nk] = x.ravel()
    buf[qn._KW : qn._KW + 32 * nk] = w.ravel()
    return buf


@pytest.mark.parametrize(
    "n,mad,nmax,rmin,rdelta,nstep",
    [
        (32, False, 15, -1.0, 0.1, 20),  # Q4_K
        (32, False, 31, -0.5, 0.1, 15),  # Q5_K
        (32, False, 31, -0.9, 0.05, 36),  # Q5_K/Q5_1 imatrix
        (32, False, 15, -0.9, 0.05, 36),  # Q4_K/Q4_1 imatrix
        (16, True, 3, -0.5, 0.1, 15),  # Q2_K
        (16, False, 3, -0.9, 0.05, 36),  # Q2_K imatrix
    ],
)
def test_scalar_fallback_equals_vector_lanes(n, mad, nmax, rmin, rdelta, nstep):
    """The exact scalar make_qkx port (used for out-of-range lanes) agrees with the lanes."""
    nk = qn.LANES_K
    lanes = {(32, False): qn._qkx_lanes, (16, False): qn._qkx16, (16, True): qn._qkx16_mad}[(n, mad)]
    rng = np.random.default_rng(nmax + nstep + n)
    for rep in range(4):
        x = np.zeros((32, nk), F32)
        x[:n] = rng.standard_t(3, size=(n, nk)) * 10.0 ** rng.uniform(-4, 1, size=(1, nk))
        x[:n, : nk // 8] = np.abs(x[:n, : nk // 8]) + F32(0.5)  # all-positive lanes
        x[:n, nk // 8 : nk // 4] = -np.abs(x[:n, nk // 8 : nk // 4])  # all-negative lanes
        x[:, -2] = 0  # degenerate lanes
        x[:n, -1] = F32(-0.75)
        w = (np.abs(x) + np.sqrt((x[:n] * x[:n]).mean(axis=0))).astype(F32)
        if rep % 2:
            w *= (rng.random((32, nk)) < 0.7).astype(F32)  # imatrix-like zero weights
        buf = _lane_tile(x, w)
        sc = np.empty(nk, F32)
        mn = np.empty(nk, F32)
        L = np.empty(32 * nk, np.int32)
        lanes(buf, nmax, F32(rmin), F32(rdelta), nstep, sc, mn, L)
        L = L.reshape(32, nk)
        for s in range(nk):
            Li = np.empty(n, np.int64)
            La = np.empty(n, np.int64)
            xs, ws = np.ascontiguousarray(x[:n, s]), np.ascontiguousarray(w[:n, s])
            scale, the_min = qn._qkx_one(xs, ws, n, nmax, F32(rmin), F32(rdelta), nstep, mad, Li, La)
            assert F32(scale).tobytes() == sc[s].tobytes(), (rep, s)
            assert F32(the_min).tobytes() == mn[s].tobytes(), (rep, s)
            assert np.array_equal(Li, L[:n, s]), (rep, s)


def test_fallback_lanes_are_used_and_match_ggml():
    """Subnormal blocks leave the exact range of the float rounding: they go to the scalar
    port, and the bytes still equal ggml's (x86-64) for every type."""
    nk = qn.LANES_K
    x = np.random.default_rng(9).standard_t(3, size=(32, nk)).astype(F32)
    x[:, :8] *= F32(1e-40)
    buf = _lane_tile(x, np.abs(x) + F32(1e-41))
    qn._qkx_lanes(buf, 15, F32(-1.0), F32(0.1), 20, np.empty(nk, F32), np.empty(nk, F32), np.empty(32 * nk, np.int32))
    assert buf[qn._BAD : qn._BAD + nk][:8].all()

    oracle = _oracle()
    rng = np.random.default_rng(4)
    n = 1024
    x = rng.standard_t(3, size=(24, n)).astype(F32)
    x *= np.repeat(F32(10.0) ** rng.uniform(-44, -36, size=(24, n // 32)), 32, axis=1).astype(F32)
    x[::3] *= F32(1e30)  # tiny next to normal rows
    for qtype in TYPES:
        for qw in (None, _imatrix(n, seed=5)):
            with np.errstate(all="ignore"):
                ref = oracle.ggml_quantize(x, qtype, qw)
            assert _mismatches(ref, qn.quantize_rows(qtype, x, qw, threads=2), qtype) == 0, (qtype, qw is None)


def test_fp16_conversion_matches_numpy():
    from numba import njit

    @njit
    def conv(a, out_bits, back):
        for i in range(a.size):
            h = qn._f16(a[i])
            out_bits[i] = h
            back[i] = qn._f16v(h)

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0x477FEFFF, 0x477FF000, 0x477FE800, 0x38800000, 0x387FFFFF, 0x33000000, 0x33000001, 0x80000000], np.uint32)
    a = np.concatenate([bits, edges]).view(F32)
    a = a[np.isfinite(a)]
    hb = np.empty(a.size, np.int64)
    back = np.empty(a.size, F32)
    conv(a, hb, back)
    with np.errstate(over="ignore"):
        want = a.astype(np.float16)
    assert np.array_equal(hb.astype(np.uint16), want.view(np.uint16))
    assert np.array_equal(back.view(np.uint32), want.astype(F32).view(np.uint32))


def test_import_without_numba_is_a_clean_import_error():
    code = (
        "import sys\n"
        "sys.modules['numba'] = None\n"
        "try:\n"
        "    import quant._numba\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
        "import quant\n"
        "print('BACKENDS', quant.available_backends())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "numba" in r.stdout
    backends = r.stdout.split("BACKENDS", 1)[1]
    assert "numba" not in backends and "numpy" in backends


def test_bad_arguments():
    with pytest.raises(ValueError, match="unsupported type"):
        qn.quantize_rows("Q8_K", np.zeros((1, 256), F32), None)
    with pytest.raises(ValueError, match="multiple of 256"):
        qn.quantize_rows("Q4_K", np.zeros((1, 250), F32), None)
    with pytest.raises(ValueError, match="quant weights"):
        qn.quantize_rows("Q4_K", np.zeros((1, 256), F32), np.ones(255, F32))
    assert qn.quantize_rows("Q6_K", np.zeros((0, 256), F32), None).shape == (0, 210)


def _edge_superblocks(seed: int) -> np.ndarray:
    """Rows of 4 super-blocks whose 16-value sub-blocks hit the corners of the Q2_K/Q3_K/Q4_1
    searches: single spikes, all-zero or constant sub-blocks next to normal ones, one-signed
    sub-blocks, sub-block scales of both signs and very different sizes, values whose squares
    overflow float32, and super-blocks whose fp16 scale rounds to 0 or becomes subnormal."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in range(12):
        for _ in range(6):
            x = rng.standard_t(3, size=(64, 16)).astype(F32) * F32(0.02)
            pick = rng.random(64)
            if kind == 0:
                x[pick < 0.5] = 0
                x[pick < 0.5, rng.integers(16)] = F32(rng.normal())
            elif kind == 1:
                x[pick < 0.3] = 0
                x[(pick >= 0.3) & (pick < 0.6)] = F32(rng.normal())
            elif kind == 2:
                x = np.abs(x) * np.where(pick < 0.5, 1, -1)[:, None].astype(F32)
            elif kind == 3:
                x *= (10.0 ** rng.uniform(-6, 2, size=(64, 1))).astype(F32)
            elif kind == 4:
                x *= F32(10.0) ** F32(rng.uniform(18, 21))  # x*x overflows
            elif kind == 5:
                x *= F32(10.0) ** F32(rng.uniform(-12, -7))  # fp16 d underflows
            elif kind == 6:
                x = np.round(x * 200).astype(F32) / F32(4)  # many ties
            elif kind == 7:
                x[:, :8] = 0
                x[:, 8:] = np.abs(x[:, 8:])
            elif kind == 8:
                x[pick < 0.8] *= F32(1e-4)
            elif kind == 9:
                x = np.repeat(rng.normal(size=(64, 1)).astype(F32), 16, axis=1)
                x[:, rng.integers(16)] += F32(1e-3)
            elif kind == 10:
                x *= F32(10.0) ** F32(rng.uniform(-38, -36))
            else:
                x = (rng.integers(-4, 4, size=(64, 16)) * rng.uniform(0.01, 1, size=(64, 1))).astype(F32)
            rows.append(x.reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q2_K", "Q3_K"])
def test_edge_superblocks_match_ggml(qtype):
    oracle = _oracle()
    x = _edge_superblocks(11)
    n = x.shape[1]
    for qw in (None, _imatrix(n, seed=2), np.ones(n, F32)):
        with np.errstate(all="ignore"):
            ref = oracle.ggml_quantize(x, qtype, qw)
        got = qn.quantize_rows(qtype, x, qw, threads=2)
        assert _mismatches(ref, got, qtype) == 0, (qtype, qw is None)
