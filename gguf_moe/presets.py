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
from collections.abc import Mapping, Sequence
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
    "converter_type",
    "allows_quantization",
    "writable",
    "ALIASES",
    "TypeOverrides",
    "parse_ggml_type",
    "parse_tensor_type",
    "requires_imatrix",
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
        Preset("Q2_K_S", 21, T.Q2_K),
        Preset("IQ1_S", 24, T.IQ1_S),
        Preset("IQ1_M", 31, T.IQ1_M),
        Preset("IQ2_XXS", 19, T.IQ2_XXS),
        Preset("IQ2_XS", 20, T.IQ2_XS),
        Preset("IQ2_S", 28, T.IQ2_XS),  # llama_ftype_get_default_type: IQ2_S files are mostly IQ2_XS
        Preset("IQ2_M", 29, T.IQ2_S),
        Preset("IQ3_XXS", 23, T.IQ3_XXS),
        Preset("IQ3_XS", 22, T.IQ3_S),
        Preset("IQ3_S", 26, T.IQ3_S),
        Preset("IQ3_M", 27, T.IQ3_S),
        Preset("IQ4_NL", 25, T.IQ4_NL),
        Preset("IQ4_XS", 30, T.IQ4_XS),
        Preset("MXFP4_MOE", 38, T.MXFP4),
        Preset("TQ1_0", 36, T.TQ1_0),
        Preset("TQ2_0", 37, T.TQ2_0),
    )
}

#: llama-quantize's other names for presets (tools/quantize/quantize.cpp's QUANT_OPTIONS).
ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def writable(t: T) -> bool:
    """Can gguf-moe write tensors of ggml type ``t`` (is it in ``quant.QTYPES``)?"""
    return t.name in quant.QTYPES


