"""What ``test_imatrix_cmd``, ``test_eval_cmd`` and ``test_quality_archs`` share to compare
``gguf-moe imatrix`` / ``eval`` with the real ``llama-imatrix`` / ``llama-perplexity``: the
tool runs (exact attention: ``-fa off -ctk f32 -ctv f32``, 2 threads) and the comparisons
with their bounds (see those modules for why the bounds are honest).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf
import numpy as np

#: llama.cpp's flags for exact float32 attention, as gguf-moe computes it
EXACT = ["-fa", "off", "-ctk", "f32", "-ctv", "f32", "-t", "2"]


def run_llama_imatrix(tool: Path, f32: Path, text: Path, out: Path, ctx: int, chunks: int, *extra: str) -> None:
    """``llama-imatrix`` on the F32 GGUF, writing ``out``."""
    r = subprocess.run(
        [tool, "-m", f32, "-f", text, "-o", out, "-c", str(ctx), "--chunks", str(chunks), *EXACT, "--no-ppl", *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


def read_imatrix(path: Path) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape.tolist())]) for t in r.tensors}
    return kv, ts, [t.name for t in r.tensors]


def assert_imatrix_matches(
    ref: Path, ours: Path, tokens: int, rtol: float, max_count_diff: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str], float]:
    """Our imatrix file against llama-imatrix's: same metadata and entries in the same order,
    dense counts equal to ``tokens``, per-expert counts within ``max_count_diff``, and every
    in_sum2 within ``rtol`` relative (plus twice an expert's relative count difference: a
    router tie moves those tokens' share).  Returns (ref tensors, our tensors, entry names,
    largest relative in_sum2 difference)."""
    kv_ref, t_ref, names_ref = read_imatrix(ref)
    kv_ours, t_ours, names_ours = read_imatrix(ours)
    assert kv_ours == kv_ref
    assert names_ours == names_ref  # same entries, same order
    worst = 0.0
    for n in names_ref:
        if not n.endswith(".counts"):
            continue
        base = n[: -len(".counts")]
        c_ref, c_ours = t_ref[n].reshape(-1), t_ours[n].reshape(-1)
        s_ref, s_ours = t_ref[base + ".in_sum2"], t_ours[base + ".in_sum2"]
        assert s_ref.shape == s_ours.shape and c_ref.shape == c_ours.shape, base
        if c_ref.size == 1:
            assert c_ours[0] == c_ref[0] == tokens, base
        else:
            assert np.abs(c_ours - c_ref).max() <= max_count_diff, (base, c_ours, c_ref)
        s_ref, s_ours = s_ref.reshape(c_ref.size, -1), s_ours.reshape(c_ref.size, -1)
        for e in range(c_ref.size):
            if c_ref[e] == 0:
                assert not s_ours[e].any()
                continue
            tol = rtol + 2 * abs(float(c_ours[e] - c_ref[e])) / float(c_ref[e])
            rel = np.abs(s_ours[e] - s_ref[e]) / np.maximum(np.abs(s_ref[e]), 1e-30)
            assert rel.max() < tol, f"{base}[{e}]: rel {rel.max():.2e}"
            worst = max(worst, float(rel.max()))
    return t_ref, t_ours, names_ref, worst


def assert_eval_close(name: str, res: dict, files: list[Path], ref: dict[str, dict]) -> None:
    """``eval --json`` against llama-perplexity's KLD runs (``ref``: file name -> figures):
    perplexity within 0.5 %, mean KLD within 10 %, p99 KLD within 20 %, top-1 within 1.5
    points, files ranked alike by mean KLD.  Prints one line of differences per file."""
    rows = []
    for f, path in zip(res["files"], files):
        r = ref[path.name]
        d = {
            "ppl": f["ppl"] / r["ppl"] - 1,
            "kld_mean": f["kld_mean"] / r["kld_mean"] - 1,
            "kld_p99": f["kld_p99"] / r["kld_p99"] - 1,
            "top1": f["top1"] - r["top1"],
        }
        rows.append(f"{f['type']}: ppl {100 * d['ppl']:+.2f}%  KLD {100 * d['kld_mean']:+.2f}%  "
                    f"p99 {100 * d['kld_p99']:+.2f}%  top-1 {100 * d['top1']:+.2f} pt")  # fmt: skip
        assert abs(d["ppl"]) < 0.005, rows[-1]
        assert abs(d["kld_mean"]) < 0.10, rows[-1]
        assert abs(d["kld_p99"]) < 0.20, rows[-1]
        assert abs(d["top1"]) < 0.015, rows[-1]
    print(f"{name}: " + "; ".join(rows))
    order = sorted(range(len(files)), key=lambda i: res["files"][i]["kld_mean"])
    assert order == sorted(range(len(files)), key=lambda i: ref[files[i].name]["kld_mean"])


def llama_ppl(tool: Path, f32: Path, text: Path, ctx: int, chunks: int) -> tuple[float | None, str]:
    """llama-perplexity's final estimate on ``f32`` (None if it printed none in 3 tries: its
    asynchronous logger sometimes loses the last lines at exit), and its last stderr."""
    for _ in range(3):
        r = subprocess.run([tool, "-m", f32, "-f", text, *EXACT, "-c", str(ctx), "--chunks", str(chunks), "-nr"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        m = re.search(r"Final estimate: PPL = ([\d.]+)", r.stdout + r.stderr)
        if m:
            return float(m.group(1)), r.stderr
    return None, r.stderr
