"""Validate and inspect GGUF files.

``validate_file`` reads a GGUF file with its own bounds-checked header parser (a broken
file yields findings, never a traceback) and checks, in order:

* format: magic, version, header fields, tensor infos (dims, type, row length vs block
  size, name length, duplicates), alignment, data offsets (aligned, in bounds, no overlap,
  packed in info order as ggml requires), byte sizes (rows * row_size(type, ne0));
* metadata: the KVs llama.cpp requires for the architecture, with their GGUF types, and
  their consistency with tensor shapes (llama: every expected tensor present with the
  shape the KVs imply, no unknown tensors, token_embd rows == vocabulary size);
* MoE: expert_count / expert_used_count present and sane, every ``*_exps`` tensor's
  ``ne[2]`` and ``ffn_gate_inp``'s ``ne[1]`` equal to expert_count;
* tensor types: the types llama-quantize would pick for ``general.file_type``
  (``presets.choose_types``; a difference is a warning, overrides are legitimate);
* numerics: no NaN/Inf in F32/F16/BF16 data or in the fp16 scales (d, dmin) of quantized
  blocks (what ``ggml_validate_row_data`` checks);
* ``deep``: dequantize every tensor, check it is finite, record per-tensor statistics, and
  report byte-identical experts (normal for merges that repeat a source model);
* ``source``: compare every tensor with the Hugging Face model it came from (see
  ``ERROR_BOUNDS`` and docs/validate.md for the per-type bounds).

``inspect_file`` returns the file's KVs (arrays summarized), tensors, totals, a type
histogram and bits per weight.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from gguf_moe.errors import CorruptFile, GgufMoeError
from gguf_moe.ggufparse import GGML_MAX_NAME, KV, GGUFHeader, HeaderError, TensorInfo, read_header

__all__ = [
    "Finding",
    "Report",
    "TensorInfo",
    "GGUFHeader",
    "HeaderError",
    "read_header",
    "validate_file",
    "inspect_file",
    "file_routing",
    "ERROR_BOUNDS",
]

T = GGMLQuantizationType
CHUNK_BYTES = 32 << 20  # bytes of tensor data looked at per step (bounded memory)

# --------------------------------------------------------------------------- report


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    check: str  # short category: header, layout, metadata, tensors, moe, types, numerics, deep, source
    message: str
    tensor: str | None = None
    expected: Any = None
    found: Any = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Report:
    path: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    tensors: dict[str, dict] = field(default_factory=dict)  # per-tensor results of deep/source checks

    def add(self, severity: str, check: str, message: str, tensor: str | None = None, expected=None, found=None):
        self.findings.append(Finding(severity, check, message, tensor, _jsonable(expected), _jsonable(found)))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "summary": _jsonable(self.summary),
            "findings": [f.to_dict() for f in self.findings],
            "tensors": _jsonable(self.tensors),
        }


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


def _ftype_name(v) -> str:
    from gguf_moe.presets import PRESETS

    for p in PRESETS.values():
        if p.file_type == v:
            return p.name
    try:
        return LlamaFileType(int(v)).name.replace("MOSTLY_", "")
    except (ValueError, TypeError):
        return f"file_type {v}"


# --------------------------------------------------------------------------- format checks


def _check_tensor_infos(h: GGUFHeader, rep: Report) -> list[TensorInfo]:
    """Per-tensor info and data-layout checks; returns the tensors whose data can be read."""
    seen: set[str] = set()
    good: list[TensorInfo] = []
    for t in h.tensors:
        if t.name in seen:
            rep.add("error", "tensors", "duplicate tensor name (llama.cpp refuses the file)", t.name)
            continue
        seen.add(t.name)
        if len(t.name.encode()) >= GGML_MAX_NAME:
            rep.add("error", "tensors", f"name is {len(t.name.encode())} bytes; ggml allows at most {GGML_MAX_NAME - 1}", t.name)
        if any(d < 0 for d in t.ne):
            rep.add("error", "tensors", f"negative dimension in ne={list(t.ne)}", t.name)
            continue
        if t.qtype is None:
            rep.add("error", "tensors", f"unknown ggml type id {t.type_id}", t.name, found=t.type_id)
            continue
        bs = GGML_QUANT_SIZES[t.qtype][0]
        if not t.ne or t.ne[0] % bs:
            rep.add(
                "error", "tensors",
                f"row length ne[0]={t.ne[0] if t.ne else None} is not a multiple of the {t.type_name} block size {bs}",
                t.name, expected=f"multiple of {bs}", found=t.ne[0] if t.ne else None,
            )
            continue
        good.append(t)

    # data section: aligned, in bounds, no overlap, packed in info order (what ggml requires)
    data_start = h.data_offset
    if h.tensors and data_start > h.file_size:
        rep.add("error", "layout", f"file ends at byte {h.file_size}, before the data section (byte {data_start}): truncated",
                expected=data_start, found=h.file_size)
    expected_off: int | None = 0  # ggml: each offset == sum of the previous padded sizes
    readable: list[TensorInfo] = []
    bad_layout: set[str] = set()
    for t in h.tensors:
        nb = t.n_bytes
        if t.offset % h.alignment:
            rep.add("error", "layout", f"data offset {t.offset} is not a multiple of the alignment {h.alignment}",
                    t.name, expected=f"multiple of {h.alignment}", found=t.offset)
            bad_layout.add(t.name)
        if nb is not None and data_start + t.offset + nb > h.file_size:
            rep.add(
                "error", "layout",
                f"data [{data_start + t.offset}, {data_start + t.offset + nb}) runs past the end of the file "
                f"({h.file_size} bytes): the file is truncated",
                t.name, expected=data_start + t.offset + nb, found=h.file_size,
            )
            bad_layout.add(t.name)
        if expected_off is not None and t.name not in bad_layout and t.offset != expected_off:
            what = "overlaps the previous tensor" if t.offset < expected_off else "leaves a gap after the previous tensor"
            rep.add(
                "error", "layout",
                f"data offset {t.offset} {what}; ggml requires tensors packed in info order "
                f"(expected offset {expected_off})",
                t.name, expected=expected_off, found=t.offset,
            )
            bad_layout.add(t.name)
        expected_off = None if (nb is None or expected_off is None) else expected_off + -(-nb // h.alignment) * h.alignment
        if nb is not None and t.name not in bad_layout:
            readable.append(t)
    # overlaps irrespective of order (e.g. two infos pointing at the same bytes)
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in h.tensors if t.n_bytes)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1 and bn not in bad_layout:
            rep.add("error", "layout", f"data bytes [{b0}, {min(a1, b1)}) are shared with {an}", bn,
                    expected=f">= {a1}", found=b0)
            bad_layout.add(bn)
            bad_layout.add(an)
    if h.tensors:
        end = data_start + max(t.offset + (t.n_bytes or 0) for t in h.tensors)
        if h.file_size > -(-end // h.alignment) * h.alignment:
            rep.add("info", "layout", f"{h.file_size - end} bytes after the last tensor's data")
    good_names = {t.name for t in good}
    return [t for t in readable if t.name in good_names and t.name not in bad_layout]


# --------------------------------------------------------------------------- metadata checks

# llama: key suffix -> (required, GGUF type)
_LLAMA_KEYS = {
    "block_count": (True, "u32"),
    "context_length": (True, "u32"),
    "embedding_length": (True, "u32"),
    "feed_forward_length": (True, "u32"),
    "attention.head_count": (True, "u32"),
    "attention.layer_norm_rms_epsilon": (True, "f32"),
    "attention.head_count_kv": (False, "u32"),
    "rope.freq_base": (False, "f32"),
    "rope.dimension_count": (False, "u32"),
    "attention.key_length": (False, "u32"),
    "attention.value_length": (False, "u32"),
    "expert_count": (False, "u32"),
    "expert_used_count": (False, "u32"),
    "vocab_size": (False, "u32"),
    "expert_feed_forward_length": (False, "u32"),
    "expert_shared_feed_forward_length": (False, "u32"),
    "expert_shared_count": (False, "u32"),
    "leading_dense_block_count": (False, "u32"),
    "expert_weights_norm": (False, "bool"),
    "logit_scale": (False, "f32"),
}
_PER_LAYER = {"feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count"}


def _trim(ne) -> tuple[int, ...]:
    ne = list(ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)


def _llama_expectations(h: GGUFHeader, rep: Report, arch: str = "llama") -> dict | None:
    """Check the ``{arch}.*`` KVs of a llama-like architecture (``archs.FILE_SPECS``);
    return the hyperparameters (or None if a required one is unusable)."""
    hp: dict[str, Any] = {}
    ok = True
    for suffix, (required, typ) in _LLAMA_KEYS.items():
        key = f"{arch}.{suffix}"
        kv = h.kvs.get(key)
        if kv is None:
            if required:
                rep.add("error", "metadata", f"required key {key} is missing (llama.cpp cannot load the model)",
                        expected=typ, found="missing")
                ok = False
            continue
        if suffix in _PER_LAYER and kv.type in ("array[u32]", "array[i32]"):
            hp[suffix] = [int(x) for x in kv.value]
            continue
        if kv.type != typ:
            rep.add("error", "metadata", f"key {key} has GGUF type {kv.type}; llama.cpp requires {typ}",
                    expected=typ, found=kv.type)
            ok = False if required else ok
            continue
        hp[suffix] = kv.value
    if not ok:
        return None
    n_layer = int(hp["block_count"])
    if n_layer <= 0:
        rep.add("error", "metadata", f"{arch}.block_count is {n_layer}; must be > 0", found=n_layer)
        return None
    for k in _PER_LAYER:
        if isinstance(hp.get(k), list):
            if len(hp[k]) != n_layer:
                rep.add("error", "metadata", f"{arch}.{k} has {len(hp[k])} per-layer values; block_count is {n_layer}",
                        expected=n_layer, found=len(hp[k]))
                return None
        elif k in hp:
            hp[k] = [int(hp[k])] * n_layer
    hp.setdefault("attention.head_count_kv", hp["attention.head_count"])
    n_embd = int(hp["embedding_length"])
    n_head = hp["attention.head_count"]
    for i in range(n_layer):
        nh, nkv = n_head[i], hp["attention.head_count_kv"][i]
        if nh <= 0 or n_embd % nh:
            rep.add("error", "metadata", f"layer {i}: head_count {nh} does not divide embedding_length {n_embd}",
                    found=nh)
            return None
        if nkv <= 0 or nh % nkv:
            rep.add("error", "metadata", f"layer {i}: head_count_kv {nkv} does not divide head_count {nh}",
                    expected=f"divisor of {nh}", found=nkv)
            return None
    hd_k = int(hp.get("attention.key_length", n_embd // n_head[0]))
    hd_v = int(hp.get("attention.value_length", n_embd // n_head[0]))
    n_rot = int(hp.get("rope.dimension_count", hd_k))
    if n_rot != hd_k:
        rep.add("error", "metadata", f"{arch}.rope.dimension_count is {n_rot}; {arch} requires the head size {hd_k}",
                expected=hd_k, found=n_rot)
    hp.update(n_layer=n_layer, n_embd=n_embd, hd_k=hd_k, hd_v=hd_v, n_rot=n_rot)

    # experts
    n_expert = int(hp.get("expert_count", 0))
    used = hp.get("expert_used_count", [0] * n_layer)
    exps = [t.name for t in h.tensors if "_exps." in t.name]
    if exps and "expert_count" not in hp:
        rep.add("error", "moe", f"{len(exps)} expert tensors (e.g. {exps[0]}) but {arch}.expert_count is missing",
                expected="expert_count", found="missing")
    if n_expert > 0:
        if "expert_used_count" not in hp or max(used) == 0:
            rep.add("error", "moe", f"{arch}.expert_count is {n_expert} but {arch}.expert_used_count is missing or 0 "
                    "(llama.cpp aborts)", expected=f"1..{n_expert}", found=max(used) if used else "missing")
        elif max(used) > n_expert:
            rep.add("error", "moe", f"{arch}.expert_used_count {max(used)} exceeds expert_count {n_expert}",
                    expected=f"<= {n_expert}", found=max(used))
        if n_expert == 1:
            rep.add("warning", "moe", f"{arch}.expert_count is 1: a single-expert MoE (convert as dense instead?)")
    elif "expert_used_count" in hp and max(used) > 0:
        rep.add("error", "moe", f"{arch}.expert_used_count is {max(used)} without expert_count (llama.cpp aborts)",
                expected=0, found=max(used))
    hp["n_expert"] = n_expert
    hp["arch"] = arch
    return hp


def _vocab_size(h: GGUFHeader, rep: Report, arch: str) -> int | None:
    toks = h.kvs.get("tokenizer.ggml.tokens")
    n_tok = len(toks.value) if toks is not None and toks.type == "array[str]" else None
    vs = h.kvs.get(f"{arch}.vocab_size")
    if "tokenizer.ggml.model" not in h.kvs:
        rep.add("warning", "metadata", "no tokenizer (tokenizer.ggml.model missing): llama.cpp can quantize this file but not run it")
    if vs is not None and n_tok is not None and int(vs.value) != n_tok:
        rep.add("warning", "metadata", f"{arch}.vocab_size is {vs.value} but tokenizer.ggml.tokens has {n_tok} entries "
                "(llama.cpp sizes the vocabulary from the token list; other readers may use vocab_size)",
                expected=n_tok, found=int(vs.value))
    for k in ("scores", "token_type"):
        a = h.kvs.get(f"tokenizer.ggml.{k}")
        if a is not None and n_tok is not None and len(a.value) != n_tok:
            rep.add("error", "metadata", f"tokenizer.ggml.{k} has {len(a.value)} entries, tokenizer.ggml.tokens {n_tok}",
                    expected=n_tok, found=len(a.value))
    if n_tok is not None:
        return n_tok  # llama.cpp: n_vocab = vocab.n_tokens()
    return int(vs.value) if vs is not None and vs.type == "u32" else None


def _expected_llama_tensors(hp: dict, n_vocab: int | None) -> tuple[dict, dict]:
    """(required, optional): name -> expected ne (None entries are wildcards); the
    architecture's additions from its ``archs.FileSpec``."""
    from gguf_moe.archs import FILE_SPECS

    spec = FILE_SPECS[hp.get("arch", "llama")]
    E, L = hp["n_embd"], hp["n_layer"]
    req: dict[str, tuple] = {"token_embd.weight": (E, n_vocab), "output_norm.weight": (E,)}
    opt: dict[str, tuple] = {"output.weight": (E, n_vocab), "rope_freqs.weight": (hp["n_rot"] // 2,)}
    nx = hp["n_expert"]
    n_dense = int(hp.get("leading_dense_block_count", 0) or 0)
    shexp_ff = spec.shexp_ff(hp) if spec.shexp and spec.shexp_ff else None
    for i in range(L):
        b = f"blk.{i}."
        nh, nkv, ff = hp["attention.head_count"][i], hp["attention.head_count_kv"][i], hp["feed_forward_length"][i]
        ff_exp = int(hp.get(spec.ff_exp_key) or ff) if spec.ff_exp_key else ff
        if spec.qk_norm:
            req.update({b + "attn_q_norm.weight": (hp["hd_k"],), b + "attn_k_norm.weight": (hp["hd_k"],)})
        q, k, v = hp["hd_k"] * nh, hp["hd_k"] * nkv, hp["hd_v"] * nkv
        req.update({
            b + "attn_norm.weight": (E,),
            b + "attn_q.weight": (E, q),
            b + "attn_k.weight": (E, k),
            b + "attn_v.weight": (E, v),
            b + "attn_output.weight": (q, E),
            b + "ffn_norm.weight": (E,),
        })
        opt.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (k,), b + "attn_v.bias": (v,), b + "attn_output.bias": (E,)})
        if nx == 0 or i < n_dense:
            req.update({b + "ffn_gate.weight": (E, ff), b + "ffn_down.weight": (ff, E), b + "ffn_up.weight": (E, ff)})
            opt.update({b + "ffn_gate.bias": (ff,), b + "ffn_down.bias": (E,), b + "ffn_up.bias": (ff,)})
        else:
            req.update({
                b + "ffn_gate_inp.weight": (E, nx),
                b + "ffn_down_exps.weight": (ff_exp, E, nx),
                b + "ffn_up_exps.weight": (E, ff_exp, nx),
            })
            opt[b + "ffn_gate_exps.weight"] = (E, ff_exp, nx)
            if shexp_ff:
                req.update({
                    b + "ffn_gate_shexp.weight": (E, shexp_ff),
                    b + "ffn_up_shexp.weight": (E, shexp_ff),
                    b + "ffn_down_shexp.weight": (shexp_ff, E),
                })
                if spec.shexp == "gated":
                    req[b + "ffn_gate_inp_shexp.weight"] = (E,)
    return req, opt


