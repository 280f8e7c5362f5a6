#!/usr/bin/env python3
"""Benchmark: ``gguf-moe farm`` against the same release made with the single commands.

Generates the synthetic bf16 4-expert bench merge of scripts/bench_convert.py (``--size``
0.5B or 1B, ``tiny`` for a quick run) and a text, then makes one release (4 presets, their
imatrix, eval of the 4 files) twice:

* by hand: ``gguf-moe imatrix``, one ``gguf-moe convert -t TYPE --imatrix`` per preset and
  ``gguf-moe eval --json``, one subprocess after the other;
* ``gguf-moe farm run`` with the local executor and one worker (the same work split into
  chunk-group tasks, plus the card and manifest).

It checks that every file has the same sha256 both ways, prints the farm's overhead
(goal: under 5%) and, from the task times the farm journalled and the task graph, a model
of the wall time with N workers (list scheduling in plan order, each worker as fast as this
machine with all its cores; the critical path is the bound no worker count beats).

    .venv/bin/python scripts/bench_farm.py --size 1B --ctx 512 --chunks 32 --eval-chunks 16
    .venv/bin/python scripts/bench_farm.py --size tiny --ctx 128 --chunks 48 --eval-chunks 32   # ~2 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
GGUF_MOE = [PY, "-m", "gguf_moe"]
DIMS = dict(layout="legacy", hidden=1024, ff=2816, n_head=8, n_kv_head=2, n_expert=4, top_k=2,
            duplicate_expert=True, dtype="bfloat16", shards=4)  # fmt: skip
SIZES = {"tiny": 1, "0.5B": 13, "1B": 26}


def run(cmd: list, log: Path) -> float:
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(map(str, cmd))}\n{log.read_text(errors='replace')[-2000:]}")
    return wall


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def simulate(tasks: list[dict], secs: dict[str, float], n: int) -> float:
    """Wall time of the task graph on ``n`` workers: each free worker takes the first ready
    task in plan order (what the farm's driver does)."""
    done_at: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    pending = [t for t in tasks]
    now = 0.0
    while pending or running:
        ready = [t for t in pending if all(d in done_at and done_at[d] <= now for d in t["deps"])]
        while ready and len(running) < n:
            t = ready.pop(0)
            pending.remove(t)
            running.append((now + secs[t["id"]], t["id"]))
        running.sort()
        end, tid = running.pop(0)
        now = end
        done_at[tid] = end
    return now


def critical_path(tasks: list[dict], secs: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    for t in tasks:  # dependency order
        finish[t["id"]] = secs[t["id"]] + max((finish[d] for d in t["deps"]), default=0.0)
    return max(finish.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1B", choices=list(SIZES))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=32, help="imatrix chunks")
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--presets", default="Q8_0,Q6_K,Q4_K_M,Q2_K")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-farm-", dir=args.tmpdir))
    try:
        name = f"moe-{args.size}"
        src = work / name
        code = "import sys, json; from gguf_moe.synth import make_model; make_model(sys.argv[1], **json.loads(sys.argv[2]))"
        run([PY, "-c", code, src, json.dumps(dict(DIMS, n_layer=SIZES[args.size]))], work / "gen.log")
        text = work / "text.txt"
        code = ("import sys; from gguf_moe.synth import _training_text; t = _training_text(); "
                "open(sys.argv[1], 'w', encoding='utf-8').write(' = Heading = \\n' + t + t + t + t)")  # fmt: skip
        run([PY, "-c", code, text], work / "text.log")
        rel = work / "rel"
        d = rel / name

        # ---- by hand, in the farm's own paths (the imatrix path is recorded in the files)
        d.mkdir(parents=True)
        hand: list[tuple[str, float]] = []
        im = d / f"{name}.imatrix.gguf"
        hand.append(("imatrix", run([*GGUF_MOE, "imatrix", src, "-f", text, "--ctx", args.ctx, "--chunks", args.chunks,
                                     "-o", im, "--json"], work / "imatrix.log")))  # fmt: skip
        files = []
        for p in presets:
            out = d / f"{name}-{p}.gguf"
            hand.append((f"convert {p}", run([*GGUF_MOE, "convert", src, "-t", p, "-o", out, "--imatrix", im, "-q"],
                                             work / f"convert-{p}.log")))  # fmt: skip
            files.append(out)
        t0 = time.perf_counter()
        with open(d / "eval.json", "wb") as f:
            r = subprocess.run([str(c) for c in [*GGUF_MOE, "eval", src, *files, "-f", text, "--ctx", args.ctx,
                                "--chunks", args.eval_chunks, "--json"]], stdout=f, stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(r.stderr.decode(errors="replace")[-2000:])
        hand.append(("eval", time.perf_counter() - t0))
        ref = {p.name: sha(p) for p in sorted(d.iterdir())}
        shutil.rmtree(rel)

        # ---- the farm, local, one worker
        plan = work / "plan.yaml"
        plan.write_text(json.dumps({
            "outdir": str(rel),
            "defaults": {"presets": presets, "imatrix": {"text": str(text), "ctx": args.ctx, "chunks": args.chunks},
                         "eval": {"text": str(text), "ctx": args.ctx, "chunks": args.eval_chunks}},
            "models": [{"source": str(src)}],
        }))  # fmt: skip
        t0 = time.perf_counter()
        r = subprocess.run([*GGUF_MOE, "farm", "run", str(plan), "--workers", "1", "--json"], capture_output=True, cwd=ROOT)
        farm_wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr.decode(errors="replace")[-2000:])
        res = json.loads(r.stdout)
        same = {n: sha(d / n) == h for n, h in ref.items()}

        hand_total = sum(w for _, w in hand)
        print(f"bench merge {name} ({SIZES[args.size]} layers), presets {', '.join(presets)}, imatrix {args.chunks} x "
              f"{args.ctx} tokens, eval {args.eval_chunks} x {args.ctx}")  # fmt: skip
        print()
        print(f"{'by hand':<28}{'seconds':>10}")
        for n, w in hand:
            print(f"  {n:<26}{w:>10.1f}")
        print(f"  {'total':<26}{hand_total:>10.1f}")
        print(f"{'farm, local, 1 worker':<28}{farm_wall:>10.1f}   overhead {100 * (farm_wall / hand_total - 1):+.1f}%")
        print()
        print("identical files (sha256):", ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in same.items()))

        # ---- modelled scaling from the journalled task times
        meta = json.loads((rel / ".farm" / "tasks.json").read_text())
        tasks = meta["tasks"]
        secs = {t["task"]: float(t.get("seconds") or 0.0) for t in res["tasks"]}
        print()
        print(f"task times (s): " + ", ".join(f"{k.split('/', 1)[1]} {v:.1f}" for k, v in secs.items()))
        cp = critical_path(tasks, secs)
        t1 = simulate(tasks, secs, 1)
        print()
        print(f"{'workers':>8}{'modelled s':>12}{'speed-up':>10}")
        for n in (1, 2, 4, 8, 16):
            tn = simulate(tasks, secs, n)
            print(f"{n:>8}{tn:>12.1f}{t1 / tn:>9.2f}x")
        print(f"critical path {cp:.1f} s: at most {t1 / cp:.2f}x with any number of workers")
        if not all(same.values()):
            raise SystemExit("farm output differs from the single commands")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
