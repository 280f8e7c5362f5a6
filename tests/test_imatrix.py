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