def _shape_matches(ne, want) -> bool:
    a, b = _trim(ne), _trim(tuple(w if w is not None else -1 for w in want))
    return len(a) == len(b) and all(y == -1 or x == y for x, y in zip(a, b))


def _check_llama_tensors(h: GGUFHeader, hp: dict, n_vocab: int | None, rep: Report) -> None:
    req, opt = _expected_llama_tensors(hp, n_vocab)
    present = {t.name: t for t in h.tensors}
    missing = [n for n in req if n not in present]
    for n in missing[:20]:
        rep.add("error", "tensors", "required tensor is missing", n, expected=list(req[n]), found="missing")
    if len(missing) > 20:
        rep.add("error", "tensors", f"{len(missing) - 20} more required tensors are missing")
    if hp["n_expert"]:
        gate_missing = [n for n in opt if n.endswith("ffn_gate_exps.weight") and n not in present]
        if gate_missing:
            rep.add("warning", "tensors", f"{len(gate_missing)} layers have no ffn_gate_exps (allowed by llama.cpp, unusual)",
                    gate_missing[0])
    unknown = [n for n in present if n not in req and n not in opt]
    for n in unknown[:20]:
        hint = ""
        lay = n.split(".")
        if lay[0] == "blk" and len(lay) > 1 and lay[1].isdigit() and int(lay[1]) >= hp["n_layer"]:
            hint = f" (layer {lay[1]} but block_count is {hp['n_layer']})"
        elif hp["n_expert"] and n.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")):
            hint = " (a dense FFN tensor in an MoE model)"
        elif not hp["n_expert"] and ("_exps." in n or "ffn_gate_inp" in n):
            hint = " (an expert tensor but expert_count is missing or 0)"
        rep.add("error", "tensors", f"unexpected tensor for a {hp['n_layer']}-layer {hp.get('arch', 'llama')} model{hint}; "
                "llama.cpp refuses files with unknown tensors", n)
    if len(unknown) > 20:
        rep.add("error", "tensors", f"{len(unknown) - 20} more unexpected tensors")

    nx = hp["n_expert"]
    n_bad = 0
    for name, t in present.items():
        want = req.get(name) or opt.get(name)
        if want is None or _shape_matches(t.ne, want):
            continue
        n_bad += 1
        if n_bad > 20:
            continue
        check = "tensors"
        msg = f"shape ne={list(t.ne)} does not match the KVs (expected {[w if w is not None else '?' for w in want]})"
        if nx and ("_exps." in name and len(t.ne) >= 3 and t.ne[2] != nx):
            check, msg = "moe", f"has {t.ne[2]} experts (ne[2]) but {hp.get('arch', 'llama')}.expert_count is {nx}"
        elif nx and name.endswith("ffn_gate_inp.weight") and len(t.ne) >= 2 and t.ne[1] != nx:
            check, msg = "moe", f"router has {t.ne[1]} outputs (ne[1]) but {hp.get('arch', 'llama')}.expert_count is {nx}"
        elif name in ("token_embd.weight", "output.weight") and n_vocab is not None and len(t.ne) == 2 \
                and t.ne[0] == hp["n_embd"] and t.ne[1] != n_vocab:
            msg = f"has {t.ne[1]} rows but the vocabulary has {n_vocab} tokens"
        rep.add("error", check, msg, name, expected=[w for w in want], found=list(t.ne))
    if n_bad > 20:
        rep.add("error", "tensors", f"{n_bad - 20} more tensors have shapes that do not match the KVs")


