"""Output presets and the per-tensor type each one gives.

Quantized presets (Q4_K_M, Q5_K_S, Q8_0, ...) follow llama.cpp's ``llama-quantize``
(``src/llama-quant.cpp``: ``tensor_allows_quantization``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``), so a file we quantize directly holds the same type for every
tensor as ``convert_hf_to_gguf.py --outtype bf16`` followed by ``llama-quantize``.  Float
presets (F32, F16, BF16) follow ``convert_hf_to_gguf.py`` (``ModelBase.prepare_tensors``).
For the llama architecture the two rule sets agree on Q8_0.

Shapes are given in numpy order (slowest axis first); ``ne`` (ggml order) is the reverse.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

import quant
from gguf_moe.errors import GgufMoeError

__all__ = [
    "Preset",
    "PRESETS",
    "get_preset",
    "llama_sort_key",
    "layer_of",
    "n_dims",
    "choose_types",
    "allows_quantization",
    "writable",
]


@dataclass(frozen=True)
class Preset:
    """One output flavour: ``name`` as the user types it, ``file_type`` as llama.cpp's
    ``enum llama_ftype`` (written to ``general.file_type``), ``default`` the ggml type
    most weight matrices get."""

    name: str
    file_type: int
    default: T

    @property
    def is_float(self) -> bool:
        """True for F32/F16/BF16 (a plain conversion, no block quantization)."""
        return self.default in (T.F32, T.F16, T.BF16)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("F32", 0, T.F32),  # LLAMA_FTYPE_ALL_F32
        Preset("F16", 1, T.F16),  # LLAMA_FTYPE_MOSTLY_F16
        Preset("BF16", 32, T.BF16),  # LLAMA_FTYPE_MOSTLY_BF16
        Preset("Q8_0", 7, T.Q8_0),
        Preset("Q4_0", 2, T.Q4_0),
        Preset("Q5_0", 8, T.Q5_0),
        Preset("Q4_1", 3, T.Q4_1),
        Preset("Q5_1", 9, T.Q5_1),
        Preset("Q2_K", 10, T.Q2_K),
        Preset("Q3_K_S", 11, T.Q3_K),
        Preset("Q3_K_M", 12, T.Q3_K),
        Preset("Q3_K_L", 13, T.Q3_K),
        Preset("Q4_K_S", 14, T.Q4_K),
        Preset("Q4_K_M", 15, T.Q4_K),
        Preset("Q5_K_S", 16, T.Q5_K),
        Preset("Q5_K_M", 17, T.Q5_K),
        Preset("Q6_K", 18, T.Q6_K),
    )
}


def writable(t: T) -> bool:
    """Can gguf-moe write tensors of ggml type ``t`` (is it in ``quant.QTYPES``)?"""
    return t.name in quant.QTYPES


def _lookup(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    key = str(name).strip().upper()
    try:
        return PRESETS[key]
    except KeyError:
        raise GgufMoeError(f"unknown output type {name!r}; choose one of: {', '.join(PRESETS)}") from None


def get_preset(name: str | Preset) -> Preset:
    """Look a preset up by name, case-insensitively (``q4_k_m`` works).

    A preset whose main type has no quantizer in ``quant`` is an error here, so a command
    line naming it fails before any work is done."""
    p = _lookup(name)
    if not writable(p.default):
        usable = ", ".join(n for n, q in PRESETS.items() if writable(q.default))
        raise GgufMoeError(
            f"output type {p.name} needs the {p.default.name} quantizer, which this version of gguf-moe lacks; "
            f"choose one of: {usable}"
        )
    return p


# ``sscanf(name, "blk.%d.", &layer)``: %d skips C whitespace and takes an optional sign.
_BLK = re.compile(r"blk\.[ \t\n\v\f\r]*([+-]?[0-9]+)")


def layer_of(name: str) -> int | None:
    """Block number parsed as llama.cpp does (``sscanf("blk.%d.")``); None if absent."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def llama_sort_key(name: str) -> tuple[int, bytes]:
    """Sort key giving llama.cpp's tensor order (``weight_name_comparer``).

    Block number first (numerically; -1 for tensors outside a block, so ``output.weight``,
    ``output_norm.weight`` and ``token_embd.weight`` come first), then the name byte-wise.
    llama-quantize writes tensors in this order whatever the input order was.
    """
    layer = layer_of(name)
    return (-1 if layer is None else layer, name.encode("utf-8"))


def n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims`` for a numpy-order shape: trailing 1s of ``ne`` (leading 1s here) don't count."""
    ne = list(reversed(tuple(int(d) for d in shape)))
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return max(n, 1)


