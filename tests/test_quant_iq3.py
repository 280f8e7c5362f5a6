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

import functools
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import quant
import weights

oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

SCALE = float(os.environ.get("GGUF_MOE_QUANT_TEST_SCALE", "1"))
SEED = int(os.environ.get("GGUF_MOE_QUANT_TEST_SEED", "0"))
FULL = os.environ.get("GGUF_MOE_QUANT_TEST_FULL", "") not in ("", "0")
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
CASES = [c for c in SHAPES if c != "subnormals" or platform.machine().lower() in ("x86_64", "amd64")]


def _skip_unless_implemented(backend: str, qtype: str) -> None:
    mod, _ = quant._backend(backend)
    if qtype not in mod.NAMES:
        pytest.skip(f"backend {backend} does not implement {qtype}")


@functools.cache
def _input(case: str) -> np.ndarray:
    rows, n = SHAPES[case]
    x = weights.make(case, max(8, int(rows * SCALE)), n, seed=SEED)
    x.setflags(write=False)
    return x


@functools.cache
def _imatrix(n: int) -> np.ndarray:
    return weights.imatrix(n, seed=11 + SEED)


@functools.cache
def _expected(qtype: str, case: str, imat: bool) -> np.ndarray:
    x = _input(case)
    return oracle.ggml_quantize(x, qtype, _imatrix(x.shape[1]) if imat else None)


def _mismatch(ours: np.ndarray, ref: np.ndarray, qtype: str) -> tuple[int, int, str]:
    """(differing blocks, blocks, first difference as text)."""
    ts = quant.QTYPES[qtype].type_size
    a = ours.reshape(-1, ts)
    b = ref.reshape(-1, ts)
    diff = np.flatnonzero((a != b).any(axis=1))
    if diff.size == 0:
        return 0, a.shape[0], ""
    i = int(diff[0])
    return diff.size, a.shape[0], f"first: block {i}\n  ours: {a[i].tolist()}\n  ggml: {b[i].tolist()}"


@pytest.mark.parametrize("imat", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_match_ggml(backend, qtype, imat):
    _skip_unless_implemented(backend, qtype)
    stride = ROW_STRIDE.get(backend, 1)
    failures, total = [], 0
    for case in CASES:
        x = _input(case)[::stride]
        got = quant.quantize(x, qtype, imatrix=_imatrix(x.shape[1]) if imat else None, backend=backend)
        ref = _expected(qtype, case, imat)[::stride]
        assert got.shape == ref.shape and got.dtype == np.uint8
        bad, nblk, first = _mismatch(got, ref, qtype)
        total += nblk
        if bad:
            failures.append(f"[{case}] {bad} of {nblk} blocks differ; {first}")
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
    _skip_unless_implemented(backend, qtype)
    x, imats = _edge_inputs()
    for name, im in imats.items():
        ref = oracle.ggml_quantize(x, qtype, im)
        got = quant.quantize(x, qtype, imatrix=im, backend=backend)
        bad, nblk, first = _mismatch(got, ref, qtype)
        assert bad == 0, f"{backend} {qtype} imatrix={name}: {bad} of {nblk} blocks differ; {first}"
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
    _skip_unless_implemented(backend, qtype)
    n_expert, rows, n = 3, 8, 512
    x = np.stack([weights.make("student_t", rows, n, seed=e) for e in range(n_expert)])
    im = weights.expert_imatrix(n_expert, n, seed=3)
    got = quant.quantize(x, qtype, imatrix=im, backend=backend)
    for e in range(n_expert):
        bad, nblk, first = _mismatch(got[e], oracle.ggml_quantize(x[e], qtype, im[e]), qtype)
        assert bad == 0, f"{backend} {qtype} expert {e}: {bad} of {nblk} blocks differ; {first}"
    assert not np.array_equal(got[1], oracle.ggml_quantize(x[1], qtype, im[0]))


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
                bad, nblk, first = _mismatch(got, _expected(qtype, case, imat)[::4], qtype)
                assert bad == 0, f"{search} [{case}] imatrix={imat}: {bad} of {nblk} blocks differ; {first}"


@pytest.mark.parametrize("qtype", TYPES)
def test_threads_and_groups_do_not_change_bytes(qtype, monkeypatch):
    x = _input("student_t")[:24]
    qw = _imatrix(x.shape[1])
    for im in (None, qw):
        ref = oracle.ggml_quantize(x, qtype, im)
        if "numba" in BACKENDS:
            got = quant.quantize(x, qtype, imatrix=im, backend="numba", threads=2)
            assert _mismatch(got, ref, qtype)[0] == 0
        from quant import _numpy

        monkeypatch.setattr(_numpy, "GROUP_ELEMS", 3 * x.shape[1])
        got = _numpy.quantize_rows(qtype, x[:12], im, threads=2)
        assert _mismatch(got, ref[:12], qtype)[0] == 0


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
