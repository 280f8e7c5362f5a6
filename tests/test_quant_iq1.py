"""IQ1_S and IQ1_M: byte identity with llama.cpp for every backend, on the weight families of
``tests/weights.py`` and on edge cases (ties in the sort, zeros in the imatrix, extreme
magnitudes, the "all below eps" thresholds).

``quant.quantize`` must return exactly the bytes of the real ``ggml_quantize_chunk``
(``tests/oracle.py``).  IQ1_S requires an imatrix in ggml (``ggml_quantize_requires_imatrix``),
so it is only compared with one and refused without; IQ1_M is compared both ways (ggml then
weights values by ``x*x``).

Volume: ~2.4M values per type and imatrix setting for the compiled backends; the numpy
reference gets every 8th row unless ``GGUF_MOE_QUANT_TEST_FULL=1``
(``GGUF_MOE_QUANT_TEST_SCALE=4`` for more rows; ``GGUF_MOE_QUANT_TEST_SEED=n`` draws other
weights).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import quant
import weights
from bytecheck import FULL, SCALE, SEED, Families, check_per_expert, describe, skip_unless_implemented
from quant import QuantError

oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

ROW_STRIDE = {} if FULL else {"numpy": 8, "torch:cpu": 8}
BACKENDS = quant.available_backends()
#: (type, with imatrix): IQ1_S exists only with one
VARIANTS = [("IQ1_S", True), ("IQ1_M", False), ("IQ1_M", True)]
VARIANT_IDS = ["IQ1_S-imatrix", "IQ1_M-plain", "IQ1_M-imatrix"]

#: case -> (rows, n_per_row)
SHAPES = {
    "student_t": (160, 4096),
    "gaussian_f32": (80, 2048),
    "outlier_columns": (80, 4096),
    "super_weight": (24, 14336),
    "zero_const_rows": (96, 2048),
    "magnitudes": (128, 1024),
    "subnormals": (48, 2048),
    "rounding_ties": (256, 512),
    "integer_grid": (512, 256),
    "lowrank_like": (48, 4096),
}
DATA = Families(SHAPES, imatrix_seed=13)
_input, _imatrix = DATA.input, DATA.imatrix


def _check(x: np.ndarray, qtype: str, qw: np.ndarray | None, backend: str, **kw) -> None:
    got = quant.quantize(x, qtype, imatrix=qw, backend=backend, **kw)
    ref = oracle.ggml_quantize(x, qtype, qw)
    report = describe(got, ref, x, qtype)
    assert report is None, f"{backend} {qtype} imatrix={qw is not None}: {report}"


# --------------------------------------------------------------------------- weight families


@pytest.mark.parametrize(("qtype", "imat"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_match_ggml(backend, qtype, imat):
    skip_unless_implemented(backend, qtype)
    failures, blocks = DATA.compare(backend, qtype, imat, ROW_STRIDE.get(backend, 1))
    print(f"{backend} {qtype} imatrix={imat}: {blocks} blocks, {len(failures)} cases with mismatches")
    assert not failures, f"{backend} {qtype} imatrix={imat}:\n" + "\n".join(failures)
    assert blocks >= (1000 if backend in ROW_STRIDE else 8000) * min(SCALE, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iq1_s_requires_an_imatrix(backend):
    skip_unless_implemented(backend, "IQ1_S")
    with pytest.raises(QuantError, match="IQ1_S needs an importance matrix"):
        quant.quantize(_input("student_t")[:2], "IQ1_S", backend=backend)


# --------------------------------------------------------------------------- edge cases


def _tied_rows(rows: int, n: int, seed: int) -> np.ndarray:
    """Sub-blocks made of a few distinct values, each repeated (equal sort keys with
    different imatrix weights), some rows all non-negative, some with +0.0/-0.0 mixed."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(-3, 4, size=(rows, n)).astype(np.float32)
    scale = (2.0 ** rng.integers(-8, 2, size=(rows, 1))).astype(np.float32)
    x = levels * scale
    x[::4] = np.abs(x[::4])
    neg0 = rng.random((rows, n)) < 0.2
    x[1::4][neg0[1::4] & (x[1::4] == 0)] = -0.0
    x[2::4] = np.repeat(x[2::4, ::16], 16, axis=1)  # runs of 16 equal values
    return x


