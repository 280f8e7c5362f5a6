"""Routing: every file ``convert`` writes computes the source model in llama.cpp.

For Qwen2-MoE, Qwen3-MoE and DeepSeek-MoE v1 merges (``synth.make_moe``: base + fine-tune
deltas, a duplicated expert, routers from hidden states), top-1 and top-2, with
``norm_topk_prob`` true and false (DeepSeek with and without a shared expert):

* where a faithful llama.cpp file exists, ``convert -t F32`` writes it and llama.cpp's
  logits match transformers fp32 (DeepSeek-MoE v1, which transformers does not ship:
  a reference forward below, itself checked against transformers' Mixtral, which computes
  the same function for a DeepSeek merge without shared expert and renormalised routing);
* where none exists, ``convert`` exits 1 with one line naming ``--allow-routing-mismatch``;
  with the flag it writes llama.cpp's file, records both routings in ``moe.routing.*``, and
  that file's logits are measurably another model's (so the refusal is not needless);
* ``inspect`` and ``validate`` say the file's routing; ``validate --source`` flags a file
  whose routing differs from the source config.

Measured (x86-64, 2 threads; ``pytest -s`` prints each line): see docs/architectures.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import make_moe

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The router sends each token to two of the experts.",
    "def expert(x):\n    return gate(x) * up(x)\n",
    "Привет! 1234 + 5678 = 6912; emoji and tabs\tand  spaces.",
]
MAX_ABS = 5e-4  # the bounds of test_e2e_llama (same models in size, same float32 work)
MEAN_ABS = 2e-5
#: a file computing another routing differs from the source by at least this (mean |diff|)
OTHER_MODEL = 1e-2

# name: (make_moe arguments, faithful file exists)
CASES = {
    "qwen2moe-top2-norm": (dict(arch="qwen2moe", top_k=2, norm_topk_prob=True), False),
    "qwen2moe-top2-raw": (dict(arch="qwen2moe", top_k=2, norm_topk_prob=False, layout="fused"), True),
    "qwen2moe-top1-norm": (dict(arch="qwen2moe", top_k=1, norm_topk_prob=True), False),
    "qwen2moe-top1-raw": (dict(arch="qwen2moe", top_k=1, norm_topk_prob=False), True),
    # tied embeddings: llama.cpp's qwen2moe needs output.weight, written from the embeddings
    "qwen2moe-top2-raw-tied": (dict(arch="qwen2moe", top_k=2, norm_topk_prob=False, tie_embeddings=True), True),
    "qwen3moe-top2-norm": (dict(arch="qwen3moe", top_k=2, norm_topk_prob=True, layout="fused"), True),
    "qwen3moe-top2-raw": (dict(arch="qwen3moe", top_k=2, norm_topk_prob=False), False),
    "qwen3moe-top1-norm": (dict(arch="qwen3moe", top_k=1, norm_topk_prob=True), True),
    "qwen3moe-top1-raw": (dict(arch="qwen3moe", top_k=1, norm_topk_prob=False), False),
    "deepseek-shared-top2-norm": (dict(arch="deepseek", top_k=2, norm_topk_prob=True, n_shared=1), True),
    "deepseek-shared-top2-raw": (dict(arch="deepseek", top_k=2, norm_topk_prob=False, n_shared=2), True),
    "deepseek-shared-top1-norm": (dict(arch="deepseek", top_k=1, norm_topk_prob=True, n_shared=1), True),
    "deepseek-shared-top1-raw": (dict(arch="deepseek", top_k=1, norm_topk_prob=False, n_shared=1), True),
    "deepseek-top2-norm": (dict(arch="deepseek", top_k=2, norm_topk_prob=True, n_shared=None), True),
    "deepseek-top2-raw": (dict(arch="deepseek", top_k=2, norm_topk_prob=False, n_shared=None), False),
    "deepseek-top1-norm": (dict(arch="deepseek", top_k=1, norm_topk_prob=True, n_shared=None), True),
}


# --------------------------------------------------------------------------- reference forward


def _weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(f).items()})
    return out


def deepseek_forward(src: Path, ids: list[int]) -> np.ndarray:
    """DeepSeek-MoE v1 (``modeling_deepseek.py``) in fp32: llama attention (rotate-half
    rotary), softmax router over all experts, top-k, renormalised when ``norm_topk_prob``,
    plus the ungated shared expert."""
    cfg = json.loads((src / "config.json").read_text())
    w = _weights(src)
    n_head, n_kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, eps, k = d // n_head, cfg["rms_norm_eps"], cfg["num_experts_per_tok"]
    T = len(ids)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [h, T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def mlp(x, p):
        return (torch.nn.functional.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[
            p + "down_proj.weight"
        ].T

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, n_head, hd).transpose(0, 1)
        kk = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        q, kk = rope(q), rope(kk)
        rep = n_head // n_kv
        kk, v = kk.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ kk.transpose(1, 2) / hd**0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(T, d) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        probs = torch.softmax(h @ w[p + "mlp.gate.weight"].T, -1)
        topw, topi = probs.topk(k, -1)
        if cfg.get("norm_topk_prob"):
            topw = topw / topw.sum(-1, keepdim=True)
        y = torch.zeros_like(h)
        for e in range(cfg["n_routed_experts"]):
            sel = (topi == e).any(-1)
            if sel.any():
                we = (topw * (topi == e)).sum(-1, keepdim=True)
                y[sel] += we[sel] * mlp(h[sel], p + f"mlp.experts.{e}.")
        if cfg.get("n_shared_experts"):
            y = y + mlp(h, p + "mlp.shared_experts.")
        x = x + y
    x = rms(x, w["model.norm.weight"])
    return (x @ w["lm_head.weight"].T).numpy()


def source_logits(src: Path, ids: list[int], model=None) -> np.ndarray:
    if model is None:
        return deepseek_forward(src, ids)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_reference_forward_is_transformers_mixtral(tmp_path):
    """The DeepSeek reference forward computes what transformers' Mixtral computes for the
    same weights (no shared expert, renormalised top-2)."""
    src = make_moe(tmp_path / "ds", arch="deepseek", n_shared=None, norm_topk_prob=True, top_k=2, seed=7)
    cfg = json.loads((src / "config.json").read_text())
    mc = transformers.MixtralConfig(
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["moe_intermediate_size"], vocab_size=cfg["vocab_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], num_local_experts=cfg["n_routed_experts"],
        num_experts_per_tok=2, rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(mc).eval()
    w = _weights(src)
    sd = {}
    for name, t in w.items():
        if ".mlp.experts." not in name:
            sd[name] = t
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}.mlp."
        E = range(cfg["n_routed_experts"])
        sd[p + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([w[p + f"experts.{e}.gate_proj.weight"], w[p + f"experts.{e}.up_proj.weight"]]) for e in E]
        )
        sd[p + "experts.down_proj"] = torch.stack([w[p + f"experts.{e}.down_proj.weight"] for e in E])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = list(range(3, 40))
    ref = source_logits(src, ids, model)
    ours = deepseek_forward(src, ids)
    assert np.abs(ref - ours).max() < 1e-4


# --------------------------------------------------------------------------- llama.cpp vs source


def _convert(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(src), "-t", "F32", "-o", str(out), "-q", *extra])


def _llama(path: Path):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_computes_the_source(name, tmp_path):
    args, faithful = CASES[name]
    src = make_moe(tmp_path / name, seed=sum(map(ord, name)) % 1000, **args)
    out = tmp_path / f"{name}.gguf"
    r = _convert(src, out)
    if not faithful:
        assert r.exit_code == 1, r.output
        line = r.output.strip()
        assert "\n" not in line and "--allow-routing-mismatch" in line and "norm_topk_prob" in line, line
        assert not out.exists()
        r = _convert(src, out, "--allow-routing-mismatch")
        assert r.exit_code == 0, r.output
        assert "routing differs from the source" in r.output
    else:
        assert r.exit_code == 0, r.output
    import gguf

    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("moe.routing.")}
    assert bool(fields) == (not faithful), fields
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = None
    if args["arch"] != "deepseek":
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    llm = _llama(out)
    try:
        diffs, agree, total = [], 0, 0
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ref = source_logits(src, ids, model)
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)
            diffs.append(np.abs(got - ref).reshape(-1))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
        arch = llm.metadata["general.architecture"]
    finally:
        llm.close()
    d = np.concatenate(diffs)
    print(f"{name}: llama.cpp {arch}, max abs {d.max():.2e}, mean abs {d.mean():.2e}, top-1 {agree}/{total}")
    if faithful:
        assert d.max() < MAX_ABS and d.mean() < MEAN_ABS, (d.max(), d.mean())
        assert agree == total
    else:
        assert d.mean() > OTHER_MODEL, f"{name}: the unfaithful file computes the source after all ({d.mean():.2e})"
