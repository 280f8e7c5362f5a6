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


def _ggml_type_callback(ctx, param, value):
    """A ggml type name (llama-quantize's spelling, any case) that gguf-moe can write."""
    if value is None:
        return None
    import quant
    from gguf_moe.presets import parse_ggml_type

    try:
        t = parse_ggml_type(value)
    except GgufMoeError as e:
        raise click.BadParameter(str(e)) from None
    if t.name not in quant.QTYPES:
        raise click.BadParameter(f"{t.name}: this version of gguf-moe has no {t.name} quantizer")
    return t


def _tensor_types(values) -> list:
    out = []
    for v in values:
        from gguf_moe.presets import parse_tensor_type

        try:
            pattern, t = parse_tensor_type(v)
        except GgufMoeError as e:
            raise click.BadParameter(str(e), param_hint="'--tensor-type'") from None
        out.append((pattern, _ggml_type_callback(None, None, t.name)))
    return out


def _tensor_type_callback(ctx, param, value):
    return _tensor_types(value)


def _tensor_type_file_callback(ctx, param, value):
    """llama-quantize's ``--tensor-type-file``: PATTERN=TYPE items separated by whitespace."""
    if value is None:
        return []
    try:
        text = value.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {value}: {e}") from None
    return _tensor_types(text.split())


def _prune_callback(ctx, param, value):
    """llama-quantize's ``--prune-layers``: comma-separated non-negative layer numbers (read
    like C's stoi), sorted, duplicates dropped."""
    if value is None:
        return ()
    import re

    out = set()
    for item in value.split(","):
        m = re.match(r"[ \t\n\v\f\r]*[+-]?[0-9]+", item)
        if m is None or int(m.group(0)) < 0:
            raise click.BadParameter(f"invalid layer id {item!r}")
        out.add(int(m.group(0)))
    return tuple(sorted(out))


def _kv_override_callback(ctx, param, value):
    from gguf_moe.options import parse_kv_override

    try:
        return tuple(parse_kv_override(v) for v in value)
    except GgufMoeError as e:
        raise click.BadParameter(str(e)) from None


def _override_options(f):
    """llama-quantize's per-tensor type options, shared by ``convert`` and ``quantize``."""
    f = click.option(
        "--override-kv", metavar="KEY=TYPE:VALUE", multiple=True, callback=_kv_override_callback,
        help="Set a metadata key (TYPE: int, float, bool, str), as llama-quantize --override-kv; repeatable.",
    )(f)  # fmt: skip
    f = click.option(
        "--exclude-weights", metavar="NAME", multiple=True,
        help="Do not use the imatrix for tensors whose name contains NAME (repeatable).",
    )(f)  # fmt: skip
    f = click.option(
        "--include-weights", metavar="NAME", multiple=True,
        help="Use the imatrix only for tensors whose name contains NAME (repeatable).",
    )(f)  # fmt: skip
    f = click.option(
        "--leave-output-tensor", is_flag=True, help="Leave output.weight un(re)quantized (as in the source)."
    )(f)
    f = click.option(
        "--pure", is_flag=True, help="Disable the preset's mixture: every quantizable tensor gets its main type."
    )(f)
    f = click.option(
        "--token-embedding-type", metavar="TYPE", callback=_ggml_type_callback,
        help="ggml type for token_embd.weight (e.g. q8_0).",
    )(f)  # fmt: skip
    f = click.option(
        "--output-tensor-type", metavar="TYPE", callback=_ggml_type_callback,
        help="ggml type for output.weight (e.g. q8_0).",
    )(f)  # fmt: skip
    f = click.option(
        "--tensor-type-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
        callback=_tensor_type_file_callback, help="File of PATTERN=TYPE items separated by spaces or newlines.",
    )(f)  # fmt: skip
    return click.option(
        "--tensor-type", "tensor_type", metavar="PATTERN=TYPE", multiple=True, callback=_tensor_type_callback,
        help="Quantize tensors whose name matches the regular expression PATTERN to TYPE (e.g. attn_v=q8_0, "
        "'blk\\.[0-3]\\.ffn_down=q6_k'); repeatable, the first matching pattern wins.",
    )(f)  # fmt: skip


def _split_size_callback(ctx, param, value):
    if value is None:
        return None
    from gguf_moe.split import parse_split_size

    try:
        return parse_split_size(value)
    except GgufMoeError as e:
        raise click.BadParameter(str(e)) from None


def _card_eval_callback(ctx, param, value):
    if value is None:
        return None
    from gguf_moe.card import load_eval

    try:
        return load_eval(value)
    except GgufMoeError as e:
        raise click.BadParameter(str(e)) from None


