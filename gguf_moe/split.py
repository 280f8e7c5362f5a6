"""Split GGUF sets, as ``llama-gguf-split --split`` writes them and llama.cpp loads them.

Writing (``SplitGGUF``, same interface as ``writer.StreamingGGUF``) follows
tools/gguf-split/gguf-split.cpp exactly, so a set written here equals, byte for byte,
``llama-gguf-split --split`` of the unsplit file:

* names: ``<stem>-00001-of-0000N.gguf`` (llama.cpp's ``llama_split_path``: ``%s-%05d-of-%05d.gguf``),
  ``<stem>`` being the unsplit name without ``.gguf``;
* keys: the first shard carries every KV of the unsplit file, then ``split.no`` (u16),
  ``split.tensors.count`` (i32), ``split.count`` (u16), in that order (llama-gguf-split
  sets ``split.count`` last, after it knows the count); the other shards carry only these
  three keys;
* tensors, in file order: ``--split-max-tensors N`` starts a new shard at every N-th tensor;
  ``--split-max-size`` starts one when the tensor data of the current shard, each tensor
  padded to 32 bytes, would exceed the limit (metadata is not counted, so the first shard
  may exceed it by its header); a first tensor larger than the limit is an error there, and here;
* layout: 32-byte alignment of the data section and of every tensor (the last one too);
  tensor infos store ``ggml_n_dims`` dimensions (trailing 1s of ``ne`` dropped).

Everything is written in the same single pass as an unsplit file: one shard is open at a
time, each one as ``<shard>.part``; all are moved into place when the last is complete and
all are removed if anything fails.

Reading: ``shard_paths_of(path)`` finds the whole set from its first shard (or any shard);
``read_gguf_set`` opens it with gguf-py for ``quantize``; ``combine_headers`` gives
``validate``/``inspect`` one view of the set and reports missing, truncated or foreign shards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import gguf
import numpy as np

from gguf_moe.errors import CorruptFile, GgufMoeError
from gguf_moe.writer import StreamingGGUF, check_output_free, file_size

if TYPE_CHECKING:
    from gguf_moe.validate import GGUFHeader

__all__ = [
    "SplitSpec",
    "SplitGGUF",
    "parse_split_size",
    "assign_shards",
    "shard_path",
    "shard_paths_of",
    "open_output",
    "read_gguf_set",
    "combine_headers",
    "KEY_NO",
    "KEY_COUNT",
    "KEY_TENSORS",
]

KEY_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO  # "split.no", u16, 0-based
KEY_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT  # "split.count", u16
KEY_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT  # "split.tensors.count", i32
SPLIT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: llama-gguf-split pads with it whatever the input says
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([MG])\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class SplitSpec:
    """``max_bytes`` (``--split-max-size``) or ``max_tensors`` (``--split-max-tensors``)."""

    max_bytes: int | None = None
    max_tensors: int | None = None

    def __post_init__(self):
        if (self.max_bytes is None) == (self.max_tensors is None):
            raise GgufMoeError("internal error: a split needs exactly one of max_bytes and max_tensors")


def parse_split_size(text: str) -> int:
    """llama-gguf-split's size syntax: a whole number of megabytes or gigabytes, ``500M``,
    ``50G`` (decimal units: 1M = 1,000,000 bytes)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise GgufMoeError(f"{text!r}: expected a whole number followed by M or G (e.g. 500M, 50G), as llama-gguf-split takes")
    n = int(m.group(1))
    if n <= 0:
        raise GgufMoeError(f"{text!r}: the size must be positive")
    return n * (1000**2 if m.group(2).upper() == "M" else 1000**3)


