"""Search tables of the i-quant lattices, derived from gguf's published grids as ggml does.

The grids themselves come from the ``gguf`` package (``gguf.quants.IQ2_XXS.grid_hex`` ...:
each grid point is a little-endian ``uint16`` of eight 2-bit fields).  The quantizers need
more than the grid: a map from any point of the search space to its grid index, and, for
points off the grid, the list of grid points to try instead.  ggml builds these once per
type (``iq2xs_init_impl`` / ``iq3xs_init_impl`` in ggml-quants.c); this module builds the
same arrays, with the same encoding, so kernels can index them exactly like the C code.

``iq2_tables(name)`` -> ``Iq2Tables(grid, kmap, neighbours)`` for ``"IQ2_XXS"`` (256
points), ``"IQ2_XS"`` (512), ``"IQ2_S"`` (1024), ``"IQ1_S"`` / ``"IQ1_M"`` (2048, shared):

* ``grid``: ``int8 [G, 8]``, ggml's ``kgrid_q2xs``: coordinate ``2*l + 1`` (1, 3, 5) for
  the 2-bit field ``l`` of each point (also for IQ1_S, whose fields mean -1, 0, +1).
* ``kmap``: ``int32 [43692]``, indexed by ``u = sum(l[k] << 2*k)`` (``l[k]`` in 0..2 as the
  quantizers clamp them; the table covers every ``u`` up to 43691).  ``kmap[u] >= 0`` is
  the grid index of point ``u``; ``kmap[u] < 0`` means ``u`` is off the grid and its
  neighbour list starts at ``neighbours[-kmap[u] - 1]``.
* ``neighbours``: ``uint16``; a list is its length ``n`` followed by ``n`` grid indices:
  every grid point whose squared distance (in the ``2*l + 1`` coordinates) to ``u`` is
  among the ``nwant`` smallest distinct distances (nwant = 2 for IQ2_XXS/IQ2_XS, 1 for
  IQ2_S, 3 for IQ1_S/IQ1_M), ordered by (distance, grid index).  That is the order ggml's
  ``qsort`` produces: its comparator compares (distance, index) pairs, a total order, so
  equal distances never depend on the sort algorithm.  Lists are laid out in increasing
  ``u``, as ggml's serial prefix sum places them.

``iq3_tables(name)`` -> ``Iq3Tables(grid, kmap, neighbours)`` for ``"IQ3_XXS"`` (256
points, nwant 2) and ``"IQ3_S"`` (512, nwant 3): the same encoding with four 3-bit fields
(``iq3xs_init_impl``): ``grid`` ``int8 [G, 4]`` in 1, 3, ..., 15, ``kmap`` ``int32 [4096]``.

All arrays are C-contiguous and read-only, usable as numba arguments.  They are built on
first use (about half a second per 256 grid points here) and kept for the process.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from gguf import quants as _gq

__all__ = [
    "Iq2Tables",
    "iq2_tables",
    "IQ2_KMAP_SIZE",
    "IQ2_NAMES",
    "Iq3Tables",
    "iq3_tables",
    "IQ3_KMAP_SIZE",
    "IQ3_NAMES",
]

#: ggml's ``kmap_size``: enough for every u whose fields are at most 2 (max 0xAAAA).
IQ2_KMAP_SIZE = 43692

#: name -> (gguf class holding the grid, nwant)
_IQ2_SOURCES = {
    "IQ2_XXS": (_gq.IQ2_XXS, 2),
    "IQ2_XS": (_gq.IQ2_XS, 2),
    "IQ2_S": (_gq.IQ2_S, 1),
    "IQ1_S": (_gq.IQ1_S, 3),
    "IQ1_M": (_gq.IQ1_S, 3),  # IQ1_M shares IQ1_S's grid and tables in ggml
}
IQ2_NAMES = tuple(_IQ2_SOURCES)


class Iq2Tables(NamedTuple):
    grid: np.ndarray  # int8 [G, 8], values 2*l+1
    kmap: np.ndarray  # int32 [IQ2_KMAP_SIZE]
    neighbours: np.ndarray  # uint16, (n, idx_1..idx_n) lists


def _packed_grid(cls) -> np.ndarray:
    """The grid as ggml's ``uint16`` table (eight 2-bit fields per point)."""
    raw = bytes.fromhex(cls.grid_hex.decode("ascii"))
    g = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    if g.size != cls.grid_shape[0]:
        raise AssertionError(f"{cls.__name__}: grid has {g.size} points, expected {cls.grid_shape[0]}")
    return g


