"""Architecture tables: which Hugging Face tensors make up a model and what they become.

Everything here is data.  A model is described by an :class:`ArchSpec` (looked up by the
``architectures`` entry of config.json) holding the tensors outside the blocks and a
choice of per-block layouts.  GGUF names are never typed here: every Hugging Face name is
mapped through gguf-py's ``TensorNameMap`` for the target architecture, as llama.cpp's
converter does (``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks)``).

Mixtral checkpoints come in two layouts, both accepted:

* ``moe_legacy``: one 2-D tensor per expert,
  ``model.layers.{L}.block_sparse_moe.experts.{E}.w1|w2|w3.weight`` and the router
  ``block_sparse_moe.gate.weight`` (Transformers 4.x, older mergekit-moe);
* ``moe_fused``: ``model.layers.{L}.mlp.experts.gate_up_proj`` ``[E, 2*ff, d]`` (per
  expert the gate rows first, then the up rows: Transformers 5 ``MixtralExperts`` runs
  ``linear(x, gate_up_proj[e]).chunk(2, dim=-1)``), ``mlp.experts.down_proj``
  ``[E, d, ff]`` and the router ``mlp.gate.weight`` (Transformers 5, current mergekit-moe).

Both produce the same ``blk.{L}.ffn_{gate,up,down}_exps.weight`` tensors, experts
stacked on the slowest axis (numpy ``[E, out, in]``).

Qwen2-MoE (``Qwen2MoeForCausalLM``, what mergekit-moe writes for Qwen bases) becomes GGUF
``qwen2moe`` as in llama.cpp's ``Qwen2MoeModel``: no Q/K permutation (NEOX rotary), Q/K/V
biases, routed experts in either layout, plus a shared expert
(``mlp.shared_expert.*`` -> ``ffn_*_shexp``, ``mlp.shared_expert_gate`` ->
``ffn_gate_inp_shexp``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR

__all__ = [
    "TensorRule",
    "BlockLayout",
    "ArchSpec",
    "ARCHITECTURES",
    "BLOCK_LAYOUTS",
    "IGNORED_SUFFIXES",
    "F32_TENSORS",
    "get_arch",
    "tensor_name_map",
    "gguf_name",
]


@dataclass(frozen=True)
class TensorRule:
    """One GGUF tensor and where its data comes from.

    ``hf``: the Hugging Face tensor name, with ``{L}`` for the block and ``{E}`` for the
    expert.  ``kind``:

    * ``"plain"``: one source tensor, copied (numpy shape kept);
    * ``"experts"``: one 2-D source tensor per expert (``{E}`` in ``hf``), stacked;
    * ``"fused_experts"``: one 3-D source ``[E, rows, cols]``; ``part`` (i, n) takes the
      i-th of n equal row slices of every expert (gate = (0, 2), up = (1, 2)).

    ``map_as``: the name given to ``TensorNameMap`` (defaults to ``hf`` without
    ``.weight``); stacked experts are mapped under their merged name.  ``permute``:
    ``"q"`` / ``"k"`` for llama.cpp's rotary row permutation with ``n_head`` / ``n_head_kv``
    heads.  ``optional``: absence is not an error (``lm_head`` with tied embeddings).
    ``shape``: expected numpy shape as hparams keys (``"n_expert"``, ``"n_ff"``, ...),
    checked against the files.
    """

    hf: str
    shape: tuple[str, ...]
    kind: str = "plain"
    map_as: str | None = None
    part: tuple[int, int] | None = None
    permute: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class BlockLayout:
    """The tensors of one block; ``detect`` is a name (with ``{L}`` = 0) whose presence
    in the checkpoint selects this layout."""

    name: str
    detect: str
    rules: tuple[TensorRule, ...]
    moe: bool


@dataclass(frozen=True)
class ArchSpec:
    """A Hugging Face architecture we convert, and the GGUF architecture it becomes.

    ``expert_count_keys`` / ``expert_ff_key`` / ``shared_ff_key``: the config.json keys for
    the number of experts, the routed experts' and the shared expert's hidden size
    (``None``: the architecture has no such thing / uses ``intermediate_size``)."""

    hf_arch: str
    gguf_arch: MODEL_ARCH
    globals: tuple[TensorRule, ...]
    layouts: tuple[str, ...]  # keys of BLOCK_LAYOUTS, tried in order
    expert_count_keys: tuple[str, ...] = ("num_local_experts",)
    expert_ff_key: str | None = None
    shared_ff_key: str | None = None


_ATTN = (
    TensorRule("model.layers.{L}.input_layernorm.weight", ("n_embd",)),
    TensorRule("model.layers.{L}.self_attn.q_proj.weight", ("n_q", "n_embd"), permute="q"),
    TensorRule("model.layers.{L}.self_attn.k_proj.weight", ("n_kv", "n_embd"), permute="k"),
    TensorRule("model.layers.{L}.self_attn.v_proj.weight", ("n_kv", "n_embd")),
    TensorRule("model.layers.{L}.self_attn.o_proj.weight", ("n_embd", "n_q")),
    TensorRule("model.layers.{L}.post_attention_layernorm.weight", ("n_embd",)),
)

BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "moe_fused": BlockLayout(
        name="moe_fused",
        detect="model.layers.{L}.mlp.experts.gate_up_proj",
        moe=True,
        rules=_ATTN
        + (
            TensorRule("model.layers.{L}.mlp.gate.weight", ("n_expert", "n_embd")),
            TensorRule(
                "model.layers.{L}.mlp.experts.gate_up_proj",
                ("n_expert", "n_ff_exp", "n_embd"),
                kind="fused_experts",
                part=(0, 2),
                map_as="model.layers.{L}.mlp.experts.gate_proj",
            ),
            TensorRule(
                "model.layers.{L}.mlp.experts.gate_up_proj",
                ("n_expert", "n_ff_exp", "n_embd"),
                kind="fused_experts",
                part=(1, 2),
                map_as="model.layers.{L}.mlp.experts.up_proj",
            ),
            TensorRule(
                "model.layers.{L}.mlp.experts.down_proj",
                ("n_expert", "n_embd", "n_ff_exp"),
                kind="fused_experts",
                part=(0, 1),
                map_as="model.layers.{L}.mlp.experts.down_proj",
            ),
        ),
    ),
    "moe_legacy": BlockLayout(
        name="moe_legacy",
        detect="model.layers.{L}.block_sparse_moe.gate.weight",
        moe=True,
        rules=_ATTN
        + (
            TensorRule("model.layers.{L}.block_sparse_moe.gate.weight", ("n_expert", "n_embd")),
            TensorRule(
                "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
                ("n_expert", "n_ff_exp", "n_embd"),
                kind="experts",
                map_as="model.layers.{L}.block_sparse_moe.experts.w1",
            ),
            TensorRule(
                "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
                ("n_expert", "n_ff_exp", "n_embd"),
                kind="experts",
                map_as="model.layers.{L}.block_sparse_moe.experts.w3",
            ),
            TensorRule(
                "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
                ("n_expert", "n_embd", "n_ff_exp"),
                kind="experts",
                map_as="model.layers.{L}.block_sparse_moe.experts.w2",
            ),
        ),
    ),
    "dense": BlockLayout(
        name="dense",
        detect="model.layers.{L}.mlp.gate_proj.weight",
        moe=False,
        rules=_ATTN
        + (
            TensorRule("model.layers.{L}.mlp.gate_proj.weight", ("n_ff", "n_embd")),
            TensorRule("model.layers.{L}.mlp.up_proj.weight", ("n_ff", "n_embd")),
            TensorRule("model.layers.{L}.mlp.down_proj.weight", ("n_embd", "n_ff")),
        ),
    ),
}

_QWEN_ATTN = (
    TensorRule("model.layers.{L}.input_layernorm.weight", ("n_embd",)),
    TensorRule("model.layers.{L}.self_attn.q_proj.weight", ("n_q", "n_embd")),
    TensorRule("model.layers.{L}.self_attn.q_proj.bias", ("n_q",), optional=True),
    TensorRule("model.layers.{L}.self_attn.k_proj.weight", ("n_kv", "n_embd")),
    TensorRule("model.layers.{L}.self_attn.k_proj.bias", ("n_kv",), optional=True),
    TensorRule("model.layers.{L}.self_attn.v_proj.weight", ("n_kv", "n_embd")),
    TensorRule("model.layers.{L}.self_attn.v_proj.bias", ("n_kv",), optional=True),
    TensorRule("model.layers.{L}.self_attn.o_proj.weight", ("n_embd", "n_q")),
    TensorRule("model.layers.{L}.post_attention_layernorm.weight", ("n_embd",)),
    TensorRule("model.layers.{L}.mlp.gate.weight", ("n_expert", "n_embd")),
    TensorRule("model.layers.{L}.mlp.shared_expert.gate_proj.weight", ("n_ff_shexp", "n_embd")),
    TensorRule("model.layers.{L}.mlp.shared_expert.up_proj.weight", ("n_ff_shexp", "n_embd")),
    TensorRule("model.layers.{L}.mlp.shared_expert.down_proj.weight", ("n_embd", "n_ff_shexp")),
    TensorRule("model.layers.{L}.mlp.shared_expert_gate.weight", ("one", "n_embd")),
)

BLOCK_LAYOUTS["qwen2moe_fused"] = BlockLayout(
    name="qwen2moe_fused",
    detect="model.layers.{L}.mlp.experts.gate_up_proj",
    moe=True,
    rules=_QWEN_ATTN
    + tuple(r for r in BLOCK_LAYOUTS["moe_fused"].rules if r.kind == "fused_experts"),
)
BLOCK_LAYOUTS["qwen2moe_legacy"] = BlockLayout(
    name="qwen2moe_legacy",
    detect="model.layers.{L}.mlp.experts.0.gate_proj.weight",
    moe=True,
    rules=_QWEN_ATTN
    + tuple(
        TensorRule(
            f"model.layers.{{L}}.mlp.experts.{{E}}.{proj}.weight",
            shape,
            kind="experts",
            map_as=f"model.layers.{{L}}.mlp.experts.{proj}",
        )
        for proj, shape in (
            ("gate_proj", ("n_expert", "n_ff_exp", "n_embd")),
            ("up_proj", ("n_expert", "n_ff_exp", "n_embd")),
            ("down_proj", ("n_expert", "n_embd", "n_ff_exp")),
        )
    ),
)

_LLAMA_GLOBALS = (
    TensorRule("model.embed_tokens.weight", ("n_vocab", "n_embd")),
    TensorRule("model.norm.weight", ("n_embd",)),
    # Absent with tied embeddings: llama.cpp then uses token_embd as the output matrix.
    TensorRule("lm_head.weight", ("n_vocab", "n_embd"), optional=True),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.hf_arch: spec
    for spec in (
        ArchSpec("MixtralForCausalLM", MODEL_ARCH.LLAMA, _LLAMA_GLOBALS, ("moe_fused", "moe_legacy")),
        ArchSpec("MistralForCausalLM", MODEL_ARCH.LLAMA, _LLAMA_GLOBALS, ("dense",)),
        ArchSpec("LlamaForCausalLM", MODEL_ARCH.LLAMA, _LLAMA_GLOBALS, ("dense",)),
        ArchSpec(
            "Qwen2MoeForCausalLM",
            MODEL_ARCH.QWEN2MOE,
            _LLAMA_GLOBALS,
            ("qwen2moe_fused", "qwen2moe_legacy"),
            expert_count_keys=("num_experts",),
            expert_ff_key="moe_intermediate_size",
            shared_ff_key="shared_expert_intermediate_size",
        ),
    )
}

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


@functools.cache
def tensor_name_map(arch: MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_name(arch: MODEL_ARCH, n_blocks: int, hf_name: str) -> tuple[str, MODEL_TENSOR] | None:
    """(GGUF name with ``.weight``/``.bias``, tensor kind) for a Hugging Face name, or None.
    Names without a suffix (stacked experts) get ``.weight``."""
    tmap = tensor_name_map(arch, n_blocks)
    suffixed = hf_name.endswith((".weight", ".bias"))
    hit = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias") if suffixed else ())
    if hit is None:
        return None
    kind, name = hit
    return (name if suffixed else name + ".weight"), kind
