"""Settings shared by the two writing pipelines, ``convert`` (safetensors -> GGUF) and
``quantize`` (GGUF -> GGUF): one object, built once by the CLI (or a caller), handed to
the plan step and to the write loop.  Fields a pipeline has no use for are ignored by it
(``pre_tokenizer`` and ``recipe`` only concern ``convert``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gguf_moe.imatrix import Imatrix
from gguf_moe.presets import TypeOverrides

__all__ = ["Options", "Progress", "DEFAULT_CHUNK_BYTES"]

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
    #: write each output as a llama-gguf-split set (``split.SplitSpec``), or one file (None)
    split: Any = None
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

    @property
    def has_imatrix(self) -> bool:
        return self.imatrix is not None

    def progress_or_null(self) -> Progress:
        return self.progress if self.progress is not None else Progress()
