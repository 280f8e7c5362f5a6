#!/usr/bin/env python3
"""Benchmark: our quantizers against llama.cpp's ``ggml_quantize_chunk``, same process.

Not a test.  For each type (and with/without an imatrix) the same matrix of realistic
bf16-rounded weights is quantized by

* llama.cpp: ``ggml_quantize_chunk`` from the libggml of llama-cpp-python, called through
  ctypes (which releases the GIL) on row chunks spread over ``--threads`` Python threads;
* ours: ``quant`` backends (numba by default; ``--numpy``/``--torch`` add those) with the
  same number of threads,

and a table is printed: Melem/s of each, the ratio, and whether the bytes were identical in
that run.  Times are the best of ``--repeat`` runs (wall clock).

    .venv/bin/python scripts/bench_quant.py --threads 1
    .venv/bin/python scripts/bench_quant.py --threads 2 --types Q4_K,Q6_K --shapes 4096x4096
    .venv/bin/python scripts/bench_quant.py --threads 1 --cpu-time --types IQ1_S,IQ1_M
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402

ALL_TYPES = [
    "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "MXFP4", "TQ1_0", "TQ2_0",
    "IQ3_XXS", "IQ3_S",
    "IQ2_XXS", "IQ2_XS", "IQ2_S",
    "IQ1_S", "IQ1_M",
]


def load_ggml():
    """``ggml_quantize_chunk`` from llama-cpp-python's libggml (the tests' oracle), via ctypes."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from oracle import ggml_quantize_chunk
    except ImportError as e:
        sys.exit(f"bench_quant: llama-cpp-python is needed for the llama.cpp side ({e}); run scripts/setup.sh --dev")
    return ggml_quantize_chunk


def ggml_chunked(f, qtype: str, x: np.ndarray, qw: np.ndarray | None, pool: ThreadPoolExecutor | None, nthreads: int):
    """Quantize ``x`` with ggml, rows split into ``nthreads`` contiguous chunks."""
    q = quant.qtype_of(qtype)
    nrows, n = x.shape
    rb = quant.row_bytes(q, n)
    out = np.empty((nrows, rb), np.uint8)
    src, dst = x.ctypes.data, out.ctypes.data
    qwp = None if qw is None else qw.ctypes.data
    bounds = np.linspace(0, nrows, nthreads + 1).astype(int)

    def run(i: int) -> None:
        r0, r1 = int(bounds[i]), int(bounds[i + 1])
        if r1 > r0:
            f(int(q.ggml), src, dst, r0 * n, r1 - r0, n, qwp)

    if pool is None:
        run(0)
    else:
        list(pool.map(run, range(nthreads)))
    return out


