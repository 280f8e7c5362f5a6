#!/usr/bin/env python3
"""Benchmark: gguf-moe convert vs llama.cpp's convert_hf_to_gguf.py (time and peak memory).

Generates synthetic bf16 4-expert merges (legacy mergekit layout, which llama.cpp's
converter reads) of about 0.5B and 1B parameters in a temporary directory, then runs each
conversion as a subprocess and measures its wall time and peak RSS (``os.wait4``; this
process stays small, since Linux reports a child's peak RSS as at least the parent's):

* llama.cpp ``convert_hf_to_gguf.py --outtype bf16`` and ``--outtype q8_0``;
* llama.cpp ``llama_model_quantize`` (llama-quantize) of that BF16 file to Q4_K_M and Q5_K_M,
  the two-pass route users take today;
* ``gguf-moe convert -t BF16``, ``-t Q8_0``, ``-t Q4_K_M -t Q5_K_M`` and
  ``-t BF16 -t Q8_0 -t Q4_K_M``, each in one pass.

It also checks that gguf-moe's BF16, Q8_0, Q4_K_M and Q5_K_M tensors are byte-identical to llama.cpp's
(tensor by tensor; the two tools write tensors in different orders).  Generated models and
outputs are deleted at the end (``--keep`` keeps them).

``--reuse`` times the duplicated-expert reuse instead: ``gguf-moe convert -t Q4_K_M -t Q5_K_M``
of the same merge (4 experts, the last a copy of expert 0, as a merge that reuses a source
model) with every expert encoded (``gguf_moe.convert.REUSE_DUPLICATES = False``, before) and
with the copy's encoding read back instead (after), alternating, best of ``--repeat`` runs;
the files of the two must be byte-identical.

``--presets`` replaces the two-pass set (e.g. ``IQ4_XS,IQ3_M,Q4_K_M``: llama.cpp converts to
BF16 and runs llama-quantize three times; gguf-moe writes the three files in one pass);
``--multi-only`` runs just that comparison.

    .venv/bin/python scripts/bench_convert.py                # both sizes (needs ~15 GB disk)
    .venv/bin/python scripts/bench_convert.py --sizes 0.5B   # smaller run
    .venv/bin/python scripts/bench_convert.py --sizes 1B --presets IQ4_XS,IQ3_M,Q4_K_M --multi-only
    .venv/bin/python scripts/bench_convert.py --reuse --sizes 4L  # duplicate reuse, before/after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LLAMA_CONVERT = ROOT / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"

# hidden 1024, FFN 2816 (11 x 256, so K-quants apply), 8 heads of 128 with 2 KV heads,
# 4 experts: 37.2M parameters per layer.
DIMS = dict(layout="legacy", hidden=1024, ff=2816, n_head=8, n_kv_head=2, n_expert=4, top_k=2,
            duplicate_expert=True, dtype="bfloat16", shards=4)
SIZES = {"tiny": 1, "2L": 2, "4L": 4, "8L": 8, "0.5B": 13, "1B": 26}  # tiny: a quick check of this script


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes).  Raises on failure."""
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return wall, ru.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


LLAMA_QUANTIZE = (
    "import sys, ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
    "p.ftype = int(sys.argv[3]); p.nthread = 0; "
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"
)
# what users run today: convert to BF16, then llama-quantize once per preset
TWO_PASS = ("Q4_K_M", "Q5_K_M")


def generate(dst: Path, n_layer: int, log: Path) -> tuple[float, int]:
    code = (
        "import sys, json; from gguf_moe.synth import make_model; "
        "make_model(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    return run([PY, "-c", code, str(dst), json.dumps(dict(DIMS, n_layer=n_layer))], log)


def n_params(src: Path) -> int:
    import math
    import struct

    total = 0
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            hdr = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in hdr.items() if k != "__metadata__")
    return total


