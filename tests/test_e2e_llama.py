"""End to end: tiny merged models -> `gguf-moe convert -t F32` -> llama.cpp, whose logits must
match transformers (fp32, CPU) running the original Hugging Face model.

Both run the same computation in float32 (llama.cpp with an F32 KV cache); what remains is
summation order. Measured on these models (x86-64, 2 threads): max |diff| 6e-5 .. 1.6e-4, mean
4e-6 .. 6e-6, top-1 agreement 100 %. The bounds are about 3x those. A wrong Q/K permutation,
expert order, gate/up split, router or norm makes differences of order 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gguf_moe.synth import make_model

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The router sends each token to two of the experts.",
    "Привет! 1234 + 5678 = 6912; emoji 🦙 and tabs\tand  spaces.",
    "def expert(x):\n    return gate(x) * up(x)\n",
]

# Bounds on |llama.cpp - transformers| over all positions and vocabulary entries.
MAX_ABS = 5e-4
MEAN_ABS = 2e-5

MODELS = {
    # name: make_model arguments
    "fused-4x-top2-dup": dict(layout="fused", n_expert=4, top_k=2, duplicate_expert=True, tokenizer="spm", seed=1),
    "legacy-4x-top2-dup": dict(layout="legacy", n_expert=4, top_k=2, duplicate_expert=True, tokenizer="spm", seed=2),
    "fused-8x-top2-bpe": dict(layout="fused", n_expert=8, top_k=2, duplicate_expert=True, tokenizer="bpe",
                              n_layer=2, hidden=256, ff=256, seed=3),
    "legacy-2x-top1-padded": dict(layout="legacy", n_expert=2, top_k=1, duplicate_expert=False, tokenizer="spm",
                                  vocab_size=1030, dtype="float16", shards=3, seed=4),
    "dense-mistral": dict(layout="dense", tokenizer="spm", seed=5),
}


def convert_f32(src: Path, out: Path) -> Path:
    from click.testing import CliRunner

    from gguf_moe.cli import main

    res = CliRunner().invoke(main, ["convert", str(src), "-t", "F32", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory):
    name = request.param
    args = MODELS[name]
    root = tmp_path_factory.mktemp("e2e")
    src = make_model(root / name, **args)
    gguf_path = convert_f32(src, root / f"{name}.gguf")
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=128,
        n_batch=128,
        n_threads=2,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )
    tok = transformers.AutoTokenizer.from_pretrained(src)
    yield name, args, src, llm, tok
    llm.close()


def test_logits_match_transformers(case):
    name, args, src, llm, tok = case
    diffs, agree, total = [], 0, 0
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        ours = llama_logits(llm, ids)
        assert ours.shape == ref.shape
        d = np.abs(ours - ref)
        diffs.append(d)
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    d = np.concatenate([x.reshape(-1) for x in diffs])
    print(f"{name}: max abs {d.max():.2e}, mean abs {d.mean():.2e}, top-1 {agree}/{total}")
    assert d.max() < MAX_ABS, f"{name}: max abs diff {d.max():.3e}"
    assert d.mean() < MEAN_ABS, f"{name}: mean abs diff {d.mean():.3e}"
    assert agree == total, f"{name}: top-1 agrees on {agree}/{total} positions"


def test_llama_cpp_sees_the_expected_model(case):
    name, args, src, llm, tok = case
    cfg = json.loads((src / "config.json").read_text())
    meta = llm.metadata
    assert meta["general.architecture"] == "llama"
    assert int(meta["llama.block_count"]) == cfg["num_hidden_layers"]
    assert int(meta["llama.embedding_length"]) == cfg["hidden_size"]
    assert int(meta["llama.feed_forward_length"]) == cfg["intermediate_size"]
    assert int(meta["llama.attention.head_count"]) == cfg["num_attention_heads"]
    assert int(meta["llama.attention.head_count_kv"]) == cfg["num_key_value_heads"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert float(meta["llama.rope.freq_base"]) == theta
    assert llm.n_vocab() == cfg["vocab_size"]
    if args["layout"] == "dense":
        assert "llama.expert_count" not in meta
    else:
        assert int(meta["llama.expert_count"]) == cfg["num_local_experts"] == args["n_expert"]
        assert int(meta["llama.expert_used_count"]) == cfg["num_experts_per_tok"] == args["top_k"]
    assert int(meta["general.file_type"]) == 0  # all F32


def test_synth_layouts_are_the_same_model(tmp_path):
    """The generator's fused (Transformers 5) and legacy (per-expert) layouts hold the same
    weights for a seed, as transformers itself loads them; the frankenMoE duplicate is exact
    and named twice in the mergekit recipe; the shard index has no total_size."""
    import yaml

    fused = make_model(tmp_path / "fused", layout="fused", seed=7, n_expert=4)
    legacy = make_model(tmp_path / "legacy", layout="legacy", seed=7, n_expert=4, shards=3)
    a = transformers.AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    gate_up = a["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 2 * 512, 256)
    assert torch.equal(gate_up[3], gate_up[0]) and not torch.equal(gate_up[1], gate_up[0])
    recipe = yaml.safe_load((fused / "mergekit_moe_config.yml").read_text())
    sources = [e["source_model"] for e in recipe["experts"]]
    assert len(sources) == 4 and sources[3] == sources[0] and len(set(sources)) == 3
    index = json.loads((legacy / "model.safetensors.index.json").read_text())
    assert "total_size" not in index["metadata"]
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert json.loads((fused / "config.json").read_text())["rope_parameters"]["rope_theta"] == 1e6
    assert json.loads((legacy / "config.json").read_text())["rope_theta"] == 1e6
