#!/usr/bin/env python3
"""Check the torch backend on a GPU: bytes identical to the numpy reference, and speed.

For every block type, with and without an imatrix, quantizes the same rows with
``torch:<device>`` and with the numpy backend (the readable reference, itself checked
against ggml by the test suite) and counts differing blocks; then times the torch backend
on a larger tensor.  With ``--oracle`` (needs llama-cpp-python, as in the dev setup) the
torch bytes are also compared with the real ``ggml_quantize_chunk``.

    .venv/bin/python scripts/gpu_check.py                 # CUDA
    .venv/bin/python scripts/gpu_check.py --device cpu    # same checks on the CPU

Exit status: 0 when every comparison is byte-identical, 1 on any mismatch, 2 when the
device is not available.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
F32 = np.float32


def bf16_round(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(F32)


def make_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Weight-like rows (bf16 Student-t, per-row scales, outlier columns, sparse zeros) with
    hard rows mixed in: zeros of both signs, constants, 1e-8 / 6e4 / subnormal magnitudes,
    exact rounding ties, all-negative offset rows, full-mantissa float32 rows."""
    x = rng.standard_t(4.0, size=(rows, n)) * rng.lognormal(np.log(0.02), 0.6, size=(rows, 1))
    cols = rng.choice(n, size=max(1, n // 256), replace=False)
    x[:, cols] *= rng.uniform(10, 80, size=cols.size)
    x[rng.random((rows, n)) < 0.01] = 0.0
    x = bf16_round(x.astype(F32))
    for r in rng.choice(rows, size=max(1, rows // 3), replace=False):
        kind = int(rng.integers(0, 10))
        if kind == 0:
            x[r] = np.where(rng.random(n) < 0.5, F32(-0.0), F32(0.0))
        elif kind == 1:
            x[r] = F32(rng.choice([-0.75, 0.5, -3.0]))
        elif kind == 2:
            x[r] *= F32(1e-8) / max(np.abs(x[r]).max(), F32(1e-30))
        elif kind == 3:
            x[r] *= F32(6e4) / max(np.abs(x[r]).max(), F32(1e-30))
        elif kind == 4:
            x[r] = (rng.standard_normal(n) * 1e-40).astype(F32)
        elif kind == 5:
            x[r] = (rng.integers(-254, 255, n) * 0.5).astype(F32)
            x[r, ::32] = 127.0
        elif kind == 6:
            x[r] = (rng.integers(-64, 65, n) * 0.25 * 2.0 ** rng.integers(-10, 3)).astype(F32)
        elif kind == 7:
            x[r] = -np.abs(x[r]) - F32(1.0)
        elif kind == 8:
            x[r] = (rng.standard_normal(n) * rng.uniform(1e-3, 1)).astype(F32)
        else:
            b = int(rng.integers(0, n // 32)) * 32
            x[r, b : b + 32] = 0.0
    return np.ascontiguousarray(x, dtype=F32)


def make_imatrix(rng: np.random.Generator, n: int) -> np.ndarray:
    qw = rng.gamma(0.6, 2.0, size=n) * np.exp(rng.uniform(-4, 4))
    qw[rng.random(n) < 0.05] = 0.0
    return qw.astype(F32)


def first_difference(a: np.ndarray, b: np.ndarray, ts: int) -> tuple[int, int]:
    d = np.flatnonzero((a.reshape(-1, ts) != b.reshape(-1, ts)).any(axis=1))
    return int(d.size), (int(d[0]) if d.size else -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="torch device: cuda (default), cuda:N or cpu")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated types (default: all)")
    ap.add_argument("--rows", type=int, default=None, help="rows compared per case (default: 512 cuda / 64 cpu)")
    ap.add_argument("--n", type=int, default=2048, help="row length (multiple of 256; default 2048)")
    ap.add_argument("--bench-mvalues", type=float, default=None, help="values timed per case, in millions (default: 64 cuda / 1 cpu)")
    ap.add_argument("--chunk", type=int, default=None, help="torch chunk size in values (default: backend's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the numpy reference")
    ap.add_argument("--oracle", action="store_true", help="also compare with ggml via tests/oracle.py")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        import torch

        import quant
        from quant import _numpy, _torch
    except ImportError as e:
        print(f"cannot import the torch backend: {e}", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here (torch.cuda.is_available() is False); try --device cpu", file=sys.stderr)
        return 2
    if args.n % 256:
        print(f"--n {args.n} is not a multiple of 256", file=sys.stderr)
        return 2
    cuda = dev.type == "cuda"
    rows = args.rows or (512 if cuda else 64)
    bench_values = int((args.bench_mvalues or (64 if cuda else 1)) * 1e6)
    if args.chunk:
        _torch._CHUNK[dev.type] = args.chunk
    ggml = None
    if args.oracle:
        sys.path.insert(0, str(ROOT / "tests"))
        try:
            from oracle import ggml_quantize as ggml
        except ImportError as e:
            print(f"--oracle: llama-cpp-python not importable ({e})", file=sys.stderr)
            return 2

    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    print(f"device: {dev} ({name}); torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else ""))
    print(f"torch chunk: {_torch._CHUNK[dev.type]} values; compare: {rows} x {args.n} per case; bench: {bench_values / 1e6:.0f}M values")
    print(f"{'type':5s} {'imatrix':7s} {'blocks':>8s} {'vs numpy':>10s} {'vs ggml':>9s} {'torch Melem/s':>14s} {'numpy Melem/s':>14s}")

    rng = np.random.default_rng(args.seed)
    x = make_rows(rng, rows, args.n)
    qw = make_imatrix(rng, args.n)
    bench_rows = max(1, bench_values // args.n)
    xb = np.concatenate([x] * (bench_rows // rows + 1))[:bench_rows] if bench_rows > rows else x[:bench_rows]
    xb = np.ascontiguousarray(xb)
    # warm up (CUDA context, allocator) outside the timings
    _torch.quantize_rows("Q8_0", x[:8], None, device=args.device)

    failed = False
    for qtype in args.types.split(","):
        qtype = qtype.strip().upper()
        q = quant.QTYPES[qtype]
        for use_im in (False, True):
            im = qw if use_im else None
            if use_im and not q.uses_imatrix:
                continue
            t0 = time.perf_counter()
            ref = _numpy.quantize_rows(qtype, x, im, threads=args.threads)
            t_np = time.perf_counter() - t0
            got = _torch.quantize_rows(qtype, x, im, device=args.device)
            nbad, first = first_difference(got, ref, q.type_size)
            vs_ggml = "-"
            if ggml is not None:
                gbad, gfirst = first_difference(got, ggml(x, qtype, im), q.type_size)
                vs_ggml = "identical" if gbad == 0 else f"{gbad} differ"
                failed |= gbad > 0
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            _torch.quantize_rows(qtype, xb, im, device=args.device)  # returns host bytes: synchronized
            t_bench = time.perf_counter() - t0
            status = "identical" if nbad == 0 else f"{nbad} differ"
            print(
                f"{qtype:5s} {'yes' if use_im else 'no':7s} {ref.size // q.type_size:8d} {status:>10s} {vs_ggml:>9s} "
                f"{xb.size / t_bench / 1e6:14.1f} {x.size / t_np / 1e6:14.2f}",
                flush=True,
            )
            if nbad:
                failed = True
                per_row = args.n // q.block_size
                r, b = divmod(first, per_row)
                print(f"    first differing block: row {r}, block {b}")
                print(f"    torch: {got.reshape(-1, q.type_size)[first].tolist()}")
                print(f"    numpy: {ref.reshape(-1, q.type_size)[first].tolist()}")
                print(f"    input: {x[r, b * q.block_size:(b + 1) * q.block_size][:32].tolist()}")
    print("RESULT:", "MISMATCH" if failed else "all byte-identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
