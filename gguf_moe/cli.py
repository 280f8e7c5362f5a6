"""The ``gguf-moe`` command line (click + rich).

Exit status: 0 success, 1 failure (one ``error: ...`` line on stderr, no traceback),
2 usage error (click's).  Progress bars go to stderr, only when it is a terminal.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from gguf_moe import __version__
from gguf_moe.errors import GgufMoeError, QuantError

__all__ = ["main"]


class _Failure(click.ClickException):
    """A library error shown as one ``error: ...`` line, exit status 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        msg = " ".join(str(self.message).split("\n")).strip()
        click.echo(f"error: {msg}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (GgufMoeError, QuantError) as e:
            raise _Failure(str(e)) from None
        except KeyboardInterrupt:
            raise _Failure("interrupted; partial output files were removed") from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise _Failure(f"{where}{e.strerror or e}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gguf-moe")
def main() -> None:
    """Convert merged Mixture-of-Experts models (mergekit-moe, Mixtral-style) to llama.cpp
    GGUF and quantize them, byte-identical to llama-quantize, in one streaming pass."""


# --------------------------------------------------------------------------- helpers


def _types_callback(ctx, param, value):
    from gguf_moe.presets import get_preset

    out = []
    for v in value:
        try:
            p = get_preset(v)
        except GgufMoeError as e:
            raise click.BadParameter(str(e)) from None
        if p not in out:
            out.append(p)
    return out


def _type_callback(ctx, param, value):
    return _types_callback(ctx, param, [value])[0]


def _backend_callback(ctx, param, value):
    if value is None:
        return None
    import quant

    avail = quant.available_backends()
    bases = {a.split(":")[0] for a in avail}
    if value not in avail and value not in bases:
        raise click.BadParameter(f"{value!r} is not available here; available: {', '.join(avail)}")
    return value


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


class _RichProgress:
    """Per-tensor progress on stderr: current tensor, source bytes done, speed, ETA."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.label = label
        self.p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = None
        self.n = 0

    def start(self, total_bytes: int, n_tensors: int) -> None:
        self.n = n_tensors
        self.p.start()
        self.task = self.p.add_task(self.label, total=total_bytes)

    def tensor(self, name: str, index: int) -> None:
        self.p.update(self.task, description=f"{self.label} [{index + 1}/{self.n}] {name}")

    def advance(self, nbytes: int) -> None:
        self.p.advance(self.task, nbytes)

    def finish(self) -> None:
        self.p.stop()

    stop = finish  # rich's Progress.stop may be called again


@contextlib.contextmanager
def _progress(quiet: bool, label: str):
    """A progress display on stderr (None when quiet or stderr is not a terminal),
    stopped however the block ends."""
    prog = None if quiet or not sys.stderr.isatty() else _RichProgress(label)
    try:
        yield prog
    finally:
        if prog is not None:
            prog.stop()


def _quant_options(f):
    """``--threads``, ``--backend`` and ``--imatrix``, shared by ``convert`` and ``quantize``."""
    f = click.option(
        "--imatrix",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Importance matrix from llama-imatrix (GGUF or legacy .dat), used as llama-quantize uses it.",
    )(f)
    f = click.option(
        "--backend", callback=_backend_callback, help="Quantization backend: numpy, numba, torch, torch:cpu, torch:cuda."
    )(f)
    return click.option("--threads", type=click.IntRange(min=1), help="Quantization threads (default: all cores).")(f)


def _load_imatrix(path: Path | None):
    if path is None:
        return None
    from gguf_moe.imatrix import load_imatrix

    return load_imatrix(path)


def _shape_str(shape) -> str:
    return "{" + ", ".join(str(d) for d in reversed(shape)) + "}"


def _print_plan(model, plans) -> None:
    click.echo(f"model: {model.path} ({model.hf_arch}, {model.layout} layout, {len(model.tensors)} tensors)")
    for o in plans:
        click.echo("")
        click.echo(f"# {o.preset.name} -> {o.path if o.path is not None else '(no output path)'}")
        w = max(len(t.name) for t in o.tensors)
        for t in o.tensors:
            click.echo(f"{t.name:<{w}}  {_shape_str(t.shape):<22} {t.ggml_type.name:<5} {t.nbytes:>12}")
        padded = sum(-(-t.nbytes // 32) * 32 for t in o.tensors)
        click.echo(
            f"total {o.preset.name}: {len(o.tensors)} tensors, {o.data_bytes} bytes of tensor data "
            f"({_fmt_bytes(padded)} padded), {o.bits_per_weight:.2f} bits per weight"
        )


# --------------------------------------------------------------------------- convert


@main.command()
@click.argument("src_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-t",
    "--type",
    "types",
    multiple=True,
    required=True,
    callback=_types_callback,
    help="Output type in llama.cpp spelling (Q4_K_M, Q5_K_M, Q8_0, BF16, ...), case-insensitive. "
    "Repeat for several outputs written in one pass.",
)
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), help="Output file (only with one -t).")
@click.option(
    "--outdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory; files are named <model-name>-<TYPE>.gguf.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, type, bytes; totals per output) and write nothing.")
@click.option("--pre-tokenizer", metavar="NAME", help="llama.cpp BPE pre-tokenizer name, when it cannot be recognized.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@_quant_options
@click.option("--recipe/--no-recipe", default=True, help="Store the mergekit-moe recipe (moe.* and general.base_model.* keys).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary output.")
def convert(src_dir, types, output, outdir, dry_run, pre_tokenizer, force, threads, backend, imatrix, recipe, quiet):
    """Convert the Hugging Face model in SRC_DIR to GGUF, one file per -t TYPE."""
    from gguf_moe import convert as conv
    from gguf_moe.source import open_model

    if output is not None and outdir is not None:
        raise click.UsageError("give either -o/--output or --outdir, not both")
    if output is not None and len(types) > 1:
        raise click.UsageError("-o/--output takes one -t; use --outdir for several output types")
    if output is None and outdir is None and not dry_run:
        raise click.UsageError("give -o OUT.gguf (one -t) or --outdir DIR")
    im = _load_imatrix(imatrix)
    model = open_model(src_dir)
    try:
        if output is not None:
            paths = [output]
        elif outdir is not None:
            paths = [outdir / conv.output_name(model.name, p) for p in types]
        else:
            paths = [None] * len(types)
        plans = conv.plan_outputs(model, types, paths, has_imatrix=im is not None)
        if dry_run:
            _print_plan(model, plans)
            return
        if outdir is not None:
            outdir.mkdir(parents=True, exist_ok=True)
        with _progress(quiet, "convert") as prog:
            written = conv.convert(
                model, plans, force=force, pre_tokenizer=pre_tokenizer, recipe=recipe,
                backend=backend, threads=threads, progress=prog, imatrix=im,
            )  # fmt: skip
        if not quiet:
            for o, path in zip(plans, written):
                click.echo(f"wrote {path} ({o.preset.name}, {_fmt_bytes(path.stat().st_size)}, {o.bits_per_weight:.2f} bpw)")
    finally:
        model.close()


# --------------------------------------------------------------------------- quantize


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("type_", metavar="TYPE", callback=_type_callback)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@_quant_options
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary output.")
def quantize(src, dst, type_, force, threads, backend, imatrix, quiet):
    """Quantize an F32/F16/BF16 GGUF file SRC to TYPE, as llama-quantize does."""
    from gguf_moe.convert import requantize

    im = _load_imatrix(imatrix)
    with _progress(quiet, "quantize") as prog:
        out = requantize(src, dst, type_, force=force, backend=backend, threads=threads, progress=prog, imatrix=im)
    if not quiet:
        click.echo(f"wrote {out} ({type_.name}, {_fmt_bytes(out.stat().st_size)})")


# --------------------------------------------------------------------------- demo


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path), default="demo-out")
@click.option("--backend", callback=_backend_callback, help="Quantization backend.")
@click.option("-q", "--quiet", is_flag=True, help="Only the table.")
def demo(outdir, backend, quiet):
    """Build a small mergekit-style MoE in OUTDIR (4 experts, top-2, one duplicated; fused
    layout), convert it to Q4_K_M, Q5_K_M, Q8_0 and BF16 in one pass, validate every file
    against the source and print a table.  The demo's own files in OUTDIR are rebuilt."""
    from gguf_moe.demo import run_demo

    with _progress(quiet, "convert") as prog:
        run_demo(outdir, backend=backend, quiet=quiet, progress=prog)


# ``validate`` and ``inspect`` are defined in gguf_moe.validate.
from gguf_moe.validate import inspect_cmd, validate_cmd  # noqa: E402

main.add_command(validate_cmd, "validate")
main.add_command(inspect_cmd, "inspect")
