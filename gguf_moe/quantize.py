"""GGUF -> GGUF quantization, what ``llama-quantize IN OUT TYPE`` does.

Two steps, as for ``convert``: ``plan_quantize`` reads the input's header and decides every
output tensor (type from ``presets.choose_types`` with the ``options.Options`` overrides,
byte size, notes), with no output file touched (``--dry-run`` prints it);
``write_quantize`` streams the tensors through the quantizers into the output file.

The output is what llama.cpp writes: the input's KVs in their order (``split.*`` dropped,
``general.quantization_version`` and ``general.file_type`` set again at the end, then the
``quantize.imatrix.*`` keys with an imatrix), tensors in llama.cpp's order; tensors that may
not be quantized, or already have the chosen type, are copied as they are.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

import quant
from gguf_moe.convert import (
    _FLOAT,
    OutputPlan,
    PlannedTensor,
    _Duplicates,
    _imatrix_for,
    _max_rows,
    add_imatrix_kvs,
    check_imatrix,
    encode,
    plan_tensors,
)
from gguf_moe.errors import CorruptFile, GgufMoeError, QuantError
from gguf_moe.options import Options, apply_kv_overrides
from gguf_moe.presets import Preset, get_preset, llama_sort_key, n_dims
from gguf_moe.space import check_space
from gguf_moe.split import open_output, read_gguf_set
from gguf_moe.writer import check_output_free

__all__ = ["QuantizePlan", "plan_quantize", "write_quantize", "requantize"]


@dataclass
class QuantizePlan(OutputPlan):
    """An ``OutputPlan`` read from a GGUF file: ``source_types`` holds each tensor's type in
    the input (same order as ``tensors``)."""

    src: Path = Path()
    arch: str = ""
    source_types: list[T] = field(default_factory=list)
    reader: gguf.GGUFReader | None = field(default=None, repr=False)
    #: the input's tensors (of every shard of a split set), in its order
    src_tensors: list = field(default_factory=list, repr=False)
    readers: list = field(default_factory=list, repr=False)
    #: ``--prune-layers``: output name -> input name of the renumbered tensors; the new
    #: block count (written last, as llama-quantize does), or None without pruning
    renamed: dict[str, str] = field(default_factory=dict)
    block_count: int | None = None


_BLK_NUM = re.compile(r"blk\.(\d+)\.")


def prune_names(names: list[str], prune: tuple[int, ...]) -> tuple[dict[str, str | None], int]:
    """llama-quantize's ``--prune-layers`` renumbering (``remap_layer``), over ``names`` in
    llama.cpp's order: {input name: output name, or None when its layer is pruned}, and the
    new block count.  Layers below the first pruned one keep their number; the others are
    numbered on from there, in the order met."""
    mapped: dict[int, str] = {}
    next_id = 0
    out: dict[str, str | None] = {}
    for name in names:
        m = _BLK_NUM.search(name)
        if not prune or m is None:
            out[name] = name
            continue
        blk = int(m.group(1))
        if blk not in mapped:
            if blk in prune:
                mapped[blk] = ""
            elif blk < prune[0]:
                mapped[blk] = str(blk)
                next_id = blk + 1
            else:
                mapped[blk] = str(next_id)
                next_id += 1
        new = mapped[blk]
        out[name] = None if not new else name[: m.start(1)] + new + name[m.end(1) :]
    return out, next_id


def _field_value(f: gguf.ReaderField):
    types = f.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.ARRAY:
            raise GgufMoeError(f"key {f.name}: nested arrays are not supported")
        sub = types[1] if len(types) > 1 else gguf.GGUFValueType.UINT8
        return list(f.contents()), types[0], sub
    return f.contents(), types[0], None


def _open(src: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(src, "r")
    except FileNotFoundError:
        raise GgufMoeError(f"{src}: no such file") from None
    except IsADirectoryError:
        raise GgufMoeError(f"{src}: is a directory, not a GGUF file") from None
    except (ValueError, OSError, IndexError) as e:
        raise CorruptFile(f"{src}: not a readable GGUF file ({e})") from None


def plan_quantize(src: str | Path, preset: Preset | str, dst: str | Path | None = None, options: Options | None = None):
    """Read ``src``'s header and plan the output (``dst`` None for a dry run).  Raises
    GgufMoeError for input llama-quantize refuses (already quantized tensors, no
    architecture) and for types gguf-moe cannot write; the imatrix requirement is checked
    by ``write_quantize`` (``check_imatrix``), so a dry run can show it."""
    opts = options or Options()
    pre = get_preset(preset)
    src = Path(src)
    readers, fields, src_tensors = read_gguf_set(src, opener=_open)  # a file, or a split set
    reader = readers[0]
    arch_f = fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_f is None:
        raise CorruptFile(f"{src}: no general.architecture key; not a model GGUF")
    arch = arch_f.contents()

    def kv_int(key: str) -> int | None:
        f = fields.get(key.format(arch=arch))
        if f is None:
            return None
        v = f.contents()
        if isinstance(v, list):  # per-layer head counts: llama.cpp's n_gqa() looks at layer 0
            v = v[0] if v else None
        return None if v is None else int(v)

    n_layer = kv_int(gguf.Keys.LLM.BLOCK_COUNT) or 0
    n_expert = opts.kv_override_int(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch))
    if n_expert is None:
        n_expert = kv_int(gguf.Keys.LLM.EXPERT_COUNT) or 0
    n_head, n_head_kv = kv_int(gguf.Keys.Attention.HEAD_COUNT), kv_int(gguf.Keys.Attention.HEAD_COUNT_KV)
    if n_head is not None and n_head_kv is None:
        n_head_kv = n_head  # llama.cpp's default when the key is absent
    infos = []
    for rt in src_tensors:
        ne = [int(d) for d in rt.shape]
        shape = tuple(reversed(ne[: n_dims(tuple(reversed(ne)))]))
        infos.append((rt.name, shape, T(rt.tensor_type), rt))
    infos.sort(key=lambda x: llama_sort_key(x[0]))
    renamed, block_count = {}, None
    if opts.prune_layers:
        names, block_count = prune_names([n for n, *_ in infos], opts.prune_layers)
        infos = [(names[n], s, cur, rt) for n, s, cur, rt in infos if names[n] is not None]
        renamed = {n: rt.name for n, _, _, rt in infos if n != rt.name}
    source_types = {n: cur for n, _, cur, _ in infos}
    planned, warnings = plan_tensors(
        [(n, s) for n, s, _, _ in infos], pre, n_expert=n_expert, n_layer=n_layer, arch=arch,
        n_head=n_head, n_head_kv=n_head_kv, has_imatrix=opts.has_imatrix, overrides=opts.overrides,
        source_types=source_types,
    )  # fmt: skip
    for pt, (name, _, cur, _) in zip(planned, infos):
        if pt.ggml_type != cur and cur not in _FLOAT:
            if not opts.allow_requantize:
                raise GgufMoeError(
                    f"{src}: tensor {name} is already {cur.name}; requantizing quantized data loses quality, start "
                    "from an F32/F16/BF16 file (or pass --allow-requantize, as llama-quantize asks)"
                )
            if cur.name not in quant.QTYPES:
                raise GgufMoeError(f"{src}: tensor {name} is {cur.name}, which this version of gguf-moe cannot read")
    return QuantizePlan(
        pre, None if dst is None else Path(dst), planned, warnings,
        src=src, arch=arch, source_types=[cur for _, _, cur, _ in infos], reader=reader,
        src_tensors=src_tensors, readers=readers, renamed=renamed, block_count=block_count,
    )  # fmt: skip


def _writer(plan: QuantizePlan, opts: Options) -> gguf.GGUFWriter:
    fields = plan.reader.fields
    w = gguf.GGUFWriter(None, plan.arch)
    w.kv_data[0].clear()  # re-added below in the input's order
    skip = (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE)
    for key, f in fields.items():
        if key.startswith("GGUF.") or key.startswith("split.") or key in skip:
            continue
        val, vtype, sub = _field_value(f)
        w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(plan.preset.file_type)
    apply_kv_overrides(w, opts.kv_overrides)
    if opts.imatrix is not None:
        add_imatrix_kvs(w, opts.imatrix)
    if plan.block_count is not None:  # gguf_set_val_u32: moved to the end
        key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=plan.arch)
        w.kv_data[0].pop(key, None)
        w.add_uint32(key, plan.block_count)
    align = fields.get(gguf.Keys.General.ALIGNMENT)
    if align is not None:  # the copied key must describe the file we write
        w.data_alignment = int(align.contents())
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    return w


def write_quantize(plan: QuantizePlan, options: Options | None = None, **kw) -> Path:
    """Write ``plan`` to ``plan.path``; returns the path.  On any error the partial file is
    removed and the exception propagates."""
    opts = Options.of(options, **kw)
    if plan.path is None:
        raise GgufMoeError("internal error: the plan has no output path")
    if opts.split is None:
        check_output_free(plan.path, opts.force)
    imatrix = _renamed_imatrix(opts.imatrix, plan.renamed)
    check_imatrix(plan, imatrix)
    progress = opts.progress_or_null()
    src = plan.src
    by_name = {rt.name: rt for rt in (plan.src_tensors or plan.reader.tensors)}
    sw = open_output(plan.path, _writer(plan, opts), force=opts.force, split=opts.split)
    sw.check_free()
    if opts.space_check:
        check_space(sw.planned())
    mms = [m for m in (getattr(r.data, "_mmap", None) for r in (plan.readers or [plan.reader])) if m is not None]
    try:
        sw.open()
        progress.start(sum(int(by_name[plan.renamed.get(t.name, t.name)].n_bytes) for t in plan.tensors), len(plan.tensors))
        for i, (t, cur) in enumerate(zip(plan.tensors, plan.source_types)):
            progress.tensor(t.name, i)
            sw.begin_tensor(t.name)
            rt = by_name[plan.renamed.get(t.name, t.name)]
            raw = np.asarray(rt.data).reshape(-1).view(np.uint8)
            if raw.nbytes != int(rt.n_bytes):
                raise CorruptFile(f"{src}: tensor {t.name} is truncated ({raw.nbytes} of {int(rt.n_bytes)} bytes)")
            if t.ggml_type == cur:
                step = max(1, opts.chunk_bytes)
                for o in range(0, raw.nbytes, step):
                    sw.write(np.array(raw[o : o + step]))
                    progress.advance(min(step, raw.nbytes - o))
            else:
                plan.reused_experts += _requantize_tensor(sw, t, cur, raw, src, imatrix, opts, progress)
            for mm in mms:
                if hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_DONTNEED)
        out = sw.close()
        progress.finish()
        return out
    except BaseException:
        sw.abort()
        raise


def _renamed_imatrix(im, renamed: dict[str, str]):
    """The imatrix as seen under the output's names (``--prune-layers``: llama-quantize looks
    each renumbered tensor up under its input name, ``remap_imatrix``)."""
    if im is None or not renamed:
        return im
    from gguf_moe.imatrix import Imatrix

    entries = {n: w for n, w in im.entries.items() if n not in renamed and n not in renamed.values()}
    entries.update({new: im.entries[old] for new, old in renamed.items() if old in im.entries})
    return Imatrix(im.path, entries, list(im.datasets), im.chunk_count, im.is_legacy)


def _requantize_tensor(sw, t: PlannedTensor, cur: T, raw: np.ndarray, src: Path, imatrix, opts: Options, progress):
    name, shape, new = t.name, t.shape, t.ggml_type
    n = shape[-1]
    rows = raw.reshape(-1, quant.row_bytes(cur.name, n))
    nrows = rows.shape[0]
    per = max(1, shape[1] if len(shape) == 3 else nrows)  # chunks never cross an expert (imatrix)
    step = _max_rows(n, opts.chunk_bytes)
    dups = _Duplicates(shape, lambda r, k: rows[r : r + k])
    for e0 in range(0, nrows, per):
        for r0 in range(e0, min(e0 + per, nrows), step):
            r1 = min(r0 + step, e0 + per, nrows)
            dups.chunk(rows[r0:r1])
            # an identical chunk (a duplicated expert) was written already: copy it
            again = dups.find(sw, new, _imatrix_for(imatrix, name, shape, new, r0), r0, r1 - r0)
            if again is not None:
                sw.write(again)
                progress.advance(rows[r0:r1].nbytes)
                continue
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
                sw.write(encode(x, new, backend=opts.backend, threads=opts.threads, imatrix=qw))
                dups.encoded(new, qw, r0)
            except QuantError as e:
                raise CorruptFile(f"{src}: tensor {name} row {r0} -> {new.name}: {e}") from None
            progress.advance(rows[r0:r1].nbytes)
    return dups.experts(new)


def requantize(src: str | Path, dst: str | Path, preset: Preset | str, options: Options | None = None, **kw) -> Path:
    """Plan and write in one call: ``llama-quantize SRC DST PRESET`` (``options`` or its
    fields as keywords)."""
    opts = Options.of(options, **kw)
    if opts.split is None:
        check_output_free(Path(dst), opts.force)
    return write_quantize(plan_quantize(src, preset, dst, opts), opts)
