"""Block quantization in ggml's formats, byte-identical to llama.cpp.

Arrays in, bytes out: no file I/O, no printing.  ``quantize`` turns float32 rows into the
exact bytes ``ggml_quantize_chunk`` (and so ``llama-quantize``) writes; ``dequantize``
goes back to float32.

Backends (all produce the same bytes):

* ``"numpy"`` - the readable reference, vectorized across blocks (``quant/_numpy.py``).
* ``"numba"`` - compiled CPU kernels, threads over row chunks (``quant/_numba.py``).
* ``"torch"`` - torch kernels on CPU or CUDA (``quant/_torch.py``; optional dependency).
  ``"torch:cuda"`` / ``"torch:cpu"`` choose the device.

``backend=None`` picks the fastest one available; a type that backend does not implement
(its module's ``NAMES``) is quantized by numpy, which implements every type.

Non-finite input: llama.cpp asserts (aborts) on NaN/Inf weights.  We refuse instead:
``QuantError`` names the first offending row.  Blocks made only of values below ~1e-38
(where the C reference relies on undefined float->int conversion) are quantized as in
ggml's defined paths where possible; see docs/quant.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "QuantError",
    "QTYPES",
    "quantize",
    "dequantize",
    "row_bytes",
    "block_size",
    "available_backends",
    "qtype_of",
]


class QuantError(ValueError):
    """Bad input to quantize/dequantize (shape, dtype, type name, non-finite values)."""


@dataclass(frozen=True)
class QType:
    name: str
    ggml: GGMLQuantizationType
    block_size: int
    type_size: int
    uses_imatrix: bool
    #: ggml refuses to quantize this type without importance weights
    #: (``ggml_quantize_requires_imatrix``).
    requires_imatrix: bool = False


def _qt(name: str, uses_imatrix: bool, requires_imatrix: bool = False) -> QType:
    t = GGMLQuantizationType[name]
    bs, ts = GGML_QUANT_SIZES[t]
    return QType(name, t, bs, ts, uses_imatrix, requires_imatrix)


#: Types this package writes.  Float types are plain conversions.
QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        _qt("F32", False),
        _qt("F16", False),
        _qt("BF16", False),
        _qt("Q8_0", False),  # ggml ignores the imatrix for Q8_0
        _qt("Q4_0", True),
        _qt("Q5_0", True),
        _qt("Q4_1", True),
        _qt("Q5_1", True),
        _qt("Q2_K", True),
        _qt("Q3_K", True),
        _qt("Q4_K", True),
        _qt("Q5_K", True),
        _qt("Q6_K", True),
        _qt("IQ3_XXS", True),
        _qt("IQ3_S", True),
        _qt("IQ2_XXS", True, requires_imatrix=True),
        _qt("IQ2_XS", True, requires_imatrix=True),
        _qt("IQ2_S", True),
        _qt("IQ4_NL", True),
        _qt("IQ4_XS", True),
        _qt("MXFP4", False),  # ggml ignores the imatrix for MXFP4
        _qt("TQ1_0", False),  # ternary; ggml ignores the imatrix
        _qt("TQ2_0", False),
        _qt("IQ1_S", True, requires_imatrix=True),
        _qt("IQ1_M", True),
    )
}
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = tuple(n for n in QTYPES if n not in FLOAT_TYPES)

_BACKEND_MODULES = {"numpy": "quant._numpy", "numba": "quant._numba", "torch": "quant._torch"}
_loaded: dict[str, object] = {}


def qtype_of(qtype: str | GGMLQuantizationType | QType) -> QType:
    """Resolve a type name (case-insensitive) or a gguf enum to a ``QType``."""
    if isinstance(qtype, QType):
        return qtype
    if isinstance(qtype, GGMLQuantizationType):
        name = qtype.name
    elif isinstance(qtype, str):
        name = qtype.strip().upper()
    else:
        raise QuantError(f"quant type must be a name or GGMLQuantizationType, got {type(qtype).__name__}")
    try:
        return QTYPES[name]
    except KeyError:
        raise QuantError(f"unsupported quant type {qtype!r}; supported: {', '.join(QTYPES)}") from None


def block_size(qtype) -> int:
    return qtype_of(qtype).block_size


def row_bytes(qtype, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements in ``qtype``."""
    q = qtype_of(qtype)
    if n_per_row % q.block_size:
        raise QuantError(f"{q.name}: row length {n_per_row} is not a multiple of the block size {q.block_size}")
    return n_per_row // q.block_size * q.type_size


