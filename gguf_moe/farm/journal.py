"""The farm's journal: ``<state>/journal.jsonl``, one JSON line per event, appended and
flushed to disk (fsync) before the driver goes on, so a killed driver loses at most the
tasks in flight.  ``<state>/tasks.json`` holds the expanded plan of the last run (for
``farm status``).

A task counts as complete when its last ``done`` record carries the task's current key
(``tasks.task_key``: parameters, version, source, upstream keys) and every output it
recorded still exists with the recorded size and sha256.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gguf_moe.farm.tasks import sha256_file

__all__ = ["Journal"]


class Journal:
    def __init__(self, state: str | Path):
        self.state = Path(state)
        self.path = self.state / "journal.jsonl"
        self.tasks_path = self.state / "tasks.json"

    def exists(self) -> bool:
        return self.path.is_file() or self.tasks_path.is_file()

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut short by a crash: the last one only
                    continue
        return out

    def last(self) -> dict[str, dict]:
        """The last record per task id."""
        out: dict[str, dict] = {}
        for r in self.records():
            out[r["task"]] = r
        return out

    def last_done(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in self.records():
            if r.get("event") == "done":
                out[r["task"]] = r
        return out

    def append(self, event: str, task: str, **fields) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        rec = {"event": event, "task": task, "time": round(time.time(), 3), **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_tasks(self, tasks: list[dict], meta: dict) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.tasks_path.with_name(self.tasks_path.name + ".part")
        shown = [{k: t[k] for k in ("id", "model", "kind", "outputs", "deps", "key", "cpus", "memory")} for t in tasks]
        tmp.write_text(json.dumps({**meta, "tasks": shown}, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.tasks_path)

    def load_tasks(self) -> dict:
        return json.loads(self.tasks_path.read_text(encoding="utf-8"))

    @staticmethod
    def still_valid(rec: dict, key: str) -> bool:
        """``rec`` (a done record) is for ``key`` and its outputs are on disk unchanged."""
        if rec.get("key") != key:
            return False
        for o in rec.get("outputs", []):
            p = Path(o["path"])
            try:
                if p.stat().st_size != o["bytes"]:
                    return False
            except OSError:
                return False
            if sha256_file(p) != o["sha256"]:
                return False
        return True
