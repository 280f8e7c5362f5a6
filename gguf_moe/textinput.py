"""Text -> token chunks, exactly as llama.cpp's ``llama-imatrix`` and ``llama-perplexity`` make them.

Tokenization uses the vocabulary ``convert`` writes into the GGUF (``metadata.tokenizer_kvs``)
and llama.cpp's rules (``llama_vocab::impl::tokenize`` with ``add_special = true``,
``parse_special = false``):

* the text is first split around user-defined added tokens (llama.cpp does that even
  without ``--parse-special``; control tokens stay plain text);
* SentencePiece vocabularies (``tokenizer.ggml.model = llama``): each text fragment that
  follows the start or a special token gets one space prepended (``add_space_prefix``,
  default true), spaces become U+2581, then the highest-scoring adjacent pair whose
  concatenation is a token is merged until none is left, ties to the leftmost pair;
  pieces that are not tokens are undone along their merges or fall back to ``<0xNN>``
  byte tokens.  Unlike Hugging Face's Metaspace pre-tokenizer, a text that already starts
  with a space still gets the prefix space (wikitext-2 raw starts with " = ").
* byte-level BPE vocabularies (``gpt2``): the model's ``tokenizer.json`` through the
  ``tokenizers`` library without its post-processor (llama.cpp's pre-tokenizer regexes
  are ports of the same ones);
* BOS is prepended when ``tokenizer.ggml.add_bos_token`` says so.

Chunks: ``n = len(tokens) // ctx`` (at most ``--chunks``); chunk ``i`` is
``tokens[i*ctx : (i+1)*ctx]`` with its first token *replaced* by BOS when the vocabulary
adds BOS.  Both tools refuse fewer than ``2 * ctx`` tokens.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gguf_moe.errors import ConfigError, TokenizerError

__all__ = ["LlamaTokenizer", "load_tokenizer", "make_chunks", "read_text", "text_chunks"]

_USER_DEFINED = 4  # llama_token_type
_WORD_JOIN = re.compile("[^\u2581]\u2581")
_WORD_START = re.compile("(?<=[^\u2581])(?=\u2581)")
_BYTE = 6


def read_text(path: str | Path) -> str:
    """The calibration / evaluation text (UTF-8; one clear error otherwise)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the text file ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); give a UTF-8 text file") from None


@dataclass
class LlamaTokenizer:
    """A vocabulary as llama.cpp loads it from GGUF keys, with llama.cpp's tokenization."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float] | None
    types: list[int]
    bos_id: int | None
    add_bos: bool
    add_space_prefix: bool
    hf_json: Path | None = None  # tokenizer.json for byte-level BPE

    def __post_init__(self) -> None:
        self._ids = {t: i for i, t in enumerate(self.tokens)}  # a repeated text maps to its last id, as in llama.cpp
        self._byte_ids: dict[int, int] = {}
        for i, (t, ty) in enumerate(zip(self.tokens, self.types)):
            if ty == _BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                self._byte_ids.setdefault(int(t[3:5], 16), i)
        # llama.cpp partitions raw text around these (longest first) even without parse_special.
        self._user = sorted(
            ((t, i) for i, (t, ty) in enumerate(zip(self.tokens, self.types)) if ty == _USER_DEFINED and t),
            key=lambda x: -len(x[0]),
        )
        self._hf = None
        # Merges never join a piece to a following "▁" unless some token has a
        # non-"▁" character followed by "▁"; when none does, the text can be cut
        # before each word's leading "▁" run and each piece tokenized on its own with
        # the same result and a fraction of the memory.
        self._spm_split = self.model == "llama" and not any(_WORD_JOIN.search(t) for t in self.tokens)

    # ------------------------------------------------------------------ fragments

    def _fragments(self, text: str) -> list[str | int]:
        frags: list[str | int] = [text] if text else []
        for tok, tid in self._user:
            out: list[str | int] = []
            for f in frags:
                if not isinstance(f, str) or tok not in f:
                    out.append(f)
                    continue
                parts = f.split(tok)
                for k, p in enumerate(parts):
                    if k:
                        out.append(tid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with BOS when the vocabulary adds it (llama.cpp's
        ``common_tokenize(ctx, text, add_special=true, parse_special=false)``)."""
        out: list[int] = []
        if self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = True
        for f in self._fragments(text):
            if isinstance(f, int):
                out.append(f)
                prev_special = True
                continue
            if self.model == "llama":
                s = (" " + f) if (self.add_space_prefix and prev_special) else f
                s = s.replace(" ", "\u2581")
                for piece in (_WORD_START.split(s) if self._spm_split else (s,)):
                    out.extend(self._spm(piece))
            else:
                out.extend(self._bpe(f))
            prev_special = False
        return out

    # ------------------------------------------------------------------ SentencePiece

    def _spm(self, text: str) -> list[int]:
        n = len(text)
        if n == 0:
            return []
        ids, scores = self._ids, self.scores
        n_tok = len(self.tokens)
        start = list(range(n))  # symbol i covers text[start[i] : start[i] + size[i]]
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []
        rev: dict[str, tuple[int, int]] = {}

        def add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            piece = text[start[left] : start[left] + size[left] + size[right]]
            tid = ids.get(piece)
            if tid is None or tid >= n_tok:
                return
            # max-heap on score, then the leftmost pair
            heapq.heappush(heap, (-scores[tid], left, right, len(piece)))
            rev[piece] = (left, right)

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, sz = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != sz:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])

        out: list[int] = []

        def reseg(i: int) -> None:
            piece = text[start[i] : start[i] + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
                return
            pair = rev.get(piece)
            if pair is None:
                for b in piece.encode("utf-8"):
                    bid = self._byte_ids.get(b)
                    if bid is None:
                        raise TokenizerError(f"the vocabulary has no byte token <0x{b:02X}> for text it cannot tokenize")
                    out.append(bid)
                return
            reseg(pair[0])
            reseg(pair[1])

        i = 0
        while i != -1:
            reseg(i)
            i = nxt[i]
        return out

    # ------------------------------------------------------------------ byte-level BPE

    def _bpe(self, text: str) -> list[int]:
        if self._hf is None:
            if self.hf_json is None or not self.hf_json.is_file():
                raise TokenizerError("byte-level BPE vocabulary without tokenizer.json; cannot tokenize the text")
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(self.hf_json))
            self._hf.no_truncation()
            self._hf.no_padding()
        return list(self._hf.encode(text, add_special_tokens=False).ids)


