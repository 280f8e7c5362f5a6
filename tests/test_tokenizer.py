"""Tokenizer conversion, checked against llama.cpp itself.

A vocab-only GGUF written with `add_tokenizer` is loaded by llama.cpp (llama-cpp-python); it
must tokenize a varied text set to exactly the ids of the Hugging Face tokenizer (transformers
AutoTokenizer and the tokenizers library, plus sentencepiece for SPM models) and detokenize
back to the same text.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
from pathlib import Path

import gguf
import pytest

from gguf_moe.errors import TokenizerError
from gguf_moe.synth import make_model
from gguf_moe.tokenizer import CHKTXT, KNOWN_PRE_TOKENIZERS, _PRE_BY_HASH, add_tokenizer, detect_pre_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_BASE = REPO / ".cache" / "llama.cpp" / "conversion" / "base.py"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "\n",
    "\n\n\nnewlines\r\nwindows\r\n",
    "   \n  \t\n ",
    "1234567890 3.14159 1,000,000.50 -42 0x1F 007",
    "3 33 333 3333 33333 333333",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "Café déjà vu, naïve façade, señor Müller, Ærøskøbing",
    "e\u0301 combining, Å vs A\u030a",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "我想在apple工作1314151天～ 今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 텍스트입니다.",
    "مرحبا بالعالم — שלום עולם",
    "ภาษาไทย กขค",
    "emoji 🚀 🦙🦙 ✅ 😶\u200d🌫️ 👩🏽\u200d💻 🇩🇪",
    "math: x² + y² = z², ∑ᵢ aᵢ ≤ ∞, π ≈ 3.14",
    "rare: ʬ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u2603 \u00a0nbsp\u202fnarrow",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "MixOfCASEandDigits123abcXYZ",
    "control chars \x00 \x07 \x1b[0m \x7f",
]

SPM_SPECIAL_TEXTS = [
    "<s>[INST] hi [/INST] ok</s>",
    "a<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant",
    "x<|im_end|>y",
]

BPE_SPECIAL_TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "text<|eot_id|>more<|end_of_text|>",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def write_vocab_gguf(src: Path, out: Path, *, pre_tokenizer: str | None = None) -> Path:
    """A GGUF with the llama hyper-parameters llama.cpp needs and the converted tokenizer."""
    cfg = json.loads((src / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type("model")
    w.add_name(src.name)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(32)
    w.add_quantization_version(2)
    add_tokenizer(w, src, vocab_size=cfg["vocab_size"], pre_tokenizer=pre_tokenizer)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return out


def load_vocab(path: Path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def lc_tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def lc_detokenize(llm, ids: list[int], *, remove_special: bool, unparse_special: bool) -> str:
    """llama_detokenize with a buffer large enough for any piece (the high-level wrapper
    truncates pieces longer than 32 bytes)."""
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(1 << 16)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), remove_special, unparse_special)
    assert n >= 0, f"detokenize buffer too small ({n})"
    return buf.raw[:n].decode("utf-8", errors="replace")


def gguf_field(path: Path, key: str):
    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else field.contents()


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

TINY = dict(layout="dense", n_layer=1, hidden=64, ff=128, n_head=2, n_kv_head=1, shards=1)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tok") / "spm-model", tokenizer="spm", **TINY)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tok") / "bpe-model", tokenizer="bpe", **TINY)


@pytest.fixture(scope="module")
def spm_gguf(spm_model, tmp_path_factory) -> Path:
    return write_vocab_gguf(spm_model, tmp_path_factory.mktemp("tok") / "spm.gguf")


@pytest.fixture(scope="module")
def bpe_gguf(bpe_model, tmp_path_factory) -> Path:
    return write_vocab_gguf(bpe_model, tmp_path_factory.mktemp("tok") / "bpe.gguf")


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


def test_spm_tokenize_matches_hf_and_sentencepiece(spm_model, spm_gguf):
    import sentencepiece as spm

    llm = load_vocab(spm_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(spm_model)
    fast = Tokenizer.from_file(str(spm_model / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
    mismatches = []
    for text in TEXTS + SPM_SPECIAL_TEXTS:
        ours = lc_tokenize(llm, text)
        ref = hf.encode(text)
        if ours != ref or fast.encode(text).ids != ref:
            mismatches.append((text, ours, ref))
        if text not in SPM_SPECIAL_TEXTS and "<s>" not in text:
            # sentencepiece itself knows no added tokens; plain text must agree with it too
            assert [1] + sp.encode(text) == ours, text
    assert not mismatches, mismatches[:3]
    # byte fallback is exercised: some text needs <0xXX> pieces
    rare = lc_tokenize(llm, TEXTS[23])
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", hf.convert_ids_to_tokens(i)) for i in rare)


def test_spm_detokenize_round_trip(spm_model, spm_gguf):
    llm = load_vocab(spm_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(spm_model)
    for text in TEXTS + SPM_SPECIAL_TEXTS:
        ids = hf.encode(text)
        assert ids[0] == 1
        plain = lc_detokenize(llm, ids[1:], remove_special=True, unparse_special=False)
        if ids[1:2] != [1]:  # (a literal "<s>" first: llama.cpp keeps the space after a leading BOS)
            assert plain == hf.decode(ids, skip_special_tokens=True), text
        if "\x00" not in text and "\x07" not in text and "\x1b" not in text and "\x7f" not in text:
            if text.strip(" ") == text and "<" not in text:
                assert plain == text


def test_spm_keys_and_metadata(spm_model, spm_gguf):
    cfg = json.loads((spm_model / "config.json").read_text())
    tcfg = json.loads((spm_model / "tokenizer_config.json").read_text())
    llm = load_vocab(spm_gguf)
    assert llm.n_vocab() == cfg["vocab_size"]
    assert llm.metadata["tokenizer.ggml.model"] == "llama"
    assert llm.metadata["tokenizer.chat_template"] == tcfg["chat_template"]
    assert llm.token_bos() == 1 and llm.token_eos() == 2
    # added tokens of tokenizer_config.json are control tokens llama.cpp parses as one id
    im_end = tcfg["additional_special_tokens"][1]
    assert llm.tokenize(im_end.encode(), add_bos=False, special=True) == [int(
        next(k for k, v in tcfg["added_tokens_decoder"].items() if v["content"] == im_end))]
    types = gguf_field(spm_gguf, "tokenizer.ggml.token_type")
    # <unk>, <s>, </s> are marked special in tokenizer_config.json: control tokens, as llama.cpp's converter makes them
    assert types[:3] == [gguf.TokenType.CONTROL] * 3
    assert types[3] == gguf.TokenType.BYTE and types[3 + 255] == gguf.TokenType.BYTE


def test_spm_vocab_padding(tmp_path):
    """config vocab_size larger than the tokenizer: [PAD{i}] unused tokens fill the rest."""
    base = make_model(tmp_path / "m0", tokenizer="spm", **TINY)
    n_tok = json.loads((base / "config.json").read_text())["vocab_size"]
    src = make_model(tmp_path / "m", tokenizer="spm", vocab_size=n_tok + 30, **TINY)
    path = write_vocab_gguf(src, tmp_path / "pad.gguf")
    tokens = gguf_field(path, "tokenizer.ggml.tokens")
    types = gguf_field(path, "tokenizer.ggml.token_type")
    assert len(tokens) == n_tok + 30
    assert tokens[n_tok:] == [f"[PAD{i}]" for i in range(n_tok, n_tok + 30)]
    assert set(types[n_tok:]) == {gguf.TokenType.UNUSED}
    llm = load_vocab(path)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    assert llm.n_vocab() == n_tok + 30
    for text in TEXTS[:12]:
        assert lc_tokenize(llm, text) == hf.encode(text)


def test_llama_style_tokenizer_json_without_model_file(spm_model, tmp_path):
    """Llama-2-style BPE with byte fallback given only as tokenizer.json: scores come from the
    merge ranks, so llama.cpp's score-driven merging reproduces the HF tokenizer."""
    src = tmp_path / "json-only"
    shutil.copytree(spm_model, src)
    (src / "tokenizer.model").unlink()
    (src / "added_tokens.json").unlink()
    path = write_vocab_gguf(src, tmp_path / "json-only.gguf")
    assert gguf_field(path, "tokenizer.ggml.model") == "llama"
    llm = load_vocab(path)
    fast = Tokenizer.from_file(str(src / "tokenizer.json"))
    bad = [t for t in TEXTS + SPM_SPECIAL_TEXTS if lc_tokenize(llm, t) != fast.encode(t).ids]
    assert not bad, bad[:3]


