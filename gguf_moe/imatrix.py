"""Importance-matrix files, read and normalized as llama-quantize does.

Two formats exist (both written by llama.cpp's ``llama-imatrix``):

* **GGUF** (default since 2025): ``general.type = "imatrix"``; per weight two F32 tensors,
  ``<name>.in_sum2`` (ne ``[ne0, n_mat]``, summed squared activations) and ``<name>.counts``
  (ne ``[1, n_mat]``, tokens seen per matrix, i.e. per expert for ``*_exps``).  Normalized
  weights are ``in_sum2[j] / float(lround(counts[j]))``; a matrix never routed to
  (count 0) gets all-ones weights.
* **legacy .dat**: ``int32 n_entries``; per entry ``int32 len, name[len], int32 ncall,
  int32 nval, float32 values[nval]``; optional trailer ``int32 chunks, int32 len,
  dataset[len]``.  Normalized weights are ``values / float(ncall)`` (as is when
  ``ncall == 0``).

The result maps GGUF tensor names to float32 arrays of ``n_mat * ne0`` values, expert-major,
exactly the ``quant_weights`` that llama-quantize hands to ``ggml_quantize_chunk``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gguf_moe.errors import CorruptFile, LayoutMismatch

__all__ = ["Imatrix", "load_imatrix", "write_imatrix"]


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, np.ndarray]  # name -> float32[n_mat * ne0], normalized
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    is_legacy: bool = False

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Weights for tensor ``name`` of numpy ``shape``, shaped for ``quant.quantize``.

        ``(ne0,)`` for a 2-D weight, ``(n_expert, ne0)`` for a 3-D expert tensor, or None
        when the file has no entry (llama-quantize then uses the plain reference path).
        A size mismatch is an error, except for ``token_embd`` (llama-quantize ignores it).
        """
        w = self.entries.get(name)
        if w is None:
            return None
        ne0 = shape[-1]
        n_mat = shape[0] if len(shape) == 3 else 1
        if w.size != ne0 * n_mat:
            if name.startswith("token_embd."):
                return None
            raise LayoutMismatch(
                f"{self.path}: imatrix entry {name} has {w.size} values, expected {ne0 * n_mat} "
                f"(ne0 {ne0} x {n_mat} matrices); the imatrix was computed for a different model"
            )
        return w.reshape(n_mat, ne0) if len(shape) == 3 else w

    def select(self, include=(), exclude=()) -> Imatrix | None:
        """llama-quantize's ``--include-weights`` / ``--exclude-weights``: drop the entries
        whose name contains one of ``exclude``, then keep only those containing one of
        ``include`` (if any given).  None when nothing is left: llama-quantize then runs as
        without an imatrix (no ``quantize.imatrix.*`` keys, no "has imatrix" rules)."""
        entries = {n: w for n, w in self.entries.items() if not any(x in n for x in exclude)}
        if include:
            entries = {n: w for n, w in entries.items() if any(x in n for x in include)}
        if not entries:
            return None
        return Imatrix(self.path, entries, list(self.datasets), self.chunk_count, self.is_legacy)

    def kv_pairs(self) -> list[tuple[str, object]]:
        """The ``quantize.imatrix.*`` keys llama-quantize appends (strings cut to 127 bytes)."""
        out: list[tuple[str, object]] = [("quantize.imatrix.file", str(self.path)[:127])]
        if self.datasets:
            out.append(("quantize.imatrix.dataset", self.datasets[0][:127]))
        out.append(("quantize.imatrix.entries_count", len(self.entries)))
        if self.chunk_count > 0:
            out.append(("quantize.imatrix.chunks_count", self.chunk_count))
        return out