@pytest.mark.parametrize(("qtype", "imat"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_in_the_sort(backend, qtype, imat):
    """Equal values are ordered as glibc's stable qsort leaves them (by index)."""
    skip_unless_implemented(backend, qtype)
    x = _tied_rows(64, 1024, 1 + SEED)
    _check(x, qtype, _imatrix(1024) if imat else None, backend)


@pytest.mark.parametrize(("qtype", "imat"), VARIANTS, ids=VARIANT_IDS)
def test_tie_order_is_exercised(qtype, imat, monkeypatch):
    """The tie data above really depends on the order of equal keys: the numpy reference with
    ties reversed (last index first) no longer matches ggml."""
    from quant import _numpy_iq1

    def reversed_ties(xs):
        n = xs.shape[1]
        return n - 1 - np.argsort(xs[:, ::-1] + np.float32(0), axis=1, kind="stable")

    x = _tied_rows(64, 1024, 1 + SEED)
    qw = _imatrix(1024) if imat else None
    ref = oracle.ggml_quantize(x, qtype, qw)
    monkeypatch.setattr(_numpy_iq1, "_qsort_order", reversed_ties)
    got = quant.quantize(x, qtype, imatrix=qw, backend="numpy")
    ts = quant.QTYPES[qtype].type_size
    assert (got.reshape(-1, ts) != ref.reshape(-1, ts)).any(axis=1).sum() > 0


def _zero_heavy_imatrices(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5 + SEED)
    base = weights.imatrix(n, seed=17 + SEED)
    half = base.copy()
    half[rng.random(n) < 0.5] = 0.0
    blocks = base.copy()
    blocks.reshape(-1, 32)[::3] = 0.0  # whole IQ1_S sub-blocks
    blocks.reshape(-1, 8)[1::5] = 0.0  # whole grid groups
    one = np.zeros(n, np.float32)
    one[::16] = base[::16] + np.float32(1e-3)  # one non-zero weight per IQ1_M sub-block
    return [half, blocks, one, np.zeros(n, np.float32)]


@pytest.mark.parametrize("qtype", ["IQ1_S", "IQ1_M"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_in_the_imatrix(backend, qtype):
    skip_unless_implemented(backend, qtype)
    x = weights.make("student_t", 32, 2048, seed=3 + SEED)
    for qw in _zero_heavy_imatrices(2048):
        _check(x, qtype, qw, backend)


def _extreme_rows(n: int) -> np.ndarray:
    """Rows scaled to extreme magnitudes and to the edges of ggml's "all below eps" tests
    (1e-12 for IQ1_S sub-blocks, 1e-7 for IQ1_M), plus blocks of one value among zeros."""
    rng = np.random.default_rng(9 + SEED)
    base = rng.standard_t(4, size=n).astype(np.float32)
    base /= np.abs(base).max()
    rows = []
    for m in (1e-38, 1e-30, 1e-15, 1e-12, 1e-9, 1e-7, 1e-5, 1e10, 1e18, 1e30, 3e38):
        m = np.float32(m)
        for v in (np.nextafter(m, np.float32(0)), m, np.nextafter(m, np.float32(np.inf))):
            rows.append(base * v)
    one = np.zeros(n, np.float32)
    one[::16] = base[::16]
    rows.append(one)
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize(("qtype", "imat"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_magnitudes(backend, qtype, imat):
    skip_unless_implemented(backend, qtype)
    x = _extreme_rows(1024)
    with np.errstate(over="ignore"):
        _check(x, qtype, _imatrix(1024) if imat else None, backend)


@pytest.mark.parametrize("qtype", ["IQ1_S", "IQ1_M"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_imatrix(backend, qtype):
    """Expert e of a 3-D tensor uses imatrix[e]."""
    skip_unless_implemented(backend, qtype)
    check_per_expert(backend, qtype, n_expert=3, rows=8, n=1024, imatrix_seed=3)


@pytest.mark.parametrize(("qtype", "imat"), VARIANTS, ids=VARIANT_IDS)
def test_threads_and_chunks_do_not_change_bytes(qtype, imat, monkeypatch):
    """numba work split over threads and small chunks (rows with an imatrix, super-blocks
    without) gives ggml's bytes."""
    if "numba" not in BACKENDS:
        pytest.skip("numba backend not available")
    from quant import _numba

    monkeypatch.setattr(_numba, "CHUNK_ELEMS", 3 * 1024)
    x = weights.make("outlier_columns", 24, 2048, seed=4 + SEED)
    _check(x, qtype, _imatrix(2048) if imat else None, "numba", threads=2)


def _ggml_dequantize(data: np.ndarray, qtype: str, n: int) -> np.ndarray:
    from llama_cpp._ggml import libggml

    f = getattr(libggml, f"dequantize_row_{qtype.lower()}")
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data)
    out = np.empty(data.size // quant.QTYPES[qtype].type_size * 256, np.float32)
    f(data.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(-1, n)


@pytest.mark.parametrize("qtype", ["IQ1_S", "IQ1_M"])
def test_dequantize_matches_ggml(qtype):
    """``quant.dequantize`` (gguf-py) reads these bytes exactly as ggml's dequantize_row_*."""
    x = np.concatenate([_input("student_t")[:16, :2048], _input("zero_const_rows")[:16]])
    data = oracle.ggml_quantize(x, qtype, _imatrix(2048))
    ours = quant.dequantize(data, qtype, 2048)
    ref = _ggml_dequantize(data, qtype, 2048)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.abs(ours).max() > 0
