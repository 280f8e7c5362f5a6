"""``gguf-moe imatrix`` and ``eval`` on Qwen3-MoE (both expert layouts) and DeepSeek-MoE v1
(with and without shared expert, renormalised or not), against the real ``llama-imatrix``
and ``llama-perplexity`` on the files ``convert`` writes for them (``qwen3moe``;
``granitemoe``, ``deepseek`` or ``llama`` for DeepSeek, by routing), and the forward pass
against transformers (Qwen3-MoE) or the DeepSeek reference forward of ``test_routing``
(itself checked against transformers' Mixtral).

Tolerances are those of ``test_imatrix_cmd`` / ``test_eval_cmd`` (same float32 arithmetic on
both sides, differing in summation order; see there why they are honest).  Every merge has an
expert no token can reach (``kill_expert``).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from gguf_moe.synth import make_moe
from llamaref import assert_eval_close, assert_imatrix_matches, llama_ppl, read_imatrix, run_llama_imatrix
from test_imatrix_cmd import CHUNKS, CTX, MAX_COUNT_DIFF, RTOL, kill_expert, llama_bin, run_cli, runner_logits, text_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODELS = {
    # name: (make_moe arguments, unreachable expert, llama.cpp architecture of the file)
    "qwen3-fused": (dict(arch="qwen3moe", layout="fused", norm_topk_prob=True, seed=11), 2, "qwen3moe"),
    "qwen3-legacy": (dict(arch="qwen3moe", layout="legacy", norm_topk_prob=True, seed=11), 2, "qwen3moe"),
    "deepseek-shared-norm": (dict(arch="deepseek", n_shared=2, norm_topk_prob=True, seed=12), 1, "granitemoe"),
    "deepseek-shared-raw": (dict(arch="deepseek", n_shared=2, norm_topk_prob=False, seed=12), 1, "deepseek"),
    "deepseek-noshared": (dict(arch="deepseek", n_shared=None, norm_topk_prob=True, seed=13), 3, "llama"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(name: str):
        if name not in cache:
            args, dead, arch = MODELS[name]
            root = tmp_path_factory.mktemp(name)
            src = make_moe(root / "tiny-moe", hidden=128, ff=256, **args)
            kill_expert(src, dead)
            f32 = root / "f32.gguf"
            code, _, err = run_cli("convert", src, "-t", "F32", "-o", f32, "-q")
            assert code == 0, err
            assert gguf.GGUFReader(f32).fields["general.architecture"].contents() == arch
            cache[name] = (src, f32, text_file(root))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_matches_reference(built, name):
    """Logits of the layer-by-layer forward (GGUF layout) against transformers' Qwen3-MoE or
    the DeepSeek-MoE v1 reference: measured max |diff| below 1e-4 on logits up to 80."""
    src, _, _ = built(name)
    chunks, ours = runner_logits(src)
    if name.startswith("qwen3"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor(chunks)).logits.numpy()
    else:
        from test_routing import deepseek_forward

        ref = np.stack([deepseek_forward(src, [int(i) for i in c]) for c in chunks])
    d = np.abs(ours - ref)
    assert d.max() < 1e-3, f"{name}: max |diff| {d.max():.2e}"
    assert d.mean() < 2e-5, f"{name}: mean |diff| {d.mean():.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("name", ["qwen3-fused", "qwen3-legacy", "deepseek-shared-norm", "deepseek-shared-raw", "deepseek-noshared"])
def test_imatrix_matches_llama_imatrix(built, name, tmp_path):
    tool = llama_bin("llama-imatrix")
    if tool is None:
        pytest.skip("llama-imatrix not built (scripts/setup.sh --dev)")
    src, f32, text = built(name)
    dead = MODELS[name][1]
    ref = tmp_path / "ref.gguf"
    run_llama_imatrix(tool, f32, text, ref, CTX, CHUNKS)
    ours = tmp_path / "ours.gguf"
    code, out, err = run_cli("imatrix", src, "-f", text, "-o", ours, "--ctx", CTX, "--chunks", CHUNKS, "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)

    t_ref, t_ours, names_ref, worst = assert_imatrix_matches(ref, ours, CTX * CHUNKS, RTOL, MAX_COUNT_DIFF)
    shexp = any("_shexp." in n for n in names_ref)  # the shared-expert tensors are there too
    assert shexp == (MODELS[name][0].get("n_shared") is not None and MODELS[name][0]["arch"] == "deepseek")
    print(f"{name}: max rel in_sum2 {worst:.2e}")
    for L in range(len(report["expert_tokens"])):
        c_ref = t_ref[f"blk.{L}.ffn_gate_exps.weight.counts"].reshape(-1)
        assert c_ref[dead] == 0 and report["expert_tokens"][L][dead] == 0
    assert {"layer": 0, "expert": dead} in report["unrouted"]
    print(f"{name}: unrouted {[(u['layer'], u['expert']) for u in report['unrouted']]}")


EVAL_TYPES = ("Q8_0", "Q4_K_M", "Q2_K")


@pytest.mark.parametrize("name", ["qwen3-fused", "deepseek-shared-norm"])
def test_eval_matches_llama_perplexity(name, tmp_path):
    """Bounds as ``test_eval_cmd``: perplexity within 0.5 %, mean KLD within 10 %, p99 KLD
    within 20 %, top-1 within 1.5 points, same ranking; the source's own perplexity equal to
    llama.cpp's on the F32 file."""
    from test_eval_cmd import CHUNKS as E_CHUNKS
    from test_eval_cmd import CTX as E_CTX
    from test_eval_cmd import llama_kld, tame_logits

    tool = llama_bin("llama-perplexity")
    if tool is None:
        pytest.skip("llama-perplexity not built (scripts/setup.sh --dev)")
    args, dead, _ = MODELS[name]
    src = make_moe(tmp_path / "tiny-moe", hidden=128, ff=256, **args)
    kill_expert(src, dead)
    tame_logits(src)  # synthetic logits are far wider than a trained model's (see test_eval_cmd)
    text = text_file(tmp_path)
    f32 = tmp_path / "f32.gguf"
    assert run_cli("convert", src, "-t", "F32", "-o", f32, "-q")[0] == 0
    code, _, err = run_cli("convert", src, *[a for t in EVAL_TYPES for a in ("-t", t)], "--outdir", tmp_path / "q", "-q")
    assert code == 0, err
    files = sorted((tmp_path / "q").glob("*.gguf"), key=lambda p: EVAL_TYPES.index(p.stem.split("-")[-1]))
    assert len(files) == len(EVAL_TYPES)
    ref = llama_kld(tool, f32, files, text, tmp_path)
    code, out, err = run_cli("eval", src, *files, "-f", text, "--ctx", E_CTX, "--chunks", E_CHUNKS, "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["tokens"] == E_CHUNKS * (E_CTX - 1 - E_CTX // 2)
    assert_eval_close(name, res, files, ref)
    ppl, _ = llama_ppl(tool, f32, text, E_CTX, E_CHUNKS)
    assert ppl is not None and abs(res["source"]["ppl"] / ppl - 1) < 1e-4
    print(f"{name}: source ppl {res['source']['ppl']:.4f}, llama.cpp {ppl:.4f}")


def test_eval_runs_a_mismatched_file_as_llama_cpp_does(tmp_path):
    """A DeepSeek merge without shared expert and with ``norm_topk_prob: false`` written as
    ``llama`` on request (``--allow-routing-mismatch``): llama.cpp renormalises its top-2
    weights, so eval scores that file with renormalised routing (its perplexity equals
    llama-perplexity's on it) and the source without (another perplexity)."""
    tool = llama_bin("llama-perplexity")
    if tool is None:
        pytest.skip("llama-perplexity not built (scripts/setup.sh --dev)")
    src = make_moe(tmp_path / "tiny-moe", arch="deepseek", n_shared=None, norm_topk_prob=False, hidden=128, ff=256, seed=13)
    from test_eval_cmd import tame_logits

    tame_logits(src)
    text = text_file(tmp_path)
    f32 = tmp_path / "f32.gguf"
    code, _, err = run_cli("convert", src, "-t", "F32", "-o", f32, "-q", "--allow-routing-mismatch")
    assert code == 0, err
    code, out, err = run_cli("eval", src, f32, "-f", text, "--ctx", 128, "--chunks", 4, "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    ppl, log = llama_ppl(tool, f32, text, 128, 4)
    assert ppl is not None, log[-2000:]
    f = res["files"][0]
    print(f"mismatched llama file: eval ppl {f['ppl']:.4f}, llama.cpp {ppl:.4f}, source {res['source']['ppl']:.4f}, "
          f"KLD {f['kld_mean']:.2e}, top-1 {f['top1']:.3f}")  # fmt: skip
    assert abs(f["ppl"] / ppl - 1) < 1e-4
    assert abs(res["source"]["ppl"] / ppl - 1) > 1e-3 and f["kld_mean"] > 1e-4


def test_process_output_with_tied_embeddings(tmp_path):
    """A Qwen3-MoE merge with tied embeddings has no output.weight in its file: llama.cpp
    multiplies by token_embd, which llama-imatrix does not collect even with
    ``--process-output``; gguf-moe writes the same entries."""
    tool = llama_bin("llama-imatrix")
    if tool is None:
        pytest.skip("llama-imatrix not built (scripts/setup.sh --dev)")
    src = make_moe(tmp_path / "tiny-moe", arch="qwen3moe", hidden=128, ff=256, tie_embeddings=True, seed=3)
    text = text_file(tmp_path)
    f32 = tmp_path / "f32.gguf"
    assert run_cli("convert", src, "-t", "F32", "-o", f32, "-q")[0] == 0
    assert "output.weight" not in [t.name for t in gguf.GGUFReader(f32).tensors]
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    run_llama_imatrix(tool, f32, text, ref, 64, 2, "--process-output")
    code, _, err = run_cli("imatrix", src, "-f", text, "-o", ours, "--ctx", 64, "--chunks", 2, "--device", "cpu", "--process-output")
    assert code == 0, err
    names = read_imatrix(ours)[2]
    assert names == read_imatrix(ref)[2] and not any(n.startswith("output") for n in names)