def bf16_round(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def make_weights(rows: int, n: int, seed: int) -> np.ndarray:
    """Trained-weight-like matrix: Student-t values, per-row scales, a few outlier columns, bf16."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(5, size=(rows, n)).astype(np.float32)
    x *= (0.02 * np.exp(rng.normal(0, 0.3, size=(rows, 1)))).astype(np.float32)
    cols = rng.choice(n, size=max(1, n // 512), replace=False)
    x[:, cols] *= np.float32(8.0)
    return bf16_round(x)


def make_imatrix(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    qw = (rng.lognormal(0.0, 1.0, size=n) ** 2).astype(np.float32)
    qw[rng.random(n) < 0.01] = 0.0
    return qw


def best_time(fn, repeat: int, clock=time.perf_counter):
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        res = fn()
        best = min(best, clock() - t0)
    return best, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads on both sides (default: all cores)")
    ap.add_argument("--types", default=",".join(ALL_TYPES), help="comma-separated types (default: all)")
    ap.add_argument("--shapes", default="4096x4096,512x14336", help="comma-separated ROWSxCOLS (default: %(default)s)")
    ap.add_argument("--imatrix", choices=["both", "no", "only"], default="both", help="imatrix variants (default: both)")
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs (default: %(default)s)")
    ap.add_argument("--numpy", action="store_true", help="also time the numpy reference backend")
    ap.add_argument("--torch", action="store_true", help="also time the torch backend (if importable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="with --threads 1: time the CPU time of the calling thread instead of wall clock "
        "(steadier on a machine shared with other work)",
    )
    args = ap.parse_args(argv)

    f = load_ggml()
    nthreads = max(1, args.threads)
    types = [quant.qtype_of(t).name for t in args.types.split(",") if t.strip()]
    shapes = []
    for s in args.shapes.split(","):
        r, _, c = s.strip().lower().partition("x")
        shapes.append((int(r), int(c)))

    avail = quant.available_backends()
    backends = ["numba"]
    if args.numpy:
        backends.append("numpy")
    if args.torch:
        tb = [b for b in avail if b.startswith("torch")]
        if tb:
            backends.append(tb[0])
        else:
            print("bench_quant: torch backend not importable, skipped", file=sys.stderr)
    backends = [b for b in backends if b.split(":")[0] in {a.split(":")[0] for a in avail}]
    if not backends:
        sys.exit(f"bench_quant: none of the requested backends is available (have: {', '.join(avail)})")

    if args.cpu_time and nthreads != 1:
        ap.error("--cpu-time needs --threads 1 (both sides then run in the calling thread)")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    pool = ThreadPoolExecutor(max_workers=nthreads) if nthreads > 1 else None
    print(
        f"threads={nthreads}  repeat={args.repeat}  cpu_count={os.cpu_count()}  backends={','.join(backends)}"
        f"  clock={'thread CPU time' if args.cpu_time else 'wall'}"
    )

    # JIT warm-up (numba compiles or loads its cache on first use of each kernel)
    t0 = time.perf_counter()
    xw = make_weights(4, 512, 1)
    for b in backends:
        for t in types:
            if not quant.QTYPES[t].requires_imatrix:
                quant.quantize(xw, t, backend=b, threads=1)
            quant.quantize(xw, t, imatrix=make_imatrix(512, 1), backend=b, threads=1)
    print(f"warm-up (JIT compile or cache load): {time.perf_counter() - t0:.1f} s")

    hdr = f"{'type':<6} {'imat':<4} {'shape':>11} {'backend':<9} {'llama.cpp':>10} {'ours':>9} {'ratio':>6}  bytes"
    print(hdr)
    print(f"{'':<6} {'':<4} {'':>11} {'':<9} {'Melem/s':>10} {'Melem/s':>9} {'':>6}")
    print("-" * len(hdr))
    all_same = True
    for rows, n in shapes:
        x = make_weights(rows, n, args.seed)
        qw_full = make_imatrix(n, args.seed)
        for t in types:
            variants = [False, True] if args.imatrix == "both" else [args.imatrix == "only"]
            if not quant.QTYPES[t].uses_imatrix:  # Q8_0, MXFP4: ggml ignores the imatrix
                variants = [False] if args.imatrix != "only" else []
            if quant.QTYPES[t].requires_imatrix:  # IQ2_XXS, IQ2_XS, IQ1_S: ggml refuses them without one
                variants = [True] if args.imatrix != "no" else []
            for use in variants:
                qw = qw_full if use else None
                tc, ref = best_time(lambda: ggml_chunked(f, t, x, qw, pool, nthreads), args.repeat, clock)
                for b in backends:
                    tb, got = best_time(
                        lambda: quant.quantize(x, t, imatrix=qw, backend=b, threads=nthreads), args.repeat, clock
                    )
                    same = bool(np.array_equal(ref, got))
                    all_same &= same
                    print(
                        f"{t:<6} {'yes' if use else 'no':<4} {f'{rows}x{n}':>11} {b:<9} "
                        f"{x.size / tc / 1e6:>10.1f} {x.size / tb / 1e6:>9.1f} {tc / tb:>6.2f}  "
                        f"{'identical' if same else 'DIFFERENT'}",
                        flush=True,
                    )
    if pool is not None:
        pool.shutdown()
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
