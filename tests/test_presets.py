"""Per-tensor type presets against the real llama-quantize.

Small F32 GGUF models (llama arch, the KVs llama.cpp's loader needs, rows of 256+
elements but only a couple of rows per tensor) are quantized with llama.cpp's
``llama_model_quantize``; ``choose_types`` must give the type llama.cpp chose for every
tensor, and ``llama_sort_key`` must give llama.cpp's tensor order.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

import quant
from gguf_moe.errors import GgufMoeError
from gguf_moe.presets import (
    PRESETS,
    TypeOverrides,
    allows_quantization,
    choose_types,
    get_preset,
    layer_of,
    llama_sort_key,
    n_dims,
    parse_ggml_type,
    parse_tensor_type,
    requires_imatrix,
    writable,
)
from oracle import llama_model_quantize

QUANT_PRESETS = [
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q5_1",
    "Q4_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
]  # fmt: skip


def types_of(preset, tensors, **kw) -> dict[str, T]:
    """``choose_types`` as a question about llama.cpp's choice, whether or not ``quant`` can
    write every type yet."""
    return choose_types(preset, tensors, require_writable=False, **kw)


# --------------------------------------------------------------------------- model specs


def llama_tensors(
    n_layer: int,
    n_expert: int,
    *,
    n_embd: int = 256,
    n_ff: int = 512,
    rows: int = 2,
    tied: bool = False,
    q_rows: int | None = None,
    kv_rows: int | None = None,
    ne0: dict[str, int] | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of a llama-arch model, in the converter's order (not sorted).

    Only the row length (last axis) matters for type selection, so tensors have few rows.
    ``ne0`` overrides the row length of a tensor kind (e.g. ``{"ffn_down": 200}``).
    """
    ne0 = ne0 or {}

    def n(kind: str, default: int) -> int:
        return ne0.get(kind, default)

    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (rows, n("token_embd", n_embd)))]
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (n_embd,)),
            (b + "attn_q.weight", (q_rows or rows, n("attn_q", n_embd))),
            (b + "attn_k.weight", (kv_rows or rows, n("attn_k", n_embd))),
            (b + "attn_v.weight", (kv_rows or rows, n("attn_v", n_embd))),
            (b + "attn_output.weight", (rows, n("attn_output", n_embd))),
            (b + "ffn_norm.weight", (n_embd,)),
        ]
        if n_expert > 1:
            out += [
                (b + "ffn_gate_inp.weight", (n_expert, n("ffn_gate_inp", n_embd))),
                (b + "ffn_gate_exps.weight", (n_expert, rows, n("ffn_gate", n_embd))),
                (b + "ffn_down_exps.weight", (n_expert, rows, n("ffn_down", n_ff))),
                (b + "ffn_up_exps.weight", (n_expert, rows, n("ffn_up", n_embd))),
            ]
        else:
            out += [
                (b + "ffn_gate.weight", (rows, n("ffn_gate", n_embd))),
                (b + "ffn_down.weight", (rows, n("ffn_down", n_ff))),
                (b + "ffn_up.weight", (rows, n("ffn_up", n_embd))),
            ]
    out.append(("output_norm.weight", (n_embd,)))
    if not tied:
        out.append(("output.weight", (rows, n("output", n_embd))))
    return out