# Substrings llama.cpp never quantizes (tensor_allows_quantization), beyond the
# 1-D / "_norm.weight" / not-"weight" rules.  Most belong to other architectures but
# cost nothing to honour.
_NEVER_QUANTIZE = (
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZE_EXACT = ("position_embd.weight", "token_types.weight")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama-quantize's ``tensor_allows_quantization`` (default params): may this tensor
    change type at all?  Tensors for which this is False are copied as they are (F32)."""
    if n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if "_norm.weight" in name or name in _NEVER_QUANTIZE_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZE)


# Converter (convert_hf_to_gguf.py) F32 rule: 1-D, *_norm.weight, not ".weight", and
# these tensor kinds (the ones a llama/qwen2moe model can have).
_CONVERTER_F32 = re.compile(
    r"^(blk\.\d+\.ffn_gate_inp\.weight|blk\.\d+\.ffn_gate_inp_shexp\.weight|position_embd\.weight"
    r"|token_types\.weight|blk\.\d+\.ssm_conv1d\.weight|blk\.\d+\.shortconv\.conv\.weight)$"
)


def _converter_type(name: str, shape: Sequence[int], outtype: T) -> T:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if _CONVERTER_F32.match(name) or name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return T.F32
    if outtype == T.Q8_0 and int(shape[-1]) % 32:
        return T.F16  # gguf-py refuses the shape; the converter falls back to F16
    return outtype


# --------------------------------------------------------------------------- llama-quantize


def _category(name: str) -> str:
    """``tensor_get_category``: substring tests, in llama.cpp's order.  ATTENTION_QKV and
    ATTENTION_KV_B are folded into "attn_v": llama.cpp handles all three in its attn_v
    branch (``category_is_attn_v``) before any QKV-specific rule, for these presets."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if sub in name:
            return cat
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    # C integer division on non-negative ints; (i - n/8) may be negative only when
    # i < n/8, which the first test already accepts.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _blck(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def _fallback(name: str, ne0: int, t: T) -> T:
    """``tensor_type_fallback``: a type whose block size divides ``ne0``."""
    if ne0 % _blck(t) == 0:
        return t
    alt = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}.get(t)
    if alt is None:
        if _blck(t) > 32:
            raise GgufMoeError(f"{name}: no fallback type for {t.name} with row length {ne0}")
        alt = t
    return alt if ne0 % _blck(alt) == 0 else T.F16


class _State:
    def __init__(
        self, n_attention_wv: int, n_layer: int, n_expert: int, tied: bool, is_70b: bool, has_imatrix: bool, n_gqa: int
    ):
        self.n_attention_wv = n_attention_wv
        self.i_attention_wv = 0
        self.n_layer = n_layer
        self.i_ffn = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
        self.n_expert = n_expert
        self.tied = tied
        self.is_70b = is_70b
        self.has_imatrix = has_imatrix
        self.n_gqa = n_gqa

    def layer(self, cat: str, name: str) -> int:
        """``layer_info``: the name's block number for MoE models, else a running counter."""
        if max(1, self.n_expert) > 1:
            i = layer_of(name)
            if i is None:
                raise GgufMoeError(f"{name}: cannot determine the layer (expected a 'blk.N.' prefix)")
            if not 0 <= i < self.n_layer:
                raise GgufMoeError(f"{name}: layer {i} is outside [0, {self.n_layer}) (block_count {self.n_layer})")
            return i
        return self.i_ffn[cat]


# attn_output -> Q5_K with exactly 8 experts (llama.cpp's list, restricted to our presets).
_ATTN_OUTPUT_8X = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
# attn_output without 8 experts.
_ATTN_OUTPUT = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}


def _attn_v(st: _State, preset: str, t: T) -> T:
    if preset == "Q2_K":
        t = T.Q4_K if st.n_gqa >= 4 else T.Q3_K
    elif preset == "Q3_K_M":
        t = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
    elif preset == "Q3_K_L":
        t = T.Q5_K
    elif preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
        t = T.Q6_K
    elif preset == "Q4_K_S" and st.i_attention_wv < 4:
        t = T.Q5_K
    if st.is_70b and t in (T.Q3_K, T.Q4_K):
        t = T.Q5_K
    if st.n_expert == 8:
        t = T.Q8_0
    return t


def _ffn_down(st: _State, preset: str, i: int, n: int, t: T) -> T:
    if preset == "Q2_K":
        return T.Q3_K
    if preset == "Q3_K_M":
        return T.Q5_K if i < n // 16 else T.Q4_K  # Q3_K only for falcon's other layers
    if preset == "Q3_K_L":
        return T.Q5_K
    if preset in ("Q4_K_M", "Q5_K_M"):
        return T.Q6_K if _use_more_bits(i, n) else t
    if preset == "Q4_K_S":
        return T.Q5_K if i < n // 8 else t
    if preset in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
        return T.Q4_1 if preset == "Q4_0" else T.Q5_1
    return t


