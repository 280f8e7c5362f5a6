"""The real llama.cpp as a test oracle (llama-cpp-python 0.3.36 built from its sdist).

``ggml_quantize(x, qtype, imatrix)`` calls ``ggml_quantize_chunk``: the exact bytes
llama-quantize writes for a chunk of rows.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llama_cpp._ggml import libggml

#: ``size_t ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` (ctypes
#: releases the GIL around it, so callers can run it on several threads).
ggml_quantize_chunk = libggml.ggml_quantize_chunk
ggml_quantize_chunk.restype = ctypes.c_size_t
ggml_quantize_chunk.argtypes = [
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
    size = ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, nrows, n, None if qw is None else qw.ctypes.data)
    assert size == out.nbytes, (size, out.nbytes)
    return out


# --- whole files: llama.cpp's converter and llama_model_quantize --------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import llama_cpp  # noqa: E402

#: llama.cpp's own converter, unpacked from the same sdist by ``scripts/setup.sh --dev``.
LLAMA_CPP_REF = Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp"
CONVERTER = LLAMA_CPP_REF / "convert_hf_to_gguf.py"


#: llama.cpp's command-line tools (llama-gguf-split, llama-imatrix, llama-perplexity,
#: llama-quantize), built from the same sdist by ``scripts/setup.sh --dev``
#: (scripts/llama_tools.sh); ``GGUF_MOE_LLAMA_BIN`` names another folder holding them.
LLAMA_BIN = Path(os.environ.get("GGUF_MOE_LLAMA_BIN") or Path(__file__).resolve().parents[1] / ".cache" / "llama-bin")


def llama_tool(name: str) -> Path:
    """Path of llama.cpp's ``name`` tool (e.g. ``"llama-gguf-split"``)."""
    path = LLAMA_BIN / name
    assert path.is_file() and os.access(path, os.X_OK), f"{path} missing: run scripts/setup.sh --dev"
    return path


def run_llama_tool(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; asserts it succeeds and returns the completed process."""
    r = subprocess.run([str(llama_tool(name)), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def run_hf_converter(src: Path, out: Path, outtype: str = "bf16", *, pre_tokenizer: str | None = None) -> None:
    """Run ``convert_hf_to_gguf.py SRC --outtype OUTTYPE --outfile OUT`` with its own gguf-py.

    ``pre_tokenizer`` forces the BPE pre-tokenizer name: the converter recognizes them only
    by hashing the token ids of published tokenizers, which synthetic vocabularies are not.
    """
    assert CONVERTER.is_file(), f"{CONVERTER} missing: run scripts/setup.sh --dev"
    script = "import runpy, sys\n"
    if pre_tokenizer:
        script += (
            "import conversion.base as base\n"
            f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre_tokenizer!r}\n"
        )
    script += (
        f"sys.argv = [{str(CONVERTER)!r}, {str(src)!r}, '--outtype', {outtype!r}, '--outfile', {str(out)!r}]\n"
        f"runpy.run_path({str(CONVERTER)!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LLAMA_CPP_REF / "gguf-py"), str(LLAMA_CPP_REF)]))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


#: ``GGML_TYPE_COUNT``, the "not set" value of the type fields of ``llama_model_quantize_params``.
GGML_TYPE_COUNT = int(llama_cpp.llama_model_quantize_default_params().output_tensor_type)


def llama_model_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    imatrix: dict | None = None,
    nthread: int = 2,
    tensor_types: list | tuple = (),
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    leave_output_tensor: bool = False,
    allow_requantize: bool = False,
    kv_overrides: list | tuple = (),
    prune_layers: list | tuple = (),
    check: bool = True,
) -> int:
    """The real llama-quantize on a whole file (``ftype`` = llama_ftype number); returns
    llama.cpp's status (0 ok), asserting it is 0 unless ``check=False``.

    ``imatrix``: {tensor name: float32 weights}, as llama-quantize passes them after loading
    an imatrix file; an empty dict still makes llama.cpp apply its "has imatrix" rules.
    The other keywords are ``llama_model_quantize_params`` as llama-quantize's options set
    them: ``tensor_types`` [(pattern, type name)] is ``--tensor-type`` (``tt_overrides``;
    llama-quantize lower-cases the pattern before this point), ``output_tensor_type`` /
    ``token_embedding_type`` type names, ``pure``, ``leave_output_tensor``
    (``quantize_output_tensor = false``), ``allow_requantize``; ``kv_overrides``
    [(key, "int" | "float" | "bool" | "str", value)] as ``--override-kv`` fills them;
    ``prune_layers`` sorted layer numbers (``--prune-layers``).
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep = []
    if imatrix is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, w) in enumerate(imatrix.items()):
            w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
            keep += [name.encode(), w]
            arr[i].name = keep[-2]
            arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = w.size
        keep.append(arr)
        params.imatrix = arr
    if tensor_types:
        tt = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, tname) in enumerate(tensor_types):
            keep.append(pattern.encode())
            tt[i].pattern = keep[-1]
            tt[i].type = int(GGMLQuantizationType[tname.upper()])
        tt[len(tensor_types)].pattern = None
        tt[len(tensor_types)].type = GGML_TYPE_COUNT
        keep.append(tt)
        params.tt_overrides = tt
    if output_tensor_type is not None:
        params.output_tensor_type = int(GGMLQuantizationType[output_tensor_type.upper()])
    if token_embedding_type is not None:
        params.token_embedding_type = int(GGMLQuantizationType[token_embedding_type.upper()])
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    params.allow_requantize = allow_requantize
    if kv_overrides:
        kvo = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
        tags = {"int": llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, "float": llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT,
                "bool": llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, "str": llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR}  # fmt: skip
        for i, (key, kind, value) in enumerate(kv_overrides):
            kvo[i].key = key.encode()
            kvo[i].tag = tags[kind]
            if kind == "int":
                kvo[i].value.val_i64 = value
            elif kind == "float":
                kvo[i].value.val_f64 = value
            elif kind == "bool":
                kvo[i].value.val_bool = value
            else:
                kvo[i].value.val_str = value.encode()
        kvo[len(kv_overrides)].key = b""
        keep.append(kvo)
        params.kv_overrides = kvo
    if prune_layers:
        pl = (ctypes.c_int32 * (len(prune_layers) + 1))(*prune_layers, -1)
        keep.append(pl)
        params.prune_layers = ctypes.cast(pl, ctypes.POINTER(ctypes.c_int32))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if check:
        assert rc == 0, f"llama_model_quantize({Path(src).name} -> ftype {ftype}) failed"
    return rc
