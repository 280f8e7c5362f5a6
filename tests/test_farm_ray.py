"""``gguf-moe farm --executor ray`` on a local Ray (``ray.init(num_cpus=2)`` once for the
module, bound to loopback): the same files as the single commands run by hand, a task whose
worker exits abruptly is retried by Ray, and nothing Ray starts listens beyond 127.0.0.1.
Needs Ray (``pip install 'gguf-moe[ray]'``); skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from test_farm import NAME, case, cli, fresh, produced, write_plan  # noqa: F401  (case: a fixture)

pytestmark = pytest.mark.ray
# Ray reads this when imported: without it, Ray 2.60 binds the machine's network address
# even when asked for 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ray_pids() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "/ray/" in cmd or cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd:
            out.add(int(d.name))
    return out | {os.getpid()}


def test_ray_listens_on_loopback_only():
    check_loopback()


def check_loopback():
    ss = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    pids = _ray_pids()
    mine = []
    for line in ss.splitlines()[1:]:
        m = re.findall(r"pid=(\d+)", line)
        if m and any(int(p) in pids for p in m):
            mine.append(line.split()[3])
    assert mine, "no listening socket of Ray found"
    for addr in mine:
        host = addr.rsplit(":", 1)[0]
        assert host in ("127.0.0.1", "[::ffff:127.0.0.1]"), f"Ray listens on {addr}"


def test_ray_identical_and_crash_retried(case, monkeypatch, tmp_path):
    """Every file equals the by-hand one; the Q8_0 task's worker exits on its first
    attempt and Ray runs it again."""
    root, src, text, rel, ref = case
    fresh(rel)
    plan = write_plan(root, src, text, rel)
    marker = tmp_path / "crashed"
    monkeypatch.setenv("GGUF_MOE_FARM_FAULT", f"crash-once:{NAME}/convert/Q8_0:{marker}")
    code, out, err = cli("farm", "run", plan, "--executor", "ray", "--workers", 2, "--json")
    assert code == 0, err
    assert marker.is_file()
    res = json.loads(out)
    assert res["ok"]
    q8 = next(t for t in res["tasks"] if t["task"] == f"{NAME}/convert/Q8_0")
    assert q8["state"] == "done" and int(marker.read_text()) != int(q8["worker"].split(":")[1].split("@")[0])
    assert produced(rel) == ref
    check_loopback()  # with the task workers started too
