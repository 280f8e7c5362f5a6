"""Settings shared by the two writing pipelines, ``convert`` (safetensors -> GGUF) and
``quantize`` (GGUF -> GGUF): one object, built once by the CLI (or a caller), handed to
the plan step and to the write loop.  Fields a pipeline has no use for are ignored by it
(``pre_tokenizer`` and ``recipe`` only concern ``convert``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
from typing import Any

from gguf_moe.imatrix import Imatrix
from gguf_moe.presets import TypeOverrides

__all__ = ["Options", "Progress", "DEFAULT_CHUNK_BYTES", "KVOverride", "parse_kv_override", "apply_kv_overrides"]

DEFAULT_CHUNK_BYTES = 8 << 20


class Progress:
    """Hooks the CLI implements to show progress; the defaults do nothing."""

    def start(self, total_bytes: int, n_tensors: int) -> None: ...
    def tensor(self, name: str, index: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self) -> None: ...


@dataclass
class Options:
    """How to plan and write outputs.

    ``overrides``: llama-quantize's per-tensor type options (``--tensor-type``,
    ``--output-tensor-type``, ``--token-embedding-type``, ``--pure``,
    ``--leave-output-tensor``).  ``imatrix``: importance weights, used as llama-quantize
    uses them (and its presence changes some presets' types).  ``chunk_bytes``: float32
    bytes per chunk of rows (memory use).  ``progress``: display hooks.
    """

    force: bool = False
    backend: str | None = None
    threads: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: Progress | None = None
    imatrix: Imatrix | None = None
    overrides: TypeOverrides = field(default_factory=TypeOverrides)
    # convert only
    pre_tokenizer: str | None = None
    recipe: bool = True
    # quantize only: quantize tensors that are already quantized (llama-quantize --allow-requantize)
    allow_requantize: bool = False
    # quantize only: layers to leave out, the others renumbered (llama-quantize --prune-layers)
    prune_layers: tuple[int, ...] = ()
    #: llama-quantize's --override-kv, applied in order after general.file_type
    kv_overrides: tuple[KVOverride, ...] = ()
    #: write each output as a llama-gguf-split set (``split.SplitSpec``), or one file (None)
    split: Any = None
    #: with ``split``: write only this shard (0-based) of each set, reading only its tensors
    split_shard: int | None = None
    #: stop before any work when the outputs do not fit on their disks (``space.check_space``)
    space_check: bool = True

    @classmethod
    def of(cls, options: Options | None = None, **kw) -> Options:
        """``options`` (or the defaults) with the keyword arguments given replacing fields;
        unknown names are a TypeError, as for any keyword argument."""
        base = options if options is not None else cls()
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"unknown option(s): {', '.join(bad)}")
        return dataclasses.replace(base, **kw) if kw else base

    def kv_override_int(self, key: str) -> int | None:
        """The last ``int`` override of ``key``: llama.cpp's loader reads hparams through the
        overrides too (the expert count changes the type rules)."""
        vals = [o.value for o in self.kv_overrides if o.key == key and o.kind == "int"]
        return vals[-1] if vals else None

    @property
    def has_imatrix(self) -> bool:
        return self.imatrix is not None

    def progress_or_null(self) -> Progress:
        return self.progress if self.progress is not None else Progress()


# --------------------------------------------------------------------------- --override-kv


@dataclass(frozen=True)
class KVOverride:
    """One ``--override-kv KEY=TYPE:VALUE``: ``kind`` is int, float, bool or str; ``value``
    the value as llama.cpp stores it (int: ``abs`` as u32, float: f32)."""

    key: str
    kind: str
    value: object


_INT = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_FLOAT = re.compile(
    r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)", re.IGNORECASE
)


def parse_kv_override(arg: str) -> KVOverride:
    """``KEY=TYPE:VALUE`` as llama.cpp's ``string_parse_kv_override`` reads it (TYPE int,
    float, bool or str; numbers read like C's atol/atof, a bad number is 0).  Malformed
    input is a GgufMoeError."""
    from gguf_moe.errors import GgufMoeError

    key, sep, rest = str(arg).partition("=")
    if not sep or len(key.encode()) >= 128:
        raise GgufMoeError(f"malformed KV override {arg!r}: expected KEY=TYPE:VALUE with a key under 128 bytes")
    kind, colon, val = rest.partition(":")
    if not colon or kind not in ("int", "float", "bool", "str"):
        raise GgufMoeError(f"invalid type for KV override {arg!r}: use int:, float:, bool: or str:")
    if kind == "int":
        m = _INT.match(val)
        n = int(m.group(0)) if m else 0
        n = max(min(n, 2**63 - 1), -(2**63))  # atol saturates
        return KVOverride(key, kind, abs(n) & 0xFFFFFFFF)  # stored as (uint32_t) abs(value)
    if kind == "float":
        m = _FLOAT.match(val)
        return KVOverride(key, kind, float(np.float32(float(m.group(0)) if m else 0.0)))
    if kind == "bool":
        if val not in ("true", "false"):
            raise GgufMoeError(f"invalid boolean value for KV override {arg!r}: true or false")
        return KVOverride(key, kind, val == "true")
    if len(val.encode()) > 127:
        raise GgufMoeError(f"malformed KV override {arg!r}: the value cannot exceed 127 bytes")
    return KVOverride(key, kind, val)


def apply_kv_overrides(w, overrides) -> None:
    """Set each override on the ``gguf.GGUFWriter`` ``w`` as ``gguf_set_val_*`` does: an
    existing key is removed and the key added at the end."""
    for o in overrides:
        for kv in w.kv_data:
            kv.pop(o.key, None)
        add = {"int": w.add_uint32, "float": w.add_float32, "bool": w.add_bool, "str": w.add_string}[o.kind]
        add(o.key, o.value)
