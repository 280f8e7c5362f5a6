"""``gguf-moe farm run PLAN.yaml`` and ``gguf-moe farm status DIR``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from gguf_moe.errors import GgufMoeError

__all__ = ["farm_cmd"]

_STYLE = {"done": "green", "skipped": "green", "running": "cyan", "failed": "bold red", "blocked": "red",
          "pending": "dim", "started": "yellow", "changed": "yellow", "interrupted": "yellow"}  # fmt: skip


def _label(t: dict) -> str:
    out = t["outputs"][0]
    return Path(out).name if t["kind"] not in ("imatrix_part", "eval_part") else f"{t['kind'].split('_')[0]} part {t['id'].rsplit('/', 1)[1]}"


def _table(st, title: str):
    from rich.table import Table

    tb = Table(title=title, title_justify="left")
    for c in ("model", "file", "state", "worker", "time", "note"):
        tb.add_column(c, justify="right" if c == "time" else "left")
    for t in st.tasks:
        s = st.state[t["id"]]
        i = st.info.get(t["id"], {})
        secs = f"{i['seconds']:.1f} s" if isinstance(i.get("seconds"), (int, float)) else ""
        note = i.get("error") or (f"attempt {i['attempt']}" if i.get("attempt", 1) > 1 else "")
        tb.add_row(t["model"], _label(t), f"[{_STYLE.get(s, '')}]{s}[/]", str(i.get("worker") or ""), secs, note or "")
    return tb


class _Display:
    """A rich live table on a terminal; plain lines otherwise (or nothing with --json)."""

    def __init__(self, live: bool, quiet: bool, title: str):
        self.live = None
        self.quiet = quiet
        self.title = title
        self.n = 0
        if live and not quiet:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)

    def __enter__(self):
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()

    def __call__(self, st, tid: str) -> None:
        if self.live is not None:
            self.live.update(_table(st, self.title))
            return
        if self.quiet:
            return
        s = st.state[tid]
        i = st.info.get(tid, {})
        extra = ""
        if s == "done":
            extra = f"  {i.get('seconds', 0):.1f} s on {i.get('worker')}" + (f" (attempt {i['attempt']})" if i.get("attempt", 1) > 1 else "")
        elif s in ("failed", "blocked"):
            extra = f"  {i.get('error')}"
        elif s == "running":
            if i.get("worker") == "local":
                return  # the line comes when a worker picks it up
            extra = f"  on {i.get('worker')}"
        finished = sum(1 for v in st.state.values() if v in ("done", "skipped", "failed", "blocked"))
        click.echo(f"[{finished}/{len(st.tasks)}] {s:<8} {tid}{extra}", err=True)


@click.group("farm")
def farm_cmd():
    """Make whole releases (every preset, imatrix, eval, card) of many models from a plan
    file, resumable after a crash, on this machine or a Ray cluster.  See docs/farm.md."""


@farm_cmd.command("run")
@click.argument("plan_file", metavar="PLAN.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Journal and partial results (default: <outdir>/.farm).")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool here; ray: Ray tasks (pip install 'gguf-moe[ray]').")  # fmt: skip
@click.option("--address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on loopback).")
@click.option("--workers", type=click.IntRange(min=1), help="Tasks at once (default: local: the CPU count; ray: the cluster's CPUs).")
@click.option("--no-space-check", is_flag=True, help="Do not stop when the plan's files exceed the free disk space.")
@click.option("--dry-run", is_flag=True, help="Print the tasks (what each needs, what is complete) and run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every task's state at the end.")
def run_cmd(plan_file, state_dir, executor, address, workers, no_space_check, dry_run, as_json):
    """Run PLAN.yaml: every model's imatrix (in chunk groups), quantized files, eval (in
    chunk groups), model card and manifest.json, skipping what an earlier run completed
    (journal + sha256) and redoing what changed.  Each file is byte-identical to the single
    command run by hand, however many workers and restarts it took."""
    from gguf_moe.farm.plan import load_plan
    from gguf_moe.farm.run import _complete, prepare, run_plan, space_needed

    if address and executor != "ray":
        raise click.UsageError("--address is for --executor ray")
    plan = load_plan(plan_file)
    tasks, journal = prepare(plan, state_dir, dry_run)
    complete = _complete(tasks, journal)
    if dry_run:
        if as_json:
            click.echo(json.dumps({"state": str(plan.state), "tasks": [
                {"task": t["id"], "deps": t["deps"], "outputs": t["outputs"], "memory": t["memory"],
                 "complete": t["id"] in complete} for t in tasks]}))  # fmt: skip
            return
        click.echo(f"plan: {plan.path} -> {plan.outdir} (state {plan.state}), {len(tasks)} tasks, {len(complete)} complete")
        for t in tasks:
            mark = "complete" if t["id"] in complete else "to do"
            deps = f" after {', '.join(d.split('/', 1)[1] for d in t['deps'])}" if t["deps"] else ""
            click.echo(f"  {t['id']:<40} {mark:<8} {t['memory'] / (1 << 20):>8.0f} MiB{deps}")
        return
    if not no_space_check:
        from gguf_moe.space import check_space

        check_space(space_needed(tasks, complete))
    from gguf_moe.farm.executors import make_executor

    ex = make_executor(executor, workers, address)
    title = f"farm {plan.path.name}: {ex.describe()}"
    if not as_json:
        click.echo(f"{title}; {len(tasks)} tasks, {len(complete)} complete from earlier runs", err=True)
    t0 = time.perf_counter()
    try:
        # stdout is for the --json object alone: what Ray prints about workers goes to stderr
        with contextlib.redirect_stdout(sys.stderr), _Display(sys.stderr.isatty(), as_json, title) as show:
            st = run_plan(plan, tasks, journal, ex, on_change=show)
    except KeyboardInterrupt:
        raise GgufMoeError("interrupted; what completed is in the journal: run the same command again to resume") from None
    secs = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(st.to_dict({"state": str(plan.state), "outdir": str(plan.outdir), "ok": st.ok,
                                          "seconds": round(secs, 3)})))  # fmt: skip
    if not st.ok:
        bad = [t for t in tasks if st.state[t["id"]] == "failed"]
        first = st.info[bad[0]["id"]]["error"] if bad else "incomplete"
        raise GgufMoeError(f"{len(bad)} task(s) failed; first: {bad[0]['id'] if bad else ''}: {first}")
    if not as_json:
        click.echo(f"done in {secs:.1f} s: {plan.outdir}", err=True)


@farm_cmd.command("status")
@click.argument("state_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every task's state.")
def status_cmd(state_dir, as_json):
    """Show what the journal in DIR (a --state folder, or an outdir with .farm/) records:
    every task's state, worker and time, and failures with their reason."""
    from gguf_moe.farm.run import status_of

    if not (state_dir / "tasks.json").is_file() and (state_dir / ".farm" / "tasks.json").is_file():
        state_dir = state_dir / ".farm"
    meta, st = status_of(state_dir)
    if as_json:
        click.echo(json.dumps(st.to_dict({"state": str(state_dir), "plan": meta.get("plan"), "outdir": meta.get("outdir")})))
        return
    from rich.console import Console

    Console().print(_table(st, f"farm {meta.get('plan')}"))
    counts = st.to_dict()["counts"]
    click.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
