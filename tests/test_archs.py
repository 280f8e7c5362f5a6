"""Qwen3-MoE (both expert layouts) and DeepSeek-MoE v1 (with and without shared expert)
merges against llama.cpp itself:

* ``convert -t BF16`` vs ``convert_hf_to_gguf.py --outtype bf16``, tensor for tensor and key
  for key (the packed Qwen3 layout against the converter's output for the per-expert one,
  besides its own; a DeepSeek merge with renormalised routing, which we write as
  ``granitemoe``, tensor for tensor; without shared expert the converter crashes, so our
  ``llama`` file is compared with the Mixtral-layout conversion of the same weights);
* direct ``-t PRESET`` vs that BF16 file through the real ``llama_model_quantize`` (with an
  imatrix for the presets that need one); ``GGUF_MOE_ARCH_ALL_PRESETS=1`` runs every
  quantized preset (about 3 minutes; measured: 21 presets x 4 merges without imatrix and
  10 x 3 with one, all byte-identical);
* ``validate --deep`` passes on every file and flags the planted defects;
* ``inspect``/``validate`` say the routing, ``validate --source`` flags a routing mismatch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.presets import PRESETS
from gguf_moe.synth import make_moe
from oracle import llama_model_quantize, run_hf_converter

pytest.importorskip("torch")

MODELS = {
    "qwen3-legacy": dict(arch="qwen3moe", layout="legacy", norm_topk_prob=True, seed=11),
    "qwen3-fused": dict(arch="qwen3moe", layout="fused", norm_topk_prob=True, seed=11),
    "deepseek-shared": dict(arch="deepseek", n_shared=2, norm_topk_prob=False, seed=12),
    "deepseek-shared-norm": dict(arch="deepseek", n_shared=2, norm_topk_prob=True, seed=12),
    "deepseek-noshared": dict(arch="deepseek", n_shared=None, norm_topk_prob=True, seed=13),
    "qwen2-fused": dict(arch="qwen2moe", layout="fused", norm_topk_prob=False, seed=14),
}


def kvs(path: Path) -> list[tuple[str, object]]:
    out = []
    for k, f in gguf.GGUFReader(path).fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        out.append((k, list(v) if isinstance(v, list) else v))
    return out


def tensors(path: Path) -> dict[str, tuple]:
    return {t.name: (t.tensor_type, list(t.shape), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def convert(src: Path, out: Path, *args: str) -> Path:
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "-q", "--no-recipe", *args])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {name: make_moe(root / name / "tiny-moe", **args) for name, args in MODELS.items()}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """llama.cpp's BF16 conversions, one directory name (general.name) for all."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for name in ("qwen3-legacy", "deepseek-shared", "deepseek-shared-norm"):
        out[name] = root / f"{name}.gguf"
        run_hf_converter(models[name], out[name], "bf16", pre_tokenizer="llama-bpe")
    return out


@pytest.mark.parametrize("name", ["qwen3-legacy", "qwen3-fused", "deepseek-shared"])
def test_bf16_equals_convert_hf_to_gguf(models, reference, tmp_path, name):
    ref = reference["deepseek-shared" if name.startswith("deepseek") else "qwen3-legacy"]
    ours = convert(models[name], tmp_path / "ours.gguf", "-t", "BF16")
    assert kvs(ours) == kvs(ref)
    assert tensors(ours) == tensors(ref)


def test_deepseek_renormalised_is_granitemoe_with_the_converters_tensors(models, reference, tmp_path):
    ours = convert(models["deepseek-shared-norm"], tmp_path / "ours.gguf", "-t", "BF16")
    k = dict(kvs(ours))
    assert k["general.architecture"] == "granitemoe" and k["granitemoe.logit_scale"] == 1.0
    assert k["granitemoe.feed_forward_length"] == k["granitemoe.expert_shared_feed_forward_length"] // 2
    assert tensors(ours) == tensors(reference["deepseek-shared-norm"])


def test_deepseek_without_shared_expert_is_a_mixtral(models, tmp_path):
    """No converter output to compare with (it crashes on n_shared_experts: null): the same
    weights in a Mixtral checkpoint, converted by convert_hf_to_gguf.py, give our file's
    tensors."""
    src = models["deepseek-noshared"]
    mix = tmp_path / "tiny-moe"
    mix.mkdir()
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".json") or f.name.startswith("tokenizer"):
            shutil.copy(f, mix / f.name)
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    w = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(f).items():
            w[k.replace(".mlp.experts.", ".block_sparse_moe.experts.").replace(".mlp.gate.", ".block_sparse_moe.gate.")
              .replace("gate_proj", "w1").replace("down_proj", "w2").replace("up_proj", "w3")] = v.contiguous()  # fmt: skip
    save_file(w, mix / "model.safetensors")
    mcfg = {k: cfg[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                                "num_experts_per_tok", "rms_norm_eps", "rope_theta", "vocab_size", "bos_token_id",
                                "eos_token_id", "max_position_embeddings", "tie_word_embeddings")}  # fmt: skip
    mcfg |= {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": cfg["n_routed_experts"],
             "intermediate_size": cfg["moe_intermediate_size"], "torch_dtype": "bfloat16"}  # fmt: skip
    (mix / "config.json").write_text(json.dumps(mcfg))
    ref = tmp_path / "ref.gguf"
    run_hf_converter(mix, ref, "bf16", pre_tokenizer="llama-bpe")
    ours = convert(src, tmp_path / "ours.gguf", "-t", "BF16")
    assert dict(kvs(ours))["general.architecture"] == "llama"
    assert tensors(ours) == tensors(ref)


