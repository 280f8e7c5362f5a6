"""The farm's driver: expand the plan, skip what the journal shows complete, hand ready
tasks to the executor, journal every start and end, show progress.

Dependencies are kept here (a task is handed over when every task it reads from is done);
where a task runs, with how many threads and when it is retried is the executor's.
A failed task fails its dependents (they are reported as blocked); the others go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gguf_moe import __version__
from gguf_moe.errors import GgufMoeError
from gguf_moe.farm.journal import Journal
from gguf_moe.farm.plan import Plan
from gguf_moe.farm.tasks import FAULT_ENV, expand

__all__ = ["FarmState", "prepare", "run_plan", "status_of", "space_needed"]


@dataclass
class FarmState:
    """Every task's state: pending, running, done, skipped (complete from an earlier run),
    failed (with its reason) or blocked (a task it needs failed)."""

    tasks: list[dict]
    state: dict[str, str] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)  # id -> worker, seconds, error, attempt

    def to_dict(self, extra: dict | None = None) -> dict:
        files = []
        for t in self.tasks:
            i = self.info.get(t["id"], {})
            files.append({
                "task": t["id"], "model": t["model"], "kind": t["kind"], "state": self.state[t["id"]],
                "outputs": t["outputs"], **{k: i[k] for k in ("worker", "seconds", "error", "attempt") if k in i},
            })  # fmt: skip
        counts: dict[str, int] = {}
        for s in self.state.values():
            counts[s] = counts.get(s, 0) + 1
        return {**(extra or {}), "counts": counts, "tasks": files}

    @property
    def ok(self) -> bool:
        return all(s in ("done", "skipped") for s in self.state.values())


def prepare(plan: Plan, state_dir: Path | None, dry_run: bool = False) -> tuple[list[dict], Journal]:
    plan.state = Path(state_dir) if state_dir is not None else plan.outdir / ".farm"
    tasks = expand(plan, save=not dry_run)
    return tasks, Journal(plan.state)


def space_needed(tasks: list[dict], complete: set[str]) -> list[tuple[Path, int]]:
    """(path, bytes) of every GGUF still to write (split sets: as one file of the set's size)."""
    return [(Path(t["outputs"][0]), int(t["size"])) for t in tasks if t["kind"] == "convert" and t["id"] not in complete]


def _complete(tasks: list[dict], journal: Journal) -> set[str]:
    done = journal.last_done()
    out: set[str] = set()
    for t in tasks:  # dependency order: a task is only complete when its inputs are
        rec = done.get(t["id"])
        if rec is not None and all(d in out for d in t["deps"]) and Journal.still_valid(rec, t["key"]):
            out.add(t["id"])
    return out


def run_plan(
    plan: Plan,
    tasks: list[dict],
    journal: Journal,
    executor,
    on_change: Callable[[FarmState, str], None] | None = None,
) -> FarmState:
    """Run every task not already complete; returns the final states."""
    fault = os.environ.get(FAULT_ENV)
    complete = _complete(tasks, journal)
    journal.save_tasks(tasks, {"plan": str(plan.path), "outdir": str(plan.outdir), "gguf_moe": __version__})
    st = FarmState(tasks, {t["id"]: ("skipped" if t["id"] in complete else "pending") for t in tasks})
    by_id = {t["id"]: t for t in tasks}
    dependents: dict[str, list[str]] = {}
    for t in tasks:
        for d in t["deps"]:
            dependents.setdefault(d, []).append(t["id"])

    def note(tid: str) -> None:
        if on_change is not None:
            on_change(st, tid)

    def block(tid: str) -> None:
        for c in dependents.get(tid, []):
            if st.state[c] == "pending":
                st.state[c] = "blocked"
                st.info[c] = {"error": f"needs {tid}, which failed"}
                note(c)
                block(c)

    done = set(complete)
    pending = [t["id"] for t in tasks if t["id"] not in complete]
    try:
        while True:
            ready = [i for i in pending if st.state[i] == "pending" and all(d in done for d in by_id[i]["deps"])]
            for tid in ready:
                spec = {**by_id[tid], "fault": fault}
                if not executor.can_submit(spec):
                    break
                h = executor.submit(spec)
                st.state[tid] = "running"
                st.info[tid] = {"worker": h.where, "attempt": 1}
                journal.append("start", tid, key=spec["key"], executor=executor.name)
                note(tid)
            if not executor.running:
                break
            finished = executor.wait(0.25)
            for tid, where in getattr(executor, "starts", list)():
                if st.state.get(tid) == "running":
                    st.info[tid]["worker"] = where
                    note(tid)
            for h, ok, value in finished:
                tid = h.spec["id"]
                if ok:
                    done.add(tid)
                    st.state[tid] = "done"
                    st.info[tid] = {"worker": value["worker"], "seconds": value["seconds"], "attempt": h.attempt}
                    journal.append("done", tid, key=h.spec["key"], outputs=value["outputs"], result=value["result"],
                                   worker=value["worker"], seconds=value["seconds"], attempt=h.attempt)  # fmt: skip
                else:
                    st.state[tid] = "failed"
                    st.info[tid] = {"error": value, "attempt": h.attempt}
                    journal.append("failed", tid, key=h.spec["key"], error=value, attempt=h.attempt)
                    block(tid)
                note(tid)
            pending = [i for i in pending if st.state[i] == "pending"]
    except BaseException:
        executor.shutdown(cancel=True)
        for t in tasks:
            if st.state[t["id"]] == "running":
                st.state[t["id"]] = "interrupted"
        raise
    executor.shutdown()
    return st


def status_of(state_dir: Path) -> tuple[dict, FarmState]:
    """The states the journal in ``state_dir`` shows for the last run's tasks."""
    journal = Journal(state_dir)
    if not journal.tasks_path.is_file():
        raise GgufMoeError(f"{state_dir}: no farm journal here (expected {journal.tasks_path}); give the --state folder of a farm run")
    meta = journal.load_tasks()
    tasks = meta["tasks"]
    last = journal.last()
    done = journal.last_done()
    st = FarmState(tasks)
    for t in tasks:
        tid = t["id"]
        r = last.get(tid)
        d = done.get(tid)
        if d is not None and d.get("key") == t["key"] and (r is d or r.get("event") != "failed"):
            ok = all(Path(o["path"]).is_file() and Path(o["path"]).stat().st_size == o["bytes"] for o in d.get("outputs", []))
            st.state[tid] = "done" if ok else "changed"
            st.info[tid] = {"worker": d.get("worker"), "seconds": d.get("seconds")}
            if r is not d and r.get("event") == "start":
                st.state[tid] = "done"
        elif r is not None and r.get("event") == "failed" and r.get("key") == t["key"]:
            st.state[tid] = "failed"
            st.info[tid] = {"error": r.get("error")}
        elif r is not None and r.get("event") == "start" and r.get("key") == t["key"]:
            st.state[tid] = "started"  # running now, or its driver stopped
        else:
            st.state[tid] = "pending"
    return meta, st