# --------------------------------------------------------------------------------------------
# byte-level BPE
# --------------------------------------------------------------------------------------------


def test_bpe_tokenize_matches_hf(bpe_model, bpe_gguf):
    llm = load_vocab(bpe_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_model)
    fast = Tokenizer.from_file(str(bpe_model / "tokenizer.json"))
    assert gguf_field(bpe_gguf, "tokenizer.ggml.model") == "gpt2"
    assert gguf_field(bpe_gguf, "tokenizer.ggml.pre") == "llama-bpe"
    mismatches = []
    for text in TEXTS + BPE_SPECIAL_TEXTS:
        ours = lc_tokenize(llm, text)
        ref = hf.encode(text)
        if ours != ref or fast.encode(text).ids != ref:
            mismatches.append((text, ours, ref))
    assert not mismatches, mismatches[:3]


def test_bpe_detokenize_round_trip(bpe_model, bpe_gguf):
    llm = load_vocab(bpe_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_model)
    for text in TEXTS + BPE_SPECIAL_TEXTS:
        ids = hf.encode(text)
        plain = lc_detokenize(llm, ids[1:], remove_special=True, unparse_special=False)
        assert plain == hf.decode(ids, skip_special_tokens=True), text
        full = lc_detokenize(llm, ids, remove_special=False, unparse_special=True)
        assert full == hf.decode(ids, skip_special_tokens=False), text
        if "<|" not in text:
            assert plain == text


