"""`gguf-moe convert -t BF16` against llama.cpp's own `convert_hf_to_gguf.py --outtype bf16`.

Every tensor must be byte-identical (matched by name) with the same shape and type, and every
key llama.cpp's converter writes must be present in our file with the same type, value and
relative order. Our file may add only the merge-recipe keys (`moe.*`, `general.base_model.*`,
documented in docs/metadata.md); the tensor order differs by design (we write llama.cpp's
loader order, the converter writes source order), which llama.cpp does not care about.

llama.cpp's converter reads only the legacy per-expert layout, so the legacy layout is used. The
second model has an f16 source (converted through float32 to bf16, as llama.cpp does), a
vocab_size padded beyond the tokenizer, 8 experts and a LazyMergekit README model card (whose
license, tags, languages and base models become general.* keys).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import gguf
from gguf_moe.synth import make_model
from oracle import run_hf_converter

pytest.importorskip("torch")
pytest.importorskip("transformers")



# keys our converter adds on purpose (the mergekit-moe recipe), absent from llama.cpp's output
EXTRA_KEYS = re.compile(r"^(moe\.|general\.base_model\.)")

CASES = {
    "Legacy-4x-BF16": dict(layout="legacy", n_expert=4, top_k=2, duplicate_expert=True, dtype="bfloat16", seed=11),
    "Legacy-8x-F16-padded": dict(layout="legacy", n_expert=8, top_k=2, duplicate_expert=True, dtype="float16",
                                 hidden=256, ff=256, vocab_size=1040, shards=3, seed=12,
                                 model_card=True),
}


def run_reference(src: Path, out: Path) -> None:
    run_hf_converter(src, out, "bf16")


def run_ours(src: Path, out: Path) -> None:
    from click.testing import CliRunner

    from gguf_moe.cli import main

    res = CliRunner().invoke(main, ["convert", str(src), "-t", "BF16", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output


def kv_fields(reader: gguf.GGUFReader) -> dict:
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp("bf16")
    # the directory name becomes general.name in both converters
    src = make_model(root / name, **CASES[name])
    ref_path, ours_path = root / "ref.gguf", root / "ours.gguf"
    run_reference(src, ref_path)
    run_ours(src, ours_path)
    return name, gguf.GGUFReader(str(ref_path)), gguf.GGUFReader(str(ours_path))


def test_tensors_byte_identical(pair):
    name, ref, ours = pair
    rt = {t.name: t for t in ref.tensors}
    ot = {t.name: t for t in ours.tensors}
    assert sorted(rt) == sorted(ot)
    types = set()
    for tname, r in rt.items():
        o = ot[tname]
        assert o.tensor_type == r.tensor_type, (tname, o.tensor_type, r.tensor_type)
        assert list(o.shape) == list(r.shape), (tname, o.shape, r.shape)
        assert o.n_bytes == r.n_bytes, tname
        rb = np.asarray(r.data).reshape(-1).view(np.uint8)
        ob = np.asarray(o.data).reshape(-1).view(np.uint8)
        assert np.array_equal(rb, ob), f"{tname}: {int((rb != ob).sum())} bytes differ"
        types.add(r.tensor_type.name)
    assert types == {"BF16", "F32"}


def test_metadata_matches_converter(pair):
    name, ref, ours = pair
    rk, ok = kv_fields(ref), kv_fields(ours)
    missing = [k for k in rk if k not in ok]
    extra = [k for k in ok if k not in rk]
    print(f"{name}: {len(rk)} keys from llama.cpp's converter; ours adds {len(extra)}: {sorted({k.split('.')[0] + '.' + k.split('.')[1] for k in extra})}")
    assert not missing, f"keys llama.cpp's converter writes but we do not: {missing}"
    assert all(EXTRA_KEYS.match(k) for k in extra), f"unexpected extra keys: {[k for k in extra if not EXTRA_KEYS.match(k)]}"
    differ = []
    for k, f in rk.items():
        g = ok[k]
        if g.types != f.types or g.contents() != f.contents():
            differ.append(k)
    assert not differ, f"keys with different type or value: {differ}"
    assert [k for k in ok if k in rk] == list(rk), "common keys in a different order"
    # the ones llama.cpp's loader depends on, spelled out
    for k in ("general.architecture", "llama.block_count", "llama.expert_count", "llama.expert_used_count",
              "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
              "llama.vocab_size", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
              "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
              "tokenizer.chat_template"):
        assert k in rk and ok[k].contents() == rk[k].contents(), k
