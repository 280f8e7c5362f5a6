"""Reading imatrix files (GGUF and legacy .dat) and normalizing as llama-quantize does."""

import struct

import gguf
import numpy as np
import pytest

from gguf_moe.errors import CorruptFile, LayoutMismatch
from gguf_moe.imatrix import load_imatrix


def write_gguf_imatrix(path, entries, *, datasets=("calib.txt",), chunk_count=7, chunk_size=512, metadata=True):
    """entries: name -> (in_sum2 [n_mat, ne0], counts [n_mat])"""
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    if metadata:
        w.add_array("imatrix.datasets", list(datasets))
        w.add_uint32("imatrix.chunk_count", chunk_count)
        w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        sums, counts = entries[name]
        w.add_tensor(name + ".counts", np.asarray(counts, dtype=np.float32).reshape(-1, 1))
        w.add_tensor(name + ".in_sum2", np.asarray(sums, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_legacy_imatrix(path, entries, *, chunks=None, dataset=None):
    """entries: name -> (values [nval], ncall)"""
    out = [struct.pack("<i", len(entries))]
    for name, (vals, ncall) in entries.items():
        b = name.encode()
        vals = np.asarray(vals, dtype="<f4")
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
    if chunks is not None:
        out.append(struct.pack("<i", chunks))
        d = (dataset or "").encode()
        out += [struct.pack("<i", len(d)), d]
    path.write_bytes(b"".join(out))


def test_gguf_imatrix_normalized_per_expert(tmp_path):
    rng = np.random.default_rng(0)
    sums = rng.gamma(2.0, 3.0, size=(4, 256)).astype(np.float32)
    counts = np.array([10.4, 0.0, 2.5, 7.0], dtype=np.float32)  # lround: 10, 0, 3, 7
    dense = rng.gamma(2.0, 3.0, size=(1, 256)).astype(np.float32)
    p = tmp_path / "im.gguf"
    write_gguf_imatrix(p, {"blk.0.ffn_up_exps.weight": (sums, counts), "blk.0.attn_q.weight": (dense, [33.0])})
    im = load_imatrix(p)
    assert not im.is_legacy and im.datasets == ["calib.txt"] and im.chunk_count == 7
    w = im.for_tensor("blk.0.ffn_up_exps.weight", (4, 512, 256))
    assert w.shape == (4, 256) and w.dtype == np.float32
    np.testing.assert_array_equal(w[0], sums[0] / np.float32(10))
    np.testing.assert_array_equal(w[1], np.ones(256, np.float32))  # never routed to
    np.testing.assert_array_equal(w[2], sums[2] / np.float32(3))
    np.testing.assert_array_equal(im.for_tensor("blk.0.attn_q.weight", (512, 256)), dense[0] / np.float32(33))
    assert im.for_tensor("blk.0.attn_k.weight", (512, 256)) is None
    assert dict(im.kv_pairs())["quantize.imatrix.entries_count"] == 2


def test_gguf_imatrix_without_metadata_is_refused(tmp_path):
    p = tmp_path / "im.gguf"
    write_gguf_imatrix(p, {"blk.0.attn_q.weight": (np.ones((1, 256)), [1.0])}, metadata=False)
    with pytest.raises(CorruptFile, match="missing imatrix metadata"):
        load_imatrix(p)


def test_legacy_imatrix(tmp_path):
    vals = np.linspace(0.5, 9.0, 512, dtype=np.float32)
    p = tmp_path / "im.dat"
    write_legacy_imatrix(p, {"blk.1.ffn_down_exps.weight": (vals, 3), "blk.1.attn_v.weight": (vals[:256], 0)}, chunks=12, dataset="wiki.txt")
    im = load_imatrix(p)
    assert im.is_legacy and im.chunk_count == 12 and im.datasets == ["wiki.txt"]
    w = im.for_tensor("blk.1.ffn_down_exps.weight", (2, 256, 256))
    np.testing.assert_array_equal(w.reshape(-1), vals / np.float32(3))
    np.testing.assert_array_equal(im.for_tensor("blk.1.attn_v.weight", (64, 256)), vals[:256])


def test_size_mismatch_and_bad_files(tmp_path):
    p = tmp_path / "im.dat"
    write_legacy_imatrix(p, {"blk.0.ffn_up_exps.weight": (np.ones(256), 1), "token_embd.weight": (np.ones(10), 1)})
    im = load_imatrix(p)
    with pytest.raises(LayoutMismatch, match="expected 1024"):
        im.for_tensor("blk.0.ffn_up_exps.weight", (4, 512, 256))
    assert im.for_tensor("token_embd.weight", (1000, 256)) is None  # llama-quantize ignores token_embd mismatches
    bad = tmp_path / "trunc.dat"
    bad.write_bytes(p.read_bytes()[:30])
    with pytest.raises(CorruptFile, match="truncated"):
        load_imatrix(bad)
    nan = tmp_path / "nan.dat"
    write_legacy_imatrix(nan, {"blk.0.attn_q.weight": (np.array([1.0, np.nan] * 128), 1)})
    with pytest.raises(CorruptFile, match="non-finite"):
        load_imatrix(nan)


# --- whole files: convert --imatrix vs the real llama_model_quantize given the same weights --

IM_PRESETS = ["Q4_K_M", "Q5_K_S", "Q6_K", "Q5_0"]


def test_convert_with_imatrix_equals_llama_quantize(tmp_path):
    """``convert -t ... --imatrix FILE`` (one pass, GGUF imatrix with per-expert counts, one
    expert never routed to) gives the tensors llama-quantize writes from the BF16 file when
    handed the weights it derives from that file (normalized here independently)."""
    from click.testing import CliRunner

    from gguf_moe.cli import main
    from gguf_moe.presets import PRESETS
    from gguf_moe.synth import make_model
    from oracle import llama_model_quantize

    src = make_model(tmp_path / "im-moe", layout="fused", n_layer=2, n_expert=4, duplicate_expert=True, seed=5)
    run = CliRunner().invoke
    r = run(main, ["convert", str(src), "-t", "BF16", "-o", str(tmp_path / "bf16.gguf"), "-q"])
    assert r.exit_code == 0, r.output
    bf16 = gguf.GGUFReader(tmp_path / "bf16.gguf")

    rng = np.random.default_rng(7)
    entries, weights = {}, {}
    for t in bf16.tensors:
        if len(t.shape) < 2 or "norm" in t.name or "ffn_gate_inp" in t.name:
            continue
        ne0 = int(t.shape[0])
        n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
        sums = (rng.gamma(0.8, 2.0, size=(n_mat, ne0)) * rng.choice([1e-3, 1.0, 30.0], size=(n_mat, ne0), p=[0.1, 0.8, 0.1])).astype(np.float32)
        sums[:, rng.integers(0, ne0, size=3)] = 0  # dead input channels
        counts = rng.integers(1, 5000, size=n_mat).astype(np.float32)
        if n_mat > 1:
            counts[1] = 0  # an expert never routed to: llama-quantize uses all-ones weights
        entries[t.name] = (sums, counts)
        w = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None].astype(np.float32), np.float32(1))
        weights[t.name] = w.astype(np.float32)
    im = tmp_path / "imatrix.gguf"
    write_gguf_imatrix(im, entries)

    args = ["convert", str(src), "--outdir", str(tmp_path / "direct"), "--imatrix", str(im), "-q"]
    for p in IM_PRESETS:
        args += ["-t", p]
    r = run(main, args)
    assert r.exit_code == 0, r.output

    compared = 0
    for p in IM_PRESETS:
        ref = tmp_path / f"ref-{p}.gguf"
        llama_model_quantize(tmp_path / "bf16.gguf", ref, PRESETS[p].file_type, imatrix=weights)
        ours = gguf.GGUFReader(next((tmp_path / "direct").glob(f"*-{p}.gguf")))
        theirs = gguf.GGUFReader(ref)
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(ours.tensors, theirs.tensors):
            assert a.tensor_type == b.tensor_type, (p, a.name)
            assert a.data.tobytes() == b.data.tobytes(), f"{p}: {a.name} differs from llama-quantize"
            compared += 1
        keys = dict((k, f.contents()) for k, f in ours.fields.items())
        assert keys["quantize.imatrix.entries_count"] == len(entries)
        assert keys["quantize.imatrix.chunks_count"] == 7
    assert compared == len(IM_PRESETS) * len(ours.tensors)

    # and the imatrix changed the bytes (the weights are not ignored)
    r = run(main, ["convert", str(src), "-t", "Q4_K_M", "-o", str(tmp_path / "plain.gguf"), "-q"])
    plain = {t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors}
    ours = {t.name: t.data.tobytes() for t in gguf.GGUFReader(next((tmp_path / "direct").glob("*-Q4_K_M.gguf"))).tensors}
    assert ours["blk.0.ffn_up_exps.weight"] != plain["blk.0.ffn_up_exps.weight"]
