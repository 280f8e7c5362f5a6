"""Plan and run a conversion: source model -> one or more GGUF files in a single pass.

``plan_outputs`` decides, from the safetensors headers alone, every tensor of every output
(name, numpy shape, ggml type from ``presets.choose_types``, byte size from
``quant.row_bytes``).  ``convert`` then reads each source chunk once and fans it out to
one streaming writer per output; ``requantize`` does the same starting from a float GGUF
(what ``llama-quantize`` does).

Peak memory is a few chunks (``chunk_bytes`` of float32 rows, default 8 MiB) plus their
encoded copies, independent of model size.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

import quant
from gguf_moe.errors import CorruptFile, GgufMoeError, QuantError
from gguf_moe.imatrix import Imatrix
from gguf_moe.metadata import add_model_metadata, tokenizer_kvs
from gguf_moe.presets import Preset, allows_quantization, choose_types, get_preset, llama_sort_key, n_dims
from gguf_moe.source import SourceModel, SourceTensor, finite_rows, widen
from gguf_moe.writer import StreamingGGUF, check_output_free

__all__ = [
    "PlannedTensor",
    "OutputPlan",
    "plan_outputs",
    "make_writer",
    "convert",
    "requantize",
    "output_name",
    "Progress",
    "DEFAULT_CHUNK_BYTES",
]

DEFAULT_CHUNK_BYTES = 8 << 20
_FLOAT = (T.F32, T.F16, T.BF16)
#: the ggml type whose bytes are a stored chunk's bytes (``SourceTensor.iter_stored``)
_STORED = {np.dtype(np.uint16): T.BF16, np.dtype(np.float16): T.F16, np.dtype(np.float32): T.F32}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: T
    nbytes: int


@dataclass
class OutputPlan:
    """One output file: its preset, path (None for a dry run) and tensors in file order."""

    preset: Preset
    path: Path | None
    tensors: list[PlannedTensor]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_params
        return 8.0 * self.data_bytes / n if n else 0.0


class Progress:
    """Hooks the CLI implements to show progress; the defaults do nothing."""

    def start(self, total_bytes: int, n_tensors: int) -> None: ...
    def tensor(self, name: str, index: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self) -> None: ...


def output_name(model_name: str, preset: Preset | str) -> str:
    """``<model-name>-<TYPE>.gguf``, the file name ``--outdir`` uses."""
    p = get_preset(preset)
    return f"{model_name}-{p.name}.gguf"


def _nbytes(name: str, shape: tuple[int, ...], t: T) -> int:
    try:
        return quant.row_bytes(t.name, shape[-1]) * math.prod(shape[:-1])
    except QuantError as e:
        raise GgufMoeError(f"tensor {name} {list(shape)}: {e}") from None


def plan_tensors(
    tensors: Sequence[tuple[str, tuple[int, ...]]], preset: Preset, *, n_expert: int, n_layer: int, **kw
) -> list[PlannedTensor]:
    types = choose_types(preset, tensors, n_expert=n_expert, n_layer=n_layer, **kw)
    return [PlannedTensor(n, tuple(s), types[n], _nbytes(n, tuple(s), types[n])) for n, s in tensors]


def plan_outputs(
    model: SourceModel,
    presets: Sequence[Preset | str],
    paths: Sequence[Path | None] | None = None,
    *,
    has_imatrix: bool = False,
) -> list[OutputPlan]:
    """Plan every output from headers alone (``has_imatrix`` changes llama-quantize's
    choice for Q4_0/Q5_0 ffn_down, as an ``--imatrix`` does)."""
    hp = model.hparams
    shapes = [(t.name, t.shape) for t in model.tensors]
    out = []
    for i, p in enumerate(presets):
        pre = get_preset(p)
        tensors = plan_tensors(
            shapes, pre, n_expert=hp["n_expert"], n_layer=hp["n_layer"], n_head=hp["n_head"], n_head_kv=hp["n_head_kv"],
            has_imatrix=has_imatrix,
        )  # fmt: skip
        for st, pt in zip(model.tensors, tensors):
            if st.force_f32 and pt.ggml_type != T.F32:
                raise GgufMoeError(f"internal error: {st.name} must be F32, planned {pt.ggml_type.name}")
        out.append(OutputPlan(pre, None if paths is None else paths[i], tensors))
    return out


def make_writer(
    model: SourceModel,
    out: OutputPlan,
    *,
    pre_tokenizer: str | None = None,
    recipe: bool = True,
    tokenizer=None,
    imatrix: Imatrix | None = None,
) -> gguf.GGUFWriter:
    """A ``GGUFWriter`` holding the tensor infos and every KV of ``out`` (nothing written)."""
    w = gguf.GGUFWriter(None, model.arch)
    for t in out.tensors:
        w.add_tensor_info(t.name, _file_shape(t.shape, out.preset), np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    add_model_metadata(w, model, out.preset, pre_tokenizer=pre_tokenizer, recipe=recipe, tokenizer=tokenizer)
    if imatrix is not None and not out.preset.is_float:
        add_imatrix_kvs(w, imatrix)
    return w


def _file_shape(shape: tuple[int, ...], preset: Preset) -> tuple[int, ...]:
    """The shape stored in the tensor info.  The converter (float types, gguf-py) keeps
    every dimension; llama-quantize writes ``ggml_n_dims`` dimensions, dropping trailing
    1s of ``ne`` (e.g. ``ffn_gate_inp_shexp`` ``[n_embd, 1]`` becomes ``[n_embd]``)."""
    if preset.is_float:
        return shape
    return shape[len(shape) - n_dims(shape) :]


def add_imatrix_kvs(w: gguf.GGUFWriter, im: Imatrix) -> None:
    """The ``quantize.imatrix.*`` keys llama-quantize appends after general.file_type."""
    for key, val in im.kv_pairs():
        if isinstance(val, str):
            w.add_string(key, val)
        else:
            w.add_uint32(key, int(val))


def _imatrix_for(im: Imatrix | None, name: str, shape: tuple[int, ...], t: T, row0: int) -> np.ndarray | None:
    """The importance weights for the rows starting at ``row0`` (one expert's slice for a
    stacked-expert tensor; a chunk never crosses an expert)."""
    if im is None or t in _FLOAT or t == T.Q8_0:
        return None
    w = im.for_tensor(name, shape)
    if w is None or w.ndim == 1:
        return w
    return w[row0 // shape[1]]


def _where(st: SourceTensor, row: int) -> str:
    if len(st.shape) == 3:
        per = st.shape[1]
        return f"tensor {st.name} (expert {row // per}, row {row % per}; from {st.sources[0]})"
    return f"tensor {st.name} (row {row}; from {st.sources[0]})"


def _check_finite(x: np.ndarray, st: SourceTensor, row0: int) -> None:
    """``x``: a chunk as stored (``SourceTensor.iter_stored``)."""
    ok = finite_rows(x)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        r = int(bad[0])
        row = widen(x[r : r + 1])[0]
        v = row[~np.isfinite(row)][0]
        raise CorruptFile(
            f"{_where(st, row0 + r)} holds a non-finite value ({v}) in {bad.size} row(s) of this chunk; "
            "llama.cpp cannot use NaN/Inf weights, fix the source model"
        )


def encode(
    x: np.ndarray, t: T, *, backend: str | None = None, threads: int | None = None, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """float32 rows -> the bytes of ggml type ``t`` (uint8 ``[rows, row_bytes]``)."""
    if t == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)
    if t == T.F16:
        h = x.astype(np.float16)
        if not np.isfinite(h).all():
            raise QuantError(f"value {float(np.abs(x[~np.isfinite(h)]).max())} overflows F16 (max 65504); choose BF16 instead")
        return h.view(np.uint8)
    return quant.quantize(x, t.name, imatrix=imatrix, backend=backend, threads=threads)


def _max_rows(n_cols: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * n_cols))


def convert(
    model: SourceModel,
    outputs: Sequence[OutputPlan],
    *,
    force: bool = False,
    pre_tokenizer: str | None = None,
    recipe: bool = True,
    backend: str | None = None,
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    imatrix: Imatrix | None = None,
) -> list[Path]:
    """Write every output in one pass over the source; returns the paths written.

    ``imatrix``: importance weights (``gguf_moe.imatrix.load_imatrix``) for the block
    quantized outputs, used as llama-quantize uses them (per expert for ``*_exps``); plan
    with ``has_imatrix=True`` so the per-tensor types match.

    On any error (or KeyboardInterrupt) the partial ``.part`` files are deleted and the
    exception propagates; outputs that already existed are untouched.
    """
    progress = progress or Progress()
    for o in outputs:
        if o.path is None:
            raise GgufMoeError("internal error: an output has no path")
        check_output_free(o.path, force)
    if len({o.path.resolve() for o in outputs}) != len(outputs):
        raise GgufMoeError("two outputs would have the same file name; give each -t once")
    tok = tokenizer_kvs(model, pre_tokenizer)
    writers = [
        StreamingGGUF(
            o.path,
            make_writer(model, o, pre_tokenizer=pre_tokenizer, recipe=recipe, tokenizer=tok, imatrix=imatrix),
            force=force,
        )
        for o in outputs
    ]
    try:
        for w in writers:
            w.open()
        total = sum(st.n_elements * st.src_itemsize for st in model.tensors)
        progress.start(total, len(model.tensors))
        for i, st in enumerate(model.tensors):
            progress.tensor(st.name, i)
            types = [o.tensors[i].ggml_type for o in outputs]
            for w in writers:
                w.begin_tensor(st.name)
            row = 0
            for stored in st.iter_stored(_max_rows(st.n_cols, chunk_bytes)):
                _check_finite(stored, st, row)
                # outputs wanting the same type share the bytes; the stored type needs no encoding
                encoded: dict[T, np.ndarray] = {_STORED[stored.dtype]: stored.view(np.uint8)}
                chunk = None
                for w, t in zip(writers, types):
                    if t not in encoded:
                        if chunk is None:
                            chunk = widen(stored)
                        try:
                            qw = _imatrix_for(imatrix, st.name, st.shape, t, row)
                            encoded[t] = encode(chunk, t, backend=backend, threads=threads, imatrix=qw)
                        except QuantError as e:
                            raise CorruptFile(f"{_where(st, row)} -> {t.name}: {e}") from None
                    w.write(encoded[t])
                row += len(stored)
                progress.advance(stored.size * st.src_itemsize)
        done = [w.close() for w in writers]
        progress.finish()
        return done
    except BaseException:
        for w in writers:
            w.abort()
        raise


# --------------------------------------------------------------------------- GGUF -> GGUF


def _field_value(field: gguf.ReaderField):
    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.ARRAY:
            raise GgufMoeError(f"key {field.name}: nested arrays are not supported")
        sub = types[1] if len(types) > 1 else gguf.GGUFValueType.UINT8
        return list(field.contents()), types[0], sub
    return field.contents(), types[0], None


def requantize(
    src: Path,
    dst: Path,
    preset: Preset | str,
    *,
    force: bool = False,
    backend: str | None = None,
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    imatrix: Imatrix | None = None,
) -> Path:
    """Quantize an F32/F16/BF16 GGUF like ``llama-quantize``: KVs copied in order (``split.*``
    dropped; ``general.quantization_version`` and ``general.file_type`` re-set at the end),
    tensors in llama.cpp order, types from ``presets.choose_types``; tensors that may not be
    quantized, or already have the chosen type, are copied as they are."""
    progress = progress or Progress()
    pre = get_preset(preset)
    src, dst = Path(src), Path(dst)
    check_output_free(dst, force)
    try:
        reader = gguf.GGUFReader(src, "r")
    except FileNotFoundError:
        raise GgufMoeError(f"{src}: no such file") from None
    except (ValueError, OSError, IndexError) as e:
        raise CorruptFile(f"{src}: not a readable GGUF file ({e})") from None
    fields = reader.fields
    arch_f = fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_f is None:
        raise CorruptFile(f"{src}: no general.architecture key; not a model GGUF")
    arch = arch_f.contents()

    def kv_int(key: str, default: int = 0) -> int:
        f = fields.get(key.format(arch=arch))
        return int(f.contents()) if f is not None else default

    n_layer = kv_int(gguf.Keys.LLM.BLOCK_COUNT)
    n_expert = kv_int(gguf.Keys.LLM.EXPERT_COUNT)
    infos = []
    for rt in reader.tensors:
        ne = [int(d) for d in rt.shape]
        shape = tuple(reversed(ne[: n_dims(tuple(reversed(ne)))]))
        infos.append((rt.name, shape, rt))
    infos.sort(key=lambda x: llama_sort_key(x[0]))
    types = choose_types(
        pre, [(n, s) for n, s, _ in infos], n_expert=n_expert, n_layer=n_layer, arch=arch, has_imatrix=imatrix is not None
    )

    w = gguf.GGUFWriter(None, arch)
    w.kv_data[0].clear()  # re-added below in the input's order
    skip = (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE)
    for key, f in fields.items():
        if key.startswith("GGUF.") or key.startswith("split.") or key in skip:
            continue
        val, vtype, sub = _field_value(f)
        w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(pre.file_type)
    if imatrix is not None:
        add_imatrix_kvs(w, imatrix)
    align = fields.get(gguf.Keys.General.ALIGNMENT)
    if align is not None:  # the copied key must describe the file we write
        w.data_alignment = int(align.contents())

    plan: list[tuple[str, tuple[int, ...], T, T, object]] = []
    for name, shape, rt in infos:
        cur = T(rt.tensor_type)
        new = types[name]
        if not allows_quantization(name, shape) or new == cur:
            new = cur
        elif cur not in _FLOAT:
            raise GgufMoeError(
                f"{src}: tensor {name} is already {cur.name}; requantizing quantized data loses quality and is not supported, "
                "start from an F32/F16/BF16 file"
            )
        nbytes = _nbytes(name, shape, new)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=new)
        plan.append((name, shape, cur, new, rt))

    sw = StreamingGGUF(dst, w, force=force)
    mm = getattr(reader.data, "_mmap", None)
    try:
        sw.open()
        progress.start(sum(int(rt.n_bytes) for *_, rt in plan), len(plan))
        for i, (name, shape, cur, new, rt) in enumerate(plan):
            progress.tensor(name, i)
            sw.begin_tensor(name)
            raw = np.asarray(rt.data).reshape(-1).view(np.uint8)
            if raw.nbytes != int(rt.n_bytes):
                raise CorruptFile(f"{src}: tensor {name} is truncated ({raw.nbytes} of {int(rt.n_bytes)} bytes)")
            if new == cur:
                step = max(1, chunk_bytes)
                for o in range(0, raw.nbytes, step):
                    sw.write(np.array(raw[o : o + step]))
                    progress.advance(min(step, raw.nbytes - o))
            else:
                n = shape[-1]
                rows = raw.reshape(-1, quant.row_bytes(cur.name, n))
                nrows = rows.shape[0]
                per = max(1, shape[1] if len(shape) == 3 else nrows)  # chunks never cross an expert (imatrix)
                step = _max_rows(n, chunk_bytes)
                for e0 in range(0, nrows, per):
                    for r0 in range(e0, min(e0 + per, nrows), step):
                        r1 = min(r0 + step, e0 + per, nrows)
                        x = quant.dequantize(np.array(rows[r0:r1]), cur.name, n)
                        ok = np.isfinite(x).all(axis=1)
                        if not ok.all():
                            r = int(np.flatnonzero(~ok)[0])
                            v = x[r][~np.isfinite(x[r])][0]
                            raise CorruptFile(
                                f"{src}: tensor {name} row {r0 + r} holds a non-finite value ({v}); "
                                "llama.cpp cannot use NaN/Inf weights, fix the file it was made from"
                            )
                        try:
                            qw = _imatrix_for(imatrix, name, shape, new, r0)
                            sw.write(encode(x, new, backend=backend, threads=threads, imatrix=qw))
                        except QuantError as e:
                            raise CorruptFile(f"{src}: tensor {name} row {r0} -> {new.name}: {e}") from None
                        progress.advance(rows[r0:r1].nbytes)
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)
        out = sw.close()
        progress.finish()
        return out
    except BaseException:
        sw.abort()
        raise
