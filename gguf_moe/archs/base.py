"""The vocabulary every architecture module speaks: tensor rules, block layouts, the typed
hyperparameters, routing, and :class:`ArchSpec`, the one object an architecture module
exports.  Nothing here knows a particular architecture."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

if TYPE_CHECKING:
    from gguf_moe.source import SourceModel

__all__ = [
    "TensorRule",
    "BlockLayout",
    "HParams",
    "Routing",
    "ArchSpec",
    "tensor_name_map",
    "gguf_name",
    "ROUTING_FLAG",
]

#: the convert option that writes a file whose routing differs from the source's
ROUTING_FLAG = "--allow-routing-mismatch"


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
    heads.  ``optional``: absence is not an error (``lm_head`` with tied embeddings);
    ``fallback``: the tensor read in its absence.
    ``shape``: expected numpy shape as :class:`HParams` fields (``"n_expert"``, ``"n_ff"``,
    ...), checked against the files.
    """

    hf: str
    shape: tuple[str, ...]
    kind: str = "plain"
    map_as: str | None = None
    part: tuple[int, int] | None = None
    permute: str | None = None
    optional: bool = False
    #: when ``hf`` is absent, read this tensor instead (tied output matrix of an
    #: architecture whose llama.cpp graph requires ``output.weight``)
    fallback: str | None = None


@dataclass(frozen=True)
class BlockLayout:
    """The tensors of one block; ``detect`` is a name (with ``{L}`` = 0) whose presence
    in the checkpoint selects this layout."""

    name: str
    detect: str
    rules: tuple[TensorRule, ...]
    moe: bool