def _publish_options(f):
    """``--split-max-size``, ``--split-max-tensors`` and ``--no-space-check``, shared by
    ``convert`` and ``quantize``."""
    f = click.option(
        "--no-space-check", is_flag=True,
        help="Do not stop before writing when the outputs' exact sizes exceed the free disk space.",
    )(f)  # fmt: skip
    f = click.option(
        "--split-max-tensors", type=click.IntRange(min=1), metavar="N",
        help="Write each output as a llama-gguf-split set of at most N tensors per file.",
    )(f)  # fmt: skip
    return click.option(
        "--split-max-size", metavar="SIZE", callback=_split_size_callback,
        help="Write each output as a llama-gguf-split set: at most SIZE of tensor data per file "
        "(500M, 50G: decimal units, as llama-gguf-split takes them). Files are <name>-00001-of-0000N.gguf.",
    )(f)  # fmt: skip


def _split_spec(max_size, max_tensors):
    if max_size is not None and max_tensors is not None:
        raise click.UsageError("give either --split-max-size or --split-max-tensors, not both")
    if max_size is None and max_tensors is None:
        return None
    from gguf_moe.split import SplitSpec

    return SplitSpec(max_bytes=max_size, max_tensors=max_tensors)


def _files_of(path: Path, split) -> list[Path]:
    """The files an output was written as (the shards of a split set)."""
    if split is None:
        return [path]
    from gguf_moe.split import shard_paths_of

    return shard_paths_of(path) or [path]


def _wrote(path: Path, split, what: str) -> None:
    files = _files_of(path, split)
    size = sum(p.stat().st_size for p in files)
    more = f" + {len(files) - 1} more shard{'s' if len(files) > 2 else ''}" if len(files) > 1 else ""
    click.echo(f"wrote {path}{more} ({what.format(size=_fmt_bytes(size))})")


