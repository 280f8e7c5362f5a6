"""The plan file of ``gguf-moe farm run``: YAML, read and checked before any work.

::

    outdir: releases            # one folder per model: <outdir>/<model-name>/
    defaults:
      presets: [Q8_0, Q4_K_M]
      imatrix: {text: calib.txt, ctx: 512, chunks: 100}
      eval: {text: eval.txt, ctx: 512, chunks: 50}
      split_max_size: 50G
      device: cpu               # imatrix/eval in torch: cpu (default) or cuda (one GPU per task)
    models:
      - source: path/to/merge   # or org/name[@revision]
        presets: [Q8_0, Q5_K_M] # any default may be overridden per model

Relative paths are taken from the plan file's folder.  Every problem (unknown key, unknown
preset, missing source or text, a text too short for its context) is one line naming the
plan file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gguf_moe.errors import GgufMoeError

__all__ = ["PlanError", "TextSpec", "ModelJob", "Plan", "load_plan"]

_TOP = ("outdir", "defaults", "models")
_SETTINGS = ("presets", "imatrix", "eval", "split_max_size", "device")
_MODEL = ("source",) + _SETTINGS
_TEXT = ("text", "ctx", "chunks")


class PlanError(GgufMoeError):
    """A plan file that cannot be run (the message names the file and line)."""


class _Map(dict):
    line = 0
    key_lines: dict = {}


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader, node):
    loader.flatten_mapping(node)
    m = _Map()
    m.line = node.start_mark.line + 1
    m.key_lines = {}
    for k_node, v_node in node.value:
        k = loader.construct_object(k_node, deep=True)
        m[k] = loader.construct_object(v_node, deep=True)
        m.key_lines[k] = k_node.start_mark.line + 1
    return m


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


@dataclass(frozen=True)
class TextSpec:
    """A text run through the model: imatrix or eval."""

    text: Path
    ctx: int = 512
    chunks: int | None = None


@dataclass
class ModelJob:
    """One model of the plan: where its files go and how they are made."""

    source: str  # a directory (absolute) or a Hub repo id
    name: str
    dir: Path
    presets: list  # presets.Preset
    imatrix: TextSpec | None = None
    eval: TextSpec | None = None
    split_max_size: int | None = None
    device: str = "cpu"
    line: int = 0
    #: filled by ``tasks.expand``: chunk count and groups per text
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    path: Path
    outdir: Path
    models: list[ModelJob]
    #: the state folder (journal, partial results); ``<outdir>/.farm`` unless given
    state: Path | None = None


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}" if line else str(path)


def _check_keys(path: Path, m: Any, known: tuple[str, ...], what: str) -> None:
    if not isinstance(m, dict):
        raise PlanError(f"{_where(path, getattr(m, 'line', 0))}: {what} must be a mapping")
    for k in m:
        if k not in known:
            line = getattr(m, "key_lines", {}).get(k, getattr(m, "line", 0))
            raise PlanError(f"{_where(path, line)}: unknown key {k!r} in {what} (known: {', '.join(known)})")


def _line(m: Any, key: str | None = None) -> int:
    if key is not None and isinstance(m, _Map) and key in m.key_lines:
        return m.key_lines[key]
    return getattr(m, "line", 0)


def _text(path: Path, base: Path, m: Any, what: str) -> TextSpec | None:
    if m is None:
        return None
    _check_keys(path, m, _TEXT, what)
    if "text" not in m:
        raise PlanError(f"{_where(path, _line(m))}: {what} needs 'text' (a UTF-8 text file)")
    text = (base / str(m["text"])).resolve()
    if not text.is_file():
        raise PlanError(f"{_where(path, _line(m, 'text'))}: {what} text {text} does not exist")
    ctx, chunks = m.get("ctx", 512), m.get("chunks")
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 16:
        raise PlanError(f"{_where(path, _line(m, 'ctx'))}: {what} ctx must be an integer of at least 16, not {ctx!r}")
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        raise PlanError(f"{_where(path, _line(m, 'chunks'))}: {what} chunks must be a positive integer, not {chunks!r}")
    return TextSpec(text, ctx, chunks)


def _presets(path: Path, m: Any, line: int) -> list:
    from gguf_moe.presets import get_preset

    vals = m if isinstance(m, list) else [m]
    if not vals or not all(isinstance(v, str) for v in vals):
        raise PlanError(f"{_where(path, line)}: presets must be a list of preset names (Q8_0, Q4_K_M, ...)")
    out = []
    for v in vals:
        try:
            p = get_preset(v)
        except GgufMoeError as e:
            raise PlanError(f"{_where(path, line)}: {e}") from None
        if p not in out:
            out.append(p)
    return out


def _split(path: Path, v: Any, line: int) -> int | None:
    if v is None:
        return None
    from gguf_moe.split import parse_split_size

    try:
        return parse_split_size(str(v))
    except GgufMoeError as e:
        raise PlanError(f"{_where(path, line)}: split_max_size: {e}") from None


def _model_name(source: str) -> tuple[str, str]:
    """(source as the tasks open it, model name) for a directory or Hub repo id."""
    from gguf_moe.hub import open_source
    from gguf_moe.source import open_model

    with open_source(source) as (model_dir, _hub):
        model = open_model(model_dir)
        try:
            return source, model.name
        finally:
            model.close()


def load_plan(path: str | Path) -> Plan:
    """Read and check the plan file (sources opened, presets and texts checked)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the plan ({getattr(e, 'strerror', None) or e})") from None
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise PlanError(f"{_where(path, line)}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    base = path.resolve().parent
    _check_keys(path, doc if doc is not None else _Map(), _TOP, "the plan")
    if not doc or "models" not in doc:
        raise PlanError(f"{path}: the plan needs 'models' (a list of models with 'source')")
    defaults = doc.get("defaults") or _Map()
    _check_keys(path, defaults, _SETTINGS, "defaults")
    models = doc["models"]
    if not isinstance(models, list) or not models:
        raise PlanError(f"{_where(path, _line(doc, 'models'))}: 'models' must be a non-empty list")
    outdir = (base / str(doc.get("outdir", "releases"))).resolve()
    jobs: list[ModelJob] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        what = f"models[{i}]"
        _check_keys(path, m, _MODEL, what)
        line = _line(m)
        if "source" not in m:
            raise PlanError(f"{_where(path, line)}: {what} needs 'source' (a model directory or org/name[@revision])")

        def get(key):
            return (m, m[key]) if key in m else (defaults, defaults.get(key))

        src = str(m["source"])
        local = base / src
        if local.exists():
            src = str(local.resolve())
        try:
            src, name = _model_name(src)
        except GgufMoeError as e:
            raise PlanError(f"{_where(path, _line(m, 'source'))}: {e}") from None
        if name in seen:
            raise PlanError(f"{_where(path, line)}: model {name!r} is already in the plan (line {seen[name]})")
        seen[name] = line
        owner, presets = get("presets")
        if presets is None:
            raise PlanError(f"{_where(path, line)}: {what} has no presets (give 'presets' here or in defaults)")
        presets = _presets(path, presets, _line(owner, "presets"))
        owner, im = get("imatrix")
        imatrix = _text(path, base, im, f"{what} imatrix" if owner is m else "defaults imatrix")
        owner, ev = get("eval")
        evaluation = _text(path, base, ev, f"{what} eval" if owner is m else "defaults eval")
        owner, sp = get("split_max_size")
        split = _split(path, sp, _line(owner, "split_max_size"))
        owner, device = get("device")
        device = "cpu" if device is None else device
        if device not in ("cpu", "cuda"):
            raise PlanError(f"{_where(path, _line(owner, 'device'))}: device must be cpu or cuda, not {device!r}")
        jobs.append(ModelJob(src, name, outdir / name, presets, imatrix, evaluation, split, device, line))
    return Plan(path, outdir, jobs)
