"""Qwen3-MoE (``Qwen3MoeForCausalLM``, mergekit-moe's output for Qwen3 dense experts), GGUF
``qwen3moe`` as llama.cpp's ``Qwen3MoeModel`` writes it: NEOX rotary (no Q/K permutation),
per-head Q/K RMS norms (``self_attn.q_norm``/``k_norm`` -> ``attn_q_norm``/``attn_k_norm``),
no shared expert.  Experts in both layouts: packed ``mlp.experts.gate_up_proj`` +
``mlp.experts.down_proj`` (Transformers 5) or ``mlp.experts.{E}.{gate,up,down}_proj``.

Routing: llama.cpp's ``qwen3moe`` graph always renormalises the top-k weights, which is the
source model with ``norm_topk_prob: true`` (what mergekit writes).  With
``norm_topk_prob: false`` no llama.cpp architecture with this attention leaves them as
they are, so that file is written only on request.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from gguf_moe.archs import qwen2moe
from gguf_moe.archs.base import (
    LLAMA_GLOBALS, ROUTING_FLAG, ArchSpec, BlockLayout, FileSpec, Routing, TensorRule, attention_rules, expert_rules,
    fused_expert_rules, routing_words,
)  # fmt: skip

_BLOCK = attention_rules(permute=False, bias=True, qk_norm=True) + (
    TensorRule("model.layers.{L}.mlp.gate.weight", ("n_expert", "n_embd")),
)

FUSED = BlockLayout("qwen3moe_fused", "model.layers.{L}.mlp.experts.gate_up_proj", _BLOCK + fused_expert_rules(), True)
LEGACY = BlockLayout(
    "qwen3moe_legacy",
    "model.layers.{L}.mlp.experts.0.gate_proj.weight",
    _BLOCK + expert_rules("model.layers.{L}.mlp.experts.{E}.{p}.weight", "model.layers.{L}.mlp.experts.{p}"),
    True,
)


def _read(config, need, base) -> dict:
    return {"norm_topk_prob": bool(config.get("norm_topk_prob", False))}


def _routing(hp) -> Routing:
    src = routing_words(hp.n_expert_used, hp.norm_topk_prob, n_expert=hp.n_expert)
    file = routing_words(hp.n_expert_used, True, n_expert=hp.n_expert)
    if hp.norm_topk_prob or hp.n_expert_used == hp.n_expert:
        return Routing(MODEL_ARCH.QWEN3MOE, file, src)
    return Routing(
        MODEL_ARCH.QWEN3MOE, file, src, faithful=False,
        why=f"config.json has norm_topk_prob: false (top-{hp.n_expert_used} router weights used as they are), but "
        "llama.cpp's qwen3moe graph always renormalises them and no llama.cpp architecture with Qwen3 attention "
        f"leaves them as they are; {ROUTING_FLAG} writes llama.cpp's qwen3moe file anyway",
    )  # fmt: skip


SPECS = (
    ArchSpec(
        "Qwen3MoeForCausalLM", MODEL_ARCH.QWEN3MOE, LLAMA_GLOBALS, (FUSED, LEGACY),
        expert_count_keys=("num_experts",), expert_ff_key="moe_intermediate_size",
        read_hparams=_read, routing=_routing, write_kvs=qwen2moe.write_kvs,
    ),
)  # fmt: skip

FILES = (FileSpec("qwen3moe", ff_exp_key="expert_feed_forward_length", qk_norm=True),)
