"""Tiny synthetic Hugging Face models shaped like mergekit-moe output.

`make_model` writes a complete model directory (config, safetensors shards with an index,
tokenizer files, mergekit-moe config) that exercises what real merges contain:

* three layouts: ``legacy`` Mixtral (``block_sparse_moe.experts.{e}.w1/w2/w3``, Transformers 4.x
  config), ``fused`` Mixtral as current mergekit-moe writes it for Transformers 5
  (``mlp.experts.gate_up_proj`` [E, 2*ff, d], ``mlp.experts.down_proj`` [E, d, ff],
  ``mlp.gate.weight`` [E, d], ``rope_parameters`` in the config) and ``dense`` Mistral;
* weights with the statistics that make quantization hard: Student-t tails, per-row scales,
  outlier input columns, near-dead rows, isolated spikes, all-zero runs; norms near 1;
* frankenMoE duplication: with ``duplicate_expert=True`` the last expert is an exact copy of
  expert 0 (mergekit reuses a source model), and the mergekit config names that source twice;
* a SentencePiece BPE tokenizer (byte fallback, ``<unk>``/``<s>``/``</s>`` = 0/1/2, like
  Llama 2 / Mistral) or a byte-level BPE ``tokenizer.json`` with the Llama 3 pre-tokenizer,
  both trained here on text this module writes itself.

Only numpy, safetensors-format writing, sentencepiece and tokenizers are used; the output is
deterministic for a given seed.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["make_model", "make_moe", "SPM_SPECIAL", "LLAMA3_SPLIT_REGEX"]

Layout = Literal["fused", "legacy", "dense"]

# Pieces 0..2 of the SentencePiece model, as in Llama 2 and Mistral.
SPM_SPECIAL = ("<unk>", "<s>", "</s>")

# The Llama 3 pre-tokenizer split (what llama.cpp calls "llama-bpe").
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DTYPES = {
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float32": ("F32", 4),
}

_SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

_BPE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Special tokens appended after the trained byte-level BPE vocabulary (Llama 3 style).
_BPE_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_2|>",
    "<|eot_id|>",
)

# Extra added tokens of the SentencePiece tokenizer (a ChatML pair, common in merges).
_SPM_ADDED = ("<|im_start|>", "<|im_end|>")


# --------------------------------------------------------------------------------------------
# training text
# --------------------------------------------------------------------------------------------

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has would when if more no out "
    "so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come "
    "since against go came right used take three expert mixture router token model layer weight "
    "quantize tensor merge gate embedding attention hidden value key query scale block"
).split()

_UNICODE_LINES = (
    "Café déjà vu, naïve façade, señor Müller öffnet die Tür.",
    "Привет, как дела? Это тестовая строка на русском языке.",
    "我想在苹果工作，今天天气很好。",
    "日本語のテキストも少し含めます。",
    "Ελληνικά γράμματα: αβγ δεζ ηθι.",
    "emoji: 🚀 🦙🦙 ✅ 😁 ⚡",
    "math: x² + y² = z², π ≈ 3.14159, ∑ i = n(n+1)/2",
    "tabs\tand  double  spaces   and\nnew lines\n\n",
    "code: def f(x):\n    return x * 2  # comment",
    "URLs like https://example.com/path?q=1&r=2 and e-mail a.b@c.de",
)


@functools.lru_cache(maxsize=1)
def _training_text() -> str:
    """About 150 KB of deterministic, varied text (words, numbers, punctuation, unicode)."""
    rng = np.random.default_rng(20240601)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "en", "ar", "st", "qu", "ing", "ion"]
    lines = []
    for i in range(2500):
        n = int(rng.integers(4, 16))
        words = []
        for _ in range(n):
            r = rng.random()
            if r < 0.75:
                words.append(_WORDS[int(rng.integers(len(_WORDS)))])
            elif r < 0.85:
                words.append("".join(syll[int(k)] for k in rng.integers(0, len(syll), rng.integers(2, 4))))
            elif r < 0.93:
                words.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 7))))))
            else:
                words.append(_WORDS[int(rng.integers(len(_WORDS)))].capitalize())
        sent = " ".join(words)
        sent = sent[0].upper() + sent[1:] + rng.choice([".", ".", "!", "?", ",", ";", ":"])
        if i % 7 == 0:
            sent = f'"{sent}" ({int(rng.integers(1, 99))}%)'
        if i % 11 == 0:
            sent += "  " + _UNICODE_LINES[int(rng.integers(len(_UNICODE_LINES)))]
        lines.append(sent)
    lines.extend(_UNICODE_LINES * 3)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _train_spm(vocab_size: int) -> bytes:
    """Serialized SentencePiece BPE model trained like Llama 2's (byte fallback, digits split)."""
    import sentencepiece as spm

    text = _training_text()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        max_sentence_length=4192,
        minloglevel=2,
    )
    return model.getvalue()


