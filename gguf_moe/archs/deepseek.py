"""DeepSeek-MoE v1 (``DeepseekForCausalLM``, model_type ``deepseek``; what mergekit-moe
writes for Llama/Mistral experts with ``architecture: deepseek``): llama attention (Q/K
permuted for llama.cpp's rotary layout), router ``mlp.gate``, routed experts
``mlp.experts.{E}.{gate,up,down}_proj`` and, when ``n_shared_experts`` is set, an ungated
shared expert ``mlp.shared_experts.*`` of ``n_shared_experts * moe_intermediate_size``.

Routing decides the llama.cpp architecture, so that the file computes the source model:

* shared expert, ``norm_topk_prob: false``: ``deepseek`` (llama.cpp's own conversion);
* shared expert, ``norm_topk_prob: true``: ``granitemoe`` (llama attention, renormalised
  softmax top-k, ungated shared expert; logit scale 1);
* no shared expert, ``norm_topk_prob: true``: ``llama`` with experts (a Mixtral);
* no shared expert, ``norm_topk_prob: false``: none (llama.cpp's ``deepseek`` does not load
  without shared-expert tensors and ``llama`` renormalises); written as ``llama`` only on
  request.
"""

from __future__ import annotations

import gguf
from gguf import MODEL_ARCH

from gguf_moe.archs import llama
from gguf_moe.archs.base import (
    LLAMA_GLOBALS, ROUTING_FLAG, ArchSpec, BlockLayout, FileSpec, Routing, TensorRule, attention_rules, expert_rules,
    routing_words,
)  # fmt: skip
from gguf_moe.errors import ConfigError

_BLOCK = (
    attention_rules(permute=True)
    + (TensorRule("model.layers.{L}.mlp.gate.weight", ("n_expert", "n_embd")),)
    + expert_rules("model.layers.{L}.mlp.experts.{E}.{p}.weight", "model.layers.{L}.mlp.experts.{p}")
)
_SHARED = tuple(
    TensorRule(f"model.layers.{{L}}.mlp.shared_experts.{p}.weight", shape)
    for p, shape in (
        ("gate_proj", ("n_ff_shexp", "n_embd")),
        ("up_proj", ("n_ff_shexp", "n_embd")),
        ("down_proj", ("n_embd", "n_ff_shexp")),
    )
)

SHARED = BlockLayout("deepseek_shared", "model.layers.{L}.mlp.shared_experts.gate_proj.weight", _BLOCK + _SHARED, True)
ROUTED = BlockLayout("deepseek", "model.layers.{L}.mlp.experts.0.gate_proj.weight", _BLOCK, True)


def _read(config, need, base) -> dict:
    where = base["config_path"]
    if config.get("first_k_dense_replace", 0) not in (0, None):
        raise ConfigError(
            f"{where}: first_k_dense_replace is {config['first_k_dense_replace']}; only models with experts in every "
            "layer are supported"
        )
    if config.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"{where}: moe_layer_freq {config['moe_layer_freq']} makes some layers dense; not supported")
    rope = base["hp"].get("rope_type")
    if rope not in (None, "default"):
        raise ConfigError(
            f"{where}: rope scaling {rope!r} in a DeepSeek-MoE merge is not supported (llama.cpp's DeepSeek conversion "
            "drops it, and the rotary factors of Llama 3.1 have no place in its file)"
        )
    func = config.get("scoring_func", "softmax")
    if func != "softmax":
        raise ConfigError(f"{where}: scoring_func {func!r} is not supported (DeepSeek-MoE v1 routes with softmax)")
    n_shared = config.get("n_shared_experts")
    if n_shared is not None and (not isinstance(n_shared, int) or isinstance(n_shared, bool) or n_shared < 0):
        raise ConfigError(f"{where}: n_shared_experts must be a non-negative integer or null, found {n_shared!r}")
    n_shared = n_shared or 0
    if base["layout"] == SHARED.name and not n_shared:
        raise ConfigError(
            f"{where}: the checkpoint has shared-expert tensors (mlp.shared_experts.*) but n_shared_experts is "
            f"{config.get('n_shared_experts')!r}; set it"
        )
    if base["layout"] == ROUTED.name and n_shared:
        raise ConfigError(
            f"{where}: n_shared_experts is {n_shared} but the checkpoint has no mlp.shared_experts.* tensors"
        )
    return {
        "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
        "n_shared_experts": n_shared,
        "n_ff_shexp": n_shared * need("moe_intermediate_size"),
    }


def _routing(hp) -> Routing:
    shared = "ungated shared expert" if hp.n_shared_experts else ""
    src = routing_words(hp.n_expert_used, hp.norm_topk_prob, shared, n_expert=hp.n_expert)
    same = hp.n_expert_used == hp.n_expert  # all experts: the weights already sum to 1
    if hp.n_shared_experts:
        if hp.norm_topk_prob and not same:
            return Routing(MODEL_ARCH.GRANITE_MOE, src, src, feed_forward="n_ff_exp")
        return Routing(MODEL_ARCH.DEEPSEEK, routing_words(hp.n_expert_used, False, shared, n_expert=hp.n_expert), src)
    renormalised = routing_words(hp.n_expert_used, True, n_expert=hp.n_expert)
    if hp.norm_topk_prob or same:
        return Routing(MODEL_ARCH.LLAMA, renormalised, src, feed_forward="n_ff_exp")
    return Routing(
        MODEL_ARCH.LLAMA, renormalised, src, faithful=False, feed_forward="n_ff_exp",
        why=f"config.json has norm_topk_prob: false and no shared expert (top-{hp.n_expert_used} router weights used "
        "as they are): llama.cpp's deepseek architecture needs a shared expert and llama renormalises the weights; "
        f"{ROUTING_FLAG} writes a llama file with renormalised routing anyway",
    )  # fmt: skip


def write_kvs(w: gguf.GGUFWriter, model) -> None:
    hp, cfg = model.hparams, model.config
    if model.gguf_arch == MODEL_ARCH.DEEPSEEK:  # DeepseekModel.set_gguf_parameters
        w.add_rope_dimension_count(hp.head_dim)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace") or 0))
        w.add_vocab_size(hp.vocab_size)
        w.add_expert_feed_forward_length(hp.n_ff_exp)
        w.add_expert_weights_scale(1.0)
        w.add_expert_shared_count(hp.n_shared_experts)
    elif model.gguf_arch == MODEL_ARCH.GRANITE_MOE:
        w.add_vocab_size(hp.vocab_size)
        w.add_rope_dimension_count(hp.head_dim)
        w.add_logit_scale(1.0)
        w.add_expert_shared_feed_forward_length(hp.n_ff_shexp)
    else:
        llama.write_llama_kvs(w, model)


SPECS = (
    ArchSpec(
        "DeepseekForCausalLM", MODEL_ARCH.DEEPSEEK, LLAMA_GLOBALS, (SHARED, ROUTED),
        expert_count_keys=("n_routed_experts",), expert_ff_key="moe_intermediate_size",
        read_hparams=_read, routing=_routing, write_kvs=write_kvs,
    ),
)  # fmt: skip


def _deepseek_shexp_ff(kv) -> int | None:
    n = kv.get("expert_shared_count")
    ff = kv.get("expert_feed_forward_length")
    return int(n) * int(ff) if n and ff else None


FILES = (
    FileSpec("deepseek", ff_exp_key="expert_feed_forward_length", shexp="ungated", shexp_ff=_deepseek_shexp_ff,
             renormalises=False),
    FileSpec("granitemoe", shexp="ungated", shexp_ff=lambda kv: kv.get("expert_shared_feed_forward_length")),
)  # fmt: skip
