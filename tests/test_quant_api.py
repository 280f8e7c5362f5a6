"""Behaviour of the ``quant`` API: shapes, type names, errors, round trips, float types.

Byte identity with llama.cpp is in ``test_quant_bytes.py``; here we check what callers
rely on, with hypothesis property tests where a property holds for every input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quant
import weights
from quant import QuantError

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ROOT = Path(__file__).resolve().parent.parent

#: Largest per-block reconstruction error without an imatrix, as a fraction of the block's
#: (super-block's for K types) largest |x|, plus a small absolute term for fp16 scale
#: underflow.  Q8_0: half a step (1/254) + fp16 rounding of d; Q4_0/Q5_0: one step at the
#: clipped end (1/8, 1/16); Q4_1/Q5_1: half a step of (max-min)/15 (/31); K types: half a step
#: plus 4/6-bit scale/min rounding and the search's deliberate clipping (Q3_K: one step of
#: amax/4 at the clipped end; Q2_K: 4 levels whose absolute-error fit may clip the extremes).
ERROR_BOUND = {
    "Q8_0": 0.005,
    "Q4_0": 0.13,
    "Q5_0": 0.066,
    "Q4_1": 0.07,
    "Q5_1": 0.035,
    "Q2_K": 0.7,
    "Q3_K": 0.3,
    "Q4_K": 0.16,
    "Q5_K": 0.09,
    "Q6_K": 0.04,
}
ABS_SLACK = 1e-4

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _bs(qtype):
    return quant.block_size(qtype)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("qtype", BLOCK_TYPES + ["F16", "BF16", "F32"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 1, 3)])
def test_shapes_any_leading_dims(qtype, lead):
    n = 2 * max(_bs(qtype), 32)
    x = weights.make("student_t", int(np.prod(lead, dtype=int)), n).reshape(*lead, n)
    got = quant.quantize(x, qtype, backend="numpy")
    assert got.dtype == np.uint8
    assert got.shape == lead + (quant.row_bytes(qtype, n),)
    flat = quant.quantize(x.reshape(-1, n), qtype, backend="numpy")
    assert np.array_equal(got.reshape(-1, got.shape[-1]), flat)
    back = quant.dequantize(got, qtype, n)
    assert back.shape == lead + (n,) and back.dtype == np.float32


@PROPERTY
@given(
    qtype=st.sampled_from(BLOCK_TYPES),
    lead=st.lists(st.integers(0, 3), max_size=3).map(tuple),
    nblk=st.integers(1, 3),
    per_matrix_imatrix=st.booleans(),
)
def test_shapes_property(qtype, lead, nblk, per_matrix_imatrix):
    n = nblk * _bs(qtype)
    rows = int(np.prod(lead, dtype=int))
    x = weights.make("student_t", max(rows, 1), n)[:rows].reshape(*lead, n)
    qw = None
    if len(lead) >= 1:
        rng = np.random.default_rng(len(lead))
        qw = (rng.standard_normal(lead[:-1] + (n,)) ** 2).astype(np.float32)  # one per matrix
        if not per_matrix_imatrix:
            qw = weights.imatrix(n)
    got = quant.quantize(x, qtype, imatrix=qw, backend="numpy")
    assert got.shape == lead + (quant.row_bytes(qtype, n),) and got.dtype == np.uint8
    assert quant.dequantize(got, qtype, n).shape == lead + (n,)


def test_row_bytes_and_sizes_match_gguf():
    from gguf import GGML_QUANT_SIZES

    for name, q in quant.QTYPES.items():
        bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert (q.block_size, q.type_size) == (bs, ts)
        assert quant.row_bytes(name, 4 * bs) == 4 * ts


def test_empty_input():
    assert quant.quantize(np.zeros((0, 256), np.float32), "Q4_K").shape == (0, 144)
    assert quant.quantize(np.zeros((2, 0, 32), np.float32), "Q8_0").shape == (2, 0, 34)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("spelling", ["q4_k", "Q4_K", " q4_K ", GGMLQuantizationType.Q4_K])
def test_type_names_case_insensitive_and_enum(spelling):
    x = weights.make("student_t", 2, 256)
    ref = quant.quantize(x, "Q4_K", backend="numpy")
    assert np.array_equal(quant.quantize(x, spelling, backend="numpy"), ref)
    assert quant.qtype_of(spelling).name == "Q4_K"


@pytest.mark.parametrize("bad", ["Q3_K_M", "Q8_1", "q4", "", GGMLQuantizationType.Q8_K])
def test_unknown_type(bad):
    with pytest.raises(QuantError, match="unsupported quant type"):
        quant.quantize(np.zeros((1, 256), np.float32), bad)


def test_type_of_wrong_kind():
    with pytest.raises(QuantError, match="name or GGMLQuantizationType"):
        quant.quantize(np.zeros((1, 256), np.float32), 12)


def test_backend_lacking_a_type(monkeypatch):
    """A backend implements the types in its ``NAMES``: named explicitly, a missing type is a
    QuantError naming both; as the default backend, numba (else numpy) quantizes that type
    instead."""
    import types

    from quant import _numpy

    calls = []

    def quantize_rows(name, x, qw, threads=None):
        calls.append(name)
        return _numpy.quantize_rows(name, x, qw, threads=threads)

    partial = types.SimpleNamespace(NAMES=("Q8_0",), quantize_rows=quantize_rows)
    monkeypatch.setitem(quant._BACKEND_MODULES, "partial", "quant._partial_test_backend")
    monkeypatch.setitem(quant._loaded, "partial", partial)
    x = weights.make("student_t", 2, 256)
    with pytest.raises(QuantError, match=r"backend 'partial' does not implement Q3_K"):
        quant.quantize(x, "Q3_K", backend="partial")
    assert calls == []
    monkeypatch.setenv("GGUF_MOE_QUANT_BACKEND", "partial")
    got = quant.quantize(x, "Q3_K")
    assert calls == [] and np.array_equal(got, quant.quantize(x, "Q3_K", backend="numpy"))
    expected = "numba" if "numba" in quant.available_backends() else "numpy"
    assert quant._backend_for("Q3_K", None)[0] is quant._backend(expected)[0]
    quant.quantize(x, "Q8_0")
    assert calls == ["Q8_0"]


def test_every_type_in_the_numpy_backend():
    from quant import _numpy

    assert set(_numpy.NAMES) == set(quant.BLOCK_TYPES)


def test_unknown_backend():
    with pytest.raises(QuantError, match="unknown backend"):
        quant.quantize(np.zeros((1, 32), np.float32), "Q8_0", backend="fortran")


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("qtype,n", [("Q4_K", 4096 + 32), ("Q8_0", 33), ("Q6_K", 128), ("Q5_1", 16)])
def test_bad_row_length(qtype, n):
    with pytest.raises(QuantError, match=rf"row length {n} is not a multiple of the block size {_bs(qtype)}"):
        quant.quantize(np.zeros((2, n), np.float32), qtype)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, bool, np.complex64])
def test_non_float_input(dtype):
    with pytest.raises(QuantError, match="floating point"):
        quant.quantize(np.zeros((2, 256), dtype), "Q4_K")


def test_scalar_input():
    with pytest.raises(QuantError, match="at least one dimension"):
        quant.quantize(np.float32(1.0), "Q8_0")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_non_finite_input_names_the_row(bad, qtype):
    x = weights.make("student_t", 6, 512)
    x[4, 300] = bad
    x[5, 7] = bad
    with pytest.raises(QuantError, match=r"non-finite value in row 4 \(column 300; 2 bad rows\)"):
        quant.quantize(x, qtype, backend="numpy")


def test_float_input_dtypes_accepted():
    x = weights.make("student_t", 3, 256)
    ref = quant.quantize(x, "Q6_K", backend="numpy")
    assert np.array_equal(quant.quantize(x.astype(np.float64), "Q6_K", backend="numpy"), ref)
    assert np.array_equal(quant.quantize(np.asfortranarray(x), "Q6_K", backend="numpy"), ref)
    h = x.astype(np.float16)
    assert np.array_equal(
        quant.quantize(h, "Q6_K", backend="numpy"), quant.quantize(h.astype(np.float32), "Q6_K", backend="numpy")
    )


@pytest.mark.parametrize(
    "shape,qw_shape",
    [((4, 256), (255,)), ((4, 256), (512,)), ((4, 256), (1, 256)), ((2, 4, 256), (3, 256)), ((2, 4, 256), (2, 4, 256))],
)
def test_bad_imatrix_shape(shape, qw_shape):
    with pytest.raises(QuantError, match=r"imatrix shape .* does not match input"):
        quant.quantize(np.ones(shape, np.float32), "Q4_K", imatrix=np.ones(qw_shape, np.float32))


def test_non_finite_imatrix():
    qw = np.ones(256, np.float32)
    qw[3] = np.nan
    with pytest.raises(QuantError, match="imatrix contains non-finite"):
        quant.quantize(np.ones((2, 256), np.float32), "Q5_K", imatrix=qw)


def test_imatrix_ignored_by_q8_0_and_used_by_others():
    x = weights.make("student_t", 8, 512)
    qw = weights.imatrix(512)
    assert np.array_equal(quant.quantize(x, "Q8_0", imatrix=qw), quant.quantize(x, "Q8_0"))
    for qtype in BLOCK_TYPES[1:]:
        assert not np.array_equal(
            quant.quantize(x, qtype, imatrix=qw, backend="numpy"), quant.quantize(x, qtype, backend="numpy")
        ), qtype


def test_per_expert_imatrix_equals_per_expert_calls():
    x = np.stack([weights.make("outlier_columns", 5, 512, seed=e) for e in range(3)])
    im = weights.expert_imatrix(3, 512)
    got = quant.quantize(x, "Q4_K", imatrix=im, backend="numpy")
    for e in range(3):
        assert np.array_equal(got[e], quant.quantize(x[e], "Q4_K", imatrix=im[e], backend="numpy"))
    # one shared imatrix for a 3-D tensor applies to every expert
    shared = quant.quantize(x, "Q4_K", imatrix=im[1], backend="numpy")
    assert np.array_equal(shared[0], quant.quantize(x[0], "Q4_K", imatrix=im[1], backend="numpy"))


def test_dequantize_errors():
    with pytest.raises(QuantError, match="uint8"):
        quant.dequantize(np.zeros(34, np.int8), "Q8_0", 32)
    with pytest.raises(QuantError, match="whole number"):
        quant.dequantize(np.zeros(35, np.uint8), "Q8_0", 32)
    with pytest.raises(QuantError, match="not a multiple"):
        quant.dequantize(np.zeros(34, np.uint8), "Q8_0", 31)


# --------------------------------------------------------------------------- properties

_finite = st.floats(-1000, 1000, width=32, allow_subnormal=False)


@st.composite
def _matrices(draw, qtype):
    bs = _bs(qtype)
    rows = draw(st.integers(1, 3))
    nblk = draw(st.integers(1, 3))
    elems = st.one_of(_finite, st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-3]))
    x = draw(hnp.arrays(np.float32, (rows, nblk * bs), elements=elems))
    scale = draw(st.sampled_from([1.0, 1e-3, 2.0**-10, 37.0]))
    return (x * np.float32(scale)).astype(np.float32)


def _block_errors(x, qtype, y):
    bs = _bs(qtype)
    xb = x.reshape(-1, bs).astype(np.float64)
    err = np.abs(xb - y.reshape(-1, bs)).max(axis=1)
    return err, np.abs(xb).max(axis=1)


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_roundtrip_error_bound(qtype):
    @PROPERTY
    @given(x=_matrices(qtype))
    def check(x):
        q = quant.quantize(x, qtype, backend="numpy")
        y = quant.dequantize(q, qtype, x.shape[-1])
        err, amax = _block_errors(x, qtype, y)
        bound = ERROR_BOUND[qtype] * amax + ABS_SLACK
        worst = int(np.argmax(err - bound))
        assert (err <= bound).all(), f"block {worst}: error {err[worst]:.6g} > {bound[worst]:.6g} (amax {amax[worst]:.6g})"

    check()


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_roundtrip_error_bound_realistic(qtype):
    """Same bound on every realistic weight case (bf16 rows, outliers, ties, ...)."""
    for case in weights.CASES:
        if case in ("magnitudes", "subnormals"):
            continue  # fp16 scales over/underflow there by design
        x = weights.make(case, 16, 1024)
        y = quant.dequantize(quant.quantize(x, qtype, backend="numpy"), qtype, 1024)
        err, amax = _block_errors(x, qtype, y)
        assert (err <= ERROR_BOUND[qtype] * amax + ABS_SLACK).all(), case


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_deterministic(qtype):
    @PROPERTY
    @given(x=_matrices(qtype), imat=st.booleans())
    def check(x, imat):
        qw = weights.imatrix(x.shape[1], seed=int(x.shape[0])) if imat else None
        a = quant.quantize(x, qtype, imatrix=qw, backend="numpy")
        b = quant.quantize(x.copy(), qtype, imatrix=None if qw is None else qw.copy(), backend="numpy")
        assert np.array_equal(a, b)
        # zero-importance everywhere is still a valid input: finite output, right size
        assert a.shape == (x.shape[0], quant.row_bytes(qtype, x.shape[1]))

    check()


def test_q8_0_requantize_is_identity_where_scale_nonzero():
    @PROPERTY
    @given(x=_matrices("Q8_0"))
    def check(x):
        q = quant.quantize(x, "Q8_0", backend="numpy")
        y = quant.dequantize(q, "Q8_0", x.shape[1])
        q2 = quant.quantize(y, "Q8_0", backend="numpy")
        blocks = q.reshape(-1, 34)
        keep = blocks[:, :2].copy().view(np.float16)[:, 0] != 0
        assert np.array_equal(blocks[keep], q2.reshape(-1, 34)[keep])

    check()


def test_q8_0_tiny_scale_policy():
    """|x| ~ 1e-6: the fp16 scale underflows to 0 while the quants stay non-zero, exactly
    as ggml stores it; dequantizing such a block gives zeros (documented in docs/quant.md)."""
    x = np.full((1, 32), 2e-6, np.float32)
    q = quant.quantize(x, "Q8_0", backend="numpy")
    assert q[0, :2].tolist() == [0, 0] and (q[0, 2:].view(np.int8) == 127).all()
    assert (quant.dequantize(q, "Q8_0", 32) == 0).all()


def _edge_blocks():
    """Hand-built blocks with the bytes ggml writes for them (docs/quant.md)."""
    q8 = np.zeros(32, np.float32)
    q8[:5] = [127.0, 0.5, 1.5, -0.5, -2.5]  # d = 1 exactly; roundf ties go away from zero
    q8_bytes = [0x00, 0x3C, 127, 1, 2, 0xFF, 0xFD] + [0] * 27  # 0.5->1, 1.5->2, -0.5->-1, -2.5->-3
    q5_1 = np.zeros(32, np.float32)
    q5_1[0] = -0.0  # min/max of an all-zero block are its first value: m = -0.0
    return [
        # Q4_0 all-zero block: d = 0/-8 = -0.0 (0x8000); q = (int8)(0*0 + 8.5) = 8 -> 0x88
        ("Q4_0", np.zeros(32, np.float32), [0x00, 0x80] + [0x88] * 16),
        # Q5_0 all-zero block: d = -0.0; q = 16 -> low nibbles 0, bit 4 set in every qh bit
        ("Q5_0", np.zeros(32, np.float32), [0x00, 0x80] + [0xFF] * 4 + [0x00] * 16),
        ("Q5_1", q5_1, [0, 0, 0x00, 0x80] + [0] * 20),
        ("Q8_0", q8, q8_bytes),
        # Q6_K all-zero super-block: 210 zero bytes (not quants of 32)
        ("Q6_K", np.zeros(256, np.float32), [0] * 210),
    ]


@pytest.mark.parametrize("qtype,x,expected", _edge_blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_edge_blocks(qtype, x, expected):
    got = quant.quantize(x, qtype, backend="numpy")
    assert got.tolist() == expected
    oracle = pytest.importorskip("oracle")
    assert oracle.ggml_quantize(x[None], qtype)[0].tolist() == expected


# --------------------------------------------------------------------------- float types


def _specials():
    x = weights.make("gaussian_f32", 4, 256)
    x[0, :16] = [0.0, -0.0, 1e-40, -1e-45, 65504.0, 65520.0, 1e6, -1e6, 3.4e38, 5.96e-8, 2.98e-8, 1.0, -2.5, 1e-5, 6.1e-5, 6.0e-5]
    x[1, :4] = [np.inf, -np.inf, np.nan, -np.nan]
    x[1, 4] = np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]  # signalling NaN
    x[1, 5] = np.frombuffer(np.uint32(0xFFC12345).tobytes(), np.float32)[0]
    x[2] = weights.bf16_round(x[2]) + np.float32(2.0**-20)  # near bf16 ties
    x[3, ::2] = np.frombuffer((np.arange(128, dtype=np.uint32) << 15 | 0x3F800000).tobytes(), np.float32)  # exact ties
    return x


def test_f32_is_identity_bytes():
    x = _specials()
    assert quant.quantize(x, "F32").tobytes() == x.tobytes()


def test_f16_matches_numpy_and_gguf():
    x = _specials()
    got = quant.quantize(x, "F16")
    with np.errstate(over="ignore"):
        assert got.tobytes() == x.astype(np.float16).tobytes()
        assert got.tobytes() == gguf_quantize(x, GGMLQuantizationType.F16).tobytes()


def test_bf16_matches_gguf():
    x = _specials()
    got = quant.quantize(x, "BF16")
    assert got.tobytes() == gguf_quantize(x, GGMLQuantizationType.BF16).tobytes()
    y = quant.dequantize(got, "BF16", x.shape[1])
    fin = np.isfinite(x) & (np.abs(x) < 3e38) & (np.abs(x) >= np.finfo(np.float32).tiny)  # normal range
    assert np.allclose(y[fin], x[fin], rtol=2**-8, atol=0)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32"])
def test_float_types_match_ggml(qtype):
    oracle = pytest.importorskip("oracle")
    x = _specials()
    fin = np.isfinite(x).all(axis=1)  # ggml's NaN payloads are its own business
    assert np.array_equal(quant.quantize(x[fin], qtype), oracle.ggml_quantize(x[fin], qtype))


def test_float_roundtrip():
    x = weights.make("student_t", 3, 64)  # bf16 values: exact in BF16 and F32
    for qtype in ("F32", "BF16"):
        assert np.array_equal(quant.dequantize(quant.quantize(x, qtype), qtype, 64), x)
    h = x.astype(np.float16).astype(np.float32)
    assert np.array_equal(quant.dequantize(quant.quantize(h, "F16"), "F16", 64), h)


# --------------------------------------------------------------------------- packaging


def test_backends_listed_and_numpy_present():
    avail = quant.available_backends()
    assert "numpy" in avail


def test_quant_never_imports_gguf_moe():
    code = (
        "import sys\n"
        "sys.modules['gguf_moe'] = None  # any import of gguf_moe now raises ImportError\n"
        "import numpy as np, quant\n"
        "for b in quant.available_backends():\n"
        "    for t in ('Q8_0', 'Q4_K', 'Q5_1', 'Q6_K'):\n"
        "        quant.quantize(np.ones((2, 256), np.float32), t, backend=b)\n"
        "    quant.quantize(np.ones((2, 256), np.float32), 'Q5_K', imatrix=np.ones(256, np.float32), backend=b)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('gguf_moe', 'click', 'rich')) and sys.modules[m])\n"
        "assert not bad, bad\n"
        "print('ok', quant.available_backends())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")
