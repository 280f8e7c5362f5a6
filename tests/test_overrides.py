"""llama-quantize's per-tensor options on ``convert`` and ``quantize``: ``--tensor-type``,
``--tensor-type-file``, ``--output-tensor-type``, ``--token-embedding-type``, ``--pure``,
``--leave-output-tensor``, each alone and combined.

The reference is the real ``llama_model_quantize`` on gguf-moe's BF16 conversion with the
same ``llama_model_quantize_params`` fields llama-quantize's options set; both pipelines
(direct ``convert`` and GGUF -> GGUF ``quantize``) must write the same file, byte for byte.
``--dry-run`` must show the types the file gets.  Bad overrides: one line, exit 2 (usage)
or 1, no file; a pattern that applies to no tensor is a warning (llama-quantize says nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import quant
from gguf_moe.cli import main
from gguf_moe.presets import get_preset
from gguf_moe.synth import make_model
from gguf_moe.validate import read_header
from oracle import llama_model_quantize
from test_vs_llama_quantize import compare, sha256

MODELS = {
    "fused4": dict(layout="fused", n_layer=2, n_expert=4, duplicate_expert=True, seed=31),
    "legacy8_ff288": dict(layout="legacy", n_layer=1, n_expert=8, ff=288, duplicate_expert=True, seed=32),
}

# name -> (command-line options, llama_model_quantize keywords as llama-quantize sets them)
CASES = {
    "tensor_type": (
        ["--tensor-type", "attn_v=q8_0", "--tensor-type", r"blk\.1\.ffn_down=q6_k", "--tensor-type", "FFN_DOWN=Q5_K"],
        dict(tensor_types=[("attn_v", "q8_0"), (r"blk\.1\.ffn_down", "q6_k"), ("ffn_down", "q5_k")]),  # lower-cased
    ),
    "tensor_type_fallback_and_float": (
        ["--tensor-type", "ffn_down=q4_k", "--tensor-type", "attn_q=bf16", "--tensor-type", "attn_k=iq4_nl"],
        dict(tensor_types=[("ffn_down", "q4_k"), ("attn_q", "bf16"), ("attn_k", "iq4_nl")]),
    ),
    "output_tensor_type": (["--output-tensor-type", "q8_0"], dict(output_tensor_type="q8_0")),
    "token_embedding_type": (["--token-embedding-type", "Q5_K"], dict(token_embedding_type="q5_k")),
    "pure": (["--pure"], dict(pure=True)),
    "leave_output_tensor": (["--leave-output-tensor"], dict(leave_output_tensor=True)),
    "combined": (
        ["--tensor-type", "attn_k=q5_k", "--tensor-type", "output=q4_0", "--output-tensor-type", "q6_k",
         "--token-embedding-type", "q8_0", "--pure", "--leave-output-tensor"],
        dict(tensor_types=[("attn_k", "q5_k"), ("output", "q4_0")], output_tensor_type="q6_k",
             token_embedding_type="q8_0", pure=True, leave_output_tensor=True),
    ),  # fmt: skip
    "pure_with_types": (
        ["--pure", "--output-tensor-type", "q5_0", "--tensor-type", "ffn_gate=q8_0"],
        dict(pure=True, output_tensor_type="q5_0", tensor_types=[("ffn_gate", "q8_0")]),
    ),
}

RUNS = [("fused4", "Q4_K_M", c) for c in CASES] + [
    ("legacy8_ff288", "IQ4_XS", c) for c in ("tensor_type", "tensor_type_fallback_and_float", "pure", "combined")
] + [("legacy8_ff288", "Q2_K", "tensor_type")]  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    r = invoke(*args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    out = {}
    for name, kw in MODELS.items():
        d = tmp_path_factory.mktemp(name)
        src = make_model(d / name, **kw)
        ok("convert", src, "-t", "BF16", "-o", d / "bf16.gguf", "-q")
        out[name] = dict(src=src, bf16=d / "bf16.gguf")
    return out


def usable(preset: str, kw: dict) -> bool:
    names = [t for _, t in kw.get("tensor_types", ())] + [kw.get("output_tensor_type"), kw.get("token_embedding_type")]
    needed = {get_preset(preset).default.name, *(n.upper() for n in names if n)}
    return needed <= set(quant.QTYPES)


@pytest.mark.parametrize("model,preset,case", RUNS)
def test_overrides_are_byte_identical_to_llama_quantize(merges, tmp_path, model, preset, case):
    args, kw = CASES[case]
    if not usable(preset, kw):
        pytest.skip("quantizers missing")
    m = merges[model]
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(m["bf16"], ref, get_preset(preset).file_type, **kw)
    direct = tmp_path / "direct.gguf"
    ok("convert", m["src"], "-t", preset, "-o", direct, "-q", *args)
    counts = compare(direct, ref)
    assert sha256(direct) == sha256(ref)
    requant = tmp_path / "requant.gguf"
    ok("quantize", m["bf16"], requant, preset, "-q", *args)
    assert sha256(requant) == sha256(ref)
    plain = {t.name: t.type_name for t in read_header(ref).tensors}
    print(f"\n{model} {preset} {case}: {counts['tensors']} tensors, {counts['bytes']:,} data bytes identical "
          f"(convert and quantize); types {sorted(set(plain.values()))}")  # fmt: skip


def test_each_case_changes_the_file(merges, tmp_path):
    """Guard against a vacuous pass: every case gives types the plain preset does not."""
    m = merges["fused4"]
    plain = tmp_path / "plain.gguf"
    llama_model_quantize(m["bf16"], plain, get_preset("Q4_K_M").file_type)
    base = {t.name: t.type_name for t in read_header(plain).tensors}
    for case, (_, kw) in CASES.items():
        out = tmp_path / f"{case}.gguf"
        llama_model_quantize(m["bf16"], out, get_preset("Q4_K_M").file_type, **kw)
        types = {t.name: t.type_name for t in read_header(out).tensors}
        assert types != base, case
    types = {t.name: t.type_name for t in read_header(tmp_path / "combined.gguf").tensors}
    assert types["output.weight"] == "BF16" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_k.weight"] == "Q5_K" and types["blk.0.attn_output.weight"] == "Q4_0"
    assert types["blk.1.ffn_down_exps.weight"] == "Q4_K"  # --pure: no Q6_K bump


def _dry_types(output: str) -> dict[str, tuple[str, str]]:
    """{tensor: (type, note)} from a --dry-run listing."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^(\S+\.weight)\s+\{[^}]*\}\s+(\S+)\s+\d+(?:\s+\((.*)\))?$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3) or "")
    return out


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_dry_run_shows_the_overrides(merges, tmp_path, command):
    m = merges["fused4"]
    args, kw = CASES["combined"]
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(m["bf16"], ref, get_preset("Q4_K_M").file_type, **kw)
    if command == "convert":
        r = ok("convert", m["src"], "-t", "Q4_K_M", "--dry-run", *args)
    else:
        r = ok("quantize", m["bf16"], tmp_path / "never.gguf", "Q4_K_M", "--dry-run", *args)
        assert not (tmp_path / "never.gguf").exists()
    shown = _dry_types(r.stdout)
    want = {t.name: t.type_name for t in read_header(ref).tensors}
    assert {n: t for n, (t, _) in shown.items()} == want
    assert shown["output.weight"][1] == "--leave-output-tensor"
    assert shown["token_embd.weight"][1] == "--token-embedding-type"
    assert shown["blk.0.attn_k.weight"][1] == "--tensor-type attn_k=Q5_K"
    assert shown["blk.0.attn_q.weight"][1] == "--pure"