def _impl(st: _State, preset: str, name: str, ne0: int, cat: str, t: T) -> T:
    """``llama_tensor_get_type_impl`` for the presets in PRESETS (k-quant and legacy quants),
    for the architectures gguf-moe writes (llama.cpp's Falcon-only variants are left out)."""
    if cat == "output" or (st.tied and cat == "token_embd"):
        if ne0 % _blck(t) != 0:
            return T.Q8_0
        return t if t == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return t  # only IQ/TQ presets change the untied embedding
    if cat == "attn_v":
        t = _attn_v(st, preset, t)
        st.i_attention_wv += 1
        return t
    if cat == "attn_k":
        return T.Q8_0 if st.n_expert == 8 else t
    if cat == "attn_q":
        return t
    if cat == "ffn_down":
        t = _ffn_down(st, preset, st.layer(cat, name), st.n_layer, t)
        st.i_ffn[cat] += 1
        return t
    if cat == "attn_output":
        if st.n_expert == 8:
            return T.Q5_K if preset in _ATTN_OUTPUT_8X else t
        return _ATTN_OUTPUT.get(preset, t)
    if cat in ("ffn_gate", "ffn_up"):
        st.layer(cat, name)  # validates the name like llama.cpp does
        st.i_ffn[cat] += 1
        return t
    return t


def _gqa_from_shapes(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """n_head / n_head_kv from layer 0's attn_q / attn_k rows (same head size), if present."""
    q = shapes.get("blk.0.attn_q.weight")
    k = shapes.get("blk.0.attn_k.weight")
    if q is None or k is None or len(q) < 2 or len(k) < 2 or k[-2] == 0:
        return None
    return q[-2] // k[-2]


def choose_types(
    preset: str | Preset,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    *,
    n_expert: int,
    n_layer: int,
    has_imatrix: bool = False,
    arch: str = "llama",
    n_head: int | None = None,
    n_head_kv: int | None = None,
    require_writable: bool = True,
) -> dict[str, T]:
    """The ggml type of every tensor under ``preset``.

    ``tensors``: (GGUF name, numpy-order shape) for every tensor of the model, any order
    (llama.cpp's counters run in sorted order; we sort here).  ``n_expert``: expert_count
    (0 or 1 for dense models); ``n_layer``: block_count.  ``has_imatrix`` only changes
    ffn_down of the first n_layer/8 layers for Q4_0/Q5_0 (to Q4_1/Q5_1).
    ``n_head``/``n_head_kv`` matter for Q2_K's attn_v (``n_head / n_head_kv >= 4``) and
    llama's 80-layer GQA ("70B") rule; if omitted they are inferred from the attn_q/attn_k
    shapes.  Tensors llama.cpp never quantizes (1-D, norms, the MoE router) come back as
    F32.  With ``require_writable`` (the default), a type gguf-moe has no quantizer for is a
    GgufMoeError naming the first such tensor; pass False to only ask what llama.cpp picks.
    """
    p = _lookup(preset)
    names = [n for n, _ in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise GgufMoeError(f"duplicate tensor names: {', '.join(dup[:5])}")
    shapes = {n: tuple(int(d) for d in s) for n, s in tensors}

    if p.is_float:
        return {n: _converter_type(n, shapes[n], p.default) for n in names}

    order = sorted(names, key=llama_sort_key)
    cats = {n: _category(n) for n in order}
    tied = "output.weight" not in shapes
    if n_head is not None and n_head_kv is not None:
        n_gqa = int(n_head) // int(n_head_kv) if n_head_kv else 0
    else:
        g = _gqa_from_shapes(shapes)
        n_gqa = 1 if g is None else g
    is_70b = False
    if arch == "llama" and n_layer == 80 and n_expert != 8:
        if n_head is None or n_head_kv is None:
            q = shapes.get("blk.0.attn_q.weight")
            k = shapes.get("blk.0.attn_k.weight")
            is_70b = q is not None and k is not None and q[0] != k[0]
        else:
            is_70b = n_head != n_head_kv
    st = _State(
        n_attention_wv=sum(c == "attn_v" for c in cats.values()),
        n_layer=n_layer,
        n_expert=n_expert,
        tied=tied,
        is_70b=is_70b,
        has_imatrix=has_imatrix,
        n_gqa=n_gqa,
    )
    out: dict[str, T] = {}
    for n in order:
        shape = shapes[n]
        if not allows_quantization(n, shape):
            out[n] = T.F32
            continue
        ne0 = shape[-1]
        t = _impl(st, p.name, n, ne0, cats[n], p.default)
        t = _fallback(n, ne0, t)
        if require_writable and not writable(t):
            raise GgufMoeError(
                f"{n}: {p.name}{' with an imatrix' if has_imatrix else ''} makes llama.cpp use {t.name} for this "
                f"tensor, and this version of gguf-moe has no {t.name} quantizer; choose another output type"
            )
        out[n] = t
    return {n: out[n] for n in names}