@dataclass(frozen=True)
class HParams:
    """The numbers a conversion needs, checked (``source.normalize_hparams``).

    Field names are the shape words of :class:`TensorRule`; ``hp["n_embd"]`` reads a field
    too, so tables can name them as strings."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    head_dim: int
    head_dim_explicit: bool
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    #: routed top-k weights renormalised to sum 1 (Mixtral always; others ``norm_topk_prob``)
    norm_topk_prob: bool = False
    #: shared experts (DeepSeek ``n_shared_experts``; Qwen2-MoE has one, gated)
    n_shared_experts: int = 0
    n_ctx: int | None = None
    rms_eps: float | None = None
    rope: Mapping[str, Any] = field(default_factory=dict)
    rope_theta: float | None = None
    rope_type: str | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    dtype: str | None = None

    @property
    def n_vocab(self) -> int:
        return self.vocab_size

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def one(self) -> int:
        return 1

    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Routing:
    """What a file's expert routing computes, and whether that is the source's routing.

    ``gguf_arch``: the llama.cpp architecture written (chosen so its graph computes the
    source model where one does); ``file``/``source``: the routing in words;
    ``faithful``: they are the same function; ``why``: when not, the reason in one line."""

    gguf_arch: MODEL_ARCH
    file: str
    source: str
    faithful: bool = True
    why: str = ""
    #: the HParams field written as ``{arch}.feed_forward_length`` (the expert size where
    #: the target graph sizes its experts by it)
    feed_forward: str = "n_ff"

    @property
    def arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]


def routing_words(top_k: int, renormalised: bool, shared: str = "", *, n_expert: int = 0) -> str:
    """``softmax top-2, renormalised`` and the like: the words inspect/validate print.  With
    every expert used the weights sum to 1 either way: ``softmax over all 4 experts``."""
    if n_expert and top_k >= n_expert:
        s = f"softmax over all {n_expert} experts"
    else:
        s = f"softmax top-{top_k}, {'renormalised' if renormalised else 'not renormalised'}"
    return s + (f", {shared}" if shared else "")


@dataclass(frozen=True)
class ArchSpec:
    """A Hugging Face architecture we convert, and everything about it.

    * ``hf_arch``, ``gguf_arch``: the ``architectures`` entry of config.json and llama.cpp's
      architecture for the same model (the converter's ``model_arch``);
    * ``globals``, ``layouts``: the tensors outside the blocks and the block layouts, tried
      in order (``BlockLayout.detect``);
    * ``expert_count_keys`` / ``expert_ff_key`` / ``shared_ff_key``: config.json keys for the
      number of experts, the routed and the shared experts' hidden size;
    * ``read_hparams(config, need, base) -> dict``: architecture-specific HParams fields
      (``base``: ``moe``, ``layout``, ``config_path`` and the common fields ``hp``);
    * ``routing(hp) -> Routing``: which llama.cpp architecture computes this model;
    * ``write_kvs(w, model)``: the architecture's GGUF keys after the common ones
      (``metadata``), for the target ``model.gguf_arch``;
    * ``extra_tensors(hp) -> [(hf-like name, float32 array)]``: computed tensors
      (``rope_freqs``);
    * ``file_tensors(arch, hp_file) -> {name: ne}``: what ``validate`` expects in a file
      of a llama.cpp architecture this module writes (None entries are wildcards).
    """

    hf_arch: str
    gguf_arch: MODEL_ARCH
    globals: tuple[TensorRule, ...]
    layouts: tuple[BlockLayout, ...]
    expert_count_keys: tuple[str, ...] = ("num_local_experts",)
    expert_ff_key: str | None = None
    shared_ff_key: str | None = None
    read_hparams: Callable[..., dict[str, Any]] | None = None
    routing: Callable[[HParams], Routing] | None = None
    write_kvs: Callable[[gguf.GGUFWriter, SourceModel], None] | None = None
    extra_tensors: Callable[[HParams], list] | None = None
    #: the converter writes ``tokenizer.ggml.add_space_prefix`` (LlamaModel.set_vocab)
    writes_add_prefix: bool = False

    def route(self, hp: HParams) -> Routing:
        if self.routing is not None:
            return self.routing(hp)
        words = routing_words(hp.n_expert_used, True, n_expert=hp.n_expert) if hp.n_expert else "dense"
        return Routing(self.gguf_arch, words, words)


@functools.cache
def tensor_name_map(arch: MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_name(arch: MODEL_ARCH, n_blocks: int, hf_name: str) -> tuple[str, gguf.MODEL_TENSOR] | None:
    """(GGUF name with ``.weight``/``.bias``, tensor kind) for a Hugging Face name, or None.
    Names without a suffix (stacked experts) get ``.weight``."""
    tmap = tensor_name_map(arch, n_blocks)
    suffixed = hf_name.endswith((".weight", ".bias"))
    hit = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias") if suffixed else ())
    if hit is None:
        return None
    kind, name = hit
    return (name if suffixed else name + ".weight"), kind


def expert_rules(hf_fmt: str, map_fmt: str, projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
    """Rules for per-expert 2-D tensors (``hf_fmt`` with ``{L}``, ``{E}``, ``{p}``): gate,
    up, down in that order."""
    g, u, d = projs
    row = ("n_expert", "n_ff_exp", "n_embd")
    shapes = {g: row, u: row, d: ("n_expert", "n_embd", "n_ff_exp")}
    return tuple(
        TensorRule(hf_fmt.format(L="{L}", E="{E}", p=p), shapes[p], kind="experts", map_as=map_fmt.format(L="{L}", p=p))
        for p in (g, u, d)
    )


def fused_expert_rules(prefix: str = "model.layers.{L}.mlp.experts") -> tuple[TensorRule, ...]:
    """Transformers 5 packed experts: ``gate_up_proj`` ``[E, 2*ff, d]`` (per expert the gate
    rows, then the up rows) and ``down_proj`` ``[E, d, ff]``."""
    return (
        TensorRule(f"{prefix}.gate_up_proj", ("n_expert", "n_ff_exp", "n_embd"), kind="fused_experts", part=(0, 2),
                   map_as=f"{prefix}.gate_proj"),
        TensorRule(f"{prefix}.gate_up_proj", ("n_expert", "n_ff_exp", "n_embd"), kind="fused_experts", part=(1, 2),
                   map_as=f"{prefix}.up_proj"),
        TensorRule(f"{prefix}.down_proj", ("n_expert", "n_embd", "n_ff_exp"), kind="fused_experts", part=(0, 1),
                   map_as=f"{prefix}.down_proj"),
    )  # fmt: skip


def attention_rules(*, permute: bool, bias: bool = False, qk_norm: bool = False) -> tuple[TensorRule, ...]:
    """Input norm, Q/K/V/O (optional Q/K/V biases, per-head Q/K norms) and the FFN norm."""
    p = "model.layers.{L}."
    out = [TensorRule(p + "input_layernorm.weight", ("n_embd",))]
    for n, rows in (("q", "n_q"), ("k", "n_kv"), ("v", "n_kv")):
        perm = n if permute and n != "v" else None
        out.append(TensorRule(p + f"self_attn.{n}_proj.weight", (rows, "n_embd"), permute=perm))
        if bias:
            out.append(TensorRule(p + f"self_attn.{n}_proj.bias", (rows,), optional=True))
    out.append(TensorRule(p + "self_attn.o_proj.weight", ("n_embd", "n_q")))
    if qk_norm:
        out.append(TensorRule(p + "self_attn.q_norm.weight", ("head_dim",)))
        out.append(TensorRule(p + "self_attn.k_norm.weight", ("head_dim",)))
    out.append(TensorRule(p + "post_attention_layernorm.weight", ("n_embd",)))
    return tuple(out)


LLAMA_GLOBALS = (
    TensorRule("model.embed_tokens.weight", ("n_vocab", "n_embd")),
    TensorRule("model.norm.weight", ("n_embd",)),
    # Absent with tied embeddings: llama.cpp then uses token_embd as the output matrix.
    TensorRule("lm_head.weight", ("n_vocab", "n_embd"), optional=True),
)


@dataclass(frozen=True)
class FileSpec:
    """What ``validate`` expects in a GGUF file of one llama.cpp architecture that gguf-moe
    writes, beyond the llama tensor set (``validate`` reads the ``{arch}.*`` keys named
    here from the file):

    * ``ff_exp_key``: the key sizing the routed experts (None: ``feed_forward_length``);
    * ``shexp``: ``""`` (none), ``"gated"`` (sigmoid-gated, with ``ffn_gate_inp_shexp``) or
      ``"ungated"`` shared expert; ``shexp_ff(kv)`` its hidden size from the keys, None
      when the file has none;
    * ``qk_norm``: per-head ``attn_q_norm``/``attn_k_norm``;
    * ``renormalises``: the graph renormalises the top-k router weights (None: as the key
      ``{arch}.expert_weights_norm`` says).
    """

    arch: str
    ff_exp_key: str | None = None
    shexp: str = ""
    shexp_ff: Callable[[Mapping[str, Any]], int | None] | None = None
    qk_norm: bool = False
    renormalises: bool | None = True

    def routing(self, kv: Mapping[str, Any]) -> str | None:
        """The file's routing in words (``routing_words``), from its keys; None for a dense
        file."""
        n_expert = int(kv.get("expert_count") or 0)
        used = kv.get("expert_used_count")
        used = max(used) if isinstance(used, list) else used
        if not n_expert or not used:
            return None
        norm = self.renormalises if self.renormalises is not None else bool(kv.get("expert_weights_norm", False))
        shared = ""
        if self.shexp and (self.shexp_ff is None or self.shexp_ff(kv)):
            shared = "sigmoid-gated shared expert" if self.shexp == "gated" else "ungated shared expert"
        return routing_words(int(used), norm, shared, n_expert=n_expert)
