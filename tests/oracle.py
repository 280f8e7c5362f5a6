"""The real llama.cpp as a test oracle (llama-cpp-python 0.3.36 built from its sdist).

``ggml_quantize(x, qtype, imatrix)`` calls ``ggml_quantize_chunk``: the exact bytes
llama-quantize writes for a chunk of rows.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llama_cpp._ggml import libggml

_f = libggml.ggml_quantize_chunk
_f.restype = ctypes.c_size_t
_f.argtypes = [
    ctypes.c_int,  # enum ggml_type
    ctypes.c_void_p,  # const float * src
    ctypes.c_void_p,  # void * dst
    ctypes.c_int64,  # start
    ctypes.c_int64,  # nrows
    ctypes.c_int64,  # n_per_row
    ctypes.c_void_p,  # const float * imatrix
]


def ggml_quantize(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize 2-D float32 rows with ggml; returns uint8 ``[nrows, row_bytes]``."""
    t = GGMLQuantizationType[qtype.upper()]
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.shape
    bs, ts = GGML_QUANT_SIZES[t]
    assert n % bs == 0
    out = np.zeros((nrows, n // bs * ts), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw is not None:
        assert qw.shape == (n,)
    size = _f(int(t), x.ctypes.data, out.ctypes.data, 0, nrows, n, None if qw is None else qw.ctypes.data)
    assert size == out.nbytes, (size, out.nbytes)
    return out
