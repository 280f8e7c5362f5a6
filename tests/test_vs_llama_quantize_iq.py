"""The i-quant, Q2_K_S, MXFP4_MOE and TQ presets (and llama-quantize's aliases), whole
files, byte-identical to the real ``llama_model_quantize``.

Per merge (4 experts fused, and 8 experts legacy with an FFN width that is not a multiple
of 256, so the i-quants fall back to IQ4_NL), the reference is gguf-moe ``convert -t BF16``
followed by llama.cpp's quantizer with the importance weights of an imatrix file in which
one expert saw no token and another only two; the candidate is one ``convert --imatrix``
pass writing every preset.  A preset is compared as soon as ``quant.QTYPES`` holds every
type llama.cpp picks for it on that merge; until then its test is skipped, naming what is
missing.  Tensor names, order, shapes, types, bytes and KVs must agree (llama_model_quantize
adds no ``quantize.imatrix.*`` keys; llama-quantize, the tool, does, and so do we).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import quant
from gguf_moe.cli import main
from gguf_moe.presets import PRESETS, allows_quantization, choose_types, get_preset
from gguf_moe.synth import make_model
from gguf_moe.validate import read_header
from oracle import llama_model_quantize
from test_imatrix import write_gguf_imatrix
from test_vs_llama_quantize import compare, sha256

NEW = [
    "IQ4_XS", "IQ4_NL", "MXFP4_MOE", "Q2_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
    "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
]  # fmt: skip
ALIASES = ["Q3_K", "Q4_K", "Q5_K"]

MODELS = {
    # mergekit's Transformers-5 layout, 4 experts (one repeated)
    "fused4": dict(layout="fused", n_layer=2, n_expert=4, ff=256, duplicate_expert=True, seed=21),
    # legacy per-expert tensors, 8 experts (attn_k/attn_v/attn_output rules), ffn rows of 288
    "legacy8_ff288": dict(layout="legacy", n_layer=1, n_expert=8, ff=288, duplicate_expert=True, seed=22),
}

TOTALS = {"files": 0, "tensors": 0, "bytes": 0}


def run(*args) -> None:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)


def imatrix_for(bf16: Path, path: Path, seed: int) -> dict[str, np.ndarray]:
    """Write a GGUF imatrix for every tensor llama.cpp may quantize except token_embd (as
    llama-imatrix does), expert 1 with no tokens and expert 2 with two; return the weights
    llama-quantize derives from it (sums / count, all ones where count is 0)."""
    rng = np.random.default_rng(seed)
    entries, weights = {}, {}
    for t in read_header(bf16).tensors:
        if t.name == "token_embd.weight" or not allows_quantization(t.name, t.shape):
            continue
        n_mat = t.ne[2] if len(t.ne) == 3 else 1
        sums = rng.gamma(0.8, 2.0, size=(n_mat, t.ne[0])).astype(np.float32)
        counts = rng.integers(500, 4000, size=n_mat).astype(np.float32)
        if n_mat > 2:
            counts[1], counts[2] = 0, 2
            sums[1] = 0
        entries[t.name] = (sums, counts)
        w = np.ones((n_mat, t.ne[0]), np.float32)
        seen = counts > 0
        w[seen] = sums[seen] / counts[seen, None]
        weights[t.name] = w.reshape(-1)
    write_gguf_imatrix(path, entries)
    return weights


def missing(preset: str, bf16: Path) -> list[str]:
    """Types llama.cpp picks for ``preset`` on this model that ``quant`` cannot write yet."""
    h = read_header(bf16)
    hp = {k: h.kv(f"llama.{k}") for k in ("expert_count", "block_count", "attention.head_count", "attention.head_count_kv")}
    types = choose_types(
        preset, [(t.name, t.shape) for t in h.tensors], n_expert=hp["expert_count"] or 0, n_layer=hp["block_count"],
        n_head=hp["attention.head_count"], n_head_kv=hp["attention.head_count_kv"], has_imatrix=True,
        require_writable=False,
    )  # fmt: skip
    return sorted({t.name for t in types.values()} - set(quant.QTYPES))


@pytest.fixture(scope="module", params=list(MODELS))
def merge(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    src = make_model(d / request.param, **MODELS[request.param])
    run("convert", src, "-t", "BF16", "-o", d / "bf16.gguf", "-q")
    bf16 = d / "bf16.gguf"
    weights = imatrix_for(bf16, d / "imatrix.gguf", MODELS[request.param]["seed"])
    ready = [p for p in NEW if not missing(p, bf16)]
    args = ["convert", src, "--outdir", d / "direct", "--imatrix", d / "imatrix.gguf", "-q"]
    for p in ready + ALIASES:
        args += ["-t", p]
    run(*args)  # one pass, every preset that can be written
    return dict(name=request.param, src=src, dir=d, bf16=bf16, imatrix=d / "imatrix.gguf", weights=weights)


def reference(m: dict, preset: str) -> Path:
    ref = m["dir"] / f"ref-{preset}.gguf"
    if not ref.exists():
        llama_model_quantize(m["bf16"], ref, get_preset(preset).file_type, imatrix=m["weights"])
    return ref


def check_identical(ours: Path, ref: Path, label: str) -> None:
    counts = compare(ours, ref, extra_kvs="quantize.imatrix.")
    assert read_header(ours).kv("quantize.imatrix.entries_count") is not None
    for k in ("tensors", "bytes"):
        TOTALS[k] += counts[k]
    TOTALS["files"] += 1
    types = sorted({t.type_name for t in read_header(ref).tensors})
    print(f"\n{label}: {counts['tensors']} tensors, {counts['bytes']:,} data bytes identical ({', '.join(types)}); "
          f"running total {TOTALS['files']} files, {TOTALS['tensors']} tensors, {TOTALS['bytes']:,} bytes")  # fmt: skip


@pytest.mark.parametrize("preset", NEW + ALIASES)
def test_preset_is_byte_identical_to_llama_quantize(merge, preset):
    lacking = missing(preset, merge["bf16"])
    if lacking:
        pytest.skip(f"{preset}: quant has no {', '.join(lacking)} quantizer yet")
    name = get_preset(preset).name
    ours = merge["dir"] / "direct" / f"{merge['name']}-{name}.gguf"
    check_identical(ours, reference(merge, preset), f"{merge['name']} {preset}")
    assert read_header(ours).kv("general.file_type") == PRESETS[name].file_type


@pytest.mark.parametrize("preset", ["IQ4_XS", "Q2_K_S", "IQ2_XS", "IQ3_M", "MXFP4_MOE"])
def test_quantize_command_is_byte_identical(merge, preset, tmp_path):
    """The GGUF -> GGUF pipeline, from the BF16 file, with the same imatrix."""
    lacking = missing(preset, merge["bf16"])
    if lacking:
        pytest.skip(f"{preset}: quant has no {', '.join(lacking)} quantizer yet")
    out = tmp_path / "q.gguf"
    run("quantize", merge["bf16"], out, preset, "--imatrix", merge["imatrix"], "-q")
    check_identical(out, reference(merge, preset), f"{merge['name']} quantize {preset}")
    assert sha256(out) == sha256(merge["dir"] / "direct" / f"{merge['name']}-{preset}.gguf")


def test_the_merges_exercise_the_rules(merge):
    """Guard against a vacuous pass: the MoE and fallback rules are reached."""
    h = read_header(merge["bf16"])
    shapes = [(t.name, t.shape) for t in h.tensors]
    n_expert, n_layer = h.kv("llama.expert_count"), h.kv("llama.block_count")
    types = {
        p: {n: t.name for n, t in choose_types(
            p, shapes, n_expert=n_expert, n_layer=n_layer, has_imatrix=True, require_writable=False
        ).items()}  # fmt: skip
        for p in ("IQ2_XS", "IQ3_XS", "MXFP4_MOE")
    }
    b = "blk.0."
    if merge["name"] == "legacy8_ff288":
        assert types["IQ2_XS"][b + "attn_k.weight"] == "Q4_K"
        assert types["IQ2_XS"][b + "attn_output.weight"] == "Q5_K"
        assert types["IQ2_XS"][b + "ffn_down_exps.weight"] == "IQ4_NL"  # 288 % 256 != 0
        assert types["IQ3_XS"][b + "attn_v.weight"] == "Q8_0"
    else:
        assert types["IQ2_XS"][b + "attn_v.weight"] == "Q4_K"  # n_expert >= 4
        assert types["IQ3_XS"][b + "attn_q.weight"] == "IQ3_XXS"
    assert types["MXFP4_MOE"][b + "ffn_up_exps.weight"] == "MXFP4"
    assert types["MXFP4_MOE"][b + "attn_q.weight"] == "Q8_0"


# --------------------------------------------------------------------------- refusals


def _fails(args, tmp_path) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    r = CliRunner().invoke(main, [str(a) for a in args] + ["-q"])
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not list(out.iterdir())
    return r.stderr


@pytest.mark.parametrize("preset", ["Q2_K_S", "IQ2_XXS", "IQ1_S", "IQ3_XXS", "IQ3_XS", "IQ2_M"])
def test_preset_needing_an_imatrix_is_refused_without_one(merge, preset, tmp_path):
    """llama.cpp refuses these without importance weights; so do convert and quantize
    (exit 1, one line saying to pass --imatrix, no file)."""
    if missing(preset, merge["bf16"]):
        pytest.skip(f"{preset}: quantizers missing")
    rc = llama_model_quantize(merge["bf16"], tmp_path / "ref.gguf", get_preset(preset).file_type, check=False)
    assert rc != 0
    err = _fails(["convert", merge["src"], "-t", preset, "--outdir", tmp_path / "out"], tmp_path)
    assert "--imatrix" in err and preset in err
    err = _fails(["quantize", merge["bf16"], tmp_path / "out" / "q.gguf", preset], tmp_path)
    assert "--imatrix" in err


def test_imatrix_lacking_a_tensor_that_needs_one(merge, tmp_path):
    """An imatrix without an entry for a tensor that needs one: llama.cpp stops, and so do we
    (before writing anything), naming the tensor."""
    if missing("IQ2_XS", merge["bf16"]):
        pytest.skip("IQ2_XS quantizers missing")
    weights = dict(merge["weights"])
    del weights["blk.0.ffn_up_exps.weight"]
    rc = llama_model_quantize(merge["bf16"], tmp_path / "ref.gguf", get_preset("IQ2_XS").file_type, imatrix=weights, check=False)
    assert rc != 0
    ne0 = {t.name: t.ne[0] for t in read_header(merge["bf16"]).tensors}
    entries = {n: (w.reshape(-1, ne0[n]), np.ones(w.size // ne0[n])) for n, w in weights.items()}  # count 1: w itself
    write_gguf_imatrix(tmp_path / "partial.gguf", entries)
    err = _fails(["convert", merge["src"], "-t", "IQ2_XS", "--imatrix", tmp_path / "partial.gguf", "--outdir", tmp_path / "out"], tmp_path)
    assert "blk.0.ffn_up_exps.weight" in err
    err = _fails(["quantize", merge["bf16"], tmp_path / "out" / "q.gguf", "IQ2_XS", "--imatrix", tmp_path / "partial.gguf"], tmp_path)
    assert "blk.0.ffn_up_exps.weight" in err
