"""Read a Hugging Face model directory (config.json + safetensors) without loading it.

``open_model(src_dir)`` parses config.json and every safetensors header, checks them
against each other and against the architecture modules (``gguf_moe.archs``), and returns a
:class:`SourceModel` whose ``tensors`` are the GGUF tensors to write, in llama.cpp's file
order.  Nothing is read beyond the headers until a tensor's ``iter_chunks`` runs; data then
comes through a read-only memory map of the shard, one expert / row chunk at a time:

* BF16 is widened exactly (``uint16 << 16`` viewed as float32), F16 and F32 converted;
* after each chunk the mapped pages are released (``madvise(MADV_DONTNEED)``), so the
  resident set stays at about one chunk whatever the model size;
* Q/K rows are permuted for llama.cpp's rotary layout (``LlamaModel.permute`` upstream);
* experts are read one after another, so the stacked ``[E, ff, d]`` tensor never exists.

Safetensors headers are parsed here (8-byte length, JSON) and every claim is checked
against the file: offsets inside the file, ``dtype x shape`` equal to the byte span.  An
index (``model.safetensors.index.json``) is used only for its ``weight_map``; mergekit
writes indexes without ``total_size`` and in write order, so nothing else is trusted.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from gguf_moe import archs as archmod
from gguf_moe.archs.base import HParams, Routing
from gguf_moe.errors import ConfigError, CorruptFile, LayoutMismatch, MissingTensor, UnsupportedArchitecture

__all__ = [
    "open_model",
    "SourceModel",
    "SourceTensor",
    "RawTensor",
    "read_safetensors_header",
    "normalize_hparams",
    "widen",
    "finite_rows",
]

#: safetensors dtypes we convert -> numpy dtype of the stored words
_WORDS: dict[str, type] = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
#: bytes per element of every safetensors dtype (to check headers)
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_PAGE = mmap.PAGESIZE
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit



def widen(x: np.ndarray) -> np.ndarray:
    """A chunk from ``SourceTensor.iter_stored`` as float32 (exact for every stored type)."""
    if x.dtype == np.uint16:  # BF16 words
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Per row of a stored chunk: are all its values finite?  Checked on the stored words
    (a BF16 word is NaN/Inf when its exponent bits are all ones)."""
    if x.dtype == np.uint16:
        return ((x & 0x7F80) != 0x7F80).all(axis=1)
    return np.isfinite(x).all(axis=1)


# --------------------------------------------------------------------------- shards


class _Shard:
    """One safetensors file; the memory map is opened on first use."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self._file = None
        self._mm: mmap.mmap | None = None

    def mm(self) -> mmap.mmap:
        if self._mm is None:
            self._file = open(self.path, "rb")
            try:
                size = os.fstat(self._file.fileno()).st_size
                if size != self.size:
                    raise CorruptFile(f"{self.path}: file changed size while converting ({self.size} -> {size} bytes)")
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except BaseException:
                self._file.close()
                self._file = None
                raise
        return self._mm

    def read(self, offset: int, nbytes: int, dtype) -> np.ndarray:
        """Copy ``nbytes`` at ``offset`` out of the map as ``dtype`` words, then drop the
        pages from this process's resident set (they stay in the page cache)."""
        mm = self.mm()
        count = nbytes // np.dtype(dtype).itemsize
        view = np.frombuffer(mm, dtype=dtype, count=count, offset=offset)
        out = view.copy()
        del view
        start = offset - offset % _PAGE
        end = min(self.size, offset + nbytes)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        return out

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class RawTensor:
    """A tensor as a safetensors header describes it (offsets absolute in the file)."""

    name: str
    shard: _Shard
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def where(self) -> str:
        return f"{self.shard.path}: tensor {self.name!r}"