def _lookup(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    if key.isdigit():  # llama-quantize also takes the llama_ftype number
        for p in PRESETS.values():
            if p.file_type == int(key):
                return p
    raise GgufMoeError(f"unknown output type {name!r}; choose one of: {', '.join([*PRESETS, *ALIASES])}")


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


def allows_quantization(name: str, shape: Sequence[int], *, quantize_output: bool = True) -> bool:
    """llama-quantize's ``tensor_allows_quantization``: may this tensor change type at all?
    Tensors for which this is False are copied as they are (F32).  ``quantize_output=False``
    is ``--leave-output-tensor`` (``output.weight`` keeps its type)."""
    if n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if "_norm.weight" in name or name in _NEVER_QUANTIZE_EXACT:
        return False
    if not quantize_output and name == "output.weight":
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


def converter_type(name: str, shape: Sequence[int], outtype: T) -> T:
    """The type ``convert_hf_to_gguf.py --outtype OUTTYPE`` gives a tensor (F32 for 1-D
    tensors, norms and the router, else ``outtype``)."""
    return _converter_type(name, tuple(int(d) for d in shape), outtype)


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


# tensor_type_fallback's replacement when the row length is not a multiple of the block.
_FALLBACK = {
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
    **dict.fromkeys((T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def _fallback(name: str, ne0: int, t: T) -> T:
    """``tensor_type_fallback``: a type whose block size divides ``ne0``."""
    if ne0 % _blck(t) == 0:
        return t
    alt = _FALLBACK.get(t)
    if alt is None:
        if _blck(t) > 32:
            raise GgufMoeError(f"{name}: no fallback type for {t.name} with row length {ne0}")
        alt = t
    return alt if ne0 % _blck(alt) == 0 else T.F16


# --------------------------------------------------------------------------- overrides


def parse_ggml_type(name: str) -> T:
    """A ggml type name, case-insensitively (``q8_0``, ``Q4_K``, ``iq4_xs``, ``bf16``), as
    llama-quantize's ``--output-tensor-type`` / ``--token-embedding-type`` /
    ``--tensor-type`` take it.  Unknown names are a GgufMoeError."""
    key = str(name).strip().upper()
    try:
        return T[key]
    except KeyError:
        raise GgufMoeError(f"invalid ggml type {name!r}; e.g. q8_0, q6_K, q4_K, iq4_xs, f16, bf16") from None


# Constructs Python's re accepts but the ECMAScript grammar of std::regex (llama.cpp's
# matcher) rejects: named groups, lookbehind, comments, inline flags, \A and \Z; and POSIX
# bracket classes ([[:digit:]]), which std::regex knows and re would read as plain sets.
_NOT_ECMASCRIPT = re.compile(r"\(\?(P|<|#|[aiLmsux-])|\\[AZ]|\[[:.=]")


def _compile(pattern: str) -> re.Pattern:
    if _NOT_ECMASCRIPT.search(pattern):
        raise GgufMoeError(
            f"tensor type pattern {pattern!r} uses regex syntax llama.cpp (ECMAScript std::regex) does not accept"
        )
    try:
        return re.compile(pattern)
    except re.error as e:
        raise GgufMoeError(f"tensor type pattern {pattern!r} is not a valid regular expression ({e})") from None


def parse_tensor_type(arg: str) -> tuple[str, T]:
    """``PATTERN=TYPE`` as llama-quantize's ``--tensor-type`` reads it: split at the first
    ``=``, the pattern lower-cased, the type a ggml type name."""
    pattern, sep, tname = str(arg).partition("=")
    if not sep:
        raise GgufMoeError(f"malformed tensor type {arg!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
    if not pattern:
        raise GgufMoeError(f"missing tensor name pattern in {arg!r}")
    if not tname:
        raise GgufMoeError(f"missing quantization type in {arg!r}")
    pattern = pattern.lower()
    _compile(pattern)
    return pattern, parse_ggml_type(tname)


@dataclass(frozen=True)
class TypeOverrides:
    """llama-quantize's per-tensor overrides (``llama_model_quantize_params``).

    ``tensor_types``: ``(pattern, type)`` pairs in command-line order; a quantizable tensor
    whose name a pattern matches (``re.search``, first pattern wins) gets that type instead
    of the preset's rule, then the shape fallback.  ``output_tensor_type`` /
    ``token_embedding_type``: the type of ``output.weight`` / ``token_embd.weight``, taken
    as given (no fallback).  ``pure``: every quantizable tensor gets the preset's default
    type (then the fallback), except what the options above name.  ``leave_output_tensor``:
    ``output.weight`` keeps its source type.  ``tensor_types`` and ``pure`` do nothing for
    the float presets (F32/F16/BF16), as in llama-quantize.
    """

    tensor_types: tuple[tuple[str, T], ...] = ()
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    pure: bool = False
    leave_output_tensor: bool = False

    def __post_init__(self):
        for pattern, _ in self.tensor_types:
            _compile(pattern)

    def __bool__(self) -> bool:
        return bool(self.tensor_types or self.output_tensor_type or self.token_embedding_type or self.pure
                    or self.leave_output_tensor)  # fmt: skip

    def manual(self, name: str) -> int | None:
        """Index of the first ``tensor_types`` pattern found in ``name``, or None."""
        for i, (pattern, _) in enumerate(self.tensor_types):
            if _compile(pattern).search(name):
                return i
        return None


_NO_OVERRIDES = TypeOverrides()


def requires_imatrix(name: str, t: T, preset: str | Preset) -> bool:
    """``tensor_requires_imatrix``: llama-quantize refuses to make ``name`` of type ``t``
    under ``preset`` without importance weights (the very-low-bit i-quants, and Q2_K inside
    a Q2_K_S file); never for ``token_embd``/``output``."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if t in (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S):
        return True
    return t == T.Q2_K and _lookup(preset).name == "Q2_K_S"


# --------------------------------------------------------------------------- the rules


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
        self.ov = _NO_OVERRIDES

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


# The i-quant presets llama.cpp gives a rule set of their own.
_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# output.weight (and tied token_embd) -> Q5_K instead of Q6_K.
_OUTPUT_Q5_K = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# attn_output -> Q5_K with exactly 8 experts.
_ATTN_OUTPUT_8X = (
    "Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS",
)  # fmt: skip
# attn_output without 8 experts.
_ATTN_OUTPUT = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_M": T.Q4_K}


def _attn_v(st: _State, preset: str, t: T) -> T:
    gqa4 = st.n_gqa >= 4
    if preset == "Q2_K":
        t = T.Q4_K if gqa4 else T.Q3_K
    elif preset == "Q2_K_S" and gqa4:
        t = T.Q4_K
    elif preset == "IQ3_XXS":
        t = T.Q4_K if gqa4 else T.IQ3_XXS if st.has_imatrix else T.IQ3_S
    elif preset in ("IQ3_XS", "IQ3_S") and gqa4:
        t = T.Q4_K
    elif preset == "IQ3_M":
        t = T.Q4_K
    elif preset == "Q3_K_M":
        t = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
    elif preset == "Q3_K_L":
        t = T.Q5_K
    elif preset in ("IQ4_NL", "IQ4_XS") and gqa4:
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
    if preset == "Q2_K_S":
        return T.Q4_K if i < n // 8 else t
    if preset == "IQ3_XXS" and not st.has_imatrix:
        return T.Q4_K if i < n // 8 else T.Q3_K
    if preset == "Q3_K_M":
        return T.Q5_K if i < n // 16 else T.Q4_K  # Q3_K only for falcon's other layers
    if preset == "IQ3_M" and (i < n // 8 or (st.n_expert == 8 and _use_more_bits(i, n))):
        return T.Q4_K
    if preset == "Q3_K_L":
        return T.Q5_K
    if preset == "Q4_K_M":
        return T.Q6_K if _use_more_bits(i, n) else t
    if i < n // 8 and preset in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
        return T.Q5_K
    if preset == "Q5_K_M":
        return T.Q6_K if _use_more_bits(i, n) else t
    if preset == "Q4_K_S":
        return T.Q5_K if i < n // 8 else t
    if preset in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
        return T.Q4_1 if preset == "Q4_0" else T.Q5_1
    return t


def _iq_low(st: _State, preset: str, cat: str, t: T) -> T:
    """llama.cpp's branch for IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ2_M (after output and
    token_embd)."""
    iq2s = preset in ("IQ2_S", "IQ2_M")
    if cat == "attn_v":
        if st.n_gqa >= 4 or st.n_expert >= 4:
            t = T.Q4_K
        else:
            t = T.IQ3_S if iq2s else T.Q2_K
        st.i_attention_wv += 1
    elif st.n_expert == 8 and cat == "attn_k":
        t = T.Q4_K
    elif cat == "ffn_down":
        if st.i_ffn["ffn_down"] < st.n_layer // 8:  # a running counter here, not the layer
            t = T.IQ3_S if iq2s else T.Q2_K
        st.i_ffn["ffn_down"] += 1
    elif cat == "attn_output":
        if st.n_expert == 8:
            t = T.Q5_K
        elif preset in ("IQ1_S", "IQ1_M"):
            t = T.IQ2_XXS
        elif iq2s:
            t = T.IQ3_S
    return t


def _impl(st: _State, preset: str, name: str, shape: tuple[int, ...], cat: str, t: T) -> T:
    """``llama_tensor_get_type_impl`` for the presets in PRESETS, for the architectures
    gguf-moe writes (llama.cpp's Falcon-only variants are left out)."""
    ne0 = shape[-1]
    if cat == "output" or (st.tied and cat == "token_embd"):
        if st.ov.output_tensor_type is not None:
            return st.ov.output_tensor_type
        if preset == "MXFP4_MOE" or ne0 % _blck(t) != 0:
            return T.Q8_0
        if preset in _OUTPUT_Q5_K:
            return T.Q5_K
        return t if t == T.Q8_0 else T.Q6_K
    if preset == "MXFP4_MOE":  # stacked experts -> MXFP4, everything else Q8_0
        return T.MXFP4 if len(shape) == 3 and shape[0] > 1 else T.Q8_0
    if cat == "token_embd":  # untied
        if preset in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return T.Q2_K
        if preset in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return T.IQ3_S
        if preset in ("TQ1_0", "TQ2_0"):
            return T.Q4_K
        return t
    if preset in _IQ_LOW:
        return _iq_low(st, preset, cat, t)
    if cat == "attn_v":
        t = _attn_v(st, preset, t)
        st.i_attention_wv += 1
        return t
    if cat == "attn_k":
        if st.n_expert == 8:
            return T.Q8_0
        return {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(preset, t)
    if cat == "attn_q":
        return {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(preset, t)
    if cat == "ffn_down":
        t = _ffn_down(st, preset, st.layer(cat, name), st.n_layer, t)
        st.i_ffn[cat] += 1
        return t
    if cat == "attn_output":
        if st.n_expert == 8:
            return T.Q5_K if preset in _ATTN_OUTPUT_8X else t
        return _ATTN_OUTPUT.get(preset, t)
    if cat in ("ffn_gate", "ffn_up"):
        i, n = st.layer(cat, name), st.n_layer
        st.i_ffn[cat] += 1
        if preset == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            return T.IQ3_XXS
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
    overrides: TypeOverrides | None = None,
    source_types: Mapping[str, T] | None = None,
    notes: dict[str, str] | None = None,
) -> dict[str, T]:
    """The ggml type of every tensor under ``preset``.

    ``tensors``: (GGUF name, numpy-order shape) for every tensor of the model, any order
    (llama.cpp's counters run in sorted order; we sort here).  ``n_expert``: expert_count
    (0 or 1 for dense models); ``n_layer``: block_count.  ``has_imatrix``: an importance
    matrix is given (Q4_0/Q5_0 ffn_down, IQ3_XXS attn_v/ffn_down and IQ4_NL/IQ4_XS ffn_down
    depend on it).  ``n_head``/``n_head_kv`` matter for the ``n_head / n_head_kv >= 4`` rules
    and llama's 80-layer GQA ("70B") rule; if omitted they are inferred from the
    attn_q/attn_k shapes.  ``overrides``: llama-quantize's ``--tensor-type`` & co.

    Tensors llama.cpp never quantizes (1-D, norms, the MoE router; ``output.weight`` with
    ``leave_output_tensor``) keep their ``source_types`` entry: the type they have in the
    file llama-quantize would read (default: what ``convert_hf_to_gguf.py --outtype bf16``
    writes, i.e. F32 for those tensors).  ``notes``, if given, receives a short reason for
    every tensor whose type an override or the shape fallback decided.

    With ``require_writable`` (the default), a type gguf-moe has no quantizer for is a
    GgufMoeError naming the first such tensor; pass False to only ask what llama.cpp picks.
    """
    p = _lookup(preset)
    ov = overrides or _NO_OVERRIDES
    names = [n for n, _ in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise GgufMoeError(f"duplicate tensor names: {', '.join(dup[:5])}")
    shapes = {n: tuple(int(d) for d in s) for n, s in tensors}
    notes = {} if notes is None else notes

    def kept(n: str) -> T:
        if source_types is not None and n in source_types:
            return source_types[n]
        return _converter_type(n, shapes[n], T.BF16)

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
    st.ov = ov
    out: dict[str, T] = {}
    for n in order:
        shape = shapes[n]
        cat = cats[n]
        if not allows_quantization(n, shape, quantize_output=not ov.leave_output_tensor):
            out[n] = kept(n)
            if n == "output.weight" and ov.leave_output_tensor and allows_quantization(n, shape):
                notes[n] = "--leave-output-tensor"
            continue
        ne0 = shape[-1]
        manual = None
        if ov.token_embedding_type is not None and cat == "token_embd" and not (
            n == "per_layer_token_embd.weight" and ov.manual(n) is not None
        ):
            t = ov.token_embedding_type
            notes[n] = "--token-embedding-type"
        elif ov.output_tensor_type is not None and cat == "output":
            t = ov.output_tensor_type
            notes[n] = "--output-tensor-type"
        elif p.is_float:
            t = _converter_type(n, shape, p.default)
        else:
            t = p.default
            manual = ov.manual(n)
            if manual is not None:
                t = ov.tensor_types[manual][1]
                notes[n] = f"--tensor-type {ov.tensor_types[manual][0]}={t.name}"
            elif not ov.pure:
                t = _impl(st, p.name, n, shape, cat, t)
                if st.tied and cat == "token_embd" and ov.output_tensor_type is not None:
                    notes[n] = "--output-tensor-type (tied embeddings)"
            else:
                notes[n] = "--pure"
            alt = _fallback(n, ne0, t)
            if alt != t:
                why = f"{t.name} needs rows of a multiple of {_blck(t)}, these have {ne0}"
                notes[n] = f"{notes[n]}; {why}" if n in notes else why
                t = alt
        if ne0 % _blck(t):
            raise GgufMoeError(
                f"{n}: {notes.get(n, p.name)} asks for {t.name}, whose blocks of {_blck(t)} do not divide its rows "
                f"of {ne0}; llama-quantize would abort, choose another type"
            )
        if require_writable and not writable(t):
            via = notes.get(n, f"{p.name}{' with an imatrix' if has_imatrix else ''}")
            raise GgufMoeError(
                f"{n}: {via} makes llama.cpp use {t.name} for this tensor, and this version of gguf-moe has no "
                f"{t.name} quantizer; choose another output type"
            )
        out[n] = t
    return {n: out[n] for n in names}
