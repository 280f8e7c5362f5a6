"""A bounds-checked GGUF header parser: a broken file raises :class:`HeaderError` with the
byte offset where parsing stopped, never another exception.  ``read_header`` returns the
KVs, tensor infos, alignment and data offset; ``validate`` checks them, ``split`` combines
the headers of a split set.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["HeaderError", "KV", "TensorInfo", "GGUFHeader", "read_header", "GGUF_MAGIC", "GGML_MAX_DIMS",
           "GGML_MAX_NAME", "DEFAULT_ALIGNMENT"]

T = GGMLQuantizationType
GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
DEFAULT_ALIGNMENT = 32

# GGUF value type id -> (name, struct code, size); strings and arrays are special.
_VTYPES: dict[int, tuple[str, str | None, int]] = {
    0: ("u8", "B", 1),
    1: ("i8", "b", 1),
    2: ("u16", "H", 2),
    3: ("i16", "h", 2),
    4: ("u32", "I", 4),
    5: ("i32", "i", 4),
    6: ("f32", "f", 4),
    7: ("bool", "?", 1),
    8: ("str", None, 0),
    9: ("array", None, 0),
    10: ("u64", "Q", 8),
    11: ("i64", "q", 8),
    12: ("f64", "d", 8),
}
_NP = {"u8": np.uint8, "i8": np.int8, "u16": np.uint16, "i16": np.int16, "u32": np.uint32, "i32": np.int32,
       "f32": np.float32, "bool": np.bool_, "u64": np.uint64, "i64": np.int64, "f64": np.float64}


class HeaderError(Exception):
    """The header cannot be parsed; ``offset`` is where parsing stopped."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


@dataclass
class KV:
    key: str
    type: str  # "u32", "str", "array[str]", ...
    value: Any  # scalars as Python values; numeric arrays as numpy; string arrays as list[str]


@dataclass
class TensorInfo:
    index: int
    name: str
    ne: tuple[int, ...]  # ggml order (fastest first)
    type_id: int
    offset: int  # relative to the data section
    offset_pos: int = -1  # where the offset field is in the file
    #: the header of the file holding the data (a split set's shard); None: the file read
    src: Any = field(default=None, repr=False, compare=False)

    @property
    def qtype(self) -> T | None:
        try:
            t = T(self.type_id)
        except ValueError:
            return None
        return t if t in GGML_QUANT_SIZES else None

    @property
    def type_name(self) -> str:
        q = self.qtype
        return q.name if q is not None else f"type#{self.type_id}"

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])

    @property
    def n_bytes(self) -> int | None:
        q = self.qtype
        if q is None:
            return None
        bs, ts = GGML_QUANT_SIZES[q]
        if self.ne and self.ne[0] % bs:
            return None
        return self.n_elements // bs * ts

    @property
    def row_bytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        return self.ne[0] // bs * ts


@dataclass
class GGUFHeader:
    path: Path
    file_size: int
    version: int
    kvs: OrderedDict  # key -> KV
    tensors: list[TensorInfo]
    alignment: int
    info_end: int  # end of the tensor infos
    data_offset: int  # start of the data section (info_end rounded up to alignment)

    def kv(self, key: str, default=None):
        v = self.kvs.get(key)
        return default if v is None else v.value


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(
                f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} "
                "(truncated file or corrupt header)",
                self.pos,
            )

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def i64(self, what: str) -> int:
        return self.scalar("q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b


def _read_value(c: _Cursor, type_id: int, key: str) -> tuple[str, Any]:
    if type_id not in _VTYPES:
        raise HeaderError(f"KV {key!r} has unknown GGUF value type {type_id}", c.pos)
    name, code, size = _VTYPES[type_id]
    if name == "str":
        return "str", c.string(f"string value of {key!r}")
    if name != "array":
        return name, c.scalar(code, size, f"value of {key!r}")
    elem = c.u32(f"array element type of {key!r}")
    n = c.u64(f"array length of {key!r}")
    if elem not in _VTYPES or elem == 9:
        raise HeaderError(f"KV {key!r} is an array of unsupported element type {elem}", c.pos)
    ename, ecode, esize = _VTYPES[elem]
    if ename == "str":
        if n * 8 > c.size - c.pos:
            raise HeaderError(f"KV {key!r} claims {n} strings but only {c.size - c.pos} bytes remain", c.pos)
        return "array[str]", [c.string(f"element {i} of {key!r}") for i in range(n)]
    data = c.raw(n * esize, f"array {key!r} ({n} x {ename})")
    return f"array[{ename}]", np.frombuffer(data, dtype=np.dtype(_NP[ename]).newbyteorder("<")).copy()


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse the header and tensor infos.  Raises ``HeaderError`` with a precise message."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise HeaderError(f"file is {size} bytes, too short for a GGUF header (24 bytes)", 0)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm, size)
        magic = c.raw(4, "magic")
        if magic != GGUF_MAGIC:
            raise HeaderError(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file (or a corrupt download)", 0)
        version = c.u32("version")
        if version & 0xFFFF == 0:
            raise HeaderError(f"version field {version:#x} looks byte-swapped: big-endian GGUF files are not supported", 4)
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)", 4)
        n_tensors = c.i64("tensor count")
        n_kv = c.i64("KV count")
        if n_tensors < 0 or n_tensors * 24 > size:
            raise HeaderError(f"header claims {n_tensors} tensors, impossible in a {size}-byte file", 8)
        if n_kv < 0 or n_kv * 12 > size:
            raise HeaderError(f"header claims {n_kv} KV pairs, impossible in a {size}-byte file", 16)
        kvs: OrderedDict[str, KV] = OrderedDict()
        for i in range(n_kv):
            key = c.string(f"key of KV {i}")
            if not key:
                raise HeaderError(f"KV {i} has an empty key", c.pos)
            if key in kvs:
                raise HeaderError(f"duplicate key {key!r} (KV {i})", c.pos)
            type_id = c.u32(f"value type of {key!r}")
            vt, val = _read_value(c, type_id, key)
            kvs[key] = KV(key, vt, val)
        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in kvs:
            a = kvs["general.alignment"]
            if a.type != "u32":
                raise HeaderError(f"general.alignment must be u32, found {a.type}", c.pos)
            alignment = int(a.value)
            if alignment == 0 or alignment & (alignment - 1):
                raise HeaderError(f"general.alignment {alignment} is not a power of two", c.pos)
        tensors: list[TensorInfo] = []
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}")
            nd = c.u32(f"n_dims of tensor {name!r}")
            if nd > GGML_MAX_DIMS:
                raise HeaderError(f"tensor {name!r} has {nd} dimensions; ggml allows at most {GGML_MAX_DIMS}", c.pos)
            ne = tuple(c.i64(f"dimension {j} of tensor {name!r}") for j in range(nd))
            type_id = c.u32(f"type of tensor {name!r}")
            pos = c.pos
            offset = c.u64(f"data offset of tensor {name!r}")
            tensors.append(TensorInfo(i, name, ne, type_id, offset, pos))
        info_end = c.pos
    data_offset = -(-info_end // alignment) * alignment if tensors else info_end
    return GGUFHeader(path, size, version, kvs, tensors, alignment, info_end, data_offset)
