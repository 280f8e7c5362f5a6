"""``gguf-moe imatrix`` and ``gguf-moe eval``: commands that run the source model in torch."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

__all__ = ["imatrix_cmd", "eval_cmd"]


def _device_option(f):
    return click.option(
        "--device",
        type=click.Choice(["cpu", "cuda"]),
        help="Where torch runs the model (default: cuda when torch sees one, else cpu).",
    )(f)


def _text_options(f):
    f = click.option("--chunks", type=click.IntRange(min=1), help="Use at most N chunks of the text (default: all).")(f)
    f = click.option("--ctx", type=click.IntRange(min=16), default=512, show_default=True, help="Chunk length in tokens.")(f)
    return click.option(
        "-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False, path_type=Path), help="UTF-8 text file."
    )(f)


@contextlib.contextmanager
def _layer_progress(show: bool, label: str):
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                 console=Console(stderr=True), transient=True)  # fmt: skip
    task = p.add_task(label, total=None)
    p.start()
    try:
        yield lambda done, total: p.update(task, completed=done, total=total)
    finally:
        p.stop()


def _expert_table(expert_tokens: list[list[int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    n_exp = max(len(r) for r in expert_tokens)
    t = Table(title="tokens routed per expert", title_justify="left")
    t.add_column("layer", justify="right")
    for e in range(n_exp):
        t.add_column(f"e{e}", justify="right")
    for L, row in enumerate(expert_tokens):
        t.add_row(str(L), *[("[bold red]0[/]" if c == 0 else str(c)) for c in row])
    Console().print(t)


# --------------------------------------------------------------------------- imatrix


@click.command("imatrix")
@click.argument("src_dir", type=click.Path(file_okay=False, path_type=Path))
@_text_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output imatrix (GGUF).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: torch's).")
@_device_option
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix's --process-output).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (counts per layer and expert) instead of tables.")
def imatrix_cmd(src_dir, text_file, ctx, chunks, output, threads, device, process_output, as_json):
    """Compute llama-imatrix's importance matrix for the Hugging Face model in SRC_DIR from
    the text -f TEXT, running the model layer by layer in torch (one layer in memory), and
    write it as llama.cpp's GGUF imatrix OUTPUT (for convert/quantize --imatrix and
    llama-quantize).  Reports how many tokens each expert received and warns about
    experts that received none."""
    from gguf_moe.calibrate import compute_imatrix
    from gguf_moe.imatrix import write_imatrix

    with _layer_progress(sys.stderr.isatty() and not as_json, "imatrix") as prog:
        res = compute_imatrix(src_dir, text_file, ctx=ctx, chunks=chunks, threads=threads, device=device,
                              process_output=process_output, on_progress=prog)  # fmt: skip
    write_imatrix(output, res.entries, datasets=[str(text_file)], chunk_count=res.chunk_count, chunk_size=res.chunk_size)
    for L, e in res.unrouted:
        click.echo(f"warning: layer {L} expert {e} received no tokens (its imatrix entries are empty)", err=True)
    if as_json:
        click.echo(json.dumps({
            "output": str(output),
            "chunks": res.chunk_count,
            "chunk_size": res.chunk_size,
            "tokens": res.n_tokens,
            "entries": len(res.entries),
            "seconds": round(res.seconds, 3),
            "expert_tokens": res.expert_tokens,
            "unrouted": [{"layer": L, "expert": e} for L, e in res.unrouted],
        }))  # fmt: skip
        return
    if res.expert_tokens:
        _expert_table(res.expert_tokens)
    click.echo(
        f"wrote {output} ({len(res.entries)} entries, {res.chunk_count} chunks of {res.chunk_size} tokens, "
        f"{res.seconds:.1f} s)"
    )


# --------------------------------------------------------------------------- eval


@click.command("eval")
@click.argument("src_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_text_options
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: torch's).")
@_device_option
@click.option(
    "--round-activations/--exact-activations",
    default=True,
    show_default=True,
    help="Round each product's activations as llama.cpp's CPU backend does (Q8_0/Q8_K by weight type), "
    "or keep them float32 (the ideal-arithmetic figure).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def eval_cmd(src_dir, files, text_file, ctx, chunks, threads, device, round_activations, as_json):
    """Score GGUF FILES made from the Hugging Face model in SRC_DIR on the text -f TEXT, as
    llama-perplexity --kl-divergence would: perplexity, KL divergence from the source
    (mean, 99th percentile) and top-1 agreement, plus the source's own perplexity.  The
    source and every file run layer by layer in torch (one layer per model in memory).  A
    llama-gguf-split set counts as one file (give its first shard, any shard or all)."""
    from gguf_moe.evaluate import evaluate
    from gguf_moe.split import first_shard

    files = list(dict.fromkeys(first_shard(f) for f in files))  # a split set, given shard by shard, once
    with _layer_progress(sys.stderr.isatty() and not as_json, "eval") as prog:
        res = evaluate(src_dir, list(files), text_file, ctx=ctx, chunks=chunks, threads=threads, device=device,
                       round_activations=round_activations, on_progress=prog)  # fmt: skip
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res.tokens} scored tokens, source perplexity {res.source_ppl:.4f}", title_justify="left")
    for col in ("file", "type", "size", "bpw", "ppl", "Δppl", "KLD mean", "KLD p99", "top-1"):
        t.add_column(col, justify="left" if col in ("file", "type") else "right")
    for f in res.files:
        t.add_row(
            Path(f.file).name, f.type, f"{f.bytes / (1 << 20):.1f} MiB", f"{f.bpw:.2f}", f"{f.ppl:.4f}",
            f"{100 * (f.ppl / res.source_ppl - 1):+.2f}%", f"{f.kld_mean:.6f}", f"{f.kld_p99:.6f}", f"{100 * f.top1:.2f}%",
        )  # fmt: skip
    Console().print(t)
