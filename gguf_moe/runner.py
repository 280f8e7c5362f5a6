"""Run a model layer by layer in torch: the forward pass ``imatrix`` and ``eval`` share.

Only one decoder layer's weights are in memory at a time: the hidden states of every chunk
go through layer 0, its weights are dropped, layer 1 is loaded, and so on.  Memory is one
layer's float32 weights plus the activations (``[n_chunk, ctx, n_embd]`` float32, processed
in groups when that is large).

Weights come by their GGUF names, in GGUF layout (numpy ``[out, in]``, experts
``[E, out, in]``, Q/K rows in llama.cpp's rotary order), from either

* :class:`SourceWeights`: the Hugging Face checkpoint through ``gguf_moe.source`` (what
  ``convert -t F32`` would write), or
* :class:`GGUFWeights`: a GGUF file, dequantized with ``quant.dequantize``.

The arithmetic is llama.cpp's graph for the files ``convert`` writes (``llama``,
``qwen2moe``, ``qwen3moe``, ``granitemoe``, ``deepseek``), which compute the source model:
RMSNorm, rotary embeddings (adjacent pairs on the permuted Q/K rows, with ``rope_freqs``
factors, where the block layout permutes them; NEOX halves where it does not), per-head
Q/K RMS norms (Qwen3-MoE), causal attention with grouped KV heads, SwiGLU; MoE: softmax over
the router logits, top-k on the probabilities, renormalized as ``norm_topk_prob`` says
(Mixtral always), plus a shared expert: gated by a sigmoid (Qwen2-MoE) or not (DeepSeek-MoE).
What applies is read from the architecture module (:meth:`ModelSpec.from_source`).  All in
float32.

``round_activations=True`` models what llama.cpp's CPU matrix products do to their inputs:
before a product with a quantized weight the activations are quantized to the weight's
``vec_dot_type`` (Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for Q4_1/Q5_1, Q8_K for the K- and
IQ-quants, F16/BF16 for those weights).

``collect`` receives what llama-imatrix collects: for every product with a ``blk.*`` weight
(and ``output.weight`` when asked) the squared inputs summed per column, and the number
of rows; per expert for the expert tensors (the tokens routed to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_ARCH, TENSOR_NAMES, GGMLQuantizationType
from gguf import MODEL_TENSOR as T

from gguf_moe.errors import ConfigError, GgufMoeError, LayoutMismatch, UnsupportedArchitecture

__all__ = [
    "ModelSpec",
    "SourceWeights",
    "GGUFWeights",
    "Runner",
    "import_torch",
    "pick_device",
    "tensor_name",
]


def import_torch():
    """torch, or one clear error (it is an optional dependency)."""
    try:
        import torch
    except ImportError:
        raise GgufMoeError("this command needs torch; install it with: pip install 'gguf-moe[torch]' (or pip install torch)") from None
    return torch


def pick_device(name: str | None) -> str:
    torch = import_torch()
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GgufMoeError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return name


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps large freed blocks otherwise,
    and each layer's weights would add to the resident set)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


def tensor_name(kind: T, layer: int | None = None) -> str:
    base = TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def _bias_name(kind: T, layer: int) -> str:
    return TENSOR_NAMES[kind].format(bid=layer) + ".bias"


# --------------------------------------------------------------------------- model description


@dataclass(frozen=True)
class ModelSpec:
    """The numbers the forward pass needs, from a ``SourceModel``."""

    arch: MODEL_ARCH
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_expert: int
    n_expert_used: int
    eps: float
    rope_theta: float
    freq_scale: float
    norm_topk: bool
    #: the shared expert: "" (none), "gated" (sigmoid gate ``ffn_gate_inp_shexp``) or "ungated"
    shared_expert: str = ""
    #: NEOX rotary (first and second halves) rather than llama.cpp's adjacent pairs on
    #: permuted Q/K rows
    rope_neox: bool = False
    #: per-head RMS norms of Q and K before the rotary embedding (``attn_q_norm``/``attn_k_norm``)
    qk_norm: bool = False

    @property
    def moe(self) -> bool:
        return self.n_expert > 0

    @classmethod
    def from_source(cls, model) -> ModelSpec:
        """The source model's forward, from what its architecture module declares: the block
        layout's rules (permuted Q/K rows: llama.cpp's NORM rotary; none: NEOX), the file
        architecture's ``FileSpec`` (per-head Q/K norms, gated or ungated shared expert) and the
        hyperparameters (``norm_topk_prob``, ``n_ff_shexp``).  The file ``convert`` writes for a
        faithful routing computes the same function under the same tensor names."""
        from gguf_moe import archs as archmod

        hp = model.hparams
        layout = archmod.BLOCK_LAYOUTS.get(getattr(model, "layout", None) or "")
        file_spec = archmod.FILE_SPECS.get(model.arch)
        if model.spec is None or layout is None or file_spec is None:
            raise UnsupportedArchitecture(f"{model.path}: {model.hf_arch} cannot be run for imatrix/eval")
        if hp.n_ff_shexp and not file_spec.shexp:
            raise UnsupportedArchitecture(
                f"{model.path}: {model.hf_arch} has a shared expert but its {model.arch} file has none; imatrix/eval "
                "cannot name its tensors"
            )
        rope_type = (hp.get("rope_type") or "default").lower() if isinstance(hp.get("rope_type"), str) else "default"
        freq_scale = 1.0
        if rope_type == "linear" and hp["rope"].get("factor"):
            freq_scale = 1.0 / float(hp["rope"]["factor"])
        elif rope_type not in ("default", "llama3", "linear"):
            raise UnsupportedArchitecture(
                f"{model.path}: rope scaling {rope_type!r} is not supported by imatrix/eval (default, linear and llama3 are)"
            )
        return cls(
            arch=model.gguf_arch,
            n_layer=hp["n_layer"],
            n_embd=hp["n_embd"],
            n_head=hp["n_head"],
            n_head_kv=hp["n_head_kv"],
            head_dim=hp["head_dim"],
            n_vocab=hp["n_vocab"],
            n_expert=hp["n_expert"],
            n_expert_used=hp["n_expert_used"],
            eps=float(hp["rms_eps"] if hp["rms_eps"] is not None else 1e-5),
            rope_theta=float(hp["rope_theta"] if hp["rope_theta"] is not None else 10000.0),
            freq_scale=freq_scale,
            # the source's routing (Mixtral: always renormalised; the others as norm_topk_prob
            # says).  Where no llama.cpp graph computes it, convert refuses the file unless
            # --allow-routing-mismatch, and eval then shows the difference.
            norm_topk=bool(hp.norm_topk_prob),
            shared_expert=file_spec.shexp if hp.n_ff_shexp else "",
            rope_neox=not any(r.permute for r in layout.rules),
            qk_norm=file_spec.qk_norm,
        )


    def for_file(self, reader) -> ModelSpec:
        """This model as a GGUF file of it computes it in llama.cpp: the routing its
        architecture's graph applies (``FileSpec.renormalises``, or the file's
        ``{arch}.expert_weights_norm`` where the graph reads it), which differs from the
        source's in a file written with ``--allow-routing-mismatch``."""
        import dataclasses

        from gguf_moe import archs as archmod

        f = reader.fields.get("general.architecture")
        arch = f.contents() if f is not None else None
        fs = archmod.FILE_SPECS.get(arch)
        if fs is None or not self.moe:
            return self
        norm = fs.renormalises
        if norm is None:
            k = reader.fields.get(f"{arch}.expert_weights_norm")
            norm = bool(k.contents()) if k is not None else False
        return dataclasses.replace(self, norm_topk=bool(norm))


