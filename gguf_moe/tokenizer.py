"""Tokenizer metadata for GGUF files (the ``tokenizer.ggml.*`` keys and the chat template).

Three kinds of Hugging Face tokenizer are converted, chosen as llama.cpp's converter chooses
them for Llama/Mistral/Mixtral models:

* **SentencePiece** (``tokenizer.model``; Llama 2, Mistral): ``tokenizer.ggml.model`` "llama",
  pieces with their scores and types, added tokens from ``added_tokens.json`` and
  ``tokenizer_config.json``, padded to the model's ``vocab_size`` with ``[PAD{i}]``.
* **Llama-style BPE with byte fallback** in ``tokenizer.json`` only (no ``tokenizer.model``):
  also "llama". llama.cpp's converter gives every piece the score -1000, which makes its
  score-driven merging arbitrary; here a piece's score is minus the rank of the merge that
  forms it, so llama.cpp merges in the same order as the Hugging Face tokenizer.
* **Byte-level BPE** in ``tokenizer.json`` (Llama 3 and most newer bases): "gpt2", tokens,
  types and merges. The pre-tokenizer is identified like llama.cpp's ``get_vocab_base_pre``:
  the SHA-256 of the token ids of a fixed text. When the hash is not known, a pre-tokenizer
  whose definition is exactly a known one (e.g. the Llama 3 split regex) is accepted;
  otherwise the user has to name it with ``--pre-tokenizer NAME``.

Special token ids, ``add_bos``/``add_eos``/``add_sep`` flags and the chat template are read as
gguf-py's ``SpecialVocab`` reads them (tokenizer.json post-processor, tokenizer_config.json,
then config.json), so the keys, their values and their order match the converter's output.
Only the sentencepiece and tokenizers libraries are used.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from hashlib import sha256
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType

from .errors import TokenizerError

_log = logging.getLogger(__name__)

__all__ = ["add_tokenizer", "detect_pre_tokenizer", "KNOWN_PRE_TOKENIZERS", "CHKTXT"]

# The text llama.cpp hashes to recognise a BPE pre-tokenizer (convert_hf_to_gguf_update.py).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# SHA-256 of str(token ids of CHKTXT) -> llama.cpp pre-tokenizer name, for the bases that
# merges are built from (values as in llama.cpp's convert_hf_to_gguf.py at the vendored commit).
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3/3.1/3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug Llama 3
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",  # also OLMo
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
}

# Pre-tokenizer names llama.cpp's loader accepts (src/llama-vocab.cpp at the vendored commit).
KNOWN_PRE_TOKENIZERS = frozenset(
    """default llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
    deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2
    jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4
    granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact
    command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe
    poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish
    exaone exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie
    granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe
    bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka
    grok-2 afmoe laguna minimax-m2 solar-open mellum2 minicpm5""".split()
)

# Pre-tokenizer definitions (tokenizer.json "pre_tokenizer", normalised) that pin down the
# llama.cpp pre-tokenizer even when the vocabulary (and so the hash) is new.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_bytelevel(regex: str) -> list:
    return [
        ("Split", regex, "Isolated", False),
        ("ByteLevel", False, False),
    ]


_PRE_BY_DEFINITION = (
    ("llama-bpe", _split_bytelevel(_LLAMA3_REGEX), True),
    ("qwen2", _split_bytelevel(_QWEN2_REGEX), False),
    ("gpt-2", [("ByteLevel", False, True)], False),
)

_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download the file") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); re-download the file") from e
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror})") from e


def _file_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror})") from e
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=2)
def _tokenizer_json_cached(key: tuple[str, int, int]) -> Any:
    return _read_json(Path(key[0]))


def _tokenizer_json(path: Path) -> dict:
    """Parsed tokenizer.json, shared by the readers below (callers must not modify it)."""
    data = _tokenizer_json_cached(_file_key(path))
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


@functools.lru_cache(maxsize=2)
def _fast_cached(key: tuple[str, int, int]):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(key[0])
    except Exception as e:  # the library raises plain Exception subclasses
        raise TokenizerError(f"{key[0]}: the tokenizers library cannot load it ({e})") from e


def _load_fast(path: Path):
    return _fast_cached(_file_key(path))


def _looks_special(text: str) -> bool:
    """Added tokens some models fail to mark as special (same rule as llama.cpp's converter)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


class _Specials:
    """Special token ids, add_* flags and the chat template, read as gguf-py's SpecialVocab.

    Not ``gguf.SpecialVocab`` itself: the gguf package this project installs (PyPI 0.19.0)
    lags the gguf-py of llama.cpp's converter; its SpecialVocab writes neither
    ``tokenizer.ggml.normalizer.lowercase`` nor ``strip_accents`` (the converter's does), so
    files would differ from the converter's for tokenizers with such normalizers.  It also
    logs and skips malformed entries where a conversion must stop with one clear line
    (``TokenizerError``)."""

    def __init__(self, src: Path, *, n_vocab: int | None, load_merges: bool):
        self.n_vocab = n_vocab
        self.types: list[str] = list(_SPECIAL_TYPES)
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.merges: list[str] = []
        self.chat_template: Any = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self._from_tokenizer_files(src, load_merges)
        self._from_model_config(src)
        if load_merges and not self.merges:
            self._merges_txt(src / "merges.txt")

    def _set_id(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise TokenizerError(f"special token {typ}_token_id is {tid}; token ids cannot be negative")
        if (self.n_vocab is None or tid < self.n_vocab) and typ not in self.ids:
            self.ids[typ] = tid

    def _normalizer(self, norm: dict) -> None:
        kind = norm.get("type")
        if kind == "Lowercase":
            self.lowercase = True
        elif kind == "StripAccents":
            self.strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in norm:
                self.lowercase = norm["lowercase"]
            if "strip_accents" in norm:
                self.strip_accents = norm["strip_accents"]
        elif kind == "Sequence":
            for sub in norm.get("normalizers", []):
                self._normalizer(sub)

    @staticmethod
    def _merge_str(pair: Any, path: Path) -> str:
        if isinstance(pair, str):
            return pair
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
            # spaces inside a part are stored as U+0120 so that the pair splits on one space
            return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in p) for p in pair)
        raise TokenizerError(f"{path}: unknown merges format {pair!r}; expected 'a b' strings or [a, b] pairs")

    def _from_tokenizer_files(self, src: Path, load_merges: bool) -> None:
        tok_path = src / "tokenizer.json"
        tok = _tokenizer_json(tok_path) if tok_path.is_file() else None
        cfg_path = src / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else None
        added: list = []
        if tok:
            if load_merges:
                merges = (tok.get("model") or {}).get("merges")
                if isinstance(merges, list) and merges:
                    if all(isinstance(m, str) for m in merges):
                        self.merges = list(merges)
                    else:
                        self.merges = [self._merge_str(m, tok_path) for m in merges]
            if norm := tok.get("normalizer"):
                self._normalizer(norm)
            added = tok.get("added_tokens") or []
            self._post_processor(tok.get("post_processor"), cfg)
        if not cfg:
            return
        self.chat_template = self._chat_template(src, cfg, cfg_path)
        for typ in self.types:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in self.add:
                self.add[typ] = flag
            content = _token_content(cfg.get(f"{typ}_token"))
            if content is None:
                continue
            tid = next((a.get("id") for a in added if a.get("content") == content), None)
            self._set_id(typ, tid)

    def _post_processor(self, post: dict | None, cfg: dict | None) -> None:
        """Which special tokens the tokenizer adds around a sequence (crude, like gguf-py)."""
        if not post:
            return
        c = cfg or {}
        bos, cls, eos, sep = (c.get(f"{t}_token") for t in ("bos", "cls", "eos", "sep"))
        if not bos and cls and cfg:
            cfg["bos_token"] = bos = cls
        if not eos and sep and cfg:
            cfg["eos_token"] = eos = sep
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                if not cls and cfg:
                    cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and cfg:
                    cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                bos, cls, eos, sep = self._template(proc, cfg, bos, cls, eos, sep)

    def _template(self, proc: dict, cfg: dict | None, bos, cls, eos, sep):
        single = proc.get("single", [])
        pair = proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            if first:
                if not cfg:
                    bos = first
                elif first not in (bos, cls):
                    if not bos:
                        cfg["bos_token"] = bos = first
                    if not cls:
                        cfg["cls_token"] = cls = first
                self.add["bos"] = first in (bos, cls)
            last = single[-1].get("SpecialToken", {}).get("id")
            if last:
                if not cfg:
                    eos = last
                elif last != eos:
                    for extra in ("eot", "eom"):
                        if extra not in self.types:
                            self.types.append(extra)
                            cfg[f"{extra}_token"] = eos
                            break
                    cfg["eos_token"] = eos = last
                self.add["eos"] = last == eos
        if pair:
            start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
            stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
            middle = pair[start:stop]
            if middle:
                a = middle[0].get("Sequence", {}).get("id")
                b = middle[-1].get("Sequence", {}).get("id")
                if a == "A" and b == "B" and (middle := middle[1:-1]):
                    add_sep = False
                    entry = middle[0].get("SpecialToken", {}).get("id")
                    if entry and entry in (sep, eos) and not last:
                        add_sep = True
                    if len(middle) == 2:
                        entry = middle[1].get("SpecialToken", {}).get("id")
                        if entry and entry in (sep, eos):
                            add_sep = True
                    self.add["sep"] = add_sep
                    if add_sep and not sep and cfg:
                        cfg["sep_token"] = eos
        return bos, cls, eos, sep

    @staticmethod
    def _chat_template(src: Path, cfg: dict, cfg_path: Path) -> Any:
        alt: Any = None
        jinja = src / "chat_template.jinja"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            extra = sorted((src / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}]
                alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif (src / "chat_template.json").is_file():
            alt = _read_json(src / "chat_template.json").get("chat_template")
        template = cfg.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            return template
        raise TokenizerError(
            f"{cfg_path}: chat_template must be a string or a list of named templates, "
            f"found {type(template).__name__}; fix or remove the field"
        )

    def _from_model_config(self, src: Path) -> None:
        path = src / "config.json"
        if not path.is_file():
            return
        config = _read_json(path)
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(config.get("text_config"), dict):
                tid = config["text_config"].get(f"{typ}_token_id")
            self._set_id(typ, tid)

    def _merges_txt(self, path: Path) -> None:
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#"):
            lines = lines[1:]
        self.merges = [" ".join(p) for p in (ln.split() for ln in lines) if len(p) == 2]

    def write(self, w: GGUFWriter) -> None:
        if self.merges:
            w.add_token_merges(self.merges)
        for typ, tid in self.ids.items():
            handler = getattr(w, f"add_{typ}_token_id", None)
            if handler is not None:
                handler(tid)
        for typ, value in self.add.items():
            handler = getattr(w, f"add_add_{typ}_token", None)
            if handler is not None:
                handler(value)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)
        if self.lowercase is not None:
            w.add_bool("tokenizer.ggml.normalizer.lowercase", bool(self.lowercase))
        if self.strip_accents is not None:
            w.add_bool("tokenizer.ggml.normalizer.strip_accents", bool(self.strip_accents))


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


