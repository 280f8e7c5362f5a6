"""Streaming GGUF output: header, KVs and tensor infos through ``gguf.GGUFWriter``, tensor
data written chunk by chunk.

``GGUFWriter`` serializes the header, the key/values and the tensor infos (planned sizes,
``add_tensor_info(..., raw_dtype=...)``); the data section is then written here, tensor by
tensor in tensor-info order, each tensor padded to the alignment (32 bytes, the last one
too, as llama.cpp does).  Bytes written per tensor are counted and must equal the plan.

The file is written as ``<out>.part`` next to the output and renamed with ``os.replace``
when complete; ``abort()`` (any error, Ctrl-C) deletes the partial file.  An existing
output is never overwritten unless ``force``.  A failed write (a full disk: ENOSPC) is one
``GgufMoeError`` naming the file.  ``file_size(w)`` is the exact size a writer's file will
have, known before anything is written (the disk-space preflight uses it).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import gguf
import numpy as np

from gguf_moe.errors import GgufMoeError

__all__ = ["StreamingGGUF", "part_path", "check_output_free", "file_size", "write_error"]


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def check_output_free(path: Path, force: bool) -> None:
    """Refuse to start when ``path`` exists (unless ``force``) or cannot be written."""
    if path.exists() and not force:
        raise GgufMoeError(f"{path}: output already exists; use --force to overwrite it or choose another name")
    if path.is_dir():
        raise GgufMoeError(f"{path}: is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GgufMoeError(f"{parent}: output directory does not exist; create it first")


def file_size(w: gguf.GGUFWriter) -> int:
    """The size of the file ``w`` describes: header, KVs and tensor infos as ``GGUFWriter``
    serializes them, padded to the alignment, then every tensor padded to the alignment."""
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, KV count
    for key, val in w.kv_data[0].items():
        n += len(w._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
        n += len(w._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    align = w.data_alignment
    for name, ti in w.tensors[0].items():
        n += len(w._pack_val(name, gguf.GGUFValueType.STRING, add_vtype=False)) + 4 + 8 * len(ti.shape) + 4 + 8
    n = -(-n // align) * align
    return n + sum(-(-ti.nbytes // align) * align for ti in w.tensors[0].values())


def write_error(path: Path, e: OSError, done: int | None = None) -> GgufMoeError:
    """One line for a failed write to ``path`` (ENOSPC named as such)."""
    if e.errno == errno.ENOSPC:
        what = "no space left on device (ENOSPC)"
    elif e.errno == errno.EDQUOT:
        what = "disk quota exceeded (EDQUOT)"
    else:
        what = e.strerror or str(e)
    at = f" after {done:,} bytes" if done else ""
    return GgufMoeError(f"{path}: write failed{at}: {what}; the partial output was removed")


class StreamingGGUF:
    """One output file.  ``w`` holds the KVs and the tensor infos (in write order) and has
    not been written yet; ``sizes`` are the planned byte sizes of those tensors."""

    def __init__(self, path: Path, w: gguf.GGUFWriter, *, force: bool = False):
        self.path = Path(path)
        self.part = part_path(self.path)
        self.force = force
        self.w = w
        self.names = list(w.tensors[0].keys())
        self.sizes = [ti.nbytes for ti in w.tensors[0].values()]
        self.align = w.data_alignment
        self._fout = None
        self._i = -1
        self._written = 0
        self._start = 0
        self.data_offset = 0
        self._created = False

    def planned(self) -> list[tuple[Path, int]]:
        """(path, exact size) of the file this writes."""
        return [(self.path, file_size(self.w))]

    def check_free(self) -> None:
        check_output_free(self.path, self.force)

    # -- lifecycle ----------------------------------------------------------------
    def open(self) -> None:
        check_output_free(self.path, self.force)
        self._created = True
        try:
            self.w.write_header_to_file(self.part)
            self.w.write_kv_data_to_file()
            self.w.write_ti_data_to_file()
            self._fout = self.w.fout[0]
            self._pad()
        except OSError as e:
            raise write_error(self.path, e) from None
        self.data_offset = self._fout.tell()

    def _tell(self) -> int | None:
        try:
            return self._fout.tell()
        except (OSError, ValueError):
            return None

    def _pad(self) -> None:
        pos = self._fout.tell()
        pad = -pos % self.align
        if pad:
            try:
                self._fout.write(b"\0" * pad)
            except OSError as e:
                raise write_error(self.path, e, pos) from None

    def begin_tensor(self, name: str) -> None:
        self._finish_tensor()
        self._i += 1
        if self._i >= len(self.names) or self.names[self._i] != name:
            want = self.names[self._i] if self._i < len(self.names) else "(none)"
            raise GgufMoeError(f"{self.path}: internal error: writing tensor {name!r} but the file expects {want!r} next")
        self._written = 0
        self._start = self._fout.tell()

    def write(self, data: np.ndarray) -> None:
        b = np.ascontiguousarray(data).view(np.uint8)
        self._written += b.nbytes
        if self._written > self.sizes[self._i]:
            self._size_error()
        try:
            self._fout.write(memoryview(b.reshape(-1)))
        except OSError as e:
            raise write_error(self.path, e, self._tell()) from None

    def reread(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of the current tensor's data already written, from ``offset`` (an
        expert slice identical to an earlier one is copied from here, not encoded again)."""
        if offset < 0 or offset + nbytes > self._written:
            raise GgufMoeError(
                f"{self.path}: internal error: rereading bytes {offset}..{offset + nbytes} of tensor "
                f"{self.names[self._i]!r}, {self._written} written"
            )
        out = np.empty(nbytes, dtype=np.uint8)
        try:
            self._fout.flush()
            with open(self.part, "rb", buffering=0) as f:  # (the output is open write-only)
                n = os.preadv(f.fileno(), [out], self._start + offset)
        except OSError as e:
            raise write_error(self.path, e, self._tell()) from None
        if n != nbytes:
            raise GgufMoeError(f"{self.path}: read back {n} of {nbytes} bytes just written")
        return out

    def _finish_tensor(self) -> None:
        if self._i < 0:
            return
        if self._written != self.sizes[self._i]:
            self._size_error()
        self._pad()

    def _size_error(self):
        raise GgufMoeError(
            f"{self.path}: internal error: tensor {self.names[self._i]!r} got {self._written} bytes, planned {self.sizes[self._i]}"
        )

    def finish(self) -> None:
        """Complete ``<out>.part`` and check its size (the output is not moved into place)."""
        self._finish_tensor()
        if self._i != len(self.names) - 1:
            raise GgufMoeError(f"{self.path}: internal error: {self._i + 1} of {len(self.names)} tensors written")
        try:
            self._fout.flush()
            end = self._fout.tell()
            self.w.close()
        except OSError as e:
            raise write_error(self.path, e) from None
        self._fout = None
        expected = self.data_offset + sum(-(-s // self.align) * self.align for s in self.sizes)
        if end != expected:
            raise GgufMoeError(f"{self.path}: wrote {end} bytes, planned {expected}")

    def close(self) -> Path:
        """Finish the file, check its size and move it into place."""
        if self._fout is not None:
            self.finish()
        return self.move_into_place()

    def move_into_place(self) -> Path:
        if self.path.exists() and not self.force:
            raise GgufMoeError(f"{self.path}: output appeared while converting; use --force to overwrite it")
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file (never touches the final output)."""
        for f in self.w.fout or ():
            try:
                f.close()
            except Exception:  # a full disk fails the final flush too
                pass
        self._fout = None
        if self._created:
            try:
                self.part.unlink()
            except FileNotFoundError:
                pass
