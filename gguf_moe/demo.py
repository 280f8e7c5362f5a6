"""``gguf-moe demo``: build a small mergekit-style MoE, convert it in one pass to several
types, validate every file against the source and print a table."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from gguf_moe.errors import GgufMoeError

__all__ = ["run_demo", "DEMO_TYPES", "DEMO_MODEL"]

DEMO_TYPES = ("IQ4_XS", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q8_0", "BF16")
DEMO_MODEL = "tiny-frankenmoe"


def _dup_expert_identical(rep, names: list[str], n_expert: int) -> bool:
    """Is the duplicated expert (last = copy of expert 0) stored with identical bytes in
    every expert tensor?  Read from the deep validation's ``identical_experts``."""
    for name in names:
        groups = rep.tensors.get(name, {}).get("identical_experts", [])
        if not any(0 in g and n_expert - 1 in g for g in groups):
            return False
    return True


def run_demo(outdir: str | Path, *, backend: str | None = None, quiet: bool = False, progress=None) -> list[dict]:
    """Run the demo in ``outdir`` (its own files there are rebuilt each run); returns one
    row per output and raises GgufMoeError if any file fails validation."""
    from rich.console import Console
    from rich.table import Table

    from gguf_moe.convert import convert, output_name, plan_outputs
    from gguf_moe.source import open_model
    from gguf_moe.synth import make_model
    from gguf_moe.validate import validate_file

    err = Console(stderr=True, quiet=quiet)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    src = out / DEMO_MODEL
    if src.exists():
        shutil.rmtree(src)
    err.print(f"building {src} (4 experts, top-2, expert 3 = expert 0; fused layout)")
    make_model(
        src, layout="fused", n_layer=4, hidden=512, ff=1024, n_head=8, n_kv_head=4,
        n_expert=4, top_k=2, duplicate_expert=True, shards=2, seed=0,
    )  # fmt: skip

    with open_model(src) as model:
        paths = [out / output_name(model.name, t) for t in DEMO_TYPES]
        plans = plan_outputs(model, DEMO_TYPES, paths)
        err.print(f"converting to {', '.join(DEMO_TYPES)} in one pass")
        t0 = time.perf_counter()
        convert(model, plans, force=True, backend=backend, progress=progress)
        seconds = time.perf_counter() - t0
        n_expert = model.n_expert

    rows = []
    for plan in plans:
        err.print(f"validating {plan.path.name} against the source")
        rep = validate_file(plan.path, deep=True, source=src)
        ok = rep.ok
        n_cmp = rep.summary.get("source_tensors_compared", 0)
        if ok:
            result = f"ok: {n_cmp} tensors match source" + (f", {len(rep.warnings)} warnings" if rep.warnings else "")
        else:
            first = rep.errors[0]
            result = f"FAILED: {len(rep.errors)} errors; first: {first.tensor or ''} {first.message}".strip()
        exps = [t.name for t in plan.tensors if t.name.endswith("_exps.weight")]
        rows.append(
            {
                "file": str(plan.path),
                "type": plan.preset.name,
                "size": plan.path.stat().st_size,
                "bpw": plan.bits_per_weight,
                "validation": result,
                "ok": ok,
                "dup_identical": _dup_expert_identical(rep, exps, n_expert),
            }
        )

    table = Table(title=f"gguf-moe demo: {DEMO_MODEL} -> {len(plans)} files in one pass ({seconds:.1f} s)")
    for col, kw in (
        ("file", {"no_wrap": True}),
        ("type", {"no_wrap": True}),
        ("size", {"justify": "right", "no_wrap": True}),
        ("bpw", {"justify": "right", "no_wrap": True}),
        ("dup. expert", {"no_wrap": True}),
        ("validation", {}),
    ):
        table.add_column(col, **kw)
    for r in rows:
        table.add_row(
            Path(r["file"]).name,
            r["type"],
            f"{r['size'] / 2**20:.2f} MiB",
            f"{r['bpw']:.2f}",
            "same bytes" if r["dup_identical"] else "differs",
            ("[green]" if r["ok"] else "[red]") + r["validation"],
        )
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)
    _write_card(out, src, plans, err)
    bad = [Path(r["file"]).name for r in rows if not r["ok"]]
    if bad:
        raise GgufMoeError(f"validation failed for {', '.join(bad)}; run `gguf-moe validate --deep` on them for details")
    return rows


def _write_card(out: Path, src: Path, plans, err) -> None:
    """The model card ``convert --outdir`` would write, next to the demo's files."""
    from gguf_moe.card import CardFile, render_card, write_card
    from gguf_moe.metadata import load_recipe

    files = [CardFile(p.preset.name, [p.path], p.bits_per_weight) for p in plans]
    text = render_card(name=DEMO_MODEL, base_model=DEMO_MODEL, base_is_repo=False, recipe=load_recipe(src), files=files)
    try:
        path = write_card(out, text)
    except GgufMoeError as e:  # a README.md of the user's own is kept
        err.print(f"no model card: {e}")
        return
    err.print(f"model card for publishing: {path}")