def write_f32_gguf(path: Path, tensors, *, n_layer: int, n_expert: int, n_head=4, n_head_kv=2, seed=0) -> Path:
    """A llama-arch F32 GGUF that llama.cpp's quantizer accepts."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    if n_expert > 1:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    w.add_file_type(0)
    rng = np.random.default_rng(seed)
    for name, shape in tensors:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, dst: Path, preset: str, *, imatrix: bool = False) -> dict[str, T]:
    """Run the real llama.cpp quantizer; returns {name: type} in file order."""
    # An empty imatrix list: llama.cpp then applies its "has an imatrix" type rules, while
    # every tensor is quantized without weights.
    llama_model_quantize(src, dst, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}"), imatrix={} if imatrix else None, nthread=1)
    r = GGUFReader(str(dst))
    return {t.name: T(t.tensor_type) for t in r.tensors}


# Models: (tensors, n_layer, n_expert, header kwargs)
MODELS = {
    # Mixtral-like: 8 experts (attn_k/attn_v -> Q8_0, attn_output -> Q5_K), 32 layers.
    "moe8_l32": (llama_tensors(32, 8), 32, 8, {}),
    # mergekit-style 4 experts, 28 layers (different use_more_bits pattern), tied output.
    "moe4_l28_tied": (llama_tensors(28, 4, tied=True), 28, 4, {}),
    # 4 experts, 32 layers.
    "moe4_l32": (llama_tensors(32, 4), 32, 4, {}),
    # dense: ffn_down layer comes from llama.cpp's running counter, not the name.
    "dense_l24": (llama_tensors(24, 0), 24, 0, {}),
    # rows not a multiple of 256: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, and F16 when % 32 != 0.
    "fallback": (
        llama_tensors(
            8,
            4,
            ne0={"token_embd": 320, "attn_q": 320, "attn_v": 288, "ffn_down": 200, "output": 320, "ffn_up": 96},
        ),
        8,
        4,
        {},
    ),
    # tied embeddings whose rows don't divide 256 (output rule -> Q8_0 for token_embd).
    "fallback_tied": (llama_tensors(8, 2, tied=True, ne0={"token_embd": 288, "ffn_gate": 48}), 8, 2, {}),
}


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("f32")
    return {
        key: write_f32_gguf(d / f"{key}.gguf", tensors, n_layer=nl, n_expert=ne, **kw)
        for key, (tensors, nl, ne, kw) in MODELS.items()
    }


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("preset", QUANT_PRESETS)
def test_types_and_order_match_llama_quantize(f32_models, tmp_path, model, preset):
    tensors, n_layer, n_expert, _ = MODELS[model]
    got = llama_quantize(f32_models[model], tmp_path / "out.gguf", preset)
    ours = types_of(preset, tensors, n_expert=n_expert, n_layer=n_layer)
    assert set(ours) == set(got)
    diff = {n: (ours[n].name, got[n].name) for n in got if ours[n] != got[n]}
    assert not diff, f"{preset} {model}: (ours, llama.cpp) differ for {len(diff)} tensors: {dict(list(diff.items())[:8])}"
    assert list(got) == sorted(got, key=llama_sort_key)
    assert list(got) == sorted((n for n, _ in tensors), key=llama_sort_key)


def test_fallback_model_really_falls_back(f32_models, tmp_path):
    """The fallback fixture exercises every fallback branch (else the test above proves little)."""
    tensors, n_layer, n_expert, _ = MODELS["fallback"]
    seen = set()
    for preset in ("Q4_K_M", "Q5_K_S", "Q6_K", "Q8_0"):
        seen |= set(choose_types(preset, tensors, n_expert=n_expert, n_layer=n_layer).values())
    assert {T.Q5_0, T.Q5_1, T.Q8_0, T.F16} <= seen
    t = choose_types("Q4_K_M", tensors, n_expert=n_expert, n_layer=n_layer)
    assert t["output.weight"] == T.Q8_0  # 320 % 256 != 0 -> Q8_0
    assert t["blk.0.attn_q.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert t["blk.0.attn_v.weight"] == T.Q8_0  # use_more_bits Q6_K -> Q8_0
    assert t["blk.0.ffn_down_exps.weight"] == T.F16  # 200 % 32 != 0
    assert t["blk.0.ffn_up_exps.weight"] == T.Q5_0


@pytest.mark.parametrize("model", ["moe8_l32", "moe4_l32", "dense_l24"])
@pytest.mark.parametrize("preset", ["Q5_0", "Q4_0", "Q4_K_M", "Q4_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L"])
def test_imatrix_rule_matches_llama_quantize(f32_models, tmp_path, preset, model):
    tensors, n_layer, n_expert, _ = MODELS[model]
    got = llama_quantize(f32_models[model], tmp_path / "out.gguf", preset, imatrix=True)
    ours = types_of(preset, tensors, n_expert=n_expert, n_layer=n_layer, has_imatrix=True)
    assert ours == got
    down = "ffn_down_exps" if n_expert > 1 else "ffn_down"
    first, later = f"blk.0.{down}.weight", f"blk.{n_layer // 8}.{down}.weight"
    if preset in ("Q4_0", "Q5_0"):  # the only presets an imatrix changes
        bumped = T.Q4_1 if preset == "Q4_0" else T.Q5_1
        assert got[first] == bumped and got[later] == PRESETS[preset].default
    else:
        assert types_of(preset, tensors, n_expert=n_expert, n_layer=n_layer) == got


def test_q4_0_with_imatrix_needs_q4_1():
    """Writable once ``quant`` has Q4_1; until then a clear error naming the type."""
    tensors, n_layer, n_expert, _ = MODELS["moe4_l32"]
    if writable(T.Q4_1):
        t = choose_types("Q4_0", tensors, n_expert=n_expert, n_layer=n_layer, has_imatrix=True)
        assert [t[f"blk.{i}.ffn_down_exps.weight"] for i in range(5)] == [T.Q4_1] * 4 + [T.Q4_0]
    else:
        with pytest.raises(GgufMoeError, match=r"blk\.0\.ffn_down_exps\.weight: Q4_0 with an imatrix .* Q4_1"):
            choose_types("Q4_0", tensors, n_expert=n_expert, n_layer=n_layer, has_imatrix=True)


def test_types_without_a_quantizer_are_clear_errors(monkeypatch):
    """A preset (or one tensor's type) that ``quant`` cannot write fails up front, by name."""
    for name in ("Q3_K", "Q4_1"):
        monkeypatch.delitem(quant.QTYPES, name, raising=False)
    with pytest.raises(GgufMoeError, match="Q3_K_M needs the Q3_K quantizer") as e:
        get_preset("q3_k_m")
    assert "Q4_K_M" in str(e.value) and "Q3_K_S" not in str(e.value).split("choose one of:")[1]
    tensors, n_layer, n_expert, _ = MODELS["moe4_l32"]
    if writable(T.Q2_K):  # Q2_K itself is fine, but its attn_output and ffn_down are Q3_K
        with pytest.raises(GgufMoeError, match=r"blk\.0\.attn_output\.weight: Q2_K makes llama.cpp use Q3_K"):
            choose_types("Q2_K", tensors, n_expert=n_expert, n_layer=n_layer)
    with pytest.raises(GgufMoeError, match="Q3_K"):
        choose_types("Q3_K_L", tensors, n_expert=n_expert, n_layer=n_layer)
    with pytest.raises(GgufMoeError, match="Q4_1"):
        choose_types("Q4_0", tensors, n_expert=n_expert, n_layer=n_layer, has_imatrix=True)
    assert choose_types("Q4_0", tensors, n_expert=n_expert, n_layer=n_layer)["blk.0.ffn_down_exps.weight"] == T.Q4_0


def test_cli_refuses_a_preset_without_quantizer(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from gguf_moe.cli import main

    monkeypatch.delitem(quant.QTYPES, "Q3_K", raising=False)
    r = CliRunner().invoke(main, ["convert", str(tmp_path), "-t", "Q3_K_M"])
    assert r.exit_code == 2 and "Q3_K_M needs the Q3_K quantizer" in r.output


@pytest.mark.parametrize("n_expert", [4, 8])
@pytest.mark.parametrize("n_head,n_head_kv", [(8, 2), (8, 4), (8, 1)])
def test_gqa_rule_matches_llama_quantize(tmp_path, n_expert, n_head, n_head_kv):
    """Q2_K's attn_v: Q4_K when n_head / n_head_kv >= 4, else Q3_K (8 experts: Q8_0)."""
    tensors = llama_tensors(8, n_expert, q_rows=2 * n_head, kv_rows=2 * n_head_kv)
    src = write_f32_gguf(tmp_path / "gqa.gguf", tensors, n_layer=8, n_expert=n_expert, n_head=n_head, n_head_kv=n_head_kv)
    for preset in ("Q2_K", "Q3_K_S", "Q3_K_M"):
        got = llama_quantize(src, tmp_path / f"{preset}.gguf", preset)
        explicit = types_of(preset, tensors, n_expert=n_expert, n_layer=8, n_head=n_head, n_head_kv=n_head_kv)
        inferred = types_of(preset, tensors, n_expert=n_expert, n_layer=8)
        assert explicit == got and inferred == got, preset
    want = T.Q8_0 if n_expert == 8 else T.Q4_K if n_head // n_head_kv >= 4 else T.Q3_K
    assert types_of("Q2_K", tensors, n_expert=n_expert, n_layer=8)["blk.5.attn_v.weight"] == want


@pytest.mark.parametrize("gqa", [True, False])
def test_70b_rule_matches_llama_quantize(tmp_path, gqa):
    """llama with 80 layers and GQA is LLM_TYPE_70B: attn_v Q4_K -> Q5_K (not for 65B)."""
    n_head, n_head_kv = (8, 2) if gqa else (8, 8)
    tensors = llama_tensors(80, 0, rows=2, q_rows=8, kv_rows=2 if gqa else 8)  # 2 rows: 2-D, so quantized
    src = write_f32_gguf(tmp_path / "l80.gguf", tensors, n_layer=80, n_expert=0, n_head=n_head, n_head_kv=n_head_kv)
    for preset in ("Q4_K_S", "Q4_K_M", "Q2_K", "Q3_K_S", "Q3_K_M"):
        got = llama_quantize(src, tmp_path / f"{preset}.gguf", preset)
        explicit = types_of(preset, tensors, n_expert=0, n_layer=80, n_head=n_head, n_head_kv=n_head_kv)
        inferred = types_of(preset, tensors, n_expert=0, n_layer=80)
        assert explicit == got and inferred == got, preset
        v = [got[f"blk.{i}.attn_v.weight"] for i in range(80)]
        if preset.startswith("Q4"):
            assert (T.Q4_K in v) is (not gqa)
        else:
            assert (T.Q5_K in v[2:]) is gqa


# --------------------------------------------------------------------------- documented table (reference §4.4)


def _mixtral_8x7b():
    return llama_tensors(32, 8, n_embd=4096, n_ff=14336, rows=4096)


MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


@pytest.mark.parametrize(
    "preset,emb,out,q,kv,o,gate_up,down_more,down_rest",
    [
        ("Q4_K_S", T.Q4_K, T.Q6_K, T.Q4_K, T.Q8_0, T.Q5_K, T.Q4_K, None, None),
        ("Q4_K_M", T.Q4_K, T.Q6_K, T.Q4_K, T.Q8_0, T.Q5_K, T.Q4_K, T.Q6_K, T.Q4_K),
        ("Q5_K_S", T.Q5_K, T.Q6_K, T.Q5_K, T.Q8_0, T.Q5_K, T.Q5_K, T.Q5_K, T.Q5_K),
        ("Q5_K_M", T.Q5_K, T.Q6_K, T.Q5_K, T.Q8_0, T.Q5_K, T.Q5_K, T.Q6_K, T.Q5_K),
        ("Q6_K", T.Q6_K, T.Q6_K, T.Q6_K, T.Q8_0, T.Q6_K, T.Q6_K, T.Q6_K, T.Q6_K),
        ("Q8_0", T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0),
    ],
)
def test_mixtral_8x7b_table(preset, emb, out, q, kv, o, gate_up, down_more, down_rest):
    t = choose_types(preset, _mixtral_8x7b(), n_expert=8, n_layer=32)
    assert t["token_embd.weight"] == emb and t["output.weight"] == out
    for i in range(32):
        b = f"blk.{i}."
        assert t[b + "attn_q.weight"] == q
        assert t[b + "attn_k.weight"] == kv and t[b + "attn_v.weight"] == kv
        assert t[b + "attn_output.weight"] == o
        assert t[b + "ffn_gate_exps.weight"] == gate_up and t[b + "ffn_up_exps.weight"] == gate_up
        for n in ("attn_norm", "ffn_norm", "ffn_gate_inp"):
            assert t[b + n + ".weight"] == T.F32
        down = t[b + "ffn_down_exps.weight"]
        if preset == "Q4_K_S":
            assert down == (T.Q5_K if i < 4 else T.Q4_K)
        else:
            assert down == (down_more if i in MORE_BITS_32 else down_rest)
    assert t["output_norm.weight"] == T.F32


@pytest.mark.parametrize(
    "preset,n_expert,emb,q,k,v,o,gate_up",
    [
        ("Q2_K", 8, T.Q2_K, T.Q2_K, T.Q8_0, T.Q8_0, T.Q5_K, T.Q2_K),
        ("Q3_K_S", 8, T.Q3_K, T.Q3_K, T.Q8_0, T.Q8_0, T.Q5_K, T.Q3_K),
        ("Q3_K_M", 8, T.Q3_K, T.Q3_K, T.Q8_0, T.Q8_0, T.Q5_K, T.Q3_K),
        ("Q3_K_L", 8, T.Q3_K, T.Q3_K, T.Q8_0, T.Q8_0, T.Q3_K, T.Q3_K),
        ("Q4_1", 8, T.Q4_1, T.Q4_1, T.Q8_0, T.Q8_0, T.Q4_1, T.Q4_1),
        ("Q2_K", 4, T.Q2_K, T.Q2_K, T.Q2_K, T.Q4_K, T.Q3_K, T.Q2_K),
        ("Q3_K_S", 4, T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K),
        ("Q3_K_M", 4, T.Q3_K, T.Q3_K, T.Q3_K, None, T.Q4_K, T.Q3_K),
        ("Q3_K_L", 4, T.Q3_K, T.Q3_K, T.Q3_K, T.Q5_K, T.Q5_K, T.Q3_K),
        ("Q4_1", 4, T.Q4_1, T.Q4_1, T.Q4_1, T.Q4_1, T.Q4_1, T.Q4_1),
    ],
)
def test_small_presets_table(preset, n_expert, emb, q, k, v, o, gate_up):
    """The tables of docs/presets.md for Q2_K .. Q4_1 (32 layers, 32 query / 8 KV heads)."""
    tensors = llama_tensors(32, n_expert, n_embd=4096, n_ff=14336, rows=8)
    t = types_of(preset, tensors, n_expert=n_expert, n_layer=32, n_head=32, n_head_kv=8)
    down = {"Q2_K": T.Q3_K, "Q3_K_S": T.Q3_K, "Q3_K_L": T.Q5_K, "Q4_1": T.Q4_1}
    assert t["token_embd.weight"] == emb and t["output.weight"] == T.Q6_K
    for i in range(32):
        b = f"blk.{i}."
        assert t[b + "attn_q.weight"] == q and t[b + "attn_k.weight"] == k and t[b + "attn_output.weight"] == o
        assert t[b + "attn_v.weight"] == (v or (T.Q5_K if i < 2 else T.Q4_K))
        assert t[b + "ffn_gate_exps.weight"] == gate_up and t[b + "ffn_up_exps.weight"] == gate_up
        assert t[b + "ffn_down_exps.weight"] == down.get(preset, T.Q5_K if i < 2 else T.Q4_K)


def test_four_experts_use_plain_rules():
    tensors = llama_tensors(32, 4, n_embd=4096, n_ff=14336, rows=8)
    m = choose_types("Q4_K_M", tensors, n_expert=4, n_layer=32)
    s = choose_types("Q4_K_S", tensors, n_expert=4, n_layer=32)
    for i in range(32):
        b = f"blk.{i}."
        assert m[b + "attn_k.weight"] == T.Q4_K and m[b + "attn_output.weight"] == T.Q4_K
        assert m[b + "attn_v.weight"] == (T.Q6_K if i in MORE_BITS_32 else T.Q4_K)
        assert s[b + "attn_v.weight"] == (T.Q5_K if i < 4 else T.Q4_K)


def test_float_presets_follow_the_converter():
    tensors = llama_tensors(2, 4, rows=3, ne0={"ffn_down": 200})
    for name in ("F32", "F16", "BF16"):
        t = choose_types(name, tensors, n_expert=4, n_layer=2)
        for n, shape in tensors:
            f32 = len(shape) == 1 or n.endswith("_norm.weight") or "ffn_gate_inp" in n
            assert t[n] == (T.F32 if f32 else PRESETS[name].default), n


# --------------------------------------------------------------------------- small pieces


def test_file_types_match_llama_h():
    names = {"F32": "ALL_F32"}
    for name, p in PRESETS.items():
        assert p.file_type == getattr(llama_cpp, f"LLAMA_FTYPE_{names.get(name, 'MOSTLY_' + name)}"), name


def test_get_preset_is_case_insensitive_and_lists_names():
    assert get_preset("q4_k_m") is PRESETS["Q4_K_M"]
    assert get_preset(" bf16 ") is PRESETS["BF16"]
    with pytest.raises(GgufMoeError, match="Q4_K_M") as e:
        get_preset("Q3_K_XL")
    assert "Q3_K_XL" in str(e.value)


def test_sort_key_orders_like_weight_name_comparer():
    names = ["blk.10.attn_q.weight", "blk.2.ffn_up_exps.weight", "token_embd.weight", "blk.2.attn_k.weight",
             "output.weight", "output_norm.weight", "blk.0.attn_v.weight", "blk.-1x", "blk.007.a"]
    assert sorted(names, key=llama_sort_key) == [
        "blk.-1x", "output.weight", "output_norm.weight", "token_embd.weight",  # layer -1, then bytewise
        "blk.0.attn_v.weight", "blk.2.attn_k.weight", "blk.2.ffn_up_exps.weight", "blk.007.a",
        "blk.10.attn_q.weight",
    ]
    assert layer_of("blk. 12.attn_q.weight") == 12 and layer_of("xblk.1.a") is None


def test_n_dims_drops_trailing_ones():
    assert n_dims((1, 2048)) == 1 and n_dims((2048,)) == 1 and n_dims((4, 1, 8)) == 3 and n_dims((1, 1)) == 1


def test_bad_layer_is_a_clear_error():
    tensors = llama_tensors(2, 4) + [("blk.7.ffn_down_exps.weight", (4, 2, 512))]
    with pytest.raises(GgufMoeError, match=r"blk\.7\.ffn_down_exps\.weight.*layer 7"):
        choose_types("Q4_K_M", tensors, n_expert=4, n_layer=2)


# --------------------------------------------------------------------------- i-quants, Q2_K_S, MXFP4_MOE, TQ

NEW_PRESETS = [
    "Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
    "IQ4_NL", "IQ4_XS", "MXFP4_MOE", "TQ1_0", "TQ2_0",
]  # fmt: skip


def ones_imatrix(tensors) -> dict[str, np.ndarray]:
    """Importance weights (all 1) for every tensor llama.cpp may quantize, so that the
    presets that need an imatrix run; an imatrix changes types, not its values."""
    out = {}
    for n, shape in tensors:
        if allows_quantization(n, shape):
            n_mat = shape[0] if len(shape) == 3 else 1
            out[n] = np.ones(n_mat * shape[-1], np.float32)
    return out


def llama_types(src: Path, dst: Path, preset: str, **kw) -> dict[str, T] | None:
    """llama.cpp's types for ``preset`` (file order), or None when it refuses."""
    if llama_model_quantize(src, dst, PRESETS[preset].file_type, nthread=1, check=False, **kw) != 0:
        return None
    return {t.name: T(t.tensor_type) for t in GGUFReader(str(dst)).tensors}


def needing_imatrix(preset, tensors, types) -> list[str]:
    return [n for n, s in tensors if allows_quantization(n, s) and requires_imatrix(n, types[n], preset)]


@pytest.mark.parametrize("model", [m for m in MODELS if m != "moe4_l32"])  # moe4_l28_tied covers 4 experts
@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_new_presets_match_llama_quantize(f32_models, tmp_path, model, preset):
    """With an imatrix (every preset runs) and without one (llama.cpp refuses exactly when
    a tensor would get a type that needs one)."""
    tensors, n_layer, n_expert, _ = MODELS[model]
    got = llama_types(f32_models[model], tmp_path / "im.gguf", preset, imatrix=ones_imatrix(tensors))
    ours = types_of(preset, tensors, n_expert=n_expert, n_layer=n_layer, has_imatrix=True)
    assert got is not None and list(got) == sorted(got, key=llama_sort_key)
    diff = {n: (ours[n].name, got[n].name) for n in got if ours[n] != got[n]}
    assert not diff, f"{preset} {model} with imatrix: (ours, llama.cpp) differ: {dict(list(diff.items())[:8])}"

    got = llama_types(f32_models[model], tmp_path / "plain.gguf", preset)
    ours = types_of(preset, tensors, n_expert=n_expert, n_layer=n_layer)
    needs = needing_imatrix(preset, tensors, ours)
    assert (got is None) == bool(needs), f"llama.cpp {'refused' if got is None else 'accepted'}; we need one for {needs[:3]}"
    if got is not None:
        assert ours == got


def test_new_presets_exercise_their_rules():
    """Guard against a vacuous pass: the models above reach the branches these presets add."""
    tensors, n_layer, n_expert, _ = MODELS["moe8_l32"]
    seen = {p: set(types_of(p, tensors, n_expert=8, n_layer=32, has_imatrix=True).values()) for p in NEW_PRESETS}
    assert {T.Q5_K, T.Q4_K, T.Q2_K, T.IQ2_XXS} <= seen["IQ2_XXS"]
    assert {T.IQ3_S, T.Q5_K, T.Q8_0, T.IQ3_XXS} <= seen["IQ3_XS"]
    assert seen["MXFP4_MOE"] == {T.MXFP4, T.Q8_0, T.F32}
    t = types_of("IQ3_XXS", *MODELS["moe4_l32"][:1], n_expert=4, n_layer=32)
    assert t["blk.0.ffn_down_exps.weight"] == T.Q4_K and t["blk.9.ffn_down_exps.weight"] == T.Q3_K
    assert t["blk.0.attn_v.weight"] == T.IQ3_S and t["blk.0.attn_q.weight"] == T.IQ2_S
    t = types_of("IQ4_XS", *MODELS["moe4_l32"][:1], n_expert=4, n_layer=32)
    assert t["blk.3.ffn_down_exps.weight"] == T.Q5_K and t["blk.4.ffn_down_exps.weight"] == T.IQ4_XS
    fb = types_of("IQ2_XS", *MODELS["fallback"][:1], n_expert=4, n_layer=8, has_imatrix=True)
    assert fb["blk.0.ffn_up_exps.weight"] == T.IQ4_NL and fb["blk.0.ffn_down_exps.weight"] == T.F16


@pytest.mark.parametrize("n_expert", [2, 8])
@pytest.mark.parametrize("n_head,n_head_kv", [(8, 2), (8, 4)])
def test_new_presets_gqa_rules_match_llama_quantize(tmp_path, n_expert, n_head, n_head_kv):
    """attn_v of the i-quants: Q4_K when n_head / n_head_kv >= 4 or n_expert >= 4."""
    tensors = llama_tensors(8, n_expert, q_rows=2 * n_head, kv_rows=2 * n_head_kv)
    src = write_f32_gguf(tmp_path / "gqa.gguf", tensors, n_layer=8, n_expert=n_expert, n_head=n_head, n_head_kv=n_head_kv)
    im = ones_imatrix(tensors)
    for preset in NEW_PRESETS:
        got = llama_types(src, tmp_path / f"{preset}.gguf", preset, imatrix=im)
        assert types_of(preset, tensors, n_expert=n_expert, n_layer=8, has_imatrix=True) == got, preset


def test_aliases_and_numbers():
    assert get_preset("q4_k") is PRESETS["Q4_K_M"] and get_preset("Q5_K") is PRESETS["Q5_K_M"]
    assert get_preset("Q3_K") is PRESETS["Q3_K_M"]
    assert get_preset("15") is PRESETS["Q4_K_M"] and get_preset("7") is PRESETS["Q8_0"]
    for name, p in PRESETS.items():
        assert p.file_type == getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL_F32' if name == 'F32' else 'MOSTLY_' + name}")


# --------------------------------------------------------------------------- overrides

OVERRIDES = {
    "tensor_type": dict(tensor_types=[("attn_v", "q8_0"), (r"blk\.[0-3]\.ffn_down", "q6_k"), ("ffn_down", "q5_k")]),
    "tensor_type_fallback": dict(tensor_types=[("ffn_up", "q4_k"), ("attn_q", "iq4_nl"), ("attn_output", "bf16")]),
    "output": dict(output_tensor_type="q8_0"),
    "token_embd": dict(token_embedding_type="q4_k"),
    "pure": dict(pure=True),
    "leave_output": dict(leave_output_tensor=True),
    "all": dict(
        tensor_types=[("attn_k", "q5_k"), ("output", "q4_k")], output_tensor_type="q6_k", token_embedding_type="q8_0",
        pure=True, leave_output_tensor=True,
    ),  # fmt: skip
    "pure_output": dict(pure=True, output_tensor_type="q5_0", tensor_types=[("ffn_gate", "q8_0")]),
}


def overrides_of(kw) -> TypeOverrides:
    return TypeOverrides(
        tensor_types=tuple((p, T[t.upper()]) for p, t in kw.get("tensor_types", ())),
        output_tensor_type=T[kw["output_tensor_type"].upper()] if "output_tensor_type" in kw else None,
        token_embedding_type=T[kw["token_embedding_type"].upper()] if "token_embedding_type" in kw else None,
        pure=kw.get("pure", False),
        leave_output_tensor=kw.get("leave_output_tensor", False),
    )


@pytest.mark.parametrize("model", ["moe8_l32", "moe4_l28_tied", "fallback", "dense_l24"])
@pytest.mark.parametrize("case", list(OVERRIDES))
def test_overrides_match_llama_quantize(f32_models, tmp_path, model, case):
    tensors, n_layer, n_expert, _ = MODELS[model]
    kw = OVERRIDES[case]
    if model == "fallback" and "token_embedding_type" in kw:
        return  # rows of 320: llama.cpp would abort on Q4_K (no fallback); see the test below
    f32 = dict.fromkeys((n for n, _ in tensors), T.F32)
    for preset in ("Q4_K_M", "Q2_K", "IQ4_XS", "Q8_0", "BF16"):
        got = llama_types(f32_models[model], tmp_path / f"{preset}.gguf", preset, **kw)
        ours = types_of(preset, tensors, n_expert=n_expert, n_layer=n_layer, overrides=overrides_of(kw), source_types=f32)
        assert got is not None
        diff = {n: (ours[n].name, got[n].name) for n in got if ours[n] != got[n]}
        assert not diff, f"{preset} {model} {case}: (ours, llama.cpp) differ: {dict(list(diff.items())[:8])}"


def test_override_without_fallback_is_refused():
    """--token-embedding-type / --output-tensor-type are taken as given (no fallback): a type
    whose blocks do not divide the rows is an error here (llama.cpp aborts)."""
    tensors, n_layer, n_expert, _ = MODELS["fallback"]
    with pytest.raises(GgufMoeError, match=r"token_embd\.weight: --token-embedding-type asks for Q4_K.*320"):
        types_of("Q4_K_M", tensors, n_expert=4, n_layer=8, overrides=TypeOverrides(token_embedding_type=T.Q4_K))


def test_override_parsing():
    assert parse_tensor_type("ATTN_V=Q8_0") == ("attn_v", T.Q8_0)  # pattern lower-cased, as llama-quantize does
    assert parse_tensor_type(r"blk\.1\.=iq4_xs") == (r"blk\.1\.", T.IQ4_XS)
    assert parse_ggml_type("q6_K") == T.Q6_K and parse_ggml_type("BF16") == T.BF16
    for bad, msg in [("attn_v", "malformed"), ("=q8_0", "missing tensor name"), ("attn_v=", "missing quantization type"),
                     ("attn_v=q9_0", "invalid ggml type"), ("attn_v(=q8_0", "not a valid regular expression"),
                     ("(?<=blk)x=q8_0", "does not accept"), ("blk[[:digit:]]=q8_0", "does not accept")]:  # fmt: skip
        with pytest.raises(GgufMoeError, match=msg):
            parse_tensor_type(bad)