def _sentencepiece_vocab(src: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    path = src / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except (OSError, RuntimeError) as e:
        raise TokenizerError(
            f"{path}: not a readable SentencePiece model ({e}); re-download it from the base model"
        ) from e
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    if sp.vocab_size() > vocab_size:
        _log.warning("%s: ignoring pieces %d.. beyond vocab_size %d", path, vocab_size, vocab_size)
    for i in range(min(sp.vocab_size(), vocab_size)):
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(kind)

    added_path = src / "added_tokens.json"
    if added_path.is_file():
        for text, tid in _read_json(added_path).items():
            if not (isinstance(tid, int) and 0 <= tid < vocab_size):
                _log.warning("%s: ignoring token %r with id %s beyond vocab_size %d", added_path, text, tid, vocab_size)
                continue
            tokens[tid] = text.encode("utf-8")
            scores[tid] = -1000.0
            types[tid] = int(TokenType.USER_DEFINED)

    cfg_path = src / "tokenizer_config.json"
    if cfg_path.is_file():
        decoder = _read_json(cfg_path).get("added_tokens_decoder") or {}
        for key, data in decoder.items():
            tid = int(key)
            if tid >= vocab_size:
                _log.warning("%s: ignoring added token %r with id %d beyond vocab_size %d",
                             cfg_path, data.get("content"), tid, vocab_size)
                continue
            text: str = data["content"]
            if data.get("special") or _looks_special(text):
                types[tid] = int(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types[tid] = int(TokenType.USER_DEFINED)
            scores[tid] = -1000.0
            tokens[tid] = text.encode("utf-8")
    return tokens, scores, types


# --------------------------------------------------------------------------------------------
# tokenizer.json
# --------------------------------------------------------------------------------------------


def _is_llama_spm_json(tok_json: dict) -> bool:
    model = tok_json.get("model") or {}
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback", False))
        and (tok_json.get("decoder") or {}).get("type") == "Sequence"
    )


def _pre_signature(pre: dict | None) -> list:
    if not pre:
        return []
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts:
        kind = p.get("type")
        if kind == "Split":
            pattern = p.get("pattern") or {}
            sig.append((kind, pattern.get("Regex", pattern.get("String")), p.get("behavior"), p.get("invert", False)))
        elif kind == "ByteLevel":
            sig.append((kind, bool(p.get("add_prefix_space", True)), bool(p.get("use_regex", True))))
        else:
            sig.append((kind, json.dumps(p, sort_keys=True)))
    return sig


def detect_pre_tokenizer(src_dir: str | Path) -> tuple[str | None, str]:
    """(llama.cpp pre-tokenizer name or None, chkhsh) for the BPE tokenizer.json in src_dir."""
    src = Path(src_dir)
    path = src / "tokenizer.json"
    tok = _load_fast(path)
    ids = tok.encode(CHKTXT).ids
    chkhsh = sha256(str(ids).encode()).hexdigest()
    if chkhsh in _PRE_BY_HASH:
        return _PRE_BY_HASH[chkhsh], chkhsh
    # The hashes were taken with transformers, whose Llama tokenizer classes add BOS according
    # to tokenizer_config.json's add_bos_token even when tokenizer.json's post-processor does not.
    for variant in _bos_variants(src, tok, ids):
        h = sha256(str(variant).encode()).hexdigest()
        if h in _PRE_BY_HASH:
            return _PRE_BY_HASH[h], h
    tok_json = _tokenizer_json(path)
    sig = _pre_signature(tok_json.get("pre_tokenizer"))
    ignore_merges = bool((tok_json.get("model") or {}).get("ignore_merges", False))
    for name, definition, needs_ignore_merges in _PRE_BY_DEFINITION:
        if sig == definition and ignore_merges == needs_ignore_merges and tok_json.get("normalizer") is None:
            return name, chkhsh
    return None, chkhsh


def _fit_vocab(path: Path, tok, vocab_size: int) -> dict[str, int]:
    """token -> id of the tokenizer, limited to the model's vocab_size. Added tokens beyond it
    (a merge's tokenizer with more added tokens than embedding rows) are dropped with a warning,
    as llama.cpp's converter does for SentencePiece; base tokens beyond it are an error."""
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    added = _added_tokens(tok)
    base_top = max((i for i in vocab.values() if i not in added), default=-1)
    if base_top >= vocab_size:
        raise TokenizerError(
            f"{path}: token id {base_top} does not fit the model's vocab_size {vocab_size} (config.json); "
            f"the embedding matrix must have at least {base_top + 1} rows"
        )
    dropped = sorted(i for i in vocab.values() if i >= vocab_size)
    if dropped:
        _log.warning(
            "%s: ignoring %d added token(s) with ids %s beyond vocab_size %d",
            path, len(dropped), ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else ""), vocab_size,
        )
        vocab = {t: i for t, i in vocab.items() if i < vocab_size}
    return vocab


