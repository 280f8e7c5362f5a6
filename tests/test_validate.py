"""validate / inspect: good files pass; each crafted corruption is reported with exit 1."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from gguf_moe.cli import main
from gguf_moe.synth import make_model
from gguf_moe.validate import ERROR_BOUNDS, inspect_file, read_header, validate_file

PRESETS = ("BF16", "Q4_K_M", "Q8_0")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("src") / "moe4", layout="fused", n_layer=2, n_expert=4,
                      duplicate_expert=True, seed=3)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    args = ["convert", str(model), "--outdir", str(out)]
    for p in PRESETS:
        args += ["-t", p]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    found = {p: next(out.glob(f"*{p}.gguf")) for p in PRESETS}
    return found


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def patch(path: Path, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


def patch_u32_kv(path: Path, key: str, value: int) -> None:
    """Overwrite a u32 KV in place (key bytes, then u32 type 4, then the value)."""
    raw = path.read_bytes()
    k = key.encode()
    i = raw.index(struct.pack("<Q", len(k)) + k)
    pos = i + 8 + len(k)
    assert struct.unpack_from("<I", raw, pos)[0] == GGUFValueType.UINT32
    patch(path, pos + 4, struct.pack("<I", value))


def rewrite(src: Path, dst: Path, *, drop: set[str] = frozenset(), rename: dict[str, str] | None = None,
            kv: dict | None = None) -> Path:
    """Copy a GGUF with gguf-py, leaving out or renaming tensors, replacing KV values."""
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, (kv or {}).get(key, f.contents()), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        name = (rename or {}).get(t.name, t.name)
        data = np.array(t.data)
        if t.tensor_type in (T.F32, T.F16):
            w.add_tensor(name, data, raw_shape=tuple(reversed([int(x) for x in t.shape])), raw_dtype=t.tensor_type)
        else:
            w.add_tensor(name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def errors_of(path, **kw):
    rep = validate_file(path, **kw)
    return rep, [f for f in rep.findings if f.severity == "error"]


# --------------------------------------------------------------------------- good files


@pytest.mark.parametrize("preset", PRESETS)
def test_good_files_pass_every_check(files, model, preset):
    rep = validate_file(files[preset], deep=True, source=model)
    assert rep.ok, [f.to_dict() for f in rep.errors]
    assert not rep.warnings, [f.to_dict() for f in rep.warnings]
    assert rep.summary["n_expert"] == 4 and rep.summary["n_layer"] == 2
    assert rep.summary["source_tensors_compared"] == rep.summary["n_tensors"]
    # the synthetic merge repeats one source model: two experts are byte-identical everywhere
    dup = [f for f in rep.findings if f.check == "experts"]
    assert dup and "6 of 6" in dup[0].message
    for name, st in rep.tensors.items():
        src = st["source"]
        if preset == "BF16" or st["type"] in ("F32", "BF16"):
            assert src["exact"], name
        else:
            assert src["rel_rms"] <= src["bound"] == ERROR_BOUNDS[st["type"]], name
        assert st["nonfinite"] == 0


def test_cli_validate_ok_and_json(files):
    r = run("validate", *files.values())
    assert r.exit_code == 0, r.output
    assert r.output.count("OK ") == len(files)
    r = run("validate", "--json", files["Q4_K_M"])
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["ok"] is True and doc["files"][0]["n_errors"] == 0
    assert doc["files"][0]["summary"]["file_type"] == "Q4_K_M"


def test_inspect(files):
    info = inspect_file(files["Q4_K_M"])
    h = read_header(files["Q4_K_M"])
    assert info["totals"]["n_tensors"] == len(h.tensors) == len(info["tensors"])
    assert sum(e["n_bytes"] for e in info["types"].values()) == info["totals"]["n_bytes"]
    assert set(info["types"]) >= {"F32", "Q4_K", "Q6_K"}
    assert 4.0 < info["totals"]["bits_per_weight"] < 6.5
    toks = next(e for e in info["kv"] if e["key"] == "tokenizer.ggml.tokens")
    assert toks["type"] == "array[str]" and toks["value"]["length"] > 5 and len(toks["value"]["head"]) == 5
    r = run("inspect", "--json", files["Q4_K_M"])
    assert r.exit_code == 0 and json.loads(r.output)["totals"] == info["totals"]
    r = run("inspect", files["Q4_K_M"])
    assert r.exit_code == 0 and "blk.1.ffn_down_exps.weight" in r.output and "bits per weight" in r.output


# --------------------------------------------------------------------------- corruptions


def _expect_cli_error(path, *needles, args=()):
    r = run("validate", *args, path)
    assert r.exit_code == 1, r.output
    flat = " ".join(r.output.split())
    r2 = run("validate", "--json", *args, path)
    assert r2.exit_code == 1
    doc = json.loads(r2.output)
    msgs = " | ".join(f"{f.get('tensor', '')}: {f['message']}" for f in doc["files"][0]["findings"] if f["severity"] == "error")
    for n in needles:
        assert n in msgs, msgs
    assert "FAILED" in flat
    return msgs


def test_truncated_data(files, tmp_path):
    p = copy(files["Q8_0"], tmp_path / "t.gguf")
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 1000)
    _expect_cli_error(p, "truncated", "blk.1")


def test_truncated_header_is_a_finding_not_a_traceback(files, tmp_path):
    p = tmp_path / "h.gguf"
    p.write_bytes(files["Q8_0"].read_bytes()[:700])
    _expect_cli_error(p, "file ends at byte 700")
    r = run("inspect", p)
    assert r.exit_code == 1 and "validate" in r.output and "Traceback" not in r.output


def test_bad_magic_and_absurd_counts(files, tmp_path):
    p = copy(files["Q8_0"], tmp_path / "m.gguf")
    patch(p, 0, b"GGML")
    _expect_cli_error(p, "bad magic")
    p = copy(files["Q8_0"], tmp_path / "c.gguf")
    patch(p, 8, struct.pack("<q", 1 << 40))
    _expect_cli_error(p, "claims 1099511627776 tensors")


def test_nan_scale_in_q4_k_block(files, tmp_path):
    p = copy(files["Q4_K_M"], tmp_path / "nan.gguf")
    h = read_header(p)
    t = next(t for t in h.tensors if t.type_id == T.Q4_K and len(t.ne) == 3)
    row, block = 3, 1
    pos = h.data_offset + t.offset + row * t.row_bytes + block * 144  # d of the block (offset 0)
    patch(p, pos, struct.pack("<H", 0x7E00))  # fp16 NaN
    _expect_cli_error(p, t.name, "NaN/Inf scale", f"block {block} of row {row}")
    # dmin (offset 2 in the block) is checked too
    p2 = copy(files["Q4_K_M"], tmp_path / "inf.gguf")
    patch(p2, pos + 2, struct.pack("<H", 0x7C00))  # +inf
    _expect_cli_error(p2, t.name, "NaN/Inf scale")


def test_nan_in_float_data(files, tmp_path):
    p = copy(files["BF16"], tmp_path / "f.gguf")
    h = read_header(p)
    t = next(t for t in h.tensors if t.type_id == T.BF16)
    patch(p, h.data_offset + t.offset + 2 * 10, struct.pack("<H", 0x7FC0))
    _expect_cli_error(p, t.name, "NaN/Inf values", "element 10 of row 0")
    n = next(t for t in h.tensors if t.type_id == T.F32)
    patch(p, h.data_offset + n.offset, struct.pack("<f", float("inf")))
    _expect_cli_error(p, n.name)


def test_wrong_expert_count(files, tmp_path):
    p = copy(files["Q4_K_M"], tmp_path / "e.gguf")
    patch_u32_kv(p, "llama.expert_count", 8)
    msgs = _expect_cli_error(p, "has 4 experts (ne[2]) but llama.expert_count is 8", "router has 4 outputs")
    assert "blk.0.ffn_up_exps.weight" in msgs


def test_expert_used_count_above_expert_count(files, tmp_path):
    p = copy(files["Q8_0"], tmp_path / "u.gguf")
    patch_u32_kv(p, "llama.expert_used_count", 5)
    _expect_cli_error(p, "expert_used_count 5 exceeds expert_count 4")


def test_vocab_mismatch(files, tmp_path):
    # token list shorter than token_embd/output: llama.cpp refuses (shapes come from the token list)
    p = _corrupt("short_vocab", files, tmp_path)
    n = read_header(files["Q8_0"]).kv("llama.vocab_size")
    _expect_cli_error(p, f"token_embd.weight: has {n} rows but the vocabulary has {n - 1} tokens",
                             f"output.weight: has {n} rows")
    # only the vocab_size KV disagrees: llama.cpp ignores it when there is a token list -> warning
    p = copy(files["Q8_0"], tmp_path / "v.gguf")
    patch_u32_kv(p, "llama.vocab_size", n + 1)
    rep = validate_file(p)
    assert rep.ok and any(f"vocab_size is {n + 1} but tokenizer.ggml.tokens has {n}" in w.message for w in rep.warnings)


def test_missing_and_unknown_tensors(files, tmp_path):
    p = rewrite(files["Q8_0"], tmp_path / "miss.gguf", drop={"blk.1.ffn_up_exps.weight"})
    _expect_cli_error(p, "blk.1.ffn_up_exps.weight: required tensor is missing")
    p = rewrite(files["Q8_0"], tmp_path / "extra.gguf", rename={"blk.1.attn_q.weight": "blk.2.attn_q.weight"})
    _expect_cli_error(p, "blk.1.attn_q.weight: required tensor is missing", "blk.2.attn_q.weight: unexpected tensor",
                      "layer 2 but block_count is 2")
    # the rewritten-but-intact copy is still valid (so the errors above come from the edits)
    assert validate_file(rewrite(files["Q8_0"], tmp_path / "same.gguf")).ok


def test_overlapping_offsets(files, tmp_path):
    p = copy(files["Q8_0"], tmp_path / "o.gguf")
    h = read_header(p)
    a, b = h.tensors[3], h.tensors[4]
    patch(p, b.offset_pos, struct.pack("<Q", a.offset))  # b now points at a's bytes
    _expect_cli_error(p, f"{b.name}: data offset {a.offset} overlaps the previous tensor")
    p = copy(files["Q8_0"], tmp_path / "al.gguf")
    patch(p, b.offset_pos, struct.pack("<Q", b.offset + 4))
    _expect_cli_error(p, "is not a multiple of the alignment 32")


def test_type_mix_differing_from_file_type_is_a_warning(files, tmp_path):
    p = copy(files["Q4_K_M"], tmp_path / "ft.gguf")
    patch_u32_kv(p, "general.file_type", 17)  # Q5_K_M
    rep = validate_file(p)
    assert rep.ok
    w = [f for f in rep.warnings if f.check == "types"]
    assert w and "Q5_K_M" in w[0].message
    assert run("validate", p).exit_code == 0


def test_source_mismatch_is_detected(files, tmp_path):
    other = make_model(tmp_path / "other", layout="fused", n_layer=2, n_expert=4, seed=11)
    rep, errs = errors_of(files["Q4_K_M"], source=other)
    assert not rep.ok
    bad = {f.tensor for f in errs if f.check == "source"}
    assert "blk.0.ffn_down_exps.weight" in bad and "token_embd.weight" in bad
    assert any("exceeds the Q4_K bound" in f.message for f in errs)
    rep, errs = errors_of(files["BF16"], source=other)
    assert any("round-to-nearest-even bf16" in f.message for f in errs)


def test_swapped_experts_are_detected_against_the_source(files, model, tmp_path):
    """Two (different) experts swapped in one tensor: format checks pass, the source check fails."""
    p = copy(files["Q8_0"], tmp_path / "swap.gguf")
    h = read_header(p)
    t = next(t for t in h.tensors if t.name == "blk.1.ffn_gate_exps.weight")
    per = t.n_bytes // t.ne[2]
    base = h.data_offset + t.offset
    raw = bytearray(p.read_bytes()[base : base + t.n_bytes])
    raw[0:per], raw[per : 2 * per] = raw[per : 2 * per], raw[0:per]
    patch(p, base, bytes(raw))
    assert validate_file(p).ok
    _expect_cli_error(p, "blk.1.ffn_gate_exps.weight: block-relative RMS error", args=("--source", model))


def test_missing_file_and_directory_are_usage_errors(tmp_path):
    assert run("validate", tmp_path / "nope.gguf").exit_code == 2
    assert run("validate", tmp_path).exit_code == 2


def test_random_header_corruption_never_raises(files, tmp_path):
    """Bytes flipped in the header (counts, lengths, types, dims, offsets) or a cut file:
    always a report, never an exception; inspect fails only with a clean error."""
    import random

    from gguf_moe.errors import GgufMoeError

    src = files["Q4_K_M"]
    raw = src.read_bytes()
    h = read_header(src)
    n_failed = 0
    for seed in range(60):
        rnd = random.Random(seed)
        b = bytearray(raw)
        for _ in range(rnd.choice([1, 2, 4])):
            pos = rnd.choice([rnd.randrange(0, 64), rnd.randrange(h.info_end - 1400, h.info_end),
                              rnd.randrange(0, h.data_offset)])
            b[pos] = rnd.randrange(256)
        if seed % 5 == 0:
            b = b[: rnd.randrange(len(b))]
        p = tmp_path / "fz.gguf"
        p.write_bytes(bytes(b))
        rep = validate_file(p)
        n_failed += not rep.ok
        try:
            inspect_file(p)
        except GgufMoeError:
            pass
    assert n_failed >= 45, n_failed  # most are caught; the rest hit bytes that do not matter (e.g. token text)


# --------------------------------------------------------------------------- agreement with llama.cpp's loader


def _llama_cpp_loads(path: Path) -> bool:
    """Load with the real llama.cpp (tensor data validation on); False if it refuses."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.check_tensors = True
    m = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not m:
        return False
    llama_cpp.llama_model_free(m)
    return True


