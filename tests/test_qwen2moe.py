"""Qwen2-MoE (mergekit-moe's output for Qwen bases) against llama.cpp itself:
``convert -t BF16`` vs ``convert_hf_to_gguf.py --outtype bf16`` (tensors and KVs), and
direct ``-t Q4_K_M`` / ``Q8_0`` vs that BF16 file through the real ``llama_model_quantize``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.presets import PRESETS
from gguf_moe.source import open_model
from gguf_moe.synth import make_model
from oracle import llama_model_quantize, run_hf_converter

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


DIMS = dict(n_layer=2, hidden=256, n_head=4, n_kv=2, n_expert=4, top_k=2, ff=512, ff_exp=320, ff_sh=512)


def make_qwen2moe(out: Path, tok_src: Path, *, layout: str, seed: int = 0) -> Path:
    """A tiny Qwen2MoeForCausalLM checkpoint (bf16, two shards with an index); the
    tokenizer files come from a synthetic byte-level BPE model."""
    d = DIMS
    out.mkdir(parents=True)
    for f in tok_src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json", "mergekit_moe_config.yml"):
            shutil.copy(f, out / f.name)
    vocab = json.loads((tok_src / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    hd = d["hidden"] // d["n_head"]

    def w(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def norm(n):
        return (1 + torch.randn(n, generator=g) * 0.1).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(vocab, d["hidden"]), "model.norm.weight": norm(d["hidden"]),
         "lm_head.weight": w(vocab, d["hidden"])}  # fmt: skip
    for L in range(d["n_layer"]):
        p = f"model.layers.{L}."
        t[p + "input_layernorm.weight"] = norm(d["hidden"])
        t[p + "post_attention_layernorm.weight"] = norm(d["hidden"])
        for n, rows in (("q", d["n_head"] * hd), ("k", d["n_kv"] * hd), ("v", d["n_kv"] * hd)):
            t[p + f"self_attn.{n}_proj.weight"] = w(rows, d["hidden"])
            t[p + f"self_attn.{n}_proj.bias"] = w(rows, scale=0.2)
        t[p + "self_attn.o_proj.weight"] = w(d["hidden"], d["n_head"] * hd)
        t[p + "mlp.gate.weight"] = w(d["n_expert"], d["hidden"])
        t[p + "mlp.shared_expert.gate_proj.weight"] = w(d["ff_sh"], d["hidden"])
        t[p + "mlp.shared_expert.up_proj.weight"] = w(d["ff_sh"], d["hidden"])
        t[p + "mlp.shared_expert.down_proj.weight"] = w(d["hidden"], d["ff_sh"])
        t[p + "mlp.shared_expert_gate.weight"] = w(1, d["hidden"])
        gate = w(d["n_expert"], d["ff_exp"], d["hidden"])
        up = w(d["n_expert"], d["ff_exp"], d["hidden"])
        down = w(d["n_expert"], d["hidden"], d["ff_exp"])
        gate[-1], up[-1], down[-1] = gate[0], up[0], down[0]  # a duplicated expert, as in merges
        if layout == "fused":
            t[p + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
            t[p + "mlp.experts.down_proj"] = down.contiguous()
        else:
            for e in range(d["n_expert"]):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = gate[e].clone()
                t[p + f"mlp.experts.{e}.up_proj.weight"] = up[e].clone()
                t[p + f"mlp.experts.{e}.down_proj.weight"] = down[e].clone()
    from safetensors.torch import save_file

    names = list(t)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: t[k] for k in part}, out / fn)
        wm.update({k: fn for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": d["hidden"], "intermediate_size": d["ff"], "moe_intermediate_size": d["ff_exp"],
        "shared_expert_intermediate_size": d["ff_sh"], "num_experts": d["n_expert"],
        "num_experts_per_tok": d["top_k"], "num_hidden_layers": d["n_layer"],
        "num_attention_heads": d["n_head"], "num_key_value_heads": d["n_kv"], "vocab_size": vocab,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False, "hidden_act": "silu",
        "bos_token_id": None, "eos_token_id": None,
    }  # fmt: skip
    if layout == "fused":
        cfg |= {"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "bfloat16"}
    else:
        cfg |= {"rope_theta": 1000000.0, "torch_dtype": "bfloat16"}
    tok_cfg = json.loads((tok_src / "config.json").read_text())
    cfg["bos_token_id"], cfg["eos_token_id"] = tok_cfg.get("bos_token_id"), tok_cfg.get("eos_token_id")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def run_reference(src: Path, out: Path) -> None:
    """convert_hf_to_gguf.py, told the BPE pre-tokenizer: it recognizes pre-tokenizers by
    hashing the token ids of real tokenizers, and the synthetic one has the Llama 3 split
    ("llama-bpe", what gguf_moe.tokenizer detects) but its own vocabulary."""
    run_hf_converter(src, out, "bf16", pre_tokenizer="llama-bpe")


def llama_quantize(src: Path, dst: Path, preset: str) -> None:
    llama_model_quantize(src, dst, PRESETS[preset].file_type)


def kvs(path: Path) -> list[tuple[str, object]]:
    out = []
    for k, f in gguf.GGUFReader(path).fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        out.append((k, [x for x in v] if isinstance(v, list) else v))
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen")
    tok = make_model(base / "tok", layout="dense", tokenizer="bpe", seed=1, shards=1)
    return {lay: make_qwen2moe(base / lay / "tiny-qwen-moe", tok, layout=lay, seed=3) for lay in ("legacy", "fused")}


@pytest.fixture(scope="module")
def ref_bf16(qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref-BF16.gguf"
    run_reference(qwen["legacy"], out)
    return out


def test_source_layouts_agree(qwen):
    a, b = open_model(qwen["legacy"]), open_model(qwen["fused"])
    assert a.arch == "qwen2moe" and a.layout == "qwen2moe_legacy" and b.layout == "qwen2moe_fused"
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    names = [t.name for t in a.tensors if t.name.startswith("blk.0.")]
    assert names == [
        "blk.0.attn_k.bias", "blk.0.attn_k.weight", "blk.0.attn_norm.weight", "blk.0.attn_output.weight",
        "blk.0.attn_q.bias", "blk.0.attn_q.weight", "blk.0.attn_v.bias", "blk.0.attn_v.weight",
        "blk.0.ffn_down_exps.weight", "blk.0.ffn_down_shexp.weight", "blk.0.ffn_gate_exps.weight",
        "blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_gate_shexp.weight",
        "blk.0.ffn_norm.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_up_shexp.weight",
    ]  # fmt: skip  (llama.cpp's order, reference doc 5.4)
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.read(), y.read()), x.name


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_bf16_equals_convert_hf_to_gguf(qwen, ref_bf16, tmp_path, layout):
    src = tmp_path / "tiny-qwen-moe"
    shutil.copytree(qwen[layout], src)  # same directory name: general.name comes from it
    ours = tmp_path / "ours.gguf"
    r = CliRunner().invoke(main, ["convert", str(src), "-t", "BF16", "-o", str(ours), "-q", "--no-recipe"])
    assert r.exit_code == 0, r.output
    assert kvs(ours) == kvs(ref_bf16)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ref_bf16).tensors}
    assert set(a) == set(b)
    for n, t in b.items():
        assert (a[n].tensor_type, list(a[n].shape)) == (t.tensor_type, list(t.shape)), n
        assert np.asarray(a[n].data).tobytes() == np.asarray(t.data).tobytes(), n


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q8_0", "IQ4_XS", "IQ3_M", "MXFP4_MOE"])
def test_direct_quantization_equals_llama_quantize(qwen, ref_bf16, tmp_path, preset):
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(ref_bf16, theirs, preset)
    src = tmp_path / "tiny-qwen-moe"
    shutil.copytree(qwen["legacy"], src)
    ours = tmp_path / "ours.gguf"
    r = CliRunner().invoke(main, ["convert", str(src), "-t", preset, "-o", str(ours), "-q", "--no-recipe"])
    assert r.exit_code == 0, r.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
    if preset == "Q4_K_M":  # ne0 = 320: llama-quantize's fallback Q4_K -> Q5_0 / Q6_K -> Q8_0
        assert types["blk.0.ffn_down_exps.weight"] in ("Q5_0", "Q8_0")
        assert types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert ours.read_bytes() == theirs.read_bytes()
    # GGUF -> GGUF from llama.cpp's own BF16 file, too
    requant = tmp_path / "requant.gguf"
    r = CliRunner().invoke(main, ["quantize", str(ref_bf16), str(requant), preset, "-q"])
    assert r.exit_code == 0, r.output
    assert requant.read_bytes() == theirs.read_bytes()