def _tokens_as_str(vals) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in vals]


def load_tokenizer(model) -> LlamaTokenizer:
    """The tokenizer of a ``SourceModel`` as its converted GGUF carries it."""
    from gguf_moe.metadata import tokenizer_kvs

    kv = tokenizer_kvs(model)

    def get(key, default=None):
        v = kv.get(key)
        return default if v is None else v.value

    kind = get("tokenizer.ggml.model")
    if kind not in ("llama", "gpt2"):
        raise TokenizerError(f"{model.path}: tokenizer model {kind!r} is not supported for tokenizing text")
    scores = get("tokenizer.ggml.scores")
    return LlamaTokenizer(
        model=kind,
        tokens=_tokens_as_str(get("tokenizer.ggml.tokens")),
        scores=[float(s) for s in scores] if scores is not None else None,
        types=[int(t) for t in get("tokenizer.ggml.token_type")],
        bos_id=get("tokenizer.ggml.bos_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", kind == "llama")),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
        hf_json=Path(model.path) / "tokenizer.json",
    )


def make_chunks(tokens: list[int], ctx: int, n_chunks: int | None, bos_id: int | None, add_bos: bool, what: str) -> np.ndarray:
    """``[n_chunk, ctx]`` int64 token chunks as llama-imatrix / llama-perplexity cut them."""
    if len(tokens) < 2 * ctx:
        raise ConfigError(
            f"{what}: the text has {len(tokens)} tokens; a context of {ctx} needs at least {2 * ctx} "
            "(give a longer text or a smaller --ctx)"
        )
    n = len(tokens) // ctx
    if n_chunks is not None and n_chunks > 0:
        n = min(n, n_chunks)
    out = np.asarray(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx).copy()
    if add_bos and bos_id is not None:
        out[:, 0] = bos_id
    return out


def text_chunks(
    model, text_file: str | Path, ctx: int, n_chunks: int | None, tokens: list[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """The token ids of ``text_file`` in ``model``'s tokenizer (``tokens`` when already known)
    and their ``[n_chunk, ctx]`` chunks (``make_chunks``)."""
    tok = load_tokenizer(model)
    ids = tok.encode(read_text(text_file)) if tokens is None else tokens
    return ids, make_chunks(ids, ctx, n_chunks, tok.bos_id, tok.add_bos, str(text_file))
