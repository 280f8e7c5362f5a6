"""Bad input: exit status 1, one clear ``error:`` line, nothing left behind."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import make_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    return {
        "fused": make_model(base / "fused", layout="fused", seed=5, shards=2),
        "legacy": make_model(base / "legacy", layout="legacy", seed=5, shards=2),
    }


@pytest.fixture
def model(pristine, tmp_path):
    """A fresh copy to break: model(layout) -> directory."""

    def copy(layout: str = "fused") -> Path:
        d = tmp_path / f"src-{layout}"
        shutil.copytree(pristine[layout], d)
        return d

    return copy


def fail(src: Path, tmp_path: Path, *types: str, extra=()) -> str:
    """Run convert, expect exit 1 and a single-line error; nothing may be written."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = sorted(p.name for p in out.iterdir())
    args = ["convert", str(src), *[x for t in (types or ("Q8_0",)) for x in ("-t", t)], "--outdir", str(out), "-q", *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    err = r.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, (err, r.exception, r.exc_info)
    assert "Traceback" not in r.output
    assert sorted(p.name for p in out.iterdir()) == before  # no output, no .part
    assert not list(src.glob("*.part"))
    return err


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header_dict)`` and rewrite the file with the new header (data kept)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def _find(d: Path, name: str) -> tuple[Path, dict]:
    for s in _shards(d):
        raw = s.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        h = json.loads(raw[8 : 8 + n])
        if name in h:
            return s, h[name] | {"_data_start": 8 + n}
    raise KeyError(name)


def test_missing_shard(model, tmp_path):
    d = model()
    _shards(d)[1].unlink()
    err = fail(d, tmp_path)
    assert "model-00002-of-00002.safetensors" in err and "does not exist" in err


def test_truncated_shard(model, tmp_path):
    d = model()
    s = _shards(d)[0]
    size = s.stat().st_size
    with open(s, "r+b") as f:
        f.truncate(size - 1000)
    err = fail(d, tmp_path)
    assert s.name in err and "truncated" in err and f"file has {size - 1000} bytes" in err


def test_truncated_to_nothing(model, tmp_path):
    d = model()
    s = _shards(d)[0]
    s.write_bytes(b"\x01\x02")
    err = fail(d, tmp_path)
    assert s.name in err and "truncated" in err


def test_index_names_tensor_no_shard_has(model, tmp_path):
    d = model()
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"]["model.layers.0.mlp.experts.bogus"] = "model-00001-of-00002.safetensors"
    idx_path.write_text(json.dumps(idx))
    err = fail(d, tmp_path)
    assert "model.layers.0.mlp.experts.bogus" in err and "model-00001-of-00002.safetensors" in err


def test_header_offsets_beyond_file(model, tmp_path):
    d = model()
    name = "model.layers.1.self_attn.v_proj.weight"
    s, _ = _find(d, name)

    def edit(h):
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + 10**9, e + 10**9]

    _rewrite_header(s, edit)
    err = fail(d, tmp_path)
    assert name in err and s.name in err and "truncated" in err


def test_header_dtype_shape_disagrees_with_span(model, tmp_path):
    d = model()
    name = "model.layers.0.self_attn.o_proj.weight"
    s, _ = _find(d, name)

    def edit(h):
        h[name]["dtype"] = "F32"  # twice the bytes the offsets span

    _rewrite_header(s, edit)
    err = fail(d, tmp_path)
    assert name in err and "needs" in err and "span" in err


def test_unsupported_architecture(model, tmp_path):
    d = model()
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = fail(d, tmp_path)
    assert "GPT2LMHeadModel" in err and "MixtralForCausalLM" in err and "supported" in err