def load_imatrix(path: str | Path) -> Imatrix:
    path = Path(path)
    try:
        head = path.read_bytes()[:4]
    except OSError as e:
        raise CorruptFile(f"{path}: cannot read imatrix file: {e.strerror}") from None
    im = _load_gguf(path) if head == b"GGUF" else _load_legacy(path)
    for name, w in im.entries.items():
        if not np.isfinite(w).all():
            raise CorruptFile(f"{path}: imatrix entry {name} contains non-finite values; recompute the imatrix")
    return im


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader, GGMLQuantizationType

    try:
        r = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on damaged files
        raise CorruptFile(f"{path}: not a readable GGUF imatrix ({e})") from None

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    datasets, chunk_count, chunk_size = field("imatrix.datasets"), field("imatrix.chunk_count"), field("imatrix.chunk_size")
    if datasets is None or chunk_count is None or chunk_size is None:
        raise CorruptFile(f"{path}: missing imatrix metadata (imatrix.datasets/chunk_count/chunk_size)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise CorruptFile(f"{path}: {t.name} must be F32, found {t.tensor_type.name}")
                into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise CorruptFile(f"{path}: no imatrix data (no *.in_sum2 tensors)")
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise CorruptFile(f"{path}: mismatched sums and counts for {name}")
        s, c = sums[name], counts[name]
        n_mat = c.size
        if n_mat == 0 or s.size % n_mat:
            raise CorruptFile(f"{path}: {name}: {s.size} sums do not split into {n_mat} matrices")
        ne0 = s.size // n_mat
        # lround (half away from zero) of the stored float count, then back to float
        cnt = np.where(c >= 0, np.floor(c.astype(np.float64) + 0.5), np.ceil(c.astype(np.float64) - 0.5))
        cnt = cnt.astype(np.int64).astype(np.float32)
        w = np.ones((n_mat, ne0), dtype=np.float32)
        seen = cnt > 0
        w[seen] = s.reshape(n_mat, ne0)[seen] / cnt[seen, None]
        entries[name] = w.reshape(-1)
    return Imatrix(path, entries, [str(d) for d in datasets], int(chunk_count), False)


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptFile(f"{path}: truncated legacy imatrix at byte {pos} (expected {size} more bytes)")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise CorruptFile(f"{path}: not an imatrix file (neither GGUF nor legacy .dat with entries)")
    entries = {}
    for i in range(n_entries):
        (n,) = take("<i")
        if n < 0 or n > 4096:
            raise CorruptFile(f"{path}: entry {i + 1}: bad name length {n}; not an imatrix file")
        name = take(f"<{n}s")[0].split(b"\0", 1)[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise CorruptFile(f"{path}: entry {name}: bad value count {nval}")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32) if pos + 4 * nval <= len(data) else None
        if vals is None:
            raise CorruptFile(f"{path}: truncated legacy imatrix in entry {name}")
        pos += 4 * nval
        entries[name] = (vals / np.float32(ncall)).astype(np.float32) if ncall > 0 else vals.copy()
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if n > 0 and pos + n <= len(data):
                datasets.append(data[pos : pos + n].split(b"\0", 1)[0].decode("utf-8", "replace"))
    return Imatrix(path, entries, datasets, chunk_count, True)


def write_imatrix(
    path: str | Path,
    entries: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write llama-imatrix's GGUF format: ``entries`` maps a weight name to
    (``in_sum2`` float ``[n_mat, ne0]``, ``counts`` ``[n_mat]``).  Keys and tensor order as
    ``IMatrixCollector::save_imatrix``: no architecture key, ``general.type = imatrix``,
    ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``; per name in sorted
    order ``<name>.in_sum2`` (ne ``[ne0, n_mat]``) then ``<name>.counts`` (ne ``[1, n_mat]``),
    both F32, one-dimensional when ``n_mat`` is 1 (ggml's ``n_dims`` drops trailing ones).  The file is written to ``path.part`` and renamed when complete."""
    import os

    from gguf import GGUFWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    w = GGUFWriter(tmp, "llama")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [str(d) for d in datasets])
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(entries):
        sums, counts = entries[name]
        counts = np.asarray(counts).reshape(-1)
        sums = np.asarray(sums, dtype=np.float32).reshape(len(counts), -1)
        cnt = counts.astype(np.float32).reshape(-1, 1)
        if len(counts) == 1:  # ggml drops trailing dimensions of size 1: ne [ne0] and [1]
            sums, cnt = sums.reshape(-1), cnt.reshape(-1)
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(cnt))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
