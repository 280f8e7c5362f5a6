"""IQ2_XXS, IQ2_XS and IQ2_S: byte identity with llama.cpp for every backend, with an imatrix
(and without, for IQ2_S), on the weight families of ``tests/weights.py`` and on edge cases.

``quant.quantize`` must return exactly the bytes of the real ``ggml_quantize_chunk``
(``tests/oracle.py``).  A failure names the case and how many blocks differ.  ggml refuses
IQ2_XXS and IQ2_XS without an imatrix (``ggml_quantize_requires_imatrix``), so do we.

ggml's IQ2 quantizers are slow (a scale search with neighbour lookups per 8 values), so the
volumes are small: ~0.6M values per type and imatrix setting for the compiled backends, every
4th row of them for the numpy reference (``GGUF_MOE_QUANT_TEST_FULL=1``: every row;
``GGUF_MOE_QUANT_TEST_SCALE=4`` for more rows; ``GGUF_MOE_QUANT_TEST_SEED=n`` draws others).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import quant
import weights
from bytecheck import FULL, SEED, X86, Families, check_per_expert, describe, skip_unless_implemented

oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

ROW_STRIDE = {} if FULL else {"numpy": 4, "torch:cpu": 8}
TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]
BACKENDS = quant.available_backends()
#: (type, imatrix) settings ggml accepts
SETTINGS = [(t, True) for t in TYPES] + [("IQ2_S", False)]

#: case -> (rows, n_per_row)
SHAPES = {
    "student_t": (64, 4096),
    "gaussian_f32": (16, 2048),
    "outlier_columns": (16, 4096),
    "super_weight": (4, 14336),
    "zero_const_rows": (32, 2048),
    "magnitudes": (32, 1024),
    "subnormals": (16, 2048),
    "rounding_ties": (64, 512),
    "integer_grid": (128, 256),
    "lowrank_like": (8, 4096),
}
DATA = Families(SHAPES, imatrix_seed=13, min_rows=4)
_input, _imatrix = DATA.input, DATA.imatrix


@pytest.mark.parametrize("qtype,imat", SETTINGS, ids=[f"{t}-{'imatrix' if i else 'plain'}" for t, i in SETTINGS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_match_ggml(backend, qtype, imat):
    skip_unless_implemented(backend, qtype)
    failures, blocks = DATA.compare(backend, qtype, imat, ROW_STRIDE.get(backend, 1))
    assert not failures, f"{backend} {qtype} imatrix={imat}: mismatches in {len(failures)} cases\n" + "\n".join(
        failures
    )
    assert blocks > 0


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "IQ2_XS"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_required_imatrix(backend, qtype):
    """ggml aborts on IQ2_XXS/IQ2_XS without quant weights; quantize refuses with QuantError."""
    skip_unless_implemented(backend, qtype)
    with pytest.raises(quant.QuantError, match="importance matrix"):
        quant.quantize(_input("student_t")[:2], qtype, backend=backend)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_imatrix(backend, qtype):
    """A 3-D expert tensor with one imatrix per expert (one all ones, one with many zeros)."""
    skip_unless_implemented(backend, qtype)
    check_per_expert(backend, qtype, n_expert=3, rows=4, n=1024, imatrix_seed=5)


# --------------------------------------------------------------------------- edge cases


def _large(rng, rows, n):
    """Row magnitudes 1e6 .. 1e12: the fit sums grow large but stay finite (ggml aborts
    from ~1e13 on, see test_overflowing_values_are_refused)."""
    x = rng.standard_t(4, size=(rows, n))
    x /= np.abs(x).max(axis=1, keepdims=True)
    return (x * 10.0 ** rng.uniform(6, 12, size=(rows, 1))).astype(np.float32)


def _tiny(rng, rows, n):
    """Sub-blocks whose largest |x| is near the zero thresholds (1e-15 for XXS/XS, 1e-8 for
    IQ2_S), subnormal sub-blocks, and normal ones, mixed in the same super-blocks."""
    e = rng.choice([-16.0, -15.0, -14.5, -9.0, -8.0, -7.5, -2.0], size=(rows, n // 16))
    x = rng.standard_normal((rows, n)) * 10.0 ** e.repeat(16, axis=1)
    sub = rng.random((rows, n // 16)) < 0.2
    x = np.where(sub.repeat(16, axis=1), rng.standard_normal((rows, n)) * 2.0**-140, x)
    return x.astype(np.float32)


def _signs(rng, rows, n):
    """Sign patterns of the 8-groups: all negative, exactly one negative (odd parity),
    alternating, a single non-zero value, equal magnitudes (ties in the parity flip and in
    the neighbour distances), -0.0 and constant groups."""
    x = rng.standard_t(5, size=(rows, n // 8, 8)) * 0.02
    kind = rng.integers(0, 8, size=(rows, n // 8))
    x[kind == 0] = -np.abs(x[kind == 0])
    one = np.abs(x[kind == 1])
    one[:, 3] *= -1
    x[kind == 1] = one
    x[kind == 2] = np.abs(x[kind == 2]) * np.array([1, -1, 1, -1, 1, -1, 1, -1])
    single = np.zeros_like(x[kind == 3])
    single[:, 5] = x[kind == 3][:, 5]
    x[kind == 3] = single
    x[kind == 4] = np.float32(0.015) * rng.choice([-1.0, 1.0], size=x[kind == 4].shape)
    x[kind == 5] = -0.0
    x[kind == 6] = np.float32(0.03)
    return weights.bf16_round(x.reshape(rows, n).astype(np.float32))


EDGE = {"large": _large, "tiny": _tiny, "signs": _signs}
EDGE_IMATRIX = {
    "none": lambda n: None,
    "realistic": lambda n: weights.imatrix(n, seed=5),
    "half_zero": lambda n: weights.imatrix(n, seed=6, zero_frac=0.5),
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
    rows = 12 if backend == "numpy" and not FULL else 48
    for case, gen in EDGE.items():
        x = gen(np.random.default_rng(weights._seed("iq2-edge", case, SEED)), rows, n)
        assert np.isfinite(x).all()
        for iname, im in EDGE_IMATRIX.items():
            qw = im(n)
            if qw is None and quant.QTYPES[qtype].requires_imatrix:
                continue
            got = quant.quantize(x, qtype, imatrix=qw, backend=backend)
            report = describe(got, oracle.ggml_quantize(x, qtype, qw), x, qtype)
            if report:
                failures.append(f"[{case}, imatrix {iname}] {report}")
    assert not failures, f"{backend} {qtype}: mismatches\n" + "\n".join(failures)


def _overflowing() -> np.ndarray:
    """One super-block of values ~1e16: every neighbour distance overflows float32."""
    rng = np.random.default_rng(3)
    return (rng.standard_normal((1, 256)) * 1e16).astype(np.float32)


_ABORT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import oracle
x = (np.random.default_rng(3).standard_normal((1, 256)) * 1e16).astype(np.float32)
oracle.ggml_quantize(x, "IQ2_S", np.ones(256, np.float32))
print("returned")
"""


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_values_are_refused(backend, qtype):
    """Where ggml aborts (no finite neighbour distance), quantize raises QuantError."""
    skip_unless_implemented(backend, qtype)
    qw = np.ones(256, np.float32)
    with pytest.raises(quant.QuantError, match="llama.cpp aborts"):
        quant.quantize(_overflowing(), qtype, imatrix=qw, backend=backend)