def test_bpe_keys(bpe_model, bpe_gguf):
    cfg = json.loads((bpe_model / "config.json").read_text())
    tok = json.loads((bpe_model / "tokenizer.json").read_text())
    merges = gguf_field(bpe_gguf, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    assert gguf_field(bpe_gguf, "tokenizer.ggml.scores") is None
    assert gguf_field(bpe_gguf, "tokenizer.ggml.bos_token_id") == cfg["bos_token_id"]
    assert gguf_field(bpe_gguf, "tokenizer.ggml.eos_token_id") == cfg["eos_token_id"]
    assert gguf_field(bpe_gguf, "tokenizer.ggml.add_bos_token") is True
    types = gguf_field(bpe_gguf, "tokenizer.ggml.token_type")
    assert types[cfg["bos_token_id"]] == gguf.TokenType.CONTROL
    assert types.count(gguf.TokenType.CONTROL) == 8
    llm = load_vocab(bpe_gguf)
    assert llm.n_vocab() == cfg["vocab_size"]
    assert llm.token_bos() == cfg["bos_token_id"]


def _with_pre_tokenizer(src: Path, dst: Path, pre: dict) -> Path:
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = pre
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_unknown_pre_tokenizer_is_an_error(bpe_model, tmp_path):
    # digits split one by one and no contraction rule: neither a known hash nor a known definition
    pre = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    src = _with_pre_tokenizer(bpe_model, tmp_path / "custom-pre", pre)
    name, chkhsh = detect_pre_tokenizer(src)
    assert name is None and re.fullmatch(r"[0-9a-f]{64}", chkhsh)
    with pytest.raises(TokenizerError) as err:
        write_vocab_gguf(src, tmp_path / "x.gguf")
    msg = str(err.value)
    assert "--pre-tokenizer NAME" in msg and chkhsh in msg and "\n" not in msg
    # naming it explicitly works and is what llama.cpp then uses
    path = write_vocab_gguf(src, tmp_path / "ok.gguf", pre_tokenizer="gpt-2")
    assert gguf_field(path, "tokenizer.ggml.pre") == "gpt-2"
    load_vocab(path)
    with pytest.raises(TokenizerError, match="not a pre-tokenizer llama.cpp knows"):
        write_vocab_gguf(src, tmp_path / "bad.gguf", pre_tokenizer="no-such-pre")


def test_cli_reports_unknown_pre_tokenizer(bpe_model, tmp_path):
    from click.testing import CliRunner

    from gguf_moe.cli import main

    pre = {"type": "Whitespace"}
    src = _with_pre_tokenizer(bpe_model, tmp_path / "ws-pre", pre)
    res = CliRunner().invoke(main, ["convert", str(src), "-t", "F32", "-o", str(tmp_path / "o.gguf"), "-q"])
    assert res.exit_code == 1, res.output
    assert "--pre-tokenizer" in res.output
    assert not (tmp_path / "o.gguf").exists()


def test_missing_tokenizer_is_an_error(bpe_model, tmp_path):
    src = tmp_path / "no-tok"
    src.mkdir()
    shutil.copy(bpe_model / "config.json", src / "config.json")
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        write_vocab_gguf(src, tmp_path / "x.gguf")


def test_vocab_size_too_small_is_an_error(bpe_model, tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(TokenizerError, match="does not fit the model's vocab_size 100"):
        add_tokenizer(w, bpe_model, vocab_size=100)


@pytest.mark.skipif(not UPSTREAM_BASE.is_file(), reason="llama.cpp converter not unpacked (scripts/setup.sh --dev)")
def test_pre_tokenizer_table_matches_upstream():
    """The check text and every hash -> name pair are those of llama.cpp's converter."""
    src = UPSTREAM_BASE.read_text(encoding="utf-8")
    m = re.search(r"chktxt = (['\"].*['\"])\n", src)
    assert m is not None
    assert eval(m.group(1)) == CHKTXT  # a plain string literal from the upstream file
    pairs = set(re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n\s*#[^\n]*\n\s*res = "([^"]+)"', src))
    assert pairs, "hash table not found upstream"
    for h, name in _PRE_BY_HASH.items():
        assert (h, name) in pairs, (h, name)
        assert name in KNOWN_PRE_TOKENIZERS


# --------------------------------------------------------------------------------------------
# real vocabularies: llama.cpp's own tokenizer test models
# --------------------------------------------------------------------------------------------
#
# llama.cpp ships vocab-only GGUFs of real tokenizers (models/ggml-vocab-NAME.gguf) with test
# texts (.inp) and the ids the original Hugging Face tokenizer gives them (.out). From each we
# rebuild the tokenizer.json (vocabulary, merges, the model's pre-tokenizer), then check that
# (1) its check-text hash is the one llama.cpp's converter lists for NAME (so CHKTXT and the
# hashing are right), (2) our conversion reproduces the tokens, types and merges of the shipped
# GGUF, and (3) llama.cpp tokenizes the test texts to the reference ids with our file.

SDIST = REPO / ".cache" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
VOCAB_DIR = REPO / ".cache" / "llama.cpp" / "models"
REAL_BPE = ("llama-bpe", "qwen2", "gpt-2")
REAL_ALL = REAL_BPE + ("llama-spm",)


def _read_gguf_kv(path: Path) -> dict:
    """Header key/values of a GGUF (a small parser: GGUFReader takes ~10 s on 400k strings)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"GGUF"
    _, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    off = 24
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def string(off):
        (n,) = struct.unpack_from("<Q", data, off)
        return data[off + 8 : off + 8 + n].decode("utf-8"), off + 8 + n

    def value(t, off):
        if t == 8:
            return string(off)
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, off)
            off += 12
            if et == 8:
                out = []
                for _ in range(n):
                    s, off = string(off)
                    out.append(s)
                return out, off
            fmt = scalar[et]
            return list(struct.unpack_from(f"<{n}{fmt}", data, off)), off + n * struct.calcsize(fmt)
        fmt = scalar[t]
        return struct.unpack_from("<" + fmt, data, off)[0], off + struct.calcsize(fmt)

    kv = {}
    for _ in range(n_kv):
        key, off = string(off)
        (t,) = struct.unpack_from("<I", data, off)
        kv[key], off = value(t, off + 4)
    return kv


@pytest.fixture(scope="module")
def real_vocab_files(tmp_path_factory) -> Path:
    names = [f"ggml-vocab-{n}.gguf{ext}" for n in REAL_ALL for ext in ("", ".inp", ".out")]
    if all((VOCAB_DIR / n).is_file() for n in names):
        return VOCAB_DIR
    if not SDIST.is_file():
        pytest.skip("llama.cpp test vocabularies not available (run scripts/setup.sh --dev)")
    import tarfile

    out = tmp_path_factory.mktemp("ggml-vocab")
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
    with tarfile.open(SDIST) as tar:
        for n in names:
            member = tar.getmember(prefix + n)
            (out / n).write_bytes(tar.extractfile(member).read())
    return out


def _rebuild_hf_tokenizer(kv: dict, name: str, out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json + config.json equivalent to the shipped vocab."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

    from gguf_moe.tokenizer import _LLAMA3_REGEX, _QWEN2_REGEX

    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                               ignore_merges=name == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=name == "gpt-2")
    if name == "gpt-2":
        tok.pre_tokenizer = byte_level
    else:
        regex = _LLAMA3_REGEX if name == "llama-bpe" else _QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    bos, eos = kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]
    if name == "llama-bpe":
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B:1",
                                          special_tokens=[(tokens[bos], bos)]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": tokens[bos], "eos_token": tokens[eos]}))
    (out / "config.json").write_text(json.dumps({"vocab_size": len(tokens), "bos_token_id": bos, "eos_token_id": eos}))
    return out


@pytest.mark.parametrize("name", REAL_BPE)
def test_real_bpe_vocabularies(name, real_vocab_files, tmp_path):
    from gguf_moe.tokenizer import _PRE_BY_HASH

    shipped = real_vocab_files / f"ggml-vocab-{name}.gguf"
    kv = _read_gguf_kv(shipped)
    src = _rebuild_hf_tokenizer(kv, name, tmp_path / name)

    detected, chkhsh = detect_pre_tokenizer(src)
    assert _PRE_BY_HASH.get(chkhsh) == name == detected  # found by its hash, not by its definition

    path = write_vocab_gguf(src, tmp_path / f"{name}.gguf")
    ours = _read_gguf_kv(path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert ours[key] == kv[key], key
    # ids without a token are [PAD{i}]: UNUSED for the current converter (the shipped qwen2 file,
    # made by an older one, has USER_DEFINED there)
    pad = re.compile(r"\[PAD\d+\]")
    for i, (tok, ty) in enumerate(zip(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"])):
        want = gguf.TokenType.UNUSED if pad.fullmatch(tok) else ty
        assert ours["tokenizer.ggml.token_type"][i] == want, (i, tok)

    texts, expected = _test_texts(real_vocab_files, name)
    llm = load_vocab(path)
    fast = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text, ids in zip(texts, expected):
        assert fast.encode(text, add_special_tokens=False).ids == ids, text  # the rebuilt tokenizer is faithful
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text


def _test_texts(files: Path, name: str) -> tuple[list[str], list[list[int]]]:
    stem = f"ggml-vocab-{name}.gguf"
    texts = (files / f"{stem}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(x) for x in line.split()] for line in (files / f"{stem}.out").read_text(encoding="utf-8").splitlines()]
    assert len(texts) == len(expected) > 20
    return texts, expected


def test_real_spm_vocabulary(real_vocab_files, tmp_path):
    """Llama 2's SentencePiece vocabulary: tokenizer.model rebuilt from the shipped GGUF."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    kv = _read_gguf_kv(real_vocab_files / "ggml-vocab-llama-spm.gguf")
    proto = pb.ModelProto()
    for text, score, kind in zip(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind  # GGUF token types use sentencepiece's numbering
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(proto.pieces), True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    src = tmp_path / "llama-spm"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(proto.SerializeToString())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (src / "config.json").write_text(json.dumps({"vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2}))

    path = write_vocab_gguf(src, tmp_path / "llama-spm.gguf")
    ours = _read_gguf_kv(path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        assert ours[key] == kv[key], key

    texts, expected = _test_texts(real_vocab_files, "llama-spm")
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    llm = load_vocab(path)
    for text, ids in zip(texts, expected):
        assert sp.encode(text) == ids, text  # the rebuilt model is faithful
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text


# --------------------------------------------------------------------------------------------
# special tokens, flags and chat templates against gguf-py's SpecialVocab
# --------------------------------------------------------------------------------------------
#
# llama.cpp's converter reads special ids, add_* flags and chat templates with the vendored
# gguf-py's SpecialVocab. Each variant below is run through it (in a subprocess, since that
# gguf-py differs from the installed gguf package) and through our reader; the written keys
# must be equal in name, type, value and order.

_SPECIAL_VOCAB_SCRIPT = r"""
import json, sys
from pathlib import Path
import gguf
for d in sys.argv[1:]:
    d = Path(d)
    spec = json.loads((d / "spec.json").read_text())
    w = gguf.GGUFWriter(str(d / "ref.gguf"), "llama")
    gguf.SpecialVocab(d, load_merges=spec["load_merges"], n_vocab=spec["n_vocab"]).add_to_gguf(w, quiet=True)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
"""


def _variant_dirs(bpe_model: Path, spm_model: Path, root: Path) -> dict[str, tuple[Path, bool, int | None]]:
    def clone(name, base, load_merges, n_vocab):
        d = root / name
        shutil.copytree(base, d)
        return d, load_merges, n_vocab

    def edit(path: Path, fn):
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    out = {}
    out["bpe-as-is"] = clone("bpe-as-is", bpe_model, True, None)
    out["spm-as-is"] = clone("spm-as-is", spm_model, False, 1002)

    d, *rest = out["eot-template"] = clone("eot-template", bpe_model, True, None)
    edit(d / "tokenizer.json", lambda t: t["post_processor"]["processors"][1].update(
        single=[{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|eot_id|>", "type_id": 0}}],
        pair=[{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": "<|eot_id|>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
              {"SpecialToken": {"id": "<|eot_id|>", "type_id": 1}}]))

    d, *rest = out["jinja-templates"] = clone("jinja-templates", bpe_model, True, None)
    edit(d / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools | tojson }}")

    d, *rest = out["template-json"] = clone("template-json", spm_model, False, 1002)
    edit(d / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))

    d, *rest = out["roberta-lowercase-pairs"] = clone("roberta-lowercase-pairs", bpe_model, True, None)

    def roberta(t):
        t["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|end_of_text|>", 1201],
                               "cls": ["<|begin_of_text|>", 1200], "trim_offsets": True, "add_prefix_space": False}
        t["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, {"type": "StripAccents"}]}
        t["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in t["model"]["merges"]][:50]
        t["model"]["merges"].append(["a b", "c"])
    edit(d / "tokenizer.json", roberta)

    d, *rest = out["dict-tokens-config-ids"] = clone("dict-tokens-config-ids", spm_model, False, 1002)

    def dict_tokens(c):
        c["bos_token"] = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": True}
        c["pad_token"] = "<unk>"
        c["add_eos_token"] = True
    edit(d / "tokenizer_config.json", dict_tokens)
    edit(d / "config.json", lambda c: c.update(pad_token_id=0, text_config={"sep_token_id": 2}, eos_token_id=5000))

    d, *rest = out["no-tokenizer-json"] = clone("no-tokenizer-json", spm_model, False, 1002)
    (d / "tokenizer.json").unlink()
    return out


@pytest.mark.skipif(not (REPO / ".cache" / "llama.cpp" / "gguf-py").is_dir(), reason="vendored gguf-py not unpacked")
def test_special_vocab_matches_gguf_py(bpe_model, spm_model, tmp_path):
    import os
    import subprocess
    import sys

    from gguf_moe.tokenizer import _Specials

    variants = _variant_dirs(bpe_model, spm_model, tmp_path)
    for d, load_merges, n_vocab in variants.values():
        (d / "spec.json").write_text(json.dumps({"load_merges": load_merges, "n_vocab": n_vocab}))
    env = dict(os.environ, PYTHONPATH=str(REPO / ".cache" / "llama.cpp" / "gguf-py"))
    res = subprocess.run([sys.executable, "-c", _SPECIAL_VOCAB_SCRIPT, *[str(v[0]) for v in variants.values()]],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for name, (d, load_merges, n_vocab) in variants.items():
        w = gguf.GGUFWriter(str(d / "ours.gguf"), "llama")
        _Specials(d, n_vocab=n_vocab, load_merges=load_merges).write(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        ref = gguf.GGUFReader(str(d / "ref.gguf")).fields
        ours = gguf.GGUFReader(str(d / "ours.gguf")).fields
        assert list(ours) == list(ref), name
        for key, field in ref.items():
            assert ours[key].types == field.types and ours[key].contents() == field.contents(), (name, key)
        assert len(ref) > 4, name


def test_added_tokens_beyond_vocab_size_are_dropped(bpe_model, tmp_path, caplog):
    """A merge whose tokenizer has more added tokens than embedding rows (mergekit issue #428):
    the extra added tokens are dropped with a warning; llama.cpp loads the file and tokenizes
    ordinary text as the Hugging Face tokenizer does."""
    src = tmp_path / "extra-added"
    shutil.copytree(bpe_model, src)
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["vocab_size"]
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False) for i in range(3)])
    tok.save(str(src / "tokenizer.json"))
    with caplog.at_level("WARNING", logger="gguf_moe.tokenizer"):
        path = write_vocab_gguf(src, tmp_path / "x.gguf")
    assert f"ignoring 3 added token(s) with ids {n}, {n + 1}, {n + 2}" in caplog.text
    assert len(gguf_field(path, "tokenizer.ggml.tokens")) == n
    llm = load_vocab(path)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    for text in TEXTS[:12]:
        assert lc_tokenize(llm, text) == hf.encode(text)