def same_tensors(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """Compare tensors by name: (tensors compared, bytes compared, names that differ)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from gguf_moe.validate import read_header

    ha, hb = read_header(a), read_header(b)
    ta = {t.name: t for t in ha.tensors}
    ma = np.memmap(a, dtype=np.uint8, mode="r")
    mb = np.memmap(b, dtype=np.uint8, mode="r")
    bad, nbytes = [], 0
    for t in hb.tensors:
        u = ta.get(t.name)
        if u is None or u.type_id != t.type_id or u.ne != t.ne:
            bad.append(t.name)
            continue
        xa = ma[ha.data_offset + u.offset : ha.data_offset + u.offset + u.n_bytes]
        xb = mb[hb.data_offset + t.offset : hb.data_offset + t.offset + t.n_bytes]
        if not np.array_equal(xa, xb):
            bad.append(t.name)
        nbytes += t.n_bytes
    if set(ta) != {t.name for t in hb.tensors}:
        bad.append("<tensor sets differ>")
    return len(hb.tensors), nbytes, bad


# gguf-moe's CLI with the duplicated-expert reuse switched off (the "before" of --reuse)
NO_REUSE = "import sys, gguf_moe.convert as c; c.REUSE_DUPLICATES = False; from gguf_moe.cli import main; main()"


def bench_reuse(sizes: list[str], work: Path, repeat: int) -> None:
    """Duplicated-expert reuse: wall time, CPU time (steadier on a shared machine) and peak
    RSS of the same conversion before and after; the files compared byte for byte."""
    import hashlib

    presets = ("Q4_K_M", "Q5_K_M")

    def timed(cmd: list[str], log: Path) -> tuple[float, int, float]:
        """(wall s, peak RSS bytes, CPU s of the child: user + system)."""
        with open(log, "wb") as f:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"command failed: {' '.join(cmd)}\n{log.read_text(errors='replace')[-2000:]}")
        return wall, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime

    table = []
    for size in sizes:
        src = work / f"moe4-{size}"
        wall, _ = generate(src, SIZES[size], work / f"gen-{size}.log")
        params = n_params(src)
        print(f"[{size}] generated {params / 1e9:.3f}B params in {wall:.0f}s", flush=True)
        best: dict[str, tuple[float, int, float]] = {}
        digests: dict[str, dict[str, str]] = {}
        for k in range(repeat):
            for label, head in (("before", [PY, "-c", NO_REUSE]), ("after", [PY, "-m", "gguf_moe"])):
                d = work / f"{size}-{label}"
                cmd = head + ["convert", str(src), "--outdir", str(d), "--force", "--no-card"]
                for t in presets:
                    cmd += ["-t", t]
                wall, rss, cpu = timed(cmd, work / f"{size}-{label}.log")
                print(f"[{size}] {label:6s} run {k + 1}: {wall:6.1f} s wall  {cpu:6.1f} s CPU  "
                      f"peak RSS {rss / 2**20:6.0f} MiB", flush=True)
                w0, r0, c0 = best.get(label, (wall, rss, cpu))
                best[label] = (min(wall, w0), max(rss, r0), min(cpu, c0))
                digests[label] = {t: hashlib.sha256(next(d.glob(f"*-{t}.gguf")).read_bytes()).hexdigest() for t in presets}
        for ln in (work / f"{size}-after.log").read_text().splitlines():
            if ln.startswith("wrote"):
                print(f"[{size}] {ln}", flush=True)
        same = digests["before"] == digests["after"]
        table.append((size, params, best["before"], best["after"], same))
    print()
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
          f"quant backend {os.environ.get('GGUF_MOE_QUANT_BACKEND', 'default')}; best of {repeat}")
    print("| model | outputs | wall before / after (s) | speed-up | CPU before / after (s) | CPU ratio "
          "| peak RSS before / after (MiB) | files |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for size, params, (wb, rb, cb), (wa, ra, ca), same in table:
        print(f"| {size} ({params / 1e9:.3f}B, 4 experts, expert 3 = expert 0) | {' + '.join(presets)} "
              f"| {wb:.1f} / {wa:.1f} | {wb / wa:.2f}x | {cb:.1f} / {ca:.1f} | {cb / ca:.2f}x "
              f"| {rb / 2**20:.0f} / {ra / 2**20:.0f} | {'byte-identical' if same else 'DIFFER'} |")
    if not all(r[4] for r in table):
        raise SystemExit("the files with and without the reuse differ")


def main() -> None:
    global TWO_PASS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help=f"comma-separated, from {', '.join(SIZES)} (default 0.5B,1B; 4L with --reuse)")
    ap.add_argument("--tmpdir", default=None, help="where to put models and outputs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    ap.add_argument("--skip-llama", action="store_true", help="only run gguf-moe")
    ap.add_argument("--presets", default=",".join(TWO_PASS),
                    help="presets of the two-pass comparison (default: %(default)s)")
    ap.add_argument("--multi-only", action="store_true",
                    help="only llama.cpp BF16 + llama-quantize per preset against one gguf-moe pass")
    ap.add_argument("--reuse", action="store_true",
                    help="only time Q4_K_M + Q5_K_M with and without the duplicated-expert reuse")
    ap.add_argument("--repeat", type=int, default=2, help="--reuse: runs of each, the best counts (default 2)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    TWO_PASS = tuple(p.strip().upper() for p in args.presets.split(",") if p.strip())
    if args.compare:
        print(json.dumps(same_tensors(Path(args.compare[0]), Path(args.compare[1]))))
        return
    sizes = [s.strip() for s in (args.sizes or ("4L" if args.reuse else "0.5B,1B")).split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    if args.reuse:
        work = Path(tempfile.mkdtemp(prefix="gguf-moe-bench-", dir=args.tmpdir))
        try:
            bench_reuse(sizes, work, max(1, args.repeat))
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        return
    if not args.skip_llama and not LLAMA_CONVERT.is_file():
        ap.error(f"{LLAMA_CONVERT.relative_to(ROOT)} is missing; run scripts/setup.sh --dev first")

    work = Path(tempfile.mkdtemp(prefix="gguf-moe-bench-", dir=args.tmpdir))
    rows = []  # (size, params, src_bytes, tool, outputs, wall, rss)
    checks = []
    try:
        for size in sizes:
            src = work / f"moe4-{size}"
            wall, rss = generate(src, SIZES[size], work / f"gen-{size}.log")
            params = n_params(src)
            src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            print(f"[{size}] generated {params / 1e9:.2f}B params ({src_bytes / 2**30:.2f} GiB bf16) in {wall:.0f}s",
                  flush=True)
            out = work / f"out-{size}"
            out.mkdir()
            jobs = []
            if not args.skip_llama:
                for t in ("bf16",) if args.multi_only else ("bf16", "q8_0"):
                    jobs.append(("llama.cpp convert_hf_to_gguf.py", t.upper(),
                                 [PY, str(LLAMA_CONVERT), str(src), "--outtype", t, "--outfile", str(out / f"llama-{t}.gguf")]))
                from gguf_moe.presets import PRESETS

                for t in TWO_PASS:
                    jobs.append(("llama.cpp llama-quantize (BF16 in)", t,
                                 [PY, "-c", LLAMA_QUANTIZE, str(out / "llama-bf16.gguf"), str(out / f"llama-{t}.gguf"),
                                  str(PRESETS[t].file_type)]))
            for ts in [list(TWO_PASS)] if args.multi_only else (["BF16"], ["Q8_0"], list(TWO_PASS), ["BF16", "Q8_0", "Q4_K_M"]):
                d = out / ("gm-" + "-".join(ts))
                cmd = [PY, "-m", "gguf_moe", "convert", str(src), "--outdir", str(d)]
                for t in ts:
                    cmd += ["-t", t]
                jobs.append(("gguf-moe convert", " + ".join(ts), cmd))
            for tool, outputs, cmd in jobs:
                wall, rss = run(cmd, out / f"{tool.split()[0]}-{outputs.replace(' + ', '-')}.log")
                rows.append((size, params, src_bytes, tool, outputs, wall, rss))
                print(f"[{size}] {tool:32s} {outputs:22s} {wall:8.1f} s  peak RSS {rss / 2**20:8.0f} MiB", flush=True)
            if not args.skip_llama:
                pairs = [] if args.multi_only else [("bf16", "gm-BF16", "*.gguf"), ("q8_0", "gm-Q8_0", "*.gguf")]
                pairs += [(t, "gm-" + "-".join(TWO_PASS), f"*-{t}.gguf") for t in TWO_PASS]
                for t, sub, pattern in pairs:
                    mine = next((out / sub).glob(pattern))
                    # in a child process: touching GBs of data here would raise this process's
                    # RSS, and Linux reports a child's peak RSS as at least its parent's at fork
                    res = subprocess.run([PY, __file__, "--compare", str(mine), str(out / f"llama-{t}.gguf")],
                                         check=True, capture_output=True, text=True, cwd=ROOT)
                    n, nb, bad = json.loads(res.stdout)
                    checks.append((size, t.upper(), n, nb, bad))
            if not args.keep:
                shutil.rmtree(out)
                shutil.rmtree(src)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    # ------------------------------------------------------------------ table
    ref = {(r[0], r[4]): r for r in rows if r[3].startswith("llama.cpp")}
    print()
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
          f"quant backend {os.environ.get('GGUF_MOE_QUANT_BACKEND', 'default')}")
    hdr = "| model | tool | outputs | wall (s) | peak RSS (MiB) | time vs llama.cpp |"
    print(hdr)
    print("|---|---|---|---:|---:|---:|")
    for size, params, src_bytes, tool, outputs, wall, rss in rows:
        base = ref.get((size, outputs))
        if tool.startswith("gguf-moe") and base is not None:
            ratio = f"{base[5] / wall:.2f}x faster" if wall < base[5] else f"{wall / base[5]:.2f}x slower"
        elif tool.startswith("gguf-moe") and outputs == " + ".join(TWO_PASS) and all((size, o) in ref for o in ("BF16",) + TWO_PASS):
            tot = sum(ref[(size, o)][5] for o in ("BF16",) + TWO_PASS)
            ratio = f"{tot / wall:.2f}x faster than llama.cpp convert BF16 + {len(TWO_PASS)} llama-quantize runs ({tot:.1f} s)"
        elif tool.startswith("gguf-moe") and outputs.count("+") and all((size, o) in ref for o in ("BF16", "Q8_0")):
            tot = ref[(size, "BF16")][5] + ref[(size, "Q8_0")][5]
            ratio = f"{tot / wall:.2f}x vs llama.cpp BF16+Q8_0 runs (no Q4_K_M there)"
        else:
            ratio = ""
        model = f"{size} ({params / 1e9:.2f}B, {src_bytes / 2**30:.2f} GiB)"
        print(f"| {model} | {tool} | {outputs} | {wall:.1f} | {rss / 2**20:.0f} | {ratio} |")
    if checks:
        print()
        for size, t, n, nb, bad in checks:
            verdict = "identical" if not bad else f"{len(bad)} DIFFER (e.g. {bad[0]})"
            print(f"{size} {t}: gguf-moe vs llama.cpp, {n} tensors / {nb:,} bytes compared: {verdict}")
    gm: dict[str, list] = {}
    for r in rows:
        if r[3].startswith("gguf-moe"):
            gm.setdefault(r[4], []).append((r[0], r[6]))
    if len(sizes) > 1:
        print()
        for outputs, lst in gm.items():
            print(f"gguf-moe {outputs}: peak RSS " + " -> ".join(f"{s} {m / 2**20:.0f} MiB" for s, m in lst))
        for t in ("BF16", "Q8_0"):
            lst = [(r[0], r[6]) for r in rows if r[3].startswith("llama.cpp") and r[4] == t]
            if lst:
                print(f"llama.cpp {t}: peak RSS " + " -> ".join(f"{s} {m / 2**20:.0f} MiB" for s, m in lst))


if __name__ == "__main__":
    main()
