"""Plan and run a conversion: source model -> one or more GGUF files in a single pass.

``plan_outputs`` decides, from the safetensors headers alone, every tensor of every output
(name, numpy shape, ggml type from ``presets.choose_types``, byte size from
``quant.row_bytes``).  ``convert`` then reads each source chunk once and fans it out to
one streaming writer per output.  ``gguf_moe.quantize`` is the same pair of steps starting
from a float GGUF (what ``llama-quantize`` does); both take one ``options.Options``.

Peak memory is a few chunks (``chunk_bytes`` of float32 rows, default 8 MiB) plus their
encoded copies, independent of model size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

import quant
from gguf_moe.errors import CorruptFile, GgufMoeError, QuantError
from gguf_moe.imatrix import Imatrix
from gguf_moe.metadata import add_model_metadata, tokenizer_kvs
from gguf_moe.options import DEFAULT_CHUNK_BYTES, Options, Progress, apply_kv_overrides
from gguf_moe.presets import Preset, allows_quantization, choose_types, converter_type, get_preset, n_dims
from gguf_moe.presets import requires_imatrix as _llama_requires_imatrix
from gguf_moe.source import SourceModel, SourceTensor, finite_rows, widen
from gguf_moe.space import check_space
from gguf_moe.split import open_output
from gguf_moe.writer import check_output_free

__all__ = [
    "PlannedTensor",
    "OutputPlan",
    "plan_outputs",
    "make_writer",
    "convert",
    "check_imatrix",
    "output_name",
    "Options",
    "Progress",
    "DEFAULT_CHUNK_BYTES",
]

_FLOAT = (T.F32, T.F16, T.BF16)
#: the ggml type whose bytes are a stored chunk's bytes (``SourceTensor.iter_stored``)
_STORED = {np.dtype(np.uint16): T.BF16, np.dtype(np.float16): T.F16, np.dtype(np.float32): T.F32}
#: the words a chunk of each checkpoint dtype is stored as (``SourceTensor.iter_stored``)
_STORED_WORDS = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
#: the float type a checkpoint dtype converts to without loss
_SRC_FLOAT = {"BF16": T.BF16, "F16": T.F16, "F32": T.F32}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: T
    nbytes: int
    #: why the type differs from the preset's rule (an override, the shape fallback), or ""
    note: str = ""
    #: llama-quantize refuses to make this tensor without importance weights
    needs_imatrix: bool = False


@dataclass
class OutputPlan:
    """One output file: its preset, path (None for a dry run) and tensors in file order.
    ``warnings``: things llama-quantize passes over in silence (a ``--tensor-type``
    pattern that applies to no tensor), one line each."""

    preset: Preset
    path: Path | None
    tensors: list[PlannedTensor]
    warnings: list[str] = field(default_factory=list)
    #: set while writing: expert slices copied from an identical earlier expert of their
    #: tensor (same source bytes and importance weights) instead of encoded again
    reused_experts: int = 0

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
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    preset: Preset,
    *,
    n_expert: int,
    n_layer: int,
    overrides=None,
    **kw,
) -> tuple[list[PlannedTensor], list[str]]:
    """Types, sizes and notes of ``tensors`` under ``preset`` (``choose_types``'s keywords),
    and the warnings for ``--tensor-type`` patterns that apply to no tensor."""
    notes: dict[str, str] = {}
    types = choose_types(preset, tensors, n_expert=n_expert, n_layer=n_layer, overrides=overrides, notes=notes, **kw)
    planned = []
    for n, s in tensors:
        s, t = tuple(s), types[n]
        needs = allows_quantization(n, s, quantize_output=not (overrides and overrides.leave_output_tensor)) and (
            _llama_requires_imatrix(n, t, preset) or getattr(quant.QTYPES.get(t.name), "requires_imatrix", False)
        )
        planned.append(PlannedTensor(n, s, t, _nbytes(n, s, t), notes.get(n, ""), needs))
    warnings = []
    if overrides is not None:
        used = {overrides.manual(n) for n, note in notes.items() if note.startswith("--tensor-type ")}
        for i, (pattern, t) in enumerate(overrides.tensor_types):
            if i in used:
                continue
            if preset.is_float:
                why = f"does nothing for {preset.name} (llama-quantize applies --tensor-type to quantized types only)"
            else:
                why = f"applies to no tensor {preset.name} quantizes"
            warnings.append(f"--tensor-type {pattern}={t.name} {why}")
        if overrides.pure and preset.is_float:
            warnings.append(f"--pure does nothing for {preset.name}")
    return planned, warnings


def check_imatrix(out: OutputPlan, imatrix: Imatrix | None) -> None:
    """Refuse, before anything is written, what llama-quantize refuses: a tensor that needs
    importance weights (``PlannedTensor.needs_imatrix``) without an imatrix, or whose
    weights the imatrix lacks."""
    for t in out.tensors:
        if not t.needs_imatrix:
            continue
        if imatrix is None:
            raise GgufMoeError(
                f"{out.preset.name} needs an importance matrix ({t.name} would be {t.ggml_type.name}, which llama.cpp "
                "does not make without one); pass --imatrix FILE, computed by llama-imatrix"
            )
        if imatrix.for_tensor(t.name, t.shape) is None:
            raise GgufMoeError(
                f"{imatrix.path} has no importance weights for {t.name}, which {out.preset.name} makes "
                f"{t.ggml_type.name}; llama-quantize refuses that (the result would be garbage): use an imatrix "
                "computed for this model, or choose another type for it (--tensor-type)"
            )


def plan_outputs(
    model: SourceModel,
    presets: Sequence[Preset | str],
    paths: Sequence[Path | None] | None = None,
    options: Options | None = None,
    *,
    has_imatrix: bool | None = None,
) -> list[OutputPlan]:
    """Plan every output from headers alone.  ``options.overrides`` apply to every output;
    an imatrix in ``options`` (or ``has_imatrix=True``) changes the types of some presets
    as llama-quantize's ``--imatrix`` does."""
    opts = options or Options()
    if has_imatrix is None:
        has_imatrix = opts.has_imatrix
    hp = model.hparams
    shapes = [(t.name, t.shape) for t in model.tensors]
    # what llama-quantize would read: the lossless float conversion of the checkpoint
    source_types = {t.name: converter_type(t.name, t.shape, _SRC_FLOAT.get(t.src_dtype, T.F32)) for t in model.tensors}
    out = []
    for i, p in enumerate(presets):
        pre = get_preset(p)
        n_expert = opts.kv_override_int(f"{model.arch}.expert_count")
        tensors, warnings = plan_tensors(
            shapes, pre, n_expert=hp["n_expert"] if n_expert is None else n_expert, n_layer=hp["n_layer"], n_head=hp["n_head"], n_head_kv=hp["n_head_kv"],
            has_imatrix=has_imatrix, overrides=opts.overrides, source_types=source_types,
        )  # fmt: skip
        for st, pt in zip(model.tensors, tensors):
            if st.force_f32 and pt.ggml_type != T.F32:
                raise GgufMoeError(f"internal error: {st.name} must be F32, planned {pt.ggml_type.name}")
        out.append(OutputPlan(pre, None if paths is None else paths[i], tensors, warnings))
    return out


def make_writer(
    model: SourceModel,
    out: OutputPlan,
    *,
    pre_tokenizer: str | None = None,
    recipe: bool = True,
    tokenizer=None,
    imatrix: Imatrix | None = None,
    kv_overrides=(),
) -> gguf.GGUFWriter:
    """A ``GGUFWriter`` holding the tensor infos and every KV of ``out`` (nothing written);
    ``kv_overrides`` (``options.KVOverride``) are applied after the model's KVs, before the
    imatrix keys, as llama-quantize does."""
    w = gguf.GGUFWriter(None, model.arch)
    for t in out.tensors:
        w.add_tensor_info(t.name, _file_shape(t.shape, out.preset), np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    add_model_metadata(w, model, out.preset, pre_tokenizer=pre_tokenizer, recipe=recipe, tokenizer=tokenizer)
    apply_kv_overrides(w, kv_overrides)
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


#: encode a chunk of a stacked-expert tensor once when an earlier chunk of the same tensor has
#: the same source bytes and importance weights (``_Duplicates``); False encodes every chunk
REUSE_DUPLICATES = True


class _Duplicates:
    """Duplicated experts of one tensor, found from the data as it streams.

    Quantization works row by row, so a chunk whose source bytes and importance weights equal
    those of an earlier chunk of the same tensor has the same encoding: the writer reads those
    bytes back from the output (``reread``) instead of encoding them again.  Merges reuse a
    source model for several experts, so whole expert slices repeat.

    Only stacked-expert tensors of quantized types take part.  Each chunk gets a fingerprint
    (blake2b of its row count and of its first, middle and last rows as stored, with the
    digest of its importance weights); a chunk whose fingerprint matches an earlier one is
    compared byte for byte with that chunk's source rows, read again (``read_rows(row,
    n_rows)``, from the page cache) - so a chunk costs a few rows of hashing, and only a
    repeat a full comparison.  A chunk never crosses an expert.  Memory: a few digests per
    chunk, and one chunk while comparing."""

    def __init__(self, shape: tuple[int, ...], read_rows=None):
        self.on = REUSE_DUPLICATES and read_rows is not None and len(shape) == 3 and shape[0] > 1
        self.per = shape[1] if self.on else 0
        self.n_cols = shape[-1]
        self.read_rows = read_rows
        self.seen: dict[tuple, list[int]] = {}  # (type, fingerprint, imatrix digest) -> first rows
        self.reused: dict[T, dict[int, int]] = {}  # type -> expert -> rows copied
        self._stored: np.ndarray | None = None
        self._print: bytes | None = None
        self._same: dict[int, bool] = {}

    def chunk(self, stored: np.ndarray) -> None:
        """The next chunk, as read from the source."""
        self._stored, self._print, self._same = stored, None, {}

    def _key(self, t: T, qw: np.ndarray | None) -> tuple:
        if self._print is None:
            x = self._stored
            h = hashlib.blake2b(len(x).to_bytes(8, "little"), digest_size=20)
            for r in sorted({0, len(x) // 2, len(x) - 1}):
                h.update(np.ascontiguousarray(x[r]).view(np.uint8))
            self._print = h.digest()
        im = b"" if qw is None else hashlib.blake2b(np.ascontiguousarray(qw, dtype=np.float32), digest_size=20).digest()
        return (t, self._print, im)

    def _equal(self, row: int) -> bool:
        """This chunk's bytes equal the source rows from ``row``."""
        if row not in self._same:
            x = self._stored
            y = np.asarray(self.read_rows(row, len(x)))
            self._same[row] = x.dtype == y.dtype and x.shape == y.shape and bool(
                np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8))
            )
        return self._same[row]

    def find(self, w, t: T, qw: np.ndarray | None, row: int, n_rows: int) -> np.ndarray | None:
        """The encoding of rows ``row:row+n_rows`` as type ``t``, read back from ``w`` (which
        holds this tensor as ``t``) when an identical chunk was written before, else None."""
        if not self.on or t in _FLOAT:
            return None
        first = next((r for r in self.seen.get(self._key(t, qw), ()) if self._equal(r)), None)
        if first is None:
            return None
        rb = quant.row_bytes(t.name, self.n_cols)
        data = w.reread(first * rb, n_rows * rb)
        per_expert = self.reused.setdefault(t, {})
        per_expert[row // self.per] = per_expert.get(row // self.per, 0) + n_rows
        return data.reshape(n_rows, rb)

    def encoded(self, t: T, qw: np.ndarray | None, row: int) -> None:
        """Rows from ``row`` (this chunk) were encoded as ``t`` and written."""
        if self.on and t not in _FLOAT:
            self.seen.setdefault(self._key(t, qw), []).append(row)

    def experts(self, t: T) -> int:
        """Expert slices of this tensor copied whole, not encoded, as type ``t``."""
        return sum(1 for n in self.reused.get(t, {}).values() if n == self.per)


def _stored_rows(st: SourceTensor):
    """``read_rows(row, n_rows)`` for ``_Duplicates``: rows of ``st`` as ``iter_stored``
    yields them, for rows within one piece; None where chunks are not plain stored rows
    (generated, or permuted per head)."""
    if st.computed is not None or st.head_rows or any(p.raw.dtype not in _STORED_WORDS for p in st.pieces):
        return None
    starts = np.cumsum([0] + [p.nrows for p in st.pieces])

    def read(row: int, n_rows: int) -> np.ndarray:
        k = int(np.searchsorted(starts, row, side="right")) - 1
        p = st.pieces[k]
        words = _STORED_WORDS[p.raw.dtype]
        isz = np.dtype(words).itemsize
        at = p.offset + (row - int(starts[k])) * p.ncols * isz
        return p.raw.shard.read(at, n_rows * p.ncols * isz, words).reshape(n_rows, p.ncols)

    return read


def convert(model: SourceModel, outputs: Sequence[OutputPlan], options: Options | None = None, **kw) -> list[Path]:
    """Write every output in one pass over the source; returns the paths written.

    ``options`` (or keyword arguments naming its fields: ``force``, ``backend``,
    ``threads``, ``imatrix``, ``progress``, ...).  ``imatrix``: importance weights
    (``gguf_moe.imatrix.load_imatrix``) for the block quantized outputs, used as
    llama-quantize uses them (per expert for ``*_exps``); plan with the same options so the
    per-tensor types match.

    With ``split`` each output is a llama-gguf-split set and its first shard is returned.
    With ``space_check`` the outputs' exact sizes are checked against the free disk space
    before anything is written.

    On any error (or KeyboardInterrupt) the partial ``.part`` files are deleted and the
    exception propagates; outputs that already existed are untouched.
    """
    opts = Options.of(options, **kw)
    force, pre_tokenizer, recipe = opts.force, opts.pre_tokenizer, opts.recipe
    backend, threads, chunk_bytes, imatrix = opts.backend, opts.threads, opts.chunk_bytes, opts.imatrix
    progress = opts.progress_or_null()
    for o in outputs:
        if o.path is None:
            raise GgufMoeError("internal error: an output has no path")
        if opts.split is None:  # (a split set's shard names are checked by its writer)
            check_output_free(o.path, force)
        check_imatrix(o, imatrix)
    if len({o.path.resolve() for o in outputs}) != len(outputs):
        raise GgufMoeError("two outputs would have the same file name; give each -t once")
    if opts.split_shard is not None and (opts.split is None or len(outputs) != 1):
        raise GgufMoeError("internal error: split_shard needs split and one output")
    tok = tokenizer_kvs(model, pre_tokenizer)
    writers = [
        open_output(
            o.path,
            make_writer(
                model, o, pre_tokenizer=pre_tokenizer, recipe=recipe, tokenizer=tok, imatrix=imatrix,
                kv_overrides=opts.kv_overrides,
            ),  # fmt: skip
            force=force,
            split=opts.split,
            shard=opts.split_shard,
        )
        for o in outputs
    ]
    for w in writers:
        w.check_free()
    if opts.space_check:
        check_space(p for w in writers for p in w.planned())
    try:
        for w in writers:
            w.open()
        total = sum(st.n_elements * st.src_itemsize for st in model.tensors)
        progress.start(total, len(model.tensors))
        for i, st in enumerate(model.tensors):
            if opts.split_shard is not None and not writers[0].wants(st.name):
                progress.advance(st.n_elements * st.src_itemsize)  # another shard's tensor: not read
                continue
            progress.tensor(st.name, i)
            types = [o.tensors[i].ggml_type for o in outputs]
            for w in writers:
                w.begin_tensor(st.name)
            row = 0
            dups = _Duplicates(st.shape, _stored_rows(st))
            for stored in st.iter_stored(_max_rows(st.n_cols, chunk_bytes)):
                _check_finite(stored, st, row)
                # outputs wanting the same type share the bytes; the stored type needs no encoding
                encoded: dict[T, np.ndarray] = {_STORED[stored.dtype]: stored.view(np.uint8)}
                chunk = None
                dups.chunk(stored)
                for w, t in zip(writers, types):
                    if t not in encoded:
                        try:
                            qw = _imatrix_for(imatrix, st.name, st.shape, t, row)
                            # an identical chunk (a duplicated expert) was written already: copy it
                            again = dups.find(w, t, qw, row, len(stored))
                            if again is not None:
                                encoded[t] = again
                            else:
                                if chunk is None:
                                    chunk = widen(stored)
                                encoded[t] = encode(chunk, t, backend=backend, threads=threads, imatrix=qw)
                                dups.encoded(t, qw, row)
                        except QuantError as e:
                            raise CorruptFile(f"{_where(st, row)} -> {t.name}: {e}") from None
                    w.write(encoded[t])
                row += len(stored)
                progress.advance(stored.size * st.src_itemsize)
            for o, t in zip(outputs, types):
                o.reused_experts += dups.experts(t)
        done = [w.close() for w in writers]
        progress.finish()
        return done
    except BaseException:
        for w in writers:
            w.abort()
        raise
