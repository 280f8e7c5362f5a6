"""The ``validate`` and ``inspect`` commands: rendering of :mod:`gguf_moe.validate`'s
reports and ``inspect_file``'s dictionaries as rich tables or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gguf_moe.errors import GgufMoeError
from gguf_moe.validate import Report, inspect_file, validate_file

__all__ = ["validate_cmd", "inspect_cmd"]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _print_report(con, rep: Report, deep: bool) -> None:
    from rich.table import Table

    s = rep.summary
    status = "[bold green]OK[/]" if rep.ok else "[bold red]FAILED[/]"
    bits = ", ".join(f"{k} {s[k]}" for k in ("arch", "file_type", "n_tensors", "n_layer", "n_expert") if s.get(k) is not None)
    con.print(f"{status} {rep.path}" + (f" ({bits})" if bits else "")
              + f": {len(rep.errors)} errors, {len(rep.warnings)} warnings")
    if s.get("routing"):
        con.print(f"routing in llama.cpp: {s['routing']}")
    if rep.findings:
        tab = Table(show_lines=False, expand=False)
        for col in ("severity", "check", "tensor", "message"):
            tab.add_column(col, overflow="fold")
        for f in rep.findings:
            msg = f.message
            if f.expected is not None or f.found is not None:
                msg += f" [dim](expected {f.expected}, found {f.found})[/]"
            tab.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f.check, f.tensor or "", msg)
        con.print(tab)
    stats = {n: st for n, st in rep.tensors.items() if "rms" in st or "source" in st}
    if not stats:
        return

    def num(st, k):
        v = st.get(k)
        return f"{v:.4g}" if isinstance(v, (int, float)) else ""

    def vs_source(st):
        src = st.get("source") or {}
        if "rel_rms" in src:
            return f"{src['rel_rms']:.3g} (bound {src['bound']:.3g})" if src.get("bound") else f"{src['rel_rms']:.3g}"
        if "exact" in src:
            return "exact" if src["exact"] else f"{src['mismatches']} mismatches"
        return ""

    columns = {"tensor": lambda n, st: n, "type": lambda n, st: st.get("type", "")}
    columns |= {k: (lambda n, st, k=k: num(st, k)) for k in ("min", "max", "mean", "std")}
    columns["vs source"] = lambda n, st: vs_source(st)
    rows = [[f(n, st) for f in columns.values()] for n, st in stats.items()]
    keep = [i for i, col in enumerate(columns) if any(r[i] for r in rows)]  # drop empty columns
    tab = Table(title="per-tensor results", expand=False)
    for i in keep:
        tab.add_column(list(columns)[i], overflow="fold")
    for r in rows:
        tab.add_row(*(r[i] for i in keep))
    con.print(tab)


@click.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--deep", is_flag=True, help="Dequantize every tensor: finiteness, statistics, duplicated experts.")
@click.option("--source", "source", type=click.Path(exists=True, file_okay=False),
              help="Hugging Face model directory the file was made from: compare every tensor with it.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
def validate_cmd(files, deep, source, as_json):
    """Check GGUF files: structure, metadata, MoE layout, numerics (exit status 1 on any error).
    A split set (given its first shard, or all its shards) is checked as one model, with its
    shards: missing, truncated or foreign ones are errors."""
    from gguf_moe.split import first_shard

    reports = []
    show = sys.stderr.isatty() and not as_json
    # the shards of a split set given one by one are checked once, as a set
    files = list(dict.fromkeys(str(first_shard(Path(f))) for f in files))
    for f in files:
        if show:
            from rich.progress import Progress

            with Progress(transient=True, console=_console(stderr=True)) as prog:
                task = prog.add_task(f"validating {Path(f).name}", total=None)
                rep = validate_file(f, deep=deep, source=source,
                                    progress=lambda stage, name: prog.update(task, description=f"{stage}: {name}"))
        else:
            rep = validate_file(f, deep=deep, source=source)
        reports.append(rep)
    ok = all(r.ok for r in reports)
    if as_json:
        click.echo(json.dumps({"ok": ok, "files": [r.to_dict() for r in reports]}, indent=2))
    else:
        con = _console()
        for r in reports:
            _print_report(con, r, deep)
    if not ok:
        raise SystemExit(1)


@click.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(file, as_json):
    """Show a GGUF file's metadata, tensors, type mix and bits per weight.  A split set
    (given any of its shards) is shown whole, with a table of its shards."""
    try:
        info = inspect_file(file)
    except GgufMoeError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    con = _console()
    tot = info["totals"]
    bpw = tot["bits_per_weight"]
    con.print(f"[bold]{info['path']}[/]: GGUF v{info['version']}, {info['file_size']:,} bytes, "
              f"{tot['n_tensors']} tensors, {tot['n_elements']:,} weights, "
              + (f"{bpw:.3f} bits per weight" if bpw else "no weights"))
    if info.get("routing"):
        con.print(f"routing in llama.cpp: {info['routing']}")
    from rich.text import Text

    # keys are never wrapped; values are shortened to the room left (one line each)
    key_w = max((len(e["key"]) for e in info["kv"]), default=3)
    type_w = max((len(e["type"]) for e in info["kv"]), default=4)
    val_w = max(16, con.width - key_w - type_w - 10)
    kv = Table(title="metadata", expand=False)
    kv.add_column("key", no_wrap=True, min_width=key_w)
    kv.add_column("type", no_wrap=True, min_width=type_w)
    kv.add_column("value", no_wrap=True, overflow="ellipsis", max_width=val_w)
    for e in info["kv"]:
        v = e["value"]
        if isinstance(v, dict) and "length" in v:
            v = f"[{v['length']} items] " + ", ".join(repr(x) for x in v["head"]) + (", ..." if v["length"] > 5 else "")
        else:
            v = repr(v) if isinstance(v, str) else str(v)
        v = " ".join(v.split())  # one line: newlines of chat templates and the like
        if len(v) > val_w:
            v = v[: val_w - 1] + "\u2026"
        kv.add_row(Text(e["key"]), Text(e["type"]), Text(v))
    con.print(kv)
    if "shards" in info:
        st = Table(title="split set", expand=False)
        for col in ("shard", "file", "tensors", "bytes"):
            st.add_column(col, no_wrap=col != "file", overflow="fold")
        for i, sh in enumerate(info["shards"], start=1):
            st.add_row(str(i), Text(Path(sh["path"]).name), str(sh["n_tensors"]), f"{sh['file_size']:,}")
        con.print(st)
    tt = Table(title="tensors", expand=False)
    cols = ("name", "ne", "type", "bytes", "offset") + (("shard",) if "shards" in info else ())
    for col in cols:
        tt.add_column(col, no_wrap=col != "ne", overflow="fold")
    for t in info["tensors"]:
        row = [Text(t["name"]), ", ".join(str(d) for d in t["ne"]), t["type"], f"{t['n_bytes']:,}", f"{t['offset']:,}"]
        tt.add_row(*row, *((str(t["shard"]),) if "shard" in t else ()))
    con.print(tt)
    ht = Table(title="types", expand=False)
    for col in ("type", "tensors", "weights", "bytes", "bits/weight"):
        ht.add_column(col)
    for name, e in sorted(info["types"].items(), key=lambda kv: -kv[1]["n_bytes"]):
        b = 8.0 * e["n_bytes"] / e["n_elements"] if e["n_elements"] else 0.0
        ht.add_row(name, str(e["count"]), f"{e['n_elements']:,}", f"{e['n_bytes']:,}", f"{b:.3f}")
    con.print(ht)
