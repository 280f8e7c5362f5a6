"""IQ3_XXS and IQ3_S: byte identity with llama.cpp's ``ggml_quantize_chunk``.

Every backend implementing the types x with/without imatrix, on the weight families of
``tests/weights.py`` plus i-quant edge cases (imatrix zeros over whole blocks, sign parity,
zero sub-blocks inside a super-block, values near where ggml's grid search gives up).
On a mismatch the failure names the case and the number of differing blocks.

Volume: ~9k super-blocks per type and imatrix setting for numba, every 7th row of each case
for the (slower) numpy reference.  ``GGUF_MOE_QUANT_TEST_SCALE=4`` multiplies the row
counts; ``GGUF_MOE_QUANT_TEST_FULL=1`` gives numpy every row;
``GGUF_MOE_QUANT_TEST_SEED=n`` draws other weights and imatrices.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import quant
import weights
from bytecheck import FULL, Families, check_per_expert, describe, skip_unless_implemented

oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

TYPES = ["IQ3_XXS", "IQ3_S"]
BACKENDS = quant.available_backends()
#: backend -> row stride (7 is coprime with the 8 row kinds of zero_const_rows)
ROW_STRIDE = {} if FULL else {"numpy": 7, "torch:cpu": 7}

SHAPES = {
    "student_t": (128, 4096),
    "gaussian_f32": (64, 2048),
    "outlier_columns": (64, 4096),
    "super_weight": (16, 14336),
    "zero_const_rows": (128, 2048),
    "magnitudes": (128, 1024),
    "subnormals": (64, 2048),
    "rounding_ties": (256, 512),
    "integer_grid": (512, 256),
    "lowrank_like": (64, 4096),
}
DATA = Families(SHAPES, imatrix_seed=11, min_rows=8)
_input, _imatrix, _expected = DATA.input, DATA.imatrix, DATA.expected


@pytest.mark.parametrize("imat", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_match_ggml(backend, qtype, imat):
    skip_unless_implemented(backend, qtype)
    failures, total = DATA.compare(backend, qtype, imat, ROW_STRIDE.get(backend, 1))
    print(f"{backend} {qtype} imatrix={imat}: {total} blocks compared, {len(failures)} cases differ")
    assert not failures, f"{backend} {qtype} imatrix={imat}:\n" + "\n".join(failures)
    assert total > 0


def _edge_inputs(n: int = 1024) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows aimed at the i-quant specific branches, and imatrices with zeros in bulk."""
    rng = np.random.default_rng(5)
    rows = []
    base = (rng.standard_t(4, size=(8, n)) * 0.02).astype(np.float32)
    rows.append(base)
    # odd number of negatives in every group of 8 (IQ3_XXS's parity flip)
    v = np.abs(rng.standard_normal((8, n))).astype(np.float32) * 0.05
    g = v.reshape(8, -1, 8)
    g[:, :, 0] *= -1
    g[:4, :, 3] *= -1
    g[:4, :, 5] *= -1
    rows.append(v)
    # one 32-value sub-block (or several) of zeros inside a super-block: IQ3_S's skipped
    # sub-blocks move later ones forward in qs/signs; and one non-zero value per sub-block
    z = (rng.standard_normal((8, n)) * 0.1).astype(np.float32)
    for r in range(8):
        for sb in range(n // 256):
            k = rng.integers(1, 4)
            z[r, sb * 256 + 32 * rng.choice(8, size=k, replace=False)[:, None] + np.arange(32)] = 0.0
    z[7] = 0.0
    z[7, ::32] = rng.standard_normal(n // 32).astype(np.float32)
    rows.append(z)
    # sub-blocks whose largest value is just below/above GROUP_MAX_EPS_IQ3_XXS (1e-8), and tiny rows
    t = (rng.standard_normal((8, n)) * np.array([1e-9, 3e-9, 6e-9, 1e-8, 2e-8, 1e-7, 1e-30, 1e-40])[:, None]).astype(
        np.float32
    )
    rows.append(t)
    # large magnitudes that ggml still quantizes (1e12 without imatrix)
    rows.append((rng.standard_normal((4, n)) * np.array([1e6, 1e9, 1e11, 1e12])[:, None]).astype(np.float32))
    x = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
    im = weights.imatrix(n, seed=3)
    zb = im.copy()
    zb[32:64] = 0.0  # a whole sub-block without weight
    zb[256:512] = 0.0  # a whole super-block without weight
    zb[rng.random(n) < 0.3] = 0.0
    ones_zero = np.zeros(n, np.float32)
    ones_zero[::97] = 1.0
    negz = im.copy()
    negz[rng.random(n) < 0.3] = -0.0  # -0.0 weights: distances of -0.0 and +0.0 tie in C
    negz[512:544] = -0.0
    return x, {
        "none": None,
        "holes": zb,
        "mostly_zero": ones_zero,
        "all_zero": np.zeros(n, np.float32),
        "negative_zero": negz,
    }


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, qtype):
    skip_unless_implemented(backend, qtype)
    x, imats = _edge_inputs()
    for name, im in imats.items():
        ref = oracle.ggml_quantize(x, qtype, im)
        got = quant.quantize(x, qtype, imatrix=im, backend=backend)
        report = describe(got, ref, x, qtype)
        assert report is None, f"{backend} {qtype} imatrix={name}: {report}"
        back = quant.dequantize(got, qtype, x.shape[1])
        # the last 4 rows overflow fp16's d to inf by design; the others must round-trip
        assert back.shape == x.shape and np.isfinite(back[:-4]).all()
        if im is None:  # gguf's dequantizer reads our bytes back to the weights (3 bits: rough)
            err = np.sqrt(np.mean((back[:8] - x[:8]) ** 2)) / np.sqrt(np.mean(x[:8] ** 2))
            assert err < 0.3, err


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_imatrix(backend, qtype):
    """[n_expert, rows, n] with one imatrix per expert: expert e uses imatrix[e]."""
    skip_unless_implemented(backend, qtype)
    check_per_expert(backend, qtype, n_expert=3, rows=8, n=512, imatrix_seed=3)


@pytest.mark.parametrize("qtype", TYPES)
def test_numba_both_neighbour_searches(qtype, monkeypatch):
    """numba has an AVX2 neighbour search (used where the CPU has AVX2) and a scalar one
    (elsewhere): both give ggml's bytes, whichever this machine uses by default."""
    if "numba" not in BACKENDS:
        pytest.skip("numba backend not available")
    from quant import _numba_iq3

    cases = ["student_t", "zero_const_rows", "super_weight", "rounding_ties"]
    for search in ["scalar", "avx2"] if _numba_iq3._host_simd() == "avx2" else ["scalar"]:
        monkeypatch.setattr(_numba_iq3, "SEARCH", search)
        for case in cases:
            x = _input(case)[::4]
            for imat in (False, True):
                got = quant.quantize(x, qtype, imatrix=_imatrix(x.shape[1]) if imat else None, backend="numba")
                report = describe(got, _expected(qtype, case, imat)[::4], x, qtype)
                assert report is None, f"{search} [{case}] imatrix={imat}: {report}"


@pytest.mark.parametrize("qtype", TYPES)
def test_threads_and_groups_do_not_change_bytes(qtype, monkeypatch):
    x = _input("student_t")[:24]
    qw = _imatrix(x.shape[1])
    for im in (None, qw):
        ref = oracle.ggml_quantize(x, qtype, im)
        if "numba" in BACKENDS:
            got = quant.quantize(x, qtype, imatrix=im, backend="numba", threads=2)
            assert describe(got, ref, x, qtype) is None
        from quant import _numpy

        monkeypatch.setattr(_numpy, "GROUP_ELEMS", 3 * x.shape[1])
        got = _numpy.quantize_rows(qtype, x[:12], im, threads=2)
        assert describe(got, ref[:12], x[:12], qtype) is None


_ABORT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, oracle
x = np.full((1, 256), {value!r}, np.float32)
x[0, ::3] *= -0.5
oracle.ggml_quantize(x, {qtype!r})
print("quantize" + "d without error")
"""


@pytest.mark.parametrize("qtype", TYPES)
def test_values_ggml_cannot_quantize_raise(qtype):
    """Where ggml's neighbour search finds no candidate it aborts the process
    (GGML_ASSERT); we raise QuantError instead, on exactly such input."""
    value = 1e16
    x = np.full((1, 256), value, np.float32)
    x[0, ::3] *= -0.5
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run(
        [sys.executable, "-c", _ABORT_SCRIPT.format(tests=tests, value=value, qtype=qtype)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )
    assert r.returncode != 0 and "quantized without error" not in r.stdout and "GGML_ASSERT" in r.stderr
    for backend in BACKENDS:
        mod, _ = quant._backend(backend)
        if qtype in mod.NAMES:
            with pytest.raises(quant.QuantError, match="no finite distance"):
                quant.quantize(x, qtype, backend=backend)
