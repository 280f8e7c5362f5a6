"""Every architecture gguf-moe converts, one module each.

An architecture module (``llama``, ``qwen2moe``, ``qwen3moe``, ``deepseek``) exports
``SPECS``, a tuple of :class:`~gguf_moe.archs.base.ArchSpec`: the Hugging Face class it
reads, its block layouts (tensor rules with their transforms), its config keys, its
routing (which llama.cpp architecture computes the model) and the GGUF keys it writes.
Adding an architecture is one new module listed in ``_MODULES`` plus its tests
(docs/architectures.md).

GGUF names are never typed in a module: every Hugging Face name is mapped through
gguf-py's ``TensorNameMap`` for the source's architecture, as llama.cpp's converter does.
"""

from __future__ import annotations

from gguf import MODEL_TENSOR

from gguf_moe.archs import deepseek, llama, qwen2moe, qwen3moe
from gguf_moe.archs.base import (
    ROUTING_FLAG, ArchSpec, BlockLayout, FileSpec, HParams, Routing, TensorRule, gguf_name, routing_words,
    tensor_name_map,
)  # fmt: skip

__all__ = [
    "TensorRule",
    "BlockLayout",
    "ArchSpec",
    "HParams",
    "Routing",
    "FileSpec",
    "FILE_SPECS",
    "ROUTING_FLAG",
    "ARCHITECTURES",
    "BLOCK_LAYOUTS",
    "IGNORED_SUFFIXES",
    "F32_TENSORS",
    "get_arch",
    "tensor_name_map",
    "gguf_name",
    "routing_words",
]

_MODULES = (llama, qwen2moe, qwen3moe, deepseek)

ARCHITECTURES: dict[str, ArchSpec] = {spec.hf_arch: spec for m in _MODULES for spec in m.SPECS}

#: what validate expects, by GGUF architecture name (every architecture some module writes)
FILE_SPECS: dict[str, FileSpec] = {f.arch: f for m in _MODULES for f in m.FILES}

#: every block layout by name
BLOCK_LAYOUTS: dict[str, BlockLayout] = {lay.name: lay for spec in ARCHITECTURES.values() for lay in spec.layouts}

#: Checkpoint tensors that carry no weights llama.cpp needs (the converter skips them too).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

#: Tensor kinds the converter always writes as F32, whatever the output type.
F32_TENSORS = frozenset(
    {
        MODEL_TENSOR.FFN_GATE_INP,
        MODEL_TENSOR.FFN_GATE_INP_SHEXP,
        MODEL_TENSOR.ATTN_NORM,
        MODEL_TENSOR.FFN_NORM,
        MODEL_TENSOR.OUTPUT_NORM,
        MODEL_TENSOR.ROPE_FREQS,
    }
)


def get_arch(hf_arch: str) -> ArchSpec | None:
    return ARCHITECTURES.get(hf_arch)
