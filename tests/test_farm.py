"""``gguf-moe farm`` with the local executor: every file sha256-identical to the single
commands run by hand (``imatrix``, ``convert``, ``eval --json``) with 1 and 2 workers, a
task that kills its own process is retried, a SIGKILLed driver resumes without redoing
completed work, changed parameters redo what they affect, bad plans give one line.

The merge is small (4 experts, 2 layers) and the texts short (ctx 16: 48 imatrix chunks in
3 groups, 40 eval chunks in 3 groups) so each run takes seconds; the by-hand reference
files are made once and every farm run is compared with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import _training_text, make_model

pytest.importorskip("torch")

CTX = 16
IM_CHUNKS = 48
EV_CHUNKS = 40
PRESETS = ["Q8_0", "Q4_K_M", "BF16"]
NAME = "farm-moe"


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def write_plan(root: Path, src: Path, text: Path, outdir: Path, **over) -> Path:
    plan = {
        "outdir": str(outdir),
        "defaults": {
            "presets": PRESETS,
            "imatrix": {"text": str(text), "ctx": CTX, "chunks": IM_CHUNKS},
            "eval": {"text": str(text), "ctx": CTX, "chunks": EV_CHUNKS},
        },
        "models": [{"source": str(src)}],
    }
    plan["defaults"].update(over)
    p = root / "plan.yaml"
    import yaml

    p.write_text(yaml.safe_dump(plan, sort_keys=False))
    return p


def by_hand(src: Path, text: Path, d: Path) -> dict[str, str]:
    """The release made with the single commands, in the farm's own paths; name -> sha256."""
    d.mkdir(parents=True)
    im = d / f"{NAME}.imatrix.gguf"
    code, _, err = cli("imatrix", src, "-f", text, "--ctx", CTX, "--chunks", IM_CHUNKS, "--device", "cpu", "-o", im)
    assert code == 0, err
    files = []
    for p in PRESETS:
        out = d / f"{NAME}-{p}.gguf"
        extra = ["--imatrix", im] if p != "BF16" else []
        code, _, err = cli("convert", src, "-t", p, "-o", out, *extra, "-q")
        assert code == 0, err
        files.append(out)
    code, out, err = cli("eval", src, *files, "-f", text, "--ctx", CTX, "--chunks", EV_CHUNKS, "--device", "cpu", "--json")
    assert code == 0, err
    (d / "eval.json").write_text(out)
    return {f.name: sha(f) for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("farm")
    src = make_model(root / NAME, layout="fused", n_expert=4, top_k=2, tokenizer="spm", hidden=128, ff=256, seed=21)
    text = root / "calib.txt"
    text.write_text(" = Valkyria Chronicles = \n \n " + _training_text()[:20000], encoding="utf-8")
    rel = root / "rel"
    ref = by_hand(src, text, rel / NAME)
    shutil.rmtree(rel)
    return root, src, text, rel, ref


def produced(rel: Path) -> dict[str, str]:
    d = rel / NAME
    return {f.name: sha(f) for f in sorted(d.iterdir()) if f.suffix in (".gguf", ".json") and f.name != "manifest.json"}


def fresh(rel: Path) -> None:
    if rel.exists():
        shutil.rmtree(rel)


def test_farm_workers_1_identical(case):
    root, src, text, rel, ref = case
    fresh(rel)
    plan = write_plan(root, src, text, rel)
    code, out, err = cli("farm", "run", plan, "--workers", 1, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["ok"] and res["counts"] == {"done": len(res["tasks"])}
    assert produced(rel) == ref
    # 3 imatrix groups, 3 presets, 3 eval groups, the two reductions and the card
    kinds = [t["kind"] for t in res["tasks"]]
    assert kinds.count("imatrix_part") == 3 and kinds.count("eval_part") == 3 and kinds.count("convert") == 3
    man = json.loads((rel / NAME / "manifest.json").read_text())
    for e in man["files"]:
        f = rel / NAME / e["file"]
        assert e["sha256"] == sha(f) and e["bytes"] == f.stat().st_size
    assert {e["file"] for e in man["files"]} >= set(ref) | {"README.md"}
    card = (rel / NAME / "README.md").read_text()
    for p in PRESETS:
        assert f"`{NAME}-{p}.gguf`" in card
    assert "KLD mean" in card  # the eval figures made it into the table
    # farm status reads the journal
    code, out, err = cli("farm", "status", rel, "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["counts"] == {"done": len(res["tasks"])}


def test_farm_workers_2_with_a_crashing_task_identical(case, monkeypatch, tmp_path):
    """Two workers, and the Q4_K_M task's process exits abruptly on its first attempt: the
    pool is replaced, the task runs again, and every file is still the by-hand one."""
    root, src, text, rel, ref = case
    fresh(rel)
    plan = write_plan(root, src, text, rel)
    marker = tmp_path / "crashed"
    monkeypatch.setenv("GGUF_MOE_FARM_FAULT", f"crash-once:{NAME}/convert/Q4_K_M:{marker}")
    code, out, err = cli("farm", "run", plan, "--workers", 2, "--json")
    assert code == 0, err
    assert marker.is_file()  # it did die once
    res = json.loads(out)
    t = next(t for t in res["tasks"] if t["task"] == f"{NAME}/convert/Q4_K_M")
    assert t["state"] == "done" and t["attempt"] >= 2
    assert produced(rel) == ref


def _journal(rel: Path) -> list[dict]:
    p = rel / ".farm" / "journal.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def test_driver_sigkill_then_resume(case):
    """SIGKILL the driver once two converts are journalled; the rerun redoes nothing that
    completed (files untouched: same inode and mtime) and the release is identical."""
    root, src, text, rel, ref = case
    fresh(rel)
    plan = write_plan(root, src, text, rel)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gguf_moe", "farm", "run", str(plan), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = [r for r in _journal(rel) if r["event"] == "done" and "/convert/" in r["task"]]
            if len(done) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail("the farm did not get to two converts in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    completed = {r["task"]: r for r in _journal(rel) if r["event"] == "done"}
    assert not any(t.endswith("/card") for t in completed)  # killed mid-run
    before = {}
    for r in completed.values():
        for o in r["outputs"]:
            st = os.stat(o["path"])
            before[o["path"]] = (st.st_ino, st.st_mtime_ns)
    time.sleep(0.05)
    code, out, err = cli("farm", "run", plan, "--workers", 1, "--json")
    assert code == 0, err
    res = json.loads(out)
    states = {t["task"]: t["state"] for t in res["tasks"]}
    for tid in completed:
        assert states[tid] == "skipped", tid
    for path, ident in before.items():
        st = os.stat(path)
        assert (st.st_ino, st.st_mtime_ns) == ident, path
    assert produced(rel) == ref
    assert not list((rel / NAME).glob("*.part"))


def test_resume_redoes_changed_and_damaged(case):
    """After a complete run: a damaged file is made again, and a changed eval chunk count
    redoes the eval (not the imatrix or the quantized files)."""
    root, src, text, rel, ref = case
    if not (rel / NAME / "manifest.json").is_file():
        fresh(rel)
        plan = write_plan(root, src, text, rel)
        assert cli("farm", "run", plan, "--workers", 2)[0] == 0
    plan = write_plan(root, src, text, rel)
    q8 = rel / NAME / f"{NAME}-Q8_0.gguf"
    data = bytearray(q8.read_bytes())
    data[-100] ^= 0xFF
    q8.write_bytes(bytes(data))
    code, out, err = cli("farm", "run", plan, "--workers", 2, "--json")
    assert code == 0, err
    states = {t["task"].split("/", 1)[1]: t["state"] for t in json.loads(out)["tasks"]}
    assert states["convert/Q8_0"] == "done"
    assert states["convert/Q4_K_M"] == "skipped" and states["imatrix"] == "skipped"
    assert produced(rel) == ref
    plan = write_plan(root, src, text, rel, eval={"text": str(text), "ctx": CTX, "chunks": 32})
    code, out, err = cli("farm", "run", plan, "--workers", 2, "--json")
    assert code == 0, err
    states = {t["task"].split("/", 1)[1]: t["state"] for t in json.loads(out)["tasks"]}
    assert states["eval"] == "done" and states["card"] == "done"
    assert all(states[k] == "skipped" for k in states if k.startswith(("imatrix", "convert")))
    ev = json.loads((rel / NAME / "eval.json").read_text())
    assert ev["tokens"] == 32 * (CTX - 1 - CTX // 2)


def test_imatrix_identical_for_1_2_3_shards(case, tmp_path):
    """The imatrix groups, run as 1, 2 or 3 shards (any order) and added in group order,
    give the by-hand file's bytes."""
    from gguf_moe.calibrate import compute_imatrix, reduce_groups
    from gguf_moe.imatrix import write_imatrix

    root, src, text, rel, ref = case
    for shards in ([[0, 1, 2]], [[2], [0, 1]], [[1], [2], [0]]):
        parts = {}
        for s in shards:
            parts.update(compute_imatrix(src, text, ctx=CTX, chunks=IM_CHUNKS, device="cpu", only_groups=s).parts)
        assert sorted(parts) == [0, 1, 2]
        out = tmp_path / "rel" / NAME / f"{NAME}.imatrix.gguf"  # the by-hand path string is recorded nowhere
        out.parent.mkdir(parents=True, exist_ok=True)
        write_imatrix(out, reduce_groups([parts[i] for i in range(3)]), datasets=[str(text)], chunk_count=IM_CHUNKS,
                      chunk_size=CTX)  # fmt: skip
        assert sha(out) == ref[out.name], shards


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda p: p.replace("models:", "colour: blue\nmodels:"), "unknown key 'colour'"),
        (lambda p: p.replace("- Q4_K_M", "- Q4_K_Z"), "Q4_K_Z"),
        (lambda p: p.replace("source: ", "source: /nonexistent/"), "not a directory"),
        (lambda p: p.replace("calib.txt", "missing.txt"), "does not exist"),
        (lambda p: p.replace("chunks: 48", "chunks: 48\n    threads: 3"), "unknown key 'threads'"),
        (lambda p: p.replace("models:", "  device: tpu\nmodels:"), "device must be cpu or cuda"),
    ],
)
def test_bad_plans_one_line(case, tmp_path, edit, expect):
    root, src, text, rel, ref = case
    good = write_plan(tmp_path, src, text, tmp_path / "out").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(edit(good))
    code, out, err = cli("farm", "run", bad, "--dry-run")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert str(bad) in lines[0]
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_tasks(case, tmp_path):
    root, src, text, rel, ref = case
    plan = write_plan(tmp_path, src, text, tmp_path / "out")
    code, out, err = cli("farm", "run", plan, "--dry-run", "--json")
    assert code == 0, err
    tasks = json.loads(out)["tasks"]
    ids = [t["task"] for t in tasks]
    assert ids.index(f"{NAME}/imatrix") > ids.index(f"{NAME}/imatrix/002")
    conv = next(t for t in tasks if t["task"] == f"{NAME}/convert/Q4_K_M")
    assert conv["deps"] == [f"{NAME}/imatrix"]
    assert next(t for t in tasks if t["task"] == f"{NAME}/convert/BF16")["deps"] == []
    assert not (tmp_path / "out").exists()


def test_split_set_equals_convert_split(case, tmp_path):
    """With split_max_size each shard is its own task (reading only its tensors) and equals
    `convert --split-max-size`'s shard; the card and manifest list the parts."""
    root, src, text, rel, ref = case
    out = tmp_path / "rel"
    d = out / NAME
    d.mkdir(parents=True)
    code, _, err = cli("convert", src, "-t", "BF16", "-o", d / f"{NAME}-BF16.gguf", "--split-max-size", "1M", "-q")
    assert code == 0, err
    hand = {f.name: sha(f) for f in d.iterdir()}
    assert len(hand) >= 2  # really a set
    shutil.rmtree(d)
    import yaml

    plan = tmp_path / "split.yaml"
    plan.write_text(yaml.safe_dump({"outdir": str(out), "models": [{"source": str(src), "presets": ["BF16"],
                                                                    "split_max_size": "1M"}]}))  # fmt: skip
    code, res, err = cli("farm", "run", plan, "--workers", 2, "--json")
    assert code == 0, err
    assert {n: sha(d / n) for n in hand} == hand
    # one task per shard, each writing just its file
    shard_tasks = [t for t in json.loads(res)["tasks"] if t["kind"] == "convert"]
    assert sorted(Path(t["outputs"][0]).name for t in shard_tasks) == sorted(hand)
    man = json.loads((d / "manifest.json").read_text())
    assert sorted(e["file"] for e in man["files"] if e["kind"] == "gguf") == sorted(hand)
    assert f"| {len(hand)} |" in (d / "README.md").read_text()  # the Parts column


def test_ctrl_c_stops_cleanly(case, tmp_path):
    """SIGINT to the driver while tasks run: its workers are stopped, one error line, exit 1."""
    root, src, text, rel, ref = case
    out = tmp_path / "rel"
    plan = write_plan(tmp_path, src, text, out)
    proc = subprocess.Popen([sys.executable, "-m", "gguf_moe", "farm", "run", str(plan), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(r["event"] == "start" for r in _journal(out)):
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert lines == [lines[0]] and "interrupted" in lines[0] and "resume" in lines[0], err
    assert "Traceback" not in err
    # the workers went with it: no process still has the driver as its parent
    time.sleep(0.5)
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                kids.append(p.name)
    assert not kids


def test_hub_repo_id_source(tmp_path, monkeypatch):
    """A plan source given as org/name, read from a Hugging Face cache offline: the file
    equals `convert org/name` by hand, and the card names the repo."""
    from test_hub import COMMIT_MAIN, add_revision

    src = make_model(tmp_path / "src" / "Hub-Farm-MoE", layout="fused", n_expert=4, top_k=2, hidden=64, ff=128, seed=5)
    cache = tmp_path / "hf" / "hub"
    add_revision(cache, "merge-lab/Hub-Farm-MoE", src, COMMIT_MAIN, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "rel"
    d = out / "Hub-Farm-MoE"
    d.mkdir(parents=True)
    f = d / "Hub-Farm-MoE-Q8_0.gguf"
    code, _, err = cli("convert", "merge-lab/Hub-Farm-MoE", "-t", "Q8_0", "-o", f, "-q")
    assert code == 0, err
    hand = sha(f)
    f.unlink()
    import yaml

    plan = tmp_path / "hub.yaml"
    plan.write_text(yaml.safe_dump({"outdir": str(out), "models": [{"source": "merge-lab/Hub-Farm-MoE", "presets": ["Q8_0"]}]}))
    code, res, err = cli("farm", "run", plan, "--workers", 1, "--json")
    assert code == 0, err
    assert sha(f) == hand
    front = yaml.safe_load((d / "README.md").read_text().split("---")[1])
    assert front["base_model"] == "merge-lab/Hub-Farm-MoE"