def _fields(u: np.ndarray) -> np.ndarray:
    """2-bit fields of each ``u`` -> ``[len(u), 8]`` coordinates ``2*l + 1``."""
    shifts = 2 * np.arange(8)
    return (2 * ((u[:, None] >> shifts) & 3) + 1).astype(np.int64)


@functools.cache
def iq2_tables(name: str) -> Iq2Tables:
    """``(grid, kmap, neighbours)`` of ggml's ``iq2xs_init_impl`` for ``name`` (see module doc)."""
    try:
        cls, nwant = _IQ2_SOURCES[name]
    except KeyError:
        raise ValueError(f"no iq2 grid tables for {name!r}; known: {', '.join(IQ2_NAMES)}") from None
    if name == "IQ1_M":
        return iq2_tables("IQ1_S")
    packed = _packed_grid(cls)
    grid = _fields(packed)  # [G, 8] int64 in 1,3,5
    gsize = grid.shape[0]

    kmap = np.full(IQ2_KMAP_SIZE, -1, dtype=np.int64)
    kmap[packed] = np.arange(gsize)  # later duplicates would win, as in ggml (there are none)

    off = np.flatnonzero(kmap < 0)  # points off the grid, increasing u
    pos = _fields(off)
    gnorm = (grid * grid).sum(axis=1)
    gridf = grid.astype(np.float64)
    counts = np.empty(off.size, dtype=np.int64)
    chunks = []
    step = 4096
    for a in range(0, off.size, step):
        p = pos[a : a + step]
        dot = (p.astype(np.float64) @ gridf.T).astype(np.int64)  # small integers: exact
        d2 = (p * p).sum(axis=1)[:, None] + gnorm[None, :] - 2 * dot
        # the nwant smallest distinct distances of each row
        thr = d2.min(axis=1)
        for _ in range(nwant - 1):
            nxt = np.where(d2 > thr[:, None], d2, np.iinfo(np.int64).max).min(axis=1)
            thr = np.where(nxt == np.iinfo(np.int64).max, thr, nxt)
        rows, cols = np.nonzero(d2 <= thr[:, None])
        order = np.lexsort((cols, d2[rows, cols], rows))  # by row, then distance, then index
        rows, cols = rows[order], cols[order]
        counts[a : a + p.shape[0]] = np.bincount(rows, minlength=p.shape[0])
        chunks.append((rows + a, cols))

    # layout: for each off-grid u (increasing), one count then its indices
    starts = np.concatenate(([0], np.cumsum(counts + 1)[:-1]))
    neighbours = np.empty(int((counts + 1).sum()), dtype=np.uint16)
    neighbours[starts] = counts
    for rows, cols in chunks:
        rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")  # rows are sorted
        neighbours[starts[rows] + 1 + rank] = cols
    kmap[off] = -(starts + 1)

    out = Iq2Tables(
        np.ascontiguousarray(grid, dtype=np.int8),
        np.ascontiguousarray(kmap, dtype=np.int32),
        neighbours,
    )
    for a in out:
        a.setflags(write=False)
    return out


# --------------------------------------------------------------------------- iq3xs_init_impl

#: ggml's ``kmap_size`` for the 3-bit lattices: four 3-bit fields.
IQ3_KMAP_SIZE = 4096

