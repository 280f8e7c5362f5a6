"""The safetensors reader and the Hugging Face -> GGUF tensor mapping.

Reference points are the real libraries: safetensors' own loader for the stored values,
Transformers 5 for the fused expert layout (it converts the legacy layout on load), and
llama.cpp's ``LlamaModel.permute`` for the Q/K row order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_moe.source import open_model
from gguf_moe.synth import make_model

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = ROOT / ".cache" / "llama.cpp"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same weights (seed 0) in the fused and the legacy Mixtral layout."""
    base = tmp_path_factory.mktemp("src")
    fused = make_model(base / "fused" / "tiny-moe", layout="fused", seed=0, shards=2)
    legacy = make_model(base / "legacy" / "tiny-moe", layout="legacy", seed=0, shards=3)
    return fused, legacy


def _hf_tensors(d: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as float32, read by safetensors itself (via torch)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[k] = v.float().numpy()
    return out


def test_layouts_give_identical_tensors(pair):
    fused, legacy = (open_model(d) for d in pair)
    assert fused.layout == "moe_fused" and legacy.layout == "moe_legacy"
    assert [t.name for t in fused.tensors] == [t.name for t in legacy.tensors]
    for a, b in zip(fused.tensors, legacy.tensors):
        assert a.shape == b.shape, a.name
        assert np.array_equal(a.read(), b.read()), a.name
    assert fused.hparams["rope_theta"] == legacy.hparams["rope_theta"] == 1e6  # v5 rope_parameters vs 4.x rope_theta
    assert fused.hparams["n_expert"] == 4 and fused.hparams["n_expert_used"] == 2


def test_names_and_order(pair):
    m = open_model(pair[0])
    names = [t.name for t in m.tensors]
    assert names[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]
    assert names[3:13] == [
        f"blk.0.{n}.weight"
        for n in (
            "attn_k", "attn_norm", "attn_output", "attn_q", "attn_v",
            "ffn_down_exps", "ffn_gate_exps", "ffn_gate_inp", "ffn_norm", "ffn_up_exps",
        )
    ]  # fmt: skip
    shapes = {t.name: t.shape for t in m.tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (4, 512, 256)
    assert shapes["blk.1.ffn_down_exps.weight"] == (4, 256, 512)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (4, 256)
    forced = {t.name for t in m.tensors if t.force_f32}
    assert "blk.0.ffn_gate_inp.weight" in forced and "output_norm.weight" in forced
    assert "blk.0.ffn_up_exps.weight" not in forced


def test_values_match_safetensors_and_transformers_layout(pair):
    """Unpermuted tensors equal safetensors' values; experts stack as Transformers 5 does."""
    fused_dir, legacy_dir = pair
    m = open_model(legacy_dir)
    hf = _hf_tensors(legacy_dir)
    t = {x.name: x for x in m.tensors}
    assert np.array_equal(t["token_embd.weight"].read(), hf["model.embed_tokens.weight"])
    assert np.array_equal(t["blk.1.attn_v.weight"].read(), hf["model.layers.1.self_attn.v_proj.weight"])
    assert np.array_equal(t["blk.1.ffn_gate_inp.weight"].read(), hf["model.layers.1.block_sparse_moe.gate.weight"])
    for e in range(4):
        assert np.array_equal(t["blk.1.ffn_gate_exps.weight"].read()[e], hf[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"])
        assert np.array_equal(t["blk.1.ffn_up_exps.weight"].read()[e], hf[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"])
        assert np.array_equal(t["blk.1.ffn_down_exps.weight"].read()[e], hf[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"])
    # the fused file: gate rows first, then up (as stored by Transformers 5)
    hf5 = _hf_tensors(fused_dir)
    gu = hf5["model.layers.1.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(
        np.concatenate([t["blk.1.ffn_gate_exps.weight"].read(), t["blk.1.ffn_up_exps.weight"].read()], axis=1), gu
    )


def test_transformers_loads_legacy_as_our_fused_order(pair):
    """Transformers 5 converts the legacy checkpoint to gate_up_proj on load; our stacked
    gate/up experts must be exactly its two halves."""
    transformers = pytest.importorskip("transformers")
    import torch

    legacy_dir = pair[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(legacy_dir, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    gu = experts.gate_up_proj.detach().numpy()
    down = experts.down_proj.detach().numpy()
    t = {x.name: x for x in open_model(legacy_dir).tensors}
    ff = gu.shape[1] // 2
    assert np.array_equal(t["blk.0.ffn_gate_exps.weight"].read(), gu[:, :ff])
    assert np.array_equal(t["blk.0.ffn_up_exps.weight"].read(), gu[:, ff:])
    assert np.array_equal(t["blk.0.ffn_down_exps.weight"].read(), down)
    assert np.array_equal(t["blk.0.ffn_gate_inp.weight"].read(), model.model.layers[0].mlp.gate.weight.detach().numpy())


@pytest.mark.skipif(not (LLAMA_CPP / "conversion" / "llama.py").is_file(), reason="llama.cpp converter not unpacked")
def test_qk_permutation_matches_llama_cpp(pair, tmp_path):
    legacy_dir = pair[1]
    hf = _hf_tensors(legacy_dir)
    cfg = json.loads((legacy_dir / "config.json").read_text())
    np.save(tmp_path / "q.npy", hf["model.layers.1.self_attn.q_proj.weight"])
    np.save(tmp_path / "k.npy", hf["model.layers.1.self_attn.k_proj.weight"])
    script = (
        "import sys, numpy as np, torch\n"
        f"sys.path.insert(0, {str(LLAMA_CPP)!r})\n"
        "from conversion.llama import LlamaModel\n"
        f"d = {str(tmp_path)!r}\n"
        f"nh, nkv = {cfg['num_attention_heads']}, {cfg['num_key_value_heads']}\n"
        "for n, kv in (('q', nh), ('k', nkv)):\n"
        "    w = torch.from_numpy(np.load(f'{d}/{n}.npy'))\n"
        "    np.save(f'{d}/{n}_perm.npy', LlamaModel.permute(w, nh, kv).numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    t = {x.name: x for x in open_model(legacy_dir).tensors}
    assert np.array_equal(t["blk.1.attn_q.weight"].read(), np.load(tmp_path / "q_perm.npy"))
    assert np.array_equal(t["blk.1.attn_k.weight"].read(), np.load(tmp_path / "k_perm.npy"))
    assert not np.array_equal(np.load(tmp_path / "q_perm.npy"), hf["model.layers.1.self_attn.q_proj.weight"])


def test_chunks_never_cross_experts_or_heads(pair):
    m = open_model(pair[0])
    t = {x.name: x for x in m.tensors}
    for name, max_rows in (("blk.0.ffn_down_exps.weight", 100), ("blk.0.attn_q.weight", 100), ("token_embd.weight", 7)):
        st = t[name]
        chunks = list(st.iter_chunks(max_rows))
        assert np.array_equal(np.concatenate(chunks), st.read().reshape(-1, st.shape[-1]))
        assert all(c.dtype == np.float32 and c.flags.c_contiguous for c in chunks)
        if len(st.shape) == 3:
            bounds = np.cumsum([len(c) for c in chunks])
            assert all(len(c) <= max_rows for c in chunks)
            assert set(range(st.shape[1], st.n_rows + 1, st.shape[1])) <= set(bounds.tolist())
        if name.endswith("attn_q.weight"):
            assert all(len(c) % m.hparams["head_dim"] == 0 for c in chunks)
    # 1-D tensors come as one row
    assert next(t["output_norm.weight"].iter_chunks(10)).shape == (1, 256)


@pytest.mark.parametrize("shards", [1, 4])
def test_shard_counts_and_single_file(pair, tmp_path, shards):
    d = make_model(tmp_path / "tiny-moe", layout="fused", seed=0, shards=shards)
    assert (d / "model.safetensors").is_file() == (shards == 1)
    a, b = open_model(d), open_model(pair[0])
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.array_equal(x.read(), y.read())


def test_index_order_and_extra_metadata_ignored(pair, tmp_path):
    """mergekit indexes have no total_size and list keys in write order; neither matters."""
    import shutil

    d = tmp_path / "tiny-moe"
    shutil.copytree(pair[0], d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = dict(reversed(list(idx["weight_map"].items())))
    idx["metadata"] = {"total_size": 1}  # wrong on purpose: not used
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    a, b = open_model(d), open_model(pair[0])
    assert [x.name for x in a.tensors] == [y.name for y in b.tensors]
    assert np.array_equal(a.tensors[5].read(), b.tensors[5].read())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_source_dtypes(tmp_path, dtype):
    d = make_model(tmp_path / "tiny", layout="dense", dtype=dtype, seed=3, shards=1)
    m = open_model(d)
    assert m.layout == "dense" and m.hparams["n_expert"] == 0
    hf = _hf_tensors(d)
    t = {x.name: x for x in m.tensors}
    assert t["blk.0.ffn_gate.weight"].src_dtype == {"float16": "F16", "float32": "F32"}[dtype]
    assert np.array_equal(t["blk.0.ffn_gate.weight"].read(), hf["model.layers.0.mlp.gate_proj.weight"])
    assert np.array_equal(t["blk.0.ffn_down.weight"].read(), hf["model.layers.0.mlp.down_proj.weight"])


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    """With no lm_head the converter writes no output.weight (llama.cpp reuses token_embd)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    d = make_model(tmp_path / "src" / "tiny", layout="dense", dtype="float32", seed=1, shards=1)
    tensors = load_file(d / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    m = open_model(d)
    names = [t.name for t in m.tensors]
    assert "output.weight" not in names and names[0] == "output_norm.weight"
    assert m.hparams["tie_word_embeddings"] is True
    shutil.rmtree(tmp_path / "src")


@pytest.mark.skipif(not (LLAMA_CPP / "conversion" / "llama.py").is_file(), reason="llama.cpp converter not unpacked")
def test_llama3_rope_freqs_match_llama_cpp(tmp_path):
    """Llama 3.1 rope scaling adds rope_freqs.weight, bit-identical to the converter's."""
    d = make_model(tmp_path / "l31", layout="legacy", seed=2, shards=1)
    cfg = json.loads((d / "config.json").read_text())
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    cfg["rope_scaling"] = rope
    cfg["rope_theta"] = 500000.0
    (d / "config.json").write_text(json.dumps(cfg))
    m = open_model(d)
    t = {x.name: x for x in m.tensors}
    assert [x.name for x in m.tensors][:4] == ["output.weight", "output_norm.weight", "rope_freqs.weight", "token_embd.weight"]
    ours = t["rope_freqs.weight"].read()
    assert ours.shape == (m.hparams["head_dim"] // 2,) and t["rope_freqs.weight"].force_f32
    script = (
        "import sys, types, numpy as np\n"
        f"sys.path.insert(0, {str(LLAMA_CPP)!r})\n"
        "from conversion.llama import LlamaModel\n"
        f"ns = types.SimpleNamespace(rope_parameters={{**{rope!r}, 'rope_theta': 500000.0}},\n"
        f"    hparams={{'hidden_size': {cfg['hidden_size']}, 'num_attention_heads': {cfg['num_attention_heads']}}},\n"
        "    format_tensor_name=lambda *a, **k: 'rope_freqs.weight')\n"
        "(name, t), = LlamaModel.generate_extra_tensors(ns)\n"
        f"np.save({str(tmp_path / 'rf.npy')!r}, t.numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    ref = np.load(tmp_path / "rf.npy")
    assert ref.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert len(set(ref.tolist())) > 2  # the smooth band is exercised
