"""Disk-space preflight: every output's exact size is known from the plan (header, KVs and
tensor infos as serialized, padded tensor data), so a conversion that cannot fit stops
before any work instead of failing hours later.

Outputs on the same filesystem are summed.  An output replacing an existing file (``--force``)
still needs its full size: the new file is written beside the old one and renamed at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gguf_moe.errors import GgufMoeError

__all__ = ["check_space", "free_bytes", "fmt_size"]


def fmt_size(n: int) -> str:
    """Decimal units, as disk sizes (and Hugging Face's limits) are given."""
    for unit, div in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _existing_dir(path: Path) -> Path:
    d = path.parent if str(path.parent) else Path(".")
    while not d.exists() and d != d.parent:
        d = d.parent
    return d


def check_space(planned: Iterable[tuple[Path, int]]) -> None:
    """Raise one ``GgufMoeError`` line when the files ``planned`` ((path, size) pairs) do not
    fit in the free space of their filesystems."""
    need: dict[int, list] = {}
    for path, n in planned:
        d = _existing_dir(Path(path))
        dev = os.stat(d).st_dev
        entry = need.setdefault(dev, [Path(path).parent if str(Path(path).parent) else Path("."), d, 0])
        entry[2] += n
    for shown, d, n in need.values():
        free = free_bytes(d)
        if n > free:
            a, b = fmt_size(n), fmt_size(free)
            if a == b:
                a, b = f"{n:,} bytes", f"{free:,} bytes"
            where = f"{shown}/" if not str(shown).endswith("/") else str(shown)
            raise GgufMoeError(
                f"needs {a} in {where}, {b} free; free some space or write elsewhere (--no-space-check skips this check)"
            )
