"""Byte identity with llama.cpp: every type x with/without imatrix x every available backend.

``quant.quantize`` must return exactly the bytes of the real ``ggml_quantize_chunk``
(``tests/oracle.py``) on the weights of ``tests/weights.py``.  On a mismatch the failure
names the case, how many blocks differ and shows the first differing block.

Volume: by default ~37k super-blocks (9.5M values) per type and imatrix setting for the
compiled/fast backends; the slow ``torch:cpu`` path (the CUDA kernels run on CPU) gets every
16th row of each case unless ``GGUF_MOE_QUANT_TEST_FULL=1``.
``GGUF_MOE_QUANT_TEST_SCALE=4`` multiplies the row counts (heavier runs);
``GGUF_MOE_QUANT_TEST_SEED=n`` draws other weights and imatrices.
"""

from __future__ import annotations

import pytest

import quant
from bytecheck import FULL, SCALE, Families, check_per_expert, describe, skip_unless_implemented

oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

#: backend -> row stride used on each case (1 = every row)
ROW_STRIDE = {} if FULL else {"torch:cpu": 16}
TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
BACKENDS = quant.available_backends()

#: case -> (rows, n_per_row); n covers 1 super-block rows, typical widths and Mixtral's 14336.
SHAPES = {
    "student_t": (640, 4096),
    "gaussian_f32": (320, 2048),
    "outlier_columns": (320, 4096),
    "super_weight": (96, 14336),
    "zero_const_rows": (384, 2048),
    "magnitudes": (512, 1024),
    "subnormals": (192, 2048),
    "rounding_ties": (1024, 512),
    "integer_grid": (2048, 256),
    "lowrank_like": (192, 4096),
}
# Q8_0 is compared with ggml's plain output even with an imatrix (ggml ignores it there).
DATA = Families(SHAPES, imatrix_seed=7)
CASES = DATA.cases
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


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_imatrix(backend, qtype):
    """3-D expert tensor with an imatrix per expert: expert e uses imatrix[e] (llama.cpp's
    ``imatrix + (row / ne1) * ne0``)."""
    skip_unless_implemented(backend, qtype)
    got = check_per_expert(backend, qtype, n_expert=4, rows=24, n=1024, imatrix_seed=3)
    assert got.shape == (4, 24, quant.row_bytes(qtype, 1024))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_1", "Q6_K", "Q2_K", "Q3_K"])
def test_grouping_and_threads_do_not_change_bytes(qtype, monkeypatch):
    """Row grouping and threads are invisible: tiny groups and 2 threads give ggml's bytes."""
    from quant import _numpy

    x = _input("student_t")[:40]
    qw = _imatrix(x.shape[1])
    ref = oracle.ggml_quantize(x, qtype, qw)
    monkeypatch.setattr(_numpy, "GROUP_ELEMS", 3 * x.shape[1])
    got = _numpy.quantize_rows(qtype, x, qw, threads=2)
    assert describe(got, ref, x, qtype) is None


def test_enough_volume():
    """The default run compares at least ~20k super-blocks per K type."""
    n_values = sum(_input(c).size for c in CASES)
    assert n_values // 256 >= 20000 * min(SCALE, 1.0)