def test_unfaithful_qwen3_on_request_is_the_converters_file_plus_the_record(models, reference, tmp_path):
    src = tmp_path / "tiny-moe"
    shutil.copytree(models["qwen3-legacy"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"norm_topk_prob": False}))
    r = CliRunner().invoke(main, ["convert", str(src), "-t", "BF16", "-o", str(tmp_path / "x.gguf"), "-q"])
    assert r.exit_code == 1 and "--allow-routing-mismatch" in r.output
    ours = convert(src, tmp_path / "ours.gguf", "-t", "BF16", "--allow-routing-mismatch")
    k = kvs(ours)
    rec = [kv for kv in k if kv[0].startswith("moe.routing.")]
    assert rec == [("moe.routing.file", "softmax top-2, renormalised"), ("moe.routing.source", "softmax top-2, not renormalised")]
    assert [kv for kv in k if not kv[0].startswith("moe.routing.")] == kvs(reference["qwen3-legacy"])
    code, rep = _validate(str(ours))
    warn = [f for f in rep[0]["findings"] if f["check"] == "routing"]
    assert code == 0 and warn and warn[0]["severity"] == "warning" and "not renormalised" in warn[0]["message"]


PRESETS_TESTED = ["Q4_K_M", "Q8_0", "IQ4_XS", "Q2_K", "MXFP4_MOE"]
if os.environ.get("GGUF_MOE_ARCH_ALL_PRESETS"):  # every quantized preset (a few minutes)
    PRESETS_TESTED = [n for n, p in PRESETS.items() if not p.is_float]


@pytest.mark.parametrize("name", ["qwen3-fused", "deepseek-shared", "deepseek-shared-norm", "deepseek-noshared"])
@pytest.mark.parametrize("preset", PRESETS_TESTED)
def test_direct_quantization_equals_llama_quantize(models, tmp_path, name, preset):
    bf16 = convert(models[name], tmp_path / "bf16.gguf", "-t", "BF16")
    r = CliRunner().invoke(main, ["convert", str(models[name]), "-o", str(tmp_path / "ours.gguf"), "-q", "--no-recipe",
                                 "-t", preset])  # fmt: skip
    if r.exit_code == 1 and "needs an importance matrix" in r.output:
        pytest.skip(f"{preset} needs an imatrix (llama-quantize refuses it too)")
    assert r.exit_code == 0, r.output
    theirs = tmp_path / "theirs.gguf"
    llama_model_quantize(bf16, theirs, PRESETS[preset].file_type)
    assert (tmp_path / "ours.gguf").read_bytes() == theirs.read_bytes()


# --------------------------------------------------------------------------- validate / inspect


def _validate(*args: str):
    r = CliRunner().invoke(main, ["validate", "--json", *args])
    return r.exit_code, json.loads(r.output)["files"]


@pytest.mark.parametrize("name", list(MODELS))
def test_validate_deep_passes_and_says_the_routing(models, tmp_path, name):
    out = convert(models[name], tmp_path / "q.gguf", "-t", "Q4_K_M")
    code, rep = _validate("--deep", "--source", str(models[name]), str(out))
    errors = [f for f in rep[0]["findings"] if f["severity"] == "error"]
    assert code == 0 and not errors, errors
    want = {"deepseek-shared": "softmax top-2, not renormalised, ungated shared expert",
            "deepseek-shared-norm": "softmax top-2, renormalised, ungated shared expert",
            "qwen2-fused": "softmax top-2, not renormalised, sigmoid-gated shared expert"}  # fmt: skip
    assert rep[0]["summary"]["routing"] == want.get(name, "softmax top-2, renormalised")
    r = CliRunner().invoke(main, ["inspect", "--json", str(out)])
    assert json.loads(r.output)["routing"] == rep[0]["summary"]["routing"]


def test_validate_source_flags_a_routing_mismatch(models, tmp_path):
    """A qwen3moe file (renormalises) checked against a source that does not."""
    out = convert(models["qwen3-legacy"], tmp_path / "f.gguf", "-t", "Q8_0")
    src = tmp_path / "tiny-moe"
    shutil.copytree(models["qwen3-legacy"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"norm_topk_prob": False}))
    code, rep = _validate("--source", str(src), str(out))
    bad = [f for f in rep[0]["findings"] if f["check"] == "routing"]
    assert code == 1 and bad and bad[0]["severity"] == "error", rep[0]["findings"]
    assert "not renormalised" in bad[0]["message"]


