"""numba kernels for IQ3_XXS and IQ3_S, byte-identical to ggml's quantizers.

Same algorithm as the numpy reference (``quant._numpy_iq3``, which describes the formats
and the search): ``quantize_row_iq3_xxs_impl`` / ``quantize_row_iq3_s_impl`` with
``iq3_find_best_neighbour``, tables from ``quant._iqgrid.iq3_tables``.

Layout follows ``quant._numba``: a tile of ``NL`` sub-blocks (32 values each, ``NL / 8``
super-blocks) is transposed into flat float32 buffers, value i of lane s at ``i*NL + s``,
so the elementwise steps of every scale candidate (levels, grid codes, the two sums) are
loops over lanes that LLVM vectorizes; each lane does exactly the float32 operations of its
C sub-block in C order.  The groups off the grid are listed (branch-free) and searched one
by one: ``_search_scalar``, or on x86-64 with AVX2 the vector search of ``_make_best`` (8
candidates per ``vpermps``); ``SEARCH`` says which runs, both give C's choice.
``nearest_int`` is the bit trick everywhere (IQ3_S quantizes sub-blocks of subnormal
values, where ``id`` overflows to inf).

Input where C's neighbour search finds no candidate (every distance inf or NaN: values of
~1e13 and more) makes ggml abort; the kernels report the sub-block and ``quantize`` raises
``QuantError``.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._iqgrid import iq3_tables
from ._numba import _JIT, _f16, _nint, _put16
from ._numpy_iq3 import too_large

F32 = np.float32
QK_K = 256
NL = 64  # lanes (sub-blocks) per tile; a power of two, at least 8
_NLB = NL.bit_length() - 1

_Z = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_FLT_MAX = F32(3.4028234663852886e38)
_EPS_XXS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
_QV = np.arange(1, 16, 2).astype(F32)  # grid coordinate of each level


@functools.cache
def tables(name: str):
    """``(cidx int8 [4*len(neighbours)], levels int32 [G*4], kmap int32, neighbours int32, vidx, voff)``.

    ``levels[4*g + i]`` is the level (0..7) of coordinate i of grid point g; for entry p of
    the neighbour lists, ``cidx[4*p + i]`` is ``8*i + level`` of coordinate i of the point
    ``neighbours[p]`` (0 for entries that hold a list length).  ``vidx`` holds the same levels
    for the vector search, list by list in chunks of 8 candidates (``[chunk][coordinate][8]``,
    padded with level 0); the list starting at ``neighbours[p]`` begins at ``vidx[voff[p]]``.
    """
    t = iq3_tables(name)
    lev = (t.grid.astype(np.int32) - 1) // 2  # [G, 4]
    nbr = t.neighbours.astype(np.int32)
    is_len = np.zeros(nbr.size, bool)
    is_len[-t.kmap[t.kmap < 0].astype(np.int64) - 1] = True
    idx = lev[np.where(is_len, 0, nbr)] + 8 * np.arange(4)[None, :]  # [len, 4]
    idx[is_len] = 0
    # the same levels in chunks of 8 candidates: [chunk][coordinate][8], padded with level 0
    starts = np.flatnonzero(is_len)
    counts = nbr[starts].astype(np.int64)
    nch = 2 * -(-counts // 16)  # chunks of 8, in pairs
    voff = np.zeros(nbr.size, np.int64)
    voff[starts] = 32 * np.concatenate(([0], np.cumsum(nch)[:-1]))
    vidx = np.zeros(32 * int(nch.sum()), np.int32)
    li = np.repeat(np.arange(starts.size), counts)  # list of each candidate
    j = np.arange(li.size) - np.repeat(np.cumsum(counts) - counts, counts)  # position in its list
    at = voff[starts][li] + 32 * (j // 8) + j % 8
    vidx[at[:, None] + 8 * np.arange(4)[None, :]] = lev[nbr[starts[li] + 1 + j]]
    return (
        np.ascontiguousarray(idx.reshape(-1), dtype=np.int8),
        np.ascontiguousarray(lev.reshape(-1)),
        np.ascontiguousarray(t.kmap, dtype=np.int32),
        nbr,
        vidx,
        voff,
    )


@njit(inline="always", **_JIT)
def _search_scalar(nbr, cidx, vidx, voff, start, T, xval, waux, o, scale):
    """``iq3_find_best_neighbour`` for the list at ``nbr[start]`` and the group at
    ``xval[o + i*NL]``: the entry p of the chosen grid point ``nbr[p]``, or -1 where no
    distance is below FLT_MAX (ggml asserts).

    The distance is a sum of four terms ``waux*diff*diff``, each depending on one coordinate
    and its level only: the 4 x 8 possible terms are computed first (the same float
    operations as C) and each candidate adds its four in C's order.
    """
    for i in range(4):
        xi = xval[o + i * NL]
        wi = waux[o + i * NL]
        for l in range(8):
            diff = scale * _QV[l] - xi
            T[8 * i + l] = (wi * diff) * diff
    cnt = nbr[start]
    best = _FLT_MAX
    gi = -1
    for p in range(start + 1, start + cnt + 1):
        c = 4 * p
        d2 = T[cidx[c]] + T[cidx[c + 1]]
        d2 += T[cidx[c + 2]]
        d2 += T[cidx[c + 3]]
        upd = d2 < best
        best = d2 if upd else best
        gi = p if upd else gi
    return gi


def _host_simd() -> str:
    """``"avx2"`` or ``"scalar"``: the neighbour search this CPU runs."""
    from numba.core import config

    if config.CPU_NAME is not None:  # NUMBA_CPU_NAME / NUMBA_CPU_FEATURES: compile for that target
        return "avx2" if "+avx2" in (config.CPU_FEATURES or "").split(",") else "scalar"
    try:
        from llvmlite import binding

        f = binding.get_host_cpu_features()
    except Exception:  # pragma: no cover - feature query unavailable
        return "scalar"
    return "avx2" if f.get("avx2", False) else "scalar"


#: The neighbour search in use: ``"avx2"`` where the compile target has AVX2, else
#: ``"scalar"`` (both give the same bytes; the vector one is only built for AVX2 targets).
SEARCH = _host_simd()
_AVX2_TARGET = SEARCH == "avx2"


_f32t = ir.FloatType()
_i1t, _i32t, _i64t = ir.IntType(1), ir.IntType(32), ir.IntType(64)


def _splat(builder, val, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(_i32t, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_i32t, vt.count), [0] * vt.count))


def _make_best(W=8):
    """The vector neighbour search as a numba intrinsic: AVX2 ``vpermps`` on ``W`` = 8 lanes
    (x86-64 only; a 16-lane AVX-512 form measured slower here and is not built).

    ``best(xval, waux, o, scale, vidx, off, cnt)`` returns the position j in the list of the
    first candidate of least distance below FLT_MAX, or -1.  The 4 x 8 terms
    ``waux*diff*diff`` are four vectors (the C operations lane by lane, no contraction);
    ``vpermps`` picks each candidate's term of
    every coordinate, W candidates at a time, and the four are added in C's order.  Lane k
    of the running minimum sees candidates k, k+W, k+2W, ... in order and keeps the first
    smallest below FLT_MAX (C's strict ``<``: NaN never taken); the result is the smallest
    index among the lanes holding the overall minimum.  ``vidx`` lists are padded to 16.
    """
    if W != 8:
        raise ValueError("only the 8-lane AVX2 search is built")
    vf = ir.VectorType(_f32t, W)
    vi = ir.VectorType(_i32t, W)
    perm_name = "llvm.x86.avx2.permps"

    @intrinsic
    def best(typingctx, xval, waux, o, scale, vidx, off, cnt):
        sig = types.int64(xval, waux, types.int64, types.float32, vidx, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            if not _AVX2_TARGET:  # never called there (see ``quantize``); keeps the IR portable
                return ir.Constant(_i64t, -1)
            xv, wv, o_, sc, va, off_, cnt_ = args
            mod = builder.module
            permps = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vi]), perm_name)
            umin = cgutils.get_or_insert_function(mod, ir.FunctionType(_i32t, [vi]), f"llvm.vector.reduce.umin.v{W}i32")
            smin = cgutils.get_or_insert_function(mod, ir.FunctionType(_i32t, [vi]), f"llvm.vector.reduce.smin.v{W}i32")
            xarr = context.make_array(signature.args[0])(context, builder, xv)
            warr = context.make_array(signature.args[1])(context, builder, wv)
            iarr = context.make_array(signature.args[4])(context, builder, va)
            qv = ir.Constant(vf, [float(2 * l + 1) for l in range(W)])
            sq = builder.fmul(_splat(builder, sc, vf), qv)
            T = []
            for i in range(4):
                at = builder.add(o_, ir.Constant(_i64t, i * NL))
                xi = builder.load(builder.gep(xarr.data, [at]))
                wi = builder.load(builder.gep(warr.data, [at]))
                diff = builder.fsub(sq, _splat(builder, xi, vf))
                T.append(builder.fmul(builder.fmul(_splat(builder, wi, vf), diff), diff))
            cntv = _splat(builder, builder.trunc(cnt_, _i32t), vi)
            lanes = ir.Constant(vi, list(range(W)))
            entry = builder.block
            loop = builder.append_basic_block("iq3_chunk")
            done = builder.append_basic_block("iq3_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            c = builder.phi(_i64t)  # candidates done (multiple of 16)
            bv = builder.phi(vf)
            bi = builder.phi(vi)
            c.add_incoming(ir.Constant(_i64t, 0), entry)
            bv.add_incoming(ir.Constant(vf, [float(_FLT_MAX)] * W), entry)
            bi.add_incoming(ir.Constant(vi, [-1] * W), entry)
            cur_v, cur_i = bv, bi
            for h in range(16 // W):
                first = builder.add(c, ir.Constant(_i64t, W * h))
                base = builder.add(off_, builder.mul(c, ir.Constant(_i64t, 4)))
                terms = []
                for i in range(4):  # layout: [chunk of 8][coordinate][8]
                    at = builder.add(base, ir.Constant(_i64t, 32 * h + 8 * i))
                    idx = builder.load(builder.bitcast(builder.gep(iarr.data, [at]), vi.as_pointer()), align=4)
                    terms.append(builder.call(permps, [T[i], idx]))
                d = builder.fadd(builder.fadd(builder.fadd(terms[0], terms[1]), terms[2]), terms[3])
                lane = builder.add(lanes, _splat(builder, builder.trunc(first, _i32t), vi))
                upd = builder.and_(builder.icmp_signed("<", lane, cntv), builder.fcmp_ordered("<", d, cur_v))
                cur_v = builder.select(upd, d, cur_v)
                cur_i = builder.select(upd, lane, cur_i)
            c1 = builder.add(c, ir.Constant(_i64t, 16))
            c.add_incoming(c1, builder.block)
            bv.add_incoming(cur_v, builder.block)
            bi.add_incoming(cur_i, builder.block)
            builder.cbranch(builder.icmp_signed("<", c1, cnt_), loop, done)
            builder.position_at_end(done)
            # kept values are finite (or the FLT_MAX start); +0.0 turns -0.0 into +0.0 (C
            # finds them equal), then bits ^ (sign ? 0x7FFFFFFF : 0) orders like the floats
            bits = builder.bitcast(builder.fadd(cur_v, ir.Constant(vf, [0.0] * W)), vi)
            key = builder.xor(bits, builder.and_(builder.ashr(bits, ir.Constant(vi, [31] * W)), ir.Constant(vi, [0x7FFFFFFF] * W)))
            mn = builder.call(smin, [key])
            hit = builder.and_(
                builder.icmp_signed("==", key, _splat(builder, mn, vi)),
                builder.icmp_signed(">=", cur_i, ir.Constant(vi, [0] * W)),
            )
            j = builder.call(umin, [builder.select(hit, cur_i, ir.Constant(vi, [-1] * W))])  # -1: unsigned max
            found = builder.icmp_signed(">=", j, ir.Constant(_i32t, 0))
            return builder.select(found, builder.sext(j, _i64t), ir.Constant(_i64t, -1))

        return sig, codegen

    return best


_best8 = _make_best(8)


@njit(inline="always", **_JIT)
def _search_avx2(nbr, cidx, vidx, voff, start, T, xval, waux, o, scale):
    """``_search_scalar`` with the candidate loop in AVX2 vectors (same result)."""
    j = _best8(xval, waux, o, scale, vidx, voff[start], np.int64(nbr[start]))
    if j < 0:
        return -1
    return start + 1 + j


@njit(**_JIT)
def _kiq3(x, n, qw, use_qw, xxs, vec, cidx, glev, kmap, nbr, vidx, voff, out):
    """IQ3_XXS (``xxs``) or IQ3_S bytes of the flat rows ``x`` (length a multiple of 256).

    Returns -1, or the index of a sub-block where ggml's neighbour search finds no candidate
    (and ggml aborts): then ``out`` is incomplete.
    """
    nsb = x.size // QK_K
    SB = NL // 8
    ts = 98 if xxs else 110
    nlo = -15 if xxs else -9
    xc = np.empty(32 * NL, F32)
    xval = np.empty(32 * NL, F32)
    w = np.empty(32 * NL, F32)
    wx = np.empty(32 * NL, F32)
    waux = np.empty(32 * NL, F32)
    L = np.zeros(32 * NL, np.int32)
    La = np.zeros(32 * NL, np.int32)
    gidx = np.zeros(8 * NL, np.int32)
    on = np.zeros(8 * NL, np.bool_)
    on_aux = np.zeros(8 * NL, np.bool_)
    signs = np.zeros(4 * NL, np.int32)
    mx = np.empty(NL, F32)
    idl = np.empty(NL, F32)
    tsc = np.empty(NL, F32)
    scale = np.empty(NL, F32)
    best = np.empty(NL, F32)
    sqx = np.empty(NL, F32)
    sq2 = np.empty(NL, F32)
    live = np.zeros(NL, np.bool_)
    sig = np.empty(SB, F32)
    lsc = np.empty(8, np.int64)
    T = np.empty(32, F32)
    mlist = np.empty(8 * NL, np.int64)
    ucode = np.empty(8 * NL, np.int32)
    for t0 in range(0, nsb, SB):
        nb = min(SB, nsb - t0)
        nv = nb * 8
        base = t0 * QK_K
        for s in range(NL):
            if s < nv:
                o = base + s * 32
                for i in range(32):
                    xc[i * NL + s] = x[o + i]
            else:
                for i in range(32):
                    xc[i * NL + s] = _Z
        # weights
        if use_qw:
            for b in range(SB):
                sig[b] = _Z
            for b in range(nb):
                acc = _Z
                for e in range(QK_K):
                    v = x[base + b * QK_K + e]
                    acc += v * v
                sig[b] = (F32(2.0) * acc) / F32(256.0)
            for s in range(NL):
                col = ((t0 * 8 + s) * 32) % n
                sg = sig[s // 8]
                for i in range(32):
                    v = xc[i * NL + s]
                    w[i * NL + s] = qw[col + i] * np.sqrt(sg + v * v)
        else:
            for i in range(32 * NL):
                v = xc[i]
                w[i] = v * v
        for i in range(32 * NL):
            waux[i] = np.sqrt(w[i])
        # signs and magnitudes
        for i in range(32 * NL):
            v = xc[i]
            xval[i] = v if v >= _Z else -v
        for k in range(4):
            for s in range(NL):
                sb = 0
                for i in range(8):
                    if not (xc[(8 * k + i) * NL + s] >= _Z):
                        sb |= 1 << i
                if xxs:
                    nflip = 0
                    for i in range(8):
                        nflip += (sb >> i) & 1
                    if nflip & 1:
                        p = 8 * k * NL + s
                        vmin = (w[p] * xc[p]) * xc[p]
                        imin = 0
                        for i in range(1, 8):
                            p = (8 * k + i) * NL + s
                            a = (w[p] * xc[p]) * xc[p]
                            if a < vmin:
                                vmin = a
                                imin = i
                        p = (8 * k + imin) * NL + s
                        xval[p] = -xval[p]
                        sb ^= 1 << imin
                    sb &= 127
                signs[k * NL + s] = sb
        for s in range(NL):
            m = xval[s]
            for i in range(1, 32):
                v = xval[i * NL + s]
                m = m if m > v else v
            if xxs:
                live[s] = not (m < _EPS_XXS)
            else:
                live[s] = m != _Z
            mx[s] = m if live[s] else _ONE
            scale[s] = mx[s] / F32(15.0)
            best[s] = _Z
        for i in range(32 * NL):
            wx[i] = w[i] * xval[i]
            L[i] = 0
        for i in range(8 * NL):
            on[i] = xxs
        # scale search
        for step in range(nlo, -nlo + 1):
            for s in range(NL):
                idv = (F32(15.0) + F32(step) * F32(0.2)) / mx[s]
                idl[s] = idv
                tsc[s] = _ONE / idv
            for i in range(32):
                for s in range(NL):
                    l = _nint(_HALF * (idl[s] * xval[i * NL + s] - _ONE))
                    La[i * NL + s] = max(0, min(7, l))
            for k in range(8):
                for s in range(NL):
                    p = 4 * k * NL + s
                    ucode[k * NL + s] = La[p] | (La[p + NL] << 3) | (La[p + 2 * NL] << 6) | (La[p + 3 * NL] << 9)
            nm = 0  # off-grid groups, listed without branches
            for e in range(8 * NL):
                g = kmap[ucode[e]]
                gidx[e] = g
                miss = g < 0
                on_aux[e] = not miss
                mlist[nm] = e
                nm += miss & live[e & (NL - 1)]
            for m in range(nm):
                e = mlist[m]
                s = e & (NL - 1)
                o = 4 * (e >> _NLB) * NL + s
                if vec:
                    g = _search_avx2(nbr, cidx, vidx, voff, -gidx[e] - 1, T, xval, waux, o, tsc[s])
                else:
                    g = _search_scalar(nbr, cidx, vidx, voff, -gidx[e] - 1, T, xval, waux, o, tsc[s])
                if g < 0:
                    return t0 * 8 + s
                g = nbr[g]
                for i in range(4):
                    La[o + i * NL] = glev[4 * g + i]
            for s in range(NL):
                sqx[s] = _Z
                sq2[s] = _Z
            for i in range(32):
                for s in range(NL):
                    q = F32(2 * La[i * NL + s] + 1)
                    sqx[s] += wx[i * NL + s] * q
                    sq2[s] += (w[i * NL + s] * q) * q
            for s in range(NL):
                upd = sq2[s] > _Z and sqx[s] * sqx[s] > best[s] * sq2[s]
                if upd:
                    sc = sqx[s] / sq2[s]
                    scale[s] = sc
                    best[s] = sc * sqx[s]
                    for i in range(32):
                        L[i * NL + s] = La[i * NL + s]
                    for k in range(8):
                        on[k * NL + s] = on_aux[k * NL + s]
        # requantize groups off the grid (IQ3_S: all groups) with the final scale
        for s in range(NL):
            if not live[s]:
                continue
            off = False
            for k in range(8):
                if not on[k * NL + s]:
                    off = True
            if not (off and scale[s] > _Z):
                continue
            idv = _ONE / scale[s]
            for k in range(8):
                if xxs and on[k * NL + s]:
                    continue
                o = 4 * k * NL + s
                u = 0
                for i in range(4):
                    l = _nint(_HALF * (idv * xval[o + i * NL] - _ONE))
                    u |= max(0, min(7, l)) << (3 * i)
                g = kmap[u]
                if g < 0:
                    if vec:
                        g = _search_avx2(nbr, cidx, vidx, voff, -g - 1, T, xval, waux, o, scale[s])
                    else:
                        g = _search_scalar(nbr, cidx, vidx, voff, -g - 1, T, xval, waux, o, scale[s])
                    if g < 0:
                        return t0 * 8 + s
                    g = nbr[g]
                for i in range(4):
                    L[o + i * NL] = glev[4 * g + i]
            a = _Z
            b = _Z
            for i in range(32):
                q = F32(2 * L[i * NL + s] + 1)
                a += wx[i * NL + s] * q
                b += (w[i * NL + s] * q) * q
            if b > _Z:
                scale[s] = a / b
        # final grid indices, sign flip for a negative scale
        for s in range(NL):
            if not live[s]:
                scale[s] = _Z
                continue
            if scale[s] < _Z:
                scale[s] = -scale[s]
                for k in range(4):
                    signs[k * NL + s] = (~signs[k * NL + s]) & (127 if xxs else 255)
            for k in range(8):
                o = 4 * k * NL + s
                u = L[o] | (L[o + NL] << 3) | (L[o + 2 * NL] << 6) | (L[o + 3 * NL] << 9)
                gidx[k * NL + s] = kmap[u]  # on the grid by construction
        # pack
        for b in range(nb):
            o = (t0 + b) * ts
            s0 = b * 8
            max_scale = _Z
            for j in range(8):
                sc = scale[s0 + j]
                max_scale = max_scale if max_scale > sc else sc
            for j in range(ts):
                out[o + j] = 0
            if xxs and max_scale == _Z:
                continue
            if max_scale != _Z:
                d = max_scale / F32(31.0)
                _put16(out, o, _f16(d * (F32(1.0125) if xxs else F32(1.033))))
                idv = _ONE / d
                for j in range(8):
                    l = _nint(_HALF * (idv * scale[s0 + j] - _ONE))
                    lsc[j] = max(0, min(15, l))
            else:
                for j in range(8):
                    lsc[j] = 0
            if xxs:
                for j in range(8):
                    s = s0 + j
                    if not live[s]:
                        continue
                    for k in range(8):
                        out[o + 2 + 8 * j + k] = gidx[k * NL + s] & 255
                for j in range(8):
                    s = s0 + j
                    v = lsc[j] << 28
                    if live[s]:
                        v |= signs[s] | (signs[NL + s] << 7) | (signs[2 * NL + s] << 14) | (signs[3 * NL + s] << 21)
                    p = o + 66 + 4 * j
                    for e in range(4):
                        out[p + e] = (v >> (8 * e)) & 255
            else:
                slot = 0  # ggml's qs/signs pointers skip all-zero sub-blocks
                for j in range(8):
                    s = s0 + j
                    if not live[s]:
                        continue
                    h = 0
                    for k in range(8):
                        g = gidx[k * NL + s]
                        out[o + 2 + 8 * slot + k] = g & 255
                        h |= ((g >> 8) & 1) << k
                    out[o + 66 + j] = h
                    for k in range(4):
                        out[o + 74 + 4 * slot + k] = signs[k * NL + s]
                    slot += 1
                for j in range(4):
                    out[o + 106 + j] = lsc[2 * j] | (lsc[2 * j + 1] << 4)
    return -1


def quantize(name: str, x: np.ndarray, n: int, qw: np.ndarray, use_qw: bool, out: np.ndarray) -> None:
    """Hook for ``quant._numba._run``: IQ3_XXS / IQ3_S of the flat rows ``x`` into ``out``."""
    cidx, glev, kmap, nbr, vidx, voff = tables(name)
    vec = SEARCH == "avx2" and _AVX2_TARGET
    bad = _kiq3(x, n, qw, use_qw, name == "IQ3_XXS", vec, cidx, glev, kmap, nbr, vidx, voff, out)
    if bad >= 0:
        raise too_large(name, float(np.abs(x[bad * 32 : bad * 32 + 32]).max()))