def test_tensor_type_file_equals_repeated_options(merges, tmp_path):
    m = merges["fused4"]
    f = tmp_path / "types.txt"
    f.write_text("attn_v=q8_0\n  blk\\.1\\.ffn_down=q6_k ffn_down=q5_k\n")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ok("quantize", m["bf16"], a, "Q4_K_M", "-q", "--tensor-type-file", f)
    ok("quantize", m["bf16"], b, "Q4_K_M", "-q", *CASES["tensor_type"][0])
    assert sha256(a) == sha256(b)


def test_unused_pattern_is_a_warning(merges, tmp_path):
    """llama-quantize ignores a pattern that matches nothing; we say so (and still write)."""
    m = merges["fused4"]
    out = tmp_path / "q.gguf"
    r = ok("quantize", m["bf16"], out, "Q4_K_M", "-q", "--tensor-type", "attn_norm=q8_0", "--tensor-type", "nothing=q4_0")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "attn_norm=Q8_0" in warnings[0] and "nothing=Q4_0" in warnings[1]
    plain = tmp_path / "plain.gguf"
    ok("quantize", m["bf16"], plain, "Q4_K_M", "-q")
    assert sha256(out) == sha256(plain)
    r = ok("convert", m["src"], "-t", "BF16", "--dry-run", "--tensor-type", "attn_v=q8_0")
    assert "does nothing for BF16" in r.stderr


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["--tensor-type", "attn_v=q9_0"], 2, "invalid ggml type 'q9_0'"),
        (["--tensor-type", "attn_v"], 2, "malformed tensor type"),
        (["--tensor-type", "attn_v=q8_0", "--tensor-type", "attn_v(=q8_0"], 2, "not a valid regular expression"),
        (["--tensor-type", "(?i)attn=q8_0"], 2, "does not accept"),
        (["--output-tensor-type", "q4_7"], 2, "invalid ggml type"),
        (["--token-embedding-type", "i32"], 2, "no I32 quantizer"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_bad_overrides(merges, tmp_path, command, args, code, msg):
    """Exit 2 (usage) with click's message, or 1 with one ``error:`` line; no file."""
    m = merges["legacy8_ff288"]
    out = tmp_path / "out"
    out.mkdir()
    if command == "convert":
        r = invoke("convert", m["src"], "-t", "Q4_K_M", "--outdir", out, "-q", *args)
    else:
        r = invoke("quantize", m["bf16"], out / "q.gguf", "Q4_K_M", "-q", *args)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert msg in r.stderr and "Traceback" not in r.output
    if code == 1:
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not list(out.iterdir())


def test_type_without_fallback_that_does_not_fit(tmp_path):
    """--token-embedding-type / --output-tensor-type get no shape fallback in llama.cpp (it
    aborts when the blocks do not divide the rows): one error line instead, no file."""
    src = make_model(tmp_path / "h320", layout="fused", n_layer=1, n_expert=2, hidden=320, n_head=4, n_kv_head=2, seed=33)
    out = tmp_path / "out"
    out.mkdir()
    for opt in ("--token-embedding-type", "--output-tensor-type"):
        r = invoke("convert", src, "-t", "Q4_K_M", "--outdir", out, "-q", opt, "q4_k")
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
        assert f"{opt} asks for Q4_K" in r.stderr and "320" in r.stderr
    assert not list(out.iterdir())


@pytest.mark.parametrize("option,name", [("--exclude-weights", "ffn_down"), ("--include-weights", "attn_")])
def test_include_exclude_weights(merges, tmp_path, option, name):
    """llama-quantize drops (keeps) the imatrix entries whose name contains NAME before
    quantizing; the file equals llama_model_quantize with that subset of the weights."""
    from test_vs_llama_quantize_iq import imatrix_for

    m = merges["fused4"]
    im = tmp_path / "imatrix.gguf"
    weights = imatrix_for(m["bf16"], im, seed=7)
    keep = {n: w for n, w in weights.items() if (name in n) == (option == "--include-weights")}
    assert 0 < len(keep) < len(weights)
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(m["bf16"], ref, get_preset("IQ4_XS").file_type, imatrix=keep)
    out = tmp_path / "q.gguf"
    ok("quantize", m["bf16"], out, "IQ4_XS", "-q", "--imatrix", im, option, name)
    compare(out, ref, extra_kvs="quantize.imatrix.")
    assert read_header(out).kv("quantize.imatrix.entries_count") == len(keep)
    full = tmp_path / "full.gguf"
    ok("quantize", m["bf16"], full, "IQ4_XS", "-q", "--imatrix", im)
    assert sha256(full) != sha256(out)
    r = invoke("quantize", m["bf16"], tmp_path / "x.gguf", "IQ4_XS", "--imatrix", im, "--include-weights", "a",
               "--exclude-weights", "b")  # fmt: skip
    assert r.exit_code == 2 and "cannot be used together" in r.output


@pytest.mark.parametrize("first,then", [("Q8_0", "Q4_K_M"), ("Q4_K_M", "Q3_K_S"), ("IQ4_XS", "Q2_K")])
def test_allow_requantize(merges, tmp_path, first, then):
    """--allow-requantize: already quantized tensors are dequantized and quantized again, as
    llama_model_quantize does with allow_requantize (without it: one error line)."""
    if not usable(first, {}) or not usable(then, {}):
        pytest.skip("quantizers missing")
    m = merges["fused4"]
    q = tmp_path / "first.gguf"
    ok("quantize", m["bf16"], q, first, "-q")
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(q, ref, get_preset(then).file_type, allow_requantize=True)
    out = tmp_path / "out.gguf"
    r = invoke("quantize", q, out, then, "-q")
    assert r.exit_code == 1 and "--allow-requantize" in r.stderr and not out.exists()
    ok("quantize", q, out, then, "-q", "--allow-requantize")
    compare(out, ref)
    assert sha256(out) == sha256(ref)


def test_override_kv(merges, tmp_path):
    """--override-kv: each key removed and set again after general.file_type (int as u32,
    float as f32), before the imatrix keys; an overridden expert count changes the type
    rules, as llama.cpp's loader reads hparams through the overrides."""
    m = merges["fused4"]
    kvs = [("general.name", "str", "Renamed MoE"), ("llama.expert_count", "int", 8), ("x.scale", "float", 0.1),
           ("x.flag", "bool", True), ("general.file_type", "int", 99)]  # fmt: skip
    args = [a for k, kind, v in kvs for a in ("--override-kv", f"{k}={kind}:{str(v).lower() if kind == 'bool' else v}")]
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(m["bf16"], ref, get_preset("Q4_K_M").file_type, kv_overrides=kvs)
    h = read_header(ref)
    assert list(h.kvs)[-5:] == [k for k, *_ in kvs] and h.kv("general.file_type") == 99
    assert {t.name: t.type_name for t in h.tensors}["blk.0.attn_k.weight"] == "Q8_0"  # the 8-expert rule
    for command in ("convert", "quantize"):
        out = tmp_path / f"{command}.gguf"
        if command == "convert":
            ok("convert", m["src"], "-t", "Q4_K_M", "-o", out, "-q", *args)
        else:
            ok("quantize", m["bf16"], out, "Q4_K_M", "-q", *args)
        compare(out, ref)
        assert sha256(out) == sha256(ref), command
    for bad in ("general.name", "x=long:3", "x=bool:yes", "x=str:" + "a" * 128):
        r = invoke("quantize", m["bf16"], tmp_path / "bad.gguf", "Q4_K_M", "--override-kv", bad)
        assert r.exit_code == 2 and "KV override" in r.output and not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("preset,prune,with_imatrix", [("Q4_K_M", [1], False), ("Q4_K_M", [0, 3], False),
                                                       ("IQ4_XS", [2], True)])  # fmt: skip
def test_prune_layers(tmp_path_factory, tmp_path, preset, prune, with_imatrix):
    """quantize --prune-layers: the layers left out, the others renumbered, block_count set
    last; types follow the new names with the old layer count; the imatrix is looked up
    under the old names.  Byte-identical to llama_model_quantize with prune_layers."""
    from test_vs_llama_quantize_iq import imatrix_for

    d = tmp_path_factory.getbasetemp() / "prune4"
    if not (d / "bf16.gguf").exists():
        src = make_model(d / "m", layout="fused", n_layer=4, n_expert=4, ff=256, seed=34)
        ok("convert", src, "-t", "BF16", "-o", d / "bf16.gguf", "-q")
    bf16 = d / "bf16.gguf"
    args, weights = [], None
    if with_imatrix:
        weights = imatrix_for(bf16, tmp_path / "im.gguf", seed=9)
        args = ["--imatrix", tmp_path / "im.gguf"]
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(bf16, ref, get_preset(preset).file_type, prune_layers=prune, imatrix=weights)
    h = read_header(ref)
    assert h.kv("llama.block_count") == 4 - len(prune) and list(h.kvs)[-1] == "llama.block_count"
    out = tmp_path / "out.gguf"
    ok("quantize", bf16, out, preset, "-q", "--prune-layers", ",".join(map(str, prune)), *args)
    compare(out, ref, extra_kvs="quantize.imatrix.")
    if not with_imatrix:
        assert sha256(out) == sha256(ref)
    r = invoke("quantize", bf16, tmp_path / "x.gguf", preset, "--prune-layers", "1,-2")
    assert r.exit_code == 2 and "invalid layer id" in r.output
