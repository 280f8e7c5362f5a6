#!/usr/bin/env python3
"""Benchmark: gguf-moe imatrix / eval vs llama.cpp's routes (wall time and peak RSS).

Generates the synthetic bf16 4-expert bench merge of scripts/bench_convert.py (legacy
layout; ``--size`` 0.5B or 1B, ``tiny`` for a quick check of this script) and a text, then
runs each step as a subprocess and measures its wall time and peak RSS (``os.wait4``):

* importance matrix, llama.cpp's route: ``convert_hf_to_gguf.py --outtype f32`` (llama-imatrix
  needs a float GGUF), then ``llama-imatrix -c CTX --chunks N -fa off -ctk f32 -ctv f32``;
  gguf-moe: ``gguf-moe imatrix`` straight from the safetensors;
* quality of three quants (``--types``, written beforehand by ``gguf-moe convert``, not
  timed), llama.cpp's route: ``llama-perplexity --kl-divergence-base`` on the F32 GGUF, then
  ``llama-perplexity --kl-divergence`` once per file; gguf-moe: one ``gguf-moe eval``.

Both sides get the same text, ``--ctx``, ``--chunks`` and ``--threads``.  The imatrix
counts of both are compared (they must be equal) and the eval figures printed side by
side.  The memory goal printed beside gguf-moe's RSS is one layer's float32 weights plus the
activations plus 500 MB.  Generated files are deleted at the end (``--keep`` keeps them).

    .venv/bin/python scripts/bench_imatrix.py --size 1B --ctx 512 --chunks 8
    .venv/bin/python scripts/bench_imatrix.py --size tiny --ctx 128 --chunks 4   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
GGUF_MOE = [PY, "-m", "gguf_moe"]
LLAMA_CONVERT = ROOT / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"
LLAMA_BIN = Path(os.environ.get("GGUF_MOE_LLAMA_BIN", ROOT / ".cache" / "llama-bin"))

DIMS = dict(layout="legacy", hidden=1024, ff=2816, n_head=8, n_kv_head=2, n_expert=4, top_k=2,
            duplicate_expert=True, dtype="bfloat16", shards=4)  # fmt: skip
SIZES = {"tiny": 1, "0.5B": 13, "1B": 26}


def run(cmd: list, log: Path) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes).  Raises on failure."""
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(map(str, cmd))}\n{log.read_text(errors='replace')[-2000:]}")
    return wall, ru.ru_maxrss * 1024


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def layer_f32_bytes(n_layer: int, hidden: int, ff: int, n_expert: int, n_kv_head: int, n_head: int) -> int:
    hd = hidden // n_head
    attn = hidden * hidden * 2 + 2 * hidden * n_kv_head * hd
    return 4 * (attn + n_expert * 3 * hidden * ff + n_expert * hidden + 2 * hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1B", choices=list(SIZES))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K", help="three (or more) quant types for the eval comparison")
    ap.add_argument("-f", "--text", type=Path, help="text file (default: generated, about 300 KB)")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    for tool in ("llama-imatrix", "llama-perplexity"):
        if not (LLAMA_BIN / tool).is_file():
            raise SystemExit(f"{LLAMA_BIN / tool} missing: run scripts/setup.sh --dev")
    work = Path(tempfile.mkdtemp(prefix="bench-imatrix-", dir=args.tmpdir))

    class Rows(list):  # each row is printed as soon as it is measured
        def __iadd__(self, items):
            for name, w, r, note in items:
                print(f"{name:<58} {w:>8.1f}s {mib(r):>11}  {note}", flush=True)
            return super().__iadd__(items)

    rows: list[tuple[str, float, int, str]] = Rows()
    print(f"{'step':<58} {'wall':>9} {'peak RSS':>11}", flush=True)
    try:
        n_layer = SIZES[args.size]
        src = work / f"moe-{args.size}"
        code = "import sys, json; from gguf_moe.synth import make_model; make_model(sys.argv[1], **json.loads(sys.argv[2]))"
        run([PY, "-c", code, src, json.dumps(dict(DIMS, n_layer=n_layer))], work / "gen.log")
        text = args.text
        if text is None:
            text = work / "text.txt"
            code = ("import sys; from gguf_moe.synth import _training_text; t = _training_text(); "
                    "open(sys.argv[1], 'w', encoding='utf-8').write(' = Heading = \\n' + t + t)")  # fmt: skip
            run([PY, "-c", code, text], work / "text.log")
        th = str(args.threads)
        common = ["-c", args.ctx, "--chunks", args.chunks, "-fa", "off", "-ctk", "f32", "-ctv", "f32", "-t", th]

        # ---- importance matrix
        f32 = work / "f32.gguf"
        w1, r1 = run([PY, LLAMA_CONVERT, src, "--outtype", "f32", "--outfile", f32], work / "conv.log")
        ref = work / "ref-imatrix.gguf"
        w2, r2 = run([LLAMA_BIN / "llama-imatrix", "-m", f32, "-f", text, "-o", ref, "--no-ppl", *common], work / "llama-imatrix.log")
        ours = work / "imatrix.gguf"
        w3, r3 = run([*GGUF_MOE, "imatrix", src, "-f", text, "-o", ours, "--ctx", args.ctx, "--chunks", args.chunks,
                      "--threads", th, "--device", "cpu", "--json"], work / "imatrix.log")  # fmt: skip
        act = args.chunks * args.ctx * DIMS["hidden"] * 4
        goal = layer_f32_bytes(n_layer, DIMS["hidden"], DIMS["ff"], DIMS["n_expert"], DIMS["n_kv_head"], DIMS["n_head"]) + act + 500 * (1 << 20)
        rows += [
            ("llama.cpp: convert_hf_to_gguf --outtype f32", w1, r1, ""),
            ("llama.cpp: llama-imatrix", w2, r2, ""),
            ("llama.cpp imatrix route, total", w1 + w2, max(r1, r2), ""),
            ("gguf-moe imatrix", w3, r3, f"goal < {mib(goal)}"),
        ]
        counts_equal = compare_counts(ref, ours)
        print(f"imatrix vs llama-imatrix: {counts_equal}", flush=True)

        # ---- eval
        if not args.skip_eval:
            types = [t.strip() for t in args.types.split(",") if t.strip()]
            run([*GGUF_MOE, "convert", src, *[a for t in types for a in ("-t", t)], "--outdir", work / "q", "-q"], work / "convert.log")
            files = [work / "q" / f"{src.name}-{t}.gguf" for t in types]
            base = work / "base.kld"
            w4, r4 = run([LLAMA_BIN / "llama-perplexity", "-m", f32, "-f", text, *common, "-nr", "--kl-divergence-base", base],
                         work / "ppl-base.log")  # fmt: skip
            lw, lr, ref_fig = w4, r4, {}
            for f in files:
                log = work / f"ppl-{f.stem}.log"
                for _ in range(3):  # llama.cpp's asynchronous logger sometimes loses the last lines at exit
                    w, r = run([LLAMA_BIN / "llama-perplexity", "-m", f, *common, "-nr", "--kl-divergence-base", base,
                                "--kl-divergence"], log)  # fmt: skip
                    out = log.read_text(errors="replace")
                    if "Same top p:" in out:
                        break
                lw, lr = lw + w, max(lr, r)
                kld = re.search(r"Mean    KLD:\s*([-\d.]+)", out)
                ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out)
                ref_fig[f.name] = (float(ppl.group(1)) if ppl else float("nan"), float(kld.group(1)) if kld else float("nan"))
            log = work / "eval.log"
            w5, r5 = run([*GGUF_MOE, "eval", src, *files, "-f", text, "--ctx", args.ctx, "--chunks", args.chunks,
                          "--threads", th, "--device", "cpu", "--json"], log)  # fmt: skip
            res = json.loads(log.read_text().strip().splitlines()[-1])
            goal_e = goal + len(files) * act
            rows += [
                (f"llama.cpp: llama-perplexity base + {len(files)} x --kl-divergence", lw, lr, ""),
                (f"gguf-moe eval ({len(files)} files)", w5, r5, f"goal < {mib(goal_e)}"),
            ]

        print(f"\nmodel: {args.size} bench merge ({n_layer} layers, 4 experts), text {text}, ctx {args.ctx}, "
              f"{args.chunks} chunks, {th} threads")  # fmt: skip
        if not args.skip_eval:
            print(f"\n{'file':<28} {'ppl llama.cpp':>14} {'ppl gguf-moe':>13} {'KLD llama.cpp':>14} {'KLD gguf-moe':>13}")
            for f in res["files"]:
                rp, rk = ref_fig[Path(f["file"]).name]
                print(f"{Path(f['file']).name:<28} {rp:>14.4f} {f['ppl']:>13.4f} {rk:>14.6f} {f['kld_mean']:>13.6f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def compare_counts(a: Path, b: Path) -> str:
    """How gguf-moe's imatrix ``b`` agrees with llama-imatrix's ``a``: dense counts, expert
    counts (a router tie within float noise may go either way) and the sums."""
    import numpy as np
    from gguf import GGUFReader

    def load(p):
        return {t.name: np.array(t.data, dtype=np.float64).reshape(-1) for t in GGUFReader(p).tensors}

    ta, tb = load(a), load(b)
    if ta.keys() != tb.keys():
        return f"different entries ({len(ta)} vs {len(tb)} tensors)"
    dense_ok, moved, worst = True, 0, 0.0
    for k in ta:
        if k.endswith(".counts"):
            if ta[k].size == 1:
                dense_ok &= bool(ta[k][0] == tb[k][0])
            else:
                moved += int(np.abs(ta[k] - tb[k]).sum())
        else:
            worst = max(worst, float((np.abs(ta[k] - tb[k]) / np.maximum(np.abs(ta[k]), 1e-30)).max()))
    return (f"dense counts {'equal' if dense_ok else 'DIFFER'}; expert counts differ by {moved} token-routings in all; "
            f"sums max rel diff {worst:.1e}")


if __name__ == "__main__":
    main()