# --------------------------------------------------------------------------- weights


class SourceWeights:
    """GGUF-named float32 weights read from the Hugging Face checkpoint."""

    def __init__(self, model):
        self.model = model
        self._t = {t.name: t for t in model.tensors}

    def has(self, name: str) -> bool:
        return name in self._t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType.F32

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32, read in row chunks (few temporaries beside the result)."""
        t = self._t[name]
        out = np.empty((t.n_rows, t.n_cols), dtype=np.float32)
        r = 0
        for c in t.iter_chunks(max(1, (4 << 20) // max(1, t.n_cols))):
            out[r : r + len(c)] = c
            r += len(c)
        return out.reshape(t.shape)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a 2-D tensor (the embedding), read chunk by chunk."""
        t = self._t[name]
        uniq, inv = np.unique(ids, return_inverse=True)
        out = np.empty((len(uniq), t.n_cols), dtype=np.float32)
        r0 = 0
        for c in t.iter_chunks(4096):
            lo = np.searchsorted(uniq, r0)
            hi = np.searchsorted(uniq, r0 + len(c))
            out[lo:hi] = c[uniq[lo:hi] - r0]
            r0 += len(c)
        return out[inv]


class GGUFWeights:
    """GGUF-named float32 weights dequantized from a GGUF file or a llama-gguf-split set
    (given its first shard or any shard; ``quant.dequantize``).  ``reader``: the (first)
    file's reader, for the metadata; ``tensors``: every tensor of the file or set."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        from gguf_moe.split import read_gguf_set

        self.path = Path(path)

        def opener(p: Path) -> GGUFReader:
            try:
                return GGUFReader(p)
            except Exception as e:  # gguf raises ValueError/struct errors on damaged files
                raise ConfigError(f"{p}: not a readable GGUF file ({e})") from None

        self.readers, _, self.tensors = read_gguf_set(self.path, opener=opener)
        self.reader = self.readers[0]
        self.files = [Path(getattr(r.data, "filename", None) or self.path) for r in self.readers]  # the shards
        self._t = {t.name: t for t in self.tensors}

    def has(self, name: str) -> bool:
        return name in self._t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._t[name].shape.tolist()))

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(int(self._t[name].tensor_type))

    def get(self, name: str) -> np.ndarray:
        import quant

        t = self._t[name]
        shape = self.shape(name)
        ty = self.ggml_type(name)
        data = np.asarray(t.data)
        if ty.name in quant.QTYPES:
            raw = data.view(np.uint8).reshape(-1)
            out = np.array(quant.dequantize(raw, ty.name, shape[-1]).reshape(shape), dtype=np.float32)
        else:
            from gguf.quants import dequantize as gq_dequantize

            out = np.array(gq_dequantize(data, ty), dtype=np.float32).reshape(shape)
        self._release(t)
        return out

    def _release(self, t) -> None:
        """Drop a tensor's mapped file pages from the resident set once it is dequantized
        (they stay in the page cache; the map is read-only, so a later access reads them again)."""
        import mmap

        mm = getattr(t.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        base = next((r.data.ctypes.data for r in self.readers if getattr(r.data, "_mmap", None) is mm), None)
        if base is None:
            return
        start = t.data.ctypes.data - base
        end = start + t.data.nbytes
        start -= start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        import quant

        t = self._t[name]
        shape = self.shape(name)
        ty = self.ggml_type(name)
        uniq, inv = np.unique(ids, return_inverse=True)
        if ty.name in quant.QTYPES:
            rb = quant.row_bytes(ty.name, shape[-1])
            raw = np.asarray(t.data).view(np.uint8).reshape(-1, rb)
            out = np.array(quant.dequantize(np.ascontiguousarray(raw[uniq]), ty.name, shape[-1]), dtype=np.float32)
            self._release(t)
        else:
            out = self.get(name)[uniq]
        return out[inv]


# --------------------------------------------------------------------------- activation rounding

_Q8_0_FAMILY = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q4_1", "Q5_1"}


def _vec_dot_kind(ty: GGMLQuantizationType) -> str | None:
    n = ty.name
    if n == "F32":
        return None
    if n in ("F16", "BF16"):
        return n
    if n in _Q8_0_FAMILY:
        return "Q8_0"
    return "Q8_K"  # K-quants and the IQ types


def _round_q8_0(torch, x):
    shp = x.shape
    b = x.reshape(-1, 32)
    amax = b.abs().amax(dim=1, keepdim=True)
    a64 = amax.double()  # float divisions done in double, rounded once: IEEE float results
    d = (a64 / 127.0).float()
    inv = torch.where(amax > 0, (127.0 / a64).float(), torch.zeros_like(amax))
    q = torch.round(b * inv)  # ties to even, as _mm256_round_ps
    return (q * d.half().float()).reshape(shp)


def _round_q8_k(torch, x):
    shp = x.shape
    b = x.reshape(-1, 256)
    idx = b.abs().argmax(dim=1, keepdim=True)
    mx = torch.gather(b, 1, idx)
    nz = mx != 0
    one = torch.ones_like(mx)
    iscale = torch.where(nz, (-127.0 / torch.where(nz, mx, one).double()).float(), torch.zeros_like(mx))
    q = torch.clamp(torch.round(b * iscale), max=127.0)
    d = torch.where(nz, (1.0 / torch.where(nz, iscale, one).double()).float(), torch.zeros_like(iscale))
    return (q * d).reshape(shp)


# --------------------------------------------------------------------------- collection


@dataclass
class Collector:
    """Per weight: squared inputs summed per column (float64) and the row counts."""

    process_output: bool = False
    sums: dict[str, object] = field(default_factory=dict)  # name -> torch float64 [n_mat, ne0]
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int64 [n_mat]

    def add(self, names: str | tuple[str, ...], x, n_mat: int = 1, mat: int = 0) -> None:
        """Count the rows of ``x`` for each weight in ``names`` (products sharing one input)."""
        import torch

        x2 = x.reshape(-1, x.shape[-1])
        sq = (x2 * x2).sum(dim=0).double() if x2.shape[0] else None
        for name in (names,) if isinstance(names, str) else names:
            if name not in self.sums:
                self.sums[name] = torch.zeros((n_mat, x2.shape[-1]), dtype=torch.float64, device=x2.device)
                self.counts[name] = np.zeros(n_mat, dtype=np.int64)
            if sq is not None:
                self.sums[name][mat] += sq
            self.counts[name][mat] += x2.shape[0]

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {k: (self.sums[k].cpu().numpy(), self.counts[k].copy()) for k in self.sums}


# --------------------------------------------------------------------------- the model


class Runner:
    """The forward pass over ``[n_chunk, ctx]`` token chunks, one layer at a time."""

    def __init__(self, spec: ModelSpec, *, device: str = "cpu", round_activations: bool = False, batch: int = 4):
        self.torch = import_torch()
        self.spec = spec
        self.device = device
        self.round_activations = round_activations
        self.batch = max(1, batch)

    # weights -> torch ------------------------------------------------------

    def _load(self, weights, name: str, optional: bool = False):
        if not weights.has(name):
            if optional:
                return None
            raise LayoutMismatch(f"{getattr(weights, 'path', weights)}: tensor {name} is missing")
        arr = np.ascontiguousarray(weights.get(name), dtype=np.float32)
        if not arr.flags.writeable:  # a view of a memory-mapped F32 tensor
            arr = arr.copy()
        return (self.torch.from_numpy(arr).to(self.device), weights.ggml_type(name))

    def load_layer(self, weights, L: int) -> dict:
        s = self.spec
        kinds = [T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM]
        if s.qk_norm:
            kinds += [T.ATTN_Q_NORM, T.ATTN_K_NORM]
        if s.moe:
            kinds += [T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP]
            if s.shared_expert:
                kinds += [T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP]
            if s.shared_expert == "gated":
                kinds.append(T.FFN_GATE_INP_SHEXP)
        else:
            kinds += [T.FFN_GATE, T.FFN_UP, T.FFN_DOWN]
        w = {k: self._load(weights, tensor_name(k, L)) for k in kinds}
        if T.FFN_GATE_INP_SHEXP in w:  # [1, n_embd]; a GGUF stores it with ne [n_embd]
            t, ty = w[T.FFN_GATE_INP_SHEXP]
            w[T.FFN_GATE_INP_SHEXP] = (t.reshape(1, -1), ty)
        for k in (T.ATTN_Q, T.ATTN_K, T.ATTN_V):
            b = _bias_name(k, L)
            if weights.has(b):
                w[(k, "bias")] = self._load(weights, b)
        return w

    def rope_tables(self, weights, ctx: int):
        """cos/sin ``[ctx, head_dim/2]`` as ggml_rope_ext computes its angles."""
        torch, s = self.torch, self.spec
        half = s.head_dim // 2
        inv = s.rope_theta ** (-2.0 * np.arange(half, dtype=np.float64) / s.head_dim)
        name = tensor_name(T.ROPE_FREQS)
        if weights.has(name):
            inv = inv / weights.get(name).astype(np.float64).reshape(-1)[:half]
        ang = np.arange(ctx, dtype=np.float64)[:, None] * inv[None, :] * s.freq_scale
        ang = torch.from_numpy(ang.astype(np.float32)).to(self.device)
        return torch.cos(ang), torch.sin(ang)

    # arithmetic ------------------------------------------------------------

    def _rms(self, x, w):
        """ggml_rms_norm then the weight, in ggml's float operations: float squares summed
        in double, the mean rounded to float, ``scale = 1/sqrtf(mean + eps)``, ``x*scale*w``.
        Bit-equal normed values matter: with BF16 norm weights and quantized embeddings many
        activations sit exactly on a rounding boundary of the next Q8_0/Q8_K step."""
        torch = self.torch
        f32 = torch.float32
        mean = (x * x).double().mean(dim=-1, keepdim=True).to(f32).double()
        eps = float(np.float32(self.spec.eps))
        # each float operation done in double and rounded once to float: exactly IEEE float
        # arithmetic (torch's own float32 sqrt is not always correctly rounded)
        scale = (1.0 / torch.sqrt((mean + eps).to(f32).double()).to(f32).double()).to(f32)
        return (x * scale) * w

    def _mm(self, x, wt, shared: dict | None = None):
        """``x @ W.T`` with llama.cpp's rounding of ``x`` for W's type when asked.
        ``shared``: a dict for products with the same input, so each rounding is done once."""
        w, ty = wt
        if self.round_activations:
            kind = _vec_dot_kind(ty)
            if kind is not None:
                xr = shared.get(kind) if shared is not None else None
                if xr is None:
                    if kind == "Q8_0":
                        xr = _round_q8_0(self.torch, x)
                    elif kind == "Q8_K":
                        xr = _round_q8_k(self.torch, x)
                    elif kind == "F16":
                        xr = x.half().float()
                    else:
                        xr = x.bfloat16().float()
                    if shared is not None:
                        shared[kind] = xr
                x = xr
        return x @ w.T

    def _rope(self, x, cos, sin):
        """x ``[b, T, H, hd]``."""
        torch = self.torch
        if self.spec.rope_neox:  # NEOX: first and second halves
            h = x.shape[-1] // 2
            x0, x1 = x[..., :h], x[..., h:]
            c, s_ = cos[None, :, None, :], sin[None, :, None, :]
            return torch.cat([x0 * c - x1 * s_, x0 * s_ + x1 * c], dim=-1)
        # llama.cpp's NORM rope: adjacent pairs, i.e. a complex product per pair
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
        rot = torch.complex(cos, sin)[None, :, None, :]
        return torch.view_as_real(z * rot).flatten(-2)

    def layer(self, w: dict, H, L: int, rope, collect: Collector | None = None) -> None:
        """Run layer ``L`` on hidden states ``H [n, ctx, d]`` in place, ``self.batch`` chunks at a time."""
        for i in range(0, H.shape[0], self.batch):
            H[i : i + self.batch] = self._layer(w, H[i : i + self.batch], L, rope, collect)

    def _layer(self, w: dict, h, L: int, rope, collect):
        torch, s = self.torch, self.spec
        b, n, d = h.shape
        cos, sin = rope
        cos, sin = cos[:n], sin[:n]

        def name(k):
            return tensor_name(k, L)

        x = self._rms(h, w[T.ATTN_NORM][0])
        if collect is not None:
            collect.add(tuple(name(k) for k in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)), x)
        sh: dict = {}
        q, k_, v = (self._mm(x, w[k], sh) for k in (T.ATTN_Q, T.ATTN_K, T.ATTN_V))
        if (T.ATTN_Q, "bias") in w:
            q = q + w[(T.ATTN_Q, "bias")][0]
        if (T.ATTN_K, "bias") in w:
            k_ = k_ + w[(T.ATTN_K, "bias")][0]
        if (T.ATTN_V, "bias") in w:
            v = v + w[(T.ATTN_V, "bias")][0]
        hd = s.head_dim
        q, k_ = q.view(b, n, s.n_head, hd), k_.view(b, n, s.n_head_kv, hd)
        if s.qk_norm:  # per head, before the rotary embedding
            q, k_ = self._rms(q, w[T.ATTN_Q_NORM][0]), self._rms(k_, w[T.ATTN_K_NORM][0])
        q = self._rope(q, cos, sin)
        k_ = self._rope(k_, cos, sin)
        v = v.view(b, n, s.n_head_kv, hd)
        rep = s.n_head // s.n_head_kv
        q = q.transpose(1, 2)
        k_ = k_.transpose(1, 2).repeat_interleave(rep, dim=1)
        v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        scores = (q @ k_.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        mask = torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1)
        scores.masked_fill_(mask, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v  # [b, H, n, hd]
        att = att.transpose(1, 2).reshape(b, n, s.n_head * hd)
        del q, k_, v, scores
        if collect is not None:
            collect.add(name(T.ATTN_OUT), att)
        h = h + self._mm(att, w[T.ATTN_OUT])

        x = self._rms(h, w[T.FFN_NORM][0])
        if not s.moe:
            if collect is not None:
                collect.add((name(T.FFN_GATE), name(T.FFN_UP)), x)
            sh = {}
            g = torch.nn.functional.silu(self._mm(x, w[T.FFN_GATE], sh)) * self._mm(x, w[T.FFN_UP], sh)
            if collect is not None:
                collect.add(name(T.FFN_DOWN), g)
            return h + self._mm(g, w[T.FFN_DOWN])
        return h + self._moe(w, x.reshape(b * n, d), L, collect).view(b, n, d)

    def _moe(self, w: dict, x, L: int, collect):
        torch, s = self.torch, self.spec

        def name(k):
            return tensor_name(k, L)

        if collect is not None:
            collect.add(name(T.FFN_GATE_INP), x)
        probs = torch.softmax(self._mm(x, w[T.FFN_GATE_INP]), dim=-1)
        top_w, top_i = torch.topk(probs, s.n_expert_used, dim=-1)
        if s.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        wg, tg = w[T.FFN_GATE_EXP]
        wu, tu = w[T.FFN_UP_EXP]
        wd, td = w[T.FFN_DOWN_EXP]
        E = s.n_expert
        for e in range(E):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            xe = x[rows]
            if collect is not None:
                collect.add((name(T.FFN_GATE_EXP), name(T.FFN_UP_EXP)), xe, E, e)
            if rows.numel() == 0:
                if collect is not None:
                    collect.add(name(T.FFN_DOWN_EXP), xe.new_zeros((0, wd.shape[-1])), E, e)
                continue
            sh = {}
            ge = torch.nn.functional.silu(self._mm(xe, (wg[e], tg), sh)) * self._mm(xe, (wu[e], tu), sh)
            if collect is not None:
                collect.add(name(T.FFN_DOWN_EXP), ge, E, e)
            out[rows] += self._mm(ge, (wd[e], td)) * top_w[rows, slot, None]  # a token picks an expert once
        if s.shared_expert:
            gated = s.shared_expert == "gated"
            if collect is not None:
                kinds = (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP) + ((T.FFN_GATE_INP_SHEXP,) if gated else ())
                collect.add(tuple(name(k) for k in kinds), x)
            xs: dict = {}
            g = torch.nn.functional.silu(self._mm(x, w[T.FFN_GATE_SHEXP], xs)) * self._mm(x, w[T.FFN_UP_SHEXP], xs)
            if collect is not None:
                collect.add(name(T.FFN_DOWN_SHEXP), g)
            shared = self._mm(g, w[T.FFN_DOWN_SHEXP])
            out = out + (shared * torch.sigmoid(self._mm(x, w[T.FFN_GATE_INP_SHEXP], xs)) if gated else shared)
        return out

    # whole passes ------------------------------------------------------------

    def embed(self, weights, chunks: np.ndarray):
        rows = weights.rows(tensor_name(T.TOKEN_EMBD), chunks.reshape(-1))
        return self.torch.from_numpy(rows).to(self.device).view(*chunks.shape, -1)

    def run_layers(self, weights, chunks: np.ndarray, collect: Collector | None = None,
                   on_layer: Callable[[int], None] | None = None):
        """Hidden states after the last layer (before ``output_norm``)."""
        H = self.embed(weights, chunks)
        rope = self.rope_tables(weights, chunks.shape[1])
        for L in range(self.spec.n_layer):
            w = self.load_layer(weights, L)
            self.layer(w, H, L, rope, collect)
            del w
            release_memory()
            if on_layer is not None:
                on_layer(L)
        return H

    def load_head(self, weights) -> tuple:
        norm = self._load(weights, tensor_name(T.OUTPUT_NORM))
        out_name = tensor_name(T.OUTPUT)
        out = self._load(weights, out_name if weights.has(out_name) else tensor_name(T.TOKEN_EMBD))
        return norm, out

    def head_input(self, head, h):
        return self._rms(h, head[0][0])

    def logits(self, head, x):
        return self._mm(x, head[1])
