"""IQ4_NL, IQ4_XS, MXFP4 and the ternary TQ1_0/TQ2_0: byte identity with llama.cpp for every
backend, with and without an imatrix, on the weight families of ``tests/weights.py`` and on
edge cases.

``quant.quantize`` must return exactly the bytes of the real ``ggml_quantize_chunk``
(``tests/oracle.py``).  A failure names the case and how many blocks differ.  MXFP4, TQ1_0
and TQ2_0 ignore the imatrix in ggml, so their imatrix runs are compared with ggml's plain
output.

Volume: ~2.4M values per type and imatrix setting (``GGUF_MOE_QUANT_TEST_SCALE=4`` for
more; ``GGUF_MOE_QUANT_TEST_SEED=n`` draws other weights); the slow ``torch:cpu`` path gets
every 8th row unless ``GGUF_MOE_QUANT_TEST_FULL=1``.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import quant
import weights
from bytecheck import FULL, SEED, X86, Families, check_per_expert, describe, ggml, skip_unless_implemented

oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

ROW_STRIDE = {} if FULL else {"torch:cpu": 8}
TYPES = ["IQ4_NL", "IQ4_XS", "MXFP4", "TQ1_0", "TQ2_0"]
BACKENDS = quant.available_backends()

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
# Degenerate subnormal blocks reach float->int conversions C leaves undefined (MXFP4's
# negative exponent byte); we reproduce x86-64 ggml, which the oracle is only there.
# MXFP4 and the TQ types are compared with ggml's plain output (``bytecheck.ggml``).
DATA = Families(SHAPES, imatrix_seed=11)
_input, _imatrix = DATA.input, DATA.imatrix


@pytest.mark.parametrize("imat", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_match_ggml(backend, qtype, imat):
    skip_unless_implemented(backend, qtype)
    failures, blocks = DATA.compare(backend, qtype, imat, ROW_STRIDE.get(backend, 1))
    assert not failures, f"{backend} {qtype} imatrix={imat}: mismatches in {len(failures)} cases\n" + "\n".join(
        failures
    )
    assert blocks > 0


# --------------------------------------------------------------------------- edge cases


def _huge(rng, rows, n):
    """Magnitudes 1e15 .. FLT_MAX: ``x*x`` and the fit sums overflow to inf/NaN in ggml's
    float arithmetic (IQ4 scales become NaN), MXFP4 exponents reach 253."""
    x = rng.standard_t(4, size=(rows, n))
    x /= np.abs(x).max(axis=1, keepdims=True)
    x = np.clip(x * 10.0 ** rng.uniform(15, 38.5, size=(rows, 1)), -3.4e38, 3.4e38)
    x[::5, :7] = 3.4028235e38
    x[1::5, ::3] = -3.4028235e38
    return x.astype(np.float32)


def _binade_tops(rng, rows, n):
    """Each 32-block's largest |x| is one of the 80 floats just below a power of two
    2**-148 .. 2**128 (normal and subnormal): where float32 ``log2f`` rounds up to the next
    integer, which sets MXFP4's exponent."""
    nb = n // 32
    k = rng.integers(-148, 128, size=(rows, nb))
    hi = np.where(k < -127, 1 << np.clip(k + 150, 0, 30), (k + 128) << 23)
    lo = np.where(k < -126, 1 << np.clip(k + 149, 0, 30), (k + 127) << 23)
    top = (hi - 1 - rng.integers(0, 80, size=(rows, nb)) % (hi - lo)).astype(np.uint32).view(np.float32)
    x = (rng.uniform(-1, 1, size=(rows, nb, 32)) * top[..., None]).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], size=(rows, nb)).astype(np.float32)
    np.put_along_axis(x, rng.integers(32, size=(rows, nb))[..., None], (sign * top)[..., None], axis=2)
    return x.reshape(rows, n)


