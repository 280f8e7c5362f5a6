"""What the byte-identity tests (``test_quant_bytes.py``, ``test_quant_iq*.py``) share: the
environment knobs, the cached weight families and ggml's bytes for them, and the report of
differing blocks.

``GGUF_MOE_QUANT_TEST_SCALE=4`` multiplies the row counts, ``GGUF_MOE_QUANT_TEST_SEED=n``
draws other weights and imatrices, ``GGUF_MOE_QUANT_TEST_FULL=1`` gives the slow backends
every row.  The test modules import ``oracle`` (skipping when it is missing) before using this.
"""

from __future__ import annotations

import functools
import os
import platform

import numpy as np
import pytest

import quant
import weights

SCALE = float(os.environ.get("GGUF_MOE_QUANT_TEST_SCALE", "1"))
SEED = int(os.environ.get("GGUF_MOE_QUANT_TEST_SEED", "0"))
FULL = os.environ.get("GGUF_MOE_QUANT_TEST_FULL", "") not in ("", "0")
# The degenerate blocks of "subnormals" hit float->int casts that C leaves undefined; we
# reproduce x86-64 ggml, which is what the oracle is on x86-64 only.
X86 = platform.machine().lower() in ("x86_64", "amd64")


def skip_unless_implemented(backend: str, qtype: str) -> None:
    """A backend may not implement every type yet (its ``NAMES``); ``quantize`` refuses such a
    pair when the backend is named, so there is nothing to compare."""
    mod, _ = quant._backend(backend)
    if qtype not in mod.NAMES:
        pytest.skip(f"backend {backend} does not implement {qtype} (not in its NAMES)")


def ggml(x: np.ndarray, qtype: str, qw: np.ndarray | None) -> np.ndarray:
    """ggml's bytes; types that ggml quantizes without the imatrix (Q8_0, MXFP4, TQ*) get none."""
    import oracle

    return oracle.ggml_quantize(x, qtype, qw if quant.QTYPES[qtype].uses_imatrix else None)


def describe(ours: np.ndarray, ref: np.ndarray, x: np.ndarray, qtype: str) -> str | None:
    """None when equal, else a report: number of differing blocks and the first one."""
    q = quant.QTYPES[qtype]
    a = ours.reshape(-1, q.type_size)
    b = ref.reshape(-1, q.type_size)
    diff = np.flatnonzero((a != b).any(axis=1))
    if diff.size == 0:
        return None
    i = int(diff[0])
    per_row = x.shape[-1] // q.block_size
    vals = x.reshape(-1, q.block_size)[i]
    return (
        f"{diff.size} of {a.shape[0]} blocks differ; first: block {i} (row {i // per_row}, "
        f"block {i % per_row} in row), bytes at {np.flatnonzero(a[i] != b[i])[:16].tolist()}\n"
        f"  ours: {a[i].tolist()}\n  ggml: {b[i].tolist()}\n"
        f"  input (first 32): {vals[:32].tolist()}"
    )


def check_per_expert(backend: str, qtype: str, n_expert: int, rows: int, n: int, imatrix_seed: int) -> np.ndarray:
    """A 3-D expert tensor of "student_t" weights with one imatrix per expert: expert e is
    quantized with imatrix[e] (llama.cpp's ``imatrix + (row / ne1) * ne0``), and using
    imatrix[0] for expert 1 would give other bytes.  Returns our bytes."""
    import oracle

    x = np.stack([weights.make("student_t", rows, n, seed=e) for e in range(n_expert)])
    im = weights.expert_imatrix(n_expert, n, seed=imatrix_seed)
    got = quant.quantize(x, qtype, imatrix=im, backend=backend)
    for e in range(n_expert):
        report = describe(got[e], oracle.ggml_quantize(x[e], qtype, im[e]), x[e], qtype)
        assert report is None, f"{backend} {qtype} expert {e}: {report}"
    # the expert's imatrix really matters (guards against using imatrix[0] everywhere)
    assert not np.array_equal(got[1], oracle.ggml_quantize(x[1], qtype, im[0]))
    return got


class Families:
    """The weight families of ``tests/weights.py`` at the sizes of one test module.

    ``shapes``: case -> (rows, n_per_row); ``imatrix_seed``: the module's imatrix seed (plus
    ``SEED``); ``min_rows``: rows kept when ``SCALE`` is small.  ``input``, ``imatrix`` and
    ``expected`` are cached, so each case and ggml's bytes for it are made once per run.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], *, imatrix_seed: int, min_rows: int = 1):
        self.shapes = shapes
        #: the cases compared on this machine ("subnormals" only where the oracle is x86-64)
        self.cases = [c for c in shapes if c != "subnormals" or X86]
        self.min_rows = min_rows
        self.imatrix_seed = imatrix_seed
        self.input = functools.cache(self._input)
        self.imatrix = functools.cache(self._imatrix)
        self.expected = functools.cache(self._expected)

    def _input(self, case: str) -> np.ndarray:
        rows, n = self.shapes[case]
        x = weights.make(case, max(self.min_rows, int(rows * SCALE)), n, seed=SEED)
        x.setflags(write=False)
        return x

    def _imatrix(self, n: int) -> np.ndarray:
        return weights.imatrix(n, seed=self.imatrix_seed + SEED)

    def _expected(self, qtype: str, case: str, imat: bool) -> np.ndarray:
        x = self.input(case)
        return ggml(x, qtype, self.imatrix(x.shape[1]) if imat else None)

    def compare(self, backend: str, qtype: str, imat: bool, stride: int = 1) -> tuple[list[str], int]:
        """Quantize every case (every ``stride``-th row) on ``backend`` and compare with ggml.

        Returns (one report per case that differs, blocks compared).  Rows are independent in
        ggml (the imatrix paths work row by row), so the oracle's rows are subsampled like the
        input.
        """
        failures, blocks = [], 0
        for case in self.cases:
            x = self.input(case)[::stride]
            qw = self.imatrix(x.shape[1]) if imat else None
            got = quant.quantize(x, qtype, imatrix=qw, backend=backend)
            ref = self.expected(qtype, case, imat)[::stride]
            assert got.shape == ref.shape and got.dtype == np.uint8
            blocks += ref.size // quant.QTYPES[qtype].type_size
            report = describe(got, ref, x, qtype)
            if report:
                failures.append(f"[{case}] {report}")
        return failures, blocks