def read_safetensors_header(path: Path) -> dict[str, RawTensor]:
    """Parse and check one safetensors header; returns name -> RawTensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFile(f"{path}: truncated safetensors file ({size} bytes, no header); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CorruptFile(
                    f"{path}: safetensors header claims {n} bytes but the file has {size}; the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise CorruptFile(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CorruptFile(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    shard = _Shard(path, size)
    data_start = 8 + n
    out: dict[str, RawTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFile(f"{path}: header entry for {name!r} lacks dtype/shape/data_offsets; the file is corrupt") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CorruptFile(f"{path}: tensor {name!r} has an invalid shape {list(shape)} or offsets [{begin}, {end}]")
        if data_start + end > size:
            raise CorruptFile(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
                "the file is truncated, re-download it"
            )
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is None:
            raise CorruptFile(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        want = math.prod(shape) * itemsize
        if end - begin != want:
            raise CorruptFile(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) needs {want} bytes but its offsets span {end - begin}; "
                "the header is inconsistent"
            )
        out[name] = RawTensor(name, shard, dtype, shape, data_start + begin, end - begin)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values() if t.nbytes)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptFile(f"{path}: tensors {n0!r} and {n1!r} overlap in the file; the header is inconsistent")
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what} ({e})") from None


def index_tensors(src: Path) -> dict[str, RawTensor]:
    """Every tensor of the checkpoint: from ``model.safetensors.index.json`` when present
    (only its ``weight_map`` is used), else ``model.safetensors`` or ``model-*.safetensors``."""
    index_path = src / "model.safetensors.index.json"
    expected: dict[str, str] = {}
    if index_path.is_file():
        index = _load_json(index_path, "safetensors index")
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CorruptFile(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
        expected = wm
        shard_names = list(dict.fromkeys(wm.values()))
        for s in shard_names:
            if Path(s).name != s:
                raise CorruptFile(f"{index_path}: shard {s!r} is not a file name in the model directory")
            if not (src / s).is_file():
                n = sum(1 for v in wm.values() if v == s)
                raise MissingTensor(
                    f"{src / s}: shard listed in model.safetensors.index.json ({n} tensors) does not exist; download it"
                )
    elif (src / "model.safetensors").is_file():
        shard_names = ["model.safetensors"]
    else:
        shard_names = sorted(p.name for p in src.glob("model*.safetensors"))
        if not shard_names:
            raise MissingTensor(f"{src}: no model.safetensors, model.safetensors.index.json or model-*.safetensors found")
    tensors: dict[str, RawTensor] = {}
    for s in shard_names:
        for name, t in read_safetensors_header(src / s).items():
            if name in tensors:
                raise CorruptFile(f"{src}: tensor {name!r} is in both {tensors[name].shard.path.name} and {s}")
            tensors[name] = t
    for name, s in expected.items():
        t = tensors.get(name)
        if t is None or t.shard.path.name != s:
            found = f"; it is in {t.shard.path.name}" if t is not None else ""
            raise MissingTensor(
                f"{index_path}: maps tensor {name!r} to {s}, which has no such tensor{found}; the index and shards disagree"
            )
    return tensors


# --------------------------------------------------------------------------- config


def _rope(config: dict) -> dict:
    """Rope parameters from either Transformers generation: v5 ``rope_parameters``
    (``rope_theta``, ``rope_type``, ...) or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = config.get("rope_scaling")
    params = dict(params) if isinstance(params, dict) else {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def normalize_hparams(
    config: dict, config_path: Path, *, moe: bool, spec: archmod.ArchSpec | None = None, layout: str | None = None
) -> HParams:
    """The numbers the conversion needs, checked, as a frozen :class:`HParams`; the
    architecture's ``read_hparams`` adds its own fields."""

    def need(key: str, *alts: str) -> int:
        for k in (key, *alts):
            v = config.get(k)
            if v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ConfigError(f"{config_path}: {k} must be a positive integer, found {v!r}")
                return v
        raise ConfigError(f"{config_path}: required key {key!r} is missing; add it (the model's config is incomplete)")

    def opt_num(key: str):
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{config_path}: {key} must be a number, found {v!r}")
        return v

    hp: dict[str, Any] = {}
    hp["n_layer"] = need("num_hidden_layers")
    hp["n_embd"] = need("hidden_size")
    hp["n_ff"] = need("intermediate_size")
    hp["n_head"] = need("num_attention_heads")
    hp["n_head_kv"] = need("num_key_value_heads") if config.get("num_key_value_heads") is not None else hp["n_head"]
    hp["vocab_size"] = need("vocab_size")
    hp["n_vocab"] = hp["vocab_size"]
    hd = config.get("head_dim")
    hp["head_dim_explicit"] = hd is not None
    if hd is None:
        if hp["n_embd"] % hp["n_head"]:
            raise ConfigError(
                f"{config_path}: hidden_size {hp['n_embd']} is not divisible by num_attention_heads {hp['n_head']} and no head_dim is given"
            )
        hd = hp["n_embd"] // hp["n_head"]
    elif not isinstance(hd, int) or isinstance(hd, bool) or hd <= 0:
        raise ConfigError(f"{config_path}: head_dim must be a positive integer, found {hd!r}")
    if hd % 2:
        raise ConfigError(f"{config_path}: head dimension {hd} is odd; rotary embeddings need an even one")
    if hp["n_head"] % hp["n_head_kv"]:
        raise ConfigError(
            f"{config_path}: num_attention_heads {hp['n_head']} is not a multiple of num_key_value_heads {hp['n_head_kv']}"
        )
    hp["head_dim"] = hd
    hp["n_q"] = hp["n_head"] * hd
    hp["n_kv"] = hp["n_head_kv"] * hd
    hp["one"] = 1
    hp["n_ff_exp"] = hp["n_ff"]
    if moe:
        keys = spec.expert_count_keys if spec is not None else ("num_local_experts",)
        hp["n_expert"] = need(*keys)
        hp["n_expert_used"] = need("num_experts_per_tok")
        if spec is not None and spec.expert_ff_key:
            hp["n_ff_exp"] = need(spec.expert_ff_key)
        if spec is not None and spec.shared_ff_key:
            hp["n_ff_shexp"] = need(spec.shared_ff_key)
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise ConfigError(
                f"{config_path}: decoder_sparse_step/mlp_only_layers make some layers dense; "
                "only models with experts in every layer are supported"
            )
        if hp["n_expert_used"] > hp["n_expert"]:
            raise ConfigError(
                f"{config_path}: num_experts_per_tok {hp['n_expert_used']} exceeds num_local_experts {hp['n_expert']}"
            )
    else:
        hp["n_expert"] = 0
        hp["n_expert_used"] = 0
    hp["n_ctx"] = config.get("max_position_embeddings")
    hp["rms_eps"] = opt_num("rms_norm_eps")
    rope = _rope(config)
    hp["rope"] = MappingProxyType(rope)  # read-only, as the rest of HParams
    theta = rope.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))):
        raise ConfigError(f"{config_path}: rope_theta must be a number, found {theta!r}")
    hp["rope_theta"] = theta
    hp["rope_type"] = rope.get("rope_type")
    if hp["rope_type"] == "yarn" and rope.get("factor") is not None and rope.get("original_max_position_embeddings") is None:
        raise ConfigError(f"{config_path}: yarn rope scaling needs original_max_position_embeddings; add it to rope_scaling")
    hp["sliding_window"] = config.get("sliding_window")
    hp["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    hp["dtype"] = config.get("dtype", config.get("torch_dtype"))
    if spec is not None and spec.read_hparams is not None:
        hp.update(spec.read_hparams(config, need, {"moe": moe, "layout": layout, "config_path": config_path, "hp": hp}))
    for k in ("n_vocab", "n_q", "n_kv", "one"):  # derived (HParams properties)
        hp.pop(k, None)
    return HParams(**hp)


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Piece:
    """A contiguous block of rows: ``nrows`` rows of ``ncols`` elements at ``offset``."""

    raw: RawTensor
    offset: int
    nrows: int
    ncols: int


@dataclass
class SourceTensor:
    """One GGUF tensor and how to read it.

    ``shape`` is numpy order (``(n_expert, n_ff, n_embd)`` for stacked experts).
    ``iter_chunks(max_rows)`` yields float32 ``[rows, shape[-1]]`` blocks whose
    concatenation is the whole tensor as ``(-1, shape[-1])``; a chunk never crosses an
    expert (or, for Q/K, a head).
    """

    name: str
    shape: tuple[int, ...]
    kind: MODEL_TENSOR
    force_f32: bool
    sources: tuple[str, ...]
    src_dtype: str
    pieces: tuple[_Piece, ...] = field(repr=False)
    head_rows: int | None = None  # Q/K: rows per head, permuted as llama.cpp expects
    computed: np.ndarray | None = field(default=None, repr=False)  # generated, not read (rope_freqs)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def src_itemsize(self) -> int:
        """Bytes per element in the checkpoint (2 for BF16/F16, 4 for F32)."""
        return _ITEMSIZE[self.src_dtype]

    def iter_stored(self, max_rows: int) -> Iterator[np.ndarray]:
        """Like ``iter_chunks``, but each chunk as stored in the checkpoint: ``uint16``
        words for BF16, ``float16``, ``float32`` (rows already permuted).  ``widen`` turns
        a chunk into float32."""
        if self.computed is not None:
            yield np.ascontiguousarray(self.computed, dtype=np.float32).reshape(-1, self.n_cols)
            return
        step = max(1, int(max_rows))
        if self.head_rows:
            step = max(self.head_rows, step - step % self.head_rows)
        for p in self.pieces:
            wtype, isz = _WORDS[p.raw.dtype], _ITEMSIZE[p.raw.dtype]
            for r0 in range(0, p.nrows, step):
                n = min(step, p.nrows - r0)
                x = p.raw.shard.read(p.offset + r0 * p.ncols * isz, n * p.ncols * isz, wtype).reshape(n, p.ncols)
                if self.head_rows:
                    h = self.head_rows
                    x = np.ascontiguousarray(x.reshape(n // h, 2, h // 2, p.ncols).swapaxes(1, 2).reshape(n, p.ncols))
                yield x

    def iter_chunks(self, max_rows: int) -> Iterator[np.ndarray]:
        for x in self.iter_stored(max_rows):
            yield widen(x)

    def read(self) -> np.ndarray:
        """The whole tensor as float32 in numpy shape (for tests and small tensors)."""
        out = np.empty((self.n_rows, self.n_cols), dtype=np.float32)
        r = 0
        for c in self.iter_chunks(1 << 30):
            out[r : r + len(c)] = c
            r += len(c)
        return out.reshape(self.shape)


@dataclass
class SourceModel:
    """A Hugging Face model directory, ready to convert."""

    path: Path
    config: dict
    hparams: dict[str, Any]
    hf_arch: str
    arch: str
    gguf_arch: MODEL_ARCH
    layout: str
    name: str
    tensors: list[SourceTensor]
    raw: dict[str, RawTensor] = field(repr=False)
    spec: archmod.ArchSpec | None = field(default=None, repr=False)
    #: the llama.cpp architecture written (``arch``/``gguf_arch``) and what its routing computes
    routing: Routing | None = None

    @property
    def n_expert(self) -> int:
        return self.hparams.n_expert

    def check_routing(self, allow_mismatch: bool = False) -> str | None:
        """Refuse (ConfigError) a model no llama.cpp architecture computes faithfully,
        unless ``allow_mismatch``; then return the warning to show, else None."""
        r = self.routing
        if r is None or r.faithful:
            return None
        if not allow_mismatch:
            raise ConfigError(f"{self.path}: no faithful llama.cpp file: {r.why}")
        return f"{self.path}: routing differs from the source: the file computes {r.file}, the source {r.source}"

    def close(self) -> None:
        _close_shards(self.raw)

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_shards(raw: dict[str, RawTensor]) -> None:
    for s in {id(t.shard): t.shard for t in raw.values()}.values():
        s.close()


def _expect_shape(raw: RawTensor, want: tuple[int, ...], what: str) -> None:
    if raw.shape != want:
        raise LayoutMismatch(
            f"{raw.where} has shape {list(raw.shape)}, expected {list(want)} for {what} from config.json; "
            "the checkpoint and config disagree"
        )


def _check_dtype(raw: RawTensor) -> None:
    if raw.dtype not in _WORDS:
        raise LayoutMismatch(f"{raw.where} has dtype {raw.dtype}; only BF16, F16 and F32 weights can be converted")


def _build(
    rule: archmod.TensorRule, L: int | None, hp: HParams, raw: dict[str, RawTensor], gguf_arch: MODEL_ARCH, used: set[str]
) -> SourceTensor | None:
    fmt = {"L": L} if L is not None else {}
    shape = tuple(hp[k] for k in rule.shape)
    map_as = (rule.map_as or rule.hf).format(**fmt, E="{E}")
    mapped = archmod.gguf_name(gguf_arch, hp.n_layer, map_as)
    if mapped is None:  # a table error, not a user error
        raise AssertionError(f"no GGUF name for {map_as!r}")
    name, kind = mapped
    pieces: list[_Piece] = []
    sources: list[str] = []
    if rule.kind == "experts":
        per = shape[1:]
        first: RawTensor | None = None
        for e in range(shape[0]):
            hf = rule.hf.format(**fmt, E=e)
            t = raw.get(hf)
            if t is None:
                raise MissingTensor(f"tensor {hf!r} (expert {e} of {shape[0]}) is missing from the checkpoint")
            _check_dtype(t)
            if first is not None and t.shape != first.shape:
                raise LayoutMismatch(
                    f"{t.where} has shape {list(t.shape)} but expert 0 ({first.name}) has {list(first.shape)}; "
                    "all experts of a layer must have the same shape"
                )
            first = first or t
            _expect_shape(t, per, f"expert {e}")
            pieces.append(_Piece(t, t.offset, per[0], per[1]))
            sources.append(hf)
            used.add(hf)
        dtypes = {p.raw.dtype for p in pieces}
        if len(dtypes) > 1:
            raise LayoutMismatch(f"experts of {name} have mixed dtypes {sorted(dtypes)}; convert the checkpoint to one dtype")
    else:
        hf = rule.hf.format(**fmt)
        t = raw.get(hf)
        if t is None and rule.fallback is not None:
            hf = rule.fallback.format(**fmt)
            t = raw.get(hf)
        if t is None:
            if rule.optional:
                return None
            raise MissingTensor(f"tensor {hf!r} is missing from the checkpoint (needed for {name})")
        _check_dtype(t)
        sources.append(hf)
        used.add(hf)
        isz = _ITEMSIZE[t.dtype]
        if rule.kind == "fused_experts":
            i, n = rule.part
            E, rows, cols = shape
            want = (E, rows * n, cols)
            _expect_shape(t, want, f"fused experts (part {i} of {n})")
            for e in range(E):
                off = t.offset + (e * rows * n + i * rows) * cols * isz
                pieces.append(_Piece(t, off, rows, cols))
        else:
            _expect_shape(t, shape, name)
            cols = shape[-1]
            pieces.append(_Piece(t, t.offset, math.prod(shape[:-1]), cols))
    head_rows = None
    if rule.permute is not None:
        head_rows = hp.head_dim
    force_f32 = len(shape) == 1 or kind in archmod.F32_TENSORS
    return SourceTensor(
        name=name,
        shape=shape,
        kind=kind,
        force_f32=force_f32,
        sources=tuple(sources),
        src_dtype=pieces[0].raw.dtype,
        pieces=tuple(pieces),
        head_rows=head_rows,
    )


def open_model(src_dir: str | os.PathLike) -> SourceModel:
    """Read config.json and all safetensors headers of ``src_dir``; check everything that
    can be checked without reading weights."""
    from gguf_moe.presets import llama_sort_key

    src = Path(src_dir)
    if not src.is_dir():
        raise ConfigError(f"{src}: not a directory; give the Hugging Face model directory (with config.json)")
    config_path = src / "config.json"
    config = _load_json(config_path, "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object")
    if "text_config" in config and isinstance(config["text_config"], dict):
        config = {**config, **config["text_config"]}
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError(f"{config_path}: 'architectures' is missing; expected e.g. [\"MixtralForCausalLM\"]")
    hf_arch = archs[0]
    spec = archmod.get_arch(hf_arch)
    if spec is None:
        raise UnsupportedArchitecture(
            f"{config_path}: architecture {hf_arch!r} is not supported; supported: {', '.join(archmod.ARCHITECTURES)}"
        )
    raw = index_tensors(src)
    layout = None
    for cand in spec.layouts:
        if cand.detect.format(L=0) in raw:
            layout = cand
            break
    if layout is None:
        tried = ", ".join(lay.detect.format(L=0) for lay in spec.layouts)
        raise MissingTensor(f"{src}: no tensor of block 0 found for {hf_arch} (looked for {tried}); is the checkpoint complete?")
    try:
        hp = normalize_hparams(config, config_path, moe=layout.moe, spec=spec, layout=layout.name)
    except BaseException:
        _close_shards(raw)
        raise
    try:
        tensors: list[SourceTensor] = []
        used: set[str] = set()
        for rule in spec.globals:
            t = _build(rule, None, hp, raw, spec.gguf_arch, used)
            if t is not None:
                tensors.append(t)
        for L in range(hp.n_layer):
            for rule in layout.rules:
                t = _build(rule, L, hp, raw, spec.gguf_arch, used)
                if t is not None:
                    tensors.append(t)
        extra = [n for n in raw if n not in used and not n.endswith(archmod.IGNORED_SUFFIXES)]
        if extra:
            ex = raw[extra[0]]
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise LayoutMismatch(
                f"{ex.where} is not part of a {hp.n_layer}-layer {hf_arch} checkpoint ({layout.name} layout){more}; "
                "check num_hidden_layers in config.json"
            )
    except BaseException:
        _close_shards(raw)
        raise
    for hf_name, values, origin in spec.extra_tensors(hp) if spec.extra_tensors else ():
        name, kind = archmod.gguf_name(spec.gguf_arch, hp.n_layer, hf_name)
        tensors.append(SourceTensor(name, values.shape, kind, True, (origin,), "F32", (), computed=values))
    tensors.sort(key=lambda t: llama_sort_key(t.name))
    name = src.resolve().name
    routing = spec.route(hp)
    return SourceModel(
        path=src,
        config=config,
        hparams=hp,
        hf_arch=hf_arch,
        arch=str(gguf_arch_name(routing.gguf_arch)),
        gguf_arch=routing.gguf_arch,
        layout=layout.name,
        name=name,
        tensors=tensors,
        raw=raw,
        spec=spec,
        routing=routing,
    )


def gguf_arch_name(a: MODEL_ARCH) -> str:
    from gguf import MODEL_ARCH_NAMES

    return MODEL_ARCH_NAMES[a]
