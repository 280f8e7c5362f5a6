"""Split output and input against the real llama-gguf-split and llama.cpp.

* ``convert``/``quantize --split-max-size / --split-max-tensors`` write, in one pass, the
  same files, byte for byte, as ``llama-gguf-split --split`` of the unsplit output (names,
  keys and their types and order, tensor-to-shard assignment, padding);
* ``llama-gguf-split --merge`` of our set gives the unsplit file's metadata and tensors;
* llama.cpp loads the set from its first shard with the same logits as the single file;
* ``quantize``, ``validate`` and ``inspect`` read a set given its first shard or any shard;
  ``validate`` reports missing, truncated and foreign shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import make_model
from oracle import llama_tool, run_llama_tool

TYPES = ("BF16", "Q4_K_M")
#: --split-max-size in llama-gguf-split's syntax, --split-max-tensors
SPLITS = {"size": ("--split-max-size", "1M"), "tensors": ("--split-max-tensors", "7")}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def gguf_split(*args) -> None:
    run_llama_tool("llama-gguf-split", *args)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("src") / "Split-MoE-4x", seed=11)


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single")
    ok("convert", model, *[x for t in TYPES for x in ("-t", t)], "--outdir", d, "-q", "--no-card")
    return d


@pytest.fixture(scope="module", params=list(SPLITS))
def ours(request, model, tmp_path_factory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp(f"ours-{request.param}")
    ok("convert", model, *[x for t in TYPES for x in ("-t", t)], "--outdir", d, "-q", "--no-card", *SPLITS[request.param])
    return request.param, d


def theirs(single: Path, name: str, mode: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = name[: -len(".gguf")]
    gguf_split("--split", *SPLITS[mode], single / name, out / stem)
    return sorted(out.glob(f"{stem}-*-of-*.gguf"))


@pytest.mark.parametrize("t", TYPES)
def test_same_files_as_llama_gguf_split(ours, single, t, tmp_path):
    mode, d = ours
    name = f"Split-MoE-4x-{t}.gguf"
    ref = theirs(single, name, mode, tmp_path / "ref")
    mine = sorted(d.glob(f"Split-MoE-4x-{t}-*-of-*.gguf"))
    assert len(ref) > 2, "the test split should make several shards"
    assert [p.name for p in mine] == [p.name for p in ref]
    for a, b in zip(mine, ref):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs from llama-gguf-split's"
    # what that identity means, spelled out: llama-gguf-split's keys, types and order
    n = len(mine)
    total = 0
    for k, p in enumerate(mine):
        r = gguf.GGUFReader(p)
        keys = [f for f in r.fields if not f.startswith("GGUF.")]
        assert keys[-3:] == ["split.no", "split.tensors.count", "split.count"]
        assert [r.fields[x].types[0] for x in keys[-3:]] == [
            gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT16,
        ]  # fmt: skip
        assert [int(r.fields[x].contents()) for x in keys[-3:]][0::2] == [k, n]
        if k > 0:
            assert len(keys) == 3  # metadata only in the first shard
        total += len(r.tensors)
    assert total == len(gguf.GGUFReader(single / name).tensors)


def test_shards_keep_to_the_limit(ours):
    """--split-max-size counts tensor data (each tensor padded to 32 bytes), as
    llama-gguf-split does, so the first shard may exceed it by its metadata; a tensor larger
    than the limit gets a shard of its own.  --split-max-tensors N: N per shard, the rest last."""
    mode, d = ours
    for t in TYPES:
        shards = sorted(d.glob(f"Split-MoE-4x-{t}-*-of-*.gguf"))
        counts = []
        for p in shards:
            r = gguf.GGUFReader(p)
            counts.append(len(r.tensors))
            data = sum(-(-int(x.n_bytes) // 32) * 32 for x in r.tensors)
            if mode == "size":
                assert 0 < data <= 1_000_000 or len(r.tensors) == 1, p.name
        if mode == "tensors":
            assert counts[:-1] == [7] * (len(counts) - 1) and 0 < counts[-1] <= 7


def test_dry_run_lists_the_shards(ours, model):
    mode, d = ours
    r = ok("convert", model, *[x for t in TYPES for x in ("-t", t)], "--dry-run", *SPLITS[mode])
    listed = sorted(line.split()[0] for line in r.output.splitlines() if line.startswith("Split-MoE-4x-"))
    assert listed == sorted(p.name for p in d.glob("*.gguf"))


def test_merge_gives_the_single_file(ours, single, tmp_path):
    mode, d = ours
    for t in TYPES:
        merged = tmp_path / f"merged-{t}.gguf"
        gguf_split("--merge", sorted(d.glob(f"Split-MoE-4x-{t}-*-of-*.gguf"))[0], merged)
        a, b = gguf.GGUFReader(single / f"Split-MoE-4x-{t}.gguf"), gguf.GGUFReader(merged)
        kv_a = {k: (f.types, f.contents()) for k, f in a.fields.items() if not k.startswith(("GGUF.", "split."))}
        kv_b = {k: (f.types, f.contents()) for k, f in b.fields.items() if not k.startswith(("GGUF.", "split."))}
        assert list(kv_a) == list(kv_b) and kv_a == kv_b
        assert int(b.fields["split.count"].contents()) == 0  # what --merge leaves
        assert [x.name for x in a.tensors] == [x.name for x in b.tensors]
        for x, y in zip(a.tensors, b.tensors):
            assert x.tensor_type == y.tensor_type
            assert [int(v) for v in x.shape] == [int(v) for v in y.shape], x.name
            assert np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)), x.name


def test_llama_cpp_loads_the_set_with_the_same_logits(ours, single):
    llama_cpp = pytest.importorskip("llama_cpp")
    mode, d = ours
    # BF16: quantized matrix products of this llama-cpp-python build stop with a general
    # protection fault in libggml-cpu on some CPUs; the loading path is the same for every type
    first = sorted(d.glob("Split-MoE-4x-BF16-*-of-*.gguf"))[0]

    def logits(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
        )  # fmt: skip
        try:
            ids = llm.tokenize(b"The router sends each token to two experts.", add_bos=True)
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()

    a, b = logits(single / "Split-MoE-4x-BF16.gguf"), logits(first)
    assert a.shape[0] > 5 and np.isfinite(a).all()
    assert np.array_equal(a, b)


def test_quantize_reads_a_set_and_writes_one(ours, single, tmp_path):
    mode, d = ours
    bf16 = sorted(d.glob("Split-MoE-4x-BF16-*-of-*.gguf"))
    ref = tmp_path / "ref.gguf"
    ok("quantize", single / "Split-MoE-4x-BF16.gguf", ref, "Q5_K_M", "-q")
    for i, given in enumerate((bf16[0], bf16[-1])):  # the first shard, or any shard
        out = tmp_path / f"from-set-{i}.gguf"
        ok("quantize", given, out, "Q5_K_M", "-q")
        assert out.read_bytes() == ref.read_bytes()
    # and a split output from quantize equals llama-gguf-split's split of the single one
    ok("quantize", bf16[0], tmp_path / "q.gguf", "Q5_K_M", "-q", *SPLITS[mode])
    want = theirs(tmp_path, "ref.gguf", mode, tmp_path / "theirs")
    got = sorted(tmp_path.glob("q-*-of-*.gguf"))
    assert len(got) == len(want) > 1
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, want))


def test_validate_and_inspect_a_set(ours, single, model):
    import json

    mode, d = ours
    shards = sorted(d.glob("Split-MoE-4x-Q4_K_M-*-of-*.gguf"))
    r = ok("validate", *shards, "--json")
    rep = json.loads(r.output)
    assert len(rep["files"]) == 1 and rep["ok"]  # the shards are one set
    f = rep["files"][0]
    assert f["summary"]["n_tensors"] == len(gguf.GGUFReader(single / "Split-MoE-4x-Q4_K_M.gguf").tensors)
    assert f["summary"]["n_layer"] == 2 and f["summary"]["n_expert"] == 4  # the whole-model checks ran
    # every tensor compared with the source, each read from its own shard
    rep = json.loads(ok("validate", shards[-1], "--deep", "--source", model, "--json").output)["files"][0]
    assert rep["ok"] and rep["summary"]["source_tensors_compared"] == f["summary"]["n_tensors"]
    a = json.loads(ok("inspect", shards[1], "--json").output)
    b = json.loads(ok("inspect", single / "Split-MoE-4x-Q4_K_M.gguf", "--json").output)
    assert a["totals"] == b["totals"] and a["types"] == b["types"]
    assert [s["path"] for s in a["shards"]] == [str(p) for p in shards]
    assert sum(s["file_size"] for s in a["shards"]) == a["file_size"] == sum(p.stat().st_size for p in shards)


@pytest.fixture()
def set_copy(ours, tmp_path) -> list[Path]:
    mode, d = ours
    out = []
    for p in sorted(d.glob("Split-MoE-4x-Q4_K_M-*-of-*.gguf")):
        out.append(tmp_path / p.name)
        shutil.copy(p, out[-1])
    return out


def _validate_fails(shards: list[Path], *words: str) -> str:
    import json

    r = run("validate", shards[0], "--json")
    assert r.exit_code == 1, r.output
    msgs = " ".join(f["message"] for f in json.loads(r.output)["files"][0]["findings"] if f["severity"] == "error")
    for w in words:
        assert w in msgs, msgs
    return msgs


def test_validate_reports_a_missing_shard(set_copy):
    set_copy[1].unlink()
    _validate_fails(set_copy, "missing", set_copy[1].name)
    # given a later shard, with the first one gone
    set_copy[0].unlink()
    r = run("validate", set_copy[2])
    assert r.exit_code == 1 and "missing" in r.output


def test_validate_reports_a_truncated_shard(set_copy):
    data = set_copy[1].read_bytes()
    set_copy[1].write_bytes(data[: len(data) - 1000])
    _validate_fails(set_copy, "truncated")


def _split_errors(first: Path) -> list[dict]:
    import json

    r = run("validate", first, "--json")
    assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    rep = json.loads(r.output)["files"][0]
    return [f for f in rep["findings"] if f["severity"] == "error" and f["check"] == "split"]


def test_validate_reports_a_foreign_shard(set_copy, ours, single, tmp_path):
    mode, d = ours
    # shard 2 of the same model split the other way: other tensors (and maybe another count)
    other = "tensors" if mode == "size" else "size"
    shutil.copy(theirs(single, "Split-MoE-4x-Q4_K_M.gguf", other, tmp_path / "other")[1], set_copy[1])
    assert _split_errors(set_copy[0])
    # shard 2 of a set with another count (the BF16 split by size has more shards)
    bf16 = sorted(d.glob("Split-MoE-4x-BF16-*-of-*.gguf"))
    if len(bf16) != len(set_copy):
        shutil.copy(bf16[1], set_copy[1])
        assert any("does not belong" in f["message"] for f in _split_errors(set_copy[0]))
    # a shard 2 with the right split keys holding shard 3's tensors
    r3 = gguf.GGUFReader(set_copy[2])
    n, count = int(r3.fields["split.tensors.count"].contents()), int(r3.fields["split.count"].contents())
    w = gguf.GGUFWriter(set_copy[1], "llama")
    w.kv_data[0].clear()
    w.add_uint16("split.no", 1)
    w.add_int32("split.tensors.count", n)
    w.add_uint16("split.count", count)
    for t in r3.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=gguf.GGMLQuantizationType(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    errs = _split_errors(set_copy[0])
    assert any("is in" in f["message"] for f in errs), errs


def test_bad_split_options(model, tmp_path):
    for bad in ("1.5G", "10K", "0M", "big"):
        r = run("convert", model, "-t", "Q8_0", "-o", tmp_path / "x.gguf", "--split-max-size", bad)
        assert r.exit_code == 2 and "--split-max-size" in r.output, (bad, r.output)
    r = run("convert", model, "-t", "Q8_0", "-o", tmp_path / "x.gguf", "--split-max-size", "1G", "--split-max-tensors", "3")
    assert r.exit_code == 2 and "not both" in r.output
    assert not list(tmp_path.iterdir())


def test_first_tensor_over_the_limit_is_refused_as_llama_gguf_split_does(single, model, tmp_path):
    """A limit below the first tensor's size: llama-gguf-split stops ("one of splits have 0
    tensors"); gguf-moe says so in one line before writing anything."""
    import subprocess

    # token_embd / output in F32 are 1 MB each at this size
    big = tmp_path / "f32.gguf"
    ok("convert", model, "-t", "F32", "-o", big, "-q")
    if gguf.GGUFReader(big).tensors[0].n_bytes <= 1_000_000:
        pytest.skip("the first tensor fits in 1M")
    r = subprocess.run([llama_tool("llama-gguf-split"), "--split", "--split-max-size", "1M", big, tmp_path / "t"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0
    out = tmp_path / "o"
    out.mkdir()
    r = run("convert", model, "-t", "F32", "-o", out / "x.gguf", "--split-max-size", "1M")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "smaller than the first tensor" in r.output
    assert not list(out.iterdir())


def test_qwen2moe_float_shapes_as_llama_gguf_split_writes_them(tmp_path):
    """Qwen2-MoE's ffn_gate_inp_shexp is [n_embd, 1]: the converter keeps both dimensions in
    a float file, llama-gguf-split's shards store ggml_n_dims of them, and so do ours."""
    pytest.importorskip("torch")
    from test_qwen2moe import make_qwen2moe

    tok = make_model(tmp_path / "tok", tokenizer="bpe", seed=3)
    src = make_qwen2moe(tmp_path / "Qwen-MoE", tok, layout="fused")
    ok("convert", src, "-t", "BF16", "-o", tmp_path / "q.gguf", "-q")
    assert any(len(t.shape) == 2 and int(t.shape[1]) == 1 for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    ok("convert", src, "-t", "BF16", "-o", tmp_path / "ours" / "q.gguf", "-q", "--split-max-tensors", "9")
    gguf_split("--split", "--split-max-tensors", "9", tmp_path / "q.gguf", tmp_path / "ref" / "q")
    mine, ref = sorted((tmp_path / "ours").iterdir()), sorted((tmp_path / "ref").iterdir())
    assert [p.name for p in mine] == [p.name for p in ref] and len(mine) > 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(mine, ref))


def test_eval_reads_a_set_as_the_single_file(ours, single, model, tmp_path):
    """``gguf-moe eval`` scores a set (given shard by shard: once) as the unsplit file."""
    import json

    pytest.importorskip("torch")
    if "eval" not in main.commands:
        pytest.skip("no eval command in this version")
    from gguf_moe.synth import _training_text

    mode, d = ours
    text = tmp_path / "text.txt"
    text.write_text(_training_text() * 3)
    shards = sorted(d.glob("Split-MoE-4x-Q4_K_M-*-of-*.gguf"))
    r = ok("eval", model, single / "Split-MoE-4x-Q4_K_M.gguf", *reversed(shards), "-f", text, "--ctx", "64",
           "--chunks", "2", "--json")  # fmt: skip
    a, b = json.loads(r.output)["files"]
    assert b["file"] == str(shards[0]) and b["bytes"] == sum(p.stat().st_size for p in shards)
    for k in ("type", "bpw", "ppl", "kld_mean", "kld_p99", "top1"):
        assert a[k] == b[k], k