#: name -> (gguf class holding the grid, nwant)
_IQ3_SOURCES = {
    "IQ3_XXS": (_gq.IQ3_XXS, 2),  # grid_size 256
    "IQ3_S": (_gq.IQ3_S, 3),  # grid_size 512
}
IQ3_NAMES = tuple(_IQ3_SOURCES)


class Iq3Tables(NamedTuple):
    grid: np.ndarray  # int8 [G, 4], values 2*l+1
    kmap: np.ndarray  # int32 [IQ3_KMAP_SIZE]
    neighbours: np.ndarray  # uint16, (n, idx_1..idx_n) lists


@functools.cache
def iq3_tables(name: str) -> Iq3Tables:
    """``(grid, kmap, neighbours)`` of ggml's ``iq3xs_init_impl`` for ``"IQ3_XXS"`` / ``"IQ3_S"``.

    Same encoding as ``iq2_tables`` with four 3-bit fields per point: ``grid`` is ``int8
    [G, 4]`` with coordinates ``2*l + 1`` (1, 3, ..., 15), ``kmap`` is indexed by
    ``u = sum(l[k] << 3*k)`` (every u below 4096), neighbour lists hold the grid points at
    the ``nwant`` smallest distinct squared distances (2 for IQ3_XXS, 3 for IQ3_S), ordered
    by (distance, grid index).  gguf publishes the grids as dequantization values
    (``grid_map``: 4, 12, ..., 62 for IQ3_XXS, 1, 3, ..., 15 for IQ3_S); the field ``l`` of
    a value is its position in ``grid_map``.
    """
    try:
        cls, nwant = _IQ3_SOURCES[name]
    except KeyError:
        raise ValueError(f"no iq3 grid tables for {name!r}; known: {', '.join(IQ3_NAMES)}") from None
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values)
    if not np.array_equal(np.asarray(cls.grid_map, dtype=np.float32)[levels], values):
        raise AssertionError(f"{cls.__name__}: grid values outside grid_map")
    levels = levels.astype(np.int64)  # [G, 4] in 0..7
    grid = 2 * levels + 1
    gsize = grid.shape[0]
    shifts = 3 * np.arange(4)
    packed = (levels << shifts).sum(axis=1)

    kmap = np.full(IQ3_KMAP_SIZE, -1, dtype=np.int64)
    kmap[packed] = np.arange(gsize)

    off = np.flatnonzero(kmap < 0)  # points off the grid, increasing u
    pos = 2 * ((off[:, None] >> shifts) & 7) + 1  # [M, 4]
    d2 = np.zeros((off.size, gsize), dtype=np.int64)  # [M, G], exact integers
    for k in range(4):
        d2 += (pos[:, k, None] - grid[None, :, k]) ** 2
    thr = d2.min(axis=1)
    big = np.iinfo(np.int64).max
    for _ in range(nwant - 1):  # the nwant smallest distinct distances of each row
        nxt = np.where(d2 > thr[:, None], d2, big).min(axis=1)
        thr = np.where(nxt == big, thr, nxt)
    rows, cols = np.nonzero(d2 <= thr[:, None])
    order = np.lexsort((cols, d2[rows, cols], rows))  # by row, then distance, then index
    rows, cols = rows[order], cols[order]
    counts = np.bincount(rows, minlength=off.size)

    starts = np.concatenate(([0], np.cumsum(counts + 1)[:-1]))
    neighbours = np.empty(int((counts + 1).sum()), dtype=np.uint16)
    neighbours[starts] = counts
    rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    neighbours[starts[rows] + 1 + rank] = cols
    kmap[off] = -(starts + 1)

    out = Iq3Tables(
        np.ascontiguousarray(grid, dtype=np.int8),
        np.ascontiguousarray(kmap, dtype=np.int32),
        neighbours,
    )
    for a in out:
        a.setflags(write=False)
    return out