def _bos_variants(src: Path, tok, ids: list[int]) -> list[list[int]]:
    cfg_path = src / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    flag = cfg.get("add_bos_token")
    bos = _token_content(cfg.get("bos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    if not isinstance(flag, bool) or bos_id is None:
        return []
    if flag and ids[:1] != [bos_id]:
        return [[bos_id] + ids]
    if not flag and ids[:1] == [bos_id]:
        return [ids[1:]]
    return []


def _added_tokens(tok) -> dict[int, Any]:
    return dict(tok.get_added_tokens_decoder())


def _gpt2_vocab(src: Path, vocab_size: int, pre_tokenizer: str | None) -> tuple[list[str], list[int], str]:
    path = src / "tokenizer.json"
    tok = _load_fast(path)
    vocab = _fit_vocab(path, tok, vocab_size)
    if pre_tokenizer is not None:
        if pre_tokenizer not in KNOWN_PRE_TOKENIZERS:
            raise TokenizerError(
                f"--pre-tokenizer {pre_tokenizer!r} is not a pre-tokenizer llama.cpp knows; "
                f"use one of: {', '.join(sorted(KNOWN_PRE_TOKENIZERS))}"
            )
        pre = pre_tokenizer
    else:
        found, chkhsh = detect_pre_tokenizer(src)
        if found is None:
            raise TokenizerError(
                f"{path}: BPE pre-tokenizer not recognized (chkhsh {chkhsh}); pass --pre-tokenizer NAME "
                "with the name of the base model's pre-tokenizer (e.g. llama-bpe for Llama 3, qwen2, "
                "deepseek-llm, tekken, gpt-2)"
            )
        pre = found

    reverse = {i: t for t, i in vocab.items()}
    added = _added_tokens(tok)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        text = reverse[i]
        if i in added:
            info = added[i]
            if not info.normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if info.special or _looks_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(text)
    return tokens, types, pre


def _llama_json_vocab(src: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style BPE from tokenizer.json alone. Scores rank pieces by the merge that
    forms them, so llama.cpp's highest-score-first merging follows the merge list."""
    path = src / "tokenizer.json"
    tok = _load_fast(path)
    tok_json = _tokenizer_json(path)
    model_vocab: dict[str, int] = tok_json["model"]["vocab"]
    merges = [_Specials._merge_str(m, path).split(" ") for m in tok_json["model"].get("merges") or []]
    rank: dict[str, int] = {}
    for r, pair in enumerate(merges):
        if len(pair) == 2:
            rank.setdefault(pair[0] + pair[1], r)
    vocab = _fit_vocab(path, tok, vocab_size)
    reverse = {i: t for t, i in vocab.items()}
    added = _added_tokens(tok)
    specials = {i for i, a in added.items() if a.special}
    unk = tok_json["model"].get("unk_token")
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(int(TokenType.UNUSED))
            continue
        text = reverse[i]
        if _BYTE_PIECE.fullmatch(text) and text in model_vocab:
            kind = TokenType.BYTE
        elif text == unk:
            kind = TokenType.UNKNOWN
        elif i in specials or (i in added and _looks_special(text)):
            kind = TokenType.CONTROL
        elif i in added and text not in model_vocab:
            kind = TokenType.USER_DEFINED
        else:
            kind = TokenType.NORMAL
        if kind == TokenType.NORMAL:
            score = -float(rank[text]) if text in rank else 0.0
        else:
            score = -1000.0
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    return tokens, scores, types


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def add_tokenizer(
    writer: GGUFWriter, src_dir: str | Path, *, vocab_size: int, pre_tokenizer: str | None = None
) -> None:
    """Add every ``tokenizer.ggml.*`` key (and the chat template) for the model in `src_dir`.

    `vocab_size` is the model's (config.json) vocabulary size; the token list is padded to it.
    `pre_tokenizer` names the llama.cpp BPE pre-tokenizer when it cannot be recognised (it
    overrides detection; ignored for SentencePiece tokenizers, which have none).
    """
    src = Path(src_dir)
    if vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be positive, got {vocab_size}")
    cfg_path = src / "tokenizer_config.json"
    if cfg_path.is_file():
        prefix = _read_json(cfg_path).get("add_prefix_space")
        if prefix is not None:
            writer.add_add_space_prefix(bool(prefix))

    if (src / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(src, vocab_size)
        model, pre, merges = "llama", "default", False
    elif (src / "tokenizer.json").is_file():
        if _is_llama_spm_json(_tokenizer_json(src / "tokenizer.json")):
            tokens, scores, types = _llama_json_vocab(src, vocab_size)
            model, pre, merges = "llama", "default", False
        else:
            tokens, types, pre = _gpt2_vocab(src, vocab_size, pre_tokenizer)
            scores, model, merges = None, "gpt2", True
    else:
        raise TokenizerError(
            f"{src}: no tokenizer found (expected tokenizer.model or tokenizer.json); "
            "copy the tokenizer files of the base model into the model directory"
        )

    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    specials = _Specials(src, n_vocab=len(tokens), load_merges=merges)
    if merges and not specials.merges:
        raise TokenizerError(f"{src / 'tokenizer.json'}: BPE tokenizer without merges; the file is incomplete")
    specials.write(writer)