def _patch(path: Path, fn) -> None:
    """Rewrite one tensor's data in place through gguf-py's memory map."""
    r = gguf.GGUFReader(path, "r+")
    fn({t.name: t for t in r.tensors})
    r.data.flush()


@pytest.mark.parametrize("name", ["qwen3-fused", "deepseek-shared", "qwen2-fused"])
def test_validate_flags_planted_defects(models, tmp_path, name):
    f32 = convert(models[name], tmp_path / "f.gguf", "-t", "F32")
    # NaN router
    nan = tmp_path / "nan.gguf"
    shutil.copy(f32, nan)
    _patch(nan, lambda t: t["blk.1.ffn_gate_inp.weight"].data.__setitem__((0, 3), np.nan))
    code, rep = _validate(str(nan))
    assert code == 1 and any(f["tensor"] == "blk.1.ffn_gate_inp.weight" for f in rep[0]["findings"] if f["severity"] == "error")
    # swapped experts: the file no longer matches the source
    sw = tmp_path / "swap.gguf"
    shutil.copy(f32, sw)

    def swap(t):
        d = t["blk.0.ffn_up_exps.weight"].data
        a = d[1].copy()
        d[1] = d[2]
        d[2] = a

    _patch(sw, swap)
    code, rep = _validate("--source", str(models[name]), str(sw))
    assert code == 1 and any(f["tensor"] == "blk.0.ffn_up_exps.weight" for f in rep[0]["findings"] if f["severity"] == "error")
    # wrong expert count
    arch = dict(kvs(f32))["general.architecture"]
    bad = tmp_path / "count.gguf"
    r = CliRunner().invoke(main, ["quantize", str(f32), str(bad), "Q8_0", "-q", "--override-kv", f"{arch}.expert_count=int:3"])
    assert r.exit_code == 0, r.output
    code, rep = _validate(str(bad))
    assert code == 1 and any(f["check"] == "moe" for f in rep[0]["findings"] if f["severity"] == "error"), rep[0]["findings"]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
        ({"n_shared_experts": None}, "n_shared_experts is None; set it"),
        ({"first_k_dense_replace": 1}, "first_k_dense_replace is 1"),
        ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ],
)
def test_deepseek_configs_llama_cpp_would_misread_are_refused(models, tmp_path, change, words):
    src = tmp_path / "tiny-moe"
    shutil.copytree(models["deepseek-shared"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | change))
    r = CliRunner().invoke(main, ["convert", str(src), "-t", "BF16", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and words in r.output and r.output.count("\n") == 1, r.output


IMATRIX_PRESETS = ["IQ2_XS"]
if os.environ.get("GGUF_MOE_ARCH_ALL_PRESETS"):
    IMATRIX_PRESETS = ["Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_M"]


@pytest.mark.parametrize("name", ["qwen3-fused", "deepseek-shared", "deepseek-shared-norm"])
@pytest.mark.parametrize("preset", IMATRIX_PRESETS)
def test_imatrix_presets_equal_llama_quantize(models, tmp_path, name, preset):
    """The presets that need importance weights, with an imatrix in which one expert saw no
    token and another two (``test_vs_llama_quantize_iq.imatrix_for``)."""
    from test_vs_llama_quantize_iq import imatrix_for

    bf16 = convert(models[name], tmp_path / "bf16.gguf", "-t", "BF16")
    weights = imatrix_for(bf16, tmp_path / "imatrix.gguf", 5)
    ours = convert(models[name], tmp_path / "ours.gguf", "-t", preset, "--imatrix", str(tmp_path / "imatrix.gguf"))
    theirs = tmp_path / "theirs.gguf"
    llama_model_quantize(bf16, theirs, PRESETS[preset].file_type, imatrix=weights)
    assert [kv for kv in kvs(ours) if not kv[0].startswith("quantize.imatrix.")] == kvs(theirs)
    assert tensors(ours) == tensors(theirs)


def test_all_experts_used_keeps_llama_cpps_architecture(tmp_path):
    """With every expert used the top-k weights sum to 1, renormalised or not: a DeepSeek
    merge with shared expert stays ``deepseek`` and its routing is the source's."""
    src = make_moe(tmp_path / "tiny-moe", arch="deepseek", n_expert=4, top_k=4, norm_topk_prob=True, n_shared=1, seed=15)
    out = convert(src, tmp_path / "f.gguf", "-t", "Q8_0")
    code, rep = _validate("--source", str(src), str(out))
    assert code == 0, [f for f in rep[0]["findings"] if f["severity"] == "error"]
    assert rep[0]["summary"]["arch"] == "deepseek"
    assert rep[0]["summary"]["routing"] == "softmax over all 4 experts, ungated shared expert"
