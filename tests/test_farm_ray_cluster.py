"""``gguf-moe farm --executor ray`` on a two-node ``ray.cluster_utils.Cluster`` (both nodes
on loopback, one CPU each): the worker node is removed while tasks run on it; Ray retries
them on the head node and the release still equals the single commands' files.
Needs Ray; skipped without it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from test_farm import NAME, case, cli, fresh, produced, write_plan  # noqa: F401  (case: a fixture)
from test_farm_ray import check_loopback

pytestmark = pytest.mark.ray
# Ray reads this when imported: without it, Ray 2.60 binds the machine's network address
# even when asked for 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("torch")


def _journal(rel: Path) -> list[dict]:
    p = rel / ".farm" / "journal.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def test_node_removed_mid_run(case):
    from ray.cluster_utils import Cluster

    root, src, text, rel, ref = case
    fresh(rel)
    plan = write_plan(root, src, text, rel)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        check_loopback()
        doomed = worker.node_id[:8]
        result = {}

        def drive():
            result["run"] = cli("farm", "run", plan, "--executor", "ray", "--workers", 2, "--json")

        th = threading.Thread(target=drive)
        th.start()
        # wait until a task has finished on the worker node and more are running, then remove it
        deadline = time.time() + 240
        while time.time() < deadline and th.is_alive():
            done = [r for r in _journal(rel) if r["event"] == "done"]
            if any(r["worker"].endswith("@" + doomed) for r in done) and len(done) >= 2:
                break
            time.sleep(0.2)
        assert th.is_alive(), "the farm finished before the node could be removed"
        cluster.remove_node(worker)
        removed_at = time.time()
        th.join(300)
        assert not th.is_alive()
        code, out, err = result["run"]
        assert code == 0, err
        res = json.loads(out)
        assert res["ok"]
        assert produced(rel) == ref
        late = [r for r in _journal(rel) if r["event"] == "done" and r["time"] > removed_at + 1]
        assert late and all(not r["worker"].endswith("@" + doomed) for r in late)
    finally:
        ray.shutdown()
        cluster.shutdown()