def _check_types(h: GGUFHeader, hp: dict | None, rep: Report) -> None:
    from gguf_moe.presets import PRESETS, choose_types

    ft = h.kvs.get("general.file_type")
    if ft is None:
        rep.add("warning", "metadata", "general.file_type is missing")
        return
    if ft.type != "u32":
        rep.add("error", "metadata", f"general.file_type has GGUF type {ft.type}; llama.cpp requires u32",
                expected="u32", found=ft.type)
        return
    quantized = [t for t in h.tensors if t.qtype not in (None, T.F32, T.F16, T.BF16, T.F64)]
    if quantized and h.kv("general.quantization_version") is None:
        rep.add("warning", "metadata", "quantized tensors but general.quantization_version is missing (expected 2)")
    preset = next((p for p in PRESETS.values() if p.file_type == ft.value), None)
    if preset is None or hp is None:
        return
    try:
        want = choose_types(
            preset, [(t.name, t.shape) for t in h.tensors], n_expert=hp["n_expert"], n_layer=hp["n_layer"],
            n_head=hp["attention.head_count"][0], n_head_kv=hp["attention.head_count_kv"][0],
            has_imatrix=h.kv("quantize.imatrix.entries_count") is not None, require_writable=False,
        )
    except GgufMoeError:
        return
    diff = [(t.name, want[t.name].name, t.type_name) for t in h.tensors if t.qtype is not None and want[t.name] != t.qtype]
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        ex = "; ".join(f"{n} is {f}, expected {e}" for n, e, f in diff[:3])
        rep.add("warning", "types", f"{len(diff)} tensor types differ from what llama-quantize picks for {preset.name}: "
                f"{ex}{more} (fine if made with --tensor-type or similar overrides)",
                diff[0][0], expected=diff[0][1], found=diff[0][2])


