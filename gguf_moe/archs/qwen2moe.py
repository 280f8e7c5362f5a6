"""Qwen2-MoE (``Qwen2MoeForCausalLM``, what mergekit-moe writes for Qwen2 bases), GGUF
``qwen2moe`` as llama.cpp's ``Qwen2MoeModel`` writes it: no Q/K permutation (NEOX rotary),
Q/K/V biases, routed experts in either layout, and a sigmoid-gated shared expert
(``mlp.shared_expert.*`` -> ``ffn_*_shexp``, ``mlp.shared_expert_gate`` ->
``ffn_gate_inp_shexp``).

With tied embeddings (Qwen2.5 bases up to 3B) there is no ``lm_head``; llama.cpp's
``qwen2moe`` requires ``output.weight``, so the embedding matrix is written as it too
(llama.cpp's converter writes a file that does not load).

Routing: llama.cpp's ``qwen2moe`` graph uses the softmax top-k weights as they are.  That
is the source model when ``norm_topk_prob`` is false; with ``norm_topk_prob: true`` (what
mergekit writes) no llama.cpp architecture we know of computes this model (the others with
a gated shared expert have other attention), so the file is written only on request.
"""

from __future__ import annotations

import gguf
from gguf import MODEL_ARCH

from gguf_moe.archs.base import (
    LLAMA_GLOBALS, ROUTING_FLAG, ArchSpec, BlockLayout, FileSpec, Routing, TensorRule, attention_rules, expert_rules,
    fused_expert_rules, routing_words,
)  # fmt: skip

_BLOCK = attention_rules(permute=False, bias=True) + (
    TensorRule("model.layers.{L}.mlp.gate.weight", ("n_expert", "n_embd")),
    TensorRule("model.layers.{L}.mlp.shared_expert.gate_proj.weight", ("n_ff_shexp", "n_embd")),
    TensorRule("model.layers.{L}.mlp.shared_expert.up_proj.weight", ("n_ff_shexp", "n_embd")),
    TensorRule("model.layers.{L}.mlp.shared_expert.down_proj.weight", ("n_embd", "n_ff_shexp")),
    TensorRule("model.layers.{L}.mlp.shared_expert_gate.weight", ("one", "n_embd")),
)

FUSED = BlockLayout("qwen2moe_fused", "model.layers.{L}.mlp.experts.gate_up_proj", _BLOCK + fused_expert_rules(), True)
LEGACY = BlockLayout(
    "qwen2moe_legacy",
    "model.layers.{L}.mlp.experts.0.gate_proj.weight",
    _BLOCK + expert_rules("model.layers.{L}.mlp.experts.{E}.{p}.weight", "model.layers.{L}.mlp.experts.{p}"),
    True,
)


def _read(config, need, base) -> dict:
    return {"norm_topk_prob": bool(config.get("norm_topk_prob", False)), "n_shared_experts": 1}


def _routing(hp) -> Routing:
    shared = "sigmoid-gated shared expert"
    src = routing_words(hp.n_expert_used, hp.norm_topk_prob, shared, n_expert=hp.n_expert)
    file = routing_words(hp.n_expert_used, False, shared, n_expert=hp.n_expert)
    if not hp.norm_topk_prob or hp.n_expert_used == hp.n_expert:
        return Routing(MODEL_ARCH.QWEN2MOE, file, src)
    return Routing(
        MODEL_ARCH.QWEN2MOE, file, src, faithful=False,
        why=f"config.json has norm_topk_prob: true (top-{hp.n_expert_used} router weights renormalised), but "
        "llama.cpp's qwen2moe graph does not renormalise them and no llama.cpp architecture computes a Qwen2-MoE "
        f"with renormalised routing; {ROUTING_FLAG} writes llama.cpp's qwen2moe file anyway",
    )  # fmt: skip


def write_kvs(w: gguf.GGUFWriter, model) -> None:
    """``Qwen2MoeModel.set_gguf_parameters``'s additions (only keys config.json has)."""
    cfg = model.config
    if cfg.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    if cfg.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))


_GLOBALS = LLAMA_GLOBALS[:2] + (
    TensorRule("lm_head.weight", ("n_vocab", "n_embd"), fallback="model.embed_tokens.weight"),
)

SPECS = (
    ArchSpec(
        "Qwen2MoeForCausalLM", MODEL_ARCH.QWEN2MOE, _GLOBALS, (FUSED, LEGACY),
        expert_count_keys=("num_experts",), expert_ff_key="moe_intermediate_size",
        shared_ff_key="shared_expert_intermediate_size", read_hparams=_read, routing=_routing, write_kvs=write_kvs,
    ),
)  # fmt: skip

FILES = (
    FileSpec("qwen2moe", ff_exp_key="expert_feed_forward_length", shexp="gated",
             shexp_ff=lambda kv: kv.get("expert_shared_feed_forward_length") or kv.get("feed_forward_length"),
             renormalises=False),
)  # fmt: skip