def test_ggml_aborts_on_overflowing_values():
    """The refusal above mirrors ggml: its quantizer aborts the process on the same block."""
    script = _ABORT_SCRIPT.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "returned" not in r.stdout
    assert "grid_index >= 0" in r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_iq2_xxs_overflowing_squares_match_ggml(backend):
    """Super-blocks of values ~1e20 .. 3e37 mixed with tiny ones: ``x*x`` overflows, IQ2_XXS's
    first fit (``make_qp_quants``) comes out inf/NaN and ggml carries on through its NaN
    branches without aborting (checked for these inputs); we give its bytes."""
    skip_unless_implemented(backend, "IQ2_XXS")
    rows = []
    for seed in (1, 2, 3):
        for e in (1e19, 1e20, 3e37):
            rng = np.random.default_rng(seed)
            r = (rng.standard_normal(256) * e).astype(np.float32)
            r[rng.random(256) < 0.5] *= np.float32(1e-25)
            rows.append(r)
    x = np.stack(rows)
    qw = np.ones(256, np.float32)
    got = quant.quantize(x, "IQ2_XXS", imatrix=qw, backend=backend)
    report = describe(got, oracle.ggml_quantize(x, "IQ2_XXS", qw), x, "IQ2_XXS")
    assert report is None, report


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_round_trip(qtype):
    """gguf's dequantizer reads our bytes: the reconstruction error of realistic weights is
    that of a 2-bit code (relative RMS error 0.3-0.56 here, below 0.7), zero rows stay zero."""
    x = _input("student_t")[:16].copy()
    x[3] = 0.0
    q = quant.quantize(x, qtype, imatrix=_imatrix(x.shape[1]))
    y = quant.dequantize(q, qtype, x.shape[1])
    assert y.shape == x.shape and np.isfinite(y).all()
    assert not y[3].any()
    rel = np.sqrt(((y - x) ** 2).mean(axis=1) / (x**2).mean(axis=1).clip(1e-30))
    rel = np.delete(rel, 3)
    assert rel.max() < 0.7, rel  # random bytes give ~1 or more