# --------------------------------------------------------------------------- data access


# Offsets of the fp16 scales ggml_validate_row_data checks, per block.
_F16_SCALES: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,),
    T.IQ1_S: (0,), T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.TQ1_0: (52,), T.TQ2_0: (64,),
}


class _Data:
    """Memory-mapped tensor data, read in row chunks (from each tensor's own shard when
    the header is a split set's combined view)."""

    def __init__(self, h: GGUFHeader):
        self.h = h
        self._mms: dict[Path, np.memmap] = {}

    def _mm(self, h: GGUFHeader) -> np.memmap:
        mm = self._mms.get(h.path)
        if mm is None:
            mm = self._mms[h.path] = np.memmap(h.path, dtype=np.uint8, mode="r")
        return mm

    def rows(self, t: TensorInfo, r0: int, r1: int) -> np.ndarray:
        h = t.src if t.src is not None else self.h
        rb = t.row_bytes
        start = h.data_offset + t.offset + r0 * rb
        return self._mm(h)[start : start + (r1 - r0) * rb].reshape(r1 - r0, rb)

    def chunks(self, t: TensorInfo, max_bytes: int = CHUNK_BYTES):
        rb = max(1, t.row_bytes)
        step = max(1, max_bytes // rb)
        for r0 in range(0, t.n_rows, step):
            r1 = min(t.n_rows, r0 + step)
            yield r0, self.rows(t, r0, r1)

    def close(self):
        self._mms.clear()


def _nonfinite(t: TensorInfo, raw: np.ndarray) -> tuple[int, int | None]:
    """(count, first flat index) of non-finite values / scales in a chunk of rows."""
    q = t.qtype
    if q == T.F32:
        bad = (raw.view(np.uint32) & 0x7F800000) == 0x7F800000
    elif q == T.F16:
        bad = (raw.view(np.uint16) & 0x7C00) == 0x7C00
    elif q == T.BF16:
        bad = (raw.view(np.uint16) & 0x7F80) == 0x7F80
    elif q == T.F64:
        bad = ~np.isfinite(raw.view(np.float64))
    elif q in _F16_SCALES:
        ts = GGML_QUANT_SIZES[q][1]
        blocks = raw.reshape(-1, ts)
        bad = np.zeros(blocks.shape[0], dtype=bool)
        for off in _F16_SCALES[q]:
            s = np.ascontiguousarray(blocks[:, off : off + 2]).view(np.uint16)[:, 0]
            bad |= (s & 0x7C00) == 0x7C00
    elif q == T.Q8_K:
        ts = GGML_QUANT_SIZES[q][1]
        d = np.ascontiguousarray(raw.reshape(-1, ts)[:, 0:4]).view(np.float32)[:, 0]
        bad = ~np.isfinite(d)
    else:
        return 0, None
    n = int(np.count_nonzero(bad))
    return n, (int(np.flatnonzero(bad.reshape(-1))[0]) if n else None)


def _check_numerics(data: _Data, tensors: list[TensorInfo], rep: Report, progress) -> None:
    unchecked = Counter()
    for t in tensors:
        q = t.qtype
        if q not in _F16_SCALES and q not in (T.F32, T.F16, T.BF16, T.F64, T.Q8_K):
            unchecked[t.type_name] += 1
            continue
        total, first = 0, None
        for r0, raw in data.chunks(t):
            n, f = _nonfinite(t, raw)
            if n and first is None:
                first = (r0, f)
            total += n
        if total:
            r0, f = first
            per_row = t.ne[0] if q in (T.F32, T.F16, T.BF16, T.F64) else t.ne[0] // GGML_QUANT_SIZES[q][0]
            row = r0 + f // per_row
            if q in (T.F32, T.F16, T.BF16, T.F64):
                where = f"element {f % per_row} of row {row}"
                what = f"{total} NaN/Inf values"
            else:
                where = f"block {f % per_row} of row {row}"
                what = f"{total} blocks with a NaN/Inf scale (d/dmin)"
            rep.add("error", "numerics", f"{what}, first at {where}; llama.cpp rejects this data "
                    "('quantized data validation failed' / --check-tensors)", t.name, expected="finite", found=where)
        if progress:
            progress("numerics", t.name)
    for name, n in unchecked.items():
        rep.add("info", "numerics", f"scales of {n} {name} tensors are not checked")


def _dequantize(t: TensorInfo, raw: np.ndarray) -> np.ndarray:
    import quant

    q = t.qtype
    if q.name in quant.QTYPES:
        return quant.dequantize(np.ascontiguousarray(raw), q.name, t.ne[0])
    if q == T.F64:
        return raw.view(np.float64).astype(np.float32)
    from gguf.quants import dequantize as gdq

    return np.asarray(gdq(np.ascontiguousarray(raw), q), dtype=np.float32).reshape(raw.shape[0], t.ne[0])


def _check_deep(data: _Data, tensors: list[TensorInfo], rep: Report, progress) -> None:
    for t in tensors:
        n = 0
        s1 = s2 = 0.0
        lo, hi = math.inf, -math.inf
        bad = 0
        try:
            for _, raw in data.chunks(t, CHUNK_BYTES // 4):
                x = _dequantize(t, raw)
                fin = np.isfinite(x)
                k = int(x.size - np.count_nonzero(fin))
                bad += k
                xf = x[fin] if k else x.reshape(-1)
                if xf.size:
                    lo, hi = min(lo, float(xf.min())), max(hi, float(xf.max()))
                    xd = xf.astype(np.float64)
                    s1 += float(xd.sum())
                    s2 += float(np.dot(xd, xd))
                    n += xf.size
        except Exception as e:  # unsupported type in gguf-py, etc.
            rep.add("warning", "deep", f"cannot dequantize {t.type_name}: {e}", t.name)
            continue
        mean = s1 / n if n else 0.0
        st = rep.tensors.setdefault(t.name, {"type": t.type_name})
        st.update(min=lo if n else None, max=hi if n else None, mean=mean,
                  std=math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else None, rms=math.sqrt(s2 / n) if n else None,
                  nonfinite=bad)
        if bad:
            rep.add("error", "deep", f"{bad} dequantized values are NaN/Inf", t.name, expected=0, found=bad)
        if progress:
            progress("deep", t.name)
    _check_duplicate_experts(data, tensors, rep)


def _check_duplicate_experts(data: _Data, tensors: list[TensorInfo], rep: Report) -> None:
    groups_by_pattern: dict[tuple, list[str]] = {}
    n_exp_tensors = 0
    for t in tensors:
        if "_exps." not in t.name or len(t.ne) < 3 or t.ne[2] < 2:
            continue
        n_exp_tensors += 1
        n_x = t.ne[2]
        rows_per = t.n_rows // n_x
        digests = []
        for e in range(n_x):
            hsh = hashlib.blake2b(digest_size=16)
            step = max(1, CHUNK_BYTES // max(1, t.row_bytes))
            for r0 in range(e * rows_per, (e + 1) * rows_per, step):
                hsh.update(data.rows(t, r0, min((e + 1) * rows_per, r0 + step)))
            digests.append(hsh.digest())
        same: dict[bytes, list[int]] = {}
        for e, d in enumerate(digests):
            same.setdefault(d, []).append(e)
        groups = tuple(tuple(g) for g in same.values() if len(g) > 1)
        if groups:
            groups_by_pattern.setdefault(groups, []).append(t.name)
            rep.tensors.setdefault(t.name, {"type": t.type_name})["identical_experts"] = [list(g) for g in groups]
    for groups, names in groups_by_pattern.items():
        desc = "; ".join(" == ".join(f"expert {e}" for e in g) for g in groups)
        rep.add("info", "experts", f"byte-identical experts ({desc}) in {len(names)} of {n_exp_tensors} expert tensors, "
                f"e.g. {names[0]} (normal for merges that repeat a source model)", names[0])
    rep.summary["duplicate_expert_tensors"] = sum(len(v) for v in groups_by_pattern.values())


# --------------------------------------------------------------------------- comparison with the source model

#: Bound on the block-relative RMS error sqrt(mean(((deq - src) / a)^2)) of a quantized
#: tensor, where a = max(amax_block, floor): amax_block is the largest |src| in the
#: element's quantization block (32 or 256 values).  A uniform quantizer with step s has RMS
#: error s/sqrt(12); s/amax is at most 1/127 (Q8_0), 1/8 (Q4_0), 1/16 (Q5_0), 2/31 (Q5_1
#: and Q5_K: range/31 over a (sub-)block), 2/15 (Q4_K), 1/32 (Q6_K).  The bound is twice that.
#: Scales are fp16, whose absolute precision is 2^-24 near zero; with q_max the largest
#: multiple of the fp16 scale a value can be (127, 8, 16, 31, 63*15, 63*31, 127*32) that
#: costs up to q_max * 2^-24 per value, so blocks smaller than floor = q_max * 2^-24 / bound
#: are measured against the floor instead of their own maximum.  Float types must be exact.
_STEP_QMAX = {
    "Q8_0": (1 / 127, 127), "Q4_0": (1 / 8, 8), "Q5_0": (1 / 16, 16), "Q5_1": (2 / 31, 31),
    "Q4_K": (2 / 15, 63 * 15), "Q5_K": (2 / 31, 63 * 31), "Q6_K": (1 / 32, 127 * 32),
}
ERROR_BOUNDS: dict[str, float] = {name: 2 * step / math.sqrt(12) for name, (step, _) in _STEP_QMAX.items()}
ERROR_FLOORS: dict[str, float] = {name: qmax * 2.0**-24 / ERROR_BOUNDS[name] for name, (_, qmax) in _STEP_QMAX.items()}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return r


def _compare_source(data: _Data, h: GGUFHeader, tensors: list[TensorInfo], source, rep: Report, progress) -> None:
    from gguf_moe.source import open_model

    try:
        model = open_model(source)
    except GgufMoeError as e:
        rep.add("error", "source", f"cannot read the source model: {e}")
        return
    with model:
        routing = file_routing(h)
        if model.routing is not None and routing is not None and routing != model.routing.source:
            rep.add("error", "routing", f"the file's routing ({routing}) is not the source's ({model.routing.source}, "
                    "config.json): llama.cpp computes another model", expected=model.routing.source, found=routing)
        by_name = {t.name: t for t in h.tensors}
        readable = {t.name for t in tensors}
        src_names = {st.name for st in model.tensors}
        for n in sorted(set(by_name) - src_names):
            rep.add("warning", "source", "tensor is not in the source model", n)
        n_cmp = 0
        for st in model.tensors:
            t = by_name.get(st.name)
            if t is None:
                rep.add("error", "source", "source tensor is missing from the file", st.name, expected=list(st.shape))
                continue
            if _trim(tuple(reversed(st.shape))) != _trim(t.ne):
                rep.add("error", "source", f"shape ne={list(t.ne)} differs from the source's {list(reversed(st.shape))}",
                        st.name, expected=list(reversed(st.shape)), found=list(t.ne))
                continue
            if st.name not in readable:
                continue
            res = _compare_one(data, t, st)
            rep.tensors.setdefault(t.name, {"type": t.type_name})["source"] = res
            n_cmp += 1
            if res.get("problem"):
                rep.add("error", "source", res["problem"], t.name, expected=res.get("bound", "exact"),
                        found=res.get("rel_rms", res.get("mismatches")))
            if progress:
                progress("source", t.name)
        rep.summary["source_tensors_compared"] = n_cmp


def _compare_one(data: _Data, t: TensorInfo, st) -> dict:
    q = t.qtype
    n = t.ne[0]
    max_rows = max(1, CHUNK_BYTES // 16 // max(1, n))
    r = 0
    exact = q in (T.F32, T.F16, T.BF16)
    mism = 0
    first = None
    se = 0.0
    cnt = 0
    worst = 0.0
    bs = GGML_QUANT_SIZES[q][0]
    for src in st.iter_chunks(max_rows):
        rows = src.shape[0]
        raw = data.rows(t, r, r + rows)
        if exact:
            if q == T.F32:
                diff = raw.view(np.uint32) != src.view(np.uint32)
            elif q == T.BF16:
                diff = raw.view(np.uint16) != _bf16_bits(np.ascontiguousarray(src))
            else:
                diff = raw.view(np.uint16) != src.astype(np.float16).view(np.uint16)
            k = int(np.count_nonzero(diff))
            if k and first is None:
                i = int(np.flatnonzero(diff.reshape(-1))[0])
                first = (r + i // n, i % n)
            mism += k
        else:
            try:
                deq = _dequantize(t, raw)
            except Exception as e:
                return {"problem": f"cannot dequantize {t.type_name}: {e}"}
            xb = src.reshape(-1, bs).astype(np.float64)
            db = deq.reshape(-1, bs).astype(np.float64)
            amax = np.abs(xb).max(axis=1, keepdims=True)
            zero = amax[:, 0] == 0
            amax = np.maximum(amax, ERROR_FLOORS.get(q.name, 0.0))
            if zero.any():
                k = int(np.count_nonzero(db[zero]))
                if k and first is None:
                    first = (r, "all-zero source block dequantizes to non-zero values")
                mism += k
            nz = ~zero
            e = (db[nz] - xb[nz]) / amax[nz]
            se += float(np.sum(e * e))
            cnt += e.size
            if e.size:
                worst = max(worst, float(np.abs(e).max()))
        r += rows
    if r != t.n_rows:
        return {"problem": f"source has {r} rows, file has {t.n_rows}"}
    if exact:
        res: dict[str, Any] = {"exact": mism == 0, "mismatches": mism}
        if mism:
            rule = {T.F32: "equal", T.BF16: "round-to-nearest-even bf16 of", T.F16: "float16 rounding of"}[q]
            res["problem"] = f"{mism} values are not the {rule} the source (first at row {first[0]}, column {first[1]})"
        return res
    rel = math.sqrt(se / cnt) if cnt else 0.0
    bound = ERROR_BOUNDS.get(q.name)
    res = {"rel_rms": rel, "max_rel": worst, "bound": bound}
    problems = []
    if bound is not None and rel > bound:
        problems.append(f"block-relative RMS error {rel:.4g} exceeds the {q.name} bound {bound:.4g}: the data does not "
                        "match the source (wrong tensor, wrong order or permutation, or corrupt blocks)")
    if mism:
        problems.append(f"{mism} values are non-zero where the source block is all zeros")
    if problems:
        res["problem"] = "; ".join(problems)
    return res


# --------------------------------------------------------------------------- entry points


def file_routing(h: GGUFHeader) -> str | None:
    """What the file's expert routing computes in llama.cpp, in words (``archs.FileSpec``);
    None for a dense file or an architecture gguf-moe does not write."""
    from gguf_moe.archs import FILE_SPECS

    arch = h.kv("general.architecture")
    spec = FILE_SPECS.get(arch) if isinstance(arch, str) else None
    if spec is None:
        return None
    p = f"{arch}."
    return spec.routing({k[len(p):]: v.value for k, v in h.kvs.items() if k.startswith(p)})


def validate_file(path, *, deep: bool = False, source=None, progress: Callable[[str, str], None] | None = None) -> Report:
    """Check one GGUF file; never raises for problems in the file (they become findings)."""
    from gguf_moe.archs import FILE_SPECS
    from gguf_moe.split import shard_paths_of

    path = Path(path)
    shards = shard_paths_of(path)
    if shards:  # a set is checked from its first shard
        path = shards[0]
        if not path.is_file():
            rep = Report(str(path))
            rep.add("error", "split", f"shard 1 of {len(shards)} is missing: {path.name}", expected=str(path), found="missing")
            return rep
    rep = Report(str(path))
    try:
        h = read_header(path)
    except HeaderError as e:
        rep.add("error", "header", f"{e} (at byte {e.offset})")
        return rep
    except OSError as e:
        rep.add("error", "header", f"cannot read the file: {e.strerror or e}")
        return rep
    arch = h.kv("general.architecture")
    rep.summary.update(
        version=h.version, size=h.file_size, n_tensors=len(h.tensors), n_kv=len(h.kvs), arch=arch,
        file_type=_ftype_name(h.kv("general.file_type")) if "general.file_type" in h.kvs else None,
    )
    from gguf_moe.split import combine_headers, is_split_header

    if is_split_header(h):
        h, shards = combine_headers(h, rep.add)
        rep.summary.update(size=h.file_size, n_tensors=len(h.tensors), n_kv=len(h.kvs), shards=[str(s.path) for s in shards])
        in_set = {id(t) for t in h.tensors}  # (a tensor also found in an earlier shard is not)
        readable = [t for sh in shards for t in _check_tensor_infos(sh, rep) if id(t) in in_set]
    else:
        if not h.tensors:
            rep.add("warning", "tensors", "the file has no tensors")
        readable = _check_tensor_infos(h, rep)

    hp = None
    if not isinstance(arch, str):
        rep.add("error", "metadata", "general.architecture is missing or not a string", expected="str",
                found=h.kvs["general.architecture"].type if "general.architecture" in h.kvs else "missing")
    elif int(h.kv("split.count", 1) or 1) > 1:
        rep.add("info", "metadata", f"shard {h.kv('split.no', 0)} of a {h.kv('split.count')}-file split: the tensor-set "
                "and shape checks need the whole model (merge it with llama-gguf-split first)")
    elif arch in FILE_SPECS:
        hp = _llama_expectations(h, rep, arch)
        n_vocab = _vocab_size(h, rep, arch)
        if hp is not None:
            _check_llama_tensors(h, hp, n_vocab, rep)
            rep.summary.update(n_layer=hp["n_layer"], n_expert=hp["n_expert"], routing=file_routing(h))
            recorded = h.kv("moe.routing.source")
            if isinstance(recorded, str) and recorded != rep.summary["routing"]:
                rep.add("warning", "routing", f"the file computes {rep.summary['routing']}, its source {recorded} "
                        "(moe.routing.source; written with --allow-routing-mismatch): llama.cpp runs another model",
                        expected=recorded, found=rep.summary["routing"])
    else:
        rep.add("info", "metadata", f"no tensor-set rules for architecture {arch!r}: only format and numeric checks")
    _check_types(h, hp, rep)

    data = _Data(h)
    try:
        _check_numerics(data, readable, rep, progress)
        if deep:
            _check_deep(data, readable, rep, progress)
        if source is not None:
            _compare_source(data, h, readable, source, rep, progress)
    finally:
        data.close()
    return rep


def _summarize(kv: KV) -> Any:
    if kv.type.startswith("array"):
        vals = kv.value
        head = list(vals[:5]) if isinstance(vals, list) else vals[:5].tolist()
        return {"type": kv.type, "length": len(vals), "head": head}
    return kv.value


def inspect_file(path) -> dict:
    """Header, KVs (arrays summarized), tensors, totals, type histogram, bits per weight.
    A split set (given its first shard or any shard) is shown whole, with its shards.
    Raises ``CorruptFile`` if the header cannot be parsed or a shard is missing or foreign."""
    from gguf_moe.split import combine_headers, first_shard, is_split_header

    path = first_shard(Path(path))
    try:
        h = read_header(path)
    except HeaderError as e:
        raise CorruptFile(f"{path}: {e} (at byte {e.offset}); run `gguf-moe validate` for details") from None
    except FileNotFoundError:
        raise CorruptFile(f"{path}: no such file (the first shard of the set)") from None
    kvs = h.kvs
    shards = None
    if is_split_header(h):
        problems: list[str] = []

        def add(severity, check, message, *a, **k):
            if severity == "error":
                problems.append(message)

        h, shards = combine_headers(h, add)
        if problems:
            raise CorruptFile(f"{path}: {problems[0]}; run `gguf-moe validate` for details")
    tensors = []
    hist: dict[str, dict[str, int]] = {}
    n_el = n_b = 0
    for t in h.tensors:
        nb = t.n_bytes or 0
        src = t.src if t.src is not None else h
        tensors.append({"name": t.name, "ne": list(t.ne), "type": t.type_name, "n_elements": t.n_elements,
                        "n_bytes": nb, "offset": src.data_offset + t.offset})
        if shards is not None:
            tensors[-1]["shard"] = shards.index(src) + 1
        e = hist.setdefault(t.type_name, {"count": 0, "n_elements": 0, "n_bytes": 0})
        e["count"] += 1
        e["n_elements"] += t.n_elements
        e["n_bytes"] += nb
        n_el += t.n_elements
        n_b += nb
    info = {
        "path": str(path),
        "version": h.version,
        "file_size": h.file_size,
        "alignment": h.alignment,
        "data_offset": h.data_offset,
        "kv": [{"key": k, "type": v.type, "value": _summarize(v)} for k, v in kvs.items()],
        "tensors": tensors,
        "types": hist,
        "totals": {"n_tensors": len(tensors), "n_elements": n_el, "n_bytes": n_b,
                   "bits_per_weight": (8.0 * n_b / n_el) if n_el else None},
    }
    if shards is not None:
        info["shards"] = [{"path": str(s.path), "file_size": s.file_size, "n_tensors": len(s.tensors)} for s in shards]
    info["routing"] = file_routing(h)
    return _jsonable(info)