def _corrupt(kind: str, files, tmp: Path) -> Path:
    if kind == "truncated":
        p = copy(files["Q8_0"], tmp / "t.gguf")
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size - 1000)
    elif kind == "bad_magic":
        p = copy(files["Q8_0"], tmp / "m.gguf")
        patch(p, 0, b"GGML")
    elif kind == "nan_scale":
        p = copy(files["Q4_K_M"], tmp / "n.gguf")
        h = read_header(p)
        t = next(t for t in h.tensors if t.type_id == T.Q4_K and len(t.ne) == 3)
        patch(p, h.data_offset + t.offset + 3 * t.row_bytes + 144, struct.pack("<H", 0x7E00))
    elif kind == "nan_bf16":
        p = copy(files["BF16"], tmp / "b.gguf")
        h = read_header(p)
        t = next(t for t in h.tensors if t.type_id == T.BF16)
        patch(p, h.data_offset + t.offset + 20, struct.pack("<H", 0x7FC0))
    elif kind == "expert_count":
        p = copy(files["Q4_K_M"], tmp / "e.gguf")
        patch_u32_kv(p, "llama.expert_count", 8)
    elif kind == "short_vocab":
        r = GGUFReader(str(files["Q8_0"]))
        short = {k: r.fields[f"tokenizer.ggml.{k}"].contents()[:-1] for k in ("tokens", "scores", "token_type")}
        p = rewrite(files["Q8_0"], tmp / "sv.gguf", kv={f"tokenizer.ggml.{k}": v for k, v in short.items()})
    elif kind == "missing_tensor":
        p = rewrite(files["Q8_0"], tmp / "miss.gguf", drop={"blk.1.ffn_up_exps.weight"})
    elif kind == "extra_layer":
        p = rewrite(files["Q8_0"], tmp / "x.gguf", rename={"blk.1.attn_q.weight": "blk.2.attn_q.weight"})
    elif kind == "overlap":
        p = copy(files["Q8_0"], tmp / "o.gguf")
        h = read_header(p)
        patch(p, h.tensors[4].offset_pos, struct.pack("<Q", h.tensors[3].offset))
    elif kind == "misaligned":
        p = copy(files["Q8_0"], tmp / "a.gguf")
        h = read_header(p)
        patch(p, h.tensors[4].offset_pos, struct.pack("<Q", h.tensors[4].offset + 4))
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind", ["truncated", "bad_magic", "nan_scale", "nan_bf16", "expert_count", "short_vocab",
                                  "missing_tensor", "extra_layer", "overlap", "misaligned"])
def test_errors_are_files_llama_cpp_refuses(files, tmp_path, kind):
    """Each corruption we call an error is one the real llama.cpp loader rejects too."""
    p = _corrupt(kind, files, tmp_path)
    assert not validate_file(p).ok
    assert not _llama_cpp_loads(p)


def test_good_files_load_in_llama_cpp(files):
    for p in files.values():
        assert validate_file(p).ok and _llama_cpp_loads(p)