def _print_split(plans, split, name: str) -> None:
    """For a dry run with --split-max-*: the shards each output would be written as."""
    if split is None:
        return
    from gguf_moe.convert import output_name
    from gguf_moe.split import assign_shards, shard_path

    for o in plans:
        click.echo("")
        try:
            groups = assign_shards([t.nbytes for t in o.tensors], split, [t.name for t in o.tensors])
        except GgufMoeError as e:
            click.echo(f"warning: a real run stops here: {e}", err=True)
            continue
        path = o.path if o.path is not None else Path(output_name(name, o.preset))
        click.echo(f"# {o.preset.name}: {len(groups)} files")
        for k, g in enumerate(groups):
            data = sum(-(-o.tensors[i].nbytes // 32) * 32 for i in g)
            span = f"tensors {g[0] + 1}-{g[-1] + 1}"
            click.echo(f"{shard_path(path, k, len(groups)).name}  {span:<16} {data:>14,} bytes of tensor data")


def _make_options(imatrix, ov: dict, **kw):
    """The ``Options`` of a command from its parsed parameters (``ov``: the override options)."""
    from gguf_moe.options import Options
    from gguf_moe.presets import TypeOverrides

    overrides = TypeOverrides(
        tensor_types=tuple(ov["tensor_type"]) + tuple(ov["tensor_type_file"]),
        output_tensor_type=ov["output_tensor_type"],
        token_embedding_type=ov["token_embedding_type"],
        pure=ov["pure"],
        leave_output_tensor=ov["leave_output_tensor"],
    )
    if ov["include_weights"] and ov["exclude_weights"]:
        raise click.UsageError("--include-weights and --exclude-weights cannot be used together")
    if (ov["include_weights"] or ov["exclude_weights"]) and imatrix is None:
        raise click.UsageError("--include-weights/--exclude-weights select entries of --imatrix; give --imatrix FILE")
    im = _load_imatrix(imatrix)
    if im is not None:
        im = im.select(ov["include_weights"], ov["exclude_weights"])
    return Options(imatrix=im, overrides=overrides, kv_overrides=ov["override_kv"], **kw)


def _warn(plans) -> None:
    for o in plans:
        for w in o.warnings:
            click.echo(f"warning: {o.preset.name}: {w}", err=True)


def _shape_str(shape) -> str:
    return "{" + ", ".join(str(d) for d in reversed(shape)) + "}"


def _print_plan(title: str, plans, imatrix=None) -> None:
    from gguf_moe.convert import check_imatrix

    click.echo(title)
    experts = (t for o in plans for t in o.tensors if len(t.shape) == 3 and t.shape[0] > 1)
    if any(t.ggml_type.name not in ("F32", "F16", "BF16") for t in experts):
        click.echo(
            "duplicated experts: found while writing (a dry run reads no tensor data); an expert slice identical "
            "to an earlier one of its tensor (same bytes, same importance weights) is copied, not encoded again"
        )
    for o in plans:
        click.echo("")
        click.echo(f"# {o.preset.name} -> {o.path if o.path is not None else '(no output path)'}")
        w = max(len(t.name) for t in o.tensors)
        for t in o.tensors:
            line = f"{t.name:<{w}}  {_shape_str(t.shape):<22} {t.ggml_type.name:<7} {t.nbytes:>12}"
            click.echo(f"{line}  ({t.note})" if t.note else line)
        padded = sum(-(-t.nbytes // 32) * 32 for t in o.tensors)
        click.echo(
            f"total {o.preset.name}: {len(o.tensors)} tensors, {o.data_bytes} bytes of tensor data "
            f"({_fmt_bytes(padded)} padded), {o.bits_per_weight:.2f} bits per weight"
        )
        try:
            check_imatrix(o, imatrix)
        except GgufMoeError as e:
            click.echo(f"warning: a real run stops here: {e}", err=True)


def _reuse_note(plan) -> str:
    """For the summary line: expert slices copied from an identical expert, if any."""
    n = plan.reused_experts
    return f"; {n} duplicated expert slice{'s' if n != 1 else ''} copied, not encoded again" if n else ""


# --------------------------------------------------------------------------- convert


@main.command()
@click.argument("src_dir", metavar="SRC", type=click.Path(file_okay=False, path_type=Path))
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
    help="Output directory; files are named <model-name>-<TYPE>.gguf, with a model card README.md.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, type, bytes; totals per output) and write nothing.")
@click.option("--pre-tokenizer", metavar="NAME", help="llama.cpp BPE pre-tokenizer name, when it cannot be recognized.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@_quant_options
@_override_options
@_publish_options
@click.option("--recipe/--no-recipe", default=True, help="Store the mergekit-moe recipe (moe.* and general.base_model.* keys).")
@click.option("--no-card", is_flag=True, help="With --outdir: do not write the model card <outdir>/README.md.")
@click.option(
    "--allow-routing-mismatch", is_flag=True,
    help="Write llama.cpp's file even where its expert routing differs from the source's (norm_topk_prob); "
    "the file records both (moe.routing.*).",
)
@click.option(
    "--card-eval", metavar="FILE.json", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    callback=_card_eval_callback, help="`gguf-moe eval --json` output: the card's table shows its figures.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary output.")
def convert(
    src_dir, types, output, outdir, dry_run, pre_tokenizer, force, threads, backend, imatrix, recipe, quiet,
    split_max_size, split_max_tensors, no_space_check, no_card, card_eval, allow_routing_mismatch, **ov,
):  # fmt: skip
    """Convert the Hugging Face model SRC to GGUF, one file per -t TYPE.

    SRC is a model directory or a Hugging Face repo id (org/name or org/name@revision),
    read from the local Hub cache and downloaded when missing (HF_HUB_OFFLINE=1: the cache
    alone); a local directory of that name wins.  With --outdir a model card README.md is
    written next to the files."""
    from gguf_moe.hub import open_source

    if output is not None and outdir is not None:
        raise click.UsageError("give either -o/--output or --outdir, not both")
    if output is not None and len(types) > 1:
        raise click.UsageError("-o/--output takes one -t; use --outdir for several output types")
    if output is None and outdir is None and not dry_run:
        raise click.UsageError("give -o OUT.gguf (one -t) or --outdir DIR")
    split = _split_spec(split_max_size, split_max_tensors)
    if card_eval is not None and (outdir is None or no_card):
        raise click.UsageError("--card-eval needs --outdir (and no --no-card): it fills the model card's table")
    with open_source(src_dir) as (model_dir, hub):
        _convert(model_dir, hub, types, output, outdir, dry_run, pre_tokenizer, force, threads, backend, imatrix,
                 recipe, quiet, split, no_space_check, no_card, card_eval, ov, allow_routing_mismatch)  # fmt: skip


def _convert(src_dir, hub, types, output, outdir, dry_run, pre_tokenizer, force, threads, backend, imatrix, recipe,
             quiet, split, no_space_check, no_card, card_eval, ov, allow_routing_mismatch=False):  # fmt: skip
    from gguf_moe import convert as conv
    from gguf_moe.source import open_model

    opts = _make_options(
        imatrix, ov, force=force, backend=backend, threads=threads, pre_tokenizer=pre_tokenizer, recipe=recipe,
        split=split, space_check=not no_space_check,
    )  # fmt: skip
    model = open_model(src_dir)
    try:
        routing_warning = model.check_routing(allow_routing_mismatch)
        if routing_warning:
            click.echo(f"warning: {routing_warning}", err=True)
        if output is not None:
            paths = [output]
        elif outdir is not None:
            paths = [outdir / conv.output_name(model.name, p) for p in types]
        else:
            paths = [None] * len(types)
        plans = conv.plan_outputs(model, types, paths, opts)
        _warn(plans)
        if dry_run:
            m = model
            _print_plan(f"model: {m.path} ({m.hf_arch}, {m.layout} layout, {len(m.tensors)} tensors; llama.cpp {m.arch}, "
                        f"routing {m.routing.file})", plans, opts.imatrix)  # fmt: skip
            _print_split(plans, split, model.name)
            return
        for o in plans:  # before any directory or file is made
            conv.check_imatrix(o, opts.imatrix)
        card = outdir is not None and not no_card
        if card:
            from gguf_moe.card import check_card_free

            check_card_free(outdir, force)
        if outdir is not None:
            outdir.mkdir(parents=True, exist_ok=True)
        with _progress(quiet, "convert") as prog:
            opts.progress = prog
            written = conv.convert(model, plans, opts)
        if not quiet:
            for o, path in zip(plans, written):
                _wrote(path, split, f"{o.preset.name}, {{size}}, {o.bits_per_weight:.2f} bpw{_reuse_note(o)}")
        if card:
            path = _write_card(model, hub, plans, written, split, outdir, force, card_eval)
            if not quiet:
                click.echo(f"wrote {path} (model card)")
    finally:
        model.close()


def _write_card(model, hub, plans, written, split, outdir: Path, force: bool, evaluation: dict | None) -> Path:
    from gguf_moe.card import CardFile, eval_figures, render_card, source_license, write_card
    from gguf_moe.metadata import load_recipe

    files = [CardFile(o.preset.name, _files_of(p, split), o.bits_per_weight) for o, p in zip(plans, written)]
    if evaluation is not None:
        for f in files:
            f.figures = eval_figures(evaluation, f)
    text = render_card(
        name=model.name,
        base_model=hub.repo_id if hub is not None else model.name,
        base_is_repo=hub is not None,
        recipe=load_recipe(model.path),
        files=files,
        license=source_license(model.path),
        evaluated_tokens=(evaluation or {}).get("tokens"),
    )
    return write_card(outdir, text, force=force)


# --------------------------------------------------------------------------- quantize


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("type_", metavar="TYPE", callback=_type_callback)
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, type, bytes; totals) and write nothing.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option(
    "--allow-requantize", is_flag=True,
    help="Quantize tensors that are already quantized (loses quality; as llama-quantize --allow-requantize).",
)  # fmt: skip
@click.option(
    "--prune-layers", metavar="L0,L1,...", callback=_prune_callback,
    help="Leave these layers out and renumber the others (as llama-quantize --prune-layers).",
)  # fmt: skip
@_quant_options
@_override_options
@_publish_options
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary output.")
def quantize(src, dst, type_, dry_run, force, allow_requantize, prune_layers, threads, backend, imatrix, quiet, split_max_size,
             split_max_tensors, no_space_check, **ov):  # fmt: skip
    """Quantize an F32/F16/BF16 GGUF file SRC to TYPE, as llama-quantize does.  SRC may be a
    split set (its first shard, or any shard)."""
    from gguf_moe import quantize as qz
    from gguf_moe.writer import check_output_free

    split = _split_spec(split_max_size, split_max_tensors)
    opts = _make_options(
        imatrix, ov, force=force, backend=backend, threads=threads, split=split, space_check=not no_space_check,
        allow_requantize=allow_requantize, prune_layers=prune_layers,
    )  # fmt: skip
    if not dry_run and split is None:
        check_output_free(dst, force)
    plan = qz.plan_quantize(src, type_, None if dry_run else dst, opts)
    _warn([plan])
    if dry_run:
        _print_plan(
            f"input: {src} ({plan.arch}, {len(plan.tensors)} tensors)", [plan],
            qz._renamed_imatrix(opts.imatrix, plan.renamed),
        )  # fmt: skip
        _print_split([plan], split, Path(dst).stem)
        return
    with _progress(quiet, "quantize") as prog:
        opts.progress = prog
        out = qz.write_quantize(plan, opts)
    if not quiet:
        _wrote(out, split, f"{type_.name}, {{size}}, {plan.bits_per_weight:.2f} bpw{_reuse_note(plan)}")


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
from gguf_moe.validate_cli import inspect_cmd, validate_cmd  # noqa: E402

main.add_command(validate_cmd, "validate")
main.add_command(inspect_cmd, "inspect")

# ``imatrix`` and ``eval`` run the model in torch; defined in gguf_moe.quality_cli.
from gguf_moe.quality_cli import eval_cmd, imatrix_cmd  # noqa: E402

main.add_command(imatrix_cmd, "imatrix")
main.add_command(eval_cmd, "eval")

# ``farm run`` and ``farm status``: whole releases from a plan file; defined in gguf_moe.farm.
from gguf_moe.farm.cli import farm_cmd  # noqa: E402

main.add_command(farm_cmd, "farm")
