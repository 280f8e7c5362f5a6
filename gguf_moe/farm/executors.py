"""Where the farm's tasks run: one interface, two implementations.

* ``LocalExecutor``: a process pool on this machine (``concurrent.futures``, spawned
  workers that die with the driver).  A worker that dies mid-task breaks the pool; the
  pool is replaced and the tasks that were in flight are submitted again (each at most
  ``max_retries`` more times).  Tasks start only while the memory they declare fits the
  machine's (one always may).
* ``RayExecutor``: Ray tasks (``pip install 'gguf-moe[ray]'``), on the cluster at
  ``--address`` / ``RAY_ADDRESS`` or on a local Ray started here, bound to loopback only.
  Each task declares its CPUs and memory; a worker or node that dies is retried by Ray
  (``max_retries``); errors raised by the task itself are not retried.

Both report a finished task as ``(handle, ok, value)``: ``value`` is ``run_task``'s dict,
or a one-line reason.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from gguf_moe.errors import GgufMoeError
from gguf_moe.farm.tasks import run_task

__all__ = ["Handle", "LocalExecutor", "RayExecutor", "make_executor"]

MAX_RETRIES = 2


@dataclass(eq=False)
class Handle:
    spec: dict
    attempt: int = 1
    ref: Any = None
    where: str = ""
    started: float = field(default_factory=time.time)


def _reason(e: BaseException) -> str:
    if isinstance(e, GgufMoeError):
        return " ".join(str(e).split())
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _init_worker(started=None) -> None:
    """Worker initializer: tasks report where they start on ``started``; the kernel kills
    this worker when the driver dies (Linux)."""
    from gguf_moe.farm import tasks

    tasks.STARTED = started
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int | None = None, max_retries: int = MAX_RETRIES):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.max_retries = max_retries
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)
        try:
            self.memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            self.memory = 1 << 62
        self.running: list[Handle] = []
        self.pool = None
        self.started = None
        self._new_pool()

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        self.started = ctx.Queue()  # (task id, worker) as each task starts
        self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.started,))

    def starts(self) -> list[tuple[str, str]]:
        """(task id, worker) of the tasks that started since the last call."""
        import queue

        out = []
        while True:
            try:
                out.append(self.started.get_nowait())
            except (queue.Empty, OSError, EOFError, ValueError):
                return out

    def describe(self) -> str:
        return f"local, {self.workers} worker{'s' if self.workers > 1 else ''} x {self.threads} thread{'s' if self.threads > 1 else ''}"

    def can_submit(self, spec: dict) -> bool:
        if len(self.running) >= self.workers:
            return False
        if spec.get("gpus") and sum(h.spec.get("gpus", 0) for h in self.running) + spec["gpus"] > self.n_gpus():
            return False  # one GPU task per GPU at a time
        used = sum(h.spec["memory"] for h in self.running)
        return not self.running or used + spec["memory"] <= self.memory

    @staticmethod
    def n_gpus() -> int:
        """NVIDIA GPUs here (at least 1, so a cuda task can start and report its own error)."""
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            return max(1, len([d for d in env.split(",") if d.strip()]))
        try:
            return max(1, len([d for d in os.listdir("/proc/driver/nvidia/gpus")]))
        except OSError:
            return 1

    def submit(self, spec: dict) -> Handle:
        spec = {**spec, "threads": self.threads, "cpus": self.threads}
        h = Handle(spec)
        h.ref = self.pool.submit(run_task, spec)
        h.where = "local"
        self.running.append(h)
        return h

    def wait(self, timeout: float) -> list[tuple[Handle, bool, Any]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait
        from concurrent.futures.process import BrokenProcessPool

        if not self.running:
            return []
        fwait([h.ref for h in self.running], timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        broken = []
        for h in list(self.running):
            if not h.ref.done():
                continue
            try:
                out.append((h, True, h.ref.result()))
            except BrokenProcessPool:
                broken.append(h)
                continue
            except Exception as e:  # the task's own error: reported, not retried
                out.append((h, False, _reason(e)))
            self.running.remove(h)
        if broken:
            self.starts()  # what the old pool's workers reported
            # a worker died: every task in flight failed with the pool; start a new pool and
            # submit them again (the dead one's task is the one that caused it, but the pool
            # cannot say which)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._new_pool()
            for h in list(self.running):
                if h not in broken and not h.ref.done():
                    broken.append(h)
            for h in broken:
                if h.attempt > self.max_retries:
                    self.running.remove(h)
                    out.append((h, False, f"worker died {h.attempt} times running this task"))
                    continue
                h.attempt += 1
                h.ref = self.pool.submit(run_task, h.spec)
        return out

    def shutdown(self, cancel: bool = False) -> None:
        if self.pool is None:
            return
        if cancel:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                try:
                    p.kill()
                except Exception:
                    pass
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
        self.pool = None


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, max_retries: int = MAX_RETRIES):
        # Ray binds the machine's network address even when asked for 127.0.0.1 unless this
        # is set; a local Ray started here must listen on loopback only
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        try:
            import ray
        except ImportError:
            raise GgufMoeError("--executor ray needs Ray: pip install 'gguf-moe[ray]'") from None
        self.ray = ray
        self.started = False
        address = address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=workers, _node_ip_address="127.0.0.1", **kw)
            self.started = True
        self.fn = ray.remote(max_retries=max_retries, retry_exceptions=False)(run_task)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.node_memory = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
        self.node_cpus = int(max((n["Resources"].get("CPU", 1) for n in nodes), default=1))
        self.total_cpus = int(ray.cluster_resources().get("CPU", 1))
        self.total_gpus = int(ray.cluster_resources().get("GPU", 0))
        self.workers = workers or self.total_cpus
        self.running: list[Handle] = []

    def describe(self) -> str:
        return f"ray, {self.total_cpus} CPUs in the cluster, at most {self.workers} tasks at once"

    def can_submit(self, spec: dict) -> bool:
        return len(self.running) < self.workers

    def submit(self, spec: dict) -> Handle:
        # a task's threads fit on one node, whatever the cluster's total
        threads = max(1, min(self.node_cpus, self.total_cpus // self.workers))
        if spec.get("gpus") and not self.total_gpus:
            raise GgufMoeError(f"{spec['id']}: the plan asks for device cuda, but the Ray cluster has no GPU")
        spec = {**spec, "threads": threads, "cpus": threads}
        mem = spec["memory"]
        if self.node_memory:
            mem = min(mem, int(self.node_memory * 0.8))
        h = Handle(spec, where="ray")
        h.ref = self.fn.options(num_cpus=threads, num_gpus=spec.get("gpus", 0), memory=mem, name=spec["id"]).remote(spec)
        self.running.append(h)
        return h

    def wait(self, timeout: float) -> list[tuple[Handle, bool, Any]]:
        ray = self.ray
        if not self.running:
            return []
        refs = [h.ref for h in self.running]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)
        ready = set(ready)
        out = []
        for h in list(self.running):
            if h.ref not in ready:
                continue
            self.running.remove(h)
            try:
                out.append((h, True, ray.get(h.ref)))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                out.append((h, False, _reason(cause) if cause is not None else " ".join(str(e).split())[:300]))
            except ray.exceptions.RayError as e:  # worker or node lost after the retries
                out.append((h, False, f"{type(e).__name__}: the task's worker died (retried {MAX_RETRIES} times)"))
        return out

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for h in self.running:
                try:
                    self.ray.cancel(h.ref, force=True)
                except Exception:
                    pass
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, workers: int | None, address: str | None):
    if kind == "ray":
        return RayExecutor(address, workers)
    if address:
        raise GgufMoeError("--address is for --executor ray")
    return LocalExecutor(workers)
