"""The llama family: Mixtral (both expert layouts), Mistral and Llama, all GGUF ``llama``
(llama.cpp's ``LlamaModel``).

Mixtral checkpoints come in two layouts:

* ``moe_legacy``: one 2-D tensor per expert,
  ``model.layers.{L}.block_sparse_moe.experts.{E}.w1|w2|w3.weight`` and the router
  ``block_sparse_moe.gate.weight`` (Transformers 4.x, older mergekit-moe);
* ``moe_fused``: ``model.layers.{L}.mlp.experts.gate_up_proj`` ``[E, 2*ff, d]`` (per
  expert the gate rows first, then the up rows), ``mlp.experts.down_proj`` ``[E, d, ff]``
  and the router ``mlp.gate.weight`` (Transformers 5, current mergekit-moe).

Both produce ``blk.{L}.ffn_{gate,up,down}_exps.weight``, experts stacked on the slowest
axis (numpy ``[E, out, in]``).  Q/K rows are permuted for llama.cpp's rotary layout.
Mixtral always renormalises its top-k router weights, as llama.cpp's ``llama`` graph does.
Llama 3.1 rope scaling adds the computed ``rope_freqs.weight``.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
from gguf import MODEL_ARCH

from gguf_moe.archs.base import (
    LLAMA_GLOBALS, ArchSpec, BlockLayout, FileSpec, TensorRule, attention_rules, expert_rules, fused_expert_rules,
)  # fmt: skip

ATTN = attention_rules(permute=True)

MOE_FUSED = BlockLayout(
    name="moe_fused",
    detect="model.layers.{L}.mlp.experts.gate_up_proj",
    moe=True,
    rules=ATTN + (TensorRule("model.layers.{L}.mlp.gate.weight", ("n_expert", "n_embd")),) + fused_expert_rules(),
)
MOE_LEGACY = BlockLayout(
    name="moe_legacy",
    detect="model.layers.{L}.block_sparse_moe.gate.weight",
    moe=True,
    rules=ATTN
    + (TensorRule("model.layers.{L}.block_sparse_moe.gate.weight", ("n_expert", "n_embd")),)
    + expert_rules(
        "model.layers.{L}.block_sparse_moe.experts.{E}.{p}.weight",
        "model.layers.{L}.block_sparse_moe.experts.{p}",
        ("w1", "w3", "w2"),
    ),
)
DENSE = BlockLayout(
    name="dense",
    detect="model.layers.{L}.mlp.gate_proj.weight",
    moe=False,
    rules=ATTN
    + (
        TensorRule("model.layers.{L}.mlp.gate_proj.weight", ("n_ff", "n_embd")),
        TensorRule("model.layers.{L}.mlp.up_proj.weight", ("n_ff", "n_embd")),
        TensorRule("model.layers.{L}.mlp.down_proj.weight", ("n_embd", "n_ff")),
    ),
)


def llama3_rope_factors(hp) -> np.ndarray | None:
    """Llama 3.1 rope scaling: llama.cpp's converter stores per-frequency factors as the
    F32 tensor ``rope_freqs.weight`` (``LlamaModel.generate_extra_tensors``).  Computed in
    float32 step by step as the converter's torch code does."""
    rope = hp.rope
    if not (isinstance(rope.get("rope_type"), str) and rope["rope_type"].lower() == "llama3"):
        return None
    f32 = np.float32
    dim = hp.head_dim
    base = f32(rope.get("rope_theta", 10000.0))
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low  # Python floats, as upstream
    high_wavelen = old_ctx / high
    exps = np.arange(0, dim, 2, dtype=f32) / f32(dim)
    freqs = f32(1.0) / np.power(base, exps, dtype=f32)
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(f32(1))
        elif wavelen > low_wavelen:
            out.append(f32(factor))
        else:
            smooth = (f32(old_ctx) / wavelen - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


def extra_tensors(hp) -> list[tuple[str, np.ndarray, str]]:
    f = llama3_rope_factors(hp)
    return [] if f is None else [("rope_freqs", f, "config.json rope_parameters (llama3)")]


def write_llama_kvs(w: gguf.GGUFWriter, model) -> None:
    """``LlamaModel.set_gguf_parameters``'s additions."""
    w.add_vocab_size(model.hparams.vocab_size)
    w.add_rope_dimension_count(model.hparams.head_dim)


def _read(config, need, base) -> dict:
    return {"norm_topk_prob": True} if base["moe"] else {}


SPECS = (
    ArchSpec("MixtralForCausalLM", MODEL_ARCH.LLAMA, LLAMA_GLOBALS, (MOE_FUSED, MOE_LEGACY), read_hparams=_read,
             write_kvs=write_llama_kvs, extra_tensors=extra_tensors, writes_add_prefix=True),
    ArchSpec("MistralForCausalLM", MODEL_ARCH.LLAMA, LLAMA_GLOBALS, (DENSE,), write_kvs=write_llama_kvs,
             extra_tensors=extra_tensors, writes_add_prefix=True),
    ArchSpec("LlamaForCausalLM", MODEL_ARCH.LLAMA, LLAMA_GLOBALS, (DENSE,), write_kvs=write_llama_kvs,
             extra_tensors=extra_tensors, writes_add_prefix=True),
)  # fmt: skip

FILES = (FileSpec("llama"),)