def test_experts_of_different_shapes(model, tmp_path):
    d = model("legacy")
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    s, info = _find(d, name)
    ff, dim = info["shape"]

    def edit(h):
        h[name]["shape"] = [ff // 2, dim * 2]  # same byte span, different shape

    _rewrite_header(s, edit)
    err = fail(d, tmp_path)
    assert name in err and "same shape" in err and str([ff // 2, dim * 2]) in err


def test_missing_config_key(model, tmp_path):
    d = model()
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_local_experts"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = fail(d, tmp_path)
    assert "num_local_experts" in err and "config.json" in err


def test_missing_config_file(model, tmp_path):
    d = model()
    (d / "config.json").unlink()
    err = fail(d, tmp_path)
    assert "config.json" in err and "not found" in err


def test_not_a_directory(tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nope"), "-t", "Q8_0", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "not a directory" in r.stderr
    assert list(tmp_path.iterdir()) == []


def _poison(d: Path, name: str, flat_index: int, value: float) -> None:
    s, info = _find(d, name)
    assert info["dtype"] == "BF16"
    off = info["_data_start"] + info["data_offsets"][0] + 2 * flat_index
    bits = (np.array([value], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    with open(s, "r+b") as f:
        f.seek(off)
        f.write(bits.tobytes())


@pytest.mark.parametrize("types", [("Q4_K_M",), ("BF16",), ("Q8_0", "F16")])
def test_non_finite_weight_names_the_tensor(model, tmp_path, types):
    """A NaN in layer 1 (so earlier tensors were already streamed out): no file remains."""
    d = model()
    cfg = json.loads((d / "config.json").read_text())
    ff, dim = cfg["intermediate_size"], cfg["hidden_size"]
    # expert 2, up half (row ff + 3 of that expert), column 5
    _poison(d, "model.layers.1.mlp.experts.gate_up_proj", (2 * 2 * ff + ff + 3) * dim + 5, float("nan"))
    err = fail(d, tmp_path, *types)
    assert "blk.1.ffn_up_exps.weight" in err and "expert 2" in err and "row 3" in err and "non-finite" in err


def test_inf_weight(model, tmp_path):
    d = model()
    _poison(d, "model.embed_tokens.weight", 10, float("inf"))
    err = fail(d, tmp_path, "Q4_K_M")
    assert "token_embd.weight" in err and "inf" in err


def test_output_exists(model, tmp_path):
    d = model()
    out = tmp_path / "out"
    out.mkdir()
    existing = out / f"{d.name}-Q8_0.gguf"
    existing.write_bytes(b"keep me")
    r = CliRunner().invoke(main, ["convert", str(d), "-t", "Q4_K_M", "-t", "Q8_0", "--outdir", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "already exists" in r.stderr and "--force" in r.stderr
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == [existing.name]


def test_unreadable_gguf_for_quantize(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    r = CliRunner().invoke(main, ["quantize", str(bad), str(tmp_path / "o.gguf"), "Q8_0"])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_interrupt_removes_partial_files(pristine, tmp_path):
    """Ctrl-C in the middle of a multi-output pass: every .part file is deleted."""
    from gguf_moe.convert import Progress, convert, plan_outputs
    from gguf_moe.source import open_model

    class Interrupt(Progress):
        def __init__(self):
            self.n = 0

        def advance(self, nbytes):
            self.n += 1
            if self.n == 8:
                assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf.part", "b.gguf.part"]
                raise KeyboardInterrupt

    with open_model(pristine["fused"]) as m:
        plans = plan_outputs(m, ["Q4_K_M", "BF16"], [tmp_path / "a.gguf", tmp_path / "b.gguf"])
        with pytest.raises(KeyboardInterrupt):
            convert(m, plans, progress=Interrupt(), chunk_bytes=64 << 10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [(), ("--dry-run",)])
def test_incomplete_rope_scaling(model, tmp_path, extra):
    d = model()
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "yarn", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    err = fail(d, tmp_path, extra=extra)
    assert "yarn" in err and "original_max_position_embeddings" in err


def test_header_overlapping_tensors(model, tmp_path):
    d = model()
    s = _shards(d)[0]
    raw = s.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    span = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]

    def edit(h):  # b now starts inside a, same size
        start = h[a]["data_offsets"][0] + 2
        h[b]["data_offsets"] = [start, start + span]

    _rewrite_header(s, edit)
    err = fail(d, tmp_path)
    assert "overlap" in err and a in err and b in err


def test_tokenizer_json_not_utf8(model, tmp_path):
    d = model("fused")
    (d / "tokenizer.json").write_bytes(b'\xff\xfe{"version": "1.0"}')
    err = fail(d, tmp_path)
    assert "tokenizer.json" in err and "UTF-8" in err