def _pad(n: int) -> int:
    return -(-n // SPLIT_ALIGNMENT) * SPLIT_ALIGNMENT


def assign_shards(nbytes: list[int], spec: SplitSpec, names: list[str] | None = None) -> list[list[int]]:
    """Tensor indexes per shard, llama-gguf-split's ``split_strategy``."""
    shards: list[list[int]] = [[]]
    cur = 0
    for i, nb in enumerate(nbytes):
        n = _pad(nb)
        if spec.max_bytes is not None:
            new = cur + n > spec.max_bytes
        else:
            new = 0 < i and i % spec.max_tensors == 0
        if new:
            if not shards[-1]:
                name = names[i] if names else f"tensor {i}"
                raise GgufMoeError(
                    f"--split-max-size {spec.max_bytes:,} bytes is smaller than the first tensor ({name}, {n:,} bytes); "
                    "give a larger size"
                )
            shards.append([])
            cur = n
        else:
            cur += n
        shards[-1].append(i)
    return shards


def shard_path(path: Path, i: int, n: int) -> Path:
    """Shard ``i`` (0-based) of ``n`` for the unsplit output ``path``."""
    path = Path(path)
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf")


def _trimmed(shape) -> tuple[int, ...]:
    """numpy-order shape with ``ggml_n_dims`` dimensions (leading 1s dropped)."""
    shape = tuple(int(d) for d in shape)
    k = 0
    while k < len(shape) - 1 and shape[k] == 1:
        k += 1
    return shape[k:]


class SplitGGUF:
    """A split set written in one pass; ``path`` is the unsplit name the set stands for.
    ``only``: write just that shard (0-based), the same bytes as in the whole set (the
    caller passes only its tensors, ``wants``), so separate processes can write the shards."""

    def __init__(self, path: Path, w: gguf.GGUFWriter, spec: SplitSpec, *, force: bool = False, only: int | None = None):
        if w.data_alignment != SPLIT_ALIGNMENT:
            raise GgufMoeError(
                f"{path}: cannot split a file with general.alignment {w.data_alignment} "
                f"(llama-gguf-split sets are {SPLIT_ALIGNMENT}-byte aligned)"
            )
        self.path = Path(path)
        self.force = force
        names = list(w.tensors[0].keys())
        infos = list(w.tensors[0].values())
        groups = assign_shards([ti.nbytes for ti in infos], spec, names)
        n = len(groups)
        if n > 0xFFFF:  # split.count is a u16
            raise GgufMoeError(f"{path}: {n} shards; a split set has at most 65535, give a larger limit")
        self.paths = [shard_path(self.path, k, n) for k in range(n)]
        self.shards: list[StreamingGGUF] = []
        self._shard_of: dict[str, int] = {}
        for k, idx in enumerate(groups):
            sw = gguf.GGUFWriter(None, w.arch)
            sw.kv_data[0].clear()
            if k == 0:
                sw.kv_data[0].update(w.kv_data[0])
            sw.add_uint16(KEY_NO, k)
            sw.add_int32(KEY_TENSORS, len(names))
            sw.add_uint16(KEY_COUNT, n)
            for i in idx:
                ti = infos[i]
                sw.add_tensor_info(names[i], _trimmed(ti.shape), np.dtype(np.float32), ti.nbytes, raw_dtype=ti.dtype)
                self._shard_of[names[i]] = k
            self.shards.append(StreamingGGUF(self.paths[k], sw, force=force))
        self._cur = -1
        self._moved: list[Path] = []
        if only is not None and not 0 <= only < n:
            raise GgufMoeError(f"{path}: the set has {n} shards; there is no shard {only + 1}")
        self.only = only

    def _mine(self) -> list:
        return self.shards if self.only is None else [self.shards[self.only]]

    def wants(self, name: str) -> bool:
        """Whether tensor ``name`` is written by this writer (with ``only``: in that shard)."""
        return self.only is None or self._shard_of.get(name) == self.only

    def planned(self) -> list[tuple[Path, int]]:
        """(path, exact size) of every file this writes."""
        return [(s.path, file_size(s.w)) for s in self._mine()]

    def check_free(self) -> None:
        for s in self._mine():
            check_output_free(s.path, self.force)

    def open(self) -> None:
        self.check_free()
        if self.only is not None:
            self._cur = self.only
            self.shards[self._cur].open()
            return
        self._next()

    def _next(self) -> None:
        if self._cur >= 0:
            self.shards[self._cur].finish()
        self._cur += 1
        self.shards[self._cur].open()

    def begin_tensor(self, name: str) -> None:
        k = self._shard_of.get(name)
        if k is None:
            raise GgufMoeError(f"{self.path}: internal error: tensor {name!r} is not in the plan")
        while self._cur < k:
            self._next()
        self.shards[self._cur].begin_tensor(name)

    def write(self, data: np.ndarray) -> None:
        self.shards[self._cur].write(data)

    def reread(self, offset: int, nbytes: int) -> np.ndarray:
        return self.shards[self._cur].reread(offset, nbytes)

    def close(self) -> Path:
        """Finish the last shard, then move every shard into place; returns the first
        (with ``only``: that shard, finished and moved into place)."""
        if self.only is not None:
            s = self.shards[self.only]
            s.finish()
            self._moved.append(s.move_into_place())
            return s.path
        while self._cur < len(self.shards) - 1:
            self._next()  # (only if the last shards had no tensors, which the plan forbids)
        self.shards[self._cur].finish()
        for s in self.shards:
            self._moved.append(s.move_into_place())
        return self.paths[0]

    def abort(self) -> None:
        for s in self.shards:
            s.abort()
        for p in self._moved:
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def open_output(path: Path, w: gguf.GGUFWriter, *, force: bool = False, split: SplitSpec | None = None,
                shard: int | None = None):  # fmt: skip
    """The writer for one output: a single file, or a split set when ``split`` is given
    (``shard``: only that shard of it).  Both have ``planned()`` (paths and exact sizes, for
    the disk-space preflight)."""
    if split is None:
        return StreamingGGUF(path, w, force=force)
    return SplitGGUF(path, w, split, force=force, only=shard)


# --------------------------------------------------------------------------- reading


def shard_paths_of(path: Path, count: int | None = None) -> list[Path] | None:
    """Every shard path of the set ``path`` belongs to (by its name, or ``count`` from its
    ``split.count``), or None when ``path`` is not a shard name."""
    path = Path(path)
    m = _SHARD_RE.match(path.name)
    if not m:
        return None
    n = int(m.group("n")) if count is None else count
    prefix = path.with_name(m.group("stem") + ".gguf")
    return [shard_path(prefix, k, n) for k in range(n)]


def first_shard(path: Path) -> Path:
    """The first shard of the set ``path`` names (``path`` itself when not a shard name)."""
    paths = shard_paths_of(path)
    return paths[0] if paths else Path(path)


def _as_int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _split_kvs(fields) -> tuple[int | None, int | None, int | None]:
    def get(key):
        f = fields.get(key)
        return None if f is None else _as_int(f.contents())

    return get(KEY_NO), get(KEY_COUNT), get(KEY_TENSORS)


def read_gguf_set(src: Path, opener: Callable[[Path], gguf.GGUFReader] | None = None) -> tuple[list, dict, list]:
    """Open a GGUF file or a whole split set (given its first shard or any shard) with
    gguf-py (``opener``, default ``gguf.GGUFReader`` with one-line errors): (readers, the
    first file's fields, every tensor in order).  A missing, truncated or foreign shard is
    a ``CorruptFile``."""
    _open = opener or _reader
    src = Path(src)
    paths = shard_paths_of(src)
    first = paths[0] if paths else src
    if paths and not first.is_file():
        raise CorruptFile(f"{first}: shard 1 of {len(paths)} is missing")
    readers = [_open(first)]
    no, count, n_tensors = _split_kvs(readers[0].fields)
    if count is None or count == 0:  # a plain file (llama-gguf-split --merge leaves split.count = 0)
        if paths is not None and len(paths) > 1:
            raise CorruptFile(f"{first}: named as shard 1 of {len(paths)} but it has no split.count key")
        return readers, readers[0].fields, list(readers[0].tensors)
    expected = shard_paths_of(first, count)
    if expected is None:
        raise CorruptFile(
            f"{first}: shard of a {count}-file split set but not named <name>-00001-of-{count:05d}.gguf; "
            "llama.cpp finds the other shards by that name"
        )
    if no != 0:
        raise CorruptFile(f"{first}: split.no is {no}, expected 0 for the first shard")
    for k, p in enumerate(expected[1:], start=1):
        if not p.is_file():
            raise CorruptFile(f"{p}: shard {k + 1} of {count} is missing")
        r = _open(p)
        kno, kcount, kt = _split_kvs(r.fields)
        if (kno, kcount, kt) != (k, count, n_tensors):
            raise CorruptFile(
                f"{p}: not shard {k + 1} of this set (split.no {kno}, split.count {kcount}, split.tensors.count {kt}; "
                f"expected {k}, {count}, {n_tensors})"
            )
        readers.append(r)
    tensors = [t for r in readers for t in r.tensors]
    if n_tensors is not None and len(tensors) != n_tensors:
        raise CorruptFile(f"{first}: the set holds {len(tensors)} tensors, split.tensors.count says {n_tensors}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CorruptFile(f"{first}: tensor {dup} is in more than one shard")
    return readers, readers[0].fields, tensors


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path, "r")
    except FileNotFoundError:
        raise GgufMoeError(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError) as e:
        raise CorruptFile(f"{path}: not a readable GGUF file ({e})") from None


def combine_headers(h: GGUFHeader, add: Callable[..., None]) -> tuple[GGUFHeader, list[GGUFHeader]]:
    """One view of the split set whose first shard's header is ``h``: its KVs without the
    ``split.*`` keys, the tensors of every shard (each ``TensorInfo.src`` is its shard's
    header), and the shard headers that could be read.  Problems with the set are reported
    through ``add(severity, check, message, ...)`` (``validate.Report.add``)."""
    from collections import OrderedDict

    from gguf_moe.validate import GGUFHeader, HeaderError, read_header

    count = _as_int(h.kv(KEY_COUNT)) or 0
    no = _as_int(h.kv(KEY_NO))
    n_tensors = _as_int(h.kv(KEY_TENSORS))
    for key, want in ((KEY_NO, "u16"), (KEY_COUNT, "u16"), (KEY_TENSORS, "i32")):
        kv = h.kvs.get(key)
        if kv is None:
            add("error", "split", f"{key} is missing: llama.cpp cannot load the set", expected=want, found="missing")
        elif kv.type != want:
            add("error", "split", f"{key} has type {kv.type}; llama.cpp reads {want}", expected=want, found=kv.type)
    paths = shard_paths_of(h.path, count)
    if paths is None:
        add("error", "split", f"{h.path.name} is shard {int(no or 0) + 1} of {count} but is not named "
            f"<name>-{int(no or 0) + 1:05d}-of-{count:05d}.gguf: llama.cpp finds the shards by that name")
        paths = [h.path]
    elif paths[0].name != h.path.name or no not in (0, None):
        add("error", "split", f"{h.path.name} is not the first shard (split.no {no}); give the -00001-of- file",
            expected=0, found=no)
    shards = [h]
    for k, p in enumerate(paths[1:], start=1):
        if not p.is_file():
            add("error", "split", f"shard {k + 1} of {count} is missing: {p.name}")
            continue
        try:
            sh = read_header(p)
        except (HeaderError, OSError) as e:
            add("error", "split", f"shard {k + 1} of {count} ({p.name}) cannot be read: {e}")
            continue
        got = (_as_int(sh.kv(KEY_NO)), _as_int(sh.kv(KEY_COUNT)), _as_int(sh.kv(KEY_TENSORS)))
        if got != (k, count, n_tensors):
            add("error", "split", f"{p.name} does not belong to this set: split.no {got[0]}, split.count {got[1]}, "
                f"split.tensors.count {got[2]}", expected=[k, count, n_tensors], found=list(got))
            continue
        extra = [key for key in sh.kvs if not key.startswith("split.")]
        if extra:
            add("warning", "split", f"{p.name} carries {len(extra)} keys besides split.* (llama.cpp reads only the first "
                f"shard's), e.g. {extra[0]}")
        shards.append(sh)
    tensors = []
    seen: dict[str, str] = {}
    for sh in shards:
        for t in sh.tensors:
            t.src = sh
            if t.name in seen:
                add("error", "split", f"tensor is in {seen[t.name]} and in {sh.path.name}", t.name)
                continue
            seen[t.name] = sh.path.name
            tensors.append(t)
    if len(shards) == len(paths) and isinstance(n_tensors, int) and len(tensors) != n_tensors:
        add("error", "split", f"the set holds {len(tensors)} tensors, split.tensors.count says {n_tensors}",
            expected=n_tensors, found=len(tensors))
    for i, t in enumerate(tensors):
        t.index = i
    kvs = OrderedDict((k, v) for k, v in h.kvs.items() if not k.startswith("split."))
    size = sum(sh.file_size for sh in shards)
    view = GGUFHeader(h.path, size, h.version, kvs, tensors, h.alignment, h.info_end, h.data_offset)
    return view, shards


def set_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def is_split_header(h: GGUFHeader) -> bool:
    """A shard of a set of more than one file (``split.count`` > 1), or any file whose name
    says it is one."""
    count = _as_int(h.kv(KEY_COUNT)) or 0
    return count > 1 or (KEY_COUNT in h.kvs and shard_paths_of(h.path) is not None)


def describe(paths: list[Path]) -> str:
    n = len(paths)
    return f"{paths[0]}" if n == 1 else f"{paths[0]} (+{n - 1} more shard{'s' if n > 2 else ''})"