def _backend(name: str):
    base, _, device = name.partition(":")
    if base not in _BACKEND_MODULES:
        raise QuantError(f"unknown backend {name!r}; known: {', '.join(_BACKEND_MODULES)}")
    mod = _loaded.get(base)
    if mod is None:
        try:
            mod = importlib.import_module(_BACKEND_MODULES[base])
        except ImportError as e:
            raise QuantError(f"backend {base!r} is not available: {e}") from None
        _loaded[base] = mod
    return mod, (device or None)


def available_backends() -> list[str]:
    """Backends importable here, e.g. ``["numpy", "numba", "torch:cpu"]``."""
    out = []
    for base in _BACKEND_MODULES:
        try:
            mod, _ = _backend(base)
        except QuantError:
            continue
        devices = getattr(mod, "DEVICES", None)
        if devices is None:
            out.append(base)
        else:
            out.extend(f"{base}:{d}" for d in devices())
    return out


def _default_backend() -> str:
    env = os.environ.get("GGUF_MOE_QUANT_BACKEND")
    if env:
        return env
    # torch costs hundreds of MB and seconds to import: only consider it where a GPU exists.
    if _has_nvidia_device() and importlib.util.find_spec("torch") is not None:
        try:
            mod, _ = _backend("torch")
            if "cuda" in mod.DEVICES():
                return "torch:cuda"
        except QuantError:
            pass
    for name in ("numba", "numpy"):
        try:
            _backend(name)
            return name
        except QuantError:
            continue
    return "numpy"


def _backend_for(qname: str, backend: str | None):
    """The backend module (and device) that quantizes ``qname``.

    A backend lists the types it implements in ``NAMES``.  With ``backend=None`` a default
    backend lacking the type (torch:cuda has no i-quant search kernels) falls back to numba
    where it is importable and implements it, else to numpy (which implements every type); a
    backend named explicitly must implement it.
    """
    name = backend or _default_backend()
    mod, device = _backend(name)
    if qname in getattr(mod, "NAMES", ()):
        return mod, device
    if backend is None:
        if not name.startswith("numba"):
            try:
                nb = _backend("numba")
            except QuantError:
                nb = None
            if nb is not None and qname in getattr(nb[0], "NAMES", ()):
                return nb
        return _backend("numpy")
    raise QuantError(f"backend {name!r} does not implement {qname}; use backend='numpy' or leave backend unset")


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")


def _check_finite(x: np.ndarray) -> None:
    ok = np.isfinite(x)
    if not ok.all():
        rows = np.flatnonzero(~ok.reshape(-1, x.shape[-1]).all(axis=1))
        col = int(np.flatnonzero(~ok.reshape(-1, x.shape[-1])[rows[0]])[0])
        raise QuantError(
            f"non-finite value in row {int(rows[0])} (column {col}; {rows.size} bad rows): "
            "llama.cpp refuses NaN/Inf weights; fix the source tensor"
        )


def _float_convert(x: np.ndarray, name: str) -> np.ndarray:
    if name == "F32":
        out = np.ascontiguousarray(x, dtype=np.float32)
    elif name == "F16":
        with np.errstate(over="ignore"):  # |x| > 65504 becomes inf, as in ggml and gguf-py
            out = x.astype(np.float16)
    else:  # BF16: round to nearest even; NaN -> quiet NaN (as ggml_compute_fp32_to_bf16)
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        if nan.any():
            r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
        out = r
    return out.view(np.uint8).reshape(*x.shape[:-1], -1)


