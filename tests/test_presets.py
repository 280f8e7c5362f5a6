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
from gguf_moe.presets import PRESETS, choose_types, get_preset, layer_of, llama_sort_key, n_dims, writable
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