def _spm_tokenizer_json(model_proto: bytes, added: list[tuple[int, str]]) -> str:
    """A Hugging Face fast-tokenizer JSON equivalent to the SentencePiece BPE model.

    Merges follow the usual extraction from a SentencePiece BPE vocabulary: every split of a
    piece into two pieces of the vocabulary is a merge, ranked by the merged piece's score.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
            continue
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        merges.extend((scores[piece], pid, lft, rgt) for _, _, lft, rgt in local)
    # highest score first; stable on id for equal scores
    merges.sort(key=lambda m: (-m[0], m[1]))
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(m[2], m[3]) for m in merges],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPM_SPECIAL])
    for _, content in added:
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])
    return tok.to_str(pretty=True)


def _added_decoder_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_spm_tokenizer(out: Path, n_pieces: int) -> tuple[int, dict]:
    """Write tokenizer.model/.json/_config.json and special_tokens_map.json. Returns
    (tokenizer size incl. added tokens, special ids for config.json)."""
    proto = _train_spm(n_pieces)
    (out / "tokenizer.model").write_bytes(proto)
    added = [(n_pieces + i, t) for i, t in enumerate(_SPM_ADDED)]
    (out / "tokenizer.json").write_text(_spm_tokenizer_json(proto, added), encoding="utf-8")
    decoder = {str(i): _added_decoder_entry(t) for i, t in enumerate(SPM_SPECIAL)}
    decoder.update({str(i): _added_decoder_entry(t) for i, t in added})
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for _, t in added],
        "bos_token": "<s>",
        "chat_template": _SPM_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [t for _, t in added],
            "bos_token": {**_added_decoder_entry("<s>")},
            "eos_token": {**_added_decoder_entry("</s>")},
            "unk_token": {**_added_decoder_entry("<unk>")},
        },
    )
    (out / "added_tokens.json").write_text(
        json.dumps({t: i for i, t in added}, indent=2) + "\n", encoding="utf-8"
    )
    return n_pieces + len(added), {"bos_token_id": 1, "eos_token_id": 2}


@functools.lru_cache(maxsize=4)
def _train_bpe(n_merged: int) -> str:
    """tokenizer.json of a byte-level BPE with the Llama 3 pre-tokenizer (no special tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=n_merged,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_text().splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def _write_bpe_tokenizer(out: Path, n_pieces: int) -> tuple[int, dict]:
    from tokenizers import AddedToken, Tokenizer, processors

    tok = Tokenizer.from_str(_train_bpe(n_pieces))
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _BPE_SPECIAL])
    bos, eos = _BPE_SPECIAL[0], _BPE_SPECIAL[1]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, base)],
            ),
        ]
    )
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    decoder = {str(base + i): _added_decoder_entry(t) for i, t in enumerate(_BPE_SPECIAL)}
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": bos,
        "chat_template": _BPE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})
    return base + len(_BPE_SPECIAL), {"bos_token_id": base, "eos_token_id": base + 1}


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def _matrix(rng: np.random.Generator, rows: int, cols: int, gain: float) -> np.ndarray:
    """A [rows, cols] weight whose products with unit-RMS inputs have RMS about `gain`, with
    the irregularities of trained weights."""
    df = 5.0
    w = rng.standard_t(df, size=(rows, cols)) * (gain / np.sqrt(cols) / np.sqrt(df / (df - 2)))
    w *= np.exp(rng.normal(0.0, 0.35, size=(rows, 1)))  # per-row scales
    n_cols = max(1, cols // 96)  # outlier input channels
    w[:, rng.choice(cols, n_cols, replace=False)] *= rng.uniform(3.0, 8.0, size=n_cols)
    dead = rng.choice(rows, max(1, rows // 64), replace=False)  # near-dead rows
    w[dead] *= rng.choice([1e-3, 1e-5], size=(len(dead), 1))
    n_spikes = max(1, rows * cols // 8192)  # isolated large values
    flat = w.reshape(-1)
    idx = rng.choice(flat.size, n_spikes, replace=False)
    flat[idx] = rng.choice([-1.0, 1.0], n_spikes) * rng.uniform(8.0, 20.0, n_spikes) * gain / np.sqrt(cols)
    if cols >= 64:  # an all-zero run, as pruned or padded weights have
        r = int(rng.integers(rows))
        c = int(rng.integers(0, cols // 32)) * 32
        w[r, c : c + 32] = 0.0
    return w.astype(np.float32)


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    v = 1.0 + 0.08 * rng.standard_normal(n)
    v[rng.choice(n, max(1, n // 64), replace=False)] *= rng.uniform(0.3, 2.5)
    return v.astype(np.float32)


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage array (uint16 bit patterns for bf16, round to nearest even)."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(x.astype(np.float16))
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def _write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]], st_dtype: str) -> None:
    """Write tensors in the given order (header keys in write order, as mergekit does)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        header[name] = {
            "dtype": st_dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in tensors:
            f.write(arr.tobytes())


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_tensors(
    rng: np.random.Generator,
    *,
    layout: str,
    n_layer: int,
    hidden: int,
    ff: int,
    n_head: int,
    n_kv_head: int,
    n_expert: int,
    duplicate_expert: bool,
    vocab_size: int,
) -> list[tuple[str, np.ndarray]]:
    """All tensors (float32, HF names and shapes) in the order mergekit writes them."""
    head_dim = hidden // n_head
    out: list[tuple[str, np.ndarray]] = []
    emb = rng.standard_t(5.0, size=(vocab_size, hidden)) * 0.02
    emb *= np.exp(rng.normal(0.0, 0.3, size=(vocab_size, 1)))
    out.append(("model.embed_tokens.weight", emb.astype(np.float32)))
    for L in range(n_layer):
        p = f"model.layers.{L}"
        out.append((f"{p}.input_layernorm.weight", _norm(rng, hidden)))
        out.append((f"{p}.self_attn.q_proj.weight", _matrix(rng, n_head * head_dim, hidden, 1.0)))
        out.append((f"{p}.self_attn.k_proj.weight", _matrix(rng, n_kv_head * head_dim, hidden, 1.0)))
        out.append((f"{p}.self_attn.v_proj.weight", _matrix(rng, n_kv_head * head_dim, hidden, 1.0)))
        out.append((f"{p}.self_attn.o_proj.weight", _matrix(rng, hidden, n_head * head_dim, 0.7)))
        out.append((f"{p}.post_attention_layernorm.weight", _norm(rng, hidden)))
        if layout == "dense":
            out.append((f"{p}.mlp.gate_proj.weight", _matrix(rng, ff, hidden, 1.0)))
            out.append((f"{p}.mlp.up_proj.weight", _matrix(rng, ff, hidden, 1.0)))
            out.append((f"{p}.mlp.down_proj.weight", _matrix(rng, hidden, ff, 1.2)))
            continue
        router = _matrix(rng, n_expert, hidden, 2.5)
        experts = []
        for e in range(n_expert):
            if duplicate_expert and e == n_expert - 1:
                experts.append(experts[0])
                continue
            experts.append(
                (
                    _matrix(rng, ff, hidden, 1.0),  # gate (w1)
                    _matrix(rng, ff, hidden, 1.0),  # up (w3)
                    _matrix(rng, hidden, ff, 1.2),  # down (w2)
                )
            )
        if layout == "legacy":
            out.append((f"{p}.block_sparse_moe.gate.weight", router))
            for e, (g, u, d) in enumerate(experts):
                q = f"{p}.block_sparse_moe.experts.{e}"
                out.append((f"{q}.w1.weight", g))
                out.append((f"{q}.w2.weight", d))
                out.append((f"{q}.w3.weight", u))
        else:
            out.append((f"{p}.mlp.gate.weight", router))
            out.append(
                (f"{p}.mlp.experts.gate_up_proj", np.stack([np.concatenate([g, u]) for g, u, _ in experts]))
            )
            out.append((f"{p}.mlp.experts.down_proj", np.stack([d for _, _, d in experts])))
    out.append(("model.norm.weight", _norm(rng, hidden)))
    out.append(("lm_head.weight", _matrix(rng, vocab_size, hidden, 4.0)))
    return out


def _write_shards(out: Path, tensors: list[tuple[str, np.ndarray]], dtype: str, shards: int) -> None:
    st_dtype, _ = _DTYPES[dtype]
    stored = [(name, _to_dtype(arr, dtype)) for name, arr in tensors]
    if shards <= 1:
        _write_safetensors(out / "model.safetensors", stored, st_dtype)
        return
    shards = min(shards, len(stored))
    total = sum(a.nbytes for _, a in stored)
    groups: list[list[tuple[str, np.ndarray]]] = [[]]
    done = 0
    for i, (name, arr) in enumerate(stored):
        left = len(stored) - i  # tensors not yet placed, this one included
        open_after = shards - len(groups)  # shards still to start
        if groups[-1] and open_after and (done >= total * len(groups) / shards or left <= open_after):
            groups.append([])
        groups[-1].append((name, arr))
        done += arr.nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        _write_safetensors(out / fname, group, st_dtype)
        weight_map.update({name: fname for name, _ in group})
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"mergekit_version": "0.1.4"}, "weight_map": weight_map},
    )


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def _config(
    *,
    layout: str,
    n_layer: int,
    hidden: int,
    ff: int,
    n_head: int,
    n_kv_head: int,
    n_expert: int,
    top_k: int,
    vocab_size: int,
    dtype: str,
    special: dict,
    rope_theta: float,
) -> dict:
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": special["bos_token_id"],
        "eos_token_id": special["eos_token_id"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ff,
        "max_position_embeddings": 32768,
    }
    if layout == "dense":
        cfg = {"architectures": ["MistralForCausalLM"], **common, "model_type": "mistral"}
    else:
        cfg = {"architectures": ["MixtralForCausalLM"], **common, "model_type": "mixtral"}
    cfg.update(
        {
            "num_attention_heads": n_head,
            "num_hidden_layers": n_layer,
            "num_key_value_heads": n_kv_head,
        }
    )
    if layout != "dense":
        cfg.update({"num_experts_per_tok": top_k, "num_local_experts": n_expert})
        cfg.update({"output_router_logits": False})
    if layout == "fused":
        # Transformers 5 style, as current mergekit-moe writes it
        cfg.update(
            {
                "dtype": dtype,
                "head_dim": None,
                "pad_token_id": None,
                "rms_norm_eps": 1e-05,
                "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
                "router_aux_loss_coef": 0.001,
                "router_jitter_noise": 0.0,
                "sliding_window": None,
                "tie_word_embeddings": False,
                "transformers_version": "5.0.0",
                "use_cache": True,
                "vocab_size": vocab_size,
            }
        )
        return cfg
    cfg.update({"rms_norm_eps": 1e-05, "rope_theta": rope_theta})
    if layout != "dense":
        cfg.update({"router_aux_loss_coef": 0.02})
    cfg.update(
        {
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "transformers_version": "4.46.3",
            "use_cache": True,
            "vocab_size": vocab_size,
        }
    )
    return cfg


def _mergekit_yaml(n_expert: int, duplicate_expert: bool, dtype: str, tokenizer: str) -> str:
    base = "mistralai/Mistral-7B-Instruct-v0.2" if tokenizer == "spm" else "meta-llama/Meta-Llama-3-8B-Instruct"
    topics = [
        ("synthetic/chat-expert", ["chat", "assistant", "conversation"]),
        ("synthetic/code-expert", ["code", "python", "function"]),
        ("synthetic/math-expert", ["math", "solve", "equation"]),
        ("synthetic/story-expert", ["story", "write", "character"]),
        ("synthetic/science-expert", ["science", "physics", "biology"]),
        ("synthetic/law-expert", ["law", "contract", "legal"]),
        ("synthetic/medical-expert", ["medicine", "symptom", "diagnosis"]),
        ("synthetic/translate-expert", ["translate", "french", "german"]),
    ]
    lines = [f"base_model: {base}", "gate_mode: hidden", f"dtype: {dtype}", "experts:"]
    for e in range(n_expert):
        src = topics[0][0] if (duplicate_expert and e == n_expert - 1) else topics[e % len(topics)][0]
        prompts = topics[e % len(topics)][1]
        lines.append(f"  - source_model: {src}")
        lines.append("    positive_prompts:")
        lines.extend(f'      - "{p}"' for p in prompts)
    return "\n".join(lines) + "\n"


def _model_card(name: str, recipe_yaml: str | None) -> str:
    """README.md in the style of the LazyMergekit cards most frankenMoEs are published with."""
    sources: list[str] = []
    for line in (recipe_yaml or "").splitlines():
        if line.strip().startswith("- source_model:"):
            src = line.split(":", 1)[1].strip()
            if src not in sources:
                sources.append(src)
    lines = ["---", "license: apache-2.0", "tags:", "- moe", "- frankenmoe", "- merge", "- mergekit", "- lazymergekit"]
    lines += [f"- {s}" for s in sources]
    if sources:
        lines += ["base_model:"] + [f"- {s}" for s in sources]
    lines += ["language:", "- en", "---", "", f"# {name}", ""]
    if sources:
        lines.append(f"{name} is a Mixture of Experts (MoE) made with the following models using LazyMergekit:")
        lines += [f"* [{s}](https://huggingface.co/{s})" for s in sources]
        lines += ["", "## Configuration", "", "```yaml", (recipe_yaml or "").rstrip(), "```", ""]
    else:
        lines += [f"{name} is a small dense model for tests.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def make_model(
    out_dir: str | Path,
    *,
    layout: Layout = "fused",
    n_layer: int = 2,
    hidden: int = 256,
    ff: int = 512,
    n_head: int = 4,
    n_kv_head: int = 2,
    n_expert: int = 4,
    top_k: int = 2,
    duplicate_expert: bool = True,
    vocab_size: int | None = None,
    tokenizer: Literal["spm", "bpe"] = "spm",
    dtype: str = "bfloat16",
    shards: int = 2,
    seed: int = 0,
    mergekit_config: bool = True,
    tokenizer_pieces: int | None = None,
    model_card: bool = False,
) -> Path:
    """Write a complete tiny HF model directory to `out_dir` and return its path.

    `vocab_size` defaults to the tokenizer's size (trained pieces + added tokens); a larger
    value pads the embedding and output matrices, as merges with extra rows do.
    `tokenizer_pieces` sets the trained vocabulary size (default 1000 for spm, 1200 for bpe).
    `model_card` adds a README.md with YAML front matter (license, tags, base_model list) as
    LazyMergekit writes it; converters turn it into general.* keys.
    """
    if layout not in ("fused", "legacy", "dense"):
        raise ValueError(f"layout must be 'fused', 'legacy' or 'dense', not {layout!r}")
    if tokenizer not in ("spm", "bpe"):
        raise ValueError(f"tokenizer must be 'spm' or 'bpe', not {tokenizer!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if hidden % n_head or n_head % n_kv_head or (hidden // n_head) % 2:
        raise ValueError("hidden must split into an even head size and n_head into n_kv_head groups")
    if layout != "dense" and not (1 <= top_k <= n_expert and n_expert >= 2):
        raise ValueError(f"need 2 <= n_expert and 1 <= top_k <= n_expert (got {n_expert}, {top_k})")
    if duplicate_expert and layout != "dense" and n_expert < 2:
        raise ValueError("duplicate_expert needs at least two experts")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        n_tok, special = _write_spm_tokenizer(out, tokenizer_pieces or 1000)
        rope_theta = 1000000.0
    else:
        n_tok, special = _write_bpe_tokenizer(out, tokenizer_pieces or 1200)
        rope_theta = 500000.0
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tok} tokens)")

    rng = np.random.default_rng(seed)
    dims = dict(n_layer=n_layer, hidden=hidden, ff=ff, n_head=n_head, n_kv_head=n_kv_head)
    tensors = _model_tensors(
        rng,
        layout=layout,
        n_expert=n_expert,
        duplicate_expert=duplicate_expert and layout != "dense",
        vocab_size=vocab_size,
        **dims,
    )
    _write_shards(out, tensors, dtype, shards)
    cfg = _config(
        layout=layout,
        n_expert=n_expert,
        top_k=top_k,
        vocab_size=vocab_size,
        dtype=dtype,
        special=special,
        rope_theta=rope_theta,
        **dims,
    )
    _write_json(out / "config.json", dict(sorted(cfg.items())))
    _write_json(
        out / "generation_config.json",
        {"_from_model_config": True, **{k: special[k] for k in ("bos_token_id", "eos_token_id")},
         "transformers_version": cfg["transformers_version"]},
    )
    recipe = _mergekit_yaml(n_expert, duplicate_expert, dtype, tokenizer) if layout != "dense" else None
    if mergekit_config and recipe is not None:
        (out / "mergekit_moe_config.yml").write_text(recipe, encoding="utf-8")
    if model_card:
        (out / "README.md").write_text(
            _model_card(out.name, recipe), encoding="utf-8"
        )
    return out


# --------------------------------------------------------------------------------------------
# Qwen2-MoE, Qwen3-MoE and DeepSeek-MoE merges
# --------------------------------------------------------------------------------------------

MoeArch = Literal["qwen2moe", "qwen3moe", "deepseek"]


def _router_rows(rng: np.random.Generator, emb: np.ndarray, n_expert: int, n_layer: int, gain: float) -> list[np.ndarray]:
    """Routers as mergekit's ``gate_mode: hidden`` makes them: per expert, the mean hidden
    state of its prompts, normalised.  The prompts' hidden states are taken as the RMS-normed
    embeddings of a few token ids drawn per expert (the residual stream a tiny model adds to
    them is small), with a little per-layer drift."""
    h = emb / np.sqrt((emb**2).mean(axis=1, keepdims=True) + 1e-6)
    prompts = [rng.choice(len(emb), 12, replace=False) for _ in range(n_expert)]
    base = np.stack([h[p].mean(axis=0) for p in prompts])
    out = []
    for _ in range(n_layer):
        r = base + 0.3 * rng.standard_normal(base.shape) * base.std()
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        out.append((r * gain).astype(np.float32))
    return out


def make_moe(
    out_dir: str | Path,
    *,
    arch: MoeArch,
    layout: Literal["fused", "legacy"] = "legacy",
    n_layer: int = 2,
    hidden: int = 256,
    ff: int = 512,
    n_head: int = 4,
    n_kv_head: int = 2,
    n_expert: int = 4,
    top_k: int = 2,
    norm_topk_prob: bool = True,
    n_shared: int | None = 1,
    duplicate_expert: bool = True,
    tokenizer: Literal["spm", "bpe"] = "bpe",
    seed: int = 0,
    shards: int = 2,
    router_gain: float = 24.0,
    tie_embeddings: bool = False,
) -> Path:
    """A merge written the way mergekit-moe writes ``qwen2moe``, ``qwen3moe`` and
    ``deepseek`` outputs: every expert is the base model's MLP plus a small fine-tune delta
    (the last one a copy of expert 0 with ``duplicate_expert``: one source model used
    twice), attention and norms from the base, routers from hidden states
    (``_router_rows``), the shared expert (Qwen2-MoE: gated; DeepSeek with ``n_shared``:
    ``n_shared`` experts wide) from the base MLP.  ``layout``: ``fused`` packs the routed
    experts as Transformers 5 does (``mlp.experts.gate_up_proj``/``down_proj``; not for
    DeepSeek, whose remote code has none).  ``tie_embeddings``: no ``lm_head`` (as merges of
    small Qwen2.5 bases).  bf16, tokenizer files as ``make_model``."""
    if arch not in ("qwen2moe", "qwen3moe", "deepseek"):
        raise ValueError(f"arch must be qwen2moe, qwen3moe or deepseek, not {arch!r}")
    if layout == "fused" and arch == "deepseek":
        raise ValueError("DeepSeek-MoE has only the per-expert layout")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        n_tok, special = _write_spm_tokenizer(out, 1000)
    else:
        n_tok, special = _write_bpe_tokenizer(out, 1200)
    rng = np.random.default_rng(seed)
    hd = hidden // n_head
    t: list[tuple[str, np.ndarray]] = []
    emb = (rng.standard_t(5.0, size=(n_tok, hidden)) * 0.02).astype(np.float32)
    t.append(("model.embed_tokens.weight", emb))
    routers = _router_rows(rng, emb, n_expert, n_layer, router_gain / np.sqrt(hidden))
    for L in range(n_layer):
        p = f"model.layers.{L}."
        t.append((p + "input_layernorm.weight", _norm(rng, hidden)))
        for n, rows in (("q", n_head * hd), ("k", n_kv_head * hd), ("v", n_kv_head * hd)):
            t.append((p + f"self_attn.{n}_proj.weight", _matrix(rng, rows, hidden, 1.0)))
            if arch == "qwen2moe":
                t.append((p + f"self_attn.{n}_proj.bias", (0.2 * rng.standard_normal(rows)).astype(np.float32)))
        t.append((p + "self_attn.o_proj.weight", _matrix(rng, hidden, n_head * hd, 0.7)))
        if arch == "qwen3moe":
            t.append((p + "self_attn.q_norm.weight", _norm(rng, hd)))
            t.append((p + "self_attn.k_norm.weight", _norm(rng, hd)))
        t.append((p + "post_attention_layernorm.weight", _norm(rng, hidden)))
        t.append((p + "mlp.gate.weight", routers[L]))
        base = (_matrix(rng, ff, hidden, 1.0), _matrix(rng, ff, hidden, 1.0), _matrix(rng, hidden, ff, 1.2))
        experts = []
        for e in range(n_expert):
            if duplicate_expert and e == n_expert - 1:
                experts.append(experts[0])
                continue
            experts.append(tuple((w + 0.25 * _matrix(rng, *w.shape, 1.0) * (1.0 if i < 2 else 1.2)).astype(np.float32)
                                 for i, w in enumerate(base)))  # fmt: skip
        if layout == "fused":
            t.append((p + "mlp.experts.gate_up_proj", np.stack([np.concatenate([g, u]) for g, u, _ in experts])))
            t.append((p + "mlp.experts.down_proj", np.stack([d for _, _, d in experts])))
        else:
            for e, (g, u, d) in enumerate(experts):
                for proj, w in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
                    t.append((p + f"mlp.experts.{e}.{proj}.weight", w))
        if arch == "qwen2moe":
            for proj, w in zip(("gate_proj", "up_proj", "down_proj"), base):
                t.append((p + f"mlp.shared_expert.{proj}.weight", w))
            t.append((p + "mlp.shared_expert_gate.weight", _matrix(rng, 1, hidden, 1.0)))
        elif arch == "deepseek" and n_shared:
            wide = tuple(np.concatenate([w] * n_shared, axis=0 if i < 2 else 1) / (1.0 if i < 2 else n_shared)
                         for i, w in enumerate(base))  # fmt: skip
            for proj, w in zip(("gate_proj", "up_proj", "down_proj"), wide):
                t.append((p + f"mlp.shared_experts.{proj}.weight", w.astype(np.float32)))
    t.append(("model.norm.weight", _norm(rng, hidden)))
    if not tie_embeddings:
        t.append(("lm_head.weight", _matrix(rng, n_tok, hidden, 4.0)))
    _write_shards(out, t, "bfloat16", shards)

    cfg = {
        "attention_dropout": 0.0, "bos_token_id": special["bos_token_id"], "eos_token_id": special["eos_token_id"],
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": ff,
        "max_position_embeddings": 8192, "num_attention_heads": n_head, "num_hidden_layers": n_layer,
        "num_key_value_heads": n_kv_head, "num_experts_per_tok": top_k, "norm_topk_prob": norm_topk_prob,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": tie_embeddings, "use_cache": True, "vocab_size": n_tok,
    }  # fmt: skip
    if arch == "deepseek":
        cfg |= {
            "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "n_routed_experts": n_expert,
            "n_shared_experts": n_shared, "moe_intermediate_size": ff, "first_k_dense_replace": 0,
            "moe_layer_freq": 1, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
            "attention_bias": False, "rope_theta": 10000.0, "rope_scaling": None, "torch_dtype": "bfloat16",
            "transformers_version": "4.46.3",
        }  # fmt: skip
    else:
        qwen3 = arch == "qwen3moe"
        cfg |= {
            "architectures": ["Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM"],
            "model_type": "qwen3_moe" if qwen3 else "qwen2_moe", "num_experts": n_expert,
            "moe_intermediate_size": ff, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001, "output_router_logits": False, "sliding_window": None,
            "use_sliding_window": False,
        }  # fmt: skip
        if qwen3:
            cfg |= {"head_dim": hd, "attention_bias": False}
        else:
            cfg |= {"shared_expert_intermediate_size": ff, "qkv_bias": True}
        if layout == "fused":
            cfg |= {"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "bfloat16",
                    "transformers_version": "5.0.0"}  # fmt: skip
        else:
            cfg |= {"rope_theta": 1000000.0, "torch_dtype": "bfloat16", "transformers_version": "4.46.3"}
    _write_json(out / "config.json", dict(sorted(cfg.items())))
    src = ["synthetic/chat-expert", "synthetic/code-expert", "synthetic/math-expert", "synthetic/story-expert"]
    lines = ["base_model: synthetic/base", "gate_mode: hidden", "dtype: bfloat16", f"architecture: {arch}", "experts:"]
    for e in range(n_expert):
        name = src[0] if duplicate_expert and e == n_expert - 1 else src[e % len(src)]
        lines += [f"  - source_model: {name}", "    positive_prompts:", f'      - "topic {e}"']
    if arch == "deepseek" and n_shared:
        lines += ["shared_experts:", "  - source_model: synthetic/base"]
    (out / "mergekit_moe_config.yml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
