"""The headline check: gguf-moe's direct quantized output is byte-identical to llama.cpp.

For each synthetic merge, the reference pipeline is gguf-moe ``convert -t BF16`` (and
``-t F32``) followed by the real ``llama_model_quantize`` (llama.cpp, through
llama-cpp-python); the candidate is one ``gguf-moe convert`` pass writing every preset
straight from the safetensors.  For every preset: same tensor names in the same order,
same shapes, types and bytes, the same KV list, and finally the same file, byte for byte.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.presets import PRESETS, llama_sort_key
from gguf_moe.synth import make_model
from gguf_moe.validate import read_header
from oracle import llama_model_quantize

QUANTS = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_K_S", "Q5_K_S", "Q3_K_M", "Q2_K", "Q3_K_S", "Q3_K_L", "Q4_1"]

MODELS = {
    # mergekit's Transformers-5 layout, 4 experts (one repeated), 4 layers so the
    # use_more_bits pattern differs between layers.
    "fused4": dict(layout="fused", n_layer=4, n_expert=4, duplicate_expert=True, seed=1),
    # legacy per-expert tensors, 8 experts (the n_expert == 8 rules), and an FFN width that
    # is not a multiple of 256 (ffn_down_exps falls back to Q5_0/Q5_1/Q8_0).
    "legacy8_ff352": dict(layout="legacy", n_layer=2, n_expert=8, ff=352, duplicate_expert=True, seed=2),
}

TOTALS = {"files": 0, "tensors": 0, "bytes": 0, "mismatches": 0}


def llama_quantize(src: Path, dst: Path, preset: str) -> None:
    llama_model_quantize(src, dst, PRESETS[preset].file_type)


def convert(src: Path, outdir: Path, presets) -> dict[str, Path]:
    args = ["convert", str(src), "--outdir", str(outdir)]
    for p in presets:
        args += ["-t", p]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return {p: next(outdir.glob(f"*-{p}.gguf")) for p in presets}


@pytest.fixture(scope="module", params=list(MODELS))
def pipeline(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    src = make_model(d / request.param, **MODELS[request.param])
    floats = convert(src, d / "float", ["BF16", "F32"])
    direct = convert(src, d / "direct", QUANTS)  # one pass, every preset
    ref = {}
    for p in QUANTS:
        ref[p] = d / f"ref-{p}.gguf"
        llama_quantize(floats["BF16"], ref[p], p)
    return request.param, floats, direct, ref


def _kvs(h):
    out = []
    for k, kv in h.kvs.items():
        v = kv.value
        out.append((k, kv.type, v.tolist() if isinstance(v, np.ndarray) else v))
    return out


def compare(ours: Path, theirs: Path, *, extra_kvs: str | None = None) -> dict:
    """Tensor-by-tensor comparison; returns counts (and asserts with a precise message).
    ``extra_kvs``: a key prefix only our file has (left out of the KV comparison)."""
    a, b = read_header(ours), read_header(theirs)
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    assert names_a == names_b, f"tensor order differs: first difference at {next(i for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y)}"
    assert names_b == sorted(names_b, key=llama_sort_key)
    ma = np.memmap(ours, dtype=np.uint8, mode="r")
    mb = np.memmap(theirs, dtype=np.uint8, mode="r")
    mismatches = []
    n_bytes = 0
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.ne == tb.ne, f"{ta.name}: ne {ta.ne} vs llama.cpp {tb.ne}"
        assert ta.type_name == tb.type_name, f"{ta.name}: type {ta.type_name} vs llama.cpp {tb.type_name}"
        assert ta.n_bytes == tb.n_bytes
        xa = ma[a.data_offset + ta.offset : a.data_offset + ta.offset + ta.n_bytes]
        xb = mb[b.data_offset + tb.offset : b.data_offset + tb.offset + tb.n_bytes]
        if not np.array_equal(xa, xb):
            rows = np.flatnonzero((xa.reshape(ta.n_rows, -1) != xb.reshape(tb.n_rows, -1)).any(axis=1))
            mismatches.append(f"{ta.name} ({ta.type_name}): {rows.size} of {ta.n_rows} rows differ, first row {rows[0]}")
        n_bytes += ta.n_bytes
    assert not mismatches, "; ".join(mismatches[:5])
    ka, kb = _kvs(a), _kvs(b)
    if extra_kvs:
        ka = [kv for kv in ka if not kv[0].startswith(extra_kvs)]
    assert [k for k, *_ in ka] == [k for k, *_ in kb], "KV keys or their order differ"
    for x, y in zip(ka, kb):
        assert x == y, f"KV {x[0]}: ours {x[1]} {str(x[2])[:80]} vs llama.cpp {y[1]} {str(y[2])[:80]}"
    return {"tensors": len(a.tensors), "bytes": n_bytes, "mismatches": len(mismatches)}


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("preset", QUANTS)
def test_direct_quantization_is_byte_identical_to_llama_quantize(pipeline, preset):
    name, floats, direct, ref = pipeline
    counts = compare(direct[preset], ref[preset])
    h = read_header(ref[preset])
    assert h.kv("general.file_type") == PRESETS[preset].file_type
    assert list(h.kvs)[-2:] == ["general.quantization_version", "general.file_type"]
    assert sha256(direct[preset]) == sha256(ref[preset]), "tensors and KVs match but the files differ (padding/header)"
    for k in ("tensors", "bytes", "mismatches"):
        TOTALS[k] += counts[k]
    TOTALS["files"] += 1
    print(f"\n{name} {preset}: {counts['tensors']} tensors, {counts['bytes']:,} data bytes identical; "
          f"running total {TOTALS['files']} files, {TOTALS['tensors']} tensors, {TOTALS['bytes']:,} bytes, "
          f"{TOTALS['mismatches']} mismatches")


def test_llama_quantize_from_f32_equals_from_bf16(pipeline, tmp_path):
    """The F32 and BF16 conversions hold the same values, so llama.cpp makes the same file."""
    _, floats, _, ref = pipeline
    out = tmp_path / "from-f32.gguf"
    llama_quantize(floats["F32"], out, "Q4_K_M")
    assert sha256(out) == sha256(ref["Q4_K_M"])


def test_q4_0_with_imatrix_is_byte_identical_to_llama_quantize(tmp_path):
    """Q4_0 with an importance matrix: llama.cpp writes ffn_down of the first n_layer/8
    layers as Q4_1 (with the weights); the direct output must be the same file."""
    from test_imatrix import write_gguf_imatrix

    src = make_model(tmp_path / "im8", layout="fused", n_layer=8, n_expert=4, duplicate_expert=True, seed=3)
    floats = convert(src, tmp_path / "float", ["BF16"])
    bf16 = read_header(floats["BF16"])
    rng = np.random.default_rng(11)
    entries, weights = {}, {}
    for t in bf16.tensors:
        if len(t.ne) < 2 or "norm" in t.name or "ffn_gate_inp" in t.name:
            continue
        n_mat = t.ne[2] if len(t.ne) == 3 else 1
        sums = rng.gamma(0.8, 2.0, size=(n_mat, t.ne[0])).astype(np.float32)
        counts = rng.integers(1, 4000, size=n_mat).astype(np.float32)
        entries[t.name] = (sums, counts)
        weights[t.name] = (sums / counts[:, None]).astype(np.float32)
    im = tmp_path / "imatrix.gguf"
    write_gguf_imatrix(im, entries)
    r = CliRunner().invoke(main, ["convert", str(src), "-t", "Q4_0", "--imatrix", str(im), "-o", str(tmp_path / "direct.gguf"), "-q"])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(floats["BF16"], ref, PRESETS["Q4_0"].file_type, imatrix=weights)
    types = {t.name: t.type_name for t in read_header(ref).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q4_1" and types["blk.1.ffn_down_exps.weight"] == "Q4_0"
    # llama-quantize (the tool) adds quantize.imatrix.* KVs itself; llama_model_quantize does not
    counts = compare(tmp_path / "direct.gguf", ref, extra_kvs="quantize.imatrix.")
    assert read_header(tmp_path / "direct.gguf").kv("quantize.imatrix.entries_count") == len(entries)
    print(f"\nQ4_0 + imatrix: {counts['tensors']} tensors, {counts['bytes']:,} data bytes identical")


def test_q2_k_with_four_query_heads_per_kv_head(tmp_path):
    """Q2_K's attn_v is Q4_K when n_head / n_head_kv >= 4 (else Q3_K): the direct output and
    the ``quantize`` command (which reads the heads from the GGUF) both equal llama.cpp."""
    src = make_model(tmp_path / "gqa4", layout="fused", n_layer=2, n_expert=4, n_head=8, n_kv_head=2, seed=4)
    out = convert(src, tmp_path / "out", ["BF16", "Q2_K"])
    ref = tmp_path / "ref.gguf"
    llama_quantize(out["BF16"], ref, "Q2_K")
    assert {t.name: t.type_name for t in read_header(ref).tensors}["blk.1.attn_v.weight"] == "Q4_K"
    requant = tmp_path / "requant.gguf"
    r = CliRunner().invoke(main, ["quantize", str(out["BF16"]), str(requant), "Q2_K", "-q"])
    assert r.exit_code == 0, r.output
    compare(out["Q2_K"], ref)
    assert sha256(out["Q2_K"]) == sha256(ref) == sha256(requant)


def test_mix_covers_the_interesting_rules(pipeline):
    """Guard against a vacuous pass: the files exercise the MoE/fallback rules they are meant to."""
    name, _, _, ref = pipeline
    types = {t.name: t.type_name for t in read_header(ref["Q4_K_M"]).tensors}
    if name == "legacy8_ff352":
        assert types["blk.0.attn_k.weight"] == "Q8_0" and types["blk.0.attn_output.weight"] == "Q5_K"
        assert types["blk.0.ffn_down_exps.weight"] in ("Q5_0", "Q8_0")  # 352 % 256 != 0
        q2 = {t.name: t.type_name for t in read_header(ref["Q2_K"]).tensors}
        assert q2["blk.0.attn_output.weight"] == "Q5_K" and q2["blk.0.ffn_down_exps.weight"] == "Q4_0"  # Q3_K fallback
        q3l = {t.name: t.type_name for t in read_header(ref["Q3_K_L"]).tensors}
        assert q3l["blk.0.attn_output.weight"] == "Q3_K" and q3l["blk.0.attn_v.weight"] == "Q8_0"
    else:
        downs = {types[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)}
        assert downs == {"Q4_K", "Q6_K"}
        assert types["blk.0.attn_k.weight"] == "Q4_K"
        q3 = {t.name: t.type_name for t in read_header(ref["Q3_K_M"]).tensors}
        assert [q3[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
        assert q3["blk.0.attn_output.weight"] == "Q4_K" and q3["blk.0.attn_q.weight"] == "Q3_K"
        q2 = {t.name: t.type_name for t in read_header(ref["Q2_K"]).tensors}
        assert q2["blk.0.ffn_down_exps.weight"] == "Q3_K" and q2["blk.0.ffn_up_exps.weight"] == "Q2_K"