def quantize(x, qtype, *, imatrix=None, backend: str | None = None, threads: int | None = None) -> np.ndarray:
    """Quantize ``x`` (float32, ``[..., n_per_row]``) to ggml's block bytes.

    Returns uint8 of shape ``x.shape[:-1] + (row_bytes,)``.

    ``imatrix``: importance weights (llama.cpp's ``quant_weights``), float32 of shape
    ``(n_per_row,)`` for all rows, or ``x.shape[:-2] + (n_per_row,)`` for one vector per
    matrix (e.g. per expert of a ``[n_expert, n_ff, n_embd]`` tensor).  Ignored by Q8_0 and
    float types, as in ggml.
    """
    q = qtype_of(qtype)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise QuantError(f"{q.name}: input must be floating point, got dtype {x.dtype}")
    if x.ndim == 0:
        raise QuantError(f"{q.name}: input must have at least one dimension")
    n = x.shape[-1]
    rb = row_bytes(q, n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if q.name in FLOAT_TYPES:
        return _float_convert(x, q.name)
    _check_finite(x)

    if q.requires_imatrix and imatrix is None:
        raise QuantError(f"{q.name} needs an importance matrix (imatrix=...); ggml refuses to quantize it without one")
    qw = None
    if imatrix is not None and q.uses_imatrix:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (n,) and (x.ndim < 2 or qw.shape != x.shape[:-2] + (n,)):
            raise QuantError(
                f"{q.name}: imatrix shape {qw.shape} does not match input {x.shape}; "
                f"expected ({n},) or {x.shape[:-2] + (n,)}"
            )
        if not np.isfinite(qw).all():
            raise QuantError(f"{q.name}: imatrix contains non-finite values")

    mod, device = _backend_for(q.name, backend)
    out = np.empty(x.shape[:-1] + (rb,), dtype=np.uint8)
    if x.size == 0:
        return out
    kw = {"threads": threads}
    if device is not None:
        kw["device"] = device
    if qw is None or qw.ndim == 1:
        out.reshape(-1, rb)[...] = mod.quantize_rows(q.name, x.reshape(-1, n), qw, **kw)
    else:
        rows = x.shape[-2]
        xg = x.reshape(-1, rows, n)
        og = out.reshape(-1, rows, rb)
        for g, w in enumerate(qw.reshape(-1, n)):
            og[g] = mod.quantize_rows(q.name, xg[g], w, **kw)
    return out


def dequantize(data, qtype, n_per_row: int) -> np.ndarray:
    """Bytes (``[..., row_bytes]`` uint8, or flat) back to float32 ``[..., n_per_row]``."""
    from gguf.quants import dequantize as _gguf_dequantize

    q = qtype_of(qtype)
    rb = row_bytes(q, n_per_row)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise QuantError(f"{q.name}: data must be uint8 bytes, got {data.dtype}")
    if data.ndim == 0 or data.size % rb:
        raise QuantError(f"{q.name}: {data.size} bytes is not a whole number of {rb}-byte rows")
    # [..., row_bytes] keeps its leading dims (one 1-D row gives one 1-D row); other flat data is rows
    lead = data.shape[:-1] if data.shape[-1] == rb else (data.size // rb,)
    rows = data.reshape(-1, rb)
    if rows.shape[0] == 0:
        return np.zeros((*lead, n_per_row), dtype=np.float32)
    if q.name == "F32":
        out = rows.view(np.float32)
    elif q.name == "F16":
        out = rows.view(np.float16).astype(np.float32)
    elif q.name == "BF16":
        out = (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        out = _gguf_dequantize(rows, q.ggml)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(*lead, n_per_row)