def _tiny(rng, rows, n):
    """Blocks at the IQ4 zero threshold (largest |x| around 1e-15) and subnormal blocks
    mixed with normal ones in the same super-blocks."""
    x = rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-16, -14, size=(rows, n // 32)).repeat(32, axis=1)
    sub = rng.random((rows, n // 32)) < 0.3
    x = np.where(sub.repeat(32, axis=1), rng.standard_normal((rows, n)) * 2.0**-140, x)
    return x.astype(np.float32)


def _grid_ties(rng, rows, n):
    """MXFP4 decision points: blocks of 2**k * 1.5 (exponent k - 2 + 127, so d = 2**(k-3))
    with values at the exact midpoints between neighbouring grid values times d, and the
    floats next to them (the C search gives ties to the earlier index), both signs."""
    nb = n // 32
    k = rng.integers(-100, 126, size=(rows, nb, 1)).astype(np.float64)
    grid = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    v = (mids[rng.integers(7, size=(rows, nb, 32))] * 2.0 ** (k - 3)).astype(np.float32)
    step = rng.integers(-1, 2, size=v.shape)
    v = np.where(step > 0, np.nextafter(v, np.float32(np.inf)), np.where(step < 0, np.nextafter(v, np.float32(0)), v))
    v = v * rng.choice([-1.0, 1.0], size=v.shape).astype(np.float32)
    v[..., 0] = (1.5 * 2.0**k[..., 0]).astype(np.float32)
    return v.reshape(rows, n).astype(np.float32)


def _tiny_superblocks(rng, rows, n):
    """Whole 256-value blocks of subnormal and tiny values (2**-149 .. 2**-120, some zeros
    and rows of -0.0): ``1/amax`` overflows for TQ1_0/TQ2_0, whose ``lroundf(inf)`` and
    ``lroundf(NaN)`` are undefined in C (x86-64 glibc: every trit 1)."""
    e = rng.integers(-149, -120, size=(rows, n // 256)).repeat(256, axis=1).astype(np.float64)
    x = rng.standard_normal((rows, n)) * 2.0**e
    x[rng.random((rows, n)) < 0.2] = 0.0
    x[::7] = -0.0
    return x.astype(np.float32)


EDGE = {
    "huge": _huge,
    "binade_tops": _binade_tops,
    "tiny": _tiny,
    "grid_ties": _grid_ties,
    "tiny_superblocks": _tiny_superblocks,
}
EDGE_IMATRIX = {
    "none": lambda n: None,
    "realistic": lambda n: weights.imatrix(n, seed=5),
    "all_zero": lambda n: np.zeros(n, np.float32),
    "tiny": lambda n: np.full(n, 1e-30, np.float32),
    "one_hot": lambda n: np.eye(1, n, 37, dtype=np.float32)[0] * np.float32(1e4),
}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_match_ggml(backend, qtype):
    skip_unless_implemented(backend, qtype)
    if not X86:
        pytest.skip("the oracle's float->int conversions of degenerate blocks are x86-64's")
    failures = []
    n = 1024
    for case, gen in EDGE.items():
        x = gen(np.random.default_rng(weights._seed("iq4-edge", case, SEED)), 48, n)
        assert np.isfinite(x).all()
        for iname, im in EDGE_IMATRIX.items():
            qw = im(n)
            got = quant.quantize(x, qtype, imatrix=qw, backend=backend)
            report = describe(got, ggml(x, qtype, qw), x, qtype)
            if report:
                failures.append(f"[{case}, imatrix {iname}] {report}")
    assert not failures, f"{backend} {qtype}: mismatches\n" + "\n".join(failures)


def test_edge_inputs_reach_the_corner_cases():
    """The edge families exercise what they claim: ``log2f`` rounding up just below a power
    of two (MXFP4 exponent), negative exponents of subnormal blocks, and IQ4 blocks below
    the 1e-15 zero threshold next to blocks above it."""
    from quant._numpy_iq4 import floor_log2f

    x = _binade_tops(np.random.default_rng(weights._seed("iq4-edge", "binade_tops", SEED)), 48, 1024)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1)
    exponent = ((amax.view(np.uint32) >> 23).astype(np.int64) - 127)[amax >= np.float32(2.0**-126)]
    fl = floor_log2f(amax[amax >= np.float32(2.0**-126)])
    assert (fl == exponent + 1).sum() > 50 and (fl == exponent).sum() > 50
    assert (amax < np.float32(2.0**-125)).sum() > 10  # (uint8_t) of a negative float
    t = _tiny(np.random.default_rng(weights._seed("iq4-edge", "tiny", SEED)), 48, 1024)
    tmax = np.abs(t.reshape(-1, 32)).max(axis=1)
    assert (tmax < 1e-15).sum() > 100 and (tmax >= 1e-15).sum() > 100
    s = _tiny_superblocks(np.random.default_rng(weights._seed("iq4-edge", "tiny_superblocks", SEED)), 48, 1024)
    smax = np.abs(s.reshape(-1, 256)).max(axis=1)
    assert (smax[smax > 0] < np.float32(2.0**-128)).sum() > 10  # 1/amax overflows (TQ)


def test_floor_log2_table_matches_libm():
    """MXFP4's ``floorf(log2f(amax))`` table agrees with the C library's ``log2f`` (what
    ggml calls) on the 100 largest and 5 smallest floats of every binade, normal and
    subnormal, where the rounding of log2 decides the floor."""
    import ctypes.util

    from quant._numpy_iq4 import floor_log2f

    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("no C math library found")
    log2f = ctypes.CDLL(name).log2f
    log2f.restype = ctypes.c_float
    log2f.argtypes = [ctypes.c_float]
    bits = []
    for k in range(-149, 128):
        hi = (1 << (k + 150)) if k < -127 else (k + 128) << 23
        lo = (1 << (k + 149)) if k < -126 else (k + 127) << 23
        bits += range(max(lo, hi - 100), hi)
        bits += range(lo, min(hi, lo + 5))
    f = np.array(sorted(set(bits)), np.uint32).view(np.float32)
    c = np.array([np.floor(log2f(float(v))) for v in f])
    ours = floor_log2f(f)
    assert (ours == c).all(), f"{int((ours != c).sum())} of {f.size} differ, e.g. {f[ours != c][:5]}"
    assert (ours > np.floor(np.log2(f.astype(np.float64)))).sum() > 1000  # the round-ups are there


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_imatrix(backend, qtype):
    """3-D expert tensor with one imatrix per expert: expert e uses imatrix[e]."""
    skip_unless_implemented(backend, qtype)
    check_per_expert(backend, qtype, n_expert=4, rows=16, n=1024, imatrix_seed=3)


@pytest.mark.parametrize("qtype", TYPES)
def test_threads_and_groups_do_not_change_bytes(qtype, monkeypatch):
    """Row groups (numpy) and thread chunks (numba) are invisible in the bytes."""
    from quant import _numpy

    x = _input("student_t")[:24]
    qw = _imatrix(x.shape[1])
    ref = ggml(x, qtype, qw)
    monkeypatch.setattr(_numpy, "GROUP_ELEMS", 3 * x.shape[1])
    assert describe(_numpy.quantize_rows(qtype, x, qw, threads=2), ref, x, qtype) is None
    if "numba" in BACKENDS:
        assert describe(quant.quantize(x, qtype, imatrix=qw, backend="numba", threads=2), ref, x, qtype) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_and_odd_shapes(backend):
    """Single rows, one-block rows and widths that leave a partial tile of lanes."""
    rng = np.random.default_rng(weights._seed("iq4-shapes", SEED))
    failures = []
    for qtype in TYPES:
        if qtype not in quant._backend(backend)[0].NAMES:
            continue
        bs = quant.QTYPES[qtype].block_size
        for n in (bs, 3 * bs, 2560):
            for rows in (1, 3):
                x = (rng.standard_t(4, size=(rows, n)) * 0.02).astype(np.float32)
                for qw in (None, weights.imatrix(n, seed=9)):
                    got = quant.quantize(x, qtype, imatrix=qw, backend=backend, threads=2)
                    if describe(got, ggml(x, qtype, qw), x, qtype):
                        failures.append(f"{qtype} {rows}x{n} imatrix={qw is not None}")
    assert not failures, failures


def _ggml_dequantize(data: np.ndarray, qtype: str, n: int) -> np.ndarray:
    """ggml's own ``to_float`` for ``qtype`` (``ggml_get_type_traits``)."""
    from llama_cpp._ggml import libggml

    class Traits(ctypes.Structure):
        _fields_ = [
            ("type_name", ctypes.c_char_p),
            ("blck_size", ctypes.c_int64),
            ("blck_size_interleave", ctypes.c_int64),
            ("type_size", ctypes.c_size_t),
            ("is_quantized", ctypes.c_bool),
            ("to_float", ctypes.c_void_p),
            ("from_float_ref", ctypes.c_void_p),
        ]

    get = libggml.ggml_get_type_traits
    get.restype = ctypes.POINTER(Traits)
    get.argtypes = [ctypes.c_int]
    traits = get(int(quant.QTYPES[qtype].ggml)).contents
    assert traits.type_name.decode().upper() == qtype
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    data = np.ascontiguousarray(data)
    out = np.empty(data.size // quant.row_bytes(qtype, n) * n, np.float32)
    to_float(data.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(-1, n)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_ggml(qtype):
    """``quant.dequantize`` (gguf-py) reads our bytes as ggml's ``to_float`` does."""
    x = np.concatenate([_input("student_t")[:8, :2048], _input("zero_const_rows")[:8]])
    q = quant.quantize(x, qtype, imatrix=_imatrix(2048))
    back = quant.dequantize(q, qtype, 2048)
    np.testing.assert_array_equal(back, _ggml_dequantize(q, qtype, 2048))
    # and they approximate the weights (rows of realistic weights; tiny constant rows
    # legitimately become 0 when the fp16 super-block scale underflows): within 1/4 of the
    # row's largest magnitude for the 4-bit types, 1/2 (+ fp16 rounding) for ternary ones
    err = np.abs(back[:8] - x[:8]).max(axis=1) / np.abs(x[:8]).max(axis=1)
    assert (err < (0.51 if qtype.startswith("TQ") else 0.25)).all(), err
